"""TorchServe's own JSON (``POST /predictions/NAME``, and the body of a gRPC ``Predictions`` call).

Body: a nested list (the one positional input) or ``{"inputs": [...], "kwargs": {...}}``; a text
model takes ``{"text": [...]}``. Answer: the output as JSON (see ``payload.encode_output``), or
``{"error": "..."}`` with a 4xx.
"""

from __future__ import annotations

from typing import Any

from aitune_core.codecs import Codec, Outcome
from aitune_core.errors import BadRequestError
from aitune_core.wire import JSON_CONTENT_TYPE, Call, ModelInfo, Request, Response, compact_json, error_response, parse_json

PREDICTIONS_HEADER = "url_path"  # TorchServe's frontend adds it to /predictions and /explanations requests only


def parse_body(request: Request) -> Any:
    """The JSON value of a request's body.

    ``/predictions`` keeps its contract (a JSON Content-Type, so a form-encoded body, whose data
    TorchServe drops, is named as such); KServe's routes and gRPC calls often send none, so any
    body is read as JSON there.
    """
    body, content_type = request.body()
    if PREDICTIONS_HEADER in request.headers:
        mime = (content_type or "").split(";")[0].strip().lower()
        if mime != JSON_CONTENT_TYPE:
            found = repr(content_type) if content_type else "no Content-Type"
            raise BadRequestError(f"Content-Type must be {JSON_CONTENT_TYPE}, got {found}")
    return parse_json(body, content_type)


def decode(value: Any, codec: Codec) -> Call:
    """A TorchServe JSON value checked by the codec."""
    return Call(encode, codec.decode(value))


def encode(outcome: Outcome, call: Call, codec: Codec, model: ModelInfo) -> Response:
    """The output as compact JSON, or ``{"error": ...}``."""
    if outcome.status != 200:
        return error_response(outcome.status, outcome.error)
    return Response(200, compact_json(codec.to_json(outcome.output)))
