"""Every protocol TorchServe speaks, through the real torchserve, with clients no one here wrote.

tritonclient's HTTP client (v2 REST, JSON and binary), TorchServe's own gRPC stubs generated from
the .proto files in the installed jar (Predictions and OIP ModelInfer), and a plain HTTP client
for KServe v1. Each answer must equal the /predictions answer for the same input; each bad input
gets its protocol's error, and the worker keeps its PID.
"""

import json
import re
import threading

import grpc
import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from integration.clients import Clients, oip_outputs

X = torch.randn(3, 32, generator=torch.Generator().manual_seed(21))
X2 = torch.randn(2, 16, generator=torch.Generator().manual_seed(22))
IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(23))
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.", ""]


@pytest.fixture(scope="module")
def clients(server, stubs):
    return Clients(server, stubs)


@pytest.fixture(scope="module")
def text_clients(minilm_server, stubs):
    return Clients(minilm_server, stubs)


def same(got, expected):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32),
                               rtol=0, atol=1e-6)


# -- answers equal /predictions -------------------------------------------------------------------
def test_one_input_model_through_every_protocol(clients):
    model, x = "mlp_int8wo", X.numpy()
    expected = clients.rest(model, X.tolist())
    status, v1 = clients.v1(model, {"instances": X.tolist()})
    assert status == 200
    same(v1["predictions"], expected)
    for binary in (False, True):
        result = clients.v2(model, [("x", x, "FP32")], binary, outputs=["output"], request_id=f"id-{binary}")
        same(result.as_numpy("output"), expected)
        answer = result.get_response()
        assert (answer["model_name"], answer["model_version"], answer["id"]) == (model, "1.0", f"id-{binary}")
        assert ("parameters" in answer["outputs"][0]) == binary  # binary_data_size instead of data
    same(clients.v2(model, [("x", x, "FP32")], True).as_numpy("output"), expected)  # binary_data_output default
    same(clients.grpc_predictions(model, json.dumps(X.tolist()).encode()), expected)
    response = clients.model_infer(model, [("x", x, "FP32")], request_id="oip-1")
    assert (response.id, response.model_name, response.model_version) == ("oip-1", model, "1.0")
    same(oip_outputs(response)["output"], expected)


def test_two_input_model_with_a_tuple_output_through_every_protocol(clients):
    model, x, ids = "two_inputs", X2.numpy(), IDS.numpy()
    projected, norms = clients.rest(model, {"inputs": [X2.tolist(), IDS.tolist()]})
    inputs = [("x", x, "FP32"), ("ids", ids, "INT64")]
    status, v1 = clients.v1(model, {"instances": [{"x": x[i].tolist(), "ids": ids[i].tolist()} for i in range(2)]})
    assert status == 200, v1
    same([row["output_0"] for row in v1["predictions"]], projected)
    same([row["output_1"] for row in v1["predictions"]], norms)
    for binary in (False, True):
        result = clients.v2(model, inputs, binary, outputs=["output_0", "output_1"])
        same(result.as_numpy("output_0"), projected)
        same(result.as_numpy("output_1"), norms)
    only = clients.v2(model, inputs, True, outputs=["output_1"]).get_response()
    assert [o["name"] for o in only["outputs"]] == ["output_1"]
    grpc_answer = clients.grpc_predictions(model, json.dumps({"inputs": [X2.tolist(), IDS.tolist()]}).encode())
    same(grpc_answer[0], projected)
    same(grpc_answer[1], norms)
    outputs = oip_outputs(clients.model_infer(model, inputs))
    same(outputs["output_0"], projected)
    same(outputs["output_1"], norms)


def test_text_model_through_every_protocol(text_clients):
    model = "minilm_int8wo"
    expected = text_clients.rest(model, {"text": TEXTS})["embeddings"]
    texts = np.array(TEXTS, dtype=object)
    status, v1 = text_clients.v1(model, {"instances": TEXTS})
    assert status == 200
    same(v1["predictions"], expected)
    for binary in (False, True):
        same(text_clients.v2(model, [("text", texts, "BYTES")], binary, outputs=["embeddings"])
             .as_numpy("embeddings"), expected)
    same(text_clients.grpc_predictions(model, json.dumps({"text": TEXTS}).encode())["embeddings"], expected)
    same(oip_outputs(text_clients.model_infer(model, [("text", texts, "BYTES")]))["embeddings"], expected)


# -- bad input: the protocol's error, the worker keeps serving -----------------------------------------
def still_serving(clients, model, pids):
    assert clients.server.worker_pids(model) == pids
    same(clients.v2(model, [("x", X.numpy(), "FP32")], True).as_numpy("output"), clients.rest(model, X.tolist()))


