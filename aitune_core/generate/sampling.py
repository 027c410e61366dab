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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A generator of its own for a seeded request (repeatable whatever else runs), None otherwise."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The greedy token of each row of ``logits`` ``[rows, vocabulary]`` (the first of equal maxima, a NaN's if
    a row has one, as ``torch.argmax``): numpy's argmax takes ~20 us for 8 rows of 32000 where torch's takes ~50
    a row (2 cores), and a batch of 8 streams picks its tokens every ~15 ms step."""
    if logits.device.type != "cpu":  # the argmax where the logits are: only the ids cross
        return logits.argmax(-1).tolist()
    exact = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # numpy has no bf16
    return exact.detach().numpy().argmax(-1).tolist()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` ``[vocabulary]``."""
    if params.greedy:
        return greedy_tokens(logits.view(1, -1))[0]
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
