"""``--tune`` for text generation: every candidate built, held to the generation gate, ranked by decode tokens/s.

Decoding one token reads every weight once, so the ranking is one stream's decode rate (32 steps after a short
prompt, the prompt's pass left out), not the rows/s of a batch the encoder tuner scores. Candidates are named
as for ``--tune`` (``aitune_core.tune``); the gate is the one for generation (``gate.py``), the same for all.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from aitune_core.backend import Backend
from aitune_core.errors import ArchiveError, UnsupportedDeviceError
from aitune_core.generate import gate
from aitune_core.generate.engine import Engine
from aitune_core.generate.prepare import Prepared
from aitune_core.generate.request import parse
from aitune_core.graph_spec import GraphSpec
from aitune_core.precision import missing_support
from aitune_core.tune import EAGER, make_candidate

CANDIDATES = ("eager", "compile", "bf16+compile", "int8wo+compile", "int4wo+compile", "int8dq+compile",
              "fp8wo+compile", "int8wo-cpu+compile", "int4wo-cpu+compile")
STEPS = 32


@dataclasses.dataclass
class Ranked:
    """One candidate's line in the generation tuning table."""

    name: str
    describe: str = ""
    top1: float | None = None
    kl: float | None = None
    tokens_per_s: float | None = None
    build_s: float = 0.0
    outcome: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decode_rate(infer: Callable[..., torch.Tensor], tokenizer: Any, options: Any, repeats: int = 3) -> float:
    """One stream's decode tokens/s: STEPS / (time of STEPS + 1 new tokens - time of 1), best of ``repeats``."""
    engine = Engine(infer, tokenizer, options)
    engine.eos = set()  # a model that ends early would be timed on fewer steps
    long = parse({"prompt": gate.HELD_PROMPTS[2], "max_new_tokens": STEPS + 1}, tokenizer, options)
    short = dataclasses.replace(long, max_new_tokens=1)

    def best(request: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.generate(request)
            times.append(time.perf_counter() - started)
        return min(times)

    best(short)  # warm
    return STEPS / max(best(long) - best(short), 1e-9)


def tune_generation(prepared: Prepared, graph_spec: GraphSpec, device: torch.device, names: tuple[str, ...] | None,
                    min_top1: float | None, max_kl: float | None,
                    progress: Callable[[str], None]) -> tuple[Backend, list[Ranked], str]:
    """The fastest candidate within the gate (built, ACTIVE), every candidate's line, and why it won."""
    names = [EAGER, *[name for name in (names or CANDIDATES) if name != EAGER]]
    rows, built = [], {}
    for index, name in enumerate(names):
        progress(f"tuning {index + 1}/{len(names)} {name} on {device}")
        backend = make_candidate(name).make()
        row = Ranked(name=name, describe=backend.describe())
        rows.append(row)
        precision = getattr(backend.config, "precision", None)
        try:
            backend.check_device(device)
        except UnsupportedDeviceError as error:
            row.outcome = f"out: {device} cannot run it ({str(error).split(': ', 1)[-1].split(';')[0]})"
            continue
        slow = missing_support(precision, device)
        if slow is not None:
            row.outcome = f"out: {device} has no fast {precision} (needs {slow})"
            continue
        if backend.compile_settings is not None:
            torch._dynamo.reset()
        try:
            started = time.perf_counter()
            backend.build(prepared.module, graph_spec, prepared.samples, device)
            row.build_s = round(time.perf_counter() - started, 1)
            result = prepared.measure_gate(backend.infer, min_top1, max_kl)
            row.top1, row.kl = round(result.top1, 4), round(result.kl, 5)
            if not result.passed:
                row.outcome = f"out: generation gate ({result.describe()})"
                continue
            row.tokens_per_s = round(decode_rate(backend.infer, prepared.tokenizer, prepared.options), 2)
        except Exception as error:  # a candidate that cannot run this decoder is out, not fatal
            row.outcome = f"out: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
            continue
        built[name] = backend
        progress(f"  {name}: {row.tokens_per_s} tokens/s, top-1 {row.top1}, KL {row.kl}")
    if EAGER not in built:
        raise ArchiveError(f"--tune: the eager baseline could not be measured: {rows[0].outcome}")
    winner = max(built, key=lambda name: next(r.tokens_per_s for r in rows if r.name == name))
    eager_rate = rows[0].tokens_per_s
    for row in rows:
        if row.name == winner:
            row.outcome = "chosen"
        elif not row.outcome:
            row.outcome = f"lost: {row.tokens_per_s / next(r.tokens_per_s for r in rows if r.name == winner) - 1:+.0%}"
    reason = (f"{winner}: {next(r.tokens_per_s for r in rows if r.name == winner) / eager_rate:.2f}x the eager "
              f"fp32 decoder's decode tokens/s at one stream, within the generation gate")
    return built[winner], rows, reason


def table(rows: list[Ranked]) -> str:
    """The tuning table as markdown."""
    lines = ["| candidate | top-1 | KL | build s | decode tokens/s | outcome |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.top1 if row.top1 is not None else '-'} | "
                     f"{row.kl if row.kl is not None else '-'} | {row.build_s} | "
                     f"{row.tokens_per_s if row.tokens_per_s is not None else '-'} | {row.outcome} |")
    return "\n".join(lines)
