"""Request values to model inputs and model outputs to JSON, checked against a GraphSpec.

No TorchServe import: the wire formats (``aitune_core.wire``) hand decoded values here, so the
whole contract is tested without a server. Every problem is a BadRequestError whose message
names the input, what was expected and what came.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from aitune_core.errors import BadRequestError
from aitune_core.graph_spec import BATCH_DIM, GraphSpec, Sample, flatten_tensors

_FLOAT_KINDS = "f"
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_INT_KINDS = "iu"
_NARROW_FLOATS = (torch.bfloat16, torch.float16)
# Float inputs up to this many numbers skip numpy (see _small_float_tensor; crossover measured ~250).
_SMALL_INPUT_NUMBERS = 256


def decode_inputs(value: Any, spec: GraphSpec) -> Sample:
    """Tensors for one request: a nested list (one positional input) or {"inputs": [...], "kwargs": {...}}."""
    if isinstance(value, list) and len(spec.args) == 1:  # the common request, decoded on the shortest path
        return Sample(args=(decode_value(value, spec.args[0], "input 0"),))
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"inputs", "kwargs"})
        if unknown:
            raise BadRequestError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in the request object: "
                "expected 'inputs' and optionally 'kwargs'"
            )
        if "inputs" not in value:
            raise BadRequestError("the request object has no 'inputs': expected {\"inputs\": [x1, ...]}")
        args, kwargs = value["inputs"], value.get("kwargs", {})
        if not isinstance(args, list):
            raise BadRequestError(f"'inputs' must be a list of inputs, got {_kind(args)}")
        if not isinstance(kwargs, dict):
            raise BadRequestError(f"'kwargs' must be an object, got {_kind(kwargs)}")
    elif isinstance(value, list):
        args, kwargs = [value], {}
    else:
        raise BadRequestError(
            "the body must be a nested list (one input) or an object "
            f"{{\"inputs\": [...], \"kwargs\": {{...}}}}, got {_kind(value)}"
        )
    if len(args) != len(spec.args):
        raise BadRequestError(f"expected {len(spec.args)} positional input(s), got {len(args)}")
    unknown = sorted(set(kwargs) - set(spec.kwargs)) if kwargs else None
    if unknown:
        expected = ", ".join(map(repr, spec.kwargs)) or "none"
        raise BadRequestError(f"unknown keyword input(s) {', '.join(map(repr, unknown))}: expected {expected}")
    return Sample(
        args=tuple(decode_value(arg, node, f"input {i}") for i, (arg, node) in enumerate(zip(args, spec.args))),
        kwargs={name: decode_value(arg, spec.kwargs[name], f"input {name!r}") for name, arg in kwargs.items()},
    )


def decode_value(value: Any, node: dict[str, Any], where: str) -> Any:
    """One JSON value checked against its spec node (see graph_spec)."""
    kind = node["kind"]
    if kind == "tensor":
        return decode_tensor(value, node, where)
    if kind in ("tuple", "list"):
        items = node["items"]
        if not isinstance(value, list) or len(value) != len(items):
            raise BadRequestError(f"{where}: expected a list of {len(items)} items, got {_kind(value)}")
        decoded = [decode_value(item, sub, f"{where}[{i}]") for i, (item, sub) in enumerate(zip(value, items))]
        return tuple(decoded) if kind == "tuple" else decoded
    if kind == "dict":
        if not isinstance(value, dict) or value.keys() != node["items"].keys():
            raise BadRequestError(f"{where}: expected an object with keys {sorted(node['items'])}, got {_kind(value)}")
        return {key: decode_value(value[key], sub, f"{where}[{key!r}]") for key, sub in node["items"].items()}
    return _decode_plain(value, node["type"], where)


def decode_tensor(value: Any, node: dict[str, Any], where: str) -> torch.Tensor:
    """A nested list of numbers as a tensor with the recorded dtype, rank and fixed dims."""
    dtype = getattr(torch, node["dtype"])
    rank = len(node["shapes"][0])
    if rank and not isinstance(value, list):
        raise BadRequestError(f"{where}: expected a nested list of rank {rank}, got {_kind(value)}")
    if dtype.is_floating_point and _first_row_numel(value, rank) <= _SMALL_INPUT_NUMBERS:
        tensor = _small_float_tensor(value, dtype, rank, node, where)
        if tensor is not None:
            return tensor
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        raise BadRequestError(f"{where}: expected a nested list of numbers with equal-length rows "
                              "(a rectangular array), got ragged or mixed data") from None
    if array.dtype.kind == "O" and array.ndim == rank:
        array = _object_numbers(value, array, dtype, node, where)
    if dtype != torch.bool and (array.dtype.kind == "b" or bool in _leaf_types(value, array.ndim)):
        raise BadRequestError(f"{where}: expected numbers ({node['dtype']}), got booleans")
    if array.dtype.kind not in _FLOAT_KINDS + _INT_KINDS + "b":
        raise BadRequestError(f"{where}: expected numbers ({node['dtype']}), got {_array_kind(array)}")
    if array.ndim != rank:
        raise BadRequestError(f"{where}: expected rank {rank} (shape like {node['shapes'][0]}), "
                              f"got rank {array.ndim} (shape {list(array.shape)})")
    _check_dims(array.shape, node, where)
    if dtype.is_floating_point:
        # Cast in numpy where it can; a value past the dtype's range becomes Inf there (no
        # warning) and is caught with NaN/Inf. bfloat16 goes through float32, which numpy has.
        numpy_dtype = _NUMPY_FLOATS.get(dtype)
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(array, dtype=numpy_dtype or np.float32)
        if numpy_dtype is not None:
            finite = bool(np.isfinite(cast).all())
            tensor = torch.from_numpy(cast)
        else:
            tensor = torch.from_numpy(cast).to(dtype)
            finite = bool(torch.isfinite(tensor).all())
        if not finite:
            raise BadRequestError(f"{where}: contains NaN or Inf, or a value beyond the range of {node['dtype']}")
        return tensor
    if dtype == torch.bool:
        if array.dtype.kind != "b":
            raise BadRequestError(f"{where}: expected booleans, got {_array_kind(array)}")
        return torch.from_numpy(array.copy())
    info = torch.iinfo(dtype)
    if array.dtype.kind not in _INT_KINDS and _leaf_types(value, array.ndim) != {int}:
        raise BadRequestError(f"{where}: expected integers ({node['dtype']}), got non-integer numbers")
    # numpy reads integers past int64 on the negative side as floats: out of range as well.
    if array.dtype.kind not in _INT_KINDS or array.size and (array.min() < info.min or array.max() > info.max):
        raise BadRequestError(f"{where}: a value is outside the range of {node['dtype']} [{info.min}, {info.max}]")
    return torch.from_numpy(array.astype(np.int64)).to(dtype)


def array_to_tensor(array: np.ndarray, node: dict[str, Any], where: str) -> torch.Tensor:
    """A typed array (a binary or typed protocol sent its dtype and shape) checked like a JSON tensor.

    The array's dtype must be the recorded one (the wire format already mapped the protocol's
    datatype); rank and fixed dims as recorded; floats finite. Shares the array's memory when it can.
    """
    expected = node["dtype"]
    if str(array.dtype) != expected and not (expected == "bfloat16" and array.dtype == np.float32):
        raise BadRequestError(f"{where}: expected {expected}, got {array.dtype}")
    rank = len(node["shapes"][0])
    if array.ndim != rank:
        raise BadRequestError(f"{where}: expected rank {rank} (shape like {node['shapes'][0]}), "
                              f"got rank {array.ndim} (shape {list(array.shape)})")
    _check_dims(array.shape, node, where)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequestError(f"{where}: contains NaN or Inf, or a value beyond the range of {expected}")
    tensor = torch.from_numpy(array)
    return tensor.to(torch.bfloat16) if expected == "bfloat16" else tensor


def _first_row_numel(value: Any, rank: int) -> int:
    """How many numbers ``value`` holds if it is rectangular: the product of its first rows' lengths."""
    numel = 1
    for _ in range(rank):
        if not isinstance(value, list) or not value:
            return 0
        numel *= len(value)
        value = value[0]
    return numel


