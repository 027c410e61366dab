"""`make bench`, the CPU weight-only kernels (aitune_core/kernels): how fast they read their weights.

1. One row, 24 different 4096 x 4096 weights in turn (96 MB of int8, so no cache holds them): the GB/s of
   weights each product reads, against the read bandwidth measured in the same run (summing a 512 MB
   tensor); target >= 60% for int8 and int4. Next to them: fp32 (``x @ W.T``), torch's own
   ``_weight_int8pack_mm`` and torchao's CPU int4 (``_weight_int4pack_mm_for_cpu``).
2. 8 rows against 1: rows/s of the same products (target >= 5x: eight rows read the weights once).
3. The 1024-4096-1024 MLP at 1 row, in-process: the weight-only backend's int8 (compiled) against fp32
   eager, taking turns, with fp32 eager against a copy of itself as the noise floor (target >= 1.3x).
4. The same MLP served: its int8wo-cpu and fp32 eager archives (and a copy of the eager one, the floor) in
   one torchserve, one-row JSON requests taking turns on one keep-alive connection: int8 against fp32
   served (target >= 1.3x) and int8's served calls/s against its in-process ones (target >= 0.9x).

Writes benchmarks/results/kernels.{md,json} and prints the table, with the CPU's features.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "benchmarks" / "models")]

from cpu_speed import Report, machine, posting, read_bandwidth, take_turns  # noqa: E402

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from aitune_core.backends import make_backend  # noqa: E402
from aitune_core.kernels import build, ops  # noqa: E402
from aitune_core.kernels.quantize import pack_int4, quantize_int8  # noqa: E402
from integration.load import KeepAliveConnection, post_request  # noqa: E402 (tests/ on the path through cpu_speed)
from integration.torchserve import TorchServe  # noqa: E402


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def products(size: int, count: int) -> dict[str, tuple[Callable[[torch.Tensor], Any], float]]:
    """Each format's product over ``count`` different ``size`` x ``size`` weights, and the bytes it reads."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    generator = torch.Generator().manual_seed(0)
    floats = [torch.randn(size, size, generator=generator) * 0.02 for _ in range(count)]
    int8 = [quantize_int8(w) for w in floats]
    int4 = [pack_int4(w, 128) for w in floats]
    torchao_int4 = []
    for w in floats:
        layer = torch.nn.Linear(size, size, bias=False)
        layer.weight.data = w.clone()
        quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=128))
        torchao_int4.append(layer.requires_grad_(False))
    weights = size * size * count

    def each(call: Callable[..., Any], items: list[Any]) -> Callable[[torch.Tensor], Any]:
        return lambda x: [call(x, item) for item in items]

    return {
        "fp32 x @ W.T": (each(lambda x, w: x @ w.T, floats), weights * 4),
        "aitune int8": (each(lambda x, p: ops.int8_weight_only_mm(x, *p), int8), weights * (1 + 4 / size)),
        "aitune int4": (each(lambda x, p: ops.int4_weight_only_mm(x, *p, 128), int4), weights * (0.5 + 8 / 128)),
        "torch _weight_int8pack_mm": (each(lambda x, p: torch._weight_int8pack_mm(x, p[0], p[1]), int8),
                                      weights * (1 + 4 / size)),
        "torchao int4 (CPU)": (each(lambda x, layer: layer(x), torchao_int4), weights * (0.5 + 4 / 128)),
    }


def kernels(report: Report, size: int, count: int, repeats: int, bandwidth: float) -> dict[str, Any]:
    details: dict[str, Any] = {}
    with torch.inference_mode():
        for name, (call, nbytes) in products(size, count).items():
            one = best_seconds(lambda: call(torch.randn(1, size)), repeats)
            eight = best_seconds(lambda: call(torch.randn(8, size)), repeats)
            gbps = nbytes / one / 1e9
            target = 0.6 if name.startswith("aitune") else None
            report.add(f"weights read per second, 1 row, {count} x {size}x{size}: {name} / read bandwidth", gbps,
                       bandwidth, "GB/s", True, target=target)
            report.add(f"rows/s at 8 rows / at 1 row: {name}", 8 / eight, 1 / one, "rows/s", True,
                       target=5.0 if name.startswith("aitune") else None)
            details[name] = {"GBps_1_row": round(gbps, 2), "ms_1_row": round(one * 1e3, 2),
                             "ms_8_rows": round(eight * 1e3, 2)}
    return details


