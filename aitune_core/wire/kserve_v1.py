"""KServe's v1 protocol: ``POST /v1/models/NAME:predict`` with ``{"instances": [...]}``.

One instance per row: a tensor model with one input takes each row as it is; a model with
several inputs takes an object per row keyed by forward()'s parameter names; a text model takes
strings. The answer is ``{"predictions": [...]}``, one per instance: the row of the one output, or
an object ``{output name: row}`` when there are several. Errors: ``{"error": "..."}`` with a 4xx.
"""

from __future__ import annotations

from typing import Any

from aitune_core.codecs import TEXT_DTYPE, Codec, Outcome
from aitune_core.errors import BadRequestError
from aitune_core.payload import encode_output
from aitune_core.wire import Call, ModelInfo, Response, compact_json, error_response

INSTANCES = "instances"


def is_v1(value: Any) -> bool:
    """A v1 body: an object whose one key is ``instances``."""
    return isinstance(value, dict) and INSTANCES in value and len(value) == 1


def decode(value: dict[str, Any], codec: Codec) -> Call:
    """The instances, checked by the codec as one batch of rows."""
    instances = value[INSTANCES]
    if not isinstance(instances, list) or not instances:
        raise BadRequestError("'instances' must be a non-empty list: one instance per row")
    types = codec.input_types()
    if len(types) == 1:
        [name] = types
        return Call(encode, codec.decode_named({name: instances}))
    if any(dtype == TEXT_DTYPE for dtype in types.values()):
        raise BadRequestError("this text model takes strings as instances")
    columns: dict[str, list[Any]] = {}
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise BadRequestError(f"instances[{index}]: this model takes {len(types)} inputs, so each instance "
                                  f"must be an object with the keys {sorted(types)}, got {type(instance).__name__}")
        if instance.keys() != (instances[0].keys()):
            raise BadRequestError(f"instances[{index}] has the keys {sorted(instance)}, instances[0] "
                                  f"{sorted(instances[0])}: every instance must name the same inputs")
        for name, row in instance.items():
            columns.setdefault(name, []).append(row)
    return Call(encode, codec.decode_named(columns))


def encode(outcome: Outcome, call: Call, codec: Codec, model: ModelInfo) -> Response:
    """``{"predictions": [...]}``, one per instance, or ``{"error": ...}``."""
    if outcome.status != 200:
        return error_response(outcome.status, outcome.error)
    named = {name: encode_output(tensor) for name, tensor in codec.named_outputs(outcome.output).items()}
    if len(named) == 1:
        [predictions] = named.values()
    else:
        rows = len(next(iter(named.values())))
        predictions = [{name: values[row] for name, values in named.items()} for row in range(rows)]
    return Response(200, compact_json({"predictions": predictions}))

