"""TorchEagerBackend: the original module, unchanged (or in bf16/fp16 inside). The baseline for accuracy and speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend, BackendConfig
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.modules import load_weights, module_on
from aitune_core.precision import check_precision, with_precision


@dataclasses.dataclass
class TorchEagerBackendConfig(BackendConfig):
    """``precision``: "bf16" or "fp16" runs the module's float math in that dtype (None: its own dtypes)."""

    precision: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)


class TorchEagerBackend(Backend):
    """Runs the module as it is, in eval mode, on the chosen device."""

    config_class: type[BackendConfig] = TorchEagerBackendConfig

    def __init__(self, config: BackendConfig | None = None) -> None:
        super().__init__(config or self.config_class())
        self._module: torch.nn.Module | None = None

    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample],
               device: torch.device, cache_dir: Path | None) -> None:
        self._module = with_precision(module_on(module, device), self._config.precision, graph_spec.outputs)

    def to_dict(self) -> dict[str, Any]:
        """Common state plus the module's state_dict."""
        return {**self._common_state(), "weights": self._module.state_dict()}

    @classmethod
    def from_dict(cls, module: torch.nn.Module | None, state_dict: dict[str, Any]) -> "TorchEagerBackend":
        """Load the stored weights into ``module``: CHECKPOINT_LOADED."""
        cls._check_state(module, state_dict)
        backend = cls(cls.config_class.from_dict(state_dict["config"]))
        module = with_precision(module, backend.config.precision, state_dict["graph_spec"]["outputs"])
        load_weights(module, state_dict["weights"], assign=False)
        backend._module = module.eval()
        backend._restore_common(state_dict)
        return backend
