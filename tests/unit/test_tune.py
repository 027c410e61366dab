"""Tuning: the strategy picks what the measurements say, accuracy gates come first, variants by device."""

import json
import time
import zipfile

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model, parse_args
from aitune_core.backends import TorchEagerBackend
from aitune_core.checkpoint import MANIFEST_NAME
from aitune_core.errors import ArchiveError, UnsupportedDeviceError
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.tune import (
    Candidate,
    CandidateResult,
    Timing,
    TuneOptions,
    TuneReport,
    candidate_names,
    choose,
    default_candidate_names,
    make_candidate,
    parse_candidate,
    pick_variants,
    tune,
)
from aitune_core.variants import Variant, choose_variant
from models.builders import MODELS, mlp_inputs
from models.small import seeded_mlp

SAMPLE = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
QUICK = dict(batch_sizes=(1, 4), repeats=5, max_seconds=0.2)


class Sleepy(torch.nn.Module):
    """An MLP whose forward waits ``delay`` seconds: what a slow kernel looks like from outside."""

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__()
        self.mlp = seeded_mlp()
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.mlp(x)


class FastBackend(TorchEagerBackend):
    """Made fast on purpose: drops the module's wait."""

    def _build(self, module, graph_spec, data, device, cache_dir):
        super()._build(module, graph_spec, data, device, cache_dir)
        self._module.delay = 0.0


class SlowBackend(TorchEagerBackend):
    """Made slow on purpose: waits 20 ms more per call."""

    def _infer(self, *args, **kwargs):
        time.sleep(0.02)
        return super()._infer(*args, **kwargs)


class WrongBackend(FastBackend):
    """The fastest of all, and wrong: its outputs are noise."""

    def _infer(self, *args, **kwargs):
        return torch.randn_like(super()._infer(*args, **kwargs))


def run_tune(candidates, module=None, min_cosine=None, **options):
    module = module or Sleepy()
    samples = [Sample.of(SAMPLE)]
    spec, reference = GraphSpec.record(module, samples)
    return tune(module, spec, samples, reference, torch.device("cpu"), TuneOptions(**{**QUICK, **options}),
                min_cosine=min_cosine, candidates=candidates, progress=lambda line: None)


@pytest.mark.parametrize("strategy, budget", [("max-throughput", None), ("min-latency", None),
                                              ("latency-budget", 5.0)])
def test_the_strategy_picks_the_fast_backend_and_never_the_slow_one(strategy, budget):
    report = run_tune([Candidate("slow", SlowBackend), Candidate("fast", FastBackend)],
                      strategy=strategy, budget_ms=budget)
    assert report.winner == "fast", report.table()
    assert [r.name for r in report.results] == ["eager", "slow", "fast"]
    slow, fast, eager = report.result("slow"), report.result("fast"), report.result("eager")
    assert slow.timings[1].median_ms > eager.timings[1].median_ms > fast.timings[1].median_ms
    assert slow.outcome.startswith("lost") and eager.outcome.startswith("lost")


def test_a_candidate_that_fails_accuracy_is_never_chosen():
    report = run_tune([Candidate("wrong", WrongBackend), Candidate("slow", SlowBackend)])
    wrong = report.result("wrong")
    assert wrong.outcome.startswith("out: accuracy cosine") and not wrong.timings
    assert report.winner == "eager"


def test_slower_than_eager_keeps_eager():
    report = run_tune([Candidate("slow", SlowBackend)], module=seeded_mlp())
    assert report.winner == "eager"
    assert report.result("slow").outcome == "lost: max-throughput score below eager"


def result(name, rows_per_s, spread=0.02, quantization=None, sizes=(1, 8)):
    timings = {b: Timing(median_ms=1000 * b / rows_per_s, p90_ms=1000 * b / rows_per_s * (1 + spread),
                         rows_per_s=rows_per_s) for b in sizes}
    return CandidateResult(name=name, quantization=quantization, timings=timings, backend=TorchEagerBackend())


def test_a_gain_within_the_noise_keeps_eager():
    results = [result("eager", 1000), result("int8wo", 1030)]
    winner, reason = choose(results, TuneOptions(batch_sizes=(1, 8)))
    assert winner == "eager" and "within the noise" in reason
    winner, reason = choose([result("eager", 1000), result("int8wo", 1300)], TuneOptions(batch_sizes=(1, 8)))
    assert winner == "int8wo" and "+30.0% rows/s against eager at batch 8" in reason


def test_noise_is_at_least_eagers_own_spread():
    results = [result("eager", 1000, spread=0.5), result("compile", 1400)]
    assert choose(results, TuneOptions(batch_sizes=(1, 8)))[0] == "eager"


def test_latency_budget_takes_the_best_throughput_that_fits():
    eager = result("eager", 1000)  # b8 takes 8 ms
    fast_small = result("compile", 3000)  # b8 takes 2.7 ms
    options = TuneOptions(strategy="latency-budget", budget_ms=3.0, batch_sizes=(1, 8))
    winner, reason = choose([eager, fast_small], options)
    assert winner == "compile" and "p90 within the 3.0 ms budget" in reason
    assert eager.outcome == "lost: latency-budget score below compile"
    nothing_fits = TuneOptions(strategy="latency-budget", budget_ms=0.01, batch_sizes=(1, 8))
    winner, reason = choose([result("eager", 1000), result("compile", 3000)], nothing_fits)
    assert winner == "compile" and "no candidate's p90 fits" in reason


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "fastest"}, "Unknown strategy 'fastest'"),
    ({"strategy": "latency-budget"}, "needs --budget-ms"),
    ({"batch_sizes": (0, 8)}, "--batch-sizes must be positive"),
])
def test_bad_tune_options(changes, message):
    with pytest.raises(ValueError, match=message):
        TuneOptions(**changes)


def test_unknown_candidate():
    with pytest.raises(ValueError, match="Unknown tuning candidate 'int4'"):
        make_candidate("int4")
    with pytest.raises(ValueError, match="Unknown tuning candidate 'compile\\+int8wo'"):
        make_candidate("compile+int8wo")


@pytest.mark.parametrize("name, parsed, describe", [
    ("eager", (None, None, False), "TorchEagerBackend()"),
    ("compile", (None, None, True), "TorchCompileBackend()"),
    ("bf16", (None, "bf16", False), "TorchEagerBackend(precision='bf16')"),
    ("fp16+compile", (None, "fp16", True), "TorchCompileBackend(precision='fp16')"),
    ("int8wo", ("int8wo", None, False), "TorchAOBackend(quantization_config=Int8WeightOnlyConfig())"),
    ("int8dq+bf16+compile", ("int8dq", "bf16", True),
     "TorchAOBackend(quantization_config=Int8DynamicActivationInt8WeightConfig(),precision='bf16',compile=True)"),
    ("int4wo+compile", ("int4wo", None, True),
     "TorchAOBackend(quantization_config=PrototypeInt4WeightOnlyConfig(),compile=True)"),
])
def test_candidate_names_say_quantization_precision_and_compile(name, parsed, describe):
    assert name in candidate_names()
    assert (name in default_candidate_names()) == (not name.startswith("int4wo"))  # int4wo only when named
    assert parse_candidate(name) == parsed
    assert make_candidate(name).make().describe() == describe


def test_every_candidate_meets_one_gate_and_a_compiled_twin_of_a_miss_is_not_built():
    report = run_tune([make_candidate(name) for name in ("int8dq", "int8dq+compile", "int8wo")], module=seeded_mlp(),
                      min_cosine=0.99999)
    int8dq, compiled, int8wo = (report.result(name) for name in ("int8dq", "int8dq+compile", "int8wo"))
    assert {r.min_cosine for r in report.results} == {0.99999}
    assert int8dq.outcome.startswith("out: accuracy cosine 0.99")
    assert compiled.outcome == (f"out: accuracy cosine {int8dq.accuracy.cosine:.6f} < gate 0.99999 "
                                "(measured on int8dq, not compiled)")
    assert compiled.build_s == 0 and compiled.backend is None
    default = run_tune([make_candidate("int8wo")], module=seeded_mlp())
    assert {r.min_cosine for r in default.results} == {0.999}


