"""The weight formats the CPU kernels read: int8 per output feature, int4 in groups of input features."""

from __future__ import annotations

import torch

INT4_BLOCK = 32  # inputs per 16 packed bytes: the kernel's unit
INT4_GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output feature: ``(q int8 [N, K], scale fp32 [N])`` with ``weight ~ q * scale``; torchao's
    int8wo convention (``scale = max|w| / 127.5``, q in -128..127), so the same weights as its int8wo archives."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).tiny)
    q = (weight * (1.0 / scale[:, None])).round().clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group_size`` inputs: ``(packed uint8 [N, K/2], scale [N, K/G], offset [N, K/G])``
    with ``weight ~ q * scale + offset``, q in 0..15; each 32 inputs are 16 bytes, input j in byte j's low nibble
    and input j + 16 in its high nibble (so the kernel reads activations in order)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    rows, columns = weight.shape
    if columns % group_size:
        raise ValueError(f"int4 needs in_features divisible by the group size {group_size}, got {columns}")
    groups = weight.detach().float().view(rows, columns // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    q = q.view(rows, columns // INT4_BLOCK, 2, INT4_BLOCK // 2)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(rows, columns // 2)
    return packed.contiguous(), scale.contiguous(), low.contiguous()
