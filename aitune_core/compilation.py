"""How a backend's module runs compiled: an AOTInductor package made at archive time, or torch.compile.

``CompileSettings`` is the part of a backend's config that says how; ``CompiledModule`` is the result
that travels in the checkpoint. Ahead of time is the default: the archive holds the compiled package
and a worker loads it (no compilation at start). Where the package cannot run (another CPU or GPU
generation, another torch) or the model cannot be exported, the worker compiles with torch.compile
instead, from the weights the checkpoint keeps for that purpose, and says so in its log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from aitune_core.accuracy import compare_outputs
from aitune_core.aot import AOTCompileError, AOTPackage, check_sizes, compile_package
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.payload import split_output

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass
class CompileSettings:
    """``mode``: torch.compile's mode. ``freezing``: inductor folds the weights into the graph as constants
    (and prepacks them for oneDNN where it can). ``ahead_of_time``: compile at archive time with AOTInductor."""

    mode: str = "default"
    freezing: bool = True
    ahead_of_time: bool = True

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"Unknown torch.compile mode {self.mode!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.ahead_of_time and self.mode == "reduce-overhead":
            raise ValueError("torch.compile mode 'reduce-overhead' (CUDA graphs) cannot be compiled ahead of time: "
                             "use ahead_of_time=False (--compile-at start)")

    def inductor_options(self) -> dict[str, Any]:
        """inductor's settings for this mode, with freezing as set (CUDA graphs only when compiled at start)."""
        options = dict(torch._inductor.list_mode_options(self.mode))
        if self.ahead_of_time:
            options.pop("triton.cudagraphs", None)
        return {**options, "freezing": self.freezing}


class CompiledModule:
    """A backend's module compiled: the AOTInductor package (when there is one) and what runs now."""

    def __init__(self, settings: CompileSettings, package: AOTPackage | None = None, note: str = "") -> None:
        self.settings = settings
        self.package = package
        self.note = note  # how it came to run as it does, for the worker's log
        self._runner: Any = None
        self._jit = False
        self._max_sizes: list[list[Any]] = []  # of the loaded package

    @classmethod
    def build(cls, module: torch.nn.Module, settings: CompileSettings, graph_spec: GraphSpec, sample: Sample,
              device: torch.device) -> "CompiledModule":
        """Compile ``module`` (on ``device``) ahead of time when the settings say so, and make it runnable.

        A model that cannot be compiled ahead of time is compiled by torch.compile instead, with a warning.
        """
        compiled = cls(settings)
        if settings.ahead_of_time:
            try:
                compiled.package = compile_package(module, graph_spec, sample, device, settings.inductor_options())
                if not compiled.load(device):  # e.g. no room left to unpack it: nothing to check or ship
                    raise AOTCompileError(f"the package just compiled does not load ({compiled.note})")
                compiled._check_a_batch_of_one(sample)
            except AOTCompileError as error:
                compiled.package, compiled._runner = None, None
                compiled.note = f"not compiled ahead of time: {error}"
                logger.warning("%s", compiled.note)
        if not compiled.ready:
            compiled.compile_at_start(module, graph_spec)
        return compiled

    def _check_a_batch_of_one(self, sample: Sample) -> None:
        """AOTCompileError unless one row gives what that row gives inside a batch: export compiles for
        sizes of at least 2, and a batch of one is the commonest request."""
        rows = max(2, sample.rows())
        batch = sample.with_rows(rows)
        with torch.inference_mode():
            first_row = split_output(batch.run(self), [1, rows - 1])
            alone = batch.with_rows(1).run(self)
        if first_row is None:
            return  # outputs without a batch dim: nothing to compare row by row
        cosine = compare_outputs(first_row[0], alone).cosine
        if not cosine >= 0.999:
            raise AOTCompileError(f"the compiled model answers a batch of one differently from that row in a "
                                  f"batch (cosine {cosine:.6f})")

    @property
    def compiles_on_first_calls(self) -> bool:
        """True when torch.compile runs it: its first calls (per new shape) compile."""
        return self._jit

    @property
    def ready(self) -> bool:
        return self._runner is not None

    def load(self, device: torch.device, keep_package: bool = True) -> bool:
        """Load the package when it runs on ``device``; False (and a note why) when it cannot.

        ``keep_package=False`` drops the package's bytes once loaded (a deployed worker never needs them again).
        """
        if self.package is None:
            self.note = self.note or "the archive has no AOTInductor package: compiling on this worker"
            return False
        target = self.package.target
        why_not = target.cannot_run_on(device)
        if why_not is not None:
            self.note = (f"the archive's AOTInductor package was built for {target.describe()} and cannot run "
                         f"here ({why_not}): compiling on this worker instead")
            logger.warning("%s", self.note)
            return False
        try:
            runner = self.package.load(device)
        except Exception as error:  # e.g. a library the package links against differs on this machine
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            self.note = (f"the archive's AOTInductor package cannot be loaded here ({type(error).__name__}: "
                         f"{reason}): compiling on this worker instead")
            logger.warning("%s", self.note)
            return False
        self._runner, self._jit = runner, False
        self._max_sizes = self.package.max_sizes
        self.note = f"AOTInductor package loaded (compiled at archive time for {target.describe()})"
        if not keep_package:
            self.package = None
        return True

    def compile_at_start(self, module: torch.nn.Module, graph_spec: GraphSpec) -> None:
        """torch.compile ``module``: its first call compiles one graph for every size of the dims the
        GraphSpec records as dynamic (see :class:`DynamicCall`)."""
        self._max_sizes = []
        self._runner = DynamicCall(torch.compile(module, dynamic=None, options=self.settings.inductor_options()),
                                   graph_spec)
        self._jit = True

    def release(self) -> None:
        """Drop what runs (the loaded library and its weights, or torch.compile's graphs)."""
        self._runner, self._jit = None, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._max_sizes:
            check_sizes(self._max_sizes, args, kwargs)
        return self._runner(*args, **kwargs)

    def to_state(self) -> dict[str, Any]:
        """The package, when there is one, as ``torch.load(weights_only=True)`` reads it back; else why not."""
        if self.package is not None:
            return {"package": self.package.to_state()}
        return {"package": None, "note": self.note}

    @classmethod
    def from_state(cls, settings: CompileSettings, state: dict[str, Any] | None) -> "CompiledModule":
        state = state or {}
        package = state.get("package")
        return cls(settings, AOTPackage.from_state(package) if package is not None else None, state.get("note", ""))


