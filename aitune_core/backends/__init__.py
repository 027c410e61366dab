"""The backends, by the name the CLI and the checkpoint use.

Backend classes are imported on first use: a worker whose archive needs no torchao never imports it
(``import torchao`` alone costs seconds and ~100 MB of a worker's memory).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from aitune_core.backend import Backend

# CLI name -> class name; class name -> the module that defines it.
BACKEND_NAMES = {"eager": "TorchEagerBackend", "compile": "TorchCompileBackend", "torchao": "TorchAOBackend",
                 "weight-only": "WeightOnlyBackend"}
BACKEND_MODULES = {"TorchEagerBackend": "aitune_core.backends.eager",
                   "TorchCompileBackend": "aitune_core.backends.compile",
                   "TorchAOBackend": "aitune_core.backends.torchao",
                   "WeightOnlyBackend": "aitune_core.backends.weight_only"}
# Names this package gives on first use: each backend class, its config class, torchao's QUANTIZATIONS.
_LAZY = {**BACKEND_MODULES, **{f"{name}Config": module for name, module in BACKEND_MODULES.items()},
         "QUANTIZATIONS": BACKEND_MODULES["TorchAOBackend"]}


def backend_class(class_name: str) -> type[Backend]:
    """The backend class called ``class_name`` (imports its module); ValueError for an unknown one."""
    if class_name not in BACKEND_MODULES:
        raise ValueError(f"Checkpoint holds an unknown backend {class_name!r}: expected one of {', '.join(BACKEND_MODULES)}")
    return getattr(importlib.import_module(BACKEND_MODULES[class_name]), class_name)


def make_backend(name: str, quantization: str | None = None, checkpoint_weights: str = "quantized",
                 compile: bool = False, precision: str | None = None, ahead_of_time: bool = True) -> Backend:
    """A fresh backend (INIT) from the CLI's words: ``eager``, ``compile``, ``torchao`` + a quantization, or
    ``weight-only`` + int8wo / int4wo (this project's CPU kernels).

    ``compile`` compiles the module (torchao's quantized one too); ``precision`` runs it in bf16/fp16.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Unknown backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}")
    if name == "weight-only":
        from aitune_core.backends.weight_only import WeightOnlyBackend, WeightOnlyBackendConfig, weight_format_for

        if precision is not None:
            raise ValueError(f"The weight-only backend runs in fp32; got precision {precision!r}")
        return WeightOnlyBackend(WeightOnlyBackendConfig(weight_format=weight_format_for(quantization or "int8wo"),
                                                         compile=compile, ahead_of_time=ahead_of_time))
    if name != "torchao":
        if quantization is not None:
            raise ValueError(f"The {name} backend does not quantize; got quantization {quantization!r}")
        if name == "compile" or compile:
            from aitune_core.backends.compile import TorchCompileBackend, TorchCompileBackendConfig

            return TorchCompileBackend(TorchCompileBackendConfig(precision=precision, ahead_of_time=ahead_of_time))
        from aitune_core.backends.eager import TorchEagerBackend, TorchEagerBackendConfig

        return TorchEagerBackend(TorchEagerBackendConfig(precision=precision))
    from aitune_core.backends.torchao import TorchAOBackend, TorchAOBackendConfig

    return TorchAOBackend(TorchAOBackendConfig(quantization=quantization or "int8wo",
                                               checkpoint_weights=checkpoint_weights, compile=compile,
                                               precision=precision, ahead_of_time=ahead_of_time))


def quantization_of(backend: Backend) -> str | None:
    """The backend's quantization (int8wo, ..., or a torchao config's class name); None when it has none."""
    torchao_backends = sys.modules.get("aitune_core.backends.torchao")  # not imported: not a TorchAOBackend
    if torchao_backends is not None and isinstance(backend, torchao_backends.TorchAOBackend):
        return torchao_backends.quantization_name(backend.config.quantization_config)
    weight_only = sys.modules.get("aitune_core.backends.weight_only")
    if weight_only is not None and isinstance(backend, weight_only.WeightOnlyBackend):
        return f"{backend.config.weight_format}wo"
    return None


def backend_from_dict(module: Any, state_dict: dict[str, Any]) -> Backend:
    """``from_dict`` of whichever backend class wrote ``state_dict``."""
    return backend_class(state_dict.get(Backend.STATE_TYPE)).from_dict(module, state_dict)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'aitune_core.backends' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["BACKEND_MODULES", "BACKEND_NAMES", "backend_class", "backend_from_dict", "make_backend",
           "quantization_of", *_LAZY]
