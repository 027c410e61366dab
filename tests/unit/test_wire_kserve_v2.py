"""KServe v2 / OIP REST without a server: JSON and binary both ways, names, datatypes, errors."""

import json
import struct

import numpy as np
import pytest
import torch

from aitune_core.serving import answer_batch
from unit.torchserve_requests import fp32, rest, v2_binary, v2_outputs

X = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))


def v2(body):
    return rest(json.dumps(body), predictions=False)


def reference(model, body):
    """The TorchServe JSON answer for the same input."""
    [answer] = answer_batch(model, [rest(json.dumps(body))])
    assert answer.status == 200
    return answer.json()


def test_json_request_answers_like_predictions(mlp_model):
    entry, _ = fp32("x", X)
    [answer] = answer_batch(mlp_model, [v2({"id": "r1", "inputs": [entry]})])
    assert answer.status == 200 and answer.content_type == "application/json"
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("mlp", "1.0", "r1")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", [3, 8])
    assert np.allclose(v2_outputs(answer)["output"], reference(mlp_model, X.tolist()), atol=1e-6)


def test_binary_both_ways(mlp_model):
    entry, raw = fp32("x", X, binary=True)
    [answer] = answer_batch(mlp_model, [v2_binary({"inputs": [entry], "parameters": {"binary_data_output": True}},
                                                  [raw])])
    assert answer.status == 200 and answer.content_type == "application/octet-stream"
    header = answer.json()
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 3 * 8 * 4}
    assert "id" not in header and "data" not in header["outputs"][0]
    assert len(answer.body) == int(answer.headers["Inference-Header-Content-Length"]) + 3 * 8 * 4
    assert np.allclose(v2_outputs(answer)["output"], reference(mlp_model, X.tolist()), atol=1e-6)


def test_binary_input_json_output_and_nested_data(mlp_model):
    entry, raw = fp32("x", X, binary=True)
    [binary_in, nested] = answer_batch(mlp_model, [
        v2_binary({"inputs": [entry]}, [raw]),
        v2({"inputs": [{"name": "x", "shape": [3, 32], "datatype": "FP32", "data": X.tolist()}]})])
    assert binary_in.content_type == nested.content_type == "application/json"
    assert np.allclose(v2_outputs(binary_in)["output"], v2_outputs(nested)["output"])


def test_two_inputs_tuple_output_and_requested_outputs(two_model):
    x, ids = torch.randn(2, 16), torch.randint(0, 100, (2, 6))
    inputs = [fp32("x", x)[0], {"name": "ids", "shape": [2, 6], "datatype": "INT64", "data": ids.flatten().tolist()}]
    projected, norms = reference(two_model, {"inputs": [x.tolist(), ids.tolist()]})
    [every, chosen] = answer_batch(two_model, [
        v2({"inputs": inputs}),
        v2({"inputs": inputs[::-1], "outputs": [{"name": "output_1", "parameters": {"binary_data": True}}]})])
    outputs = v2_outputs(every)
    assert list(outputs) == ["output_0", "output_1"]
    assert np.allclose(outputs["output_0"], projected, atol=1e-6) and np.allclose(outputs["output_1"], norms, atol=1e-6)
    assert [o["name"] for o in chosen.json()["outputs"]] == ["output_1"]
    assert np.allclose(v2_outputs(chosen)["output_1"], norms, atol=1e-6)


def test_dict_output_names(dict_model):
    [answer] = answer_batch(dict_model, [v2({"inputs": [fp32("x", torch.randn(2, 12))[0]]})])
    assert answer.status == 200, answer.body
    assert [o["name"] for o in answer.json()["outputs"]] == ["logits", "probs"]


def test_text_model_bytes_json_and_binary(text_model):
    texts = ["a short one", "a somewhat longer sentence to embed", ""]
    expected = reference(text_model, {"text": texts})["embeddings"]
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    [as_json, as_binary] = answer_batch(text_model, [
        v2({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}),
        v2_binary({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                               "parameters": {"binary_data_size": len(raw)}}]}, [raw])])
    for answer in (as_json, as_binary):
        assert answer.status == 200, answer.body
        [output] = answer.json()["outputs"]
        assert output["name"] == "embeddings"
        assert np.allclose(v2_outputs(answer)["embeddings"], expected, atol=1e-6)


