"""Tuning: build every candidate backend, gate its accuracy, time it, and pick one by a strategy.

Candidates: eager, compile (inductor, ahead of time), a precision (bf16, fp16), a torchao quantization
and this project's CPU weight-only kernels (int8wo-cpu, int4wo-cpu), each with and without +compile, and
quantizations combined with a precision. A
candidate the device cannot run fast (bf16 on a CPU without AMX/AVX-512 BF16, fp8dq below compute
capability 8.9) is out with what it needs. Every candidate meets one accuracy gate (``--min-cosine``,
default 0.999), so tuning never buys speed with accuracy the user did not choose to give; a compiled
candidate whose uncompiled twin already missed the gate is out without being compiled. A quantization
that misses the gate is tried again with its costliest layers kept in float (aitune_core.float_layers),
and its +compile twin is built with the same layers kept. The strategy scores the rest from their
timings; eager is always measured and wins unless the best candidate beats it by more than the noise
(the larger of ``min_gain`` and eager's own spread, p90 / median - 1).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aitune_core.accuracy import Accuracy, compare_outputs
from aitune_core.backend import Backend
from aitune_core.backends import quantization_of
from aitune_core.backends.compile import TorchCompileBackend, TorchCompileBackendConfig
from aitune_core.backends.eager import TorchEagerBackend, TorchEagerBackendConfig
from aitune_core.backends.torchao import (
    FP8_DYNAMIC_MIN_CAPABILITY,
    QUANTIZATIONS,
    TorchAOBackend,
    TorchAOBackendConfig,
)
from aitune_core.backends.weight_only import WEIGHT_FORMATS, WeightOnlyBackend, WeightOnlyBackendConfig
from aitune_core.checkpoint import CHECKPOINT_NAME
from aitune_core.errors import UnsupportedDeviceError
from aitune_core.float_layers import float_layers_for_gate
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.precision import CUDA_CAPABILITY_FOR, PRECISIONS, missing_support
from aitune_core.variants import ANY_DEVICE, Variant

logger = logging.getLogger(__name__)

STRATEGIES = ("max-throughput", "min-latency", "latency-budget")
EAGER = "eager"
COMPILED = "+compile"
TUNE_MIN_COSINE = 0.999  # the one accuracy gate of every candidate, unless --min-cosine says otherwise
# Quantizations worth combining with a precision (torchao's int8 paths take bf16/fp16 activations).
MIXED_QUANTIZATIONS = ("int8wo", "int8dq")
OPT_IN_QUANTIZATION = "int4wo"  # int4wo and int4wo-cpu
# This project's CPU weight-only kernels (the weight-only backend), by candidate name.
KERNEL_QUANTIZATIONS = {f"{name}-cpu": weight_format for name, weight_format in WEIGHT_FORMATS.items()}


@dataclasses.dataclass
class TuneOptions:
    """How to tune: the CLI's ``--tune`` flags."""

    strategy: str = "max-throughput"
    budget_ms: float | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    candidates: tuple[str, ...] | None = None  # names from candidate_names(); None: default_candidate_names()
    repeats: int = 20
    max_seconds: float = 1.5  # per candidate and batch size, after warm-up; at least 3 timed calls
    min_gain: float = 0.05
    keep_float: bool = True  # a quantization that misses the gate is tried with its costliest layers in float

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.strategy == "latency-budget" and (self.budget_ms is None or self.budget_ms <= 0):
            raise ValueError("--strategy latency-budget needs --budget-ms X (a positive number of ms)")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))


@dataclasses.dataclass
class Candidate:
    """A backend to try: ``make`` returns it fresh (INIT)."""

    name: str
    make: Callable[[], Backend]


def candidate_names() -> list[str]:
    """Every candidate name, each uncompiled one just before its +compile twin: eager, compile, bf16,
    bf16+compile, fp16, ..., int8wo, int8wo+compile, ..., then int8wo+bf16+compile and the like."""
    bases = [*PRECISIONS, *QUANTIZATIONS, *KERNEL_QUANTIZATIONS]
    names = [EAGER, "compile"] + [f"{base}{suffix}" for base in bases for suffix in ("", COMPILED)]
    return names + [f"{q}+{p}{COMPILED}" for q in MIXED_QUANTIZATIONS for p in PRECISIONS]


