#!/usr/bin/env python3
"""The GPU check in one command: install what is missing, archive, serve, measure, write one report.

Run it through ``scripts/gpu_check.sh`` (``make gpu-check``); docs/gpu.md says what it does. This
driver imports nothing beyond the standard library, because it starts on a bare GPU machine's
``python3`` before anything is installed. Every step that needs torch runs in a child process
(``gpu_check_steps.py``), one per phase, so a crash there (a CUDA fault, a killed process) costs
that phase's remaining steps, never the report.

    gpu_check.py [--dry-run] [--budget-s 480] REPORT_DIR

Each step ends ok, failed (with its one-line error) or skipped (with why); a step not started
before the time budget is "not reached". The exit code is 1 when any step failed or was cut
short, 0 otherwise; the targets are findings of the report, not failures of the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS_SCRIPT = Path(__file__).resolve().parent / "gpu_check_steps.py"
WHEELS = ROOT / ".whl"
SITE = ROOT / ".gpu-site"  # where the wheels go: beside the machine's own torch, never over it
MINILM_CARRIED = WHEELS / "all-MiniLM-L6-v2-fp16"

BUDGET_S = 480.0  # the 8 minutes on one GPU
REPORT_RESERVE_S = 10.0  # kept for killing a late phase and writing the report
LAST_START_S = 45.0  # no step starts later than this before the budget's end: a compile takes that long
POLL_S = 0.5
_PRINT = threading.Lock()  # two lanes print progress lines; each line whole

# torchao's wheels are built against one torch minor version; its C++/CUDA kernels load only with that one.
TORCH_FOR_TORCHAO = {"0.18": "2.13"}

# What the GPU machine's python3 may lack: pip name -> module imported. Everything else they need
# at run time (torch, transformers, numpy, packaging, safetensors, tokenizers) comes with a CUDA
# torch + transformers install and is checked by the env step, not installed.
INSTALLED_FROM_WHEELS = {
    "torchao": "torchao", "torchserve": "ts", "torch-model-archiver": "model_archiver", "nvtx": "nvtx",
    "pyyaml": "yaml", "psutil": "psutil", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig",
    "pygments": "pygments",
}
BROUGHT_BY_THE_MACHINE = ("torch", "transformers", "numpy", "packaging", "safetensors", "tokenizers")

FP8DQ_NEEDS = "fp8dq needs a CUDA GPU with compute capability >= 8.9"
INT4WO_PENDING = "int4wo is not a --quantization choice of this version"
STREAMS_PENDING = "many streams at once is not built yet (issue 21)"
# The generation archives a dry run makes: each other one would cost it a worker process (~6-10 s on 2
# cores), and these two take every generation step through the CPU. A GPU run makes them all.
GENERATION_DRY_RUN = ("eager", "int8wo")
TESTS_GPU_NEED = "every test in tests/gpu needs a CUDA device"
PHASES = ("env", "mlp", "minilm", "generation", "tests-gpu", "compiled")


@dataclasses.dataclass
class Profile:
    """How big and how long: the GPU run's settings, or the dry run's tiniest ones on the CPU."""

    dry_run: bool
    device: str  # "cuda:0" or "cpu"
    gpu_id: int | None  # what TorchServe hands the worker; None on the CPU
    mlp_kwargs: dict[str, int]
    rows: tuple[int, ...]  # MLP rows per call measured; the last is also the archive's sample
    texts: int  # MiniLM texts per request
    decode_tokens: int  # decode tokens/s at one stream: (generate N+1 tokens - generate 1) / N
    decode_blocks: int  # timed (1, N+1) pairs; the median of each counts
    warmup: int  # calls before timing
    calls: int  # calls per timed block (model in-process)
    blocks: int  # timed blocks; the median block counts
    worker_calls: int  # calls per block through Service.predict (JSON decode and encode included)
    worker_blocks: int
    mlp_tune: tuple[str, ...]  # --tune flags for the MLP
    minilm_tune: tuple[str, ...]

    @property
    def on_gpu(self) -> bool:
        """True for the real run (cuda:N)."""
        return self.device.startswith("cuda")


def make_profile(dry_run: bool, gpu_id: int = 0) -> Profile:
    """The dry run's tiny CPU profile, or the GPU run's on ``cuda:<gpu_id>``."""
    if dry_run:
        return Profile(dry_run=True, device="cpu", gpu_id=None,
                       mlp_kwargs={"in_features": 64, "hidden": 128, "out_features": 64}, rows=(1, 64), texts=16,
                       decode_tokens=4, decode_blocks=3, warmup=3, calls=10, blocks=3, worker_calls=3, worker_blocks=3,
                       mlp_tune=("--tune-devices", "cpu", "--batch-sizes", "1,4", "--candidates", "eager,int8wo"),
                       minilm_tune=("--batch-sizes", "1,4", "--candidates", "eager,int8wo"))
    # Few compiled candidates: each one compiles for tens of seconds, and the whole run has 8 minutes.
    return Profile(dry_run=False, device=f"cuda:{gpu_id}", gpu_id=gpu_id,
                   mlp_kwargs={"in_features": 1024, "hidden": 4096, "out_features": 1024}, rows=(1, 64), texts=16,
                   decode_tokens=32, decode_blocks=5, warmup=20, calls=200, blocks=7, worker_calls=5, worker_blocks=5,
                   mlp_tune=("--tune-devices", f"cpu,cuda:{gpu_id}", "--batch-sizes", "1,64", "--candidates",
                             "eager,bf16,int8wo,fp8wo,bf16+compile,fp8dq+compile"),
                   minilm_tune=("--batch-sizes", "1,16", "--candidates", "eager,int8wo,int8dq,bf16+compile"))


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One archive the check makes: its family (mlp, minilm, generation), name, flags and phase."""

    family: str
    name: str
    what: str
    flags: tuple[str, ...]
    phase: str
    cuda_only: str = ""  # why it needs CUDA; empty when a CPU runs it too


