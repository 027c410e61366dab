"""Requests exactly as TorchServe 0.12's worker hands them to a handler, per protocol.

Read from the frontend's source (InferenceRequestHandler, InferenceImpl, OpenInferenceProtocolImpl)
and the worker's decoding (otf_message_handler, service.py): the parameters dict, and the header
dict that holds each parameter's Content-Type next to the request's own headers.
"""

import json

import numpy as np
import torch

JSON = "application/json"


def rest(body, content_type=JSON, predictions=True, headers=None):
    """A REST request; ``predictions``: /predictions (which adds url_path), else a KServe route.

    The worker parses a body sent as exactly application/json itself; any other arrives as bytes.
    """
    parsed = json.loads(body) if isinstance(body, str) and content_type == JSON else body
    all_headers = {"body": {"content-type": content_type or ""}, "Host": "127.0.0.1", "explain": "False",
                   **(headers or {})}
    if content_type:
        all_headers["Content-Type"] = content_type
    if predictions:
        all_headers["url_path"] = ""
    return {"body": parsed}, all_headers


def v2_binary(header: dict, tensors: list[bytes], content_type="application/octet-stream"):
    """The binary tensor extension: JSON header, raw tensors, and its length in a header."""
    text = json.dumps(header).encode()
    return rest(bytearray(text + b"".join(tensors)), content_type, predictions=False,
                headers={"Inference-Header-Content-Length": str(len(text))})


def grpc_predictions(body: bytes, name="data"):
    """A gRPC Predictions call: its input map as parameters, no Content-Type, no request header."""
    return {name: bytearray(body)}, {name: {"content-type": ""}}


def oip(inputs: list[dict], request_id="", model_name="m"):
    """An OIP ModelInfer call as the frontend relays it: v2 JSON in 'body', parsed by the worker."""
    return {"body": {"id": request_id, "model_name": model_name, "inputs": inputs}}, {"body": {"content-type": JSON}}


def fp32(name, tensor: torch.Tensor, binary=False):
    """A v2 FP32 input, as JSON data or (binary) its raw bytes."""
    entry = {"name": name, "shape": list(tensor.shape), "datatype": "FP32"}
    if binary:
        raw = tensor.numpy().astype("<f4").tobytes()
        return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**entry, "data": tensor.flatten().tolist()}, b""


def v2_outputs(response) -> dict[str, np.ndarray]:
    """A v2 answer's outputs as arrays, JSON or binary."""
    answer = response.json()
    body = response.body if isinstance(response.body, bytes) else response.body.encode()
    offset = int(response.headers.get("Inference-Header-Content-Length", len(body)))
    arrays = {}
    for output in answer["outputs"]:
        dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "BOOL": "?"}[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
        else:
            arrays[output["name"]] = np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(output["shape"])
            offset += size
    return arrays


def assert_answers_close(actual, expected, rtol=1e-5, atol=1e-6):
    """Two JSON answers alike: the same structure and non-float values, floats within float32's rounding.

    Requests that share a batch run in one ``infer``: a float32 GEMM may round a row differently with its position in
    the batch (another blocking of the sum, seen in the 7th significant digit on an AVX-512 CPU without AMX), so
    answers computed in different batches are equal to float32's precision, not bit for bit.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for key in expected:
            assert_answers_close(actual[key], expected[key], rtol, atol)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (actual, expected)
        for got, wanted in zip(actual, expected):
            assert_answers_close(got, wanted, rtol, atol)
    elif isinstance(expected, float):
        assert isinstance(actual, float) and np.isclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)
    else:
        assert actual == expected and type(actual) is type(expected), (actual, expected)
