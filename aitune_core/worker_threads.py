"""How many CPU threads a worker's torch uses: the one CPU setting TorchServe has no key for.

By default every worker's torch takes all physical cores, so N workers on one CPU run N times as
many threads as there are cores, and share them with TorchServe's frontend. A model-config.yaml
sets it per model: ``handler: {torch_threads: N}`` (workers x threads = cores).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from aitune_core.errors import ConfigError

SECTION, KEY = "handler", "torch_threads"


def threads_from_config(model_config: Mapping[str, Any] | None) -> int | None:
    """The ``handler: {torch_threads: N}`` of a model-config, None when it is not set."""
    section = (model_config or {}).get(SECTION)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"model-config: {SECTION} must be a mapping (e.g. {SECTION}: {{{KEY}: 2}}), "
                          f"got {type(section).__name__}")
    if KEY not in section:
        return None
    threads = section[KEY]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"model-config: {SECTION}.{KEY} must be a whole number of threads >= 1, got {threads!r}")
    return threads


def set_worker_threads(threads: int | None) -> str:
    """Set torch's intra-op threads (None: keep torch's default); what the worker now uses, for its log."""
    if threads is None:
        return f"{torch.get_num_threads()} torch threads (torch's default; {SECTION}.{KEY} sets it)"
    torch.set_num_threads(threads)
    return f"{threads} torch threads ({SECTION}.{KEY})"
