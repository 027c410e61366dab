"""Handler overhead without the network: TorchServe's own worker code, in one process.

Both archives are unpacked and loaded with TorchServe's `TsModelLoader`; then the same request
goes through `Service.predict` (decode, handler, the response bytes the frontend gets) for ours
and the stock handler in turn, with metric log lines written as in a worker. Between calls a
4 MB sweep evicts the CPU caches, as the frontend and client do in a served request on 2 cores.
Taking turns call by call makes machine noise hit both alike, so this figure is steadier than
end-to-end latency, where the frontend and loopback dominate.

Run by `run.py` in a fresh process: `worker_time.py OURS.mar STOCK.mar CALLS` prints JSON.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def measure(archives: dict[str, Path], body: list, calls: int) -> dict[str, float]:
    """Median ``Service.predict`` time in microseconds per archive, the archives taking turns."""
    with tempfile.TemporaryDirectory(prefix="worker-time-") as unpacked_dir:
        return _measure(archives, body, calls, Path(unpacked_dir))


def load_services(archives: dict[str, Path], unpacked_dir: Path, gpu_id: int | None = None) -> dict[str, Any]:
    """Each archive unpacked and loaded as a worker loads it (TorchServe's ``TsModelLoader``).

    An archive may be a ``.mar`` or the folder ``--archive-format no-archive`` writes (loaded where it
    is). ``gpu_id`` is what TorchServe hands a worker on a GPU host (None: the CPU).
    """
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader
    import ts

    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    services = {}
    for name, archive in archives.items():
        if Path(archive).is_dir():
            model_dir = Path(archive).resolve()
        else:
            model_dir = unpacked_dir / name
            with zipfile.ZipFile(archive) as unpacked:
                unpacked.extractall(model_dir)
        handler = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]["handler"]
        sys.path.insert(0, str(model_dir))
        os.chdir(model_dir)  # TorchServe starts each worker in its model's folder
        service = TsModelLoader().load(name, str(model_dir), handler, gpu_id, 1, None, True, metrics)
        service.set_cl_socket(None)
        services[name] = service
    return services


def predict_batch(body: Any) -> list[dict]:
    """One JSON request as the worker hands it to ``Service.predict`` (the worker decodes JSON bodies)."""
    return [{"requestId": b"bench", "parameters": [{"name": "body", "contentType": "application/json",
                                                     "value": body}],
             "headers": [{"name": b"Content-Type", "value": b"application/json"}]}]


def _measure(archives: dict[str, Path], body: list, calls: int, unpacked_dir: Path) -> dict[str, float]:
    # A worker logs metrics to stdout at INFO; the formatting and writing is part of the cost.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO, force=True)
    services = load_services(archives, unpacked_dir)

    sweep = np.ones(4 * 2**20 // 8)
    timings: dict[str, list[float]] = {name: [] for name in services}
    names = list(services)
    for call in range(calls + 200):  # the first 200 rounds warm up
        for name in names[call % len(names):] + names[:call % len(names)]:
            sweep.sum()
            batch = predict_batch(body)
            started = time.perf_counter()
            response = services[name].predict(batch)
            elapsed = time.perf_counter() - started
            if call >= 200:
                timings[name].append(elapsed)
            if b"Prediction success" not in response:
                raise RuntimeError(f"{name} failed: {bytes(response)[:300]!r}")
    return {name: statistics.median(values) * 1e6 for name, values in timings.items()}


def worker_time(ours: Path, stock: Path, body: list, calls: int) -> dict[str, float]:
    """``measure`` in a fresh Python process (the bench process has imported other things)."""
    done = subprocess.run([sys.executable, __file__, str(ours), str(stock), str(calls)], input=json.dumps(body),
                          capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"worker_time.py failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    figures = measure({"ours": Path(sys.argv[1]), "stock": Path(sys.argv[2])}, json.loads(sys.stdin.read()),
                      int(sys.argv[3]))
    print(json.dumps(figures))
