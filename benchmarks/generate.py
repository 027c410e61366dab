"""`make bench`, text generation: decode tokens/s of a 254M-parameter Llama shape (16 layers, 1024 hidden, 2816
intermediate, GQA 16/8 heads, vocabulary 32000, random weights), one stream: the ``--tune``d archive and the
eager fp32 one against transformers' ``generate`` fp32 eager in one process on the same folder (what
TorchServe's Hugging Face handlers run); every candidate's rate from the tuning table.

Contenders take turns (``cpu_speed.take_turns``); the noise floor is ``generate`` against a second copy of
itself. A decode rate is 32 / (time of 33 new tokens - time of 1), so the prompt's pass is left out; the
tuned archive and ``generate`` are also timed after prompts of 128 and 512 tokens (a longer KV cache). Also:
the GB/s of weights each reads per token next to the read bandwidth measured in the same run (summing a
512 MB tensor), and the best archive served through torchserve, streamed (every token a chunk, and with
``stream_interval`` 4: four tokens a chunk): tokens/s against in-process and the time to the first token
against one prompt pass. Writes benchmarks/results/generate.{md,json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from cpu_speed import Report, machine, read_bandwidth, take_turns  # noqa: E402

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from aitune_core.generate.engine import Engine, prefill  # noqa: E402
from aitune_core.generate.request import GenerateRequest, parse  # noqa: E402
from aitune_core.generate.sampling import SamplingParams  # noqa: E402
from aitune_core.tune import TuneOptions  # noqa: E402
from aitune_core.serving import load_model, settle_heap  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from models.llm_folders import make_llm_folder, make_tokenizer  # noqa: E402
from corpus import stdlib_text  # noqa: E402 (on the path through models.llm_folders)

FULL = dict(layers=16, hidden=1024, heads=16, kv_heads=8, intermediate=2816, model_vocab=32000, context=1024)
QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, model_vocab=512, context=256)
PROMPT = "def parse_arguments(argv):\n    parser = argparse.ArgumentParser("
STEPS = 32
STREAM_INTERVALS = (1, 4)  # served: every token its own chunk (the default), and four a chunk


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


# Bytes of weight a format reads per parameter (int8, fp8: one byte, their per-channel scales are ~0.1% more).
# int4 (group 128): half a byte, and a scale and zero point per 128 weights (bf16 in torchao's: +3%; fp32 in ours).
BYTES_PER_PARAMETER = {"eager": 4, "compile": 4, "bf16+compile": 2, "int8wo+compile": 1, "int8dq+compile": 1,
                       "fp8wo+compile": 1, "int4wo+compile": 0.5 * (1 + 4 / 128), "int8wo-cpu+compile": 1,
                       "int4wo-cpu+compile": 0.5 * (1 + 8 / 128), "generate": 4}


def linear_parameters(module: torch.nn.Module) -> int:
    """Parameters a decode step reads: every Linear's weight (the embedding reads one row: left out)."""
    return sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model, few rounds: the harness works")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    shape, rounds, long_prompts = (QUICK, 2, (64,)) if args.quick else (FULL, 6, (128, 512))
    report = Report()
    details: dict[str, Any] = {"shape": shape}
    with tempfile.TemporaryDirectory(prefix="aitune-generate-") as tmp:
        work = Path(tmp)
        print(f"Text generation on {machine()}", flush=True)
        folder = make_llm_folder(work / "llm", tokenizer=make_tokenizer(2000), spread=0.02, **shape)
        store = work / "store"
        archives = {"eager": {"backend": "eager"},
                    "tuned": {"tune": TuneOptions(candidates=("eager", "compile") if args.quick else None)}}
        if not args.quick:  # random weights lose too much to int4 for the gate (docs/generate.md): its rate anyway
            archives["int4wo-cpu"] = {"backend": "weight-only", "quantization": "int4wo", "compile": True,
                                      "min_top1": 0.0, "max_kl": 1e9}
        for name, changes in archives.items():
            started = time.perf_counter()
            archive_model(ArchiveOptions(model_name=name, hf_model=folder, export_path=store,
                                         archive_format="no-archive", max_batch=1, **changes),
                          progress=lambda line: print(f"  {line}", flush=True))
            details[f"archive_s {name}"] = round(time.perf_counter() - started, 1)
        loaded = {name: load_model(store / name, torch.device("cpu")) for name in archives}
        tuning = loaded["tuned"].codec.options.tuning
        details["tuning"] = tuning
        details["tuned_choice"] = next(row["name"] for row in tuning if row["outcome"] == "chosen")
        details["bandwidth_GBps"] = round(read_bandwidth(), 1)
        details.update(in_process(report, folder, loaded, rounds, details["bandwidth_GBps"], tuning, long_prompts))
        details.update(served(report, work, store, "tuned", loaded["tuned"], rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    text = (f"Text generation ({'quick' if args.quick else '254M Llama shape'}), {machine()}\n\n{report.markdown()}\n\n"
            f"Read bandwidth {details['bandwidth_GBps']} GB/s; decode tokens/s: {details['tokens_per_s']}; by prompt "
            f"length (tokens): {details['tokens_per_s_by_prompt_length']}; weights read "
            f"GB/s: {details['weights_GBps']}; --tune chose {details['tuned_choice']}\n")
    (args.out / "generate.md").write_text(text)
    (args.out / "generate.json").write_text(json.dumps({"mode": "quick" if args.quick else "full",
                                                        "machine": machine(), "rows": report.rows,
                                                        "details": details}, indent=2, default=str) + "\n")
    print(f"\n{text}")


def in_process(report: Report, folder: Path, loaded: dict[str, Any], rounds: int, bandwidth: float,
               tuning: list[dict[str, Any]], long_prompts: tuple[int, ...]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    references = [AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval() for _ in range(2)]
    any_model = next(iter(loaded.values()))
    tokenizer, options = any_model.codec.tokenizer, any_model.codec.options

    def hf(which: int, ids: list[int], new: int) -> Callable[[], Any]:
        tensor = torch.tensor([ids])

        def call() -> None:
            with torch.no_grad():
                references[which].generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False, disable_compile=True)
        return call

    def ours(name: str, ids: list[int], new: int) -> Callable[[], Any]:
        engine = Engine(loaded[name].backend.infer, tokenizer, options)
        engine.eos = set()
        request = GenerateRequest(ids, new, SamplingParams(), [], False)
        return lambda: engine.generate(request)

    def decode_rates(ids: list[int], names: list[str], turns: int) -> dict[str, float]:
        """Decode tokens/s: STEPS / (time of STEPS + 1 new tokens - time of 1), the prompt's pass left out."""
        baselines = {"generate": lambda new: hf(0, ids, new), "generate copy": lambda new: hf(1, ids, new)}
        makers = {**baselines, **{name: (lambda new, name=name: ours(name, ids, new)) for name in names}}
        long_runs = take_turns({name: make(STEPS + 1) for name, make in makers.items()}, turns)
        short_runs = take_turns({name: make(1) for name, make in makers.items()}, turns)
        rates = {name: STEPS / max(long_runs[name] - short_runs[name], 1e-9) for name in makers}
        return {**rates, **{f"first {name}": short_runs[name] for name in makers}}

    ids = tokenizer(PROMPT)["input_ids"]
    rates = decode_rates(ids, list(loaded), rounds)
    floor = rates["generate"] / rates["generate copy"]
    for name in loaded:
        report.add(f"decode tokens/s, 1 stream, in-process, {len(ids)}-token prompt: {name} archive / "
                   "transformers generate fp32 eager", rates[name], rates["generate"], "tokens/s", True,
                   target=2.5 if name == "tuned" else None, floor=floor)
    # "Never slower at any prompt length up to 512": the decode steps read a longer KV cache.
    by_length = {len(ids): {name: round(rates[name], 2) for name in ("generate", "tuned")}}
    text_ids = tokenizer(stdlib_text(200_000))["input_ids"]
    for length in long_prompts:
        at = decode_rates(text_ids[:length], ["tuned"], max(2, rounds // 2))
        by_length[length] = {name: round(at[name], 2) for name in ("generate", "tuned")}
        report.add(f"decode tokens/s, 1 stream, in-process, {length}-token prompt: tuned archive / transformers "
                   "generate fp32 eager", at["tuned"], at["generate"], "tokens/s", True, target=1.0,
                   floor=at["generate"] / at["generate copy"])
    parameters = linear_parameters(references[0])
    # Each candidate's rate from --tune's table (timed there, best of three), the baseline's from above.
    measured = {row["name"]: row["tokens_per_s"] for row in tuning if row["tokens_per_s"]}
    measured["generate"] = rates["generate"]
    if "int4wo-cpu" in loaded:
        measured["int4wo-cpu+compile"] = rates["int4wo-cpu"]
    weights = {name: round(parameters * BYTES_PER_PARAMETER[name] * rate / 1e9, 2) for name, rate in measured.items()
               if name in BYTES_PER_PARAMETER}
    for name, gbps in weights.items():
        report.add(f"weights read per second: {name} / read bandwidth", gbps, bandwidth, "GB/s", True)
    # Its own limit: the read bandwidth over the bytes of weights a token reads (the KV cache left out).
    choice = next(row["name"] for row in tuning if row["outcome"] == "chosen")
    for label, name, rate in (("tuned", choice, rates["tuned"]), ("int4wo-cpu", "int4wo-cpu+compile",
                                                                   rates.get("int4wo-cpu"))):
        if rate and name in BYTES_PER_PARAMETER:
            limit = bandwidth * 1e9 / (parameters * BYTES_PER_PARAMETER[name])
            report.add(f"decode tokens/s, 1 stream, in-process: {label} archive ({name}) / its limit (read bandwidth "
                       "/ weight bytes a token)", rate, limit, "tokens/s", True, target=0.5)
    return {"tokens_per_s": {k: round(v, 2) for k, v in rates.items() if not k.startswith("first ")},
            "tokens_per_s_by_prompt_length": by_length, "weights_GBps": weights,
            "first_token_s": {name: round(rates[f"first {name}"], 4) for name in loaded}}


def served(report: Report, work: Path, store: Path, name: str, loaded: Any, rounds: int) -> dict[str, Any]:
    """The best archive through torchserve, streamed: tokens/s between first and last piece, and TTFT."""
    import shutil

    shutil.make_archive(str(work / name), "zip", store / name)
    (work / "mar").mkdir()
    (work / f"{name}.zip").rename(work / "mar" / f"{name}.mar")
    server = TorchServe(work / "ts", work / "mar", {name: f"{name}.mar"}).start()
    try:
        server.wait_ready(name, timeout=900)
        settle_heap()  # the models loaded in this process stay; a full collection of them must not land in a stream
        ends: dict[tuple[int, int], list[float]] = {(new, interval): [] for new in (1, STEPS + 1)
                                                    for interval in STREAM_INTERVALS}
        for _ in range(rounds):
            # the stream's end for 33 tokens less that for 1: the decode steps alone
            for new, interval in ends:
                connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=600)
                started = time.perf_counter()
                connection.request("POST", f"/predictions/{name}",
                                   json.dumps({"prompt": PROMPT, "max_new_tokens": new, "stream": True,
                                               "stream_interval": interval}),
                                   {**server.auth_header("inference"), "Content-Type": "application/json"})
                response = connection.getresponse()
                arrivals = []
                while response.read1(65536):
                    arrivals.append(time.perf_counter() - started)
                connection.close()
                ends[new, interval].append(arrivals[-1])
        rates = {interval: STEPS / (min(ends[STEPS + 1, interval]) - min(ends[1, interval]))
                 for interval in STREAM_INTERVALS}
        # A 1-token request's stream ends when its one token is decoded and sent: the time to the first token
        # whatever text it makes (a random model's token may decode to no text, so its first piece comes later).
        firsts = sorted(ends[1, 1])
        tokenizer, options = loaded.codec.tokenizer, loaded.codec.options
        engine = Engine(loaded.backend.infer, tokenizer, options)
        request = parse({"prompt": PROMPT, "max_new_tokens": STEPS + 1}, tokenizer, options)
        long = min(_timed(lambda: engine.generate(request)) for _ in range(rounds))
        request.max_new_tokens = 1
        short = min(_timed(lambda: engine.generate(request)) for _ in range(rounds))
        ids = request.prompt_ids
        with torch.no_grad():
            prompt_pass = min(_timed(lambda: prefill(loaded.backend.infer, ids, 0, options)) for _ in range(rounds))
        in_process_rate = STEPS / (long - short)
        for interval, rate in rates.items():
            report.add(f"decode tokens/s, 1 stream: {name} served (streamed, stream_interval {interval}) / in-process",
                       rate, in_process_rate, "tokens/s", True, target=0.9)
        report.add(f"time to first token served / one prompt pass in-process ({name})", firsts[len(firsts) // 2] * 1000,
                   prompt_pass * 1000, "ms", False)
        return {"served_tokens_per_s": {interval: round(rate, 2) for interval, rate in rates.items()},
                "served_first_token_ms": round(firsts[len(firsts) // 2] * 1000, 1),
                "prompt_pass_ms": round(prompt_pass * 1000, 1)}
    finally:
        server.stop()


if __name__ == "__main__":
    main()
