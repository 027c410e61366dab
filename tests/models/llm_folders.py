"""Small causal language model folders made the way a user's are: a byte-level BPE tokenizer trained on Python's
own standard library sources (examples/llm/corpus.py), a Llama-family config, random weights, ``save_pretrained``.
Loaded back by aitune-archive through the path a user's folder takes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "llm"))
from corpus import make_tokenizer  # noqa: E402 (the tests' tokenizer is the example's)


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


def greedy(reference, prompt: str | None, max_new_tokens: int, ids: list[int] | None = None):
    """transformers' ``generate(do_sample=False)`` of ``reference`` (model, tokenizer) on ``prompt`` (or its token
    ``ids``): (prompt tokens, new token ids, their text)."""
    model, tokenizer = reference
    ids = torch.tensor([ids]) if ids is not None else tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
    return ids.shape[1], out, tokenizer.decode(out, skip_special_tokens=True)
