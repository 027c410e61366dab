"""The weight-only products as torch custom ops (``aitune::int8_weight_only_mm``, ``aitune::int4_weight_only_mm``).

Custom ops with fake implementations, so that ``torch.compile`` and AOTInductor keep them as one call in the
graph (an AOTInductor package calls them by name: importing this module registers them in a worker). Up to
``kernel_max_rows()`` rows (decode steps, one-text requests, prompt chunks) run the CPU kernels of ``build.py``:
measured, they beat dequantizing the weights and multiplying in fp32 up to 512 rows on AMX (4096 x 4096 at 128
rows: 4.9 against 45 ms; at 512: 32 against 79) and up to 128 rows with the AVX-512 tiles (16 rows: 2.1 against
42 ms; 128: 15 against 55). More rows, another device, or a CPU where the kernels could not be built, run that
dequantize-then-matmul in torch.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from aitune_core.kernels import build

logger = logging.getLogger(__name__)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float weights an int8 layer stands for: ``weight * scale`` per output feature."""
    return weight.to(scale.dtype) * scale[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float weights an int4 layer stands for (layout: ``aitune_core.kernels.quantize.pack_int4``)."""
    rows = packed.shape[0]
    blocks = packed.view(rows, -1, 16)
    q = torch.stack([blocks & 15, blocks >> 4], dim=2).view(rows, -1, group_size)
    return (q.to(scale.dtype) * scale[..., None] + offset[..., None]).view(rows, -1)


@functools.cache
def kernel_max_rows() -> int:
    """The most rows the CPU kernels take (512 on AMX, 128 with the AVX-512 tiles); 0 where they could not be built.
    The first call also registers the kernels as the ops' CPU implementation (C++: no Python between a compiled
    graph and the kernels)."""
    native = build.native()
    if native is None:
        return 0
    try:
        native.register_cpu_kernels()
    except RuntimeError as error:  # a torch that refuses the registration: the torch implementation still answers
        logger.warning("The CPU kernels could not be registered as the ops' CPU implementation (%s)", error)
    return native.max_rows()


def _native_rows(x: torch.Tensor) -> bool:
    limit = kernel_max_rows()
    return limit > 0 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= limit


# The ops' schemas, their torch implementation for any device (and for CPU until the kernels are registered, on
# the first product: kernel_max_rows) and their fake implementations for torch.compile and AOTInductor.
_LIBRARY = torch.library.Library("aitune", "DEF")
_LIBRARY.define("int8_weight_only_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_LIBRARY.define("int4_weight_only_mm(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group_size) -> Tensor")


def _int8_in_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _native_rows(x):
        return build.native().int8_weight_only_mm(x, weight, scale)
    return x @ dequantize_int8(weight, scale).to(x.dtype).T


def _int4_in_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    if _native_rows(x):
        return build.native().int4_weight_only_mm(x, packed, scale, offset, group_size)
    return x @ dequantize_int4(packed, scale, offset, group_size).to(x.dtype).T


_LIBRARY.impl("int8_weight_only_mm", _int8_in_torch, "CompositeExplicitAutograd")
_LIBRARY.impl("int4_weight_only_mm", _int4_in_torch, "CompositeExplicitAutograd")


# Backward (the ops are for inference; this keeps a gradient through them right rather than silently absent):
# y = x W.T, so dx = dy W.
def _int8_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    weight, scale = ctx.saved_tensors
    return grad @ dequantize_int8(weight, scale).to(grad.dtype), None, None


def _int4_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    packed, scale, offset = ctx.saved_tensors
    return grad @ dequantize_int4(packed, scale, offset, ctx.group_size).to(grad.dtype), None, None, None, None


def _int8_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _int4_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])
    ctx.group_size = inputs[4]


torch.library.register_autograd("aitune::int8_weight_only_mm", _int8_backward, setup_context=_int8_save)
torch.library.register_autograd("aitune::int4_weight_only_mm", _int4_backward, setup_context=_int4_save)


@torch.library.register_fake("aitune::int8_weight_only_mm")
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("aitune::int4_weight_only_mm")
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


def int8_weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (weight int8 [N, K] * scale [N]).T`` -> ``[M, N]`` in x's dtype."""
    return torch.ops.aitune.int8_weight_only_mm(x, weight, scale)


def int4_weight_only_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` for the int4 ``W [N, K]`` that ``packed``, ``scale`` and ``offset`` hold -> ``[M, N]``."""
    return torch.ops.aitune.int4_weight_only_mm(x, packed, scale, offset, group_size)
