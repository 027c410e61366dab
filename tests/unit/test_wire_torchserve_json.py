"""TorchServe's JSON over REST and over gRPC Predictions, without a server."""

import json

import pytest
import torch

from aitune_core.errors import BadRequestError
from aitune_core.serving import answer_batch, batch_failure
from aitune_core.wire import Request, torchserve_json
from unit.torchserve_requests import JSON, assert_answers_close, grpc_predictions, rest

X = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("parameters, headers, expected", [
    ({"body": [[1, 2]]}, {"body": {"content-type": JSON}, "url_path": ""}, [[1, 2]]),
    ({"body": bytearray(b"[[1, 2]]")}, {"body": {"content-type": "application/json; charset=utf-8"}, "url_path": ""},
     [[1, 2]]),
    ({"body": {"inputs": []}}, {"body": {"content-type": "Application/JSON"}, "url_path": ""}, {"inputs": []}),
    ({"body": "a JSON string TorchServe parsed"}, {"body": {"content-type": JSON}, "url_path": ""},
     "a JSON string TorchServe parsed"),
    # KServe's routes and gRPC calls often send no Content-Type: the body is read as JSON anyway.
    ({"body": bytearray(b'{"instances": [1]}')}, {"body": {"content-type": ""}, "explain": "False"},
     {"instances": [1]}),
    ({"data": bytearray(b"[[1, 2]]")}, {"data": {"content-type": ""}}, [[1, 2]]),
])
def test_parse_body(parameters, headers, expected):
    assert torchserve_json.parse_body(Request.from_torchserve(parameters, headers)) == expected


@pytest.mark.parametrize("parameters, headers, message", [
    ({"body": bytearray(b"[[1, 2")}, {"body": {"content-type": JSON}, "url_path": ""}, "not valid JSON"),
    ({"body": bytearray(b"")}, {"body": {"content-type": JSON}, "url_path": ""}, "empty"),
    ({"body": bytearray(b"\xff\xfe[1]")}, {"body": {"content-type": JSON}, "url_path": ""}, "not UTF-8"),
    ({"body": "[[1]]"}, {"body": {"content-type": "text/plain"}, "url_path": ""},
     "Content-Type must be application/json, got 'text/plain'"),
    ({"body": bytearray(b"[[1]]")}, {"body": {"content-type": ""}, "url_path": ""},
     "Content-Type must be application/json, got no Content-Type"),
    ({}, {"url_path": "", "Content-Type": "application/x-www-form-urlencoded"}, "not sent as JSON"),
    ({"body": bytearray(b"[" * 100000 + b"]" * 100000)}, {"body": {"content-type": JSON}, "url_path": ""},
     "nested too deeply|not valid JSON"),
    ({"a": bytearray(b"[1]"), "b": bytearray(b"[2]")}, {"a": {"content-type": ""}, "b": {"content-type": ""}},
     "must carry one input \\(e.g. 'data'\\) holding the JSON body, got 2: 'a', 'b'"),
])
def test_parse_body_errors(parameters, headers, message):
    with pytest.raises(BadRequestError, match=message):
        torchserve_json.parse_body(Request.from_torchserve(parameters, headers))


def test_rest_and_grpc_predictions_answer_alike(mlp_model):
    expected = mlp_model.backend.infer(X)
    [over_rest, over_grpc] = answer_batch(mlp_model, [rest(json.dumps(X.tolist())),
                                                      grpc_predictions(json.dumps(X.tolist()).encode())])
    assert over_rest.status == over_grpc.status == 200
    assert_answers_close(json.loads(over_grpc.body), json.loads(over_rest.body))  # the two ran in one batch
    assert torch.allclose(torch.tensor(over_rest.json()), expected, atol=1e-6)
    assert over_rest.content_type == JSON


def test_bad_grpc_request_fails_its_batch_of_one_with_the_message(mlp_model):
    request = grpc_predictions(b"[[1, 2]]")
    [response] = answer_batch(mlp_model, [request])
    assert response.status == 400
    assert batch_failure([request], [response]) == (400, "input 0: dim 1 must be 32, got 2 (shape [1, 2], "
                                                         "expected like [4, 32])")
    # In a larger batch it would fail the others too: the client then gets the {"error"} body.
    good = grpc_predictions(json.dumps(X.tolist()).encode())
    responses = answer_batch(mlp_model, [request, good])
    assert [r.status for r in responses] == [400, 200]
    assert batch_failure([request, good], responses) is None
    assert "dim 1 must be 32" in responses[0].json()["error"]
