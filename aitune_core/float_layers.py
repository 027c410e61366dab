"""Which layers to keep in float so that a quantization passes the accuracy gate.

Quantizing a whole model costs accuracy unevenly: in a BERT a few layers (attention values, the first
feed-forward projection of late blocks) cost more than all the rest together. Each layer's cost is
measured alone (that layer quantized, every other in float, 1 - cosine to the original's outputs on the
samples); the costliest are kept in float until the rest, added up, fit the gate with a margin; then the
combination is measured, and one more layer (then two, four...) kept in float while it misses. Never more
than half the layers: past that the quantization would not be worth its name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from aitune_core.accuracy import compare_outputs
from aitune_core.backend import Backend
from aitune_core.graph_spec import GraphSpec, Sample

logger = logging.getLogger(__name__)

# The measured costs, summed, must fit this share of the gate's room (costs do not add up exactly).
MARGIN = 0.8


@dataclasses.dataclass
class FloatLayers:
    """The layers kept in float, the cosine with them so, and every layer's measured cost."""

    names: list[str]
    cosine: float
    costs: dict[str, float]


def linear_layers(module: torch.nn.Module) -> list[str]:
    """Names (as ``named_modules`` gives them) of the nn.Linear layers torchao would quantize."""
    return [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]


def float_layers_for_gate(make: Callable[[list[str]], Backend], module: torch.nn.Module, graph_spec: GraphSpec,
                          samples: list[Sample], reference: list[Any], device: torch.device, gate: float,
                          progress: Callable[[str], None] = logger.info) -> FloatLayers | None:
    """The fewest layers to keep in float for the backend ``make(skip_modules)`` to meet ``gate``; None when
    keeping half of them is not enough (or the model has fewer than two)."""
    names = linear_layers(module)
    if len(names) < 2:
        return None

    def cosine(skip: list[str]) -> float:
        backend = make(skip).build(module, graph_spec, samples, device)
        return compare_outputs(reference, [sample.run(backend.infer) for sample in samples]).cosine

    progress(f"  measuring what quantizing each of {len(names)} layers alone costs")
    costs = {name: 1 - cosine([other for other in names if other != name]) for name in names}
    order = sorted(names, key=costs.get, reverse=True)
    limit = len(names) // 2
    kept, remaining = [], sum(costs.values())
    while remaining > (1 - gate) * MARGIN and len(kept) < limit:
        remaining -= costs[order[len(kept)]]
        kept.append(order[len(kept)])
    step = 1
    while True:
        reached = cosine(kept)
        progress(f"  {len(kept)} of {len(names)} layers kept in float: cosine {reached:.6f} (gate {gate})")
        if reached >= gate:
            return FloatLayers(names=kept, cosine=reached, costs=costs)
        if len(kept) >= limit:
            return None
        kept = order[:min(limit, len(kept) + step)]
        step *= 2
