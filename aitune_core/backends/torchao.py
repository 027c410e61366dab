"""TorchAOBackend: quantize a module's Linear layers with torchao.

By default the checkpoint stores the quantized weights (torchao tensor subclasses), so a worker
start loads them and does not quantize again. ``checkpoint_weights="original"`` keeps the
seed's behaviour: store the original weights and quantize at deploy, which survives a change
of torchao version.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torchao
from torchao.core import config as torchao_config
from torchao.core.config import AOBaseConfig, config_from_dict, config_to_dict
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

from aitune_core.backend import Backend, BackendConfig, BackendState, changed_fields
from aitune_core.compilation import CompileSettings
from aitune_core.devices import cuda_capability
from aitune_core.errors import CheckpointError, UnsupportedDeviceError
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.modules import load_weights, module_on
from aitune_core.precision import check_precision, with_precision

logger = logging.getLogger(__name__)

QUANTIZATIONS: dict[str, type[AOBaseConfig]] = {
    "int8wo": Int8WeightOnlyConfig,
    "int8dq": Int8DynamicActivationInt8WeightConfig,
    "fp8wo": Float8WeightOnlyConfig,
    "fp8dq": Float8DynamicActivationFloat8WeightConfig,
    # torchao 0.18's int4 weight-only kernel for CPUs (torch._weight_int4pack_mm_for_cpu); a build on a
    # CUDA GPU takes Int4WeightOnlyConfig's tile-packed format instead (config_for_device).
    "int4wo": PrototypeInt4WeightOnlyConfig,
}
INT4_CPU_MODULE = "torchao.prototype.quantization.int4"
INT4_CPU_OUT_TILE = 16
DEFAULT_QUANTIZATION = "int8wo"
CHECKPOINT_WEIGHTS = ("quantized", "original")
# fp8 matmuls with dynamically quantized activations need Ada/Hopper tensor cores.
FP8_DYNAMIC_MIN_CAPABILITY = (8, 9)


def quantization_config_for(name: str) -> AOBaseConfig:
    """The torchao config behind a short name (int8wo, int4wo, int8dq, fp8wo, fp8dq)."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {name!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]()


def quantization_name(config: AOBaseConfig) -> str:
    """The short name when ``config`` is one of the presets as it is, else its class name."""
    for name, config_class in QUANTIZATIONS.items():
        if type(config) is config_class and config == config_class():
            return name
    return type(config).__name__


