"""Tuned and compiled archives through the real torchserve: the variant is logged, a restarted
worker reuses inductor's cache from the model folder, and the answers stay right."""

import json
import os
import re
import signal
import time

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.tune import TuneOptions
from integration.torchserve import TorchServe
from models.builders import MODELS

X = torch.randn(3, 32, generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def tuned_server(tmp_path_factory, inputs):
    tmp = tmp_path_factory.mktemp("tuned")
    weights, samples = inputs["mlp"]
    common = dict(model_file=MODELS / "small.py", weights=weights, samples=samples, export_path=tmp / "store")
    archive_model(ArchiveOptions(model_name="mlp_compile", backend="compile", **common))
    archive_model(ArchiveOptions(model_name="mlp_tuned", **common, tune=TuneOptions(
        candidates=("int8wo", "compile"), batch_sizes=(1, 8), repeats=5, max_seconds=0.2)))
    server = TorchServe(tmp / "ts", tmp / "store", {"mlp_compile": "mlp_compile.mar",
                                                    "mlp_tuned": "mlp_tuned.mar"}).start()
    try:
        server.wait_ready("mlp_compile", timeout=300)
        server.wait_ready("mlp_tuned", timeout=300)
        yield server
    finally:
        server.stop()


def ready_lines(server, model):
    return re.findall(rf"AITune: model {model} ready: .*", server.model_log())


@pytest.mark.parametrize("model", ["mlp_compile", "mlp_tuned"])
def test_answers_match_the_original(tuned_server, reference_mlp, model):
    status, body = tuned_server.predict(model, json.dumps(X.tolist()))
    assert status == 200, body
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(body).flatten(), reference_mlp(X).flatten(), dim=0)
    assert cosine >= 0.999


def test_tuned_worker_logs_its_variant(tuned_server):
    [line] = ready_lines(tuned_server, "mlp_tuned")
    assert re.search(r"variant 'cpu': \S+ won on cpu: ", line), line


def test_restarted_worker_compiles_from_the_cache_in_the_model_dir(tuned_server):
    [first] = ready_lines(tuned_server, "mlp_compile")
    assert re.search(r"compiled in [\d.]+ s \(\d+ graphs from the inductor cache, [1-9]\d* compiled anew\)", first)
    [pid] = tuned_server.worker_pids("mlp_compile")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and tuned_server.worker_pids("mlp_compile") in ([], [pid]):
        time.sleep(0.5)
    assert tuned_server.worker_pids("mlp_compile") not in ([], [pid])
    second = ready_lines(tuned_server, "mlp_compile")[-1]
    assert re.search(r"\([1-9]\d* graphs from the inductor cache, 0 compiled anew\)", second), second
    status, body = tuned_server.predict("mlp_compile", json.dumps(X.tolist()))
    assert status == 200 and torch.tensor(body).shape == (3, 8)
    print(f"\nfirst start: {first.split(' in ', 1)[1]}\nrestart: {second.split(' in ', 1)[1]}")
