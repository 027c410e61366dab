"""aitune_core: an AITune-style backend state machine (eager, torchao) for TorchServe workers.

Names are imported on first use, so ``aitune_core.cli`` can set up logging before torch and
torchao are imported.
"""

import importlib

_EXPORTS = {
    "Backend": "aitune_core.backend",
    "BackendConfig": "aitune_core.backend",
    "BackendState": "aitune_core.backend",
    "TorchAOBackend": "aitune_core.backends.torchao",
    "TorchAOBackendConfig": "aitune_core.backends.torchao",
    "TorchEagerBackend": "aitune_core.backends.eager",
    "TorchEagerBackendConfig": "aitune_core.backends.eager",
    "GraphSpec": "aitune_core.graph_spec",
    "Sample": "aitune_core.graph_spec",
    "AITuneError": "aitune_core.errors",
    "ArchiveError": "aitune_core.errors",
    "BadRequestError": "aitune_core.errors",
    "CheckpointError": "aitune_core.errors",
    "UnsupportedDeviceError": "aitune_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aitune_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
