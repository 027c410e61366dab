"""The accuracy gate for generation: teacher-forced next-token agreement and KL divergence against fp32.

On held prompts the fp32 decoder writes its own greedy continuation; then prompt and continuation go
through both models in one pass (teacher forcing: each position sees the same fp32 text), and at each
continuation position the candidate's next-token distribution is compared with fp32's: top-1 agreement
(the same most likely token) and the mean KL divergence KL(fp32 || candidate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from aitune_core.generate.engine import Engine, Infer, prefill
from aitune_core.generate.request import GenerateOptions, GenerateRequest
from aitune_core.generate.sampling import SamplingParams

HELD_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the capital of France?\nA:",
    "import os\nimport sys\n\n",
    "1, 2, 3, 4, 5,",
    "La vie est",
    "The three most important things about quantization are",
]
CONTINUATION = 32
# Defaults: see docs/generate.md for what int8wo and int4wo measure against them.
MIN_TOP1 = 0.90
MAX_KL = 0.10


@dataclasses.dataclass
class GenerationGate:
    top1: float
    kl: float
    min_top1: float = MIN_TOP1
    max_kl: float = MAX_KL

    @property
    def passed(self) -> bool:
        return self.top1 >= self.min_top1 and self.kl <= self.max_kl

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1:.4f} (gate >= {self.min_top1}), mean KL {self.kl:.5f} "
                f"(gate <= {self.max_kl})")


def continuations(reference: Infer, tokenizer: Any, options: GenerateOptions,
                  prompts: list[str] = HELD_PROMPTS) -> list[list[int]]:
    """Each held prompt's ids followed by the fp32 model's greedy continuation."""
    engine = Engine(reference, tokenizer, options)
    sequences = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"][: options.max_context // 2]
        room = min(CONTINUATION, options.max_context - len(ids))
        generation = engine.generate(GenerateRequest(ids, room, SamplingParams(), [], False))
        sequences.append((ids, generation.tokens))
    return sequences


def measure(reference: Infer, candidate: Infer, sequences: list[tuple[list[int], list[int]]],
            options: GenerateOptions, min_top1: float = MIN_TOP1, max_kl: float = MAX_KL) -> GenerationGate:
    """Teacher-forced top-1 agreement and mean KL of ``candidate`` against ``reference`` on ``sequences``."""
    agree, kl, count = 0, 0.0, 0
    with torch.no_grad():  # see Engine.generate: ordinary tensors in, as the backends' warm-up saw them
        for prompt, continuation in sequences:
            if not continuation:
                continue
            ids = prompt + continuation[:-1]
            start = len(prompt) - 1  # the logits at this position predict the continuation's first token
            fp32 = prefill(reference, ids, 0, options, every_position=True)[start:]
            other = prefill(candidate, ids, 0, options, every_position=True)[start:]
            agree += int((fp32.argmax(-1) == other.argmax(-1)).sum())
            p = torch.log_softmax(fp32.double(), -1)
            q = torch.log_softmax(other.double(), -1)
            kl += float((p.exp() * (p - q)).sum())
            count += fp32.shape[0]
    return GenerationGate(top1=agree / max(count, 1), kl=kl / max(count, 1), min_top1=min_top1, max_kl=max_kl)
