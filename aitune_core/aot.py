"""AOTInductor: compile a module once, at archive time, into a package a worker loads in a fraction of a second.

The module is exported with ``torch.export`` (every dim the GraphSpec records as dynamic stays dynamic,
so one compiled graph serves any batch and any length with no recompilation), compiled by inductor
into a shared library plus its weights, and kept as bytes. The library is native code for the machine
it was built on: :class:`AOTPackage` records that machine (torch version, device, CPU vector ISA and
features, or CUDA compute capability) and refuses to load elsewhere, so the caller can compile at
start-up instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
from typing import Any

import torch

from aitune_core.devices import cuda_capability
from aitune_core.errors import AITuneError
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.precision import cpu_features

logger = logging.getLogger(__name__)

# Features a compiled CPU library (or the oneDNN weight layouts frozen into it) may depend on: a worker
# must have each one the build machine had.
CPU_FEATURES = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "amx_fp16")


class AOTCompileError(AITuneError):
    """The module cannot be compiled ahead of time (it cannot be exported, or export fixed a dynamic dim)."""


@dataclasses.dataclass
class AOTTarget:
    """The machine an AOTInductor package was compiled for."""

    torch_version: str
    device_type: str
    vec_isa: str | None = None  # inductor's CPU vector ISA, e.g. "avx512 avx512_vnni"
    cpu_features: list[str] = dataclasses.field(default_factory=list)
    cuda_capability: list[int] | None = None

    @classmethod
    def of(cls, device: torch.device) -> "AOTTarget":
        """This machine's ``device`` as a target."""
        if device.type == "cuda":
            return cls(str(torch.__version__), "cuda", cuda_capability=list(cuda_capability(device)))
        features = cpu_features()
        return cls(str(torch.__version__), device.type, vec_isa=_vec_isa(),
                   cpu_features=[name for name in CPU_FEATURES if features.get(name)])

    def describe(self) -> str:
        if self.device_type == "cuda":
            return f"CUDA compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}, torch {self.torch_version}"
        return f"a {self.device_type} with {self.vec_isa or 'no vector ISA'} ({', '.join(self.cpu_features)}), torch {self.torch_version}"

    def cannot_run_on(self, device: torch.device) -> str | None:
        """None when a package built for this target runs on ``device`` here, else why not."""
        if str(torch.__version__) != self.torch_version:
            return f"built with torch {self.torch_version}, this worker has torch {torch.__version__}"
        if device.type != self.device_type:
            return f"built for a {self.device_type}, this worker runs on {device}"
        if device.type == "cuda":
            here = list(cuda_capability(device))
            if here != self.cuda_capability:
                return (f"built for compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}, "
                        f"{device} has {here[0]}.{here[1]}")
            return None
        if self.vec_isa and self.vec_isa not in _valid_vec_isas():
            return f"built for {self.vec_isa}, this CPU has only {', '.join(_valid_vec_isas()) or 'no vector ISA'}"
        features = cpu_features()
        missing = [name for name in self.cpu_features if not features.get(name)]
        if missing:
            return f"built on a CPU with {', '.join(missing)}, which this CPU lacks"
        return None


def _vec_isa() -> str | None:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return str(isa) if isa else None


def _valid_vec_isas() -> list[str]:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]


@dataclasses.dataclass
class AOTPackage:
    """An AOTInductor package (a .pt2 zip: shared library and weights), the machine it was built for, and
    the largest size export found the model takes along a dynamic dim, where it found one: ``[input
    position or keyword name, dim, size]`` (e.g. BERT's 512 positions). The library checks no size:
    :func:`check_sizes` does, so a larger input is refused instead of read out of bounds."""

    data: bytes
    target: AOTTarget
    max_sizes: list[list[Any]] = dataclasses.field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        """For ``Backend.to_dict``: the bytes as a uint8 tensor, so ``torch.load(weights_only=True)`` reads them."""
        return {"package": torch.frombuffer(bytearray(self.data), dtype=torch.uint8),
                "target": dataclasses.asdict(self.target), "max_sizes": self.max_sizes}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "AOTPackage":
        return cls(data=state["package"].numpy().tobytes(), target=AOTTarget(**state["target"]),
                   max_sizes=[list(limit) for limit in state.get("max_sizes", [])])

    def load(self, device: torch.device) -> Any:
        """The compiled model, callable like the module; check ``target.cannot_run_on(device)`` first."""
        index = device.index if device.type == "cuda" and device.index is not None else -1
        return torch._inductor.aoti_load_package(io.BytesIO(self.data), device_index=index)


def check_sizes(max_sizes: list[list[Any]], args: tuple, kwargs: dict[str, Any]) -> None:
    """ValueError naming the input when one is larger than an AOTPackage's ``max_sizes`` allow."""
    for position, dim, size in max_sizes:
        value = args[position] if isinstance(position, int) and position < len(args) else kwargs.get(position)
        if isinstance(value, torch.Tensor) and value.shape[dim] > size:
            name = f"input {position}" if isinstance(position, int) else f"input {position!r}"
            raise ValueError(f"{name}: dim {dim} is {value.shape[dim]}, the model takes at most {size}")


