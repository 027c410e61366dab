"""Request codecs: how a batch of decoded requests becomes ``infer`` calls and outcomes.

A codec sits between the wire formats (``aitune_core.wire``: the bytes of each protocol) and the
backend: it checks inputs against what the archive recorded, batches, calls ``infer`` as few times
as fit, and names the outputs. ``TensorCodec`` (the default) reads tensors as the GraphSpec
recorded them. ``TextCodec`` is the extension point for text models: it tokenizes
``{"text": [...]}`` with a tokenizer.json shipped in the archive, pads the whole batch to its
longest text, and calls ``forward(input_ids, attention_mask)`` once. The manifest's ``request``
section says which one an archive uses, so the handler stays generic.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from aitune_core.backend import Backend
from aitune_core.checkpoint import check_file_name
from aitune_core.errors import BadRequestError, CheckpointError
from aitune_core.graph_spec import GraphSpec, Sample, flatten_tensors
from aitune_core.payload import (array_to_tensor, batch_key, batch_size_of, concat_samples, decode_inputs, decode_value,
                                 encode_output, split_output)

logger = logging.getLogger(__name__)

TEXT_INPUT = "text"
TEXT_DTYPE = "bytes"  # a text input's dtype in ``input_types``: the v2 protocol's BYTES


@dataclasses.dataclass
class Outcome:
    """One request's result before any wire format: the model's output (status 200) or an error."""

    status: int
    output: Any = None
    error: str | None = None

    @classmethod
    def failed(cls, status: int, message: str) -> "Outcome":
        return cls(status, error=message)


class Codec(Protocol):
    def decode(self, value: Any) -> Any:
        """One request's TorchServe JSON value, checked; BadRequestError naming the problem."""

    def decode_named(self, named: dict[str, Any]) -> Any:
        """One request's inputs by name (numpy arrays of a declared type, JSON values, or texts), checked."""

    def input_types(self) -> dict[str, str]:
        """Each input's name and dtype (``float32``..., or ``bytes`` for texts), in forward() order."""

    def output_names(self) -> list[str]:
        """The names ``named_outputs`` gives, known before any request runs."""

    def answer(self, backend: Backend, decoded: list[Any]) -> list[Outcome]:
        """Outcomes for decoded requests, in order, with as few ``infer`` calls as fit."""

    def to_json(self, output: Any) -> Any:
        """One request's output in the TorchServe JSON contract."""

    def named_outputs(self, output: Any) -> dict[str, torch.Tensor]:
        """One request's output as named tensors (the v2 protocol's names)."""


def run_alone(backend: Backend, sample: Sample) -> Outcome:
    """One request on its own: its model errors become its own 4xx/5xx, never the batch's."""
    try:
        return Outcome(200, sample.run(backend.infer))
    except torch.cuda.OutOfMemoryError:
        logger.error("Out of GPU memory on a request")
        return Outcome.failed(507, "out of GPU memory: send a smaller batch")
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0][:300]
        logger.warning("The model raised on a request: %s: %s", type(error).__name__, message)
        return Outcome.failed(400, f"the model could not run this input: {type(error).__name__}: {message}")


def run_batched(backend: Backend, samples: list[Sample]) -> list[Outcome]:
    """Concatenate along dim 0, one ``infer``, split back; each alone when that cannot be done."""
    sizes = [batch_size_of(sample) for sample in samples]
    if len(samples) > 1 and None not in sizes:
        try:
            parts = split_output(concat_samples(samples).run(backend.infer), sizes)
        except Exception:  # one bad request must not fail the rest: answer each alone below
            logger.warning("Batched inference of %d requests failed; answering them one by one", len(samples))
            parts = None
        if parts is not None:
            return [Outcome(200, part) for part in parts]
    return [run_alone(backend, sample) for sample in samples]


