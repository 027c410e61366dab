"""The GPU check's report: the figures pulled out of the step records, the targets, and the markdown.

Standard library only (the driver runs on a bare python3). Every ratio is taken within one run:
MLP rows/s against the bf16 eager archive, MiniLM texts/s against its int8wo archive, decode tokens/s
against the generation bf16 eager archive.
"""

from __future__ import annotations

from typing import Any

MLP_ORDER = ("bf16", "eager", "compile", "int8wo", "int8dq", "fp8wo", "fp8dq", "fp8dq-eager", "tune")
GENERATION_ORDER = ("bf16", "eager", "int8wo", "int4wo", "fp8wo", "fp8dq")
FP32_GENERATION = "eager"  # whose greedy tokens the others' are compared with
BASELINE = "bf16"
FP8DQ_TARGET = 1.2  # x bf16 eager rows/s at 64 rows
INT4_DECODE_TARGET = 2.0  # x bf16 decode tokens/s at one stream
MEMORY_LEFT_PCT = 5.0


def _steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in report["steps"]}


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value and baseline else None


def measurements(report: dict[str, Any]) -> dict[str, Any]:
    """Per family, one row per archive: accuracy, speed and ratios, worker start, memory."""
    steps = _steps(report)
    rows_measured = [str(rows) for rows in report["profile"]["rows"]]

    def row(family: str, name: str) -> dict[str, Any] | None:
        archive, serve = steps.get(f"{family}-{name}-archive"), steps.get(f"{family}-{name}-serve")
        if archive is None:
            return None
        return {"name": name, "what": archive["title"].split(": ")[0].split(" ", 1)[1],
                "archive": archive["status"], "archive_reason": archive["reason"],
                "serve": serve["status"] if serve else None, "serve_reason": serve["reason"] if serve else "",
                **{f"archive_{key}": value for key, value in archive["data"].items() if key != "path"},
                "memory": {}, **(serve["data"] if serve else {})}

    mlp = [r for r in (row("mlp", name) for name in MLP_ORDER) if r is not None]
    baseline = next((r for r in mlp if r["name"] == BASELINE), {})
    for r in mlp:
        for key in ("model_rows_per_s", "worker_rows_per_s"):
            r[key.replace("rows_per_s", "ratio")] = {
                rows: _ratio(r.get(key, {}).get(rows), baseline.get(key, {}).get(rows)) for rows in rows_measured}
    minilm = [r for r in (row("minilm", name) for name in ("int8wo", "tune")) if r is not None]
    reference = next((r for r in minilm if r["name"] == "int8wo"), {})
    for r in minilm:
        r["ratio"] = _ratio(r.get("texts_per_s"), reference.get("texts_per_s"))
    generation = [r for r in (row("generation", name) for name in GENERATION_ORDER) if r is not None]
    baseline = next((r for r in generation if r["name"] == BASELINE), {})
    fp32_tokens = next((r for r in generation if r["name"] == FP32_GENERATION), {}).get("tokens")
    for r in generation:
        r["ratio"] = _ratio(r.get("decode_tokens_per_s"), baseline.get("decode_tokens_per_s"))
        if fp32_tokens and r.get("tokens") is not None:  # greedy tokens in common with fp32 eager, from the first
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], fp32_tokens)) if a != b),
                        min(len(r["tokens"]), len(fp32_tokens)))
            r["same_as_fp32"] = f"{same} of {len(fp32_tokens)}"
    pending = [{"id": step["id"], "title": step["title"], "status": step["status"], "reason": step["reason"]}
               for step in report["steps"] if step["id"].startswith("generation-")
               and step.get("skip_kind") == "pending" and not step["id"].endswith(("-archive", "-serve"))]
    return {"mlp": mlp, "minilm": minilm, "generation": generation, "generation_pending": pending,
            "rows": rows_measured}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: met, missed, or not measured (and why)."""
    found = report["measurements"]
    on_gpu = report["mode"] == "gpu"
    where = "" if on_gpu else " (dry run: CPU figures, not the GPU's)"
    results = []

    rows = found["rows"][-1]
    fp8dq = next((r for r in found["mlp"] if r["name"] == "fp8dq"), {})
    ratio = fp8dq.get("model_ratio", {}).get(rows)
    eager = next((r for r in found["mlp"] if r["name"] == "fp8dq-eager"), {}).get("model_ratio", {}).get(rows)
    why_not = fp8dq.get("serve_reason") or fp8dq.get("archive_reason") or "not measured"
    results.append(_target(f"fp8dq >= {FP8DQ_TARGET}x bf16 eager rows/s at {rows} rows (MLP, compiled)",
                           ratio, None if ratio is None else ratio >= FP8DQ_TARGET, f"{ratio}x" if ratio else "",
                           why_not + (f" (fp8dq in eager mode: {eager}x)" if eager else "")))

    int4 = next((r for r in found["generation"] if r["name"] == "int4wo"), {})
    ratio = int4.get("ratio")
    results.append(_target(f"int4wo decode >= {INT4_DECODE_TARGET}x bf16 tokens/s at one stream" + where, ratio,
                           None if ratio is None else ratio >= INT4_DECODE_TARGET, f"{ratio}x" if ratio else "",
                           int4.get("archive_reason") if int4.get("archive") != "ok"
                           else int4.get("serve_reason") or "not measured"))

    made = [(family, r) for family in ("mlp", "minilm", "generation") for r in found[family] if r["archive"] == "ok"]
    archives = [r for _, r in made]
    misses = [f"{family} {r['name']}" for family, r in made if not _within_gate(r)]
    served = sum(1 for r in archives if r.get("served_cosine") is not None)
    results.append(_target("every archive within its accuracy gate on the GPU" + where, len(archives) or None,
                           None if not archives else not misses,
                           f"{len(archives) - len(misses)} of {len(archives)} archives (served answers checked for "
                           f"{served})" + (f"; below: {', '.join(misses)}" if misses else ""), "no archive made"))

    memory = [r for family in ("mlp", "minilm", "generation") for r in found[family]
              if r.get("memory", {}).get("returned") is not None]
    kept = [f"{r['name']} {r['memory']['left_after_deactivate_pct']}%" for r in memory if not r["memory"]["returned"]]
    worst = max((r["memory"]["left_after_deactivate_pct"] or 0 for r in memory), default=None)
    results.append(_target(f"deactivate returns the module's memory (within {MEMORY_LEFT_PCT:.0f}% of before deploy)",
                           worst, None if not memory else not kept,
                           f"{len(memory)} archives: at most {worst}% of what activate took is left after deactivate"
                           + (f"; kept: {', '.join(kept)}" if kept else ""),
                           "needs CUDA (torch.cuda.memory_allocated): dry run" if not on_gpu else "not measured"))
    return results


def _within_gate(r: dict[str, Any]) -> bool:
    """An archive's gate at archive time (generation: top-1 agreement and KL; else cosine), and its served answer."""
    if "archive_generation_gate" in r:
        gate = r["archive_generation_gate"] or {}
        return bool(gate.get("top1") is not None and gate.get("kl") is not None and gate["top1"] >= gate["min_top1"]
                    and gate["kl"] <= gate["max_kl"])
    if r.get("archive_cosine") is None or r.get("archive_min_cosine") is None:
        return False
    return r["archive_cosine"] >= r["archive_min_cosine"] and not (
        r.get("served_cosine") is not None and r["served_cosine"] < (r.get("gate") or 0))


