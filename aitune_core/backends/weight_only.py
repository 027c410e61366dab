"""WeightOnlyBackend: the module's Linear layers in int8 or int4, multiplied by this project's CPU kernels.

Decoding a token reads every weight once, so int8 weights should make it up to 4x faster than fp32 and
int4 up to 8x; torch's own CPU weight-only kernels read their weights far slower than the memory allows
(docs/generate.md, "Kernels"). This backend swaps each ``nn.Linear`` for a layer of ``aitune_core.kernels``
at build time: plain int8 / uint8 tensors and fp32 scales in the checkpoint (``weights_only``-safe, no
torchao), the products through the ``aitune::`` custom ops (kept as calls by torch.compile and AOTInductor).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend, BackendConfig
from aitune_core.compilation import CompileSettings
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.kernels.layers import FORMATS, Int8Linear, swap_linears
from aitune_core.kernels.ops import kernel_max_rows
from aitune_core.kernels.quantize import INT4_GROUP_SIZES
from aitune_core.modules import load_weights, module_on

logger = logging.getLogger(__name__)
# --quantization's words for the two formats (the tuner's candidates add "-cpu": int8wo-cpu, int4wo-cpu).
WEIGHT_FORMATS = {"int8wo": "int8", "int4wo": "int4"}


def weight_format_for(quantization: str) -> str:
    """The weight format of ``--backend weight-only --quantization NAME``; ValueError for another name."""
    if quantization not in WEIGHT_FORMATS:
        raise ValueError(f"The weight-only backend takes --quantization {' or '.join(WEIGHT_FORMATS)}, "
                         f"got {quantization!r}")
    return WEIGHT_FORMATS[quantization]


@dataclasses.dataclass
class WeightOnlyBackendConfig(BackendConfig):
    """``weight_format``: "int8" (one scale per output feature) or "int4" (a scale and an offset per
    ``group_size`` inputs); ``compile`` as TorchCompileBackend's (AOTInductor at archive time unless
    ``ahead_of_time=False``); ``skip_modules``: Linear layers left in float."""

    weight_format: str = "int8"
    group_size: int = 128
    compile: bool = False
    freezing: bool = True
    ahead_of_time: bool = True
    skip_modules: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.weight_format not in FORMATS:
            raise ValueError(f"weight_format must be one of {', '.join(FORMATS)}, got {self.weight_format!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {self.group_size}")
        self.skip_modules = sorted(self.skip_modules)

    def compile_settings(self) -> CompileSettings | None:
        if not self.compile:
            return None
        return CompileSettings(freezing=self.freezing, ahead_of_time=self.ahead_of_time)


class WeightOnlyBackend(Backend):
    """Runs the module with its Linear layers in int8 or int4 (``aitune_core.kernels``)."""

    config_class = WeightOnlyBackendConfig
    USES_CPU_KERNELS = True

    def __init__(self, config: WeightOnlyBackendConfig | None = None) -> None:
        super().__init__(config or WeightOnlyBackendConfig())
        self._module: torch.nn.Module | None = None

    def _swap(self, module: torch.nn.Module, quantize: bool) -> torch.nn.Module:
        config = self._config
        unknown = sorted(set(config.skip_modules) - dict(module.named_modules()).keys())
        if unknown:
            raise ValueError(f"skip_modules names no module of {type(module).__name__}: {', '.join(unknown)}")
        swapped = swap_linears(module, config.weight_format, config.group_size, set(config.skip_modules), quantize)
        if quantize and not swapped:
            logger.warning("%s quantized no layer of %s: it has no nn.Linear", self.describe(),
                           type(module).__name__)
        return module

    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample],
               device: torch.device, cache_dir: Path | None) -> None:
        self._module = _amx_layout(self._swap(module_on(module, device), quantize=True))

    def _deploy(self, device: torch.device) -> None:
        super()._deploy(device)
        _amx_layout(self._module)

    def deploy(self, device: torch.device | str | None) -> None:
        """As ``Backend.deploy``; on a CPU it also loads the kernels' build and registers it as the ops' CPU
        implementation now, before requests (and the threads that serve them) arrive, not inside a first product."""
        super().deploy(device)
        if self._device.type == "cpu":
            kernel_max_rows()

    def to_dict(self) -> dict[str, Any]:
        """Common state plus the swapped module's state_dict (int8 / uint8 weights, fp32 scales)."""
        return {**self._common_state(), "weights": self._module.state_dict()}

    @classmethod
    def from_dict(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> "WeightOnlyBackend":
        """Swap ``module``'s layers for empty ones of the same shapes and load the stored weights: CHECKPOINT_LOADED."""
        cls._check_state(module, state_dict)
        backend = cls(WeightOnlyBackendConfig.from_dict(state_dict["config"]))
        module = backend._swap(module, quantize=False)
        load_weights(module, state_dict["weights"], assign=False)
        backend._module = module
        backend._restore_common(state_dict)
        return backend


def _amx_layout(module: torch.nn.Module) -> torch.nn.Module:
    """The module's int8 layers in the AMX layout where this CPU runs AMX tiles (a compiled graph, or an AOTInductor
    package built here, then holds them so; a package only loads on a CPU with the same features)."""
    layers = [layer for layer in module.modules() if isinstance(layer, Int8Linear)]
    packed = sum(layer.use_amx_layout() for layer in layers)
    if packed:
        logger.info("%d of %d int8 layers in the AMX layout", packed, len(layers))
    return module
