"""``aitune-archive``: build a backend from a model, check its accuracy, and pack it into a .mar.

The one place that knows both the model and the packaging. Everything is staged in a
temporary folder inside the export path and the finished .mar is moved into place last, so a
failure at any step leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from aitune_core.accuracy import Accuracy, compare_outputs, min_cosine_for
from aitune_core.backend import Backend, library_versions
from aitune_core.backends import BACKEND_NAMES, make_backend, quantization_of
from aitune_core.backends.torchao import CHECKPOINT_WEIGHTS, QUANTIZATIONS
from aitune_core.bundle import REQUIREMENTS_NAME, TEXT_PACKAGES, imported_distributions, stage_package
from aitune_core.bundle import requirements as bundle_requirements
from aitune_core.codecs import TextCodec, TextOptions
from aitune_core.checkpoint import CHECKPOINT_NAME, MANIFEST_NAME, save_checkpoint, write_manifest
from aitune_core.devices import parse_device
from aitune_core.errors import AITuneError, ArchiveError, ConfigError
from aitune_core.generate.decoder import KV_CACHE_DTYPES
from aitune_core.generate.request import MAX_STREAM_INTERVAL
from aitune_core.graph_spec import GraphSpec, Sample
from aitune_core.hf import TASKS
from aitune_core.kserve import KServeOptions, add_arguments as add_kserve_arguments, options_from, write_layout
from aitune_core.modules import load_module_class, load_weights
from aitune_core.precision import PRECISIONS, missing_support
from aitune_core.staging import move_into_place
from aitune_core.tune import STRATEGIES, TuneOptions, TuneReport, candidate_names, pick_variants, tune
from aitune_core.variants import Variant
from aitune_core.worker_threads import threads_from_config

logger = logging.getLogger(__name__)

HANDLER_FILE = "aitune_handler.py"
TUNING_REPORT = "tuning_report"
MODEL_CONFIG = "model-config.yaml"
COMPILE_AT = ("archive", "start")
# TorchServe kills a worker whose start takes longer than startupTimeout (120 s unless set).
TORCHSERVE_STARTUP_TIMEOUT = 120
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class ArchiveOptions:
    """What to archive and how; the CLI's flags, one field each."""

    model_name: str
    model_file: Path | None = None  # the module-file way: model_file + samples (+ weights)
    samples: list[Path] = dataclasses.field(default_factory=list)
    hf_model: Path | None = None  # the Hugging Face way: a folder, and nothing else
    task: str | None = None  # with hf_model; default: read from the folder
    sample_texts: Path | None = None  # with hf_model; default: the built-in texts
    max_context: int | None = None  # text-generation: prompt + generated tokens (default: the model's, at most 2048)
    max_batch: int | None = None  # text-generation: sequences decoded together (default 8)
    kv_cache_dtype: str | None = None  # text-generation: float32 (default) or bfloat16
    stream_interval: int | None = None  # text-generation: decode steps a streamed reply carries (default 1)
    min_top1: float | None = None  # text-generation's gate: teacher-forced top-1 agreement (default 0.90)
    max_kl: float | None = None  # and mean KL divergence against fp32 (default 0.10)
    model_class: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: Path | None = None
    backend: str = "torchao"
    quantization: str | None = None
    checkpoint_weights: str = "quantized"
    compile: bool = False
    precision: str | None = None
    compile_at: str = "archive"  # "archive": AOTInductor package in the .mar; "start": torch.compile in the worker
    device: str = "cpu"
    export_path: Path = Path("model_store")
    version: str = "1.0"
    config_file: Path | None = None
    min_cosine: float | None = None
    force: bool = False
    archive_format: str = "default"
    text_tokenizer: Path | None = None
    text_max_tokens: int | None = None  # default: 256 for --text-tokenizer, the model's own limit for --hf-model
    text_output_key: str = "embeddings"
    max_batch_size: int | None = None
    tune: TuneOptions | None = None  # set: measure the candidates and archive the winner(s)
    tune_devices: list[str] = dataclasses.field(default_factory=list)  # default: [device]
    kserve: KServeOptions | None = None  # set: also write KServe's layout for the archive (CLI only)


@dataclasses.dataclass
class ArchiveResult:
    """What was archived, with the figures the summary shows."""

    archive_path: Path
    backend: str
    quantization: str | None
    accuracy: Accuracy
    min_cosine: float
    archive_bytes: int
    fp32_weight_bytes: int
    build_seconds: float
    startup_timeout: str = ""  # what aitune-archive did about TorchServe's startupTimeout, if anything
    cpu_kernels: list[str] = dataclasses.field(default_factory=list)  # the instruction-set levels of the builds carried
    tuning: list[TuneReport] = dataclasses.field(default_factory=list)
    variants: list[Variant] = dataclasses.field(default_factory=list)