def test_v1_bad_instances(clients):
    model, pids = "mlp_int8wo", clients.server.worker_pids("mlp_int8wo")
    status, answer = clients.v1(model, {"instances": [[0.5] * 31]})
    assert status == 400
    assert answer == {"error": "input 'x': dim 1 must be 32, got 31 (shape [1, 31], expected like [4, 32])"}
    status, answer = clients.v1(model, {"instances": []})
    assert status == 400 and "'instances' must be a non-empty list" in answer["error"]
    still_serving(clients, model, pids)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_bad_requests(clients, binary):
    model, pids = "mlp_int8wo", clients.server.worker_pids("mlp_int8wo")
    cases = [([("x", X.numpy()[:, :31], "FP32")], "input 'x': dim 1 must be 32, got 31"),
             ([("x", X.numpy().astype(np.float64), "FP64")], "input 'x': datatype must be FP32 (float32), got 'FP64'"),
             ([("y", X.numpy(), "FP32")], "unknown input 'y': this model takes 'x' (FP32)")]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as error:
            clients.v2(model, inputs, binary)
        assert error.value.status() == "400" and message in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        clients.v2(model, [("x", X.numpy(), "FP32")], binary, outputs=["logits"])
    assert "unknown output 'logits' requested: this model answers 'output'" in error.value.message()
    still_serving(clients, model, pids)


def test_grpc_predictions_bad_request_is_an_error_status(clients):
    model, pids = "mlp_int8wo", clients.server.worker_pids("mlp_int8wo")
    with pytest.raises(grpc.RpcError) as error:
        clients.grpc_predictions(model, b"[[1, 2]]")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # TorchServe appends the exception class it reports on a line of its own.
    assert error.value.details() == ("input 0: dim 1 must be 32, got 2 (shape [1, 2], expected like [4, 32])\n"
                                     "org.pytorch.serve.http.InternalServerException")
    with pytest.raises(grpc.RpcError) as error:
        clients.grpc_predictions(model, b"{not json")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("the request body is not valid JSON")
    still_serving(clients, model, pids)


def test_oip_bad_requests_are_error_statuses(clients):
    model, pids = "mlp_int8wo", clients.server.worker_pids("mlp_int8wo")
    cases = [([("x", X.numpy()[:, :16], "FP32")], False, "input 'x': dim 1 must be 32, got 16"),
             ([("x", X.numpy().astype(np.int64), "INT64")], False, "input 'x': datatype must be FP32 (float32)"),
             ([("x", X.numpy(), "FP32")], True, "input 'x': no data reached the model: TorchServe 0.12's gRPC frontend "
                                                "forwards only typed contents")]
    for inputs, raw, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            clients.model_infer(model, inputs, raw=raw)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    still_serving(clients, model, pids)


def test_text_model_bad_requests(text_clients):
    model, pids = "minilm_int8wo", text_clients.server.worker_pids("minilm_int8wo")
    status, answer = text_clients.v1(model, {"instances": [42]})
    assert status == 400 and answer["error"] == "text[0]: expected a string, got int"
    with pytest.raises(InferenceServerException) as error:
        text_clients.v2(model, [("text", np.array([[1, 2]], dtype=np.int64), "INT64")], True)
    assert "input 'text': datatype must be BYTES (bytes), got 'INT64'" in error.value.message()
    with pytest.raises(grpc.RpcError) as error:
        text_clients.model_infer(model, [("x", np.array(["a"], dtype=object), "BYTES")])
    assert "unknown input 'x': this model takes 'text' (BYTES)" in error.value.details()
    assert text_clients.server.worker_pids(model) == pids
    assert len(text_clients.rest(model, {"text": ["still serving"]})["embeddings"]) == 1


def test_in_a_batch_a_bad_grpc_request_answers_ok_with_its_error(clients):
    """TorchServe sends a per-request status on REST only: in a worker batch of several, a bad gRPC
    request cannot fail alone, so its answer says what went wrong in the body."""
    model, pids = "mlp_batched", clients.server.worker_pids("mlp_batched")
    before = clients.server.batch_size_histogram(model)
    answers = {}

    def call(name, function):
        answers[name] = function()

    threads = [threading.Thread(target=call, args=args) for args in [
        ("good", lambda: clients.grpc_predictions(model, json.dumps(X.tolist()).encode())),
        ("bad", lambda: clients.grpc_predictions(model, b"[[1, 2]]")),
        ("bad_oip", lambda: clients.model_infer(model, [("x", X.numpy()[:, :16], "FP32")], request_id="b")),
    ]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    after = clients.server.batch_size_histogram(model)
    assert after["AITuneBatchSize_sum"] - before.get("AITuneBatchSize_sum", 0) == 3
    assert after["AITuneBatchSize_count"] - before.get("AITuneBatchSize_count", 0) == 1, "not one batch"
    same(answers["good"], clients.rest(model, X.tolist()))
    assert answers["bad"] == {"error": "input 0: dim 1 must be 32, got 2 (shape [1, 2], expected like [4, 32])"}
    [error] = answers["bad_oip"].outputs
    assert (answers["bad_oip"].id, error.name, error.datatype) == ("b", "error", "BYTES")
    # TorchServe's frontend writes a BYTES output as the JSON text of the string, quotes included.
    assert json.loads(error.contents.bytes_contents[0]) == ("input 'x': dim 1 must be 32, got 16 "
                                                           "(shape [3, 16], expected like [4, 32])")
    assert clients.server.worker_pids(model) == pids


def test_workers_use_the_aitune_core_their_archive_carries(clients):
    log = clients.server.model_log()
    used = re.findall(r"AITune: model mlp_int8wo ready: .*; aitune_core from (\S+)", log)
    assert used and all(re.search(r"/models/[0-9a-f]+/aitune_core$", path) for path in used), used
