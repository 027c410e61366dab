"""Hugging Face folders without a server: reading and refusing folders, pooling, tasks held against the
pipelines in-process, and what an ``--hf-model`` archive carries."""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model, main as archive_main
from aitune_core.errors import ArchiveError, BadRequestError
from aitune_core.hf.folder import read_folder
from aitune_core.hf.modules import POOLING_MODES, pool
from aitune_core.hf.prepare import prepare
from aitune_core.hf.texts import SAMPLE_TEXTS, read_sample_texts, with_one_mask
from aitune_core.serving import answer_batch, load_model
from models.hf_folders import add_sentence_transformers_modules, make_folder

JSON = {"body": {"content-type": "application/json"}, "url_path": ""}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {task: make_folder(task, root / task) for task in
            ("text-classification", "token-classification", "fill-mask", "sentence-embeddings")}


def copy(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def served(model_dir, body):
    [response] = answer_batch(load_model(model_dir, torch.device("cpu")), [({"body": body}, JSON)])
    return response


# -- which task a folder serves ------------------------------------------------------------------------
def test_task_is_read_from_the_folder(folders, tmp_path):
    for task, folder in folders.items():
        assert read_folder(folder)[0].task == task
    spec = read_folder(folders["sentence-embeddings"])[0]
    assert (spec.pooling, spec.dense, spec.normalize) == (["mean"], [], False)  # a bare encoder: mean pooling
    st = add_sentence_transformers_modules(copy(folders["sentence-embeddings"], tmp_path), pooling="max", dense=8)
    spec = read_folder(st)[0]
    assert (spec.task, spec.pooling, spec.normalize, spec.max_tokens) == ("sentence-embeddings", ["max"], True, 128)
    assert spec.dense == [{"in_features": 32, "out_features": 8, "bias": True, "activation": "Tanh"}]
    assert read_folder(folders["fill-mask"])[0].mask_token_id == 103
    assert read_folder(folders["text-classification"], "sentence-embeddings")[0].task == "sentence-embeddings"


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "has no config.json"),
    ("remote_code", "BertForSequenceClassification needs the folder's own Python code (config.json has auto_map)"),
    ("unknown_type", "transformers cannot read its config (model_type 'no-such-model'"),
    ("no_weights", "has no weights: expected one of model.safetensors"),
    ("no_tokenizer", "has no tokenizer transformers can load"),
    ("wrong_task", "--task token-classification does not fit"),
    ("causal_lm", "holds a causal language model: read it with aitune_core.generate"),
    ("no_labels_task", "--task 'summarization' is not one of"),
])
def test_folders_that_cannot_be_served_are_refused_with_one_line(folders, tmp_path, breakage, message):
    folder = copy(folders["text-classification"], tmp_path)
    task = None
    if breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "remote_code":
        edit_config(folder, auto_map={"AutoModel": "modeling_x.XModel"})
    elif breakage == "unknown_type":
        edit_config(folder, model_type="no-such-model")
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif breakage == "wrong_task":
        task = "token-classification"
    elif breakage == "causal_lm":
        edit_config(folder, architectures=["LlamaForCausalLM"])
    elif breakage == "no_labels_task":
        task = "summarization"
    with pytest.raises(ArchiveError) as error:
        read_folder(folder, task)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_weights_without_the_tasks_head_are_refused(folders, tmp_path):
    folder = copy(folders["sentence-embeddings"], tmp_path)  # a bare BertModel's weights...
    edit_config(folder, architectures=["BertForSequenceClassification"], id2label={"0": "a", "1": "b"},
                label2id={"a": 0, "b": 1})  # ...named a classifier
    with pytest.raises(ArchiveError, match=r"the weights lack 2 tensor\(s\) .*\(classifier.bias, classifier.weight\)"):
        prepare(folder, None, None, None, None)


