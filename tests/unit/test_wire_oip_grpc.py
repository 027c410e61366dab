"""OIP gRPC ModelInfer as TorchServe's frontend relays it, without a server."""

import base64
import json

import numpy as np
import pytest
import torch

from aitune_core.serving import answer_batch, batch_failure
from unit.torchserve_requests import fp32, oip, rest, v2_outputs

X = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
# Every key the frontend's GRPCJob reads with getAsString/getAsJsonArray; a missing one kills the worker thread.
REQUIRED = {"id", "model_name", "model_version", "outputs"}


def test_typed_contents_answer_like_predictions(mlp_model):
    request = oip([fp32("x", X)[0]], request_id="req-7")
    [answer, reference] = answer_batch(mlp_model, [request, rest(json.dumps(X.tolist()))])
    body = answer.json()
    assert answer.status == 200 and set(body) == REQUIRED
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-7", "mlp", "1.0")
    assert all(set(o) == {"name", "datatype", "shape", "data"} for o in body["outputs"])
    assert np.allclose(v2_outputs(answer)["output"], reference.json(), atol=1e-6)


def test_text_bytes_arrive_base64(text_model):
    texts = ["one sentence", "another, longer sentence"]
    encoded = [base64.b64encode(t.encode()).decode() for t in texts]
    [answer, reference] = answer_batch(text_model, [
        oip([{"name": "text", "shape": [2], "datatype": "BYTES", "data": encoded}]),
        rest(json.dumps({"text": texts}))])
    assert answer.status == 200, answer.body
    assert np.allclose(v2_outputs(answer)["embeddings"], reference.json()["embeddings"], atol=1e-6)


def test_narrow_float_outputs_go_as_fp32(mlp_model):
    from aitune_core.wire import oip_grpc
    from aitune_core.wire.kserve_v2 import output_entries

    [entry], _ = output_entries({"output": torch.ones(1, 2, dtype=torch.float16)}, [("output", False)],
                                oip_grpc.DATATYPES)
    assert entry["datatype"] == "FP32" and entry["data"] == [1.0, 1.0]


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "x", "shape": [2, 32], "datatype": "FP32", "data": []}],
     "input 'x': no data reached the model: TorchServe 0.12's gRPC frontend forwards only typed contents"),
    ([{"name": "x", "shape": [2, 32], "datatype": "FP16"}], "input 'x': no data reached the model"),
    ([{"name": "x", "shape": [2, 32], "datatype": "INT64", "data": [1] * 64}],
     "input 'x': datatype must be FP32 (float32), got 'INT64'"),
    ([{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 32}], "input 'x': dim 1 must be 32, got 16"),
])
def test_bad_request_is_a_parseable_answer_and_a_batch_failure(mlp_model, inputs, message):
    request = oip(inputs, request_id="bad-1")
    [answer] = answer_batch(mlp_model, [request])
    body = answer.json()
    assert answer.status == 400 and set(body) == REQUIRED and body["id"] == "bad-1"
    assert body["outputs"] == [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [answer.error]}]
    assert message in answer.error
    assert batch_failure([request], [answer]) == (400, answer.error)
