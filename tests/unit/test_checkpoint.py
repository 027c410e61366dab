"""Checkpoints: round trips through torch.save / torch.load(weights_only=True), versions, manifests."""

import json
import os
import pickle

import pytest
import torch

from aitune_core import CheckpointError, TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.backends import TorchCompileBackend, TorchCompileBackendConfig, TorchEagerBackendConfig, backend_from_dict
from aitune_core.checkpoint import MANIFEST_NAME, load_checkpoint, read_manifest, save_checkpoint, write_manifest
from models.small import MLP, seeded_mlp

SAMPLE = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
PLAIN_TYPES = (torch.Tensor, int, float, str, bool, type(None), torch.device)

CASES = {
    "eager": TorchEagerBackend,
    "int8wo": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8wo")),
    "int8dq": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8dq")),
    "fp8wo": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="fp8wo")),
    "int8wo-requantize": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8wo",
                                                                     checkpoint_weights="original")),
    "compile": TorchCompileBackend,
    "compile-at-start": lambda: TorchCompileBackend(TorchCompileBackendConfig(ahead_of_time=False)),
    "int8wo+compile": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8wo", compile=True)),
    "bf16": lambda: TorchEagerBackend(TorchEagerBackendConfig(precision="bf16")),
    "bf16+compile": lambda: TorchCompileBackend(TorchCompileBackendConfig(precision="bf16")),
    "int8dq+bf16": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8dq", precision="bf16")),
    "int8dq, fc2 in float": lambda: TorchAOBackend(TorchAOBackendConfig(quantization="int8dq", skip_modules=["fc2"])),
}


def only_plain_values(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and only_plain_values(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(only_plain_values(v) for v in value)
    return isinstance(value, PLAIN_TYPES)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_gives_exactly_the_built_outputs(case, tmp_path):
    built = CASES[case]().build(seeded_mlp(), None, [SAMPLE], "cpu")
    expected = built.infer(SAMPLE)
    state = built.to_dict()
    assert only_plain_values({k: v for k, v in state.items() if k != "weights"})
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    backend = backend_from_dict(MLP(), loaded)
    assert backend.state.name == "CHECKPOINT_LOADED"
    backend.deploy("cpu")
    assert torch.equal(backend.infer(SAMPLE), expected)
    assert backend.key() == built.key()
    assert backend.describe() == built.describe()


def test_quantized_weights_are_stored_and_not_requantized():
    built = TorchAOBackend().build(seeded_mlp(), None, [SAMPLE], "cpu")
    weights = built.to_dict()["weights"]
    assert type(weights["fc1.weight"]).__name__ == "Int8Tensor"
    requantize = TorchAOBackend(TorchAOBackendConfig(quantization="int8wo", checkpoint_weights="original"))
    requantize.build(seeded_mlp(), None, [SAMPLE], "cpu")
    assert type(requantize.to_dict()["weights"]["fc1.weight"]) is torch.Tensor


def test_loaded_quantized_module_is_quantized_before_deploy():
    state = TorchAOBackend().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    module = MLP()
    TorchAOBackend.from_dict(module, state)
    assert type(module.fc1.weight.data).__name__ == "Int8Tensor"


def test_int8wo_checkpoint_is_under_0_30_of_fp32(tmp_path):
    torch.manual_seed(0)
    module = MLP(1024, 4096, 1024).eval()
    torch.save(module.state_dict(), tmp_path / "fp32.pt")
    built = TorchAOBackend().build(module, None, [torch.randn(1, 1024)], "cpu")
    save_checkpoint(built.to_dict(), tmp_path / "int8wo.pt")
    ratio = os.path.getsize(tmp_path / "int8wo.pt") / os.path.getsize(tmp_path / "fp32.pt")
    assert ratio <= 0.30


def test_other_torchao_version_is_refused_for_quantized_weights():
    state = TorchAOBackend().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    state["versions"]["torchao"] = "0.7.0"
    with pytest.raises(CheckpointError, match="torchao 0.7.0.*--checkpoint-weights original"):
        TorchAOBackend.from_dict(MLP(), state)


def test_other_torchao_version_is_fine_for_original_weights():
    config = TorchAOBackendConfig(quantization="int8wo", checkpoint_weights="original")
    state = TorchAOBackend(config).build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    state["versions"]["torchao"] = "0.7.0"
    backend = TorchAOBackend.from_dict(MLP(), state)
    backend.deploy("cpu")
    assert backend.infer(SAMPLE).shape == (8, 8)


def test_weights_that_do_not_fit_name_the_problem():
    state = TorchEagerBackend().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    with pytest.raises(CheckpointError, match="do not fit MLP"):
        TorchEagerBackend.from_dict(MLP(32, 128, 8), state)


def test_wrong_backend_type_and_format_version():
    state = TorchEagerBackend().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict()
    with pytest.raises(ValueError, match="expected 'TorchAOBackend'"):
        TorchAOBackend.from_dict(MLP(), state)
    with pytest.raises(ValueError, match="format version 99"):
        TorchEagerBackend.from_dict(MLP(), {**state, "format_version": 99})
    with pytest.raises(ValueError, match="module is required"):
        TorchEagerBackend.from_dict(None, state)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    payload = Payload()
    payload.marker = marker
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({"type": "TorchEagerBackend", "weights": payload}, file)
    torch.save({"type": "TorchEagerBackend", "weights": payload}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="cannot be loaded safely"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    save_checkpoint(TorchEagerBackend().build(seeded_mlp(), None, [SAMPLE], "cpu").to_dict(), tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_manifest_sha256_catches_a_changed_file(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    write_manifest(tmp_path, {"backend": "x"}, [tmp_path / "checkpoint.pt"])
    assert read_manifest(tmp_path)["backend"] == "x"
    (tmp_path / "checkpoint.pt").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="sha256 mismatch for .*checkpoint.pt"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=7), "format version 7"),
    (lambda m: m.update(files={"../outside.pt": "0" * 64}), "plain file name"),
    (lambda m: m.update(files={"/etc/passwd": "0" * 64}), "plain file name"),
    (lambda m: m.update(files={}), "lists no files"),
    (lambda m: m.update(files={"gone.pt": "0" * 64}), "missing"),
])
def test_bad_manifests(tmp_path, change, message):
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    write_manifest(tmp_path, {}, [tmp_path / "checkpoint.pt"])
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    change(manifest)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        read_manifest(tmp_path)