class DynamicCall:
    """Calls a torch.compile'd module; its first calls (the worker's warm-up, where graphs are compiled) mark
    the GraphSpec's dynamic dims dynamic and compile size-obliviously: one graph serves every batch and length,
    1 included.

    By default dynamo specializes sizes 0 and 1 and recompiles when a size first changes: a batch of one,
    a one-token text, each new combination is a new graph (seconds each, and past dynamo's recompile
    limit a silent fall back to eager). AOTInductor's export makes the same size-oblivious assumption.
    The warm-up runs the smallest sample at one row and then every recorded sample: as many calls are
    marked, so a model whose samples inductor cannot serve with one graph (a decoder's prompt chunk and
    its one-token step) gets its second graph dynamic too. Later calls skip the marking
    (torch._dynamo.maybe_mark_dynamic costs ~0.3-0.8 ms a tensor); their sizes pass the guards as they are.
    """

    def __init__(self, compiled: Any, graph_spec: GraphSpec) -> None:
        self.compiled = compiled
        self.graph_spec = graph_spec
        recorded = [len(node.get("shapes", [])) for node in graph_spec.args if node.get("kind") == "tensor"]
        self.marked_calls = 1 + max(recorded, default=1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.marked_calls:
            return self.compiled(*args, **kwargs)
        from torch.fx.experimental import _config as fx_config

        args = tuple(_mark_dynamic(arg, node) for arg, node in zip(args, self.graph_spec.args))
        kwargs = {name: _mark_dynamic(value, self.graph_spec.kwargs.get(name, {})) for name, value in kwargs.items()}
        with fx_config.patch(backed_size_oblivious=True):
            output = self.compiled(*args, **kwargs)
        self.marked_calls -= 1
        return output


def _mark_dynamic(value: Any, node: dict[str, Any]) -> Any:
    # A dim of size 1 stays static in that graph: a decoder's one-token step then gets a graph of its own
    # (where marking it made dynamo specialize it anyway, and every other call recompile).
    if isinstance(value, torch.Tensor) and node.get("kind") == "tensor":
        for dim in node["dynamic_dims"]:
            if dim < value.dim() and value.shape[dim] != 1:
                torch._dynamo.maybe_mark_dynamic(value, dim)
    return value