@dataclasses.dataclass
class TorchAOBackendConfig(BackendConfig):
    """Which torchao quantization to apply: a short name or any torchao ``AOBaseConfig``.

    Exactly one of ``quantization`` and ``quantization_config`` must be given.
    ``checkpoint_weights`` says what ``to_dict`` stores: "quantized" weights (loads fast) or
    "original" weights (quantized again at deploy; portable across torchao versions).
    ``compile`` compiles the quantized module with inductor: ahead of time (AOTInductor, at archive
    time) unless ``ahead_of_time=False``, with ``freezing`` (weights folded into the graph).
    ``precision`` ("bf16", "fp16") casts the module's float weights and math before quantizing.
    ``skip_modules`` names modules (as ``model.named_modules()`` does) left unquantized: the tuner keeps
    the layers whose quantization costs the most accuracy in float when that is what passes its gate.
    """

    quantization: str | None = None
    quantization_config: AOBaseConfig | None = None
    checkpoint_weights: str = "quantized"
    compile: bool = False
    precision: str | None = None
    freezing: bool = True
    ahead_of_time: bool = True
    skip_modules: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        self.skip_modules = sorted(self.skip_modules)
        if self.quantization is not None and self.quantization_config is not None:
            raise ValueError("Only one of quantization or quantization_config should be provided.")
        if self.quantization is None and self.quantization_config is None:
            raise ValueError("Either quantization or quantization_config should be provided.")
        if self.checkpoint_weights not in CHECKPOINT_WEIGHTS:
            raise ValueError(
                f"checkpoint_weights must be one of {', '.join(CHECKPOINT_WEIGHTS)}, "
                f"got {self.checkpoint_weights!r}"
            )
        if self.quantization_config is None:
            self.quantization_config = quantization_config_for(self.quantization)
        elif not isinstance(self.quantization_config, AOBaseConfig):
            raise ValueError(
                "quantization_config must be a torchao AOBaseConfig, "
                f"got {type(self.quantization_config).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the torchao config through ``config_to_dict``; the short name is not kept."""
        return {
            "quantization_config": config_to_dict(self.quantization_config),
            "checkpoint_weights": self.checkpoint_weights,
            "compile": self.compile,
            "precision": self.precision,
            "freezing": self.freezing,
            "ahead_of_time": self.ahead_of_time,
            "skip_modules": list(self.skip_modules),
        }

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "TorchAOBackendConfig":
        """Rebuild from ``to_dict()`` through torchao's ``config_from_dict`` (no pickle)."""
        defaults = cls(quantization=DEFAULT_QUANTIZATION)
        return cls(
            quantization_config=load_torchao_config(config_dict["quantization_config"]),
            **{name: config_dict.get(name, getattr(defaults, name))
               for name in ("checkpoint_weights", "compile", "precision", "freezing", "ahead_of_time",
                            "skip_modules")},
        )

    def describe(self) -> str:
        """``quantization_config=Cls(changed fields)``, then the other fields that differ from their defaults."""
        quant = self.quantization_config
        text = f"quantization_config={type(quant).__name__}({','.join(changed_fields(quant))})"
        defaults = type(self)(quantization=DEFAULT_QUANTIZATION)
        names = ["checkpoint_weights", "precision", "compile"] + (["freezing", "ahead_of_time"] if self.compile else [])
        for name in names:
            if getattr(self, name) != getattr(defaults, name):
                text += f",{name}={getattr(self, name)!r}"
        if self.skip_modules:  # the names are in to_dict(); a count keeps log lines readable
            text += f",skip_modules=<{len(self.skip_modules)} modules kept in float>"
        return text

    def compile_settings(self) -> CompileSettings | None:
        if not self.compile:
            return None
        return CompileSettings(freezing=self.freezing, ahead_of_time=self.ahead_of_time)


def load_torchao_config(config_dict: dict[str, Any]) -> AOBaseConfig:
    """torchao's ``config_from_dict``, looking in torchao.quantization first.

    torchao 0.18 searches a *set* of modules, so the order changes with each process's hash
    seed; when ``torchao.prototype.parq`` comes first it imports transformers (~2 s on a worker
    start) before finding a class that torchao.quantization has. torchao's CPU int4 config
    (int4wo here) lives in a prototype module its list does not name: it is added.
    """
    original = torchao_config.ALLOWED_AO_MODULES
    allowed = set(original) | {INT4_CPU_MODULE}
    torchao_config.ALLOWED_AO_MODULES = sorted(allowed, key=lambda name: ("prototype" in name, name))
    try:
        return config_from_dict(config_dict)
    finally:
        torchao_config.ALLOWED_AO_MODULES = original


def config_for_device(config: AOBaseConfig, device: torch.device, precision: str | None) -> AOBaseConfig:
    """The config a build on ``device`` quantizes with: int4wo names torchao's int4 weight-only kernel for the
    device, the CPU one (``_weight_int4pack_mm_for_cpu``) or, on a CUDA GPU, ``Int4WeightOnlyConfig``'s
    tile-packed format (tinygemm), which takes bf16 only (UnsupportedDeviceError without ``--precision bf16``)."""
    if not isinstance(config, PrototypeInt4WeightOnlyConfig) or torch.device(device).type != "cuda":
        return config
    if precision != "bf16":
        raise UnsupportedDeviceError(
            f"Quantization int4wo on {device} is torchao's CUDA int4 kernel (tinygemm), which takes bf16 only: "
            "add --precision bf16"
        )
    return Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def check_device_can_run(config: AOBaseConfig, device: torch.device) -> None:
    """UnsupportedDeviceError when ``device`` cannot run ``config``, with what it needs."""
    if isinstance(config, PrototypeInt4WeightOnlyConfig) and torch.device(device).type != "cpu":
        raise UnsupportedDeviceError(
            f"Quantization int4wo (torchao's CPU int4 kernel, {type(config).__name__}) cannot run on {device}: "
            "its weights are packed for a CPU; archive it on the GPU (--device cuda:N --precision bf16) for "
            "torchao's CUDA int4 kernel"
        )
    if not isinstance(config, Float8DynamicActivationFloat8WeightConfig):
        return
    capability = cuda_capability(device)
    if capability is None or capability < FP8_DYNAMIC_MIN_CAPABILITY:
        found = "not a CUDA GPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        raise UnsupportedDeviceError(
            f"Quantization {quantization_name(config)} ({type(config).__name__}) cannot run on {device} "
            f"({found}): it needs a CUDA GPU with compute capability >= 8.9 (e.g. L4, L40S, H100); "
            "use int8wo, int8dq or fp8wo here"
        )


def check_torchao_compatible(written_by: str) -> None:
    """CheckpointError unless quantized weights written by torchao ``written_by`` load here."""
    if written_by.split(".")[:2] != torchao.__version__.split(".")[:2]:
        raise CheckpointError(
            f"The checkpoint holds quantized weights written by torchao {written_by}, but this worker "
            f"has torchao {torchao.__version__}: re-archive the model with this torchao, or archive it "
            "with --checkpoint-weights original to quantize at start-up instead"
        )


def kernel_cannot_take(config: AOBaseConfig, layer: torch.nn.Linear) -> str | None:
    """Why torchao's kernel for ``config`` cannot take ``layer``'s shape, or None when it can."""
    if not isinstance(config, (PrototypeInt4WeightOnlyConfig, Int4WeightOnlyConfig)):
        return None
    # torch's CPU int4 packing: output features in tiles of 16, input features in whole groups.
    if layer.out_features % INT4_CPU_OUT_TILE or layer.in_features % config.group_size:
        return (f"int4wo needs out_features divisible by {INT4_CPU_OUT_TILE} and in_features by the group size "
                f"{config.group_size}, it has {layer.out_features} x {layer.in_features}")
    return None


