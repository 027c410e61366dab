"""KServe v2 / Open Inference Protocol over REST: ``POST /v2/models/NAME/infer``, JSON and binary.

Request: ``{"id": ..., "inputs": [{"name", "shape", "datatype", "data"}], "outputs": [...],
"parameters": {...}}``. Inputs are named by forward()'s parameter names; a text model takes a
``BYTES`` input ``text``. Each input's datatype must be the recorded dtype's (FP32 for float32...).

The binary tensor extension: with an ``Inference-Header-Content-Length: N`` header the body's
first N bytes are the JSON header and the rest the raw little-endian tensors of the inputs whose
``parameters`` give a ``binary_data_size``, in order. Outputs come back the same way when the
request asks (``parameters.binary_data_output``, or ``binary_data`` per requested output):
numbers never pass through text, which is what makes a large request cheap.

Answer: ``{"model_name", "model_version", "id", "outputs": [{"name", "shape", "datatype",
"data"}]}`` with outputs named ``output``, ``output_0``..., a dict's keys, or ``embeddings``.
Errors: ``{"error": "..."}`` with a 4xx.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import struct
from typing import Any

import numpy as np
import torch

from aitune_core.codecs import TEXT_DTYPE, Codec, Outcome
from aitune_core.errors import BadRequestError
from aitune_core.wire import (BINARY_HEADER, Call, ModelInfo, Request, Response, compact_json, error_response,
                              parse_json)

# The protocol's datatypes by the dtype names a GraphSpec records.
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64", "bfloat16": "BF16", TEXT_DTYPE: "BYTES"}
_KINDS = {"BOOL": "b", "FP16": "fiu", "FP32": "fiu", "FP64": "fiu", "BF16": "fiu"}  # JSON numbers each accepts
BINARY_CONTENT_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix in binary data


@dataclasses.dataclass
class V2Options:
    """What the answer must honour: the request's id, and which outputs to send and how."""

    id: str | None
    outputs: list[tuple[str, bool]] | None  # (name, binary) as requested; None: every output
    binary_default: bool


def is_v2(value: Any) -> bool:
    """A v2 body: ``inputs`` is a non-empty list of objects that name a datatype."""
    inputs = value.get("inputs") if isinstance(value, dict) else None
    return (isinstance(inputs, list) and bool(inputs)
            and all(isinstance(item, dict) and "datatype" in item for item in inputs))


def decode_binary(request: Request, codec: Codec) -> Call:
    """A request with the binary tensor extension: JSON header, then raw tensors."""
    body, _ = request.body()
    if not isinstance(body, (bytes, bytearray)):
        raise BadRequestError("a binary v2 request (Inference-Header-Content-Length) must be sent as raw bytes, "
                              "e.g. Content-Type: application/octet-stream")
    length_text = request.headers[BINARY_HEADER]
    try:
        length = int(length_text)
    except ValueError:
        raise BadRequestError(f"Inference-Header-Content-Length must be an integer, got {length_text!r}") from None
    if not 0 < length <= len(body):
        raise BadRequestError(f"Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes")
    view = memoryview(body)
    header = parse_json(view[:length], None, "the JSON header of the binary request")
    if not is_v2(header):
        raise BadRequestError("the JSON header of a binary v2 request must hold 'inputs': a list of "
                              "{name, shape, datatype, parameters: {binary_data_size}}")
    return decode(header, codec, view[length:])