def _small_float_tensor(value: Any, dtype: torch.dtype, rank: int, node: dict[str, Any],
                        where: str) -> torch.Tensor | None:
    """A small float input: one C call (torch.as_tensor) and checks of the leaves in Python.

    In a busy worker each numpy call or extra torch op costs ~20-35 us a request (measured: one
    np.isfinite on a 1x64 input cost more than this whole function), while the C-level maps over
    the leaves here cost ~0.2 us a number: cheaper up to a few hundred numbers, then numpy's path
    wins. None when torch refuses the data or it holds booleans (which torch would read as 0/1):
    the numpy path then names the problem.
    """
    try:
        tensor = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None
    if tensor.dim() != rank:
        return None
    leaves = _leaves(value, rank)
    if bool in set(map(type, leaves)):
        return None
    _check_dims(tuple(tensor.shape), node, where)
    if leaves and (not all(map(math.isfinite, leaves)) or max(map(abs, leaves)) > torch.finfo(dtype).max):
        raise BadRequestError(f"{where}: contains NaN or Inf, or a value beyond the range of {node['dtype']}")
    return tensor


def _object_numbers(value: Any, array: np.ndarray, dtype: torch.dtype, node: dict[str, Any], where: str) -> np.ndarray:
    """numpy keeps integers past 64 bits as Python objects: out of range for any integer dtype."""
    if not _leaf_types(value, array.ndim) <= {int, float}:
        return array
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        raise BadRequestError(f"{where}: a value is outside the range of {node['dtype']} [{info.min}, {info.max}]")
    try:
        return array.astype(np.float64)
    except OverflowError:
        raise BadRequestError(f"{where}: contains NaN or Inf, or a value beyond the range of {node['dtype']}") from None


