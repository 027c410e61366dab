"""The next token from a row of logits: greedy at temperature 0, else temperature, top-k, top-p, seeded."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SamplingParams:
    """How a request picks its tokens (checked by ``request.parse``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        """A generator of its own for a seeded request (repeatable whatever else runs), None otherwise."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` ``[vocabulary]``."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probabilities, order = torch.sort(probabilities, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        outside = sorted_probabilities.cumsum(0) - sorted_probabilities >= params.top_p
        sorted_probabilities[outside] = 0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
    return int(torch.multinomial(probabilities, 1, generator=generator))