def default_candidate_names() -> list[str]:
    """What ``--tune`` tries when ``--candidates`` is not given: every candidate but int4wo, which is tried only
    when named (torchao's CPU int4 kernel reads its weights several times slower than an fp32 matmul on the
    CPUs measured, docs/benchmarks.md, and int4 rarely holds an encoder's 0.999 cosine)."""
    return [name for name in candidate_names() if not name.startswith(OPT_IN_QUANTIZATION)]


def parse_candidate(name: str) -> tuple[str | None, str | None, bool]:
    """``name`` as (quantization, precision, compiled): "int8dq+bf16+compile" -> ("int8dq", "bf16", True)."""
    if name not in candidate_names():
        raise ValueError(f"Unknown tuning candidate {name!r}: expected some of {', '.join(candidate_names())}")
    parts = [part for part in name.split("+") if part != EAGER]
    compiled = parts[-1:] == ["compile"]
    parts = parts[:-1] if compiled else parts
    quantization = next((part for part in parts if part in QUANTIZATIONS or part in KERNEL_QUANTIZATIONS), None)
    precision = next((part for part in parts if part in PRECISIONS), None)
    return quantization, precision, compiled


def make_candidate(name: str, skip_modules: list[str] | None = None) -> Candidate:
    """The candidate called ``name`` (see candidate_names); a quantization leaves ``skip_modules`` in float."""
    quantization, precision, compiled = parse_candidate(name)
    if quantization in KERNEL_QUANTIZATIONS:
        weight_format = KERNEL_QUANTIZATIONS[quantization]
        return Candidate(name, lambda: WeightOnlyBackend(WeightOnlyBackendConfig(
            weight_format=weight_format, compile=compiled, skip_modules=list(skip_modules or []))))
    if quantization is not None:
        return Candidate(name, lambda: TorchAOBackend(TorchAOBackendConfig(
            quantization=quantization, precision=precision, compile=compiled, skip_modules=list(skip_modules or []))))
    if compiled:
        return Candidate(name, lambda: TorchCompileBackend(TorchCompileBackendConfig(precision=precision)))
    return Candidate(name, lambda: TorchEagerBackend(TorchEagerBackendConfig(precision=precision)))


def uncompiled_twin(name: str) -> str | None:
    """The candidate that differs from ``name`` only by not being compiled (same numerics, bar rounding)."""
    if name == "compile":
        return EAGER
    return name.removesuffix(COMPILED) if name.endswith(COMPILED) else None


@dataclasses.dataclass
class Timing:
    """Latency of one call at a batch size, and the rows per second it gives."""

    median_ms: float
    p90_ms: float
    rows_per_s: float


@dataclasses.dataclass
class CandidateResult:
    """One candidate's figures and what became of it."""

    name: str
    describe: str = ""
    quantization: str | None = None
    precision: str | None = None
    skip_modules: list[str] = dataclasses.field(default_factory=list)  # layers kept in float
    accuracy: Accuracy | None = None
    min_cosine: float | None = None
    build_s: float = 0.0
    first_call_s: float = 0.0  # the first inference: includes torch.compile's compilation
    size_bytes: int = 0
    timings: dict[int, Timing] = dataclasses.field(default_factory=dict)
    outcome: str = ""
    backend: Backend | None = None  # the built backend, for a candidate that passed the gate

    @property
    def eligible(self) -> bool:
        return self.backend is not None and bool(self.timings)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, backend=None))
        data.pop("backend")
        return data