def _linear_filter(config: AOBaseConfig, skipped: set[str]):
    """quantize_'s filter: every nn.Linear not in ``skipped`` whose shape the config's kernel takes (the others
    stay in float, logged)."""
    def filter_fn(child: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(child, torch.nn.Linear) or fqn in skipped:
            return False
        reason = kernel_cannot_take(config, child)
        if reason is not None:
            logger.warning("%s stays in float: %s", fqn, reason)
        return reason is None
    return filter_fn


class TorchAOBackend(Backend):
    """Backend that quantizes a module with torchao (int8wo, int4wo, int8dq, fp8wo, fp8dq or any config)."""

    REQUIRES = ("torchao",)

    def __init__(self, config: TorchAOBackendConfig | None = None) -> None:
        super().__init__(config or TorchAOBackendConfig(quantization=DEFAULT_QUANTIZATION))
        self._module: torch.nn.Module | None = None
        # The unquantized module, held only while the original weights are still needed.
        self._orig_module: torch.nn.Module | None = None

    def _check_device(self, device: torch.device) -> None:
        config = self._config.quantization_config
        if self.state == BackendState.INIT:  # a build takes the device's own int4 kernel (config_for_device)
            config = config_for_device(config, device, self._config.precision)
        check_device_can_run(config, device)

    def _quantize(self, module: torch.nn.Module) -> torch.nn.Module:
        """Quantize ``module`` (already on the target device) in place, but for ``skip_modules``, and return it."""
        before = {name: type(p) for name, p in module.named_parameters()}
        skipped: set[str] = set()
        if self._config.skip_modules:
            # Names are the user's module's; a precision wrapper puts that module under "module.".
            prefix = "module." if self._config.precision else ""
            skipped = {prefix + name for name in self._config.skip_modules}
            unknown = sorted(skipped - dict(module.named_modules()).keys())
            if unknown:
                raise ValueError(f"skip_modules names no module of {type(module).__name__}: {', '.join(unknown)}")
        config = self._config.quantization_config
        quantize_(module, config, filter_fn=_linear_filter(config, skipped))
        changed = sum(type(p) is not before.get(name) for name, p in module.named_parameters())
        if changed == 0:
            logger.warning("%s quantized no weight of %s: it has no layer torchao converts (nn.Linear)",
                           self.describe(), type(module).__name__)
        return module

    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample],
               device: torch.device, cache_dir: Path | None) -> None:
        precision, outputs = self._config.precision, graph_spec.outputs
        self._config.quantization_config = config_for_device(self._config.quantization_config, device, precision)
        if self._config.checkpoint_weights == "original":
            self._orig_module = with_precision(module_on(module, torch.device("cpu")), precision, outputs)
        self._module = self._quantize(with_precision(module_on(module, device), precision, outputs))

    def _activate(self) -> None:
        if self._module is None:
            self._deploy(self._device)
        else:
            super()._activate()

    def _deploy(self, device: torch.device) -> None:
        if self._module is None:
            # Re-quantize mode: the loaded module is ours, so it is quantized in place.
            self._module = self._quantize(self._orig_module.to(device))
            self._orig_module = None
        else:
            self._module.to(device)

    def _release_weights(self) -> None:
        self._module = self._orig_module = None

    def to_dict(self) -> dict[str, Any]:
        """Common state plus the quantized weights, or the original ones in re-quantize mode."""
        state = self._common_state()
        if self._config.checkpoint_weights == "quantized":
            weights = self._module.state_dict()
        elif self._orig_module is not None:
            weights = self._orig_module.state_dict()
        else:
            raise RuntimeError(
                f"Backend {self.name} in re-quantize mode no longer holds the original weights "
                "(they were quantized in place at deploy): save the checkpoint before deploying"
            )
        return {**state, "weights": weights}

    @classmethod
    def from_dict(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> "TorchAOBackend":
        """Load a checkpoint into ``module``: CHECKPOINT_LOADED.

        Quantized weights are assigned as they are (no re-quantization) and must come from a
        compatible torchao; original weights are quantized later, at deploy or activate.
        """
        cls._check_state(module, state_dict)
        config = TorchAOBackendConfig.from_dict(state_dict["config"])
        backend = cls(config)
        module = with_precision(module, config.precision, state_dict["graph_spec"]["outputs"])
        if config.checkpoint_weights == "quantized":
            check_torchao_compatible(state_dict["versions"]["torchao"])
            module.requires_grad_(False)
            load_weights(module, state_dict["weights"], assign=True)
            backend._module = module
        else:
            load_weights(module, state_dict["weights"], assign=False)
            backend._orig_module = module
        backend._restore_common(state_dict)
        return backend