def archive_model(options: ArchiveOptions, progress: Callable[[str], None] = logger.info) -> ArchiveResult:
    """Build, check and pack ``options.model_file`` into ``EXPORT/NAME.mar``.

    Raises ArchiveError (or a ValueError / FileNotFoundError naming the input) on any bad input
    or a model below the accuracy threshold; nothing is written in the export path then.
    """
    backend, target = _check_options(options)
    config_text, config = _read_model_config(options.config_file)  # before minutes of building or tuning
    archive_path = _archive_path(options)

    source = _hf_source(options, progress) if options.hf_model is not None else _module_file_source(options, progress)
    settings = source.worker_settings(config) if source.worker_settings else {}
    module, samples = source.module, source.samples
    progress(f"Recording inputs and outputs on {source.sample_names}")
    try:
        with source.original() if source.original else contextlib.nullcontext(module) as original:
            graph_spec, reference = GraphSpec.record(original, samples)
    except Exception as error:
        raise ArchiveError(f"The model cannot run the sample(s) {source.sample_names}: "
                           f"{type(error).__name__}: {error}") from None

    tuning: list[TuneReport] = []
    if options.tune is None or source.tune is not None:
        tuned_build_s = 0.0
        if options.tune is not None:  # a source that ranks its own candidates (generation: decode tokens/s)
            backend, tuned_build_s = source.tune(graph_spec, target, options.tune)
        else:
            progress(f"Building {backend.name} on {target}"
                     + (" (compiling ahead of time: a minute or more for a large model)"
                        if backend.compile_settings and backend.compile_settings.ahead_of_time else ""))
            slow = missing_support(options.precision, target)
            if slow is not None:
                progress(f"Note: {target} has no native {options.precision} (that needs {slow}): expect it slower "
                         "than fp32 here; --tune leaves it out on such a device")
        started = time.perf_counter()
        if options.tune is None:
            backend.build(module, graph_spec, samples, target)
        if backend.compile_note:
            progress(f"Note: {backend.compile_note}")
        accuracy = compare_outputs(reference, [sample.run(backend.infer) for sample in samples])
        build_seconds = time.perf_counter() - started + tuned_build_s  # with the first calls, which compile at start
        quant = quantization_of(backend)
        min_cosine = min_cosine_for(quant, options.min_cosine)
        progress(f"Accuracy against the original: cosine {accuracy.cosine:.6f}, max abs error {accuracy.max_abs_error:.3g}")
        if not accuracy.cosine >= min_cosine and (source.cosine_gate or options.min_cosine is not None):
            raise ArchiveError(
                f"Accuracy check failed: cosine {accuracy.cosine:.6f} < required {min_cosine} "
                f"(missed by {min_cosine - accuracy.cosine:.6f}); try another quantization, or accept it with "
                "--min-cosine"
            )
        variants = []
        checkpoints = {CHECKPOINT_NAME: backend}
    else:
        for device in options.tune_devices or [options.device]:
            tuning.append(tune(module, graph_spec, samples, reference, parse_device(device), options.tune,
                               options.min_cosine, progress=progress))
            progress(f"Tuning report on {device}:\n{tuning[-1].table()}")
        picked = pick_variants(tuning)
        variants = [variant for variant, _ in picked]
        checkpoints = {variant.checkpoint: result.backend for variant, result in picked}
        primary = picked[0][1]
        backend, accuracy, quant = primary.backend, primary.accuracy, primary.quantization
        min_cosine, build_seconds = primary.min_cosine, primary.build_s + primary.first_call_s
        progress("Variants: " + "; ".join(f"{v.name} ({v.describe}) for {v.needs()}" for v in variants))

    model_config, startup_note = _model_config(config_text, config, backend, build_seconds, settings)
    if startup_note:
        progress(startup_note)
    request = source.check_request(backend) if source.check_request else _check_text_codec(options, backend)
    if request is None and options.max_batch_size is not None:
        request = {"codec": "tensor", "max_batch_size": options.max_batch_size}

    progress(f"Packing {archive_path}")
    manifest = {
        "model_name": options.model_name,
        "backend": backend.name,
        "describe": backend.describe(),
        "key": backend.key(),
        "quantization": quant,
        "config": backend.config.to_dict(),
        "model": source.model_section,
        "checkpoint": CHECKPOINT_NAME,
        "graph_spec": graph_spec.to_dict(),
        "versions": _versions(),
        "build_device": str(target),
        "accuracy": {**accuracy.to_dict(), "min_cosine": min_cosine},
    }
    if request is not None:
        manifest["request"] = request
    if variants:
        manifest["variants"] = [variant.to_dict() for variant in variants]
        manifest["tuning"] = [report.to_dict() for report in tuning]
    _package(options, source, checkpoints, _tuning_files(tuning), manifest, model_config, archive_path, progress)
    return ArchiveResult(
        archive_path=archive_path,
        backend=backend.name,
        quantization=quant,
        accuracy=accuracy,
        min_cosine=min_cosine,
        archive_bytes=_size(archive_path),
        fp32_weight_bytes=sum(t.numel() * t.element_size() for t in module.state_dict().values()),
        build_seconds=build_seconds,
        startup_timeout=startup_note,
        cpu_kernels=manifest.get("cpu_kernels", {}).get("levels", []),
        tuning=tuning,
        variants=variants,
    )


