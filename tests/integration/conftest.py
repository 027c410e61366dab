"""One archived model store and one torchserve for the integration tests of a session."""

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from integration.torchserve import TorchServe
from models.builders import MODELS, dict_output_inputs, mlp_inputs, two_inputs_inputs

BATCH_CONFIG = "batchSize: 4\nmaxBatchDelay: 300\nresponseTimeout: 60\n"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"mlp": mlp_inputs(root / "mlp"), "two": two_inputs_inputs(root / "two"),
            "dict": dict_output_inputs(root / "dict")}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, inputs):
    store = tmp_path_factory.mktemp("model_store")
    batch_config = store.parent / "batch-config.yaml"
    batch_config.write_text(BATCH_CONFIG)
    archives = {
        "mlp_eager": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], backend="eager"),
        "mlp_int8wo": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], quantization="int8wo"),
        "mlp_int8dq": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], quantization="int8dq"),
        "mlp_batched": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], config_file=batch_config),
        "two_inputs": dict(model_file=MODELS / "two_inputs.py", inputs=inputs["two"]),
        "dict_output": dict(model_file=MODELS / "dict_output.py", inputs=inputs["dict"], backend="eager"),
    }
    for name, spec in archives.items():
        weights, samples = spec.pop("inputs")
        archive_model(ArchiveOptions(model_name=name, weights=weights, samples=samples, export_path=store, **spec))
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    names = ["mlp_eager", "mlp_int8wo", "mlp_int8dq", "mlp_batched", "two_inputs", "dict_output"]
    instance = TorchServe(tmp_path_factory.mktemp("torchserve"), model_store, {n: f"{n}.mar" for n in names})
    instance.start()
    try:
        for name in names:
            instance.wait_ready(name)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def reference_mlp():
    from models.small import seeded_mlp

    return seeded_mlp()