def archive_specs(profile: Profile) -> list[ArchiveSpec]:
    """Every archive, in the order made: bf16 eager first (the baseline), compile and --tune last (slow)."""
    return [
        ArchiveSpec("mlp", "bf16", "bf16 eager (baseline)", ("--backend", "eager", "--precision", "bf16"), "mlp"),
        ArchiveSpec("mlp", "eager", "fp32 eager", ("--backend", "eager"), "mlp"),
        ArchiveSpec("mlp", "int8wo", "int8wo", ("--quantization", "int8wo"), "mlp"),
        ArchiveSpec("mlp", "int8dq", "int8dq", ("--quantization", "int8dq"), "mlp"),
        ArchiveSpec("mlp", "fp8wo", "fp8wo", ("--quantization", "fp8wo"), "mlp"),
        # torchao's fp8dq figures are compiled ones: the target compares against a compiled fp8dq.
        ArchiveSpec("mlp", "fp8dq", "fp8dq, compiled", ("--quantization", "fp8dq", "--compile"), "mlp", FP8DQ_NEEDS),
        # Also in eager mode: figures for fp8dq even where compiling it fails.
        ArchiveSpec("mlp", "fp8dq-eager", "fp8dq, eager", ("--quantization", "fp8dq"), "mlp", FP8DQ_NEEDS),
        ArchiveSpec("minilm", "int8wo", "int8wo", ("--quantization", "int8wo"), "minilm"),
        # The small Llama folder (scripts/gpu_check_steps.py: generation_folder); bf16 eager first, the baseline.
        ArchiveSpec("generation", "bf16", "bf16 eager (baseline)", ("--backend", "eager", "--precision", "bf16"),
                    "generation"),
        ArchiveSpec("generation", "eager", "fp32 eager", ("--backend", "eager"), "generation"),
        ArchiveSpec("generation", "int8wo", "int8wo", ("--quantization", "int8wo"), "generation"),
        # torchao's CUDA int4 kernel (tinygemm) takes bf16 only; skipped with INT4WO_PENDING where aitune-archive's
        # --quantization has no int4wo (read from its --help).
        ArchiveSpec("generation", "int4wo", "int4wo (bf16)", ("--quantization", "int4wo", "--precision", "bf16"),
                    "generation"),
        ArchiveSpec("generation", "fp8wo", "fp8wo", ("--quantization", "fp8wo"), "generation"),
        ArchiveSpec("generation", "fp8dq", "fp8dq", ("--quantization", "fp8dq"), "generation", FP8DQ_NEEDS),
        ArchiveSpec("mlp", "compile", "fp32 compiled (AOTInductor)", ("--backend", "compile"), "compiled"),
        ArchiveSpec("mlp", "tune", "--tune on " + profile.mlp_tune[1], ("--tune", *profile.mlp_tune), "compiled"),
        ArchiveSpec("minilm", "tune", "--tune on " + profile.device, ("--tune", *profile.minilm_tune), "compiled"),
    ]


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """A step of the plan: what the driver lists, and what a phase process runs."""

    id: str
    phase: str
    kind: str  # env, inputs, archive, serve, pytest
    title: str
    family: str = ""
    name: str = ""
    cuda_only: str = ""
    pending: str = ""  # a feature this version does not have: the step is listed, skipped with this reason