def _target(name: str, value: Any, met: bool | None, measured: str, why_not: str) -> dict[str, Any]:
    verdict = "not measured" if met is None else ("met" if met else "missed")
    return {"target": name, "value": value, "verdict": verdict, "measured": measured if met is not None else why_not}


# -- markdown -----------------------------------------------------------------------------------

def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 1 or digits > 3 else f"{value:.{max(digits, 3)}g}"
    return str(value)


def _gate(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def _status(row: dict[str, Any]) -> str:
    """Why a row has no figures: the first step that did not end ok."""
    if row["archive"] != "ok":
        return f"archive {row['archive']}: {row['archive_reason']}"
    if row.get("serve") != "ok":
        return f"serve {row.get('serve')}: {row.get('serve_reason', '')}"
    return ""


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: verdicts first, then the ratio tables, then every step."""
    found, env, counts = report["measurements"], report["env"], report["counts"]
    profile = report["profile"]
    dry = report["mode"] != "gpu"
    title = "dry run (CPU, tiniest models)" if dry else f"{env.get('gpu', 'GPU')} ({profile['device']})"
    out = [f"# GPU check: {title}", "",
           f"{report['date']}; {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
           f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped, "
           f"{counts['not reached']} not reached; exit code {report['exit_code']}.", ""]
    if dry:
        out += ["A dry run: the same steps on the CPU with the tiniest models (MLP "
                f"{profile['mlp_kwargs']['in_features']}-{profile['mlp_kwargs']['hidden']}-"
                f"{profile['mlp_kwargs']['out_features']}, a 2-layer BERT, a 2-layer Llama), the CUDA-only steps "
                "skipped. Its figures "
                "only show that every step runs; they say nothing about a GPU.", ""]
    for warning in report["warnings"]:
        out += [f"**{warning}**", ""]

    versions = env.get("versions", {})
    gpu = (f"{env['gpu']}, compute capability {env['capability'][0]}.{env['capability'][1]}, "
           f"{env['gpu_memory_gb']} GiB, {env['gpu_count']} visible" if env.get("gpu") else "none (CPU)")
    out += ["## Machine", ""] + _table(["", ""], [
        ["GPU", gpu], ["CPU", env.get("cpu", "-") or "-"],
        ["python", f"{env.get('python', '-')} ({env.get('executable', '-')})"],
        ["torch", f"{env.get('torch', '-')} (CUDA {env.get('cuda_build') or 'none'})"],
        ["torchao / torchserve / torch-model-archiver",
         " / ".join(str(versions.get(name)) for name in ("torchao", "torchserve", "torch-model-archiver"))],
        ["transformers / numpy", f"{versions.get('transformers')} / {versions.get('numpy')}"],
        ["install", report["install"]],
    ]) + [""]

    out += ["## Targets", ""] + _table(["target", "verdict", "measured"], [
        [t["target"], t["verdict"], t["measured"]] for t in report["targets"]]) + [""]

    rows = found["rows"]
    mlp_size = "-".join(str(profile["mlp_kwargs"][key]) for key in ("in_features", "hidden", "out_features"))
    out += [f"## MLP {mlp_size}: rows/s against bf16 eager, one run", "",
            "In-process: the worker's deployed backend, inputs already on the device, median of "
            f"{profile['blocks']} blocks of {profile['calls']} calls. Worker: the same worker through TorchServe's "
            "`Service.predict` with a JSON request (decode, handler, encode). Start: a fresh worker process from spawn "
            "to its first two right answers (imports, load, deploy, warm-up).", ""]
    header = (["archive", "backend", "cosine (gate)", "served cosine"]
              + [f"rows/s @{r}" for r in rows] + [f"x bf16 @{r}" for r in rows]
              + [f"worker rows/s @{r}" for r in rows] + ["start s", "MB"])
    table = []
    for r in found["mlp"]:
        why = _status(r)
        table.append([r["name"], r.get("describe") or r.get("archive_describe") or r["what"],
                      f"{_num(r.get('archive_cosine'), 6)} ({_gate(r.get('archive_min_cosine'))})",
                      _num(r.get("served_cosine"), 6)]
                     + [_num(r.get("model_rows_per_s", {}).get(n), 0) for n in rows]
                     + [_num(r.get("model_ratio", {}).get(n), 2) for n in rows]
                     + [_num(r.get("worker_rows_per_s", {}).get(n), 0) for n in rows]
                     + [_num(r.get("start_s"), 2), _num(r.get("archive_mb"), 2)])
        if why:
            table[-1][1] = f"{table[-1][1]} ({why})"
    out += _table(header, table) + [""]
    tuned = next((r for r in found["mlp"] if r["name"] == "tune" and r.get("archive_variants")), None)
    if tuned:
        out += ["`--tune` kept: " + "; ".join(f"{v['name']}: {v['describe']}" for v in tuned["archive_variants"]), ""]

    out += [f"## MiniLM: texts/s at {profile['texts']} texts a request, through the worker", ""]
    out += _table(["archive", "backend", "cosine (gate)", "texts/s", "x int8wo", "related / unrelated", "start s", "MB"],
                  [[r["name"], (r.get("describe") or r["what"]) + (f" ({_status(r)})" if _status(r) else ""),
                    f"{_num(r.get('archive_cosine'), 6)} ({_gate(r.get('archive_min_cosine'))})",
                    _num(r.get("texts_per_s"), 1), _num(r.get("ratio"), 2),
                    f"{_num(r.get('related'), 3)} / {_num(r.get('unrelated'), 3)}", _num(r.get("start_s"), 2),
                    _num(r.get("archive_mb"), 2)] for r in found["minilm"]]) + [""]

    out += decode_section(found, profile)

    out += ["## Memory: deploy, then deactivate", "",
            "torch.cuda.memory_allocated in MB, in each archive's worker process: before it loads, after `deploy` "
            "(TorchServe's loader), after the worker's model is dropped, after `activate` of a second load of the "
            "checkpoint (a DEPLOYED backend cannot be deactivated), after its `deactivate`. Returned: what "
            "`deactivate` leaves is at most 5% of what `activate` took.", ""]
    memory_rows = []
    for family in ("mlp", "minilm", "generation"):
        for r in found[family]:
            mb = r["memory"].get("mb", {})
            if not mb:
                continue
            cells = [_num(mb.get(key), 1) if mb.get(key) is not None else "n/a (CPU)"
                     for key in ("before", "after_deploy", "after_release", "after_activate", "after_deactivate")]
            returned = r["memory"].get("returned")
            verdict = "-" if returned is None else (
                f"{'yes' if returned else 'no'} ({r['memory']['left_after_deactivate_pct']}% left)")
            memory_rows.append([f"{family} {r['name']}", *cells, verdict])
    out += _table(["archive", "before", "deploy", "dropped", "activate", "deactivate", "returned"],
                  memory_rows or [["(no worker measured)", "", "", "", "", "", ""]]) + [""]

    out += ["## Steps", ""] + _table(["step", "status", "s", "detail"], [
        [step["id"], step["status"], f"{step['seconds']:.1f}", step["reason"] or _detail(step)]
        for step in report["steps"]]) + [""]
    for kind, words in (("cuda-only", "CUDA-only steps skipped here"), ("pending", "Waiting for a feature of this "
                        "project"), ("input", "Skipped for a model folder not on this machine"),
                        ("after-failure", "Skipped after a failed step"),
                        ("dry-run", "Left out of the dry run for time")):
        ids = [step["id"] for step in report["steps"] if step["status"] == "skipped" and step["skip_kind"] == kind]
        if ids:
            out += [f"{words}: {', '.join(ids)}.", ""]
    not_reached = [step["id"] for step in report["steps"] if step["status"] == "not reached"]
    if not_reached:
        out += [f"Not reached: {', '.join(not_reached)}.", ""]
    return "\n".join(out)


def decode_section(found: dict[str, Any], profile: dict[str, Any]) -> list[str]:
    """The Decode table: each generation archive's gate, its served request, decode tokens/s against bf16."""
    tokens = profile["decode_tokens"]
    out = ["## Decode: tokens/s at one stream against bf16 eager, one run", "",
           "The small Llama of `tests/models/llm_folders.py`. Gate: aitune-archive's generation gate on the build "
           "device (teacher-forced top-1 agreement with fp32, and mean KL from it, over 8 held prompts). Served: a "
           f"worker (TorchServe's loader) answers `{{\"prompt\", \"max_new_tokens\": {tokens}}}` twice, the same as "
           "the engine in process; same as fp32: greedy tokens in common with the fp32 eager archive's, from the "
           f"first. Decode tokens/s: `Engine.generate` of {tokens + 1} new tokens and of 1, {tokens} / (difference of "
           f"the medians of {profile['decode_blocks']}), synchronized: the decode steps only, prefill left out.", ""]
    rows = []
    for r in found["generation"]:
        gate = r.get("archive_generation_gate") or {}
        why = _status(r) or (f"the default gate refuses it; archived with {gate['opened']} to measure it"
                             if gate.get("opened") else "")
        top1_missed = gate and gate.get("top1") is not None and gate["top1"] < gate["min_top1"]
        kl_missed = gate and gate.get("kl") is not None and gate["kl"] > gate["max_kl"]
        backend = r.get("describe") or r.get("archive_describe") or r["what"]
        rows.append([r["name"], backend + (f" ({why})" if why else ""),
                     f"{_num(gate.get('top1'), 4)} (>= {_gate(gate.get('min_top1'))}){' MISSED' if top1_missed else ''}"
                     if gate else "-",
                     f"{_num(gate.get('kl'), 5)} (<= {_gate(gate.get('max_kl'))}){' MISSED' if kl_missed else ''}"
                     if gate else "-",
                     _served(r), r.get("same_as_fp32", "-"), _num(r.get("decode_tokens_per_s"), 1),
                     _num(r.get("ratio"), 2), _num(r.get("first_token_s") and 1000 * r["first_token_s"], 1),
                     _num(r.get("start_s"), 2), _num(r.get("archive_mb"), 2)])
    out += _table(["archive", "backend", "top-1 (gate)", "KL (gate)", "served", "same as fp32",
                   "tokens/s @1 stream", "x bf16", "first token ms", "start s", "MB"],
                  rows or [["(no generation archive)"] + [""] * 10]) + [""]
    for step in found.get("generation_pending", []):
        out += [f"{step['title'].split(': ', 1)[-1].capitalize()}: {step['status']}: {step['reason']}.", ""]
    return out


def _served(r: dict[str, Any]) -> str:
    """The served answer in a few words: finish reason and tokens."""
    answer = r.get("answer")
    if not answer:
        return "-"
    usage = answer.get("usage", {})
    return f"{answer.get('finish_reason')}, {usage.get('prompt_tokens')}+{usage.get('completion_tokens')} tokens"


def _detail(step: dict[str, Any]) -> str:
    """A few words of what an ok step found."""
    data = step["data"]
    if "summary" in data:
        return data["summary"]
    if data.get("generation_gate"):
        gate = data["generation_gate"]
        opened = f"; below the default gate, archived with {gate['opened']}" if gate.get("opened") else ""
        return (f"{data.get('describe')}, top-1 {_num(gate.get('top1'), 4)}, KL {_num(gate.get('kl'), 5)}, "
                f"{data.get('mb')} MB{opened}")
    if "cosine" in data:
        return f"{data.get('describe')}, cosine {_num(data['cosine'], 6)}, {data.get('mb')} MB"
    if "decode_tokens_per_s" in data:
        return (f"a worker on {data.get('device')} answered {data['start_s']:.2f} s after its start; "
                f"{_num(data['decode_tokens_per_s'], 1)} tokens/s at one stream")
    if "start_s" in data:
        return f"a worker on {data.get('device')} answered {data['start_s']:.2f} s after its start"
    if "torch" in data:
        return f"torch {data['torch']}, CUDA {'yes' if data.get('cuda_available') else 'no'}"
    if "features" in data:
        features = data["features"]
        return (f"--hf-model {'yes' if features.get('hf_model') else 'no'}, text-generation "
                f"{'yes' if features.get('text_generation') else 'no'}, quantizations {','.join(features.get('quantizations', []))}")
    return ""
