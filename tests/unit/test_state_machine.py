"""Every cell of the state x method table in DESIGN.md, for each backend."""

import io

import pytest
import torch

from aitune_core import BackendState, TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.backends import TorchCompileBackend, TorchCompileBackendConfig
from models.small import seeded_mlp

BACKENDS = {
    "eager": lambda: TorchEagerBackend(),
    "int8wo": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8wo")),
    "compile-at-start": lambda: TorchCompileBackend(TorchCompileBackendConfig(ahead_of_time=False)),
    "compile-ahead": lambda: TorchCompileBackend(),
}
SAMPLE = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
# An AOTInductor build takes ~8 s (a C++ compile): one build's checkpoint serves every other cell, whose
# ACTIVE state is reached from it by from_dict + activate (a path of the table as well).
_AHEAD_BUILT = {}


def ahead_built_state():
    if not _AHEAD_BUILT:
        _AHEAD_BUILT["state"] = BACKENDS["compile-ahead"]().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    return _AHEAD_BUILT["state"]


def reload(backend, state=None):
    buffer = io.BytesIO()
    torch.save(state or backend.to_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    return type(backend).from_dict(seeded_mlp(seed=99), state)


def in_state(name, state):
    backend = BACKENDS[name]()
    if state == BackendState.INIT:
        return backend
    if name == "compile-ahead":
        backend = reload(backend, ahead_built_state())
        backend.activate()
    else:
        backend.build(seeded_mlp(), None, [SAMPLE], "cpu")
    if state == BackendState.INACTIVE:
        backend.deactivate()
    if state in (BackendState.CHECKPOINT_LOADED, BackendState.DEPLOYED):
        backend = reload(backend)
    if state == BackendState.DEPLOYED:
        backend.deploy("cpu")
    assert backend.state == state
    return backend


CALLS = {
    "build": lambda b: b.build(seeded_mlp(), None, [SAMPLE], "cpu"),
    "activate": lambda b: b.activate(),
    "deactivate": lambda b: b.deactivate(),
    "deploy": lambda b: b.deploy("cpu"),
    "infer": lambda b: b.infer(SAMPLE),
}
S = BackendState
# (state, call) -> state after the call, or the start of the RuntimeError message.
TABLE = {
    (S.INIT, "build"): S.ACTIVE,
    (S.INIT, "activate"): "Cannot activate backend",
    (S.INIT, "deactivate"): "Cannot deactivate backend",
    (S.INIT, "deploy"): "Cannot deploy backend",
    (S.INIT, "infer"): "Cannot run inference",
    (S.ACTIVE, "build"): "Backend",
    (S.ACTIVE, "activate"): S.ACTIVE,
    (S.ACTIVE, "deactivate"): S.INACTIVE,
    (S.ACTIVE, "deploy"): "Cannot deploy backend",
    (S.ACTIVE, "infer"): S.ACTIVE,
    (S.INACTIVE, "build"): "Backend",
    (S.INACTIVE, "activate"): S.ACTIVE,
    (S.INACTIVE, "deactivate"): S.INACTIVE,
    (S.INACTIVE, "deploy"): "Cannot deploy backend",
    (S.INACTIVE, "infer"): "Cannot run inference",
    (S.CHECKPOINT_LOADED, "build"): "Backend",
    (S.CHECKPOINT_LOADED, "activate"): S.ACTIVE,
    (S.CHECKPOINT_LOADED, "deactivate"): "Cannot deactivate backend",
    (S.CHECKPOINT_LOADED, "deploy"): S.DEPLOYED,
    (S.CHECKPOINT_LOADED, "infer"): "Cannot run inference",
    (S.DEPLOYED, "build"): "Backend",
    (S.DEPLOYED, "activate"): "Cannot activate backend",
    (S.DEPLOYED, "deactivate"): "Cannot deactivate backend",
    (S.DEPLOYED, "deploy"): "Cannot deploy backend",
    (S.DEPLOYED, "infer"): S.DEPLOYED,
}


def test_table_covers_every_cell():
    assert len(TABLE) == len(BackendState) * len(CALLS)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("state, call", list(TABLE))
def test_state_table(backend_name, state, call):
    backend = in_state(backend_name, state)
    expected = TABLE[(state, call)]
    if isinstance(expected, BackendState):
        result = CALLS[call](backend)
        assert backend.state == expected
        if call == "infer":
            assert result.shape == (4, 8)
        assert backend.is_active == (expected in (S.ACTIVE, S.DEPLOYED))
    else:
        with pytest.raises(RuntimeError, match=f"^{expected}") as raised:
            CALLS[call](backend)
        assert backend.name in str(raised.value)
        assert backend.state == state


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_reactivated_backend_gives_the_same_outputs(backend_name):
    backend = in_state(backend_name, S.ACTIVE)
    before = backend.infer(SAMPLE)
    backend.deactivate()
    backend.activate()
    assert torch.equal(backend.infer(SAMPLE), before)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_activate_from_checkpoint_runs_on_the_build_device(backend_name):
    built = in_state(backend_name, S.ACTIVE)
    loaded = reload(built)
    loaded.activate()
    assert loaded.device == torch.device("cpu")
    assert torch.equal(loaded.infer(SAMPLE), built.infer(SAMPLE))


class FailingDeploy(TorchEagerBackend):
    def _deploy(self, device):
        raise OSError("disk on fire")


class FailingActivate(TorchEagerBackend):
    def _activate(self):
        raise OSError("no memory")


def test_failing_private_step_leaves_state_unchanged():
    built = in_state("eager", S.ACTIVE)
    state = built.to_dict()
    backend = FailingDeploy.from_dict(seeded_mlp(), {**state, "type": "FailingDeploy"})
    with pytest.raises(OSError):
        backend.deploy("cpu")
    assert backend.state == S.CHECKPOINT_LOADED

    backend = FailingActivate.from_dict(seeded_mlp(), {**state, "type": "FailingActivate"})
    with pytest.raises(OSError):
        backend.activate()
    assert backend.state == S.CHECKPOINT_LOADED


def test_failing_build_stays_init():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("cannot run")

    backend = TorchAOBackend()
    with pytest.raises(ValueError, match="cannot run"):
        backend.build(Broken(), None, [SAMPLE], "cpu")
    assert backend.state == S.INIT


def test_deactivate_moves_weights_off_the_device_and_back():
    backend = in_state("int8wo", S.ACTIVE)
    backend.deactivate()
    assert all(p.device.type == "cpu" for p in backend._module.parameters())
    backend.activate()
    assert backend.infer(SAMPLE).shape == (4, 8)


def test_properties():
    backend = in_state("int8wo", S.DEPLOYED)
    assert backend.name == "TorchAOBackend"
    assert backend.device == torch.device("cpu")
    assert backend.is_active
    assert backend.graph_spec.args[0]["shapes"] == [[4, 32]]


@pytest.mark.parametrize("device, message", [
    ("cuda:0", "CUDA is not available"),
    ("tpu", "Invalid device"),
    ("mps", "not supported"),
])
def test_bad_device_is_a_value_error(device, message):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    backend = TorchAOBackend()
    with pytest.raises(ValueError, match=message):
        backend.build(seeded_mlp(), None, [SAMPLE], device)
    assert backend.state == S.INIT