def _leaves(value: Any, ndim: int) -> list[Any]:
    """The leaves of a rectangular nested list of rank ``ndim``, in order."""
    leaves = value if ndim else [value]
    for _ in range(ndim - 1):
        leaves = list(itertools.chain.from_iterable(leaves))
    return leaves


def _leaf_types(value: Any, ndim: int) -> set[type]:
    """Types of the leaves of a rectangular nested list; numpy would silently read true as 1."""
    return set(map(type, _leaves(value, ndim)))


def _check_dims(shape: tuple[int, ...], node: dict[str, Any], where: str) -> None:
    if shape and shape[BATCH_DIM] == 0:
        raise BadRequestError(f"{where}: the batch dim (dim 0) is empty: send at least one row")
    expected = node["shapes"][0]
    for dim, size in enumerate(shape):
        if dim not in node["dynamic_dims"] and size != expected[dim]:
            raise BadRequestError(f"{where}: dim {dim} must be {expected[dim]}, got {size} "
                                  f"(shape {list(shape)}, expected like {expected})")


def _decode_plain(value: Any, type_name: str, where: str) -> Any:
    accepted = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "none": (type(None),)}
    if type_name == "any":
        return value
    if not isinstance(value, accepted[type_name]) or (type_name in ("int", "float") and isinstance(value, bool)):
        raise BadRequestError(f"{where}: expected a {type_name}, got {_kind(value)}")
    if type_name == "float" and not math.isfinite(value):
        raise BadRequestError(f"{where}: expected a finite number, got {value}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _array_kind(array: np.ndarray) -> str:
    return {"U": "strings", "S": "strings", "O": "null, objects or mixed values"}.get(array.dtype.kind, str(array.dtype))


def encode_output(value: Any) -> Any:
    """A model output as JSON: a tensor as a nested list, a tuple/list as a list, a dict as an object."""
    if isinstance(value, torch.Tensor):
        # tolist() reads any device and ignores autograd; only narrow floats need widening first.
        if value.dtype in _NARROW_FLOATS or value.dtype.itemsize == 1 and value.dtype.is_floating_point:
            value = value.float()
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [encode_output(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode_output(item) for key, item in value.items()}
    return value


def batch_size_of(sample: Sample) -> int | None:
    """The rows in a request: the common dim 0 of its tensors, None when there is none."""
    sizes = {tensor.shape[BATCH_DIM] if tensor.dim() else None for tensor in flatten_tensors((sample.args, sample.kwargs))}
    return sizes.pop() if len(sizes) == 1 else None


def batch_key(sample: Sample) -> Any:
    """Requests with equal keys can be concatenated along dim 0 into one call."""
    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, tuple(value.shape[1:]))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(key(item) for item in value))
        if isinstance(value, dict):
            return ("dict", tuple((name, key(item)) for name, item in sorted(value.items())))
        return ("value", repr(value))
    return key((sample.args, sample.kwargs))


def concat_samples(samples: list[Sample]) -> Sample:
    """One sample whose tensors are the requests' tensors concatenated along dim 0."""
    first = samples[0]

    def concat(values: list[Any]) -> Any:
        head = values[0]
        if isinstance(head, torch.Tensor):
            return torch.cat(values, dim=BATCH_DIM)
        if isinstance(head, (tuple, list)):
            return type(head)(concat([v[i] for v in values]) for i in range(len(head)))
        if isinstance(head, dict):
            return {name: concat([v[name] for v in values]) for name in head}
        return head

    return Sample(args=concat([s.args for s in samples]), kwargs=concat([s.kwargs for s in samples]) if first.kwargs else {})


def split_output(output: Any, sizes: list[int]) -> list[Any] | None:
    """The batched output cut back into one output per request; None when it has no batch dim to cut."""
    total = sum(sizes)
    if not all(t.dim() and t.shape[BATCH_DIM] == total for t in flatten_tensors(output)) or not flatten_tensors(output):
        return None

    def split(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor):
            return list(torch.split(value, sizes, dim=BATCH_DIM))
        if isinstance(value, (tuple, list)):
            parts = [split(item) for item in value]
            return [type(value)(part[i] for part in parts) for i in range(len(sizes))]
        if isinstance(value, dict):
            parts = {name: split(item) for name, item in value.items()}
            return [{name: part[i] for name, part in parts.items()} for i in range(len(sizes))]
        return [value] * len(sizes)

    return split(output)
