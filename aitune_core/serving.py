"""What a worker does, without TorchServe: load an unpacked archive, then answer batches of requests."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend
from aitune_core.backends import backend_from_dict
from aitune_core.checkpoint import check_file_name, load_checkpoint, read_manifest
from aitune_core.errors import BadRequestError
from aitune_core.modules import load_module_class
from aitune_core.payload import (
    batch_key,
    batch_size_of,
    concat_samples,
    decode_inputs,
    encode_output,
    parse_json_body,
    split_output,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Reply:
    """One request's answer: an HTTP status and a JSON-able body."""

    status: int
    body: Any

    @classmethod
    def error(cls, status: int, message: str) -> "Reply":
        return cls(status, {"error": message})

    def to_json(self) -> str:
        """Compact JSON text (TorchServe would indent a dict or list, which costs time and bytes)."""
        return json.dumps(self.body, separators=(",", ":"))


def serving_device(gpu_id: int | None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA is here, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def load_model(model_dir: Path | str, device: torch.device) -> tuple[Backend, dict[str, Any]]:
    """Verify, load and deploy an unpacked archive; warm it up on its recorded sample.

    The sha256 of every file is checked before the model file is imported or the checkpoint
    read. Returns the DEPLOYED backend and the manifest.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    model = manifest["model"]
    module_class = load_module_class(model_dir / check_file_name(model["file"]), model["class"])
    module = module_class(**model["kwargs"])
    state = load_checkpoint(model_dir / check_file_name(manifest["checkpoint"]))
    backend = backend_from_dict(module, state)
    backend.deploy(device)
    backend.samples[0].run(backend.infer)
    return backend, manifest


def answer_batch(backend: Backend, requests: list[tuple[dict[str, Any], str | None]]) -> list[Reply]:
    """Answer TorchServe requests (each a request dict and its Content-Type) with as few ``infer`` calls as fit.

    A bad request gets its own 400; requests whose tensors agree on all but dim 0 are
    concatenated into one call and the output is split back per request.
    """
    replies: list[Reply | None] = [None] * len(requests)
    groups: dict[Any, list[tuple[int, Any]]] = {}
    for index, (request, content_type) in enumerate(requests):
        try:
            sample = decode_inputs(parse_json_body(request, content_type), backend.graph_spec)
        except BadRequestError as error:
            replies[index] = Reply.error(400, str(error))
            continue
        groups.setdefault(batch_key(sample), []).append((index, sample))
    for members in groups.values():
        for index, reply in _answer_group(backend, members):
            replies[index] = reply
    return replies


def _answer_group(backend: Backend, members: list[tuple[int, Any]]) -> list[tuple[int, Reply]]:
    sizes = [batch_size_of(sample) for _, sample in members]
    if len(members) > 1 and None not in sizes:
        try:
            parts = split_output(concat_samples([s for _, s in members]).run(backend.infer), sizes)
        except Exception:  # one bad request must not fail the rest: answer each alone below
            logger.warning("Batched inference of %d requests failed; answering them one by one", len(members))
            parts = None
        if parts is not None:
            return [(index, Reply(200, encode_output(part))) for (index, _), part in zip(members, parts)]
    return [(index, _answer_one(backend, sample)) for index, sample in members]


def _answer_one(backend: Backend, sample: Any) -> Reply:
    try:
        return Reply(200, encode_output(sample.run(backend.infer)))
    except torch.cuda.OutOfMemoryError:
        logger.error("Out of GPU memory on a request")
        return Reply.error(507, "out of GPU memory: send a smaller batch")
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0][:300]
        logger.warning("The model raised on a request: %s: %s", type(error).__name__, message)
        return Reply.error(400, f"the model could not run this input: {type(error).__name__}: {message}")