def mlp(report: Report, rounds: int) -> dict[str, Any]:
    from mlp_big import BigMLP

    torch.manual_seed(0)
    x = torch.randn(1, 1024)
    contenders: dict[str, Callable[[], Any]] = {}
    for name, backend in {"fp32 eager": make_backend("eager"), "fp32 eager copy": make_backend("eager"),
                          "int8wo-cpu+compile": make_backend("weight-only", "int8wo", compile=True),
                          "int4wo-cpu+compile": make_backend("weight-only", "int4wo", compile=True)}.items():
        backend.build(BigMLP().eval(), None, [x], "cpu")
        contenders[name] = lambda backend=backend: backend.infer(x)
    medians = take_turns(contenders, rounds)
    floor = medians["fp32 eager copy"] / medians["fp32 eager"]
    for name in ("int8wo-cpu+compile", "int4wo-cpu+compile"):
        report.add(f"1024-4096-1024 MLP, 1 row, in-process: {name} / fp32 eager", 1 / medians[name],
                   1 / medians["fp32 eager"], "calls/s", True, target=1.3 if name.startswith("int8") else None,
                   floor=floor)
    return {name: round(seconds * 1e3, 3) for name, seconds in medians.items()}


def served_mlp(report: Report, rounds: int, in_process_ms: dict[str, float]) -> dict[str, Any]:
    """Section 4: the MLP's archives served at one row a request (median ms a request each)."""
    from mlp_big import BigMLP

    archives = {"fp32 eager": {"backend": "eager"}, "fp32 eager copy": {"backend": "eager"},
                "int8wo-cpu+compile": {"backend": "weight-only", "quantization": "int8wo", "compile": True}}
    model_names = {name: name.split("+")[0].replace(" ", "_").replace("-", "_") for name in archives}
    work = Path(tempfile.mkdtemp(prefix="aitune-kernels-"))
    try:
        torch.manual_seed(0)
        torch.save(BigMLP().state_dict(), work / "mlp.pt")
        torch.save(torch.randn(1, 1024), work / "sample.pt")
        for name, changes in archives.items():
            archive_model(ArchiveOptions(model_name=model_names[name], model_file=REPO / "benchmarks" / "models" /
                                         "mlp_big.py", weights=work / "mlp.pt", samples=[work / "sample.pt"],
                                         export_path=work / "store", **changes))
        server = TorchServe(work / "ts", work / "store", {m: f"{m}.mar" for m in model_names.values()}).start()
        try:
            for model in model_names.values():
                server.wait_ready(model, timeout=600)
            connection = KeepAliveConnection(server.inference_port, timeout=600)
            body = json.dumps(torch.randn(1, 1024).round(decimals=4).tolist()).encode()
            medians = take_turns({name: posting(connection, [post_request(server, model, body)])
                                  for name, model in model_names.items()}, rounds)
            connection.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.add("1024-4096-1024 MLP, 1 row, served: int8wo-cpu+compile / fp32 eager archive",
               1 / medians["int8wo-cpu+compile"], 1 / medians["fp32 eager"], "calls/s", True, target=1.3,
               floor=medians["fp32 eager copy"] / medians["fp32 eager"])
    for name, target in (("int8wo-cpu+compile", 0.9), ("fp32 eager", None)):
        report.add(f"1024-4096-1024 MLP, 1 row: {name} served / in-process", 1 / medians[name],
                   1e3 / in_process_ms[name], "calls/s", True, target=target)
    return {name: round(seconds * 1e3, 3) for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small weights, few rounds: the harness works")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    size, count, repeats, rounds = (1024, 4, 3, 20) if args.quick else (4096, 24, 7, 300)
    report = Report()
    print(f"CPU weight-only kernels on {machine()}; {build.describe()}", flush=True)
    details: dict[str, Any] = {"kernels": build.describe(), "bandwidth_GBps": round(read_bandwidth(), 1)}
    details["products"] = kernels(report, size, count, repeats, details["bandwidth_GBps"])
    details["mlp_ms"] = mlp(report, rounds)
    details["mlp_served_ms"] = served_mlp(report, rounds, details["mlp_ms"])
    args.out.mkdir(parents=True, exist_ok=True)
    text = (f"CPU weight-only kernels ({'quick' if args.quick else 'full'}), {machine()}\n{details['kernels']}\n\n"
            f"{report.markdown()}\n\nRead bandwidth {details['bandwidth_GBps']} GB/s; per product: "
            f"{details['products']}\n")
    (args.out / "kernels.md").write_text(text)
    (args.out / "kernels.json").write_text(json.dumps({"mode": "quick" if args.quick else "full", "machine": machine(),
                                                       "rows": report.rows, "details": details}, indent=2) + "\n")
    print(f"\n{text}")


if __name__ == "__main__":
    main()
