"""Small causal language model folders made the way a user's are: a byte-level BPE tokenizer trained here on
Python's own standard library sources, a Llama-family config, weights (random, or a few minutes of training),
``save_pretrained``. Loaded back by aitune-archive through the path a user's folder takes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

SPECIAL = ["<s>", "</s>", "<pad>"]


def stdlib_text(limit: int = 2_000_000) -> str:
    """Text every machine has: the standard library's Python sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n".join(parts)[:limit]


def make_tokenizer(vocab_size: int = 512, text: str | None = None):
    """A byte-level BPE tokenizer (every UTF-8 text encodes; characters split across tokens), BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text or stdlib_text(300_000)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_llm_folder(out: Path, architecture: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vocab_size: int = 512, context: int = 512,
                    seed: int = 0, tokenizer=None, spread: float = 0.3, model_vocab: int | None = None) -> Path:
    """A ``LlamaForCausalLM`` (or ``mistral``, ``qwen2``) folder with a tokenizer; ``spread`` is the weights' std
    (larger than a real initialisation so that greedy decoding has clear winners, not float-rounding ties);
    ``model_vocab`` gives the model a larger vocabulary than the tokenizer's (a benchmark's shape)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = tokenizer or make_tokenizer(vocab_size)
    common = dict(vocab_size=max(model_vocab or 0, len(tokenizer)), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=context, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  initializer_range=spread, tie_word_embeddings=False)
    config, model_class = {
        "llama": (lambda: transformers.LlamaConfig(**common), "LlamaForCausalLM"),
        "mistral": (lambda: transformers.MistralConfig(**common, sliding_window=None), "MistralForCausalLM"),
        "qwen2": (lambda: transformers.Qwen2Config(**common), "Qwen2ForCausalLM"),
    }[architecture]
    model = getattr(transformers, model_class)(config()).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
