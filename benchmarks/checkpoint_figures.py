"""Checkpoint figures for the README, from one run: size of the int8wo checkpoint against the
fp32 state_dict, and worker start (from_dict + deploy) with stored quantized weights against the
seed's re-quantize mode, for the 1024-4096-1024 MLP."""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time

import torch

from aitune_core.cli import silence_import_notices

silence_import_notices()

from aitune_core import TorchAOBackend, TorchAOBackendConfig  # noqa: E402
from aitune_core.checkpoint import load_checkpoint  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(1024, 4096)
        self.fc2 = torch.nn.Linear(4096, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def start_seconds(checkpoint: bytes, tmp: str, repeats: int) -> float:
    """Median of: torch.load(weights_only=True) + from_dict + deploy('cpu') + one inference."""
    path = f"{tmp}/checkpoint.pt"
    with open(path, "wb") as file:
        file.write(checkpoint)
    times = []
    sample = torch.randn(1, 1024)
    for _ in range(repeats):
        module = MLP()
        started = time.perf_counter()
        backend = TorchAOBackend.from_dict(module, load_checkpoint(path))
        backend.deploy("cpu")
        backend.infer(sample)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = MLP().eval()
    sample = torch.randn(1, 1024)
    fp32 = saved(module.state_dict())
    stored = saved(TorchAOBackend().build(module, None, [sample], "cpu").to_dict())
    requantize_backend = TorchAOBackend(TorchAOBackendConfig(quantization="int8wo", checkpoint_weights="original"))
    requantize = saved(requantize_backend.build(module, None, [sample], "cpu").to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        stored_s = start_seconds(stored, tmp, args.repeats)
        requantize_s = start_seconds(requantize, tmp, args.repeats)
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "fp32_state_dict_mb": round(len(fp32) / 1e6, 2),
        "int8wo_checkpoint_mb": round(len(stored) / 1e6, 2),
        "size_ratio": round(len(stored) / len(fp32), 3),
        "start_stored_quantized_ms": round(stored_s * 1000, 1),
        "start_requantize_ms": round(requantize_s * 1000, 1),
        "start_ratio_stored_over_requantize": round(stored_s / requantize_s, 3),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
