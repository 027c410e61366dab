"""Hugging Face folders served by the real torchserve, held against transformers and sentence-transformers.

The real all-MiniLM-L6-v2 folder (shipped by a package) archived with nothing but ``--hf-model``, and
small classification, token-classification, fill-mask and sentence-transformers folders made in the
test (``models/hf_folders.py``): each served answer equals what the library everyone uses gives on
the same folder, through every protocol, and bad input gets a 400 naming the field.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.hf.texts import SAMPLE_TEXTS, with_one_mask
from integration.clients import Clients, oip_outputs
from integration.torchserve import REPO, TorchServe
from models.hf_folders import add_sentence_transformers_modules, make_folder, minilm_folder

EXTRA_TEXTS = ["Barack Obama visited Berlin and Munich.", "microsoftcorporation unknownword zzzqqq", "a" * 600,
               "  leading and trailing spaces  ", "Tabs\tand\nnewlines."]
TEXTS = SAMPLE_TEXTS + EXTRA_TEXTS
MASKED = with_one_mask(TEXTS, "[MASK]")
ARCHIVES = ("minilm", "cls_eager", "cls_int8wo", "tok_eager", "fill_eager", "st_eager")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_folders")
    return {"cls": make_folder("text-classification", root / "cls"),
            "tok": make_folder("token-classification", root / "tok"),
            "fill": make_folder("fill-mask", root / "fill"),
            "st": add_sentence_transformers_modules(make_folder("sentence-embeddings", root / "st", seed=3),
                                                    pooling="cls", dense=16, normalize=True),
            "minilm": minilm_folder()}


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory, folders):
    store = tmp_path_factory.mktemp("hf_store")
    # The real model exactly as a user would archive it: the folder and nothing else (int8wo by default).
    done = subprocess.run([sys.executable, "-m", "aitune_core.cli", "--model-name", "minilm", "--hf-model",
                           str(folders["minilm"]), "--export-path", str(store)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Task sentence-embeddings (read from the folder)" in done.stdout and "int8wo" in done.stdout
    for name, folder, changes in (("cls_eager", "cls", {"backend": "eager"}), ("cls_int8wo", "cls", {}),
                                  ("tok_eager", "tok", {"backend": "eager"}),
                                  ("fill_eager", "fill", {"backend": "eager"}),
                                  ("st_eager", "st", {"backend": "eager"})):
        archive_model(ArchiveOptions(model_name=name, hf_model=folders[folder], export_path=store, **changes))
    instance = TorchServe(tmp_path_factory.mktemp("hf_torchserve"), store, {n: f"{n}.mar" for n in ARCHIVES})
    with instance.serving(timeout=240):
        yield instance


@pytest.fixture(scope="module")
def clients(hf_server, stubs):
    return Clients(hf_server, stubs)


def ask(server, model, body):
    status, answer = server.predict(model, json.dumps(body))
    assert status == 200, answer
    return answer


def pipeline_answers(task, folder, texts, **options):
    from transformers import pipeline

    return pipeline(task, model=str(folder), device="cpu", **options)(texts)


# -- answers held against the libraries ---------------------------------------------------------------
def test_minilm_from_its_folder_matches_sentence_transformers(hf_server, folders):
    from sentence_transformers import SentenceTransformer

    served = torch.tensor(ask(hf_server, "minilm", {"text": TEXTS})["embeddings"])
    reference = SentenceTransformer(str(folders["minilm"]), device="cpu").encode(TEXTS, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(served, reference, dim=1)
    assert cosine.mean() >= 0.999 and cosine.min() >= 0.995, (cosine.mean(), cosine.min())


def test_sentence_transformers_folder_with_cls_pooling_dense_and_normalize(hf_server, folders):
    from sentence_transformers import SentenceTransformer

    served = torch.tensor(ask(hf_server, "st_eager", {"text": TEXTS})["embeddings"])
    reference = SentenceTransformer(str(folders["st"]), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert served.shape == (len(TEXTS), 16)
    torch.testing.assert_close(served, reference, rtol=0, atol=1e-5)


def test_classification_equals_the_pipeline(hf_server, folders):
    served = ask(hf_server, "cls_eager", {"text": TEXTS})
    expected = pipeline_answers("text-classification", folders["cls"], TEXTS)
    assert [a["label"] for a in served] == [e["label"] for e in expected]
    np.testing.assert_allclose([a["score"] for a in served], [e["score"] for e in expected], rtol=0, atol=1e-4)
    ranked = ask(hf_server, "cls_eager", {"text": TEXTS[:4], "top_k": None})
    every = pipeline_answers("text-classification", folders["cls"], TEXTS[:4], top_k=None)
    for answer, labels in zip(ranked, every):
        assert [s["label"] for s in answer["scores"]] == [s["label"] for s in labels]
        np.testing.assert_allclose([s["score"] for s in answer["scores"]], [s["score"] for s in labels], atol=1e-4)
    assert [len(a["scores"]) for a in ask(hf_server, "cls_eager", {"text": TEXTS[:2], "top_k": 2})] == [2, 2]


def test_int8wo_classifier_agrees_on_the_top_label(hf_server):
    eager = [a["label"] for a in ask(hf_server, "cls_eager", {"text": TEXTS})]
    quantized = [a["label"] for a in ask(hf_server, "cls_int8wo", {"text": TEXTS})]
    assert sum(a == b for a, b in zip(eager, quantized)) >= 0.98 * len(TEXTS)


def test_token_classification_equals_the_pipeline(hf_server, folders):
    served = ask(hf_server, "tok_eager", {"text": TEXTS})
    expected = pipeline_answers("token-classification", folders["tok"], TEXTS, aggregation_strategy="simple")
    assert sum(len(entities) for entities in served) > len(TEXTS)  # the test model finds entities to compare
    for text, got, want in zip(TEXTS, served, expected):
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in got] == \
            [(e["entity_group"], e["word"], e["start"], e["end"]) for e in want], text
        np.testing.assert_allclose([e["score"] for e in got], [float(e["score"]) for e in want], rtol=0, atol=1e-4)
        assert all(text[e["start"]:e["end"]] for e in got)  # character offsets into the text as sent


def test_fill_mask_equals_the_pipeline(hf_server, folders):
    served = ask(hf_server, "fill_eager", {"text": MASKED})
    expected = pipeline_answers("fill-mask", folders["fill"], MASKED)
    for got, want in zip(served, expected):
        assert len(got) == 5
        assert [(f["token_str"], f["sequence"], f["token"]) for f in got] == \
            [(f["token_str"], f["sequence"], f["token"]) for f in want]
        np.testing.assert_allclose([f["score"] for f in got], [f["score"] for f in want], rtol=0, atol=1e-4)
    assert [len(fills) for fills in ask(hf_server, "fill_eager", {"text": MASKED[:2], "top_k": 2})] == [2, 2]


# -- every protocol answers what /predictions answers ----------------------------------------------
def test_classifier_through_every_protocol(clients):
    model, texts = "cls_eager", TEXTS[:5]
    expected = clients.rest(model, {"text": texts})
    labels, scores = [a["label"] for a in expected], [a["score"] for a in expected]
    status, v1 = clients.v1(model, {"instances": texts})
    assert status == 200, v1
    assert [p["label"] for p in v1["predictions"]] == labels
    array = np.array(texts, dtype=object)
    for binary in (False, True):
        result = clients.v2(model, [("text", array, "BYTES")], binary)
        assert [label.decode() for label in result.as_numpy("label")] == labels
        np.testing.assert_allclose(result.as_numpy("score"), scores, rtol=0, atol=1e-6)
        assert result.as_numpy("scores").shape == (len(texts), 3)
    only = clients.v2(model, [("text", array, "BYTES")], True, outputs=["label"]).get_response()
    assert [o["name"] for o in only["outputs"]] == ["label"]
    assert [a["label"] for a in clients.grpc_predictions(model, json.dumps({"text": texts}).encode())] == labels
    response = clients.model_infer(model, [("text", array, "BYTES")])
    outputs = {o.name: o for o in response.outputs}
    # TorchServe's relay writes each BYTES element as JSON text: a label arrives as a JSON string.
    assert [json.loads(label) for label in outputs["label"].contents.bytes_contents] == labels
    np.testing.assert_allclose(list(outputs["score"].contents.fp32_contents), scores, rtol=0, atol=1e-6)


def test_entities_and_fills_through_every_protocol(clients):
    for model, texts, name in (("tok_eager", TEXTS[2:6], "entities"), ("fill_eager", MASKED[2:6], "fills")):
        expected = clients.rest(model, {"text": texts})
        status, v1 = clients.v1(model, {"instances": texts})
        assert status == 200 and v1["predictions"] == expected
        array = np.array(texts, dtype=object)
        for binary in (False, True):
            documents = clients.v2(model, [("text", array, "BYTES")], binary).as_numpy(name)
            assert [json.loads(document) for document in documents] == expected
        assert clients.grpc_predictions(model, json.dumps({"text": texts}).encode()) == expected
        response = clients.model_infer(model, [("text", array, "BYTES")])
        [output] = response.outputs
        assert [json.loads(document) for document in output.contents.bytes_contents] == expected


def test_embeddings_through_v2_and_oip(clients):
    expected = clients.rest("minilm", {"text": TEXTS[:3]})["embeddings"]
    array = np.array(TEXTS[:3], dtype=object)
    np.testing.assert_allclose(clients.v2("minilm", [("text", array, "BYTES")], True).as_numpy("embeddings"),
                               expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(oip_outputs(clients.model_infer("minilm", [("text", array, "BYTES")]))["embeddings"],
                               expected, rtol=0, atol=1e-6)


# -- bad input: a 400 naming the field, and the worker keeps serving -------------------------------------
@pytest.mark.parametrize("model, body, message", [
    ("fill_eager", {"text": ["no mask here"]}, "must hold the mask token '[MASK]' exactly once"),
    ("fill_eager", {"text": ["two [MASK] [MASK]"]}, "found 2"),
    ("fill_eager", {"text": ["a [MASK]"], "top_k": 0}, "'top_k' must be a positive integer"),
    ("cls_eager", {"text": ["fine"], "top_k": "all"}, "'top_k' must be a positive integer or null"),
    ("cls_eager", {"text": ["fine"], "labels": ["x"]}, "unknown key(s) 'labels'"),
    ("tok_eager", {"text": ["fine"], "top_k": 3}, "unknown key(s) 'top_k'"),
    ("tok_eager", {"text": [1, 2]}, "text[0]: expected a string, got int"),
    ("minilm", {"text": []}, "'text' is an empty list"),
    ("minilm", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
     "datatype must be BYTES"),
])
def test_bad_requests_get_a_400_naming_the_field(hf_server, model, body, message):
    pids = hf_server.worker_pids(model)
    status, answer = hf_server.predict(model, json.dumps(body))
    assert status == 400 and message in answer["error"], answer
    assert hf_server.worker_pids(model) == pids
    assert ask(hf_server, model, {"text": ["Still [MASK] here." if model == "fill_eager" else "Still here."]})


def test_cli_refuses_a_folder_it_cannot_serve_and_writes_nothing(tmp_path, folders):
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "aitune_core.cli", "--model-name", "x", "--hf-model",
                           str(folders["cls"]), "--task", "fill-mask", "--export-path", str(store)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()[-1:]
    assert "--task fill-mask does not fit" in line and "BertForSequenceClassification" in line
    assert not store.exists() or not any(store.iterdir())
