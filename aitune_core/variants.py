"""Device-aware archives: several built backends ("variants"), each with the device it needs.

A tuned archive keeps the winner for each device it was tuned on, the best candidate for other
GPUs when the winner needs a newer one (fp8dq: compute capability 8.9), and an eager fallback
that runs anywhere when no variant runs on a CPU. The worker deploys the most specific variant
its device can run and logs which and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from aitune_core.devices import cuda_capability
from aitune_core.errors import UnsupportedDeviceError

ANY_DEVICE = "any"


@dataclasses.dataclass
class Variant:
    """One built backend in the archive and what it needs to run."""

    name: str
    checkpoint: str
    device_type: str  # "cpu", "cuda" or "any"
    min_capability: tuple[int, int] | None
    describe: str
    reason: str  # why it is in the archive
    backend: str | None = None  # its backend's class name (None in archives made before it was recorded)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["min_capability"] = list(self.min_capability) if self.min_capability else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Variant":
        capability = data.get("min_capability")
        return cls(**{**data, "min_capability": tuple(capability) if capability else None})

    def needs(self) -> str:
        if self.device_type == ANY_DEVICE:
            return "any device"
        if self.min_capability:
            return f"a CUDA GPU with compute capability >= {self.min_capability[0]}.{self.min_capability[1]}"
        return "a CUDA GPU" if self.device_type == "cuda" else "a CPU"

    def runs_on(self, device_type: str, capability: tuple[int, int] | None) -> bool:
        """True when a device of ``device_type`` (with CUDA compute ``capability``) can run it."""
        if self.device_type not in (ANY_DEVICE, device_type):
            return False
        return not self.min_capability or capability is not None and tuple(capability) >= self.min_capability


def _specificity(variant: Variant) -> tuple[int, tuple[int, int]]:
    return (variant.device_type != ANY_DEVICE, variant.min_capability or (0, 0))


def choose_variant(variants: list[Variant], device: torch.device,
                   capability: tuple[int, int] | None = None) -> tuple[Variant, str]:
    """The most specific variant ``device`` can run, and a sentence saying why; UnsupportedDeviceError
    when none can. ``capability`` defaults to the device's own CUDA compute capability."""
    capability = capability if capability is not None else cuda_capability(device)
    ordered = sorted(variants, key=_specificity, reverse=True)
    skipped = []
    for variant in ordered:
        if variant.runs_on(device.type, capability):
            why = variant.reason
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return variant, why
        skipped.append(f"{variant.name!r} (needs {variant.needs()})")
    raise UnsupportedDeviceError(f"No variant in this archive runs on {device}: " + "; ".join(skipped)
                                 + ": re-archive with --tune-devices including this kind of device")
