"""Backend configs: validation, JSON round trip, key() and describe()."""

import json
import subprocess
import sys

import pytest
import torch
from torchao.quantization import Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, PerTensor

from aitune_core import TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.backends.eager import TorchEagerBackendConfig
from models.small import seeded_mlp


def test_exactly_one_of_name_and_config():
    with pytest.raises(ValueError, match="Only one of"):
        TorchAOBackendConfig(quantization="int8wo", quantization_config=Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="Either quantization or quantization_config"):
        TorchAOBackendConfig()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="int8wo, int8dq, fp8wo, fp8dq, int4wo"):
        TorchAOBackendConfig(quantization="int4")


def test_quantization_config_must_be_a_torchao_config():
    with pytest.raises(ValueError, match="AOBaseConfig"):
        TorchAOBackendConfig(quantization_config={"bits": 8})


def test_bad_checkpoint_weights():
    with pytest.raises(ValueError, match="checkpoint_weights"):
        TorchAOBackendConfig(quantization="int8wo", checkpoint_weights="pickled")


@pytest.mark.parametrize("name, config_class", [
    ("int8wo", "Int8WeightOnlyConfig"),
    ("int8dq", "Int8DynamicActivationInt8WeightConfig"),
    ("fp8wo", "Float8WeightOnlyConfig"),
    ("fp8dq", "Float8DynamicActivationFloat8WeightConfig"),
])
def test_names_map_to_torchao_configs(name, config_class):
    config = TorchAOBackendConfig(quantization=name)
    assert type(config.quantization_config).__name__ == config_class


def test_default_backend_is_int8wo():
    assert TorchAOBackend().describe() == "TorchAOBackend(quantization_config=Int8WeightOnlyConfig())"


def test_json_round_trip_keeps_the_key(tmp_path):
    config = TorchAOBackendConfig(quantization_config=Int8DynamicActivationInt8WeightConfig(granularity=PerTensor()))
    as_json = json.loads(json.dumps(config.to_dict()))
    again = TorchAOBackendConfig.from_dict(as_json)
    assert again.quantization_config == config.quantization_config
    assert again.key() == config.key()
    config.to_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == as_json


def test_name_and_equal_config_have_the_same_key():
    assert TorchAOBackendConfig(quantization="int8wo").key() == \
        TorchAOBackendConfig(quantization_config=Int8WeightOnlyConfig()).key()


def test_keys_differ_between_configs():
    keys = {TorchAOBackendConfig(quantization=name).key() for name in ("int8wo", "int8dq", "fp8wo", "fp8dq")}
    keys.add(TorchAOBackendConfig(quantization="int8wo", checkpoint_weights="original").key())
    keys.add(TorchEagerBackendConfig().key())
    assert len(keys) == 6


def test_key_is_equal_across_processes():
    code = ("from aitune_core import TorchAOBackend, TorchAOBackendConfig; "
            "print(TorchAOBackend(TorchAOBackendConfig(quantization='int8dq')).key())")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    keys.add(TorchAOBackend(TorchAOBackendConfig(quantization="int8dq")).key())
    assert len(keys) == 1
    assert keys.pop().startswith("TorchAOBackend_")


def test_describe_shows_only_changed_fields():
    assert TorchAOBackendConfig(quantization="fp8wo").describe() == "quantization_config=Float8WeightOnlyConfig()"
    changed = TorchAOBackendConfig(quantization_config=Int8DynamicActivationInt8WeightConfig(granularity=PerTensor()),
                                   checkpoint_weights="original")
    assert changed.describe() == ("quantization_config=Int8DynamicActivationInt8WeightConfig(granularity=PerTensor())"
                                  ",checkpoint_weights='original'")
    assert TorchEagerBackend().describe() == "TorchEagerBackend()"


@pytest.mark.parametrize("hash_seed", ["0", "1", "2", "3"])
def test_loading_a_config_does_not_import_transformers(hash_seed):
    # torchao searches a set of modules whose order follows the hash seed; one of them imports
    # transformers, which would cost a worker ~2 s at start.
    code = ("import sys; from aitune_core import TorchAOBackendConfig as C; "
            "c = C.from_dict(C(quantization='int8wo').to_dict()); "
            "print(type(c.quantization_config).__name__, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "PYTHONHASHSEED": hash_seed})
    assert done.stdout.split() == ["Int8WeightOnlyConfig", "False"]


def test_skip_modules_travel_in_the_config_and_name_real_modules():
    config = TorchAOBackendConfig(quantization="int8dq", skip_modules=["fc2", "fc1"])
    assert config.skip_modules == ["fc1", "fc2"]
    again = TorchAOBackendConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.skip_modules == ["fc1", "fc2"] and again.key() == config.key()
    assert config.key() != TorchAOBackendConfig(quantization="int8dq").key()
    assert TorchAOBackend(config).describe().endswith(",skip_modules=<2 modules kept in float>)")
    built = TorchAOBackend(TorchAOBackendConfig(quantization="int8dq", skip_modules=["fc2"]))
    built.build(seeded_mlp(), None, [torch.randn(2, 32)], "cpu")
    assert type(built._module.fc2.weight) is torch.nn.Parameter and type(built._module.fc1.weight) is not torch.nn.Parameter
    with pytest.raises(ValueError, match="skip_modules names no module of MLP: fc3"):
        TorchAOBackend(TorchAOBackendConfig(quantization="int8dq", skip_modules=["fc3"])).build(
            seeded_mlp(), None, [torch.randn(2, 32)], "cpu")
