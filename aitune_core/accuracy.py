"""How close a built backend's outputs are to the original module's."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from aitune_core.graph_spec import flatten_tensors

# Lowest cosine similarity to the fp32 outputs that an archive may have, per quantization.
DEFAULT_MIN_COSINE = {"eager": 0.9999, "int8wo": 0.999, "int4wo": 0.99, "int8dq": 0.99, "fp8wo": 0.999,
                      "fp8dq": 0.99}
CUSTOM_CONFIG_MIN_COSINE = 0.99


def min_cosine_for(quantization: str | None, override: float | None = None) -> float:
    """The accuracy gate: ``override`` (``--min-cosine``) or the default for the quantization."""
    if override is not None:
        return override
    return DEFAULT_MIN_COSINE.get(quantization or "eager", CUSTOM_CONFIG_MIN_COSINE)


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Cosine similarity and max abs error of all output values, flattened together."""

    cosine: float
    max_abs_error: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def compare_outputs(reference: Any, candidate: Any) -> Accuracy:
    """Compare two outputs of the same structure; ValueError when their tensors don't line up."""
    ref_tensors, cand_tensors = flatten_tensors(reference), flatten_tensors(candidate)
    if len(ref_tensors) != len(cand_tensors):
        raise ValueError(f"The outputs differ in structure: {len(ref_tensors)} tensors vs {len(cand_tensors)}")
    if not ref_tensors:
        raise ValueError("The model returned no tensor to compare")
    for ref, cand in zip(ref_tensors, cand_tensors):
        if ref.shape != cand.shape:
            raise ValueError(f"The outputs differ in shape: {list(ref.shape)} vs {list(cand.shape)}")
    ref = torch.cat([t.detach().cpu().double().flatten() for t in ref_tensors])
    cand = torch.cat([t.detach().cpu().double().flatten() for t in cand_tensors])
    if not bool(torch.isfinite(cand).all()):
        return Accuracy(cosine=float("nan"), max_abs_error=float("inf"))
    max_abs_error = float((ref - cand).abs().max()) if ref.numel() else 0.0
    if torch.equal(ref, cand):
        return Accuracy(cosine=1.0, max_abs_error=0.0)
    cosine = float(torch.nn.functional.cosine_similarity(ref, cand, dim=0, eps=1e-12))
    return Accuracy(cosine=cosine, max_abs_error=max_abs_error)
