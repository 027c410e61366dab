"""TorchCompileBackend: the original module compiled by inductor, ahead of time (AOTInductor) by default.

Ahead of time, the archive holds the compiled package and a worker only loads it; a worker whose
device cannot run that package (or ``ahead_of_time=False``) compiles with torch.compile at start
(kept in the inductor cache, so a restarted worker reuses it). See aitune_core.compilation.
"""

from __future__ import annotations

import dataclasses

from aitune_core.backends.eager import TorchEagerBackend, TorchEagerBackendConfig
from aitune_core.compilation import CompileSettings


@dataclasses.dataclass
class TorchCompileBackendConfig(TorchEagerBackendConfig):
    """``mode``: torch.compile's mode; ``freezing``: weights folded into the graph as constants;
    ``ahead_of_time``: compiled at archive time with AOTInductor (else when the worker starts)."""

    mode: str = "default"
    freezing: bool = True
    ahead_of_time: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.compile_settings()

    def compile_settings(self) -> CompileSettings:
        return CompileSettings(mode=self.mode, freezing=self.freezing, ahead_of_time=self.ahead_of_time)


class TorchCompileBackend(TorchEagerBackend):
    """Runs the module compiled by inductor, in eval mode, on the chosen device."""

    config_class = TorchCompileBackendConfig