def compile_package(module: torch.nn.Module, graph_spec: GraphSpec, sample: Sample, device: torch.device,
                    inductor_options: dict[str, Any]) -> AOTPackage:
    """Export ``module`` with the GraphSpec's dynamic dims and compile it with AOTInductor for ``device``.

    AOTCompileError (with the reason) when the model cannot be exported, takes Python values that
    export would fix as constants, or export fixed a dim the samples showed to vary.
    """
    values = [where for where, node in _inputs(graph_spec) if node["kind"] == "value"]
    if values:
        raise AOTCompileError(f"{', '.join(values)} is a Python value, which torch.export fixes at its sample's "
                              "value: the model is compiled when the worker starts instead")
    # A dim of size 1 would be specialized by export: the example has at least 2 rows.
    rows = max(2, sample.rows())
    example = sample.with_rows(rows)
    try:
        with torch.no_grad():
            exported = torch.export.export(module, example.args, example.kwargs,
                                           dynamic_shapes=_dynamic_shapes(module, graph_spec, example), strict=False)
    except Exception as error:  # export refuses many kinds of Python; say which and compile at start instead
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise AOTCompileError(f"torch.export cannot export the model: {type(error).__name__}: {reason}") from None
    max_sizes = _check_still_dynamic(exported, graph_spec, example)
    buffer = io.BytesIO()
    torch._inductor.aoti_compile_and_package(exported, package_path=buffer, inductor_configs=inductor_options)
    return AOTPackage(data=buffer.getvalue(), target=AOTTarget.of(device), max_sizes=max_sizes)


def _inputs(spec: GraphSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every top-level input's name (for messages) and spec node, positional first."""
    return [(f"input {i}", node) for i, node in enumerate(spec.args)] + \
           [(f"input {name!r}", node) for name, node in spec.kwargs.items()]


def _node_shapes(node: dict[str, Any]) -> Any:
    """torch.export's dynamic_shapes entry for one input: each dynamic dim AUTO (export relates dims
    that must be equal, e.g. the length of input_ids and attention_mask), the other dims static."""
    kind = node["kind"]
    if kind == "tensor":
        return {dim: torch.export.Dim.AUTO for dim in node["dynamic_dims"]} or None
    if kind in ("tuple", "list"):
        return [_node_shapes(item) for item in node["items"]]
    if kind == "dict":
        return {key: _node_shapes(item) for key, item in node["items"].items()}
    return None


def _dynamic_shapes(module: torch.nn.Module, spec: GraphSpec, sample: Sample) -> dict[str, Any]:
    """dynamic_shapes by forward()'s parameter names, as torch.export matches them (``*args`` takes a
    tuple, ``**kwargs`` a dict)."""
    positional = [_node_shapes(node) for node in spec.args]
    keyword = {name: _node_shapes(spec.kwargs[name]) for name in sample.kwargs}
    signature = inspect.signature(module.forward)
    try:  # bind positions and names, to learn which parameter each input lands in
        bound = signature.bind(*range(len(sample.args)), **{name: name for name in sample.kwargs})
    except TypeError as error:
        raise AOTCompileError(f"the samples do not fit forward{signature}: {error}") from None

    def shapes(marker: Any) -> Any:
        return positional[marker] if isinstance(marker, int) else keyword[marker]

    result = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            result[name] = tuple(shapes(marker) for marker in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            result[name] = {key: shapes(marker) for key, marker in value.items()}
        else:
            result[name] = shapes(value)
    return result


def _tensor_nodes(node: dict[str, Any], where: str, position: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """The tensor nodes inside ``node`` in pytree order (what export's placeholders follow), each with its
    name for messages and its top-level position (None inside a nested input)."""
    kind = node["kind"]
    if kind == "tensor":
        return [(where, position, node)]
    if kind in ("tuple", "list"):
        return [leaf for i, item in enumerate(node["items"]) for leaf in _tensor_nodes(item, f"{where}[{i}]", None)]
    if kind == "dict":
        return [leaf for key, item in node["items"].items()
                for leaf in _tensor_nodes(item, f"{where}[{key!r}]", None)]
    return []


def _check_still_dynamic(exported: Any, spec: GraphSpec, sample: Sample) -> list[list[Any]]:
    """The largest size export found the model takes along each dynamic dim that has one (see AOTPackage).

    AOTCompileError when export fixed a dim the GraphSpec marks dynamic, or raised its smallest size (a
    branch on a size: the compiled library checks no size, so a smaller input would get a wrong answer).
    """
    from torch.utils._sympy.numbers import int_oo

    nodes = [leaf for i, node in enumerate(spec.args) for leaf in _tensor_nodes(node, f"input {i}", i)]
    nodes += [leaf for name in sample.kwargs for leaf in _tensor_nodes(spec.kwargs[name], f"input {name!r}", name)]
    placeholders = [node for node in exported.graph.nodes
                    if node.op == "placeholder" and node.name in exported.graph_signature.user_inputs]
    max_sizes = []
    for (where, position, node), placeholder in zip(nodes, placeholders):
        shape = placeholder.meta["val"].shape
        for dim in node["dynamic_dims"]:
            if not isinstance(shape[dim], torch.SymInt):
                raise AOTCompileError(f"torch.export fixed dim {dim} of {where} at {shape[dim]}, though the "
                                      "samples vary it: the model is compiled when the worker starts instead")
            for symbol in shape[dim].node.expr.free_symbols:
                sizes = exported.range_constraints.get(symbol)
                if sizes is None:
                    continue
                if sizes.lower > 2:
                    raise AOTCompileError(
                        f"the model branches on the size of dim {dim} of {where} (export kept only sizes "
                        f"{sizes.lower}..{sizes.upper}): the model is compiled when the worker starts instead")
                if sizes.upper != int_oo:
                    if position is None:
                        raise AOTCompileError(f"export limits dim {dim} of {where} to {sizes.upper}, inside a "
                                              "nested input: the model is compiled when the worker starts instead")
                    max_sizes.append([position, dim, int(sizes.upper)])
    return max_sizes
