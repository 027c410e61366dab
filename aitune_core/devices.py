"""Device names: parsing and checking that a device exists on this machine."""

from __future__ import annotations

import torch

from aitune_core.errors import UnsupportedDeviceError


def parse_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; ValueError for a name torch does not know."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Invalid device {device!r}: expected 'cpu' or 'cuda:N' ({error})") from None


def check_device_exists(device: torch.device) -> None:
    """Raise UnsupportedDeviceError when ``device`` is not present on this machine."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UnsupportedDeviceError(f"Device {device} is not supported: use 'cpu' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise UnsupportedDeviceError(f"Device {device} was asked for, but CUDA is not available here")
    index = device.index if device.index is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UnsupportedDeviceError(
            f"Device {device} was asked for, but this machine has {count} CUDA device(s)"
        )


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None for a non-CUDA device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)
