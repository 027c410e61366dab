"""`benchmarks/run.py --quick` proves the harness still works; nothing here asserts speed."""

import json
import subprocess
import sys

from integration.torchserve import REPO

FIGURES = ["handler overhead, c=1, p50_ms", "noise floor, c=1", "handler overhead, c=8, throughput req/s",
           "dynamic batching", "request decoding", "handler overhead, worker side",
           "cold start, initialize() ms, int8wo stored / eager", "archive size", "worker RSS after warm-up",
           "v2 binary tensors / v2 JSON, 64x1024 float32 in and out, p50 ms (x*w model",
           "v2 binary tensors / v2 JSON, 64x1024 float32 in and out, p50 ms (1024-4096-1024 MLP",
           "TorchServe's own floor"]


def test_quick_benchmark_writes_every_figure(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["mode"] == "quick" and "cores" in results["machine"]
    names = [row["figure"] for row in results["rows"]]
    for figure in FIGURES:
        assert any(name.startswith(figure) for name in names), figure
    assert all(row["ratio"] > 0 for row in results["rows"])
    assert "| figure | ours | baseline | ratio | target | met |" in (tmp_path / "latest.md").read_text()
