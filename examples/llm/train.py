"""A small causal language model whose answers have structure, made here in a few minutes: a Llama-shaped
model (4 layers, 256 hidden, ~3.7M parameters, byte-level BPE of 2048 tokens) trained on Python's own standard
library sources, saved as a Hugging Face folder (config.json, model.safetensors, tokenizer).

It is what it is: a toy that continues Python code in the standard library's style (indentation, keywords,
docstrings), not a model that knows anything. No causal LM ships in a package that is installable here, so
the example makes its own; `aitune-archive --hf-model FOLDER` then archives it like any other folder.

    python examples/llm/train.py --out examples/llm/model --minutes 12
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from corpus import make_tokenizer, stdlib_text

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
WINDOW, BATCH = 128, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time (the loss printed as it goes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    text = stdlib_text(4_000_000)
    tokenizer = make_tokenizer(2048, text[:1_000_000])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"{len(text) / 1e6:.1f} M characters of the standard library, {len(ids) / 1e6:.2f} M tokens", flush=True)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, **SHAPE)
    model = LlamaForCausalLM(config).train()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, training {args.minutes} min",
          flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    started, step, budget = time.perf_counter(), 0, args.minutes * 60
    while (elapsed := time.perf_counter() - started) < budget:
        for group in optimizer.param_groups:  # cosine decay over the time budget
            group["lr"] = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        starts = torch.randint(0, len(ids) - WINDOW - 1, (BATCH,))
        batch = torch.stack([ids[start:start + WINDOW + 1] for start in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}, {elapsed:.0f} s, loss {loss.item():.3f}", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    prompt = tokenizer("def read_file(path):\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        sample = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False)
    print(f"saved {args.out} after {step} steps, loss {loss.item():.3f}; greedy continuation of "
          f"'def read_file(path):':\n{tokenizer.decode(sample[0], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
