"""Broken archives never serve: the model stays not READY, the log says what and what to do, others serve."""

import json
import time
import zipfile

import pytest
import torch
from torchao.core.config import config_to_dict
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.checkpoint import CHECKPOINT_NAME, MANIFEST_NAME, load_checkpoint, write_manifest
from integration.torchserve import TorchServe
from models.builders import MODELS

GOOD = json.dumps([[0.5] * 32])


def repack(source, target, edit, tmp):
    """Unzip ``source``, let ``edit(folder, manifest)`` change it, rewrite the manifest's sha256, zip."""
    folder = tmp / target.stem
    with zipfile.ZipFile(source) as archive:
        archive.extractall(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(folder, manifest)
    files = [folder / name for name in manifest.pop("files") if (folder / name).exists()]
    version = manifest.pop("format_version")
    write_manifest(folder, manifest, files)
    if version != 1:
        written = json.loads((folder / MANIFEST_NAME).read_text())
        (folder / MANIFEST_NAME).write_text(json.dumps({**written, "format_version": version}))
    with zipfile.ZipFile(target, "w") as archive:
        for path in folder.rglob("*"):
            archive.write(path, path.relative_to(folder))


def truncate(folder, manifest):
    data = (folder / CHECKPOINT_NAME).read_bytes()
    (folder / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])


def remove(folder, manifest):
    (folder / CHECKPOINT_NAME).unlink()


def future_format(folder, manifest):
    manifest["format_version"] = 99


def resave(folder, change):
    state = load_checkpoint(folder / CHECKPOINT_NAME)
    change(state)
    torch.save(state, folder / CHECKPOINT_NAME)


def other_torchao(folder, manifest):
    resave(folder, lambda state: state["versions"].update(torchao="0.7.0"))


def fp8dq(folder, manifest):
    resave(folder, lambda state: state["config"].update(
        quantization_config=config_to_dict(Float8DynamicActivationFloat8WeightConfig())))


BROKEN = {
    "truncated": (truncate, "mlp_int8wo", "cannot be loaded safely"),
    "missing": (remove, "mlp_int8wo", "checkpoint.pt does not exist"),
    "future": (future_format, "mlp_int8wo", "format version 99"),
    "old_torchao": (other_torchao, "mlp_int8wo", "written by torchao 0.7.0"),
    "fp8dq_on_cpu": (fp8dq, "mlp_requantize", "cannot run on cpu"),
}


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory, model_store, inputs):
    tmp = tmp_path_factory.mktemp("broken")
    store = tmp / "store"
    store.mkdir()
    weights, samples = inputs["mlp"]
    archive_model(ArchiveOptions(model_name="mlp_requantize", model_file=MODELS / "small.py", weights=weights,
                                 samples=samples, export_path=tmp, checkpoint_weights="original"))
    sources = {"mlp_int8wo": model_store / "mlp_int8wo.mar", "mlp_requantize": tmp / "mlp_requantize.mar"}
    for name, (edit, source, _) in BROKEN.items():
        repack(sources[source], store / f"{name}.mar", edit, tmp)
    (store / "good.mar").write_bytes((model_store / "mlp_int8wo.mar").read_bytes())
    server = TorchServe(tmp / "ts", store, {name: f"{name}.mar" for name in [*BROKEN, "good"]}).start()
    try:
        server.wait_ready("good")
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", BROKEN)
def test_broken_archive_never_serves_and_says_why(broken_server, name):
    message = BROKEN[name][2]
    deadline = time.monotonic() + 60
    while f"cannot load model {name}: " not in broken_server.model_log() and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = [line for line in broken_server.model_log().splitlines() if f"AITune: cannot load model {name}: " in line]
    assert lines and message in lines[0], lines[:1]
    assert broken_server.worker_pids(name) == []
    status = broken_server.status_within(name, GOOD, timeout=15)
    assert status is None or status >= 500, status  # TorchServe's 500/503/507 or no answer
    assert broken_server.predict("good", GOOD)[0] == 200