@dataclasses.dataclass
class _Source:
    """Where the model came from: the module with its weights, the samples, what the manifest and the
    archive carry to remake it in a worker, and (for a folder) the check of its request codec."""

    module: torch.nn.Module
    samples: list[Sample]
    sample_names: str
    model_section: dict[str, Any]
    write_files: Callable[[Path], list[Path]]  # copies the model's files into a staging folder
    packages: list[str]  # what the worker imports beyond torch and the backend's own
    check_request: Callable[[Backend], dict[str, Any]] | None = None
    # A source that ranks its own --tune candidates: (graph_spec, device, TuneOptions) -> the chosen backend, built,
    # and the seconds its build took
    tune: Callable[[GraphSpec, torch.device, TuneOptions], tuple[Backend, float]] | None = None
    # False: the logits' cosine is reported, the source's own gate decides (generation's top-1 and KL)
    cosine_gate: bool = True
    # the user's --config-file (parsed) -> model-config settings the model needs that it does not set; ArchiveError
    # for settings the model cannot serve with
    worker_settings: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # the original the samples' outputs are recorded on, as a context (generation: the decoder with an fp32 KV
    # cache, whatever cache the archive holds); None: ``module`` itself
    original: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]] | None = None
    # its module runs this project's CPU kernels whatever the backend (a decoder's attention over its KV cache)
    cpu_kernels: bool = False


def _module_file_source(options: ArchiveOptions, progress: Callable[[str], None]) -> _Source:
    progress(f"Importing {options.model_file}")
    module_class = load_module_class(options.model_file, options.model_class)
    try:
        module = module_class(**options.model_kwargs).eval()
    except TypeError as error:
        raise ArchiveError(f"Cannot make {module_class.__name__}(**{options.model_kwargs}): {error}") from None
    if options.weights is None:
        logger.warning("No --weights given: %s keeps the weights of its own initialisation", module_class.__name__)
        progress(f"No --weights: {module_class.__name__} keeps its own initialisation")
    else:
        progress(f"Loading weights {options.weights}")
        load_weights(module, _load_file(options.weights, "--weights"), assign=False)

    def write_files(directory: Path) -> list[Path]:
        files = [directory / options.model_file.name]
        shutil.copyfile(options.model_file, files[0])
        if options.text_tokenizer is not None:
            files.append(directory / options.text_tokenizer.name)
            shutil.copyfile(options.text_tokenizer, files[-1])
        return files

    packages = [*(TEXT_PACKAGES if options.text_tokenizer is not None else ()),
                *imported_distributions(options.model_file)]
    return _Source(module=module, samples=[_load_sample(path) for path in options.samples],
                   sample_names=", ".join(map(str, options.samples)),
                   model_section={"file": options.model_file.name, "class": module_class.__name__,
                                  "kwargs": options.model_kwargs},
                   write_files=write_files, packages=packages)


def _hf_source(options: ArchiveOptions, progress: Callable[[str], None]) -> _Source:
    from aitune_core.hf import GENERATION
    from aitune_core.hf.folder import task_of
    from aitune_core.hf.prepare import PACKAGES, prepare

    progress(f"Reading the Hugging Face folder {options.hf_model}")
    if task_of(options.hf_model, options.task) == GENERATION:
        return _generation_source(options, progress, list(PACKAGES))
    if any(value is not None for value in (options.max_context, options.max_batch, options.kv_cache_dtype,
                                           options.stream_interval, options.min_top1, options.max_kl)):
        raise ArchiveError("--max-context, --max-batch, --kv-cache-dtype, --stream-interval, --min-top1 and --max-kl "
                           "apply to text generation only")
    prepared = prepare(options.hf_model, options.task, options.sample_texts, options.text_max_tokens,
                       options.max_batch_size)
    spec = prepared.spec
    how = "" if options.task else " (read from the folder)"
    detail = {"sentence-embeddings": f": {'+'.join(spec.pooling)} pooling"
                                     f"{f', {len(spec.dense)} Dense' if spec.dense else ''}"
                                     f"{', normalized' if spec.normalize else ''}",
              "text-classification": f": {len(prepared.codec.options.labels)} labels",
              "token-classification": f": {len(prepared.codec.options.labels)} labels"}.get(spec.task, "")
    progress(f"Task {spec.task}{how}, {spec.architecture}{detail}, texts up to {spec.max_tokens} tokens")
    texts = f"--sample-texts {options.sample_texts}" if options.sample_texts else "the built-in sample texts"

    def check_request(backend: Backend) -> dict[str, Any]:
        codec = prepared.codec
        [outcome] = codec.answer(backend, [codec.decode({"text": [prepared.check_text]})])
        if outcome.status != 200:
            raise ArchiveError(f"The built {spec.task} model cannot answer a text: {outcome.error}")
        return prepared.request_section()

    return _Source(module=prepared.module, samples=prepared.samples, sample_names=texts,
                   model_section=prepared.model_section(), write_files=prepared.write_files,
                   packages=list(PACKAGES), check_request=check_request)