@dataclasses.dataclass
class TensorCodec:
    """Tensors checked against the GraphSpec: from nested lists ({"inputs": [...], "kwargs": {...}}) or by name.

    Inputs are named by forward()'s parameter names (positional, then keyword); outputs ``output``
    for a tensor, ``output_0``, ``output_1``... for a tuple or list, the keys for a dict.
    ``max_batch_size`` (from ``--max-batch-size``) caps the rows of one request.
    """

    graph_spec: GraphSpec
    max_batch_size: int | None = None

    def decode(self, value: Any) -> Sample:
        return self._checked(decode_inputs(value, self.graph_spec))

    def decode_named(self, named: dict[str, Any]) -> Sample:
        nodes = self._input_nodes()
        unknown = [name for name in named if name not in nodes]
        if unknown:
            raise BadRequestError(f"unknown input(s) {', '.join(map(repr, unknown))}: this model takes "
                                  f"{', '.join(map(repr, nodes))}")
        positional = list(nodes)[:len(self.graph_spec.args)]
        missing = [name for name in positional if name not in named]
        if missing:
            raise BadRequestError(f"missing input(s) {', '.join(map(repr, missing))}: this model takes "
                                  f"{', '.join(map(repr, nodes))}")

        def tensor(name: str) -> Any:
            value, where = named[name], f"input {name!r}"
            if isinstance(value, np.ndarray) and nodes[name]["kind"] == "tensor":
                return array_to_tensor(value, nodes[name], where)
            return decode_value(value, nodes[name], where)

        return self._checked(Sample(args=tuple(tensor(name) for name in positional),
                                    kwargs={name: tensor(name) for name in named if name not in positional}))

    def _input_nodes(self) -> dict[str, dict[str, Any]]:
        """forward()'s parameter names with their spec nodes; ``input_N`` where the signature is unknown."""
        spec = self.graph_spec
        names = [name for name in spec.signature if name not in spec.kwargs][:len(spec.args)]
        names += [f"input_{index}" for index in range(len(names), len(spec.args))]
        return {**dict(zip(names, spec.args)), **spec.kwargs}

    def input_types(self) -> dict[str, str]:
        return {name: node.get("dtype", node["kind"]) for name, node in self._input_nodes().items()}

    def output_names(self) -> list[str]:
        return output_names(self.graph_spec.outputs)

    def _checked(self, sample: Sample) -> Sample:
        if self.max_batch_size is not None:
            rows = max((t.shape[0] for t in flatten_tensors((sample.args, sample.kwargs)) if t.dim()), default=0)
            if rows > self.max_batch_size:
                raise BadRequestError(f"the request has {rows} rows (dim 0), at most {self.max_batch_size} "
                                      "per request (the archive's --max-batch-size): split it")
        return sample

    def answer(self, backend: Backend, decoded: list[Sample]) -> list[Outcome]:
        if len(decoded) == 1:
            return [run_alone(backend, decoded[0])]
        groups: dict[Any, list[int]] = {}
        for index, sample in enumerate(decoded):
            groups.setdefault(batch_key(sample), []).append(index)
        outcomes: list[Outcome | None] = [None] * len(decoded)
        for indices in groups.values():
            for index, outcome in zip(indices, run_batched(backend, [decoded[i] for i in indices])):
                outcomes[index] = outcome
        return outcomes

    def to_json(self, output: Any) -> Any:
        return encode_output(output)

    def named_outputs(self, output: Any) -> dict[str, torch.Tensor]:
        return name_outputs(output)


def output_names(node: dict[str, Any]) -> list[str]:
    """The names ``name_outputs`` gives an output described by ``node``."""
    if node["kind"] in ("tuple", "list"):
        return [f"output_{index}" for index in range(len(node["items"]))]
    if node["kind"] == "dict":
        return list(node["items"])
    return ["output"]


def name_outputs(output: Any) -> dict[str, torch.Tensor]:
    """A model output as named tensors: ``output``, ``output_0``..., or a dict's keys; numbers become 0-d tensors."""
    if isinstance(output, (tuple, list)):
        items = {f"output_{index}": item for index, item in enumerate(output)}
    elif isinstance(output, dict):
        items = {str(key): item for key, item in output.items()}
    else:
        items = {"output": output}
    named = {}
    for name, item in items.items():
        if not isinstance(item, (torch.Tensor, int, float, bool)):
            raise BadRequestError(f"output {name!r} is a {type(item).__name__}, which no tensor protocol can "
                                  "carry: use the /predictions JSON API for this model")
        named[name] = item if isinstance(item, torch.Tensor) else torch.tensor(item)
    return named


