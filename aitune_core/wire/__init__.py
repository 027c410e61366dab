"""Wire formats: the bytes and headers of one request in, that protocol's reply out.

One module per protocol, each tested without a server:

- ``torchserve_json``: TorchServe's ``/predictions`` JSON (also the body of a gRPC ``Predictions`` call),
- ``kserve_v1``: ``{"instances": [...]}`` -> ``{"predictions": [...]}``,
- ``kserve_v2``: the Open Inference Protocol's REST form, JSON and the binary tensor extension,
- ``oip_grpc``: the OIP gRPC ``ModelInfer``, which TorchServe's frontend turns into v2 JSON and back;
- ``openai``: OpenAI's completions, chat and models endpoints for a text-generation archive (by ``url_path``).

TorchServe hands a worker every protocol the same way (a dict of parameters plus headers), so
``read_request`` tells them apart: gRPC calls carry no request headers at all; a binary v2 request
has ``Inference-Header-Content-Length``; otherwise the body's shape says v1 (``instances``), v2
(``inputs`` as named tensors) or TorchServe's own JSON. The body, not the URL, decides, because
KServe's TorchServe wrapper forwards v1 and v2 bodies to ``/predictions`` as well.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aitune_core.errors import BadRequestError

JSON_CONTENT_TYPE = "application/json"
BINARY_HEADER = "inference-header-content-length"  # the v2 binary tensor extension's header, lowercased


@dataclasses.dataclass
class ModelInfo:
    """What a reply says about the model (v2 answers carry its name and version)."""

    name: str
    version: str = "1.0"


@dataclasses.dataclass
class Request:
    """One request as TorchServe's worker received it, without TorchServe types.

    ``parameters``: name -> value (a parsed JSON value, a str, or bytes); ``content_types``:
    parameter name -> its Content-Type; ``headers``: the request's own headers, lowercased names
    (none at all for a gRPC call).
    """

    parameters: dict[str, Any]
    content_types: dict[str, str | None]
    headers: dict[str, str]

    @classmethod
    def from_torchserve(cls, parameters: dict[str, Any], headers: dict[str, Any] | None) -> "Request":
        """Split TorchServe's per-request header dict: a parameter's entry is ``{"content-type": ...}``."""
        content_types, request_headers = {}, {}
        for name, value in (headers or {}).items():
            if isinstance(value, dict):
                content_types[name] = value.get("content-type") or None
            else:
                request_headers[name.lower()] = value
        return cls(parameters, content_types, request_headers)

    @property
    def is_grpc(self) -> bool:
        """gRPC calls (``Predictions`` and OIP ``ModelInfer``) reach the worker with no request header."""
        return not self.headers

    def body(self) -> tuple[Any, str | None]:
        """The one parameter a protocol body travels in, and its Content-Type.

        REST bodies come as ``body``; a gRPC ``Predictions`` call may name its one input freely
        (TorchServe's examples use ``data``).
        """
        if "body" in self.parameters:
            return self.parameters["body"], self.content_types.get("body")
        if self.is_grpc and len(self.parameters) == 1:
            [(name, value)] = self.parameters.items()
            return value, self.content_types.get(name)
        if self.is_grpc:
            raise BadRequestError(f"a gRPC Predictions request must carry one input (e.g. 'data') holding the JSON "
                                  f"body, got {len(self.parameters)}: {', '.join(map(repr, self.parameters)) or 'none'}")
        raise BadRequestError("the request body was not sent as JSON (form-encoded or no Content-Type): "
                              f"send it with 'Content-Type: {JSON_CONTENT_TYPE}'")


@dataclasses.dataclass
class Response:
    """One reply: HTTP status, the encoded body, its Content-Type and any extra headers."""

    status: int
    body: bytes | str
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the message of a failed reply, whatever the protocol put it in

    def json(self) -> Any:
        """The body parsed as JSON (up to the v2 binary header's length, when there is one)."""
        length = self.headers.get("Inference-Header-Content-Length")
        body = self.body[:int(length)] if length is not None else self.body
        return json.loads(body)


@dataclasses.dataclass
class Call:
    """A decoded request: the codec's input, and how its wire format answers it.

    ``encode(outcome, call, codec, model) -> Response`` is the decoding module's own.
    """

    encode: Callable[..., Response]
    inputs: Any
    options: Any = None


def parse_json(body: Any, content_type: str | None, where: str = "the request body") -> Any:
    """A JSON value from TorchServe's parameter.

    TorchServe's worker parses a body sent as exactly ``application/json`` itself (a JSON string
    then arrives as a str); it hands over bytes when that failed or for any other type, and a str
    for ``text/*``.
    """
    if content_type == JSON_CONTENT_TYPE and not isinstance(body, (bytes, bytearray)):
        return body
    if isinstance(body, (bytes, bytearray, memoryview)):
        if not body:
            raise BadRequestError(f"{where} is empty: expected a JSON value")
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequestError(f"{where} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    if not isinstance(body, str):
        return body
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise BadRequestError(f"{where} is not valid JSON: {error.msg} at line {error.lineno} "
                              f"column {error.colno}") from None
    except RecursionError:
        raise BadRequestError(f"{where} is nested too deeply to decode") from None


def compact_json(value: Any) -> str:
    """Compact JSON text (TorchServe would indent a dict or list, which costs time and bytes)."""
    return _COMPACT_JSON.encode(value)


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def error_response(status: int, message: str) -> Response:
    """The ``{"error": "..."}`` reply that TorchServe's JSON, KServe v1 and v2 REST all use."""
    return Response(status, compact_json({"error": message}), error=message)


def error_for(request: Request, status: int, message: str, model: ModelInfo) -> Response:
    """The error reply in ``request``'s protocol, for a request that could not be decoded."""
    from aitune_core.wire import oip_grpc

    if oip_grpc.is_oip(request):
        return oip_grpc.error_response(request, status, message, model)
    return error_response(status, message)


def read_request(request: Request, codec: Any) -> Call:
    """Which protocol ``request`` speaks, decoded by that protocol's module; BadRequestError naming the problem."""
    from aitune_core.wire import kserve_v1, kserve_v2, oip_grpc, torchserve_json

    if BINARY_HEADER in request.headers:
        return kserve_v2.decode_binary(request, codec)
    if oip_grpc.is_oip(request):
        return oip_grpc.decode(request, codec)
    value = torchserve_json.parse_body(request)
    if kserve_v1.is_v1(value):
        return kserve_v1.decode(value, codec)
    if kserve_v2.is_v2(value):
        return kserve_v2.decode(value, codec)
    return torchserve_json.decode(value, codec)