def continuous_batching(max_batch: int, config: dict[str, Any]) -> dict[str, Any]:
    """The model-config of a text-generation archive: TorchServe's continuous batching of up to ``max_batch``
    requests (the KV cache's slots; see generate/service.py) in one worker, 5 ms to gather the first requests of an
    idle worker, and a queue of 64 requests waiting in the frontend (full: 503); nothing where the user's ``config``
    turns continuous batching off (each worker then answers one request at a time, and any number of workers can).

    One worker: TorchServe 0.12's continuous batching stalls a model with two (an idle worker waits for the next
    request holding the model's job-queue lock, which a busy worker needs for each step: its streams stop until a
    request comes), and its sequence batching, which would avoid it, never restarts a worker that died. One engine
    with every core is also how a CPU decodes fastest (vLLM and llama.cpp run one per model). A second worker started
    anyway (a scale-up) refuses to start and says why (``claim_engine``); the first goes on serving."""
    if config.get("continuousBatching") is False:
        return {}
    batch = config.get("batchSize", max_batch)
    if isinstance(batch, int) and batch > max_batch:
        raise ArchiveError(f"--config-file sets batchSize {batch}, but the KV cache holds {max_batch} sequences: "
                           f"give --max-batch {batch}, or a batchSize of at most {max_batch}")
    for key in ("minWorkers", "maxWorkers"):
        if config.get(key, 1) != 1:
            raise ArchiveError(f"--config-file sets {key} {config[key]}: a generation archive batching continuously "
                               "serves with one worker (TorchServe 0.12 stalls its streams with more); give "
                               "continuousBatching: false for several workers, each answering one request at a time")
    return {"continuousBatching": True, "batchSize": max_batch, "maxBatchDelay": 5, "jobQueueSize": 64,
            "minWorkers": 1, "maxWorkers": 1}


def _generation_source(options: ArchiveOptions, progress: Callable[[str], None], packages: list[str]) -> _Source:
    from aitune_core.generate.prepare import prepare

    if options.sample_texts is not None:
        raise ArchiveError("--sample-texts applies to the encoder tasks; text generation is gated on its held prompts")
    if options.tune is not None and (options.tune_devices or options.tune.strategy != "max-throughput"):
        raise ArchiveError("--tune for text generation ranks decode tokens/s on --device: --tune-devices and "
                           "--strategy do not apply")
    if options.kv_cache_dtype is not None and options.precision is not None:
        raise ArchiveError(f"--precision {options.precision} casts the whole decoder, its KV cache included: leave out "
                           "--kv-cache-dtype")
    if options.stream_interval is not None and not 1 <= options.stream_interval <= MAX_STREAM_INTERVAL:
        raise ArchiveError(f"--stream-interval must be between 1 and {MAX_STREAM_INTERVAL} (decode steps a streamed "
                           f"reply carries), got {options.stream_interval}")
    prepared = prepare(options.hf_model, options.max_context, options.max_batch, options.kv_cache_dtype or "float32")
    prepared.options.stream_interval = options.stream_interval or 1
    config = prepared.module.config

    def tune(graph_spec: GraphSpec, device: torch.device, tune_options: TuneOptions) -> tuple[Backend, float]:
        from aitune_core.generate.tune import table, tune_generation

        backend, rows, reason = tune_generation(prepared, graph_spec, device, tune_options.candidates,
                                                options.min_top1, options.max_kl, progress)
        progress(f"Tuning report on {device} (decode tokens/s at one stream, generation gate):\n{table(rows)}\n{reason}")
        prepared.options.tuning = [row.to_dict() for row in rows]
        return backend, next(row.build_s for row in rows if row.outcome == "chosen")

    how = "" if options.task else " (read from the folder)"
    progress(f"Task text-generation{how}: {config.num_layers} layers, {config.hidden_size} hidden, "
             f"{sum(p.numel() for p in prepared.module.parameters()) / 1e6:.0f}M parameters; KV cache of "
             f"{config.max_batch} sequences x {config.max_context} tokens in {config.kv_cache_dtype}, prompts in "
             f"chunks of {prepared.options.prefill_chunk}")
    return _Source(module=prepared.module, samples=prepared.samples, sample_names="a prompt chunk and a decode step",
                   model_section=prepared.model_section(), write_files=prepared.write_files, packages=packages,
                   check_request=lambda backend: prepared.check(backend, progress, options.min_top1, options.max_kl),
                   cosine_gate=False, tune=tune, original=prepared.reference, cpu_kernels=True,
                   worker_settings=lambda user: continuous_batching(config.max_batch, user))


def _tuning_files(reports: list[TuneReport]) -> dict[str, bytes]:
    """The tuning report as JSON and markdown, and a PNG chart per device when matplotlib is here."""
    if not reports:
        return {}
    files = {TUNING_REPORT + ".json": json.dumps([r.to_dict() for r in reports], indent=2).encode(),
             TUNING_REPORT + ".md": "\n\n".join(f"## {r.device}: {r.options.strategy}\n\n{r.table()}\n\n{r.reason}"
                                                for r in reports).encode()}
    with tempfile.TemporaryDirectory() as tmp:
        for index, report in enumerate(reports):
            chart = Path(tmp) / f"{TUNING_REPORT}-{index}.png"
            if report.chart(chart):
                files[chart.name] = chart.read_bytes()
    return files