def decode(header: dict[str, Any], codec: Codec, binary: memoryview | None = None, base64_bytes: bool = False) -> Call:
    """The named inputs of a v2 request, checked by the codec.

    ``binary``: the bytes after the JSON header. ``base64_bytes``: BYTES elements arrive base64-encoded
    (TorchServe's OIP gRPC frontend encodes them so).
    """
    unknown = sorted(set(header) - {"id", "inputs", "outputs", "parameters", "model_name", "model_version"})
    if unknown:
        raise BadRequestError(f"unknown key(s) {', '.join(map(repr, unknown))} in the v2 request: expected "
                              "'inputs' and optionally 'id', 'outputs', 'parameters'")
    types = codec.input_types()
    named: dict[str, Any] = {}
    offset = 0
    for index, tensor in enumerate(header["inputs"]):
        name = tensor.get("name")
        if not isinstance(name, str):
            raise BadRequestError(f"inputs[{index}]: 'name' must be a string, got {name!r}")
        if name in named:
            raise BadRequestError(f"input {name!r} is given twice")
        if name not in types:
            raise BadRequestError(f"unknown input {name!r}: this model takes {_listing(types)}")
        expected = DATATYPES.get(types[name])
        if expected is None:
            raise BadRequestError(f"input {name!r} is a {types[name]}, which v2 tensors cannot carry: "
                                  "use the /predictions JSON API for this model")
        where = f"input {name!r}"
        if tensor["datatype"] != expected:
            raise BadRequestError(f"{where}: datatype must be {expected} ({types[name]}), got {tensor['datatype']!r}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise BadRequestError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if binary is None:
                raise BadRequestError(f"{where} has a binary_data_size but the request has no "
                                      "Inference-Header-Content-Length header")
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequestError(f"{where}: binary_data_size {size!r} runs past the {len(binary)} bytes of "
                                      "binary data")
            named[name] = _binary_values(binary[offset:offset + size], expected, shape, where)
            offset += size
        elif "data" in tensor:
            named[name] = _json_values(tensor["data"], expected, shape, where, base64_bytes)
        else:
            raise BadRequestError(f"{where} has neither 'data' nor parameters.binary_data_size")
    if binary is not None and offset != len(binary):
        raise BadRequestError(f"the binary data has {len(binary)} bytes, the inputs' binary_data_size add up to "
                              f"{offset}")
    return Call(encode, codec.decode_named(named), _options(header, codec))


def _options(header: dict[str, Any], codec: Codec) -> V2Options:
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequestError(f"'parameters' must be an object, got {type(parameters).__name__}")
    binary_default = bool(parameters.get("binary_data_output", False))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f"'id' must be a string, got {type(request_id).__name__}")
    requested = header.get("outputs")
    if requested is None:
        return V2Options(request_id, None, binary_default)
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in requested):
        raise BadRequestError("'outputs' must be a list of {\"name\": ...} objects")
    names = codec.output_names()
    outputs = []
    for output in requested:
        if output["name"] not in names:
            raise BadRequestError(f"unknown output {output['name']!r} requested: this model answers "
                                  f"{', '.join(map(repr, names))}")
        outputs.append((output["name"], bool((output.get("parameters") or {}).get("binary_data", binary_default))))
    return V2Options(request_id, outputs, binary_default)


def _listing(types: dict[str, str]) -> str:
    return ", ".join(f"{name!r} ({DATATYPES.get(dtype, dtype)})" for name, dtype in types.items())


