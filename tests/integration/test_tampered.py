"""A checkpoint changed after archiving never serves: the model stays not READY and the log says why."""

import json
import time
import zipfile

from integration.torchserve import TorchServe


def tamper(archive, tampered, member="checkpoint.pt"):
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tampered, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == member:
                data = data[:-64] + bytes(64)
            target.writestr(item, data)


def test_tampered_checkpoint_never_becomes_ready(tmp_path, model_store):
    store = tmp_path / "store"
    store.mkdir()
    tamper(model_store / "mlp_int8wo.mar", store / "tampered.mar")
    (store / "good.mar").write_bytes((model_store / "mlp_eager.mar").read_bytes())
    server = TorchServe(tmp_path / "ts", store, {"tampered": "tampered.mar", "good": "good.mar"})
    server.start()
    try:
        server.wait_ready("good")
        deadline = time.monotonic() + 20
        while "sha256 mismatch" not in server.model_log() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = server.model_log()
        assert "AITune: cannot load model tampered: sha256 mismatch for" in log
        assert "checkpoint.pt" in log and "re-archive the model" in log
        assert server.worker_pids("tampered") == []
        status = server.status_within("tampered", json.dumps([[0.0] * 32]), timeout=15)
        assert status is None or status >= 500, status  # TorchServe's 500/503/507 or no answer
        assert server.predict("good", json.dumps([[0.0] * 32]))[0] == 200
    finally:
        server.stop()
