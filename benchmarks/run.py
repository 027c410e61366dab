"""`make bench`: our handler against stock TorchServe, and our backends against each other.

Every figure is a ratio against a baseline measured in the same run on the same machine, with
medians over repeats: real torchserve on loopback, keep-alive HTTP clients, bounded request
counts. Writes benchmarks/results/latest.{md,json} and prints the table. `--quick` proves the
harness works in well under two minutes (CI runs it and asserts nothing about speed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path[:0] = [str(REPO / "tests")]

from aitune_core.cli import silence_import_notices  # noqa: E402

silence_import_notices()

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from integration.load import run_load, worker_rss_mb  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from worker_time import worker_time  # noqa: E402

SMALL = REPO / "examples" / "mlp" / "mlp.py"
BIG = BENCH / "models" / "mlp_big.py"
SCALE = BENCH / "models" / "scale.py"
EXPAND = BENCH / "models" / "expand.py"


@dataclass
class Settings:
    repeats: int
    repeats_c1: int
    requests_c1: int
    requests_c8: int
    decode_requests: int
    cold_repeats: int
    worker_calls: int
    wire_requests: int


FULL = Settings(repeats=6, repeats_c1=12, requests_c1=400, requests_c8=1200, decode_requests=30, cold_repeats=3,
                worker_calls=5000, wire_requests=40)
QUICK = Settings(repeats=2, repeats_c1=2, requests_c1=40, requests_c8=80, decode_requests=4, cold_repeats=1,
                 worker_calls=200, wire_requests=4)


# -- building the archives --------------------------------------------------------------------
def write_inputs(work: Path) -> dict[str, tuple[Path, Path]]:
    sys.path.insert(0, str(BENCH / "models"))
    sys.path.insert(0, str(SMALL.parent))
    from mlp import MLP
    from mlp_big import BigMLP
    from expand import Expand
    from scale import Scale

    inputs = {}
    for name, model, sample in (("small", MLP(), torch.randn(4, 64)), ("big", BigMLP(), torch.randn(4, 1024)),
                                ("scale", Scale(), torch.randn(4, 1024)), ("expand", Expand(), torch.randn(1, 1024))):
        torch.manual_seed(0)
        folder = work / name
        folder.mkdir(parents=True)
        torch.save(model.state_dict(), folder / "weights.pt")
        torch.save(sample, folder / "sample.pt")
        inputs[name] = (folder / "weights.pt", folder / "sample.pt")
    return inputs


def stock_archive(name: str, model_file: Path, weights: Path, store: Path, config: Path | None) -> Path:
    command = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
               "--model-file", str(model_file), "--serialized-file", str(weights),
               "--handler", str(BENCH / "stock_handler.py"), "--export-path", str(store), "--force"]
    if config is not None:
        command += ["--config-file", str(config)]
    env = {**os.environ, "TMPDIR": tempfile.mkdtemp()}
    subprocess.run(command, check=True, env=env)
    return store / f"{name}.mar"


def build_store(work: Path) -> tuple[Path, dict[str, int]]:
    inputs = write_inputs(work)
    store = work / "store"
    store.mkdir()
    batch1, batch8 = work / "batch1.yaml", work / "batch8.yaml"
    batch1.write_text("batchSize: 1\n")
    batch8.write_text("batchSize: 8\nmaxBatchDelay: 5\n")
    sizes = {}
    ours = {
        "small_ours": (SMALL, "small", {"backend": "eager", "config_file": batch1}),
        "small_ours_b8": (SMALL, "small", {"backend": "eager", "config_file": batch8}),
        "big_eager": (BIG, "big", {"backend": "eager"}),
        "big_int8wo": (BIG, "big", {"quantization": "int8wo"}),
        "big_int8wo_requantize": (BIG, "big", {"quantization": "int8wo", "checkpoint_weights": "original"}),
        "scale_eager": (SCALE, "scale", {"backend": "eager"}),
        "expand_eager": (EXPAND, "expand", {"backend": "eager"}),
    }
    for name, (model_file, which, changes) in ours.items():
        weights, sample = inputs[which]
        result = archive_model(ArchiveOptions(model_name=name, model_file=model_file, weights=weights,
                                              samples=[sample], export_path=store, **changes))
        sizes[name] = result.archive_bytes
    stock_archive("small_stock", SMALL, inputs["small"][0], store, batch1)
    # A second copy of the baseline: its ratio to the first is the noise floor of the run.
    stock_archive("small_stock_copy", SMALL, inputs["small"][0], store, batch1)
    stock_archive("big_stock", BIG, inputs["big"][0], store, None)
    return store, sizes


# -- load ---------------------------------------------------------------------------------------
def load(server: TorchServe, model: str, body: bytes, concurrency: int, total: int) -> dict[str, float]:
    """``total`` requests from ``concurrency`` keep-alive clients after a warm-up; percentiles and throughput."""
    run_load(server, model, [body], 1, min(50, total))
    result = run_load(server, model, [body], concurrency, total)
    if result.failures:
        raise RuntimeError(f"{len(result.failures)} of {total} requests to {model} failed: {result.failures[0]}")
    return result.figures()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def compare(work: Path, store: Path, models: list[str], body: bytes, concurrency: int, total: int,
            repeats: int, rotate: bool) -> list[dict]:
    """The median figures of each model over ``repeats`` interleaved runs, so drift hits all alike.

    With ``rotate``, the runs are split over one fresh torchserve per model, each registering the
    models in a rotated order: on this machine a model registered last was measured 2-16% faster
    at c=1 than the same handler registered first (the worker's position, not the handler), so
    every model takes every position equally often.
    """
    orders = [models[i:] + models[:i] for i in range(len(models) if rotate else 1)]
    runs: dict[str, list] = {model: [] for model in models}
    for index, order in enumerate(orders):
        server = TorchServe(work / f"compare-{'-'.join(models)}-{concurrency}-{index}", store,
                            {model: f"{model}.mar" for model in order}).start()
        try:
            for model in order:
                server.wait_ready(model, timeout=300)
            for repeat in range(max(1, repeats // len(orders))):
                # Rotate who goes first too: the first run after a pause is the slowest on a busy machine.
                for model in order[repeat % len(order):] + order[:repeat % len(order)]:
                    runs[model].append(load(server, model, body, concurrency, total))
        finally:
            server.stop()
    return [median_of(runs[model]) for model in models]


# -- wire formats ---------------------------------------------------------------------------------
def v2_requests(x: torch.Tensor) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The same request as v2 JSON and through the binary tensor extension (both ways), with its headers."""
    entry = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**entry, "data": x.flatten().tolist()}]}).encode()
    raw = x.numpy().astype("<f4").tobytes()
    header = json.dumps({"inputs": [{**entry, "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return {"json": (as_json, {}),
            "binary": (header + raw, {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))})}


def v2_answer(server: TorchServe, model: str, body: bytes, headers: dict[str, str]) -> torch.Tensor:
    """One v2 answer's output, JSON or binary (to check both ways agree before timing)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=120)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body, {**server.auth_header("inference"), **headers})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"v2 request to {model} failed: HTTP {response.status}: {raw[:300]!r}")
    length = response.getheader("Inference-Header-Content-Length")
    if length is None:
        return torch.tensor(json.loads(raw)["outputs"][0]["data"])
    return torch.frombuffer(bytearray(raw[int(length):]), dtype=torch.float32)


def compare_wire(work: Path, store: Path, variants: dict[str, tuple[str, bytes, dict[str, str]]], total: int,
                 repeats: int, warm_up: int) -> dict[str, dict]:
    """p50 of each variant (model, v2 body, headers) on one server, runs interleaved so drift hits all alike."""
    models = sorted({model for model, _, _ in variants.values()})
    server = TorchServe(work / f"wire-{'-'.join(models)}", store, {model: f"{model}.mar" for model in models}).start()
    runs: dict[str, list] = {name: [] for name in variants}
    names = list(variants)
    try:
        for model in models:
            server.wait_ready(model, timeout=300)
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                model, body, headers = variants[name]
                path = f"/v2/models/{model}/infer"
                # The frontend's copying of large bodies runs several times slower until the JVM has compiled it.
                run_load(server, model, [body], 1, warm_up, path=path, headers=headers)
                result = run_load(server, model, [body], 1, total, path=path, headers=headers)
                if result.failures:
                    raise RuntimeError(f"v2 {name} to {model}: {result.failures[0]}")
                runs[name].append(result.figures())
    finally:
        server.stop()
    return {name: median_of(figures) for name, figures in runs.items()}


def check_binary_matches_json(work: Path, store: Path, model: str, x: torch.Tensor) -> None:
    """Before timing: the binary answer must hold exactly the numbers of the JSON one."""
    server = TorchServe(work / f"wire-check-{model}", store, {model: f"{model}.mar"}).start()
    try:
        server.wait_ready(model, timeout=300)
        answers = [v2_answer(server, model, body, headers) for body, headers in v2_requests(x).values()]
    finally:
        server.stop()
    if not torch.equal(answers[0], answers[1]):
        raise RuntimeError(f"{model}: v2 JSON and binary answers differ")


# -- cold start -----------------------------------------------------------------------------------
def cold_start(work: Path, store: Path, model: str, repeats: int) -> dict[str, float]:
    """torchserve --start to READY, initialize() from our log line, and the worker's RSS after warm-up."""
    starts, inits, rss = [], [], []
    for index in range(repeats):
        server = TorchServe(work / f"cold-{model}-{index}", store, {model: f"{model}.mar"})
        started = time.perf_counter()
        server.start()
        try:
            server.wait_ready(model, timeout=300)
            starts.append(time.perf_counter() - started)
            found = re.search(rf"AITune: model {model} ready: .* in (\d+) ms", server.model_log())
            inits.append(float(found.group(1)))
            rss.append(worker_rss_mb(server, model))
        finally:
            server.stop()
    return {"ready_s": statistics.median(starts), "initialize_ms": statistics.median(inits),
            "rss_mb": statistics.median(rss)}


def handler_rows(work: Path, store: Path, sizes: dict[str, int], settings: Settings, rotate: bool, row) -> None:
    """Our handler against stock TorchServe, batching, decoding, cold start, size and memory."""
    small_input = torch.randn(1, 64).tolist()
    small_body = json.dumps(small_input).encode()
    decode_body = json.dumps(torch.randn(64, 1024).tolist()).encode()
    small = ["small_ours", "small_stock", "small_stock_copy"]
    for concurrency, total, repeats in ((1, settings.requests_c1, settings.repeats_c1),
                                        (8, settings.requests_c8, settings.repeats)):
        models = small if concurrency == 1 else small[:2]
        mine, base, *copy = compare(work, store, models, small_body, concurrency, total, repeats, rotate)
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            ratio = mine[key] / base[key]
            target = "<= 1.00" if key == "p50_ms" else None
            row(f"handler overhead, c={concurrency}, {key} (ours eager / stock)", f"{mine[key]:.2f}",
                f"{base[key]:.2f}", ratio, target, ratio <= 1.0 if target else None)
        ratio = mine["rps"] / base["rps"]
        row(f"handler overhead, c={concurrency}, throughput req/s", f"{mine['rps']:.0f}", f"{base['rps']:.0f}",
            ratio, ">= 1.00", ratio >= 1.0)
        if copy:
            row("noise floor, c=1, p50_ms (a second copy of stock / stock)", f"{copy[0]['p50_ms']:.2f}",
                f"{base['p50_ms']:.2f}", copy[0]["p50_ms"] / base["p50_ms"])
    b8, b1 = compare(work, store, ["small_ours_b8", "small_ours"], small_body, 8, settings.requests_c8,
                     settings.repeats, rotate)
    ratio = b8["rps"] / b1["rps"]
    row("dynamic batching, c=8, throughput batchSize 8 / batchSize 1", f"{b8['rps']:.0f}", f"{b1['rps']:.0f}",
        ratio, ">= 1.5", ratio >= 1.5)
    mine, base = compare(work, store, ["big_eager", "big_stock"], decode_body, 1, settings.decode_requests,
                         settings.repeats, rotate)
    ratio = mine["p50_ms"] / base["p50_ms"]
    row("request decoding, 64x1024 floats, p50 ms (ours eager / stock)", f"{mine['p50_ms']:.1f}",
        f"{base['p50_ms']:.1f}", ratio, "<= 1.00", ratio <= 1.0)

    worker = worker_time(store / "small_ours.mar", store / "small_stock.mar", small_input, settings.worker_calls)
    ratio = worker["ours"] / worker["stock"]
    row("handler overhead, worker side, Service.predict p50 us (in-process, taking turns)",
        f"{worker['ours']:.0f}", f"{worker['stock']:.0f}", ratio)

    cold = {name: cold_start(work, store, name, settings.cold_repeats)
            for name in ("big_eager", "big_int8wo", "big_int8wo_requantize")}
    ratio = cold["big_int8wo"]["initialize_ms"] / cold["big_eager"]["initialize_ms"]
    row("cold start, initialize() ms, int8wo stored / eager", f"{cold['big_int8wo']['initialize_ms']:.0f}",
        f"{cold['big_eager']['initialize_ms']:.0f}", ratio, "<= 1.2", ratio <= 1.2)
    ratio = cold["big_int8wo"]["initialize_ms"] / cold["big_int8wo_requantize"]["initialize_ms"]
    row("cold start, initialize() ms, int8wo stored / int8wo re-quantize",
        f"{cold['big_int8wo']['initialize_ms']:.0f}", f"{cold['big_int8wo_requantize']['initialize_ms']:.0f}",
        ratio, "<= 1.0", ratio <= 1.0)
    ratio = cold["big_int8wo"]["ready_s"] / cold["big_eager"]["ready_s"]
    row("cold start, torchserve --start to READY s, int8wo / eager", f"{cold['big_int8wo']['ready_s']:.1f}",
        f"{cold['big_eager']['ready_s']:.1f}", ratio)
    ratio = sizes["big_int8wo"] / sizes["big_eager"]
    row("archive size, 1024-4096-1024 MLP, int8wo .mar / eager .mar", f"{sizes['big_int8wo'] / 1e6:.1f} MB",
        f"{sizes['big_eager'] / 1e6:.1f} MB", ratio, "<= 0.30", ratio <= 0.30)
    ratio = cold["big_int8wo"]["rss_mb"] / cold["big_eager"]["rss_mb"]
    row("worker RSS after warm-up, int8wo / eager", f"{cold['big_int8wo']['rss_mb']:.0f} MB",
        f"{cold['big_eager']['rss_mb']:.0f} MB", ratio)



def wire_rows(work: Path, store: Path, settings: Settings, row) -> None:
    """The v2 binary tensor extension against v2 JSON, the same 64x1024 float32 request both ways, same run.

    Also what TorchServe alone costs to carry a 64x1024 float32 answer from the worker to the
    client: a 1x1024 binary request answered with 64x1024 binary floats (the handler's part < 1 ms).
    """
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    for model, what in (("scale_eager", "x*w model, negligible compute"), ("big_eager", "1024-4096-1024 MLP")):
        check_binary_matches_json(work, store, model, x)
        variants = {name: (model, body, headers) for name, (body, headers) in v2_requests(x).items()}
        if model == "scale_eager":
            variants["floor"] = ("expand_eager", *v2_requests(x[:1])["binary"])
        wire = compare_wire(work, store, variants, settings.wire_requests, settings.repeats, settings.wire_requests)
        ratio = wire["binary"]["p50_ms"] / wire["json"]["p50_ms"]
        target, met = ("<= 0.05", ratio <= 0.05) if model == "scale_eager" else (None, None)
        row(f"v2 binary tensors / v2 JSON, 64x1024 float32 in and out, p50 ms ({what})",
            f"{wire['binary']['p50_ms']:.1f}", f"{wire['json']['p50_ms']:.1f}", ratio, target, met)
        if "floor" in wire:
            row("TorchServe's own floor: v2 binary, 1x1024 in, 64x1024 float32 out, p50 ms / v2 JSON above "
                "(same server, interleaved)", f"{wire['floor']['p50_ms']:.1f}", f"{wire['json']['p50_ms']:.1f}",
                wire["floor"]["p50_ms"] / wire["json"]["p50_ms"])


# -- report ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run that proves the harness works")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="where latest.md and latest.json go")
    parser.add_argument("--only", choices=["wire"], help="just the rows of one part (wire: the v2 binary extension)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="aitune-bench-"))
    store, sizes = build_store(work)
    rows = []

    def row(figure, ours, base, ratio, target=None, met=None):
        rows.append({"figure": figure, "ours": ours, "baseline": base, "ratio": round(ratio, 3),
                     "target": target, "met": met})

    if args.only is None:
        handler_rows(work, store, sizes, settings, rotate=not args.quick, row=row)
    wire_rows(work, store, settings, row)

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
               f"torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    mode = "quick" if args.quick else "full"
    lines = [f"Benchmark ({mode}), {machine}; median of {settings.repeats} repeat(s); "
             f"{time.perf_counter() - started:.0f} s", "",
             "| figure | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {r['ours']} | {r['baseline']} | {r['ratio']} | {r['target'] or ''} | {met} |")
    table = "\n".join(lines)
    results = args.out
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.md").write_text(table + "\n")
    (results / "latest.json").write_text(json.dumps({"mode": mode, "machine": machine, "rows": rows}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
