"""Precision: run a module's floating-point math in bf16 or fp16 inside, keep the recorded dtypes outside.

Requests and answers keep the dtypes the GraphSpec recorded: float inputs are cast in, float outputs
cast back, inside the module (so torch.compile and AOTInductor fuse the casts with their neighbours).
Casting the weights (``module.to(bf16)``) measured faster than autocast, which keeps fp32 weights and
casts them at every matmul (docs/tuning.md).
"""

from __future__ import annotations

from typing import Any

import torch

from aitune_core.devices import cuda_capability
from aitune_core.graph_spec import map_tensors

PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What runs a precision natively; anywhere else it is emulated, and slower than fp32.
CPU_FEATURES_FOR = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
CUDA_CAPABILITY_FOR = {"bf16": (8, 0), "fp16": (7, 0)}


def check_precision(precision: str | None) -> None:
    """ValueError unless ``precision`` is None (the module's own dtypes) or a name in PRECISIONS."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)} "
                         "(or none, for the model's own dtypes)")


def cpu_features() -> dict[str, Any]:
    """The CPU's instruction-set features as torch reads them (cpuinfo), e.g. ``{"amx_bf16": True, ...}``."""
    return dict(torch.cpu.get_capabilities())


def missing_support(precision: str | None, device: torch.device,
                    features: dict[str, Any] | None = None) -> str | None:
    """None when ``device`` runs ``precision`` natively, else what it would need.

    ``features`` stands in for this CPU's :func:`cpu_features` (tests simulate other CPUs with it).
    """
    if precision is None:
        return None
    if device.type == "cuda":
        need = CUDA_CAPABILITY_FOR[precision]
        capability = cuda_capability(device)
        if capability is not None and tuple(capability) >= need:
            return None
        return f"a CUDA GPU with compute capability >= {need[0]}.{need[1]}"
    wanted = CPU_FEATURES_FOR[precision]
    features = cpu_features() if features is None else features
    if any(features.get(name) for name in wanted):
        return None
    return f"a CPU with {' or '.join(wanted)}"


def restore_dtypes(value: Any, node: dict[str, Any]) -> Any:
    """``value`` with each floating tensor cast to the dtype its GraphSpec node recorded."""
    kind = node.get("kind")
    if isinstance(value, torch.Tensor):
        if kind == "tensor" and value.is_floating_point():
            return value.to(getattr(torch, node["dtype"]))
        return value
    if isinstance(value, (tuple, list)) and kind in ("tuple", "list") and len(value) == len(node["items"]):
        return type(value)(restore_dtypes(item, sub) for item, sub in zip(value, node["items"]))
    if isinstance(value, dict) and kind == "dict":
        return {key: restore_dtypes(item, node["items"].get(str(key), {})) for key, item in value.items()}
    return value


class PrecisionModule(torch.nn.Module):
    """``module`` with its floating-point weights in ``dtype``: float inputs are cast to ``dtype``, float
    outputs back to the dtypes of ``output_spec`` (the GraphSpec's outputs node)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, output_spec: dict[str, Any]) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype
        self.output_spec = output_spec

    def _cast_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.module(*map_tensors(args, self._cast_in), **map_tensors(kwargs, self._cast_in))
        return restore_dtypes(output, self.output_spec)


def with_precision(module: torch.nn.Module, precision: str | None, output_spec: dict[str, Any]) -> torch.nn.Module:
    """``module`` itself for None, else wrapped in a :class:`PrecisionModule` (weights cast in place)."""
    if precision is None:
        return module
    return PrecisionModule(module, PRECISIONS[precision], output_spec)
