"""Sample and GraphSpec: what a model's inputs and outputs look like, recorded from samples.

A GraphSpec is plain JSON. Each value is described by a node:
``{"kind": "tensor", "dtype": "float32", "shapes": [[4, 16], ...], "dynamic_dims": [0]}``,
``{"kind": "tuple" | "list", "items": [node, ...]}``, ``{"kind": "dict", "items": {name: node}}``
or ``{"kind": "value", "type": "int" | "float" | "bool" | "str" | "none"}``.
Dim 0 of every tensor is the batch dim and always dynamic; another dim is dynamic when the
samples disagree on its size.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

BATCH_DIM = 0
_VALUE_TYPES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none"}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One call of a model: positional ``args`` and keyword ``kwargs``."""

    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> "Sample":
        """A Sample from a Sample, a tensor, a tuple/list of inputs or a pair (args, kwargs)."""
        if isinstance(value, Sample):
            return value
        if isinstance(value, torch.Tensor):
            return cls(args=(value,))
        if (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and isinstance(value[0], (tuple, list))
            and isinstance(value[1], dict)
        ):
            return cls(args=tuple(value[0]), kwargs=dict(value[1]))
        if isinstance(value, (tuple, list)):
            return cls(args=tuple(value))
        if isinstance(value, dict):
            return cls(kwargs=dict(value))
        raise TypeError(
            "A sample must be a tensor, a tuple/list of inputs or a pair (args tuple, kwargs dict), "
            f"got {type(value).__name__}"
        )

    def to_state(self) -> dict[str, Any]:
        """The sample as a dict that ``torch.load(weights_only=True)`` reads back."""
        return {"args": list(self.args), "kwargs": dict(self.kwargs)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Sample":
        """Inverse of ``to_state``."""
        return cls(args=tuple(state["args"]), kwargs=dict(state["kwargs"]))

    def run(self, module: Any) -> Any:
        """Call ``module`` on this sample."""
        return module(*self.args, **self.kwargs)

    def rows(self) -> int:
        """The largest size along the batch dim of its tensors (1 when none has a batch dim)."""
        return max([t.shape[BATCH_DIM] for t in flatten_tensors((self.args, self.kwargs)) if t.dim()], default=1)

    def with_rows(self, rows: int) -> "Sample":
        """This sample with ``rows`` rows in dim 0 of every tensor (its rows repeated or cut)."""
        def resize(tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.dim() or tensor.shape[BATCH_DIM] == 0:
                return tensor
            repeats = -(-rows // tensor.shape[BATCH_DIM])
            return tensor.repeat(repeats, *[1] * (tensor.dim() - 1))[:rows]
        return Sample(args=map_tensors(self.args, resize), kwargs=map_tensors(self.kwargs, resize))


def map_tensors(value: Any, fn) -> Any:
    """``value`` with ``fn`` applied to every tensor inside tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    if isinstance(value, list):
        return [map_tensors(item, fn) for item in value]
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value``, in a fixed order (dicts by insertion order)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in flatten_tensors(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in flatten_tensors(item)]
    return []


def describe_value(value: Any) -> dict[str, Any]:
    """The spec node of one value (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        return {
            "kind": "tensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "shapes": [shape],
            "dynamic_dims": [BATCH_DIM] if shape else [],
        }
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {"kind": kind, "items": [describe_value(item) for item in value]}
    if isinstance(value, dict):
        return {"kind": "dict", "items": {str(key): describe_value(item) for key, item in value.items()}}
    if type(value) in _VALUE_TYPES:
        return {"kind": "value", "type": _VALUE_TYPES[type(value)]}
    raise TypeError(
        f"Cannot describe a {type(value).__name__}: inputs and outputs must be tensors, "
        "numbers, strings, None, or tuples/lists/dicts of them"
    )


def merge_nodes(first: dict[str, Any], second: dict[str, Any], where: str = "value") -> dict[str, Any]:
    """One node that covers both ``first`` and ``second``; ValueError when they disagree."""
    if first["kind"] != second["kind"]:
        raise ValueError(f"{where}: samples disagree, one is a {first['kind']}, another a {second['kind']}")
    kind = first["kind"]
    if kind == "tensor":
        if first["dtype"] != second["dtype"] or len(first["shapes"][0]) != len(second["shapes"][0]):
            raise ValueError(
                f"{where}: samples disagree on dtype or rank "
                f"({first['dtype']} rank {len(first['shapes'][0])} vs "
                f"{second['dtype']} rank {len(second['shapes'][0])})"
            )
        shapes = first["shapes"] + [s for s in second["shapes"] if s not in first["shapes"]]
        rank = len(shapes[0])
        dynamic = {dim for dim in range(rank) if len({shape[dim] for shape in shapes}) > 1}
        dynamic |= set(first["dynamic_dims"]) | set(second["dynamic_dims"])
        return {"kind": "tensor", "dtype": first["dtype"], "shapes": shapes, "dynamic_dims": sorted(dynamic)}
    if kind in ("tuple", "list"):
        if len(first["items"]) != len(second["items"]):
            raise ValueError(f"{where}: samples disagree on length")
        return {"kind": kind, "items": [merge_nodes(a, b, f"{where}[{i}]")
                                        for i, (a, b) in enumerate(zip(first["items"], second["items"]))]}
    if kind == "dict":
        if first["items"].keys() != second["items"].keys():
            raise ValueError(f"{where}: samples disagree on keys")
        return {"kind": "dict", "items": {k: merge_nodes(first["items"][k], second["items"][k], f"{where}[{k!r}]")
                                          for k in first["items"]}}
    return first if first == second else {"kind": "value", "type": "any"}


@dataclasses.dataclass
class GraphSpec:
    """The inputs (positional and keyword) and outputs of a module, and its forward signature."""

    args: list[dict[str, Any]]
    kwargs: dict[str, dict[str, Any]]
    outputs: dict[str, Any]
    signature: list[str]

    @classmethod
    def from_samples(cls, module: torch.nn.Module, samples: list[Any]) -> "GraphSpec":
        """Run ``module`` once on each sample (no grad) and record inputs and outputs."""
        return cls.record(module, samples)[0]

    @classmethod
    def record(cls, module: torch.nn.Module, samples: list[Any]) -> tuple["GraphSpec", list[Any]]:
        """``from_samples`` that also returns the outputs, for callers that need them too."""
        if not samples:
            raise ValueError("GraphSpec.from_samples needs at least one sample, got none")
        spec, outputs = None, []
        with torch.inference_mode():
            for sample in samples:
                sample = Sample.of(sample)
                outputs.append(sample.run(module))
                current = cls(
                    args=[describe_value(arg) for arg in sample.args],
                    kwargs={name: describe_value(value) for name, value in sample.kwargs.items()},
                    outputs=describe_value(outputs[-1]),
                    signature=forward_signature(module),
                )
                spec = current if spec is None else spec.merge(current)
        return spec, outputs

    def merge(self, other: "GraphSpec") -> "GraphSpec":
        """A spec that covers both; ValueError when the two disagree on structure."""
        if len(self.args) != len(other.args) or self.kwargs.keys() != other.kwargs.keys():
            raise ValueError("Samples disagree on the number of positional inputs or on keyword names")
        return GraphSpec(
            args=[merge_nodes(a, b, f"input {i}") for i, (a, b) in enumerate(zip(self.args, other.args))],
            kwargs={k: merge_nodes(self.kwargs[k], other.kwargs[k], f"input {k!r}") for k in self.kwargs},
            outputs=merge_nodes(self.outputs, other.outputs, "output"),
            signature=self.signature,
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec_dict: dict[str, Any]) -> "GraphSpec":
        """Inverse of ``to_dict``."""
        return cls(
            args=list(spec_dict["args"]),
            kwargs=dict(spec_dict["kwargs"]),
            outputs=dict(spec_dict["outputs"]),
            signature=list(spec_dict["signature"]),
        )


def forward_signature(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``module.forward``."""
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []
