"""Compiled backends: an AOTInductor package made once serves any batch and length with no compilation;
a package this machine cannot run, or a model export cannot take, is compiled at start instead."""

import io

import pytest
import torch
from torch._dynamo.utils import counters

from aitune_core import Sample
from aitune_core.aot import CPU_FEATURES, AOTPackage
from aitune_core.backends import TorchCompileBackend, TorchCompileBackendConfig, backend_from_dict
from aitune_core.precision import cpu_features
from aitune_core.serving import warm_up
from models.dict_output import DictOutput
from models.two_inputs import TwoInputs

ROWS = range(1, 9)
LENGTHS = (1, 2, 3, 5, 8, 31, 64, 255, 256)


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs().eval()


def inputs(rows, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, generator=generator), torch.randint(0, 100, (rows, length), generator=generator)


SAMPLES = [inputs(2, 5), inputs(1, 7, seed=1)]


def reload(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return backend_from_dict(two_inputs(), torch.load(buffer, weights_only=True))


def graphs_compiled():
    return counters["stats"]["unique_graphs"], counters["inductor"]["fxgraph_cache_miss"]


@pytest.fixture(scope="module")
def ahead():
    backend = TorchCompileBackend().build(two_inputs(), None, SAMPLES, "cpu")
    return backend, backend.to_dict()


def test_one_package_serves_every_batch_and_length_without_compiling(ahead):
    built, state = ahead
    assert state["compiled"]["package"] is not None and not built.compiles_on_first_calls
    deployed = reload(state)
    deployed.deploy("cpu")
    assert deployed.compile_note.startswith("AOTInductor package loaded")
    reference = two_inputs()
    before = graphs_compiled()
    for rows in ROWS:
        for length in LENGTHS:
            x, ids = inputs(rows, length, seed=rows * 1000 + length)
            got, expected = deployed.infer(x, ids), reference(x, ids)
            for g, e in zip(got, expected):
                assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-4, atol=1e-5), (rows, length)
    assert graphs_compiled() == before


def test_round_trip_gives_exactly_the_built_outputs(ahead):
    built, state = ahead
    deployed = reload(state)
    deployed.deploy("cpu")
    for x, ids in SAMPLES:
        for got, expected in zip(deployed.infer(x, ids), built.infer(x, ids)):
            assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="keeps no weights of its own: save the checkpoint before deploying"):
        deployed.to_dict()


def test_a_package_built_for_another_cpu_is_compiled_at_start_instead(ahead):
    built, state = ahead
    target = state["compiled"]["package"]["target"]
    lacking = [name for name in CPU_FEATURES if not cpu_features().get(name)]
    if lacking:
        other = {**target, "cpu_features": target["cpu_features"] + lacking[:1]}
        why = f"built on a CPU with {lacking[0]}, which this CPU lacks"
    else:
        other = {**target, "torch_version": "2.0.0"}
        why = f"built with torch 2.0.0, this worker has torch {torch.__version__}"
    foreign = {**state, "compiled": {"package": {**state["compiled"]["package"], "target": other}}}
    deployed = reload(foreign)
    deployed.deploy("cpu")
    assert why in deployed.compile_note and "compiling on this worker instead" in deployed.compile_note
    assert deployed.compiles_on_first_calls
    x, ids = SAMPLES[0]
    for got, expected in zip(deployed.infer(x, ids), built.infer(x, ids)):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_python_value_inputs_are_compiled_at_start():
    torch.manual_seed(0)
    module = DictOutput().eval()
    x = torch.randn(3, 12)
    backend = TorchCompileBackend().build(module, None, [Sample(args=(x,), kwargs={"temperature": 2.0})], "cpu")
    assert backend.compile_note == ("not compiled ahead of time: input 'temperature' is a Python value, which "
                                    "torch.export fixes at its sample's value: the model is compiled when the "
                                    "worker starts instead")
    assert backend.compiles_on_first_calls
    for temperature in (2.0, 0.5):
        got = backend.infer(x, temperature=temperature)["probs"]
        assert torch.allclose(got, module(x, temperature=temperature)["probs"], atol=1e-6)


class BranchesOnLength(torch.nn.Module):
    def forward(self, ids):
        return ids.float() * 2 if ids.shape[1] > 6 else ids.float()


def test_a_model_that_branches_on_a_dynamic_size_is_compiled_at_start():
    samples = [torch.ones(2, 7, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)]
    backend = TorchCompileBackend().build(BranchesOnLength(), None, samples, "cpu")
    assert "branches on the size of dim 1 of input 0" in backend.compile_note
    short = torch.ones(2, 3, dtype=torch.long)
    assert torch.equal(backend.infer(short), short.float())


def test_compiled_at_start_no_request_recompiles_after_warm_up():
    backend = TorchCompileBackend(TorchCompileBackendConfig(ahead_of_time=False))
    state = backend.build(two_inputs(), None, SAMPLES, "cpu").to_dict()
    deployed = reload(state)
    deployed.deploy("cpu")
    warm_up(deployed)
    before = graphs_compiled()
    reference = two_inputs()
    for rows in ROWS:
        for length in LENGTHS:
            x, ids = inputs(rows, length)
            assert torch.allclose(deployed.infer(x, ids)[0], reference(x, ids)[0], rtol=1e-4, atol=1e-5)
    assert graphs_compiled() == before


class Positions(torch.nn.Module):
    """Adds a learned position vector per token, for at most 16 tokens (as BERT has 512)."""

    def __init__(self):
        super().__init__()
        self.positions = torch.nn.Parameter(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return ids.float().unsqueeze(-1) + self.positions[: ids.shape[1]]


def test_a_size_limit_export_finds_is_kept_and_checked():
    samples = [torch.ones(2, 5, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)]
    backend = TorchCompileBackend().build(Positions(), None, samples, "cpu")
    assert backend.to_dict()["compiled"]["package"]["max_sizes"] == [[0, 1, 16]]
    longest = torch.ones(3, 16, dtype=torch.long)
    assert torch.equal(backend.infer(longest), Positions()(longest))
    with pytest.raises(ValueError, match="^input 0: dim 1 is 17, the model takes at most 16$"):
        backend.infer(torch.ones(3, 17, dtype=torch.long))


def test_a_package_that_cannot_be_loaded_is_compiled_at_start_instead(ahead):
    built, state = ahead
    package = state["compiled"]["package"]
    broken = {**state, "compiled": {"package": {**package, "package": package["package"][:1000].clone()}}}
    deployed = reload(broken)
    deployed.deploy("cpu")
    assert "the archive's AOTInductor package cannot be loaded here (" in deployed.compile_note
    assert deployed.compiles_on_first_calls
    x, ids = SAMPLES[0]
    for got, expected in zip(deployed.infer(x, ids), built.infer(x, ids)):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_package_that_does_not_load_where_it_was_built_is_left_out(monkeypatch):
    """A package compiled at archive time that the same machine cannot load (measured: no room left on the disk to
    unpack it) is not shipped: the backend compiles at start instead, and its note says why."""
    def no_room(package, device):
        raise RuntimeError("Error generating temporary directory: No space left on device")

    monkeypatch.setattr(AOTPackage, "load", no_room)
    backend = TorchCompileBackend().build(two_inputs(), None, SAMPLES, "cpu")
    assert backend.to_dict()["compiled"]["package"] is None and backend.compiles_on_first_calls
    assert "the package just compiled does not load (" in backend.compile_note
    assert "No space left on device" in backend.compile_note
    x, ids = SAMPLES[0]
    for got, expected in zip(backend.infer(x, ids), two_inputs()(x, ids)):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
