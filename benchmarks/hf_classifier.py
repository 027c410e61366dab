"""`make bench`, a Hugging Face folder served: a BERT-base-sized classifier (12 layers, 768 hidden, made from the
config with random weights), archived with nothing but ``--hf-model`` and ``--tune``, served by torchserve,
against transformers' ``pipeline("text-classification")`` fp32 in one process on the same texts and threads.

Contenders take turns request by request (``cpu_speed.take_turns``); the noise floor is the pipeline against
a second copy of itself. Figures: 16 texts a request (the pipeline with ``batch_size=16``, and with its
default of one text at a time) and 1 text a request. Writes benchmarks/results/hf_classifier.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from cpu_speed import Report, machine, take_turns, text_requests, texts  # noqa: E402

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from aitune_core.tune import TuneOptions  # noqa: E402
from integration.load import KeepAliveConnection  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from models.hf_folders import BERT_BASE, TINY, make_folder  # noqa: E402

TARGET_16 = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny BERT, two candidates, few requests")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rounds = 4 if args.quick else 40
    report = Report()
    with tempfile.TemporaryDirectory(prefix="aitune-hf-classifier-") as tmp:
        work = Path(tmp)
        print(f"Hugging Face classifier on {machine()}", flush=True)
        folder = make_folder("text-classification", work / "bert", shape=TINY if args.quick else BERT_BASE)
        store = work / "store"
        archive_model(ArchiveOptions(model_name="cls_eager", hf_model=folder, backend="eager", export_path=store))
        started = time.perf_counter()
        tuned = archive_model(ArchiveOptions(
            model_name="cls_tuned", hf_model=folder, export_path=store,
            tune=TuneOptions(batch_sizes=(1, 16), candidates=("eager", "compile") if args.quick else None)),
            progress=lambda line: print(line, flush=True))
        details: dict[str, Any] = {"tune_s": round(time.perf_counter() - started, 1), "winner": tuned.tuning[0].winner,
                                   "table": tuned.tuning[0].table(), "shape": "TINY" if args.quick else "BERT-base"}
        details["served"] = served(report, work, store, folder, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = (f"Hugging Face classifier ({details['shape']}), {machine()}, {'quick' if args.quick else 'full'} run\n\n"
            f"{report.markdown()}\n\nTuned in {details['tune_s']} s: {details['winner']}\n\n{details['table']}\n")
    (args.out / "hf_classifier.md").write_text(text)
    (args.out / "hf_classifier.json").write_text(json.dumps({"mode": "quick" if args.quick else "full",
                                                             "machine": machine(), "rows": report.rows,
                                                             "details": details}, indent=2, default=str) + "\n")
    print(f"\n{text}")


def served(report: Report, work: Path, store: Path, folder: Path, rounds: int) -> dict[str, Any]:
    from transformers import pipeline

    pipelines = [pipeline("text-classification", model=str(folder), device="cpu") for _ in range(2)]
    names = ["cls_eager", "cls_tuned"]
    server = TorchServe(work / "ts", store, {name: f"{name}.mar" for name in names}).start()
    try:
        for name in names:
            server.wait_ready(name, timeout=900)
        connection = KeepAliveConnection(server.inference_port, timeout=600)

        def request(name: str, size: int) -> Callable[[], Any]:
            return text_requests(server, connection, name, size)

        def in_process(which: int, size: int, batch_size: int) -> Callable[[], Any]:
            counter = iter(range(10**9))
            return lambda: pipelines[which](texts(size, next(counter)), batch_size=batch_size)

        rates: dict[int, dict[str, float]] = {}
        for size in (16, 1):
            contenders = {"pipeline": in_process(0, size, size), "pipeline copy": in_process(1, size, size),
                          "served eager": request("cls_eager", size), "served tuned": request("cls_tuned", size)}
            if size == 16:
                contenders["pipeline one text at a time"] = in_process(0, size, 1)
            with torch.inference_mode():
                medians = take_turns(contenders, rounds * (2 if size == 1 else 1), block=3)
            rates[size] = {name: size / seconds for name, seconds in medians.items()}
            floor = rates[size]["pipeline"] / rates[size]["pipeline copy"]
            report.add(f"{size} text(s)/request: served --tune / pipeline fp32 in-process (batch_size={size})",
                       rates[size]["served tuned"], rates[size]["pipeline"], "texts/s", True,
                       target=TARGET_16 if size == 16 else None, floor=floor)
            report.add(f"{size} text(s)/request: served fp32 eager archive / pipeline fp32 in-process",
                       rates[size]["served eager"], rates[size]["pipeline"], "texts/s", True, floor=floor)
            if size == 16:
                report.add("16 texts/request: served --tune / pipeline fp32 in-process, its default batch_size=1",
                           rates[size]["served tuned"], rates[size]["pipeline one text at a time"], "texts/s", True,
                           floor=floor)
        connection.close()
        return {"texts_per_s": {size: {k: round(v, 1) for k, v in r.items()} for size, r in rates.items()}}
    finally:
        server.stop()


if __name__ == "__main__":
    main()
