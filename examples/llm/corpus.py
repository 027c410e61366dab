"""Text every machine has, and a tokenizer trained on it: Python's own standard library sources.

Shared by the example model (train.py) and the tests' small causal-LM folders.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

SPECIAL = ["<s>", "</s>", "<pad>"]


def stdlib_text(limit: int = 2_000_000) -> str:
    """The standard library's Python sources, in a fixed order, up to ``limit`` characters."""
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
