"""The GPU check's dry run on this CPU, so that scripts/gpu_check.sh cannot rot between GPU runs.

``gpu_check.sh --dry-run`` runs every step of the GPU run with the tiniest models (~75 s on 2 cores);
the CUDA-only steps are skipped and listed, and of the generation archives only eager and int8wo are
made (the others are listed as left out). ``gpu_wheels.sh --list`` says what it would download.
"""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_step_that_needs_no_cuda(tmp_path):
    report_dir = tmp_path / "report"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(report_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((report_dir / "gpu_check.json").read_text())
    assert report["mode"] == "dry run"
    steps = {step["id"]: step for step in report["steps"]}

    for step in steps.values():
        if step["cuda_only"]:
            assert step["status"] == "skipped" and step["skip_kind"] == "cuda-only", step
            assert step["reason"].startswith("CUDA-only: "), step
        elif step["status"] != "ok":
            # Only a feature this build does not have yet, or the dry run's shorter list of generation archives,
            # may keep a step from running here, with its reason.
            assert step["status"] == "skipped" and step["skip_kind"] in ("pending", "dry-run") and step["reason"], step
            assert step["skip_kind"] == "pending" or step["id"].startswith("generation-"), step
    for step_id in ("mlp-fp8dq-archive", "mlp-fp8dq-serve", "generation-fp8dq-archive", "tests-gpu"):
        assert steps[step_id]["skip_kind"] == "cuda-only"
    for step_id in ("generation-int4wo-archive", "generation-int4wo-serve"):  # a --quantization choice now
        assert steps[step_id]["skip_kind"] == "dry-run", steps[step_id]
    assert steps["generation-streams-8"]["reason"] == "many streams at once is not built yet (issue 21)"
    for name in ("bf16", "eager", "compile", "int8wo", "int8dq", "fp8wo", "tune"):
        assert steps[f"mlp-{name}-archive"]["status"] == "ok"
        served = steps[f"mlp-{name}-serve"]
        assert served["status"] == "ok", served
        assert served["data"]["served_cosine"] >= served["data"]["gate"]
        assert set(served["data"]["model_rows_per_s"]) == {"1", "64"}
        assert served["data"]["start_s"] > 0
        assert set(served["data"]["memory"]["mb"]) >= {"before", "after_deploy", "after_deactivate"}
    for name in ("eager", "int8wo"):
        gate = steps[f"generation-{name}-archive"]["data"]["generation_gate"]
        assert gate["passed"] and gate["top1"] >= gate["min_top1"] and gate["kl"] <= gate["max_kl"], gate
        served = steps[f"generation-{name}-serve"]
        assert served["status"] == "ok", served
        answer = served["data"]["answer"]
        assert set(answer) == {"text", "finish_reason", "usage"} and answer["usage"]["completion_tokens"] >= 1
        assert served["data"]["decode_tokens_per_s"] > 0 and served["data"]["start_s"] > 0

    markdown = (report_dir / "gpu_check.md").read_text()
    assert "rows/s against bf16 eager" in markdown
    assert "| x bf16 @1 | x bf16 @64 |" in markdown
    assert "| bf16 | TorchEagerBackend(precision='bf16') |" in markdown
    assert "CUDA-only steps skipped here: " in markdown
    assert "## Targets" in markdown and "fp8dq >= 1.2x bf16 eager" in markdown
    assert "| not measured | left out of the dry run for time" in markdown  # int4wo: a worker each
    assert "## Decode: tokens/s at one stream against bf16 eager" in markdown
    assert "| int8wo | TorchAOBackend(quantization_config=Int8WeightOnlyConfig()) | 0.9" in markdown
    assert "Decode at 8 streams: skipped: many streams at once is not built yet (issue 21)." in markdown
    assert (report_dir / "logs" / "mlp.log").stat().st_size > 0


def test_wheels_list_says_what_it_would_fetch_without_fetching(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--list", "--torch", "2.9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for line in ("torchao==0.18.0", "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml==6.0.4",
                 "psutil==7.2.2", "nvtx==0.2.17", "pytest==9.2.0"):
        assert line in done.stdout
    assert "CPython 3.12" in done.stdout
    assert "torchao 0.18.0 is built for torch 2.13, not for torch 2.9" in done.stdout
    assert "Saved" not in done.stdout + done.stderr