@dataclasses.dataclass
class TuneReport:
    """Every candidate on one device, the winner and why."""

    device: str
    options: TuneOptions
    results: list[CandidateResult]
    winner: str
    reason: str

    def result(self, name: str) -> CandidateResult:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "strategy": self.options.strategy, "budget_ms": self.options.budget_ms,
                "batch_sizes": list(self.options.batch_sizes), "winner": self.winner, "reason": self.reason,
                "candidates": [r.to_dict() for r in self.results]}

    def table(self) -> str:
        """A markdown table of every candidate."""
        sizes = self.options.batch_sizes
        head = (["candidate", "cosine (gate)", "build s", "first call s", "size MB"]
                + [f"b{b} p50/p90 ms" for b in sizes] + [f"b{b} rows/s" for b in sizes] + ["outcome"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.results:
            name = f"{r.name} ({len(r.skip_modules)} layers in float)" if r.skip_modules else r.name
            accuracy = f"{r.accuracy.cosine:.6f} ({r.min_cosine})" if r.accuracy else "-"
            latency = [f"{r.timings[b].median_ms:.2f}/{r.timings[b].p90_ms:.2f}" if b in r.timings else "-" for b in sizes]
            rate = [f"{r.timings[b].rows_per_s:.0f}" if b in r.timings else "-" for b in sizes]
            size = f"{r.size_bytes / 1e6:.2f}" if r.size_bytes else "-"
            row = [name, accuracy, f"{r.build_s:.2f}", f"{r.first_call_s:.2f}", size,
                   *latency, *rate, r.outcome]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def chart(self, path: Path) -> bool:
        """A PNG bar chart of rows/s per candidate and batch size; False when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        measured = [r for r in self.results if r.timings]
        figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(measured)), 4))
        sizes = self.options.batch_sizes
        width = 0.8 / len(sizes)
        for index, size in enumerate(sizes):
            values = [r.timings[size].rows_per_s if size in r.timings else 0 for r in measured]
            axis.bar([i + index * width for i in range(len(measured))], values, width, label=f"batch {size}")
        axis.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(measured))],
                        [f"{r.name}{' *' if r.name == self.winner else ''}" for r in measured], rotation=20)
        axis.set_yscale("log")
        axis.set_ylabel("rows / s (log)")
        axis.set_title(f"{self.options.strategy} on {self.device}: {self.winner} chosen (*)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return True


def _checkpoint_bytes(backend: Backend) -> int:
    buffer = io.BytesIO()
    torch.save(backend.to_dict(), buffer)
    return buffer.tell()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(backend: Backend, sample: Sample, batch_sizes: tuple[int, ...], options: TuneOptions,
                 device: torch.device) -> dict[int, Timing]:
    """Median and p90 latency per batch size: two warm-up calls (recompiles happen there), then timed calls."""
    timings = {}
    for size in batch_sizes:
        batch = sample.with_rows(size)
        for _ in range(2):
            batch.run(backend.infer)
        _sync(device)
        latencies: list[float] = []
        deadline = time.perf_counter() + options.max_seconds
        while len(latencies) < options.repeats and (len(latencies) < 3 or time.perf_counter() < deadline):
            started = time.perf_counter()
            batch.run(backend.infer)
            _sync(device)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        median = statistics.median(latencies)
        p90 = latencies[min(len(latencies) - 1, math.ceil(0.9 * len(latencies)) - 1)]
        timings[size] = Timing(median_ms=median * 1000, p90_ms=p90 * 1000, rows_per_s=size / median)
    return timings


def measure_candidate(candidate: Candidate, module: torch.nn.Module, graph_spec: GraphSpec, samples: list[Sample],
                      reference: list[Any], device: torch.device, options: TuneOptions,
                      min_cosine: float | None, twin: CandidateResult | None = None) -> CandidateResult:
    """Build, gate and time one candidate; its outcome says why it is out, if it is.

    ``twin`` is its uncompiled twin's result: when that missed the gate, this one is out unbuilt.
    """
    result = CandidateResult(name=candidate.name)
    backend = candidate.make()
    result.describe, result.quantization = backend.describe(), quantization_of(backend)
    result.precision = getattr(backend.config, "precision", None)
    result.skip_modules = list(getattr(backend.config, "skip_modules", []))
    result.min_cosine = TUNE_MIN_COSINE if min_cosine is None else min_cosine
    try:
        backend.check_device(device)
    except UnsupportedDeviceError as error:
        needs = str(error).split(": ", 1)[-1].split(";")[0]
        result.outcome = f"out: {device} cannot run it ({needs})"
        return result
    slow = missing_support(result.precision, device)
    if slow is not None:
        result.outcome = f"out: {device} has no fast {result.precision} (needs {slow})"
        return result
    if twin is not None and twin.accuracy is not None and not twin.accuracy.cosine >= result.min_cosine:
        result.accuracy = twin.accuracy
        result.outcome = (f"out: accuracy cosine {twin.accuracy.cosine:.6f} < gate {result.min_cosine} "
                          f"(measured on {twin.name}, not compiled)")
        return result
    if backend.compile_settings is not None:
        torch._dynamo.reset()  # each compiled candidate starts from a clean dynamo cache
    try:
        started = time.perf_counter()
        backend.build(module, graph_spec, samples, device)
        result.build_s = time.perf_counter() - started
        started = time.perf_counter()
        outputs = [samples[0].run(backend.infer)]
        result.first_call_s = time.perf_counter() - started
        outputs += [sample.run(backend.infer) for sample in samples[1:]]
        result.accuracy = compare_outputs(reference, outputs)
    except Exception as error:  # a candidate that cannot run this model is out, not fatal
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        result.outcome = f"out: {type(error).__name__}: {reason}"
        return result
    if not result.accuracy.cosine >= result.min_cosine:
        result.outcome = f"out: accuracy cosine {result.accuracy.cosine:.6f} < gate {result.min_cosine}"
        return result
    result.size_bytes = _checkpoint_bytes(backend)
    result.timings = time_backend(backend, samples[0], options.batch_sizes, options, device)
    result.backend = backend
    return result


def _score(result: CandidateResult, options: TuneOptions) -> tuple[float, int] | None:
    """Higher is better, and the batch size it was scored at; None when the strategy rules it out."""
    if options.strategy == "max-throughput":
        size = options.batch_sizes[-1]
        return result.timings[size].rows_per_s, size
    if options.strategy == "min-latency":
        size = options.batch_sizes[0]
        return 1 / result.timings[size].median_ms, size
    fitting = [(t.rows_per_s, size) for size, t in result.timings.items() if t.p90_ms <= options.budget_ms]
    return max(fitting) if fitting else None


def choose(results: list[CandidateResult], options: TuneOptions) -> tuple[str, str]:
    """The winner's name and why; sets every result's outcome."""
    eager = next(r for r in results if r.name == EAGER)
    if not eager.eligible:
        raise RuntimeError(f"The eager baseline could not be measured: {eager.outcome}")
    scored = {r.name: _score(r, options) for r in results if r.eligible}
    fitting = {name: score for name, score in scored.items() if score is not None}
    if not fitting:
        best = min((r for r in results if r.eligible), key=lambda r: r.timings[options.batch_sizes[0]].p90_ms)
        reason = (f"no candidate's p90 fits {options.budget_ms} ms at any batch size; "
                  f"{best.name} has the lowest p90 at batch {options.batch_sizes[0]}")
        winner = best.name
    else:
        winner = max(fitting, key=lambda name: fitting[name][0])
        unit = "speed (1 / median latency)" if options.strategy == "min-latency" else "rows/s"
        budget = f", p90 within the {options.budget_ms} ms budget" if options.strategy == "latency-budget" else ""
        reason = f"the best {unit} at batch {fitting[winner][1]}{budget}"
        runners_up = sorted((name for name in fitting if name != winner), key=lambda name: -fitting[name][0])
        if runners_up:
            reason += f"; next {runners_up[0]} ({fitting[runners_up[0]][0] / fitting[winner][0] - 1:+.0%})"
        if winner != EAGER and scored[EAGER] is not None:
            size = fitting[winner][1]
            gain = fitting[winner][0] / scored[EAGER][0] - 1
            noise = max(options.min_gain, eager.timings[size].p90_ms / eager.timings[size].median_ms - 1)
            if gain <= noise:
                reason = (f"the best, {winner}, was only {gain:+.1%} {unit} against eager, within the noise "
                          f"({noise:.1%}): eager kept")
                winner = EAGER
            else:
                reason = f"{gain:+.1%} {unit} against eager at batch {size} (noise {noise:.1%}){budget}"
    for r in results:
        if r.name == winner:
            r.outcome = "chosen"
        elif r.eligible:
            r.outcome = "lost: " + ("p90 over the budget at every batch size" if r.name not in fitting and fitting
                                    else f"{options.strategy} score below {winner}")
    return winner, reason


def tune(module: torch.nn.Module, graph_spec: GraphSpec, samples: list[Sample], reference: list[Any],
         device: torch.device, options: TuneOptions, min_cosine: float | None = None,
         candidates: list[Candidate] | None = None,
         progress: Callable[[str], None] = logger.info) -> TuneReport:
    """Measure every candidate on ``device`` against ``reference`` (the original's outputs) and choose."""
    if candidates is None:
        names = list(options.candidates or default_candidate_names())
        candidates = [make_candidate(name) for name in ([EAGER] + [n for n in names if n != EAGER])]
    elif not any(c.name == EAGER for c in candidates):
        candidates = [make_candidate(EAGER), *candidates]
    results = []
    for index, candidate in enumerate(candidates):
        done = round(20 * index / len(candidates))
        progress(f"tuning [{'#' * done}{'.' * (20 - done)}] {index + 1}/{len(candidates)} {candidate.name} on {device}")
        twin = next((r for r in results if r.name == uncompiled_twin(candidate.name)), None)
        if twin is not None and twin.skip_modules:  # the twin passed with these layers in float
            candidate = make_candidate(candidate.name, twin.skip_modules)
        result = measure_candidate(candidate, module, graph_spec, samples, reference, device, options, min_cosine,
                                   twin)
        # A twin measured already settled the layers kept in float (or that none are enough).
        if options.keep_float and missed_the_gate(result) and result.quantization and twin is None \
                and candidate.name in candidate_names():
            result = keep_layers_in_float(candidate.name, result, module, graph_spec, samples, reference, device,
                                          options, min_cosine, progress)
        results.append(result)
        if result.outcome:
            progress(f"  {candidate.name}: {result.outcome}")
    winner, reason = choose(results, options)
    progress(f"tuning [{'#' * 20}] done on {device}: {reason}")
    return TuneReport(device=str(device), options=options, results=results, winner=winner, reason=reason)


def missed_the_gate(result: CandidateResult) -> bool:
    return result.accuracy is not None and result.outcome.startswith("out: accuracy")


def keep_layers_in_float(name: str, missed: CandidateResult, module: torch.nn.Module, graph_spec: GraphSpec,
                         samples: list[Sample], reference: list[Any], device: torch.device, options: TuneOptions,
                         min_cosine: float | None, progress: Callable[[str], None]) -> CandidateResult:
    """``name`` measured again with its costliest layers kept in float, or ``missed`` when that does not
    pass the gate either. Layer costs are measured without compiling (compiling does not change them)."""
    progress(f"  {name}: {missed.outcome.removeprefix('out: ')}: keeping its costliest layers in float")

    def make(skip: list[str]) -> Backend:
        return make_candidate(name.removesuffix(COMPILED), skip).make()

    found = float_layers_for_gate(make, module, graph_spec, samples, reference, device, missed.min_cosine, progress)
    if found is None:
        missed.outcome += "; keeping up to half its layers in float did not pass it either"
        return missed
    return measure_candidate(make_candidate(name, found.names), module, graph_spec, samples, reference, device,
                             options, min_cosine)


def needs_capability(result: CandidateResult, device_type: str) -> tuple[int, int] | None:
    """The CUDA compute capability a candidate needs to run (fast) on a GPU, if any: fp8dq 8.9, bf16 8.0,
    fp16 7.0; None for a CPU."""
    if device_type != "cuda":
        return None
    needs = [FP8_DYNAMIC_MIN_CAPABILITY] if result.quantization == "fp8dq" else []
    if result.precision is not None:
        needs.append(CUDA_CAPABILITY_FOR[result.precision])
    return max(needs, default=None)


def pick_variants(reports: list[TuneReport]) -> list[tuple[Variant, CandidateResult]]:
    """Per tuned device its winner; for GPUs too old for that winner, the best candidate they can run;
    and eager for any device when no variant runs on a CPU. The first is the archive's primary."""
    picked: list[tuple[Variant, CandidateResult]] = []

    def add(name: str, device_type: str, result: CandidateResult, reason: str) -> None:
        names = {variant.name for variant, _ in picked}
        unique = name if name not in names else f"{name}-{len(picked)}"
        capability = needs_capability(result, device_type)
        checkpoint = CHECKPOINT_NAME if not picked else f"checkpoint-{unique}.pt"
        picked.append((Variant(unique, checkpoint, device_type, capability, result.describe, reason,
                               backend=result.backend.name), result))

    for report in reports:
        device_type = torch.device(report.device).type
        winner = report.result(report.winner)
        capability = needs_capability(winner, device_type)
        suffix = f"-sm{capability[0]}{capability[1]}" if capability else ""
        add(f"{device_type}{suffix}", device_type, winner, f"{report.winner} won on {report.device}: {report.reason}")
        if capability:
            others = [r for r in report.results if r.eligible and needs_capability(r, device_type) is None]
            fallback = max(others, key=lambda r: _score(r, report.options) or (0, 0))
            add(device_type, device_type, fallback,
                f"{fallback.name}: the best candidate on {report.device} that older GPUs can run")
    if not any(variant.device_type in ("cpu", ANY_DEVICE) for variant, _ in picked):
        eager = reports[0].result(EAGER)
        add("eager", ANY_DEVICE, eager, "fallback for a device no tuned variant runs on (e.g. a CPU worker)")
    return picked

