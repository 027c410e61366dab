"""The CPU kernels as torch custom ops: the weight-only products (``aitune::int8_weight_only_mm``,
``aitune::int8_amx_mm`` for int8 weights in the AMX layout, ``aitune::int4_weight_only_mm``) and attention over a
static KV cache (``aitune::cached_attention``).

Custom ops with fake implementations, so that ``torch.compile`` and AOTInductor keep them as one call in the
graph (an AOTInductor package calls them by name: importing this module registers them in a worker). Up to
``kernel_max_rows()`` rows (decode steps, one-text requests, prompt chunks) run the CPU kernels of ``build.py``:
measured, they beat dequantizing the weights and multiplying in fp32 up to 512 rows on AMX (4096 x 4096 at 128
rows: 4.9 against 45 ms; at 512: 32 against 79) and up to 128 rows with the AVX-512 tiles (16 rows: 2.1 against
42 ms; 128: 15 against 55). More rows, another device, or a CPU where the kernels could not be built, run that
dequantize-then-matmul in torch. ``cached_attention`` runs its CPU kernel for fp32 at any rows; the rest (or no
kernels) gathers each row's window out of the cache and multiplies in torch (``gathered_attention``).
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


def pack_int8_amx(weight: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` (N a multiple of 16, K of 64) in the order AMX takes its second operand: for each 16 outputs
    and 64 inputs, 16 quads of 4 inputs, each quad's 16 outputs side by side (one contiguous 1 KB tile). Same
    shape and bytes, another order."""
    rows, columns = weight.shape
    return (weight.reshape(rows // 16, 16, columns // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous()
            .view(rows, columns))


def unpack_int8_amx(packed: torch.Tensor) -> torch.Tensor:
    """The row layout ``[N, K]`` of ``pack_int8_amx``'s result."""
    rows, columns = packed.shape
    return packed.view(rows // 16, columns // 64, 16, 16, 4).permute(0, 3, 1, 2, 4).reshape(rows, columns)


def amx_layout_fits(out_features: int, in_features: int) -> bool:
    """Whether a layer's int8 weights can take the AMX layout here: the kernels run AMX tiles on this CPU (built
    with AMX and granted by the OS) and the shape is whole tiles."""
    native = build.native()
    return (out_features % 16 == 0 and in_features % 64 == 0 and native is not None
            and native.tiles().startswith("AMX"))


def gathered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """``q [B, L, H, D]`` attends to the cache positions ``mask [B, L, span]`` allows in its row's slot of the caches
    ``[S, KV, C, D]`` (query heads ``h*G .. h*G+G-1`` share kv head ``h``) -> ``[B, L, H, D]``.

    Each row's window is gathered out of the cache (a copy of ``span`` positions), and the query heads that share a
    kv head go together as rows of one bmm, so the cache is never repeated per head. Traceable: a compiled decoder
    runs it where the kernel does not."""
    batch, length, heads, head_dim = q.shape
    kv_heads, span = k_cache.shape[1], mask.shape[-1]
    group = heads // kv_heads
    keys = k_cache[:, :, :span][slots].view(-1, span, head_dim).to(q.dtype)
    values = v_cache[:, :, :span][slots].view(-1, span, head_dim).to(q.dtype)
    q = q.view(batch, length, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(-1, group * length, head_dim)
    scores = torch.bmm(q, keys.transpose(1, 2)) * head_dim ** -0.5  # [batch * kv, group * length, span]
    scores = scores.view(batch, kv_heads, group, length, span).masked_fill(~mask.view(batch, 1, 1, length, span),
                                                                           float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1).view(-1, group * length, span), values)
    return out.view(batch, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4).reshape(batch, length, heads,
                                                                                             head_dim)


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


# The ops' schemas, their torch implementation for any device (and for CPU until the kernels are registered: a
# weight-only backend's deploy, or else the first call of an op, kernel_max_rows) and their fake implementations
# for torch.compile and AOTInductor.
_LIBRARY = torch.library.Library("aitune", "DEF")
_LIBRARY.define("int8_weight_only_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_LIBRARY.define("int4_weight_only_mm(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group_size) -> Tensor")
_LIBRARY.define("int8_amx_mm(Tensor x, Tensor packed, Tensor scale) -> Tensor")
_LIBRARY.define("cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions) -> Tensor")


def _int8_in_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _native_rows(x):
        return build.native().int8_weight_only_mm(x, weight, scale)
    return x @ dequantize_int8(weight, scale).to(x.dtype).T


def _int8_amx_in_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _native_rows(x) and amx_layout_fits(*packed.shape):
        return build.native().int8_amx_packed_mm(x, packed, scale)
    return x @ dequantize_int8(unpack_int8_amx(packed), scale).to(x.dtype).T


def _int4_in_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    if _native_rows(x):
        return build.native().int4_weight_only_mm(x, packed, scale, offset, group_size)
    return x @ dequantize_int4(packed, scale, offset, group_size).to(x.dtype).T


def _attention_in_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    if q.device.type == "cpu" and kernel_max_rows() > 0:
        return build.native().cached_attention(q, k_cache, v_cache, slots, positions)
    span = int(positions.max()) + 1 if positions.numel() else 1
    mask = torch.arange(span, device=q.device) <= positions.unsqueeze(-1)
    return gathered_attention(q, k_cache, v_cache, slots, mask)


_LIBRARY.impl("int8_weight_only_mm", _int8_in_torch, "CompositeExplicitAutograd")
_LIBRARY.impl("int8_amx_mm", _int8_amx_in_torch, "CompositeExplicitAutograd")
_LIBRARY.impl("int4_weight_only_mm", _int4_in_torch, "CompositeExplicitAutograd")
_LIBRARY.impl("cached_attention", _attention_in_torch, "CompositeExplicitAutograd")


# Backward (the ops are for inference; this keeps a gradient through them right rather than silently absent):
# y = x W.T, so dx = dy W.
def _int8_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    weight, scale = ctx.saved_tensors
    return grad @ dequantize_int8(weight, scale).to(grad.dtype), None, None


def _int8_amx_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    packed, scale = ctx.saved_tensors
    return grad @ dequantize_int8(unpack_int8_amx(packed), scale).to(grad.dtype), None, None


def _int4_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    packed, scale, offset = ctx.saved_tensors
    return grad @ dequantize_int4(packed, scale, offset, ctx.group_size).to(grad.dtype), None, None, None, None


def _int8_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _int4_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])
    ctx.group_size = inputs[4]


torch.library.register_autograd("aitune::int8_weight_only_mm", _int8_backward, setup_context=_int8_save)
torch.library.register_autograd("aitune::int8_amx_mm", _int8_amx_backward, setup_context=_int8_save)
torch.library.register_autograd("aitune::int4_weight_only_mm", _int4_backward, setup_context=_int4_save)


@torch.library.register_fake("aitune::int8_weight_only_mm")
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("aitune::int8_amx_mm")
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.register_fake("aitune::int4_weight_only_mm")
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.register_fake("aitune::cached_attention")
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
      positions: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def int8_weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (weight int8 [N, K] * scale [N]).T`` -> ``[M, N]`` in x's dtype."""
    return torch.ops.aitune.int8_weight_only_mm(x, weight, scale)


def int8_amx_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``int8_weight_only_mm`` of weights in the AMX layout (``pack_int8_amx``) -> ``[M, N]`` in x's dtype."""
    return torch.ops.aitune.int8_amx_mm(x, packed, scale)


def int4_weight_only_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` for the int4 ``W [N, K]`` that ``packed``, ``scale`` and ``offset`` hold -> ``[M, N]``."""
    return torch.ops.aitune.int4_weight_only_mm(x, packed, scale, offset, group_size)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """``q [B, L, H, D]`` attends, in slot ``slots[b]`` of the caches ``[S, KV, C, D]``, to the positions up to
    ``positions[b, t]`` (query heads ``h*G .. h*G+G-1`` share kv head ``h``) -> ``[B, L, H, D]``. The CPU kernel
    reads each row's keys and values where they lie, as far as its own position."""
    return torch.ops.aitune.cached_attention(q, k_cache, v_cache, slots, positions)