def test_pytorch_model_bin_is_read_with_weights_only(folders, tmp_path):
    from safetensors.torch import load_file

    folder = copy(folders["text-classification"], tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    assert prepare(folder, None, None, None, None).module is not None

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    torch.save({"weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ArchiveError, match=r"pytorch_model.bin cannot be read with torch.load\(weights_only=True\)"):
        prepare(folder, None, None, None, None)


# -- sentence-transformers' pooling --------------------------------------------------------------------
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_equals_sentence_transformers(mode, side):
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    hidden = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(5))
    lengths = [7, 4, 1]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, 7 - length:] = 1
    expected = Pooling(16, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(pool(hidden, mask, mode), expected["sentence_embedding"], rtol=1e-5, atol=1e-6)


# -- the tasks in-process, another architecture ---------------------------------------------------------
@pytest.mark.parametrize("task", ["text-classification", "token-classification"])
def test_distilbert_answers_equal_the_pipeline(tmp_path, task):
    from transformers import pipeline

    folder = make_folder(task, tmp_path / "distil", architecture="distilbert", seed=2)
    archive_model(ArchiveOptions(model_name="d", hf_model=folder, backend="eager", export_path=tmp_path / "store",
                                 archive_format="no-archive"))
    answers = json.loads(served(tmp_path / "store" / "d", {"text": SAMPLE_TEXTS}).body)
    options = {"aggregation_strategy": "simple"} if task == "token-classification" else {}
    expected = pipeline(task, model=str(folder), device="cpu", **options)(SAMPLE_TEXTS)
    if task == "text-classification":
        assert [a["label"] for a in answers] == [e["label"] for e in expected]
        np.testing.assert_allclose([a["score"] for a in answers], [e["score"] for e in expected], atol=1e-4)
    else:
        assert [[(e["entity_group"], e["word"], e["start"], e["end"]) for e in a] for a in answers] == \
            [[(e["entity_group"], e["word"], e["start"], e["end"]) for e in x] for x in expected]


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask"])
def test_int8wo_agrees_with_fp32_on_the_top_label(folders, tmp_path, task):
    """The top label of each text (each token, for token classification; the top fill for fill-mask)."""
    texts = SAMPLE_TEXTS if task != "fill-mask" else with_one_mask(SAMPLE_TEXTS, "[MASK]")
    tops = {}
    for backend in ("eager", "torchao"):
        archive_model(ArchiveOptions(model_name=backend, hf_model=folders[task], backend=backend,
                                     export_path=tmp_path, archive_format="no-archive"))
        model = load_model(tmp_path / backend, torch.device("cpu"))
        encoded = model.codec.tokenize(texts)
        logits = model.backend.infer(encoded["input_ids"], encoded["attention_mask"])
        tops[backend] = logits.argmax(-1)[encoded["attention_mask"].bool()] if logits.dim() == 3 else logits.argmax(-1)
    agree = (tops["eager"] == tops["torchao"]).float().mean().item()
    assert agree >= 0.98, (task, agree)


# -- what the archive holds ----------------------------------------------------------------------------
def test_archive_carries_config_and_tokenizer_not_the_weight_files(folders, tmp_path):
    result = archive_model(ArchiveOptions(model_name="cls", hf_model=folders["text-classification"],
                                          export_path=tmp_path))
    with zipfile.ZipFile(result.archive_path) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("aitune_manifest.json"))
        requirements = mar.read("requirements.txt").decode().splitlines()
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names
    assert manifest["model"] == {"hf": {"task": "text-classification", "architecture": "BertForSequenceClassification",
                                        "max_tokens": 512, "pooling": [], "dense": [], "normalize": False,
                                        "mask_token_id": None}}
    assert manifest["request"]["codec"] == "hf" and manifest["request"]["labels"] == ["negative", "neutral", "positive"]
    assert {"config.json", "tokenizer.json"} <= set(manifest["files"])  # sha256-checked at worker start
    from importlib.metadata import version

    for package in ("transformers", "tokenizers", "torchao"):
        assert f"{package}=={version(package)}" in requirements


def test_sample_texts_file_and_max_tokens(folders, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nthird, after an empty one\n")
    assert read_sample_texts(texts) == ["first line", "", "third, after an empty one"]
    prepared = prepare(folders["fill-mask"], None, texts, 16, None)
    assert prepared.spec.max_tokens == prepared.codec.options.max_tokens == 16
    masked = [prepared.codec.tokenizer.decode(sample.args[0][0]) for sample in prepared.samples]
    assert all("[MASK]" in text for text in masked)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ArchiveError, match="is empty"):
        read_sample_texts(tmp_path / "empty.txt")


def test_with_one_mask():
    assert with_one_mask(["a [MASK] b", "", "one two three", "x [MASK] [MASK]"], "[MASK]") == \
        ["a [MASK] b", "[MASK]", "one [MASK] three", "[MASK]"]


@pytest.mark.parametrize("argv, message", [
    (["--hf-model", "DIR", "--sample", "s.pt"], "leave out --sample"),
    (["--model-file", "m.py", "--sample", "s.pt", "--task", "fill-mask"], "apply with --hf-model only"),
    (["--model-file", "m.py", "--sample", "s.pt", "--kv-cache-dtype", "bfloat16"], "apply with --hf-model only"),
    (["--model-file", "m.py", "--sample", "s.pt", "--stream-interval", "2"], "apply with --hf-model only"),
])
def test_cli_flag_mixups_are_one_line_errors(tmp_path, capsys, argv, message):
    folder = tmp_path / "DIR"
    folder.mkdir()
    argv = [str(folder) if arg == "DIR" else arg for arg in argv]
    assert archive_main(["--model-name", "m", "--export-path", str(tmp_path / "store"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_generation_flags_on_an_encoder_folder_are_one_line_errors(folders, tmp_path, capsys):
    argv = ["--model-name", "m", "--export-path", str(tmp_path), "--hf-model", str(folders["text-classification"])]
    for flag in (["--kv-cache-dtype", "bfloat16"], ["--stream-interval", "4"]):
        assert archive_main([*argv, *flag]) == 1
        assert ("--kv-cache-dtype, --stream-interval, --min-top1 and --max-kl apply to text generation only"
                in capsys.readouterr().err)


def test_both_or_neither_source_is_a_usage_error(tmp_path):
    for argv in (["--model-name", "m"], ["--model-name", "m", "--hf-model", str(tmp_path), "--model-file", "x.py"]):
        with pytest.raises(SystemExit):
            archive_main(argv)


def test_codec_checks_each_request(folders):
    codec = prepare(folders["text-classification"], None, None, None, None).codec
    assert codec.decode("one text").texts == ["one text"]
    request = codec.decode({"text": ["a", "b"], "top_k": None})
    assert (request.texts, request.ranked, request.top_k) == (["a", "b"], True, None)
    for body, message in (({"text": "a", "top_k": True}, "'top_k' must be"), ({"txt": ["a"]}, "unknown key(s) 'txt'"),
                          ({"top_k": 1}, "missing 'text'"), ([1, 2], "got list"),
                          ({"text": ["x" * 100_001]}, "text[0] has 100001 characters")):
        with pytest.raises(BadRequestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            codec.decode(body)


def test_module_file_flags_work_with_a_folder(folders, tmp_path, capsys):
    """--precision, --max-batch-size, --config-file and --kserve, from the command line, on a folder."""
    config = tmp_path / "model-config.yaml"
    config.write_text("batchSize: 4\nmaxBatchDelay: 20\nhandler:\n  torch_threads: 1\n")
    argv = ["--model-name", "cls", "--hf-model", str(folders["text-classification"]), "--backend", "eager",
            "--precision", "bf16", "--max-batch-size", "3", "--config-file", str(config),
            "--export-path", str(tmp_path / "store"), "--kserve", str(tmp_path / "kserve")]
    assert archive_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Task text-classification (read from the folder)" in out and "KServe layout in" in out
    assert (tmp_path / "kserve" / "config" / "config.properties").is_file()
    assert (tmp_path / "kserve" / "model-store" / "cls.mar").is_file()
    with zipfile.ZipFile(tmp_path / "store" / "cls.mar") as mar:
        mar.extractall(tmp_path / "cls")
        assert "torch_threads: 1" in mar.read("model-config.yaml").decode()
    model = load_model(tmp_path / "cls", torch.device("cpu"))
    assert "precision='bf16'" in model.backend.describe()
    [response] = answer_batch(model, [({"body": {"text": ["a", "b", "c", "d"]}}, JSON)])
    assert response.status == 400 and "at most 3 per request" in response.json()["error"]
    assert len(json.loads(served(tmp_path / "cls", {"text": ["a", "b", "c"]}).body)) == 3


def test_older_sentence_transformers_layout_with_the_model_in_0_transformer(folders, tmp_path):
    """modules.json naming ``0_Transformer/`` (older sentence-transformers folders): the same embeddings."""
    import shutil

    flat = add_sentence_transformers_modules(copy(folders["sentence-embeddings"], tmp_path, "flat"), pooling="mean")
    nested = copy(flat, tmp_path, "nested")
    (nested / "0_Transformer").mkdir()
    for path in list(nested.iterdir()):
        if path.is_file() and path.name not in ("modules.json", "sentence_bert_config.json"):
            shutil.move(str(path), nested / "0_Transformer" / path.name)
    modules = json.loads((nested / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (nested / "modules.json").write_text(json.dumps(modules))
    answers = {}
    for name, folder in (("flat", flat), ("nested", nested)):
        archive_model(ArchiveOptions(model_name=name, hf_model=folder, backend="eager", export_path=tmp_path / "store",
                                     archive_format="no-archive"))
        answers[name] = json.loads(served(tmp_path / "store" / name, {"text": SAMPLE_TEXTS[:4]}).body)["embeddings"]
    assert answers["nested"] == answers["flat"]