def plan(profile: Profile) -> list[PlannedStep]:
    """Every step in the order run: env first, then each archive followed by its worker."""
    steps = [PlannedStep("env", "env", "env", "machine, versions, torch/torchao match"),
             PlannedStep("inputs", "env", "inputs", "model inputs, the MiniLM folder, what the archiver offers")]
    measured = {"mlp": f"rows/s at {' and '.join(map(str, profile.rows))} rows",
                "minilm": f"texts/s at {profile.texts}",
                "generation": "decode tokens/s at one stream"}
    for phase in PHASES[1:]:
        if phase == "tests-gpu":
            steps.append(PlannedStep("tests-gpu", "tests-gpu", "pytest", "pytest tests/gpu", cuda_only=TESTS_GPU_NEED))
        for spec in archive_specs(profile):
            if spec.phase != phase:
                continue
            steps.append(PlannedStep(f"{spec.family}-{spec.name}-archive", phase, "archive",
                                     f"{spec.family} {spec.what}: archive", spec.family, spec.name, spec.cuda_only))
            steps.append(PlannedStep(f"{spec.family}-{spec.name}-serve", phase, "serve",
                                     f"{spec.family} {spec.what}: a worker loads it, answers, {measured[spec.family]}, "
                                     "memory", spec.family, spec.name, spec.cuda_only))
        if phase == "generation":
            steps.append(PlannedStep("generation-streams-8", phase, "decode", "generation: decode at 8 streams",
                                     "generation", "streams-8", pending=STREAMS_PENDING))
    return steps


def lanes(profile: Profile) -> list[tuple[str, ...]]:
    """The phases after env, as lanes that run side by side: one lane on a GPU, where a compile beside a
    measurement would skew it; two in a dry run, whose figures mean nothing but whose wall time counts."""
    if profile.dry_run:
        return [("mlp", "minilm", "generation", "tests-gpu"), ("compiled",)]
    return [PHASES[1:]]


def torch_mismatch(torch_version: str, torchao_version: str) -> str:
    """A warning line when ``torchao_version`` is not built for ``torch_version``; empty when they match."""
    torchao_minor = ".".join(torchao_version.split("+")[0].split(".")[:2])
    torch_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    wanted = TORCH_FOR_TORCHAO.get(torchao_minor)
    if wanted is None:
        return f"WARNING: no known torch for torchao {torchao_version}: constraints.txt pins torchao 0.18 with torch 2.13"
    if torch_minor != wanted:
        return (f"WARNING: torchao {torchao_version} is built for torch {wanted}, not for torch {torch_version}: "
                "torchao may skip its C++/CUDA kernels (fp8, int4) or fail; the figures are not those of the pinned "
                "versions. Going on.")
    return ""


# -- install ------------------------------------------------------------------------------------

def missing_packages() -> list[str]:
    """The pip names of INSTALLED_FROM_WHEELS that this Python cannot import."""
    return [name for name, module in INSTALLED_FROM_WHEELS.items() if importlib.util.find_spec(module) is None]


