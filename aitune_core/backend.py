"""The backend state machine: BackendState, BackendConfig and the abstract Backend.

A backend turns an ``nn.Module`` into something that runs faster or smaller. It is built once
(archive time), saved with ``to_dict``, and loaded with ``from_dict`` + ``deploy`` when a
worker starts. The state table lives in DESIGN.md; every public method checks it before it
calls the backend's private step, and a private step that raises leaves the state unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import gc
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

try:
    import nvtx
except ImportError:  # a TorchServe image without nvtx still serves our archives; ranges only matter to a profiler
    nvtx = None

from aitune_core.compilation import CompiledModule, CompileSettings
from aitune_core.devices import check_device_exists, parse_device
from aitune_core.graph_spec import GraphSpec, Sample, flatten_tensors, map_tensors

logger = logging.getLogger(__name__)

NVTX_DOMAIN = "AITune"


class BackendState(enum.Enum):
    """Where a backend is in its life; see the state table in DESIGN.md."""

    INIT = "INIT"
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    CHECKPOINT_LOADED = "CHECKPOINT_LOADED"
    DEPLOYED = "DEPLOYED"


@dataclasses.dataclass
class BackendConfig:
    """Base of every backend's configuration: a dataclass that travels as plain JSON."""

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "BackendConfig":
        """Rebuild a configuration written by ``to_dict``."""
        return cls(**config_dict)

    def to_json(self, path: Path | str) -> None:
        """Write ``to_dict()`` to ``path`` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def key(self) -> str:
        """sha256 of the canonical JSON of ``to_dict()``: the same in every process."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> str:
        """The fields that differ from their defaults, as ``name=value`` joined by commas."""
        return ",".join(changed_fields(self))

    def compile_settings(self) -> CompileSettings | None:
        """How the backend's module is compiled; None when it runs as it is."""
        return None