def test_a_cpu_without_native_bf16_leaves_bf16_out(monkeypatch):
    import aitune_core.precision

    no_bf16 = {"amx_bf16": False, "avx512_bf16": False}
    monkeypatch.setattr(aitune_core.precision, "cpu_features", lambda: no_bf16)
    report = run_tune([make_candidate(name) for name in ("bf16", "int8dq+bf16+compile")], module=seeded_mlp())
    for name in ("bf16", "int8dq+bf16+compile"):
        assert report.result(name).outcome == ("out: cpu has no fast bf16 (needs a CPU with amx_bf16 or "
                                               "avx512_bf16)"), name
    monkeypatch.setattr(aitune_core.precision, "cpu_features", lambda: {**no_bf16, "amx_bf16": True})
    report = run_tune([make_candidate("bf16")], module=seeded_mlp())
    bf16 = report.result("bf16")
    assert bf16.eligible and bf16.accuracy.cosine >= 0.999 and bf16.precision == "bf16"


def report_with(winner_result, others, device="cuda:0"):
    results = [result("eager", 1000), winner_result, *others]
    return TuneReport(device=device, options=TuneOptions(batch_sizes=(1, 8)), results=results,
                      winner=winner_result.name, reason="measured")


def test_variants_for_an_fp8dq_winner_cover_older_gpus_and_cpus():
    fp8dq = result("fp8dq", 5000, quantization="fp8dq")
    int8wo = result("int8wo", 2000, quantization="int8wo")
    variants = [variant for variant, _ in pick_variants([report_with(fp8dq, [int8wo])])]
    assert [(v.name, v.device_type, v.min_capability) for v in variants] == [
        ("cuda-sm89", "cuda", (8, 9)), ("cuda", "cuda", None), ("eager", "any", None)]
    assert variants[0].checkpoint == "checkpoint.pt"
    cpu = torch.device("cpu")
    assert choose_variant(variants, torch.device("cuda:0"), capability=(9, 0))[0].name == "cuda-sm89"
    chosen, why = choose_variant(variants, torch.device("cuda:1"), capability=(8, 0))
    assert chosen.name == "cuda" and "skipped 'cuda-sm89' (needs a CUDA GPU with compute capability >= 8.9)" in why
    chosen, why = choose_variant(variants, cpu)
    assert chosen.name == "eager" and "skipped 'cuda-sm89'" in why and "'cuda' (needs a CUDA GPU)" in why


def test_a_cpu_tuned_archive_has_one_variant_and_no_variant_is_an_error():
    eager_won = report_with(result("eager", 1000), [], device="cpu")
    eager_won.results = eager_won.results[1:]
    variants = [variant for variant, _ in pick_variants([eager_won])]
    assert [(v.name, v.device_type) for v in variants] == [("cpu", "cpu")]
    gpu_only = [Variant("cuda", "checkpoint.pt", "cuda", None, "x", "tuned on cuda:0")]
    with pytest.raises(UnsupportedDeviceError, match="No variant in this archive runs on cpu"):
        choose_variant(gpu_only, torch.device("cpu"))


def test_archive_with_tune_keeps_the_report_and_serves_the_winner(tmp_path):
    weights, samples = mlp_inputs(tmp_path / "inputs")
    options = ArchiveOptions(model_name="tuned", model_file=MODELS / "small.py", weights=weights, samples=samples,
                             export_path=tmp_path / "store",
                             tune=TuneOptions(candidates=("int8wo", "int8dq", "fp8dq"), **QUICK))
    lines = []
    archived = archive_model(options, progress=lines.append)
    assert any(line.startswith("tuning [") for line in lines)
    report = archived.tuning[0]
    assert [r.name for r in report.results] == ["eager", "int8wo", "int8dq", "fp8dq"]
    assert report.result("fp8dq").outcome.startswith("out: cpu cannot run it (it needs a CUDA GPU with compute capability >= 8.9")
    with zipfile.ZipFile(archived.archive_path) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read(MANIFEST_NAME))
        table = archive.read("tuning_report.md").decode()
    assert {"tuning_report.json", "tuning_report.md", "tuning_report-0.png"} <= names
    assert all(name in table for name in ("eager", "int8wo", "int8dq", "fp8dq"))
    assert manifest["variants"][0]["checkpoint"] == "checkpoint.pt"
    assert manifest["tuning"][0]["winner"] == report.winner
    assert manifest["describe"] == report.result(report.winner).describe