def install_missing(missing: list[str], wheels: Path = WHEELS, target: Path = SITE) -> str:
    """Install ``missing`` from ``wheels`` into ``target`` (no index, no dependencies); what was done, one line.

    ``--target`` rather than a venv: the machine's own torch stays untouched, and it works where
    ``python3 -m venv`` is not installed. Without pip the wheels are unpacked as they are.
    """
    if not missing:
        return "nothing to install: this Python has every package the check needs"
    if not wheels.is_dir():
        raise RuntimeError(f"missing {', '.join(missing)} and there is no {wheels}: run scripts/gpu_wheels.sh where "
                           "PyPI is reachable and carry .whl/ along")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
               "--no-deps", "--upgrade", "--target", str(target), "-c", str(ROOT / "constraints.txt"), *missing]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return f"installed from {wheels.name}/ into {target.name}/ with pip: {', '.join(missing)}"
    if "No module named pip" not in done.stderr:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"pip install from {wheels.name}/ failed: {lines[-1] if lines else done.returncode}")
    return unpack_wheels(missing, wheels, target)


def register_source_tree(target: Path = SITE) -> str:
    """Make this tree's aitune-torchserve known to importlib.metadata, as ``pip install -e`` would; one line.

    The archiver writes its own version into every manifest, and a GPU machine runs the project
    from the source tree (on PYTHONPATH) without installing it: building it would need setuptools.
    """
    import configparser
    import importlib.metadata

    try:
        return f"aitune-torchserve {importlib.metadata.version('aitune-torchserve')} is installed"
    except importlib.metadata.PackageNotFoundError:
        pass
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    name, version = setup["metadata"]["name"], setup["metadata"]["version"]
    info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("gpu_check (the source tree, on PYTHONPATH)\n")
    return f"{name} {version} registered from the source tree in {target.name}/"


def unpack_wheels(names: list[str], wheels: Path, target: Path) -> str:
    """Unzip each wheel into ``target``: a wheel's files sit as they would in site-packages."""
    target.mkdir(exist_ok=True)
    for name in names:
        prefix = name.replace("-", "_").lower() + "-"
        found = [path for path in wheels.glob("*.whl") if path.name.lower().startswith(prefix)]
        if not found:
            raise RuntimeError(f"no wheel for {name} in {wheels}: run scripts/gpu_wheels.sh")
        with zipfile.ZipFile(found[0]) as wheel:
            wheel.extractall(target)
    return f"unpacked from {wheels.name}/ into {target.name}/ (no pip here): {', '.join(names)}"


# -- running the phases -------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One run of the check: where it works and reports, its clock, and the records so far."""

    profile: Profile
    report_dir: Path
    work: Path
    started: float  # time.time()
    budget_s: float
    env: dict[str, str]
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    install: str = ""

    @property
    def hard_deadline(self) -> float:
        return self.started + self.budget_s - REPORT_RESERVE_S

    @property
    def last_start(self) -> float:
        return self.started + self.budget_s - LAST_START_S

    def elapsed(self) -> float:
        return time.time() - self.started


def records_file(work: Path, phase: str) -> Path:
    """Where ``phase``'s process appends its records: one file a phase, so lanes never share one."""
    return work / f"records-{phase}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a phase process wrote; a half-written last line is left for the next read."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def run_phase(run: Run, phase: str, steps: list[PlannedStep]) -> None:
    """Run one phase's process, print its steps as they start and end, settle what it left undone."""
    stop = reason_to_stop(run)
    if stop:
        for step in steps:
            mark(run, step, "not reached", stop)
        return
    log_path = run.report_dir / "logs" / f"{phase}.log"
    printed: set[tuple[str, str]] = set()
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, str(STEPS_SCRIPT), "phase", phase, str(run.work)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, env=run.env, start_new_session=True)
        killed = False
        while process.poll() is None:
            print_new_records(run, phase, printed)
            if time.time() > run.hard_deadline and not killed:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the phase and its workers, no more
                killed = True
            time.sleep(POLL_S)
        print_new_records(run, phase, printed)
    settle_phase(run, phase, steps, process.returncode, killed, log_path)