def changed_fields(obj: Any) -> list[str]:
    """``name=value`` for each init field of dataclass ``obj`` that differs from a default instance.

    The reference is built from ``obj``'s required fields, so values set in ``__post_init__``
    (as torchao's configs do) count as defaults.
    """
    init_fields = [field for field in dataclasses.fields(obj) if field.init]
    required = {
        field.name: getattr(obj, field.name)
        for field in init_fields
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    reference = type(obj)(**required)
    return [
        f"{field.name}={getattr(obj, field.name)!r}"
        for field in init_fields
        if field.name in required or getattr(obj, field.name) != getattr(reference, field.name)
    ]


# Made once: infer runs for every request, and the range's attributes never change.
_INFER_RANGE = (nvtx.annotate(message="infer", domain=NVTX_DOMAIN, color="black") if nvtx is not None
                else contextlib.nullcontext())


def _annotate(method):
    """An NVTX range named after the public method, in the AITune domain."""
    if nvtx is None:
        return method
    return nvtx.annotate(message=method.__name__, domain=NVTX_DOMAIN, color="black")(method)


class Backend(abc.ABC):
    """Abstract backend: the public methods enforce the state table, subclasses do the work.

    Subclasses implement ``_build``, ``_activate``, ``_deactivate``, ``_deploy``, ``_infer``,
    ``to_dict``, ``from_dict`` and ``describe``; they never change ``state`` themselves.
    """

    # Packages a worker needs for this backend beyond torch (an archive's requirements.txt lists them).
    REQUIRES: ClassVar[tuple[str, ...]] = ()
    # Runs this project's CPU kernels (aitune_core/kernels): an archive then carries their builds.
    USES_CPU_KERNELS: ClassVar[bool] = False
    STATE_TYPE: ClassVar[str] = "type"
    STATE_FORMAT_VERSION: ClassVar[str] = "format_version"
    FORMAT_VERSION: ClassVar[int] = 1

    def __init__(self, config: BackendConfig) -> None:
        self._config = config
        self._device = torch.device("cpu")
        self.state = BackendState.INIT
        # The compiled self._module, when the config compiles it; infer runs it.
        self._compiled: CompiledModule | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Name of the backend: its class name."""
        return type(self).__name__

    @property
    def device(self) -> torch.device:
        """The device the backend's module runs on."""
        return self._device

    @property
    def is_active(self) -> bool:
        """True when ``infer`` may be called (ACTIVE or DEPLOYED)."""
        return self.state in (BackendState.ACTIVE, BackendState.DEPLOYED)

    @property
    def compile_settings(self) -> CompileSettings | None:
        """How the module is compiled (ahead of time or at start); None when it is not."""
        return self._config.compile_settings()

    @property
    def compiles_on_first_calls(self) -> bool:
        """True when torch.compile runs the module now: its first call at each new shape compiles."""
        return self._compiled is not None and self._compiled.compiles_on_first_calls

    @property
    def compile_note(self) -> str:
        """How the compiled module came to run as it does (package loaded, or compiled here and why)."""
        return self._compiled.note if self._compiled is not None else ""

    @property
    def config(self) -> BackendConfig:
        """The backend's configuration."""
        return self._config

    # -- public state machine -----------------------------------------------------------------
    @_annotate
    def build(
        self,
        module: torch.nn.Module,
        graph_spec: GraphSpec | None,
        data: list[Sample],
        device: torch.device | str,
        cache_dir: Path | None = None,
    ) -> "Backend":
        """Build the backend from ``module`` on ``device``: INIT -> ACTIVE.

        Each sample in ``data`` is run at most once (a model may hold state). With
        ``graph_spec=None`` the spec is recorded from the samples. Raises ValueError for a
        device that does not exist or cannot run this backend.
        """
        if self.state != BackendState.INIT:
            raise RuntimeError(f"Backend {self.name} build should be called only once")
        if not data:
            raise ValueError(f"Backend {self.name} build needs at least one sample, got none")
        target = self.check_device(device)
        samples = [Sample.of(sample) for sample in data]
        try:
            if graph_spec is None:
                graph_spec = GraphSpec.from_samples(module, samples)
            self._build(module, graph_spec, samples, target, cache_dir)
            settings = self.compile_settings
            if settings is not None:
                largest = max(samples, key=lambda s: sum(t.numel() for t in flatten_tensors((s.args, s.kwargs))))
                self._compiled = CompiledModule.build(self._module, settings, graph_spec, largest, target)
        except Exception as error:
            logger.error("Failed to build backend %s: %s", self.name, error)
            raise
        self._device = target
        self._graph_spec = graph_spec
        self._data = samples
        self.state = BackendState.ACTIVE
        return self

    @_annotate
    def activate(self) -> None:
        """Make the backend ready for ``infer``: INACTIVE or CHECKPOINT_LOADED -> ACTIVE."""
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Cannot activate backend {self.name}, backend should be built first")
        if self.state == BackendState.DEPLOYED:
            raise RuntimeError(f"Cannot activate backend {self.name}, backend is already deployed")
        if self.state in (BackendState.INACTIVE, BackendState.CHECKPOINT_LOADED):
            self._activate()
            compiled = self._compiled
            if compiled is not None and not compiled.ready and not compiled.load(self._device):
                compiled.compile_at_start(self._module, self._graph_spec)
            self.state = BackendState.ACTIVE

    @_annotate
    def deactivate(self) -> None:
        """Release the backend's device memory: ACTIVE -> INACTIVE."""
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Cannot deactivate backend {self.name}, backend should be built first")
        if self.state == BackendState.DEPLOYED:
            raise RuntimeError(f"Cannot deactivate backend {self.name}, backend is already deployed")
        if self.state == BackendState.CHECKPOINT_LOADED:
            raise RuntimeError(
                f"Cannot deactivate backend {self.name}, backend is loaded from a checkpoint: "
                "deploy or activate it first"
            )
        if self.state == BackendState.ACTIVE:
            self._deactivate()
            if self._compiled is not None:
                self._compiled.release()
            self._clean_memory()
            self.state = BackendState.INACTIVE

    @_annotate
    def deploy(self, device: torch.device | str | None) -> None:
        """Deploy a loaded checkpoint on ``device``: CHECKPOINT_LOADED -> DEPLOYED.

        ``None`` deploys on the device the backend was built on. Raises ValueError for a
        device that does not exist or cannot run this backend.
        """
        if self.state != BackendState.CHECKPOINT_LOADED:
            raise RuntimeError(
                f"Cannot deploy backend {self.name}, backend should be loaded from a checkpoint"
            )
        target = self.check_device(self._device if device is None else device)
        compiled = self._compiled
        if compiled is not None and compiled.load(target, keep_package=False):
            # The package holds its own (compiled) weights: the module's would be a second copy.
            self._release_weights()
        else:
            self._deploy(target)
            if compiled is not None:
                compiled.compile_at_start(self._module, self._graph_spec)
        self._device = target
        self.state = BackendState.DEPLOYED

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backend's module on the given inputs (ACTIVE or DEPLOYED only)."""
        if not self.is_active:
            raise RuntimeError(f"Cannot run inference, backend {self.name} should be activated first")
        with _INFER_RANGE, torch.inference_mode():
            return self._infer(*args, **kwargs)

    # -- checkpoint ---------------------------------------------------------------------------
    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The backend's state: only tensors, numbers, strings, lists, dicts, torch.device.

        ``torch.save`` writes it and ``torch.load(..., weights_only=True)`` reads it back.
        """

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> "Backend":
        """A backend in CHECKPOINT_LOADED made from ``to_dict()``'s output and a fresh module."""

    def key(self) -> str:
        """A key that names this backend and configuration, stable across processes."""
        return f"{self.name}_{self._config.key()}"

    def describe(self) -> str:
        """A short, human-readable description: the class and the non-default config."""
        return f"{self.name}({self._config.describe()})"

    @property
    def graph_spec(self) -> GraphSpec:
        """The inputs and outputs the backend was built for."""
        return self._graph_spec

    @property
    def samples(self) -> list[Sample]:
        """The samples the backend was built with (kept in the checkpoint for warm-up)."""
        return self._data

    # -- helpers for subclasses ---------------------------------------------------------------
    def _common_state(self) -> dict[str, Any]:
        """The part of ``to_dict()`` that every backend writes."""
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Backend {self.name} has not been built: call build() first")
        if self._module is None and self.state == BackendState.DEPLOYED:
            raise RuntimeError(f"Backend {self.name} was deployed from its AOTInductor package and keeps no "
                               "weights of its own: save the checkpoint before deploying")
        return {
            self.STATE_TYPE: self.name,
            self.STATE_FORMAT_VERSION: self.FORMAT_VERSION,
            "config": self._config.to_dict(),
            "device": self._device,
            "graph_spec": self._graph_spec.to_dict(),
            "data": [sample.to_state() for sample in self._data],
            "versions": library_versions(),
            "compiled": self._compiled.to_state() if self._compiled is not None else None,
        }

    @classmethod
    def _check_state(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> None:
        """Raise ValueError unless ``state_dict`` was written by this backend class."""
        if state_dict.get(cls.STATE_TYPE) != cls.__name__:
            raise ValueError(
                f"Checkpoint holds a {state_dict.get(cls.STATE_TYPE)!r} backend, "
                f"expected {cls.__name__!r}"
            )
        if state_dict.get(cls.STATE_FORMAT_VERSION) != cls.FORMAT_VERSION:
            raise ValueError(
                f"Checkpoint format version {state_dict.get(cls.STATE_FORMAT_VERSION)!r} is not "
                f"supported (this aitune_core reads version {cls.FORMAT_VERSION}): re-archive the model"
            )
        if module is None:
            raise ValueError("A module is required to create a backend from a checkpoint")

    def _restore_common(self, state_dict: dict[str, Any]) -> None:
        self._device = torch.device(state_dict["device"])
        self._graph_spec = GraphSpec.from_dict(state_dict["graph_spec"])
        self._data = [Sample.from_state(sample) for sample in state_dict["data"]]
        settings = self.compile_settings
        if settings is not None:
            self._compiled = CompiledModule.from_state(settings, state_dict.get("compiled"))
        self.state = BackendState.CHECKPOINT_LOADED

    def check_device(self, device: torch.device | str) -> torch.device:
        """``device`` as a torch.device; UnsupportedDeviceError (a ValueError) when it is not here
        or cannot run this backend, with what it needs."""
        target = parse_device(device)
        check_device_exists(target)
        self._check_device(target)
        return target

    def _check_device(self, device: torch.device) -> None:
        """Raise ValueError when this backend cannot run on ``device`` (default: any device)."""

    def _clean_memory(self) -> None:
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @abc.abstractmethod
    def _build(
        self,
        module: torch.nn.Module,
        graph_spec: GraphSpec,
        data: list[Sample],
        device: torch.device,
        cache_dir: Path | None,
    ) -> None:
        """Make ``self._module`` from ``module`` on ``device``; must not run a sample twice."""

    # The default steps suit a backend whose product is one runnable module in self._module.
    def _activate(self) -> None:
        self._module.to(self._device)

    def _deactivate(self) -> None:
        self._module.to("cpu")

    def _deploy(self, device: torch.device) -> None:
        self._module.to(device)

    def _release_weights(self) -> None:
        self._module = None

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        device = self._device
        if device.type != "cpu":  # requests are decoded on the CPU; walking them costs ~20 us
            args = map_tensors(args, lambda t: t.to(device))
            kwargs = map_tensors(kwargs, lambda t: t.to(device))
        return (self._module if self._compiled is None else self._compiled)(*args, **kwargs)


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose formats a checkpoint depends on (torchao when it is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": str(torch.__version__)}
    try:
        versions["torchao"] = version("torchao")
    except PackageNotFoundError:
        pass
    return versions