def startup_timeout_for(compile_seconds: float) -> int:
    """A startupTimeout (s) that fits compiling in the worker: 4x what compiling took at archive time, plus a
    minute for the rest of a start, rounded up to 10 s; never below TorchServe's default."""
    return max(TORCHSERVE_STARTUP_TIMEOUT, math.ceil((4 * compile_seconds + 60) / 10) * 10)


def _read_model_config(config_file: Path | None) -> tuple[str | None, dict[str, Any]]:
    """The --config-file's text and its YAML, checked: a mapping with settings a worker can use."""
    text = config_file.read_text() if config_file is not None else None
    try:
        config = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as error:
        raise ArchiveError(f"--config-file {config_file} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ArchiveError(f"--config-file {config_file} must be a YAML mapping (key: value lines), "
                           f"got {type(config).__name__}")
    try:
        threads_from_config(config)  # a worker would refuse to start with it: say so now
    except ConfigError as error:
        raise ArchiveError(f"--config-file {config_file}: {error}") from None
    return text, config


def _model_config(text: str | None, config: dict[str, Any], backend: Backend, compile_seconds: float,
                  settings: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """The model-config.yaml to pack (the user's ``text``, parsed as ``config``, plus the source's ``settings``
    the user did not set), and a note when aitune-archive set its startupTimeout.

    A backend that compiles in the worker (torch.compile, or the fallback of an AOTInductor package on
    another machine) may need more than TorchServe's default; a startupTimeout the user set wins.
    """
    added = {key: value for key, value in (settings or {}).items() if key not in config}
    if added:
        text = (text.rstrip("\n") + "\n" if text and text.strip() else "") + yaml.safe_dump(added, sort_keys=False)
    if backend.compile_settings is None:
        return text, ""
    if "startupTimeout" in config:
        return text, f"Kept your startupTimeout: {config['startupTimeout']} s"
    seconds = startup_timeout_for(compile_seconds)
    where = ("compiles in the worker at start" if not backend.compile_settings.ahead_of_time
             else "loads its AOTInductor package, or compiles at start on a machine the package cannot run on")
    text = (text.rstrip("\n") + "\n" if text and text.strip() else "") + f"startupTimeout: {seconds}\n"
    return text, (f"Set startupTimeout: {seconds} s in the packed model-config (this backend {where}; compiling "
                  f"took {compile_seconds:.0f} s here): give --config-file with your own startupTimeout to change it")


def _check_text_codec(options: ArchiveOptions, backend: Backend) -> dict[str, Any] | None:
    """The manifest's ``request`` section for a text model, after one text went through the built backend."""
    if options.text_tokenizer is None:
        return None
    text_options = TextOptions(tokenizer=options.text_tokenizer.name, max_tokens=options.text_max_tokens or 256,
                               output_key=options.text_output_key)
    if options.max_batch_size is not None:
        text_options.max_texts = options.max_batch_size
    try:
        codec = TextCodec(text_options, options.text_tokenizer)
    except Exception as error:
        raise ArchiveError(f"--text-tokenizer {options.text_tokenizer} is not a tokenizers tokenizer.json: {error}") from None
    [outcome] = codec.answer(backend, [codec.decode("A sentence to check the text path.")])
    if outcome.status != 200:
        raise ArchiveError(f"The model cannot take tokenized text as forward(input_ids, attention_mask): "
                           f"{outcome.error}")
    return text_options.to_dict()


def _check_options(options: ArchiveOptions) -> tuple[Backend, torch.device]:
    """Fail fast, before any work, on inputs that cannot succeed."""
    if not _MODEL_NAME.match(options.model_name):
        raise ArchiveError(f"--model-name {options.model_name!r} must be letters, digits, '_', '-' or '.'")
    if options.hf_model is not None:
        used = [flag for flag, value in (("--model-file", options.model_file), ("--sample", options.samples),
                                         ("--weights", options.weights), ("--text-tokenizer", options.text_tokenizer),
                                         ("--model-class", options.model_class),
                                         ("--model-kwargs", options.model_kwargs)) if value]
        if used:
            raise ArchiveError(f"--hf-model takes the model, its weights and tokenizer from the folder: leave out "
                               f"{', '.join(used)}")
        if not Path(options.hf_model).is_dir():
            raise ArchiveError(f"--hf-model {options.hf_model} is not a folder")
    else:
        if options.model_file is None:
            raise ArchiveError("--model-file (a Python file with your nn.Module) or --hf-model (a Hugging Face "
                               "folder) is required")
        if not options.samples:
            raise ArchiveError("--sample is required: a torch.save file with the model's inputs")
        if any(value is not None for value in (options.task, options.sample_texts, options.max_context,
                                               options.max_batch, options.kv_cache_dtype, options.stream_interval,
                                               options.min_top1, options.max_kl)):
            raise ArchiveError("--task, --sample-texts, --max-context, --max-batch, --kv-cache-dtype, "
                               "--stream-interval, --min-top1 and --max-kl apply with --hf-model only")
    if options.text_max_tokens is not None and options.text_max_tokens < 1:
        raise ArchiveError(f"--text-max-tokens must be at least 1, got {options.text_max_tokens}")
    checked = [("--model-file", options.model_file), ("--weights", options.weights),
               ("--config-file", options.config_file), ("--text-tokenizer", options.text_tokenizer),
               ("--sample-texts", options.sample_texts)] + [("--sample", path) for path in options.samples]
    for flag, path in checked:
        if path is not None and not Path(path).is_file():
            raise ArchiveError(f"{flag} {path} does not exist")
    if options.max_batch_size is not None and options.max_batch_size < 1:
        raise ArchiveError(f"--max-batch-size must be at least 1, got {options.max_batch_size}")
    if not isinstance(options.model_kwargs, dict):
        raise ArchiveError(f"--model-kwargs must be a JSON object, got {options.model_kwargs!r}")
    if options.compile_at not in COMPILE_AT:
        raise ArchiveError(f"--compile-at must be one of {', '.join(COMPILE_AT)}, got {options.compile_at!r}")
    if options.tune is None:
        backend = make_backend(options.backend, options.quantization, options.checkpoint_weights, options.compile,
                               options.precision, ahead_of_time=options.compile_at == "archive")
    else:
        backend = make_backend("eager")  # to check the devices; tuning makes its own candidates
        unknown = sorted(set(options.tune.candidates or ()) - set(candidate_names()))
        if unknown:
            raise ArchiveError(f"--candidates: unknown {', '.join(unknown)}; expected some of "
                               f"{', '.join(candidate_names())}")
        for device in options.tune_devices:
            backend.check_device(device)
    return backend, backend.check_device(options.device)


def _archive_path(options: ArchiveOptions) -> Path:
    suffix = "" if options.archive_format == "no-archive" else ".mar"
    path = Path(options.export_path) / f"{options.model_name}{suffix}"
    if path.exists() and not options.force:
        raise ArchiveError(f"{path} already exists: use --force to replace it")
    return path


def _load_file(path: Path, flag: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise ArchiveError(f"{flag} {path} cannot be read with torch.load(weights_only=True): {reason}") from None


def _load_sample(path: Path) -> Sample:
    try:
        return Sample.of(_load_file(path, "--sample"))
    except TypeError as error:
        raise ArchiveError(f"--sample {path}: {error}") from None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:  # aitune_core run from a checkout that was not pip-installed (a bare GPU machine) has no record
        project = version("aitune-torchserve")
    except PackageNotFoundError:
        project = "not installed"
    return {**library_versions(), "aitune-torchserve": project, "python": sys.version.split()[0]}


def handler_path() -> Path:
    """The handler file that goes into every archive."""
    candidates = [Path(__file__).resolve().parents[1] / "handler" / HANDLER_FILE,
                  Path(sys.prefix) / "share" / "aitune-torchserve" / HANDLER_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ArchiveError(f"The handler {HANDLER_FILE} is not installed: looked in {', '.join(map(str, candidates))}")


def _package(options: ArchiveOptions, source: _Source, checkpoints: dict[str, Backend], extra_files: dict[str, bytes],
             manifest: dict[str, Any], model_config: str | None, archive_path: Path,
             progress: Callable[[str], None]) -> None:
    """Stage checkpoints, model file and manifest, run torch-model-archiver, move the result into place.

    ``checkpoints`` maps file names to built backends; the first is TorchServe's serialized file.
    """
    export_path = Path(options.export_path)
    export_path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.model_name}-", dir=export_path))
    try:
        files, out, tmp = staging / "files", staging / "out", staging / "tmp"
        for folder in (files, out, tmp):
            folder.mkdir()
        saved = []
        for name, backend in checkpoints.items():
            saved.append(files / name)
            save_checkpoint(backend.to_dict(), saved[-1])
        extra = [*saved[1:], *source.write_files(files)]
        for name, data in extra_files.items():
            extra.append(files / name)
            extra[-1].write_bytes(data)
        requirements = files / REQUIREMENTS_NAME
        needs = [package for backend in checkpoints.values() for package in backend.REQUIRES]
        requirements.write_text(bundle_requirements([*needs, *source.packages]))
        package = staging / "package"
        cpu_kernels = source.cpu_kernels or any(backend.USES_CPU_KERNELS for backend in checkpoints.values())
        builds = stage_package(package, cpu_kernels, progress)
        if builds is not None:  # what the worker picks from: kernels/builds/index.json has each build's sha256
            manifest["cpu_kernels"] = {"digest": builds["digest"], "torch": builds["torch"],
                                       "levels": list(builds["levels"])}
        write_manifest(files, manifest, [saved[0], *extra, requirements])
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", options.model_name, "--version", options.version,
            "--handler", str(handler_path()), "--serialized-file", str(saved[0]),
            "--extra-files", ",".join(str(path) for path in [*extra, files / MANIFEST_NAME, package]),
            "--requirements-file", str(requirements),
            "--export-path", str(out), "--archive-format", options.archive_format,
        ]
        if model_config is not None:
            (staging / MODEL_CONFIG).write_text(model_config)
            command += ["--config-file", str(staging / MODEL_CONFIG)]
        # The archiver stages in $TMPDIR/<model-name>: a private TMPDIR keeps parallel runs apart.
        env = {**os.environ, "TMPDIR": str(tmp)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ArchiveError(f"torch-model-archiver failed: {lines[-1] if lines else done.returncode}")
        move_into_place(out / archive_path.name, archive_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def summary_table(result: ArchiveResult) -> str:
    """The short table the CLI prints at the end."""
    rows = [
        ("archive", str(result.archive_path)),
        ("backend", result.backend),
        ("quantization", result.quantization or "none"),
        ("accuracy", f"cosine {result.accuracy.cosine:.6f} (gate {result.min_cosine}), "
                     f"max abs error {result.accuracy.max_abs_error:.3g}"),
        ("archive size", f"{result.archive_bytes / 1e6:.2f} MB = {result.archive_bytes / max(result.fp32_weight_bytes, 1):.2f}x "
                         f"the fp32 weights ({result.fp32_weight_bytes / 1e6:.2f} MB)"),
        ("build time", f"{result.build_seconds:.2f} s"),
    ]
    if result.startup_timeout:
        rows.append(("startupTimeout", result.startup_timeout))
    if result.cpu_kernels:
        rows.append(("CPU kernels", f"built for {', '.join(result.cpu_kernels)}: a worker loads the best its CPU runs, "
                                    "nothing is compiled at start"))
    for report in result.tuning:
        rows.append((f"tuned on {report.device}", f"{report.options.strategy}: {report.reason}"))
    for variant in result.variants:
        rows.append((f"variant {variant.name}", f"{variant.describe} for {variant.needs()}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def parse_args(argv: list[str] | None = None) -> ArchiveOptions:
    """The CLI's flags as ArchiveOptions."""
    parser = argparse.ArgumentParser(
        prog="aitune-archive",
        description="Build a model with an AITune-style backend, check its accuracy and pack it into a .mar",
    )
    parser.add_argument("--model-name", required=True)
    source = parser.add_argument_group("the model: a Hugging Face folder, or your nn.Module in a file")
    source.add_argument("--hf-model", type=Path, metavar="DIR",
                        help="a Hugging Face folder (config.json, model.safetensors, tokenizer): nothing else needed")
    source.add_argument("--task", choices=TASKS,
                        help="with --hf-model; default: read from the folder (modules.json, architectures)")
    source.add_argument("--sample-texts", type=Path, metavar="FILE",
                        help="with --hf-model: texts (one per line) to check accuracy and tune on; default: built-in")
    generation = parser.add_argument_group("text generation (--hf-model with a causal language model)")
    generation.add_argument("--max-context", type=int, help="prompt + generated tokens per sequence "
                                                            "(default: the model's limit, at most 2048)")
    generation.add_argument("--max-batch", type=int, help="sequences decoded together (default 8)")
    generation.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                            help="what the KV cache holds: float32 (default) or bfloat16 (half its memory and of "
                                 "the bytes a decode step reads from it; the gate holds it against fp32)")
    generation.add_argument("--stream-interval", type=int,
                            help="decode steps a streamed reply carries at least (pieces of text where each request "
                                 "runs alone; default 1: every token; more: fewer round trips through TorchServe, "
                                 "text in bursts; a request's 'stream_interval' overrides it)")
    generation.add_argument("--min-top1", type=float, help="gate: teacher-forced next-token top-1 agreement with "
                                                           "fp32 (default 0.90)")
    generation.add_argument("--max-kl", type=float, help="gate: mean KL divergence of the next-token distributions "
                                                         "from fp32 (default 0.10)")
    parser.add_argument("--model-file", type=Path, help="a Python file defining your nn.Module")
    parser.add_argument("--model-class")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object passed to the model class")
    parser.add_argument("--weights", type=Path, help="state_dict saved with torch.save")
    parser.add_argument("--sample", type=Path, action="append", dest="samples", default=[],
                        help="torch.save file: a tensor, a tuple/list of tensors, or (args tuple, kwargs dict); "
                             "repeat it: a dim whose size differs between samples is dynamic when served")
    parser.add_argument("--backend", default="torchao", choices=sorted(BACKEND_NAMES))
    parser.add_argument("--quantization", choices=sorted(QUANTIZATIONS),
                        help="torchao: any (default int8wo); weight-only: int8wo or int4wo (this project's CPU kernels)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the (quantized) module with inductor, ahead of time by default")
    parser.add_argument("--compile-at", default="archive", choices=COMPILE_AT,
                        help="archive: AOTInductor package in the .mar, a worker only loads it (default); "
                             "start: torch.compile when the worker starts")
    parser.add_argument("--precision", choices=sorted(PRECISIONS),
                        help="run the model's float math in bf16 or fp16 inside (requests and answers keep "
                             "their dtypes); default: the model's own dtypes")
    parser.add_argument("--checkpoint-weights", default="quantized", choices=CHECKPOINT_WEIGHTS,
                        help="store quantized weights (fast start) or the original ones (quantize at start)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N: where the backend is built")
    parser.add_argument("--export-path", default=Path("model_store"), type=Path)
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--config-file", type=Path, help="model-config.yaml for TorchServe (batchSize, ...)")
    parser.add_argument("--min-cosine", type=float, help="accuracy gate; default per quantization")
    parser.add_argument("--archive-format", default="default", choices=["default", "no-archive", "zip-store"])
    parser.add_argument("--force", action="store_true", help="replace an existing archive")
    parser.add_argument("--max-batch-size", type=int,
                        help="most rows (texts for a text model) one request may send; 400 above it")
    parser.add_argument("--text-tokenizer", type=Path,
                        help="tokenizer.json: serve {\"text\": [...]} through forward(input_ids, attention_mask)")
    parser.add_argument("--text-max-tokens", type=int,
                        help="truncate each text to this many tokens (default 256; with --hf-model the model's own limit)")
    parser.add_argument("--text-output-key", default="embeddings", help="the answer's key for the model output")
    tuning = parser.add_argument_group("tuning (--tune)")
    tuning.add_argument("--tune", action="store_true",
                        help="measure eager, compile and each quantization the device can run (with and without "
                             "compile), keep the fastest that passes the accuracy gate (replaces --backend, "
                             "--quantization and --compile)")
    tuning.add_argument("--strategy", default="max-throughput", choices=STRATEGIES)
    tuning.add_argument("--budget-ms", type=float, help="latency-budget: the p90 latency one call may take")
    tuning.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to measure, e.g. 1,8,32")
    tuning.add_argument("--candidates", help=f"comma-separated subset of: {', '.join(candidate_names())}")
    tuning.add_argument("--tune-devices", help="devices to tune on, one variant each, e.g. cpu,cuda:0 "
                                               "(default: --device)")
    tuning.add_argument("--no-keep-float", action="store_true",
                        help="a quantization that misses the gate is out (default: tried again with its costliest "
                             "layers kept in float)")
    parser.add_argument("--kserve", type=Path, metavar="DIR",
                        help="also write KServe's storage layout and an InferenceService YAML into DIR")
    add_kserve_arguments(parser)
    args = parser.parse_args(argv)
    if (args.hf_model is None) == (args.model_file is None):
        parser.error("give either --hf-model DIR (a Hugging Face folder) or --model-file FILE with --sample")
    tune_options = None
    if args.tune:
        try:
            tune_options = TuneOptions(
                strategy=args.strategy, budget_ms=args.budget_ms,
                batch_sizes=tuple(int(size) for size in args.batch_sizes.split(",")),
                candidates=tuple(args.candidates.split(",")) if args.candidates else None,
                keep_float=not args.no_keep_float)
        except ValueError as error:
            parser.error(str(error) if "invalid literal" not in str(error)
                         else f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
        if args.quantization or args.compile or args.precision or args.backend != "torchao" or args.compile_at != "archive":
            parser.error("--tune chooses the backend itself: instead of --backend, --quantization, --precision, "
                         "--compile or --compile-at, name the candidates with --candidates")
    elif any(value is not None for value in (args.budget_ms, args.candidates, args.tune_devices)) or args.no_keep_float:
        parser.error("--budget-ms, --candidates, --tune-devices and --no-keep-float apply with --tune only")
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--model-kwargs is not valid JSON: {error}")
    if args.backend == "eager" and args.quantization:
        parser.error("--quantization applies to the torchao backend only")
    return ArchiveOptions(
        model_name=args.model_name, model_file=args.model_file, samples=args.samples, model_class=args.model_class,
        hf_model=args.hf_model, task=args.task, sample_texts=args.sample_texts, max_context=args.max_context,
        max_batch=args.max_batch, kv_cache_dtype=args.kv_cache_dtype,
        stream_interval=args.stream_interval, min_top1=args.min_top1, max_kl=args.max_kl,
        model_kwargs=model_kwargs, weights=args.weights, backend=args.backend, quantization=args.quantization,
        checkpoint_weights=args.checkpoint_weights, compile=args.compile, precision=args.precision,
        compile_at=args.compile_at, device=args.device, export_path=args.export_path,
        version=args.version, config_file=args.config_file, min_cosine=args.min_cosine, force=args.force,
        archive_format=args.archive_format, text_tokenizer=args.text_tokenizer,
        text_max_tokens=args.text_max_tokens, text_output_key=args.text_output_key,
        max_batch_size=args.max_batch_size, tune=tune_options,
        tune_devices=args.tune_devices.split(",") if args.tune_devices else [],
        kserve=options_from(args, [], args.kserve, args.force) if args.kserve else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Console script: progress lines, then a summary table; one line and exit 1 on any error."""
    options = parse_args(argv)
    try:
        result = archive_model(options, progress=lambda line: print(f"- {line}", flush=True))
    except (AITuneError, ValueError, FileNotFoundError) as error:
        print(f"aitune-archive: error: {error}", file=sys.stderr)
        return 1
    print(f"Archived {result.archive_path}\n{summary_table(result)}")
    if options.kserve is not None:
        try:
            path = write_layout(dataclasses.replace(options.kserve, archives=[result.archive_path]))
        except AITuneError as error:
            print(f"aitune-archive: error: {error}", file=sys.stderr)
            return 1
        print(f"KServe layout in {options.kserve.out}: upload it to the storageUri, then kubectl apply -f {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