def run_lane(run: Run, phases: tuple[str, ...], steps: list[PlannedStep]) -> None:
    """The lane's phases one after the other."""
    for phase in phases:
        run_phase(run, phase, [step for step in steps if step.phase == phase])


def print_new_records(run: Run, phase: str, printed: set[tuple[str, str]]) -> None:
    """Print ``phase``'s records not printed yet; keep the ends in ``run.records``."""
    for record in read_records(records_file(run.work, phase)):
        key = (record["id"], record["event"])
        if key in printed:
            continue
        printed.add(key)
        if record["event"] == "start":
            say(run, f"{record['id']}: {record['title']} ...")
        else:
            run.records[record["id"]] = record
            detail = f": {record['reason']}" if record.get("reason") else ""
            say(run, f"{record['id']}: {record['status']} ({record['seconds']:.1f} s){detail}")


def settle_phase(run: Run, phase: str, steps: list[PlannedStep], returncode: int, killed: bool, log: Path) -> None:
    """Steps the phase did not end: the first failed (killed while running, or the process died), the rest
    not reached. A process that died between two steps fails the next one, so that the run fails."""
    started = {record["id"] for record in read_records(records_file(run.work, phase)) if record["event"] == "start"}
    unended = [step for step in steps if step.id not in run.records]
    for index, step in enumerate(unended):
        if killed:
            if step.id in started:
                mark(run, step, "failed", f"stopped at the time budget ({run.budget_s:.0f} s)")
            else:
                mark(run, step, "not reached", f"time budget ({run.budget_s:.0f} s) spent")
        elif index == 0:
            mark(run, step, "failed", f"the phase process died (exit {returncode}): {tail(log)}")
        else:
            mark(run, step, "not reached", f"the phase process died before it (exit {returncode})")


def mark(run: Run, step: PlannedStep, status: str, reason: str) -> None:
    """Record an outcome the driver decides (not reached, killed) and print it."""
    run.records[step.id] = {"id": step.id, "event": "end", "status": status, "reason": reason, "seconds": 0.0,
                            "data": {}}
    say(run, f"{step.id}: {status}: {reason}")


def say(run: Run, line: str) -> None:
    """One progress line, with the seconds since the start."""
    with _PRINT:
        print(f"[{run.elapsed():5.0f}s] {line}", flush=True)