def _json_values(data: Any, datatype: str, shape: list[int], where: str, base64_bytes: bool) -> Any:
    """A tensor's ``data`` (flat or nested, row-major) as a numpy array of ``datatype``, or texts for BYTES."""
    numel = math.prod(shape)
    if datatype == "BYTES":
        items = _flat(data)
        if len(items) != numel:
            raise BadRequestError(f"{where}: 'data' has {len(items)} elements, shape {shape} needs {numel}")
        return [_text(item, where, base64_bytes) for item in items]
    if not isinstance(data, list):
        raise BadRequestError(f"{where}: 'data' must be a list, got {type(data).__name__}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequestError(f"{where}: 'data' must be numbers in equal-length rows, got ragged or mixed data") from None
    if values.size != numel:
        raise BadRequestError(f"{where}: 'data' has {values.size} values, shape {shape} needs {numel}")
    kinds = _KINDS.get(datatype, "iu")
    if values.size and values.dtype.kind not in kinds:
        got = {"b": "booleans", "f": "fractions", "U": "strings", "O": "null, objects or integers past 64 bits"}
        raise BadRequestError(f"{where}: {datatype} data must be {'booleans' if kinds == 'b' else 'numbers'}, "
                              f"got {got.get(values.dtype.kind, str(values.dtype))}")
    dtype = _numpy_dtype(datatype)
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequestError(f"{where}: a value is outside the range of {datatype} [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # past the float range becomes Inf, which the codec refuses by name
        return values.astype(dtype, copy=False).reshape(shape)


def _binary_values(chunk: memoryview, datatype: str, shape: list[int], where: str) -> Any:
    """Raw little-endian bytes as a numpy array of ``datatype`` (sharing the request's memory), or texts."""
    numel = math.prod(shape)
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(chunk):
            if at + _LENGTH.size > len(chunk):
                raise BadRequestError(f"{where}: BYTES data ends inside an element's 4-byte length")
            (length,) = _LENGTH.unpack_from(chunk, at)
            at += _LENGTH.size
            if at + length > len(chunk):
                raise BadRequestError(f"{where}: a BYTES element of {length} bytes runs past its data")
            items.append(_text(bytes(chunk[at:at + length]), where, False))
            at += length
        if len(items) != numel:
            raise BadRequestError(f"{where}: the binary data has {len(items)} elements, shape {shape} needs {numel}")
        return items
    dtype = _numpy_dtype(datatype)
    if len(chunk) != numel * dtype.itemsize:
        raise BadRequestError(f"{where}: binary_data_size is {len(chunk)} bytes, shape {shape} of {datatype} needs "
                              f"{numel * dtype.itemsize}")
    values = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)
    if datatype == "BF16":
        return torch.from_numpy(values.copy()).view(torch.bfloat16).float().numpy()
    if not values.flags.writeable:  # torch wants writable memory; a bytes body is copied once
        values = values.copy()
    return values


def _numpy_dtype(datatype: str) -> np.dtype:
    # BF16 travels as its 16 bits (binary) or as float32 numbers (JSON); the codec narrows it.
    return np.dtype({"BF16": "float32", "BOOL": "bool"}.get(datatype, datatype.lower().replace("fp", "float")))


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [leaf for item in data for leaf in _flat(item)]


def _text(item: Any, where: str, base64_bytes: bool) -> str:
    if base64_bytes and isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except ValueError:
            raise BadRequestError(f"{where}: a BYTES element is not valid base64") from None
    if isinstance(item, (bytes, bytearray)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"{where}: a BYTES element is not UTF-8 text") from None
    if not isinstance(item, str):
        raise BadRequestError(f"{where}: BYTES data must be strings, got {type(item).__name__}")
    return item


def output_entries(named: dict[str, Any], selected: list[tuple[str, bool]], datatypes: dict[str, str] = DATATYPES,
                   json_values: bool = False) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The ``outputs`` entries for ``selected`` (name, binary) and the raw bytes of the binary ones, in order.

    A tensor goes as its datatype; a list (texts, or JSON values sent as JSON text) as BYTES. With
    ``json_values`` a JSON value stays a value in ``data`` (for a relay that writes each element as JSON).
    """
    entries, chunks = [], []
    for name, binary in selected:
        if isinstance(named[name], list):  # texts, or JSON documents (entities, fills): BYTES, one per text
            items = [item if isinstance(item, str) or json_values else compact_json(item) for item in named[name]]
            entry = {"name": name, "datatype": "BYTES", "shape": [len(items)]}
            if binary:
                chunks.append(b"".join(_LENGTH.pack(len(data)) + data for data in (item.encode() for item in items)))
                entry["parameters"] = {"binary_data_size": len(chunks[-1])}
            else:
                entry["data"] = items
            entries.append(entry)
            continue
        tensor = named[name].detach().cpu()
        datatype = datatypes.get(str(tensor.dtype).removeprefix("torch."))
        if datatype is None:  # float8 and the like: sent as float32
            tensor, datatype = tensor.float(), "FP32"
        entry = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
        if binary:
            raw = tensor.contiguous().view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor.contiguous()
            chunks.append(raw.numpy().tobytes())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).flatten().tolist()
        entries.append(entry)
    return entries, chunks


def encode(outcome: Outcome, call: Call, codec: Codec, model: ModelInfo) -> Response:
    """The v2 answer, its binary outputs after the JSON header; or ``{"error": ...}``."""
    if outcome.status != 200:
        return error_response(outcome.status, outcome.error)
    options: V2Options = call.options
    named = codec.named_outputs(outcome.output)
    selected = options.outputs or [(name, options.binary_default) for name in named]
    entries, chunks = output_entries(named, selected)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if options.id is not None:
        answer["id"] = options.id
    answer["outputs"] = entries
    text = compact_json(answer)
    if not chunks:
        return Response(200, text)
    header = text.encode()
    return Response(200, header + b"".join(chunks), BINARY_CONTENT_TYPE,
                    {"Inference-Header-Content-Length": str(len(header))})
