"""TorchCompileBackend: the module through torch.compile (inductor), compiled where it runs.

Compiled code is not portable across machines, so the checkpoint stores the original weights and
the worker compiles at deploy; inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, which the
worker points into the model folder) makes a restarted worker reuse what the first one compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from aitune_core.backend import Backend, BackendConfig
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.modules import load_weights, module_on

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_module(module: torch.nn.Module, mode: str) -> Callable[..., Any]:
    """``torch.compile`` with automatic dynamic shapes: a dim that changes is recompiled once as dynamic."""
    return torch.compile(module, mode=mode, dynamic=None)


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown torch.compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")


@dataclasses.dataclass
class TorchCompileBackendConfig(BackendConfig):
    """``mode`` is torch.compile's mode."""

    mode: str = "default"

    def __post_init__(self) -> None:
        check_compile_mode(self.mode)


class TorchCompileBackend(Backend):
    """Runs ``torch.compile(module)`` in eval mode on the chosen device."""

    def __init__(self, config: TorchCompileBackendConfig | None = None) -> None:
        super().__init__(config or TorchCompileBackendConfig())
        self._module: torch.nn.Module | None = None

    @property
    def compiles(self) -> bool:
        return True

    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample],
               device: torch.device, cache_dir: Path | None) -> None:
        self._module = module_on(module, device)
        self._compiled = compile_module(self._module, self._config.mode)

    def _deploy(self, device: torch.device) -> None:
        self._module.to(device)
        self._compiled = compile_module(self._module, self._config.mode)

    def _activate(self) -> None:
        if self._compiled is None:
            self._deploy(self._device)
        else:
            super()._activate()

    def to_dict(self) -> dict[str, Any]:
        """Common state plus the original weights (compiled code is made again where it runs)."""
        return {**self._common_state(), "weights": self._module.state_dict()}

    @classmethod
    def from_dict(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> "TorchCompileBackend":
        """Load the stored weights into ``module``: CHECKPOINT_LOADED; compiled at deploy or activate."""
        cls._check_state(module, state_dict)
        backend = cls(TorchCompileBackendConfig.from_dict(state_dict["config"]))
        load_weights(module, state_dict["weights"], assign=False)
        backend._module = module
        backend._restore_common(state_dict)
        return backend