@dataclasses.dataclass
class TextOptions:
    """The manifest's ``request`` section for a text model (``codec: text``)."""

    tokenizer: str
    max_tokens: int = 256
    output_key: str = "embeddings"
    max_texts: int = 256
    max_chars: int = 100_000

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "text", **dataclasses.asdict(self)}


class TextCodec:
    """``{"text": ["...", ...]}`` or a JSON string in; ``{output_key: [row per text]}`` out."""

    def __init__(self, options: TextOptions, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        self.options = options
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(options.max_tokens)

    def decode(self, value: Any) -> list[str]:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, dict):
            unknown = sorted(set(value) - {"text"})
            if unknown or "text" not in value:
                raise BadRequestError(f"expected {{\"text\": [\"...\", ...]}}, got keys {sorted(value)}")
            texts = value["text"] if isinstance(value["text"], list) else [value["text"]]
        else:
            raise BadRequestError(f"expected {{\"text\": [\"...\", ...]}} or a JSON string, got {type(value).__name__}")
        if not texts:
            raise BadRequestError("'text' is an empty list: send at least one text")
        if len(texts) > self.options.max_texts:
            raise BadRequestError(f"'text' has {len(texts)} texts, at most {self.options.max_texts} per request: "
                                  "split it")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadRequestError(f"text[{index}]: expected a string, got {type(text).__name__}")
            if len(text) > self.options.max_chars:
                raise BadRequestError(f"text[{index}] has {len(text)} characters, "
                                      f"at most {self.options.max_chars} (longer texts are truncated to "
                                      f"{self.options.max_tokens} tokens anyway)")
        return texts

    def tokenize(self, texts: list[str]) -> Sample:
        encodings = self.tokenizer.encode_batch(texts)
        return Sample(args=(torch.tensor([e.ids for e in encodings]),
                            torch.tensor([e.attention_mask for e in encodings])))

    def decode_named(self, named: dict[str, Any]) -> list[str]:
        unknown = sorted(set(named) - {TEXT_INPUT})
        if unknown or TEXT_INPUT not in named:
            raise BadRequestError(f"this text model takes one BYTES input named {TEXT_INPUT!r}, got "
                                  f"{', '.join(map(repr, named)) or 'none'}")
        return self.decode({TEXT_INPUT: named[TEXT_INPUT]})

    def input_types(self) -> dict[str, str]:
        return {TEXT_INPUT: TEXT_DTYPE}

    def output_names(self) -> list[str]:
        return [self.options.output_key]

    def to_json(self, output: Any) -> dict[str, Any]:
        return {self.options.output_key: encode_output(output)}

    def named_outputs(self, output: Any) -> dict[str, torch.Tensor]:
        return {self.options.output_key: output}

    def answer(self, backend: Backend, decoded: list[list[str]]) -> list[Outcome]:
        # One tokenization for the whole batch: padded to its longest text, split back by count.
        everything = self.tokenize([text for texts in decoded for text in texts])
        bounds = [0]
        for texts in decoded:
            bounds.append(bounds[-1] + len(texts))
        samples = [Sample(args=tuple(t[start:end] for t in everything.args))
                   for start, end in zip(bounds, bounds[1:])]
        return run_batched(backend, samples)


def make_codec(request_section: dict[str, Any] | None, model_dir: Path, graph_spec: GraphSpec) -> Codec:
    """The codec an archive's manifest asks for (``request.codec``); tensors when it names none."""
    if not request_section or request_section.get("codec", "tensor") == "tensor":
        return TensorCodec(graph_spec, (request_section or {}).get("max_batch_size"))
    if request_section["codec"] == "text":
        options = TextOptions(**{k: v for k, v in request_section.items() if k != "codec"})
        return TextCodec(options, model_dir / check_file_name(options.tokenizer))
    if request_section["codec"] == "generate":
        from aitune_core.generate.codec import GenerateCodec

        return GenerateCodec.from_model_dir(request_section, model_dir)
    if request_section["codec"] == "hf":
        from aitune_core.hf.codec import HFCodec

        return HFCodec.from_model_dir(request_section, model_dir)
    raise CheckpointError(f"The manifest asks for an unknown request codec {request_section['codec']!r}: "
                          "expected 'tensor', 'text', 'hf' or 'generate'")
