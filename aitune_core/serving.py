"""What a worker does, without TorchServe: load an unpacked archive, then answer batches of requests."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend
from aitune_core.backends import backend_class, backend_from_dict
from aitune_core.checkpoint import check_file_name, load_checkpoint, read_manifest
from aitune_core.codecs import Codec, Outcome, make_codec
from aitune_core.errors import BadRequestError
from aitune_core.graph_spec import flatten_tensors
from aitune_core.modules import load_module_class
from aitune_core.variants import Variant, choose_variant
from aitune_core.wire import Call, ModelInfo, Request, Response, compact_json, error_for, read_request

logger = logging.getLogger(__name__)


INDUCTOR_CACHE = "inductor-cache"


@dataclasses.dataclass
class LoadedModel:
    """A DEPLOYED backend, the archive's manifest, the codec its requests go through, and what the
    worker should log about how it got there (the variant chosen, compilation)."""

    backend: Backend
    manifest: dict[str, Any]
    codec: Codec
    info: ModelInfo
    notes: list[str] = dataclasses.field(default_factory=list)


def serving_device(gpu_id: int | None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA is here, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def load_model(model_dir: Path | str, device: torch.device, version: str = "1.0") -> LoadedModel:
    """Verify, load and deploy an unpacked archive, then warm it up.

    The sha256 of every file is checked before the model file is imported or a checkpoint read.
    A tuned archive holds variants: the most specific one ``device`` can run is deployed.
    ``version`` is the archive's (TorchServe's manifest has it): v2 answers name it.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    notes = []
    checkpoint, backend_name = manifest["checkpoint"], manifest.get("backend")
    if "variants" in manifest:
        variant, why = choose_variant([Variant.from_dict(v) for v in manifest["variants"]], device)
        checkpoint, backend_name = variant.checkpoint, variant.backend
        notes.append(f"variant {variant.name!r}: {why}")
    module = empty_module(manifest["model"], model_dir)
    # Importing the backend's module first lets weights_only read its tensors (torchao registers its
    # classes on import); an archive that needs no torchao never imports it. An older manifest that
    # does not name the variant's backend gets torchao, which reads every checkpoint.
    backend_class(backend_name or "TorchAOBackend")
    state = load_checkpoint(model_dir / check_file_name(checkpoint))
    backend = backend_from_dict(module, state)
    if backend.compile_settings is not None:
        # Kept in the model folder, so a restarted worker reuses what it compiled (when it has to).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(model_dir / INDUCTOR_CACHE)
    backend.deploy(device)
    notes += warm_up(backend)
    codec = make_codec(manifest.get("request"), model_dir, backend.graph_spec)
    return LoadedModel(backend=backend, manifest=manifest, codec=codec,
                       info=ModelInfo(manifest["model_name"], version), notes=notes)


def settle_heap() -> int:
    """Collect, then put every object alive now out of the cyclic garbage collector's reach; how many that was.

    For a worker that has loaded its model: torch, transformers and the model leave ~350k objects that a
    full collection walks every time (measured: 108-116 ms for a 254M decoder's worker on 2 cores), and one
    comes every few hundred requests or decode steps, stalling every stream in the step it lands in (the
    p99 between tokens at 8 streams was such a stall). Objects made later are collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def empty_module(model: dict[str, Any], model_dir: Path) -> torch.nn.Module:
    """The module the checkpoint's weights go into: the archived model file's class, or a Hugging Face task's
    module made from the archived config (the manifest's ``model`` section says which)."""
    if "generate" in model:
        from aitune_core.generate.folder import empty_decoder

        return empty_decoder(model["generate"])
    if "hf" in model:
        from aitune_core.hf.folder import FolderSpec, empty_module as hf_module

        return hf_module(model_dir, FolderSpec.from_dict(model["hf"]))
    module_class = load_module_class(model_dir / check_file_name(model["file"]), model["class"])
    return module_class(**model["kwargs"])


def warm_up(backend: Backend) -> list[str]:
    """Run the smallest recorded sample at one row and as recorded; returns what to log about compilation.

    A backend that torch.compile runs (not compiled ahead of time) runs every sample: its one graph for
    every batch and length (see compilation.DynamicCall) is compiled there, before the first request.
    """
    samples = sorted(backend.samples, key=lambda sample: sum(t.numel() for t in flatten_tensors(sample.args)))
    notes = [backend.compile_note] if backend.compile_note else []
    if not backend.compiles_on_first_calls:
        for sample in (samples[0].with_rows(1), samples[0]):
            sample.run(backend.infer)
        return notes + _kernel_notes()
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    hits, misses = inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]
    started = time.perf_counter()
    for sample in [samples[0].with_rows(1), *samples]:
        sample.run(backend.infer)
    inductor = counters["inductor"]  # dynamo may have replaced the counter while compiling
    return notes + [f"compiled in {time.perf_counter() - started:.1f} s ({inductor['fxgraph_cache_hit'] - hits} "
                    f"graphs from the inductor cache, {inductor['fxgraph_cache_miss'] - misses} compiled anew)"] \
        + _kernel_notes()


def _kernel_notes() -> list[str]:
    """Which CPU kernels the warm-up ran (weight-only products, a decoder's attention), when it ran any."""
    kernels = sys.modules.get("aitune_core.kernels.build")
    return [f"CPU kernels: {kernels.describe()}"] if kernels is not None and kernels.tried() else []


def answer_batch(model: LoadedModel, requests: list[tuple[dict[str, Any], dict[str, Any] | None]],
                 send: Callable[[int, Any], None] | None = None) -> list[Response]:
    """Answer TorchServe requests (each its parameters and its header dict), in order, each in its own protocol.

    Every request passes wire format -> codec -> backend: a bad one gets its own 4xx in its
    protocol; the good ones, whatever their protocols, go through the codec together. A codec that
    streams (generation) sends intermediate pieces through ``send(request index, JSON value)``.
    """
    responses: list[Response | None] = [None] * len(requests)
    calls: dict[int, Call] = {}
    for index, (parameters, headers) in enumerate(requests):
        request = Request.from_torchserve(parameters, headers)
        try:
            calls[index] = read_request(request, model.codec)
        except BadRequestError as error:
            responses[index] = error_for(request, 400, str(error), model.info)
    if calls:
        inputs = [call.inputs for call in calls.values()]
        if getattr(model.codec, "streams", False):
            indices = list(calls)
            forward = (lambda position, value: send(indices[position], compact_json(value))) if send else None
            outcomes = model.codec.answer(model.backend, inputs, forward)
        else:
            outcomes = model.codec.answer(model.backend, inputs)
        for (index, call), outcome in zip(calls.items(), outcomes):
            try:
                responses[index] = call.encode(outcome, call, model.codec, model.info)
            except BadRequestError as error:
                responses[index] = call.encode(Outcome.failed(400, str(error)), call, model.codec, model.info)
    return responses


def batch_failure(requests: list[tuple[dict[str, Any], dict[str, Any] | None]],
                  responses: list[Response]) -> tuple[int, str] | None:
    """The (status, message) to fail the whole worker batch with, so that a gRPC client gets an error status.

    TorchServe's frontend ignores a per-request status on gRPC (``Predictions`` answers OK with the
    body, OIP ``ModelInfer`` only reads outputs); only a failed batch becomes a gRPC error. That
    is done when the batch is this one failed gRPC request, never when it would fail others too.
    """
    if len(requests) != 1 or responses[0].status == 200:
        return None
    parameters, headers = requests[0]
    if not Request.from_torchserve(parameters, headers).is_grpc:
        return None
    return responses[0].status, responses[0].error
