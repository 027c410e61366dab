"""Faults: a killed worker comes back and answers right; a request past responseTimeout fails alone."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from integration.torchserve import TorchServe
from models.builders import MODELS, write_inputs

GOOD = json.dumps([[0.5] * 32])


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, model_store):
    tmp = tmp_path_factory.mktemp("faults")
    store = tmp / "store"
    store.mkdir()
    (store / "good.mar").write_bytes((model_store / "mlp_int8wo.mar").read_bytes())
    from models.slow import Slow

    torch.manual_seed(0)
    slow_weights, slow_samples = write_inputs(tmp / "slow", Slow(), torch.zeros(1, 4))
    (tmp / "slow.yaml").write_text("responseTimeout: 2\n")
    archive_model(ArchiveOptions(model_name="slow", model_file=MODELS / "slow.py", weights=slow_weights,
                                 samples=slow_samples, export_path=store, backend="eager",
                                 config_file=tmp / "slow.yaml"))
    server = TorchServe(tmp / "ts", store, {"good": "good.mar", "slow": "slow.mar"}).start()
    try:
        server.wait_ready("good")
        server.wait_ready("slow")
        yield server
    finally:
        server.stop()


def test_killed_worker_comes_back_and_answers_right(fault_server):
    expected = fault_server.predict("good", GOOD)[1]
    [pid] = fault_server.worker_pids("good")
    outcomes = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            outcomes.append(fault_server.predict("good", GOOD, timeout=60)[0])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + 120
    while time.monotonic() < deadline:
        pids = fault_server.worker_pids("good")
        if pids and pids != [pid]:
            break
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert fault_server.worker_pids("good") not in ([], [pid]), "no new worker"
    errors = [status for status in outcomes if status != 200]
    assert len(errors) <= 4, f"only requests in flight may fail: {errors}"
    assert fault_server.predict("good", GOOD) == (200, expected)
    print(f"worker READY again {recovered:.1f} s after kill -9; {len(outcomes)} requests, {len(errors)} failed")


def test_request_past_response_timeout_fails_and_the_worker_recovers(fault_server):
    status, _ = fault_server.predict("slow", json.dumps([[5.0, 0, 0, 0]]), timeout=60)
    assert status != 200
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if fault_server.worker_pids("slow"):
            status, body = fault_server.predict("slow", json.dumps([[0.0, 1, 2, 3]]))
            if status == 200:
                break
        time.sleep(0.5)
    assert status == 200 and len(body[0]) == 4
