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
from aitune_core.codecs import Codec, Reply, make_codec
from aitune_core.errors import BadRequestError
from aitune_core.graph_spec import flatten_tensors
from aitune_core.modules import load_module_class
from aitune_core.payload import parse_json_body

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A DEPLOYED backend, the archive's manifest, and the codec its requests go through."""

    backend: Backend
    manifest: dict[str, Any]
    codec: Codec


def serving_device(gpu_id: int | None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA is here, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def load_model(model_dir: Path | str, device: torch.device) -> LoadedModel:
    """Verify, load and deploy an unpacked archive; warm it up on its smallest recorded sample.

    The sha256 of every file is checked before the model file is imported or the checkpoint read.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    model = manifest["model"]
    module_class = load_module_class(model_dir / check_file_name(model["file"]), model["class"])
    module = module_class(**model["kwargs"])
    state = load_checkpoint(model_dir / check_file_name(manifest["checkpoint"]))
    backend = backend_from_dict(module, state)
    backend.deploy(device)
    smallest = min(backend.samples, key=lambda sample: sum(t.numel() for t in flatten_tensors(sample.args)))
    smallest.run(backend.infer)
    codec = make_codec(manifest.get("request"), model_dir, backend.graph_spec)
    return LoadedModel(backend=backend, manifest=manifest, codec=codec)


def answer_batch(model: LoadedModel, requests: list[tuple[dict[str, Any], str | None]]) -> list[Reply]:
    """Answer TorchServe requests (each a request dict and its Content-Type), in order.

    A bad request gets its own 400; the good ones go through the codec together.
    """
    replies: list[Reply | None] = [None] * len(requests)
    good: list[int] = []
    decoded: list[Any] = []
    for index, (request, content_type) in enumerate(requests):
        try:
            decoded.append(model.codec.decode(parse_json_body(request, content_type)))
            good.append(index)
        except BadRequestError as error:
            replies[index] = Reply.error(400, str(error))
    if decoded:
        for index, reply in zip(good, model.codec.answer(model.backend, decoded)):
            replies[index] = reply
    return replies


def reply_json(reply: Reply) -> str:
    """Compact JSON text (TorchServe would indent a dict or list, which costs time and bytes)."""
    return json.dumps(reply.body, separators=(",", ":"))
