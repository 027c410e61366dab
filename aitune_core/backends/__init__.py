"""The backends, by the name the CLI and the checkpoint use."""

from __future__ import annotations

from typing import Any

from aitune_core.backend import Backend
from aitune_core.backends.compile import TorchCompileBackend, TorchCompileBackendConfig
from aitune_core.backends.eager import TorchEagerBackend, TorchEagerBackendConfig
from aitune_core.backends.torchao import QUANTIZATIONS, TorchAOBackend, TorchAOBackendConfig, quantization_name

BACKENDS: dict[str, type[Backend]] = {"eager": TorchEagerBackend, "compile": TorchCompileBackend,
                                      "torchao": TorchAOBackend}


def make_backend(name: str, quantization: str | None = None, checkpoint_weights: str = "quantized",
                 compile: bool = False) -> Backend:
    """A fresh backend (INIT) from the CLI's words: ``eager``, ``compile`` or ``torchao`` + a quantization.

    ``compile`` runs torchao's quantized module through torch.compile.
    """
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name != "torchao":
        if quantization is not None:
            raise ValueError(f"The {name} backend does not quantize; got quantization {quantization!r}")
        return TorchCompileBackend() if name == "compile" or compile else TorchEagerBackend()
    return TorchAOBackend(TorchAOBackendConfig(quantization=quantization or "int8wo",
                                               checkpoint_weights=checkpoint_weights, compile=compile))


def quantization_of(backend: Backend) -> str | None:
    """The backend's quantization (int8wo, ..., or a torchao config's class name); None when it has none."""
    if isinstance(backend, TorchAOBackend):
        return quantization_name(backend.config.quantization_config)
    return None


def backend_from_dict(module: Any, state_dict: dict[str, Any]) -> Backend:
    """``from_dict`` of whichever backend class wrote ``state_dict``."""
    by_class = {cls.__name__: cls for cls in BACKENDS.values()}
    written_by = state_dict.get(Backend.STATE_TYPE)
    if written_by not in by_class:
        raise ValueError(f"Checkpoint holds an unknown backend {written_by!r}: expected one of {', '.join(by_class)}")
    return by_class[written_by].from_dict(module, state_dict)


__all__ = ["BACKENDS", "QUANTIZATIONS", "TorchAOBackend", "TorchAOBackendConfig", "TorchCompileBackend",
           "TorchCompileBackendConfig", "TorchEagerBackend", "TorchEagerBackendConfig", "backend_from_dict",
           "make_backend", "quantization_of"]
