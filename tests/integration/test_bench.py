"""`make bench`'s scripts with --quick prove their harness still works; nothing here asserts speed."""

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


def test_quick_served_split_writes_every_part(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "served_split.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "served_split.json").read_text())
    rows = [dict(zip(results["header"], row)) for row in results["rows"]]
    assert {(row["model"], row["rows/texts"]) for row in rows} == {
        (model, size) for model in ("mlp_ours", "mlp_stock", "minilm_ours") for size in ("1", "16")}
    for row in rows:
        assert float(row["in-process handler ms"]) > 0 and float(row["served handler ms"]) > 0
        assert float(row["client p50 ms"]) > float(row["served handler ms"])


def test_quick_cpu_speed_writes_every_figure(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_speed.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "cpu_speed.json").read_text())
    names = [row["figure"] for row in results["rows"]]
    for figure in ("MLP 1024-4096-1024, 32 rows in-process", "MiniLM in-process, 16 text(s)/call: tuned / onnxruntime int8",
                   "MiniLM served, 16 text(s)/request", "MiniLM served, 1 text, lengths varying: tuned p99 / p50"):
        assert any(name.startswith(figure) for name in names), figure
    assert all(row["ratio"] > 0 and (row["floor"] is None or row["floor"] > 0) for row in results["rows"])
