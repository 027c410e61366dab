"""TorchCompileBackend: the module through torch.compile (inductor), compiled where it runs.

Compiled code is not portable across machines, so the checkpoint stores the original weights (as
the eager backend does) and the worker compiles at deploy; inductor's on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``, which the worker points into the model folder) makes a restarted
worker reuse what the first one compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from aitune_core.backend import BackendConfig
from aitune_core.backends.eager import TorchEagerBackend
from aitune_core.graph_spec import GraphSpec, Sample

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_module(module: torch.nn.Module, mode: str) -> Callable[..., Any]:
    """``torch.compile`` with automatic dynamic shapes: a dim that changes is recompiled once as dynamic."""
    return torch.compile(module, mode=mode, dynamic=None)


@dataclasses.dataclass
class TorchCompileBackendConfig(BackendConfig):
    """``mode`` is torch.compile's mode."""

    mode: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"Unknown torch.compile mode {self.mode!r}: expected one of {', '.join(COMPILE_MODES)}")


class TorchCompileBackend(TorchEagerBackend):
    """Runs ``torch.compile(module)`` in eval mode on the chosen device."""

    config_class = TorchCompileBackendConfig

    @property
    def compiles(self) -> bool:
        return True

    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample],
               device: torch.device, cache_dir: Path | None) -> None:
        super()._build(module, graph_spec, data, device, cache_dir)
        self._compiled = compile_module(self._module, self._config.mode)

    def _deploy(self, device: torch.device) -> None:
        super()._deploy(device)
        self._compiled = compile_module(self._module, self._config.mode)

    def _activate(self) -> None:
        if self._compiled is None:  # from a checkpoint: compile on the build device
            self._deploy(self._device)
        else:
            super()._activate()
