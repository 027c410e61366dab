"""The Open Inference Protocol over gRPC (``GRPCInferenceService/ModelInfer``), as TorchServe 0.12 relays it.

TorchServe's frontend does not hand the worker the protobuf: it writes the request as v2 JSON
(``id``, ``model_name``, ``inputs`` with each input's typed ``contents`` as ``data``, BYTES
base64-encoded) and reads the worker's answer back as v2 JSON into a ``ModelInferResponse``. What
that relay allows and needs, read from its source and checked against a real torchserve:

- the answer must carry ``id``, ``model_name`` and ``model_version`` as strings and every output's
  ``name``, ``datatype``, ``shape`` and flat ``data``; anything else makes the frontend throw and
  restart the worker. Only the datatypes ``InferTensorContents`` has fields for can be sent back
  (FP16 and BF16 outputs go as FP32).
- ``raw_input_contents``, ``outputs`` and ``parameters`` of the request are dropped by the frontend:
  an input sent as raw bytes arrives with empty data (or none, for a datatype the frontend does
  not know), and is refused with a message that says so.
- a BYTES output element reaches the client as the JSON text of the element (Gson's ``toString``): a
  string arrives quoted (``"neutral"``), a JSON value (entities, fills) as its compact JSON document;
  so BYTES outputs are sent as JSON values, and clients ``json.loads`` each element.
- a per-request status is ignored; only a failure of the whole worker batch becomes a gRPC error
  status. ``aitune_core.serving`` raises one when the batch held just this request; inside a larger
  batch the error comes back as a BYTES output named ``error`` (see ``error_response``).
"""

from __future__ import annotations

from typing import Any

from aitune_core.codecs import Codec, Outcome
from aitune_core.errors import BadRequestError
from aitune_core.wire import JSON_CONTENT_TYPE, Call, ModelInfo, Request, Response, compact_json
from aitune_core.wire import kserve_v2

# What InferTensorContents can carry back (TorchServe's GRPCJob.setOutputContents).
DATATYPES = {dtype: datatype for dtype, datatype in kserve_v2.DATATYPES.items()
             if datatype not in ("FP16", "BF16")}
ERROR_OUTPUT = "error"


def is_oip(request: Request) -> bool:
    """An OIP ``ModelInfer`` call: no request headers, one JSON ``body`` holding ``model_name`` and ``inputs``."""
    if not request.is_grpc or request.content_types.get("body") != JSON_CONTENT_TYPE:
        return False
    body = request.parameters.get("body")
    return isinstance(body, dict) and "model_name" in body and "inputs" in body


def decode(request: Request, codec: Codec) -> Call:
    """The relayed request's inputs, checked by the codec."""
    header = request.parameters["body"]
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError("the ModelInfer request has no inputs")
    for tensor in inputs:
        # The frontend copies only the typed field of the input's datatype: raw bytes leave it empty.
        empty = isinstance(tensor, dict) and not tensor.get("data") and _numel(tensor.get("shape")) != 0
        if empty:
            raise BadRequestError(
                f"input {tensor.get('name')!r}: no data reached the model: TorchServe 0.12's gRPC frontend forwards "
                f"only typed contents (fp32_contents, int64_contents, bytes_contents...) and drops "
                f"raw_input_contents; datatype {tensor.get('datatype')!r} must come in its typed contents field")
    call = kserve_v2.decode({key: header[key] for key in ("id", "inputs") if key in header}, codec,
                            base64_bytes=True)
    return Call(encode, call.inputs, request_id(header))


def _numel(shape: Any) -> int | None:
    if not isinstance(shape, list) or not all(isinstance(dim, int) for dim in shape):
        return None
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def request_id(header: Any) -> str:
    """The request's id (the frontend sends "" when the client set none)."""
    value = header.get("id") if isinstance(header, dict) else None
    return value if isinstance(value, str) else ""


def _answer(request_id_: str, model: ModelInfo, outputs: list[dict[str, Any]]) -> str:
    return compact_json({"id": request_id_, "model_name": model.name, "model_version": model.version,
                         "outputs": outputs})


def encode(outcome: Outcome, call: Call, codec: Codec, model: ModelInfo) -> Response:
    """A v2 answer the frontend can turn into a ``ModelInferResponse``; errors as an ``error`` output."""
    if outcome.status != 200:
        return _error(call.options, outcome.status, outcome.error, model)
    named = codec.named_outputs(outcome.output)
    entries, _ = kserve_v2.output_entries(named, [(name, False) for name in named], DATATYPES, json_values=True)
    return Response(200, _answer(call.options, model, entries))


def _error(request_id_: str, status: int, message: str, model: ModelInfo) -> Response:
    # The status only counts when serving turns it into the batch's failure (a gRPC error status).
    entry = {"name": ERROR_OUTPUT, "datatype": "BYTES", "shape": [1], "data": [message]}
    return Response(status, _answer(request_id_, model, [entry]), error=message)


def error_response(request: Request, status: int, message: str, model: ModelInfo) -> Response:
    """The reply to an OIP request that could not be decoded."""
    return _error(request_id(request.parameters.get("body")), status, message, model)