X_ENTRY = {"name": "x", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}
BAD = [
    ("wrong datatype", {"inputs": [{**X_ENTRY, "datatype": "FP64"}]}, "input 'x': datatype must be FP32 (float32), got 'FP64'"),
    ("wrong shape", {"inputs": [{**X_ENTRY, "shape": [2, 16]}]}, "input 'x': dim 1 must be 32, got 16"),
    ("data and shape disagree", {"inputs": [{**X_ENTRY, "shape": [2, 32]}]}, "input 'x': 'data' has 32 values, shape [2, 32] needs 64"),
    ("unknown input", {"inputs": [{**X_ENTRY, "name": "y"}]}, "unknown input 'y': this model takes 'x' (FP32)"),
    ("input twice", {"inputs": [X_ENTRY, X_ENTRY]}, "input 'x' is given twice"),
    ("strings as FP32", {"inputs": [{**X_ENTRY, "data": ["a"] * 32}]}, "FP32 data must be numbers, got strings"),
    ("booleans as FP32", {"inputs": [{**X_ENTRY, "data": [True] * 32}]}, "FP32 data must be numbers, got booleans"),
    ("NaN", {"inputs": [{**X_ENTRY, "data": [float("nan")] * 32}]}, "input 'x': contains NaN or Inf"),
    ("past float32", {"inputs": [{**X_ENTRY, "data": [1e39] * 32}]}, "input 'x': contains NaN or Inf, or a value beyond the range of float32"),
    ("bad shape", {"inputs": [{**X_ENTRY, "shape": [-1, 32]}]}, "'shape' must be a list of non-negative integers"),
    ("no data", {"inputs": [{k: v for k, v in X_ENTRY.items() if k != "data"}]}, "has neither 'data' nor parameters.binary_data_size"),
    ("unknown output", {"inputs": [X_ENTRY], "outputs": [{"name": "logits"}]}, "unknown output 'logits' requested: this model answers 'output'"),
    ("unknown key", {"inputs": [X_ENTRY], "input": 1}, "unknown key(s) 'input' in the v2 request"),
    ("id not a string", {"id": 7, "inputs": [X_ENTRY]}, "'id' must be a string, got int"),
    ("binary size without the header", {"inputs": [{**X_ENTRY, "parameters": {"binary_data_size": 128}}]}, "no Inference-Header-Content-Length header"),
    ("no inputs", {"inputs": []}, "expected 1 positional input(s), got 0"),
]


@pytest.mark.parametrize("case, body, message", BAD, ids=[case for case, _, _ in BAD])
def test_bad_json_requests(mlp_model, case, body, message):
    [answer] = answer_batch(mlp_model, [v2(body)])
    assert answer.status == 400 and message in answer.json()["error"], answer.body


def test_bad_binary_requests(mlp_model):
    entry, raw = fp32("x", X, binary=True)
    cases = [
        (v2_binary({"inputs": [entry]}, [raw[:-4]]), "binary_data_size 384 runs past the 380 bytes"),
        (v2_binary({"inputs": [entry]}, [raw + b"1234"]), "the binary data has 388 bytes, the inputs' binary_data_size add up to 384"),
        (v2_binary({"inputs": [{**entry, "shape": [3, 31]}]}, [raw]), "binary_data_size is 384 bytes, shape [3, 31] of FP32 needs 372"),
        (v2_binary({"inputs": [{**entry, "datatype": "INT32"}]}, [raw]), "datatype must be FP32 (float32), got 'INT32'"),
    ]
    not_json = rest(bytearray(b"{not json" + raw), "application/octet-stream", predictions=False,
                    headers={"Inference-Header-Content-Length": "9"})
    too_long = rest(bytearray(raw), None, predictions=False, headers={"Inference-Header-Content-Length": "9999"})
    cases += [(not_json, "the JSON header of the binary request is not valid JSON"),
              (too_long, "Inference-Header-Content-Length is 9999, but the body has 384 bytes")]
    answers = answer_batch(mlp_model, [request for request, _ in cases])
    for answer, (_, message) in zip(answers, cases):
        assert answer.status == 400 and message in answer.error, (message, answer.body)


def test_a_batch_mixing_protocols_answers_each_in_its_own(mlp_model):
    entry, raw = fp32("x", X[:1], binary=True)
    requests = [rest(json.dumps(X.tolist())), v2_binary({"inputs": [entry], "parameters": {"binary_data_output": True}}, [raw]),
                v2({"inputs": [{**X_ENTRY, "datatype": "INT8"}]}), rest(json.dumps({"instances": X[1:].tolist()}), predictions=False)]
    answers = answer_batch(mlp_model, requests)
    assert [a.status for a in answers] == [200, 200, 400, 200]
    rows = torch.tensor(answers[0].json())
    assert np.allclose(v2_outputs(answers[1])["output"], rows[:1].numpy(), atol=1e-6)
    assert np.allclose(answers[3].json()["predictions"], rows[1:].numpy(), atol=1e-6)