def tail(path: Path) -> str:
    """The last non-empty line of a log, shortened."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1].strip()[:300] if lines else "(no output)"


# -- the report ---------------------------------------------------------------------------------

def build_report(run: Run, steps: list[PlannedStep], exit_code: int) -> dict[str, Any]:
    """Everything the check found, as one JSON-able dict (the markdown is made from it)."""
    from gpu_check_report import measurements, targets

    ordered = []
    for step in steps:
        record = run.records.get(step.id, {"status": "not reached", "reason": "not run", "seconds": 0.0, "data": {}})
        ordered.append({"id": step.id, "phase": step.phase, "title": step.title, "status": record["status"],
                        "reason": record.get("reason", ""), "skip_kind": record.get("skip_kind", ""),
                        "seconds": round(record.get("seconds", 0.0), 2), "cuda_only": step.cuda_only,
                        "data": record.get("data", {})})
    counts = {status: sum(1 for step in ordered if step["status"] == status)
              for status in ("ok", "failed", "skipped", "not reached")}
    env = run.records.get("env", {}).get("data", {})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "dry run" if run.profile.dry_run else "gpu",
        "profile": dataclasses.asdict(run.profile),
        "budget_s": run.budget_s,
        "wall_s": round(run.elapsed(), 1),
        "exit_code": exit_code,
        "counts": counts,
        "install": run.install,
        "env": env,
        "warnings": env.get("warnings", []),
        "steps": ordered,
    }
    report["measurements"] = measurements(report)
    report["targets"] = targets(report)
    return report


def write_report(report: dict[str, Any], report_dir: Path) -> tuple[Path, Path]:
    """``gpu_check.json`` and ``gpu_check.md`` in ``report_dir``."""
    from gpu_check_report import markdown

    json_path, md_path = report_dir / "gpu_check.json", report_dir / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The GPU check: archive, serve, measure, report (docs/gpu.md)")
    parser.add_argument("report_dir", nargs="?", type=Path, help="where the report goes (made if missing)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with the tiniest models, CUDA steps skipped")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="no step starts after this (default 480)")
    parser.add_argument("--gpu-id", type=int, default=0, help="the GPU a worker is handed (default 0)")
    parser.add_argument("--keep-work", action="store_true", help="keep the archives and inputs (a temporary folder)")
    parser.add_argument("--missing", action="store_true", help="print the packages this Python lacks, and exit")
    parser.add_argument("--check-torch", metavar="VERSION", help="say whether torch VERSION fits torchao, and exit")
    args = parser.parse_args(argv)
    if args.report_dir is None and not (args.missing or args.check_torch):
        parser.error("give the report folder")
    return args


def child_env(profile: Profile) -> dict[str, str]:
    """The phase processes' environment: aitune_core from this tree, then what was installed from .whl."""
    paths = [str(ROOT), str(SITE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # The phases' logs go to files, unbuffered so that a crash keeps its last lines.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    if len(lanes(profile)) > 1:
        # Lanes side by side: torch's OpenMP threads would spin against the other lane's (each op ~100x slower).
        env["OMP_NUM_THREADS"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    """Install, run every phase within the budget, write the report; 1 when a step failed."""
    args = parse_args(argv)
    if args.missing:
        print(" ".join(missing_packages()))
        return 0
    if args.check_torch:
        line = torch_mismatch(args.check_torch, "0.18.0")
        print(line or f"torch {args.check_torch} fits torchao 0.18.0")
        return 0
    profile = make_profile(args.dry_run, args.gpu_id)
    report_dir = args.report_dir.resolve()
    (report_dir / "logs").mkdir(parents=True, exist_ok=True)
    for old in (report_dir / "logs").glob("*.log"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run = Run(profile=profile, report_dir=report_dir, work=work, started=time.time(), budget_s=args.budget_s,
              env=child_env(profile))
    steps = plan(profile)
    (work / "config.json").write_text(json.dumps({
        "profile": dataclasses.asdict(profile), "last_start": run.last_start, "repo": str(ROOT),
        "minilm_carried": str(MINILM_CARRIED)}))
    mode = "dry run on the CPU (tiniest models)" if profile.dry_run else f"GPU run on {profile.device}"
    print(f"GPU check: {mode}; report in {report_dir}; budget {args.budget_s:.0f} s; python {sys.executable}", flush=True)
    try:
        try:
            run.install = f"{install_missing(missing_packages())}; {register_source_tree()}"
        except RuntimeError as error:
            run.install = f"FAILED: {error}"
        say(run, f"install: {run.install}")
        run_phase(run, "env", [step for step in steps if step.phase == "env"])
        threads = [threading.Thread(target=run_lane, args=(run, lane, steps)) for lane in lanes(profile)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        exit_code = 1 if any(record["status"] == "failed" for record in run.records.values()) else 0
        if run.install.startswith("FAILED"):
            exit_code = 1
        report = build_report(run, steps, exit_code)
        json_path, md_path = write_report(report, report_dir)
    finally:
        if args.keep_work:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    counts, verdicts = report["counts"], [target["verdict"] for target in report["targets"]]
    print(f"GPU check done in {report['wall_s']:.0f} s: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} skipped, {counts['not reached']} not reached; targets: {', '.join(verdicts)}")
    print(f"report: {md_path}\n        {json_path}")
    return exit_code


def reason_to_stop(run: Run) -> str:
    """Why no further phase starts (empty: go on): the budget, a failed install, or no CUDA for a GPU run."""
    if time.time() > run.last_start:
        return f"time budget ({run.budget_s:.0f} s): no step starts in its last {LAST_START_S:.0f} s"
    if run.install.startswith("FAILED"):
        return "the packages the check needs could not be installed (see install)"
    env = run.records.get("env")
    if env is not None and env["status"] != "ok":
        return f"the env step failed: {env.get('reason', '')}"
    inputs = run.records.get("inputs")
    if inputs is not None and inputs["status"] != "ok":
        return f"the inputs step failed: {inputs.get('reason', '')}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