def test_tune_cli_flags():
    options = parse_args(["--model-name", "m", "--model-file", "m.py", "--sample", "s.pt", "--tune",
                          "--strategy", "latency-budget", "--budget-ms", "5", "--batch-sizes", "1,4",
                          "--candidates", "eager,int8wo+compile"])
    assert options.tune == TuneOptions(strategy="latency-budget", budget_ms=5.0, batch_sizes=(1, 4),
                                       candidates=("eager", "int8wo+compile"))
    with pytest.raises(SystemExit):
        parse_args(["--model-name", "m", "--model-file", "m.py", "--sample", "s.pt", "--budget-ms", "5"])
    with pytest.raises(SystemExit):
        parse_args(["--model-name", "m", "--model-file", "m.py", "--sample", "s.pt", "--tune", "--quantization", "int8dq"])


def test_unknown_candidate_in_archive_options_writes_nothing(tmp_path):
    weights, samples = mlp_inputs(tmp_path / "inputs")
    with pytest.raises(ArchiveError, match="--candidates: unknown int3"):
        archive_model(ArchiveOptions(model_name="m", model_file=MODELS / "small.py", weights=weights,
                                     samples=samples, export_path=tmp_path / "store",
                                     tune=TuneOptions(candidates=("int3",))))
    assert not (tmp_path / "store").exists()


class OneFragileLayer(torch.nn.Module):
    """Four layers; the second sees one feature 1000x the others, a feature it ignores: int8 activations
    scaled to that outlier lose everything else, so that one layer costs all the accuracy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(4)])
        with torch.no_grad():
            self.layers[1].weight[:, 0] = 0

    def forward(self, x):
        x = self.layers[0](x) * torch.tensor([1000.0] + [1.0] * 31)
        for layer in self.layers[1:]:
            x = torch.relu(layer(x))
        return x


def test_a_quantization_that_misses_the_gate_keeps_its_costliest_layer_in_float():
    report = run_tune([make_candidate(name) for name in ("int8dq", "int8dq+compile")], module=OneFragileLayer().eval())
    int8dq, compiled = report.result("int8dq"), report.result("int8dq+compile")
    assert int8dq.skip_modules == compiled.skip_modules == ["layers.1"]
    assert int8dq.eligible and compiled.eligible and int8dq.accuracy.cosine >= 0.999
    assert compiled.backend.config.skip_modules == ["layers.1"] and compiled.backend.config.compile
    assert "| int8dq (1 layers in float) |" in report.table()
    plain = run_tune([make_candidate("int8dq")], module=OneFragileLayer().eval(), keep_float=False)
    assert plain.result("int8dq").outcome.startswith("out: accuracy cosine 0.9")


def test_keeping_half_the_layers_in_float_is_the_limit():
    from aitune_core.float_layers import float_layers_for_gate, linear_layers

    module = OneFragileLayer().eval()
    samples = [Sample.of(SAMPLE)]
    spec, reference = GraphSpec.record(module, samples)
    made = []

    def make(skip):
        made.append(skip)
        return make_candidate("int8dq", skip).make()

    assert float_layers_for_gate(make, module, spec, samples, reference, torch.device("cpu"), 1.01,
                                 progress=lambda line: None) is None
    assert max(len(skip) for skip in made[len(linear_layers(module)):]) == 2  # half of the 4 layers
    found = float_layers_for_gate(make, module, spec, samples, reference, torch.device("cpu"), 0.999,
                                  progress=lambda line: None)
    assert found.names == ["layers.1"] and found.cosine >= 0.999 and max(found.costs, key=found.costs.get) == "layers.1"
