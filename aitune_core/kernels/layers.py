"""Linear layers that hold int8 or int4 weights and multiply through the weight-only ops, and the swap that
puts them in a module in place of its ``nn.Linear`` layers.

Their state is plain tensors (int8 / uint8 weights, fp32 scales): a checkpoint of them loads with
``torch.load(weights_only=True)`` and needs no torchao.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from aitune_core.kernels import ops
from aitune_core.kernels.quantize import pack_int4, quantize_int8

logger = logging.getLogger(__name__)
FORMATS = ("int8", "int4")


class _WeightOnlyLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self._mm(rows.float()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightOnlyLinear):
    """``y = x W.T + b`` with ``W = weight (int8) * scale`` per output feature.

    ``use_amx_layout()`` reorders ``weight`` in place into the layout AMX takes (``ops.pack_int8_amx``), where
    this CPU runs AMX tiles: its products then read each 16 x 64 weight tile as one contiguous 1 KB. Its
    state_dict keeps the row layout either way, so a checkpoint does not depend on the CPU that wrote it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.amx_layout = False
        self._register_state_dict_hook(_rows_in_state_dict)
        self._register_load_state_dict_pre_hook(_amx_layout_on_load, with_module=True)

    def use_amx_layout(self) -> bool:
        """Reorder the weights for AMX where this CPU runs its tiles and the shape is whole tiles; whether it did."""
        if not self.amx_layout and self.weight.device.type == "cpu" and ops.amx_layout_fits(*self.weight.shape):
            self.weight = ops.pack_int8_amx(self.weight)
            self.amx_layout = True
        return self.amx_layout

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight, layer.scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_layout:
            return ops.int8_amx_mm(x, self.weight, self.scale)
        return ops.int8_weight_only_mm(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, amx_layout={self.amx_layout}"


def _rows_in_state_dict(layer: Int8Linear, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if layer.amx_layout and state.get(prefix + "weight") is not None:
        state[prefix + "weight"] = ops.unpack_int8_amx(state[prefix + "weight"])


def _amx_layout_on_load(layer: Int8Linear, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if layer.amx_layout and state.get(prefix + "weight") is not None:
        state[prefix + "weight"] = ops.pack_int8_amx(state[prefix + "weight"])


class Int4Linear(_WeightOnlyLinear):
    """``y = x W.T + b`` with ``W`` in int4 groups of ``group_size`` inputs (``quantize.pack_int4``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("offset", torch.zeros(out_features, groups))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int = 128) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        layer.packed, layer.scale, layer.offset = pack_int4(linear.weight, group_size)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_weight_only_mm(x, self.packed, self.scale, self.offset, self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def swap_linears(module: torch.nn.Module, weight_format: str, group_size: int = 128,
                 skip: set[str] | frozenset[str] = frozenset(), quantize: bool = True) -> list[str]:
    """Replace ``module``'s ``nn.Linear`` layers (but ``skip``) by Int8Linear / Int4Linear, in place; the names
    of those replaced. ``quantize=False`` puts empty layers of the right shape (a checkpoint's weights come next).
    An int4 layer whose in_features are no whole groups stays in float, logged."""
    if weight_format not in FORMATS:
        raise ValueError(f"Unknown weight format {weight_format!r}: expected one of {', '.join(FORMATS)}")
    swapped = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, torch.nn.Linear) or name in skip:
            continue
        if weight_format == "int4" and child.in_features % group_size:
            logger.warning("%s stays in float: int4 needs in_features divisible by the group size %d, it has %d",
                           name, group_size, child.in_features)
            continue
        shape = (child.in_features, child.out_features, child.bias is not None)
        if weight_format == "int8":
            layer = Int8Linear.from_linear(child) if quantize else Int8Linear(*shape)
        else:
            layer = Int4Linear.from_linear(child, group_size) if quantize else Int4Linear(*shape, group_size)
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attribute, layer)
        swapped.append(name)
    return swapped
