"""Tuned and compiled archives through the real torchserve: the variant is logged, a worker loads an
ahead-of-time compiled package (and so restarts in seconds), a worker that compiles at start reuses
inductor's cache from the model folder when restarted, and the answers stay right."""

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
    archive_model(ArchiveOptions(model_name="mlp_compile_start", backend="compile", compile_at="start", **common))
    archive_model(ArchiveOptions(model_name="mlp_tuned", **common, tune=TuneOptions(
        candidates=("int8wo", "compile"), batch_sizes=(1, 8), repeats=5, max_seconds=0.2)))
    names = ["mlp_compile", "mlp_compile_start", "mlp_tuned"]
    server = TorchServe(tmp / "ts", tmp / "store", {name: f"{name}.mar" for name in names}).start()
    try:
        for name in names:
            server.wait_ready(name, timeout=300)
        yield server
    finally:
        server.stop()


def ready_lines(server, model):
    return re.findall(rf"AITune: model {model} ready: .*", server.model_log())


@pytest.mark.parametrize("model", ["mlp_compile", "mlp_compile_start", "mlp_tuned"])
def test_answers_match_the_original(tuned_server, reference_mlp, model):
    status, body = tuned_server.predict(model, json.dumps(X.tolist()))
    assert status == 200, body
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(body).flatten(), reference_mlp(X).flatten(), dim=0)
    assert cosine >= 0.999


def test_tuned_worker_logs_its_variant(tuned_server):
    [line] = ready_lines(tuned_server, "mlp_tuned")
    assert re.search(r"variant 'cpu': \S+ won on cpu: ", line), line


def restart(server, model):
    """kill -9 the model's worker; the ready line of the worker TorchServe starts in its place."""
    [pid] = server.worker_pids(model)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.worker_pids(model) in ([], [pid]):
        time.sleep(0.5)
    assert server.worker_pids(model) not in ([], [pid])
    return ready_lines(server, model)[-1]


def test_a_compiled_archive_loads_its_package_and_compiles_nothing(tuned_server):
    [first] = ready_lines(tuned_server, "mlp_compile")
    assert "AOTInductor package loaded (compiled at archive time for a cpu" in first, first
    assert "compiled in" not in first
    second = restart(tuned_server, "mlp_compile")
    assert "AOTInductor package loaded" in second, second
    status, body = tuned_server.predict("mlp_compile", json.dumps(X.tolist()))
    assert status == 200 and torch.tensor(body).shape == (3, 8)
    print(f"\nahead of time: first start in {first.split(' in ', 1)[1].split(';')[0]}, "
          f"restart in {second.split(' in ', 1)[1].split(';')[0]}")


def test_restarted_worker_compiles_from_the_cache_in_the_model_dir(tuned_server):
    [first] = ready_lines(tuned_server, "mlp_compile_start")
    assert re.search(r"compiled in [\d.]+ s \(\d+ graphs from the inductor cache, [1-9]\d* compiled anew\)", first)
    second = restart(tuned_server, "mlp_compile_start")
    assert re.search(r"\([1-9]\d* graphs from the inductor cache, 0 compiled anew\)", second), second
    status, body = tuned_server.predict("mlp_compile_start", json.dumps(X.tolist()))
    assert status == 200 and torch.tensor(body).shape == (3, 8)
    print(f"\nfirst start: {first.split(' in ', 1)[1]}\nrestart: {second.split(' in ', 1)[1]}")
