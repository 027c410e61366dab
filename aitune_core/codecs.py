"""Request codecs: how a batch of JSON requests becomes ``infer`` calls and answers.

``TensorCodec`` (the default) reads tensors as the GraphSpec recorded them. ``TextCodec`` is the
extension point for text models: it tokenizes ``{"text": [...]}`` with a tokenizer.json shipped
in the archive, pads the whole batch to its longest text, and calls
``forward(input_ids, attention_mask)`` once. The manifest's ``request`` section says which one
an archive uses, so the handler stays generic.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from aitune_core.backend import Backend
from aitune_core.checkpoint import check_file_name
from aitune_core.errors import BadRequestError, CheckpointError
from aitune_core.graph_spec import GraphSpec, Sample, flatten_tensors
from aitune_core.payload import batch_key, batch_size_of, concat_samples, decode_inputs, encode_output, split_output

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Reply:
    """One request's answer: an HTTP status and a JSON-able body."""

    status: int
    body: Any

    @classmethod
    def error(cls, status: int, message: str) -> "Reply":
        return cls(status, {"error": message})


class Codec(Protocol):
    def decode(self, value: Any) -> Any:
        """One request's JSON value, checked; BadRequestError naming the problem."""

    def answer(self, backend: Backend, decoded: list[Any]) -> list[Reply]:
        """Answers for decoded requests, in order, with as few ``infer`` calls as fit."""


def run_alone(backend: Backend, sample: Sample, encode) -> Reply:
    """One request on its own: its model errors become its own 4xx/5xx, never the batch's."""
    try:
        return Reply(200, encode(sample.run(backend.infer)))
    except torch.cuda.OutOfMemoryError:
        logger.error("Out of GPU memory on a request")
        return Reply.error(507, "out of GPU memory: send a smaller batch")
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0][:300]
        logger.warning("The model raised on a request: %s: %s", type(error).__name__, message)
        return Reply.error(400, f"the model could not run this input: {type(error).__name__}: {message}")


def run_batched(backend: Backend, samples: list[Sample], encode) -> list[Reply]:
    """Concatenate along dim 0, one ``infer``, split back; each alone when that cannot be done."""
    sizes = [batch_size_of(sample) for sample in samples]
    if len(samples) > 1 and None not in sizes:
        try:
            parts = split_output(concat_samples(samples).run(backend.infer), sizes)
        except Exception:  # one bad request must not fail the rest: answer each alone below
            logger.warning("Batched inference of %d requests failed; answering them one by one", len(samples))
            parts = None
        if parts is not None:
            return [Reply(200, encode(part)) for part in parts]
    return [run_alone(backend, sample, encode) for sample in samples]


@dataclasses.dataclass
class TensorCodec:
    """Nested lists or {"inputs": [...], "kwargs": {...}} checked against the GraphSpec.

    ``max_batch_size`` (from ``--max-batch-size``) caps the rows of one request.
    """

    graph_spec: GraphSpec
    max_batch_size: int | None = None

    def decode(self, value: Any) -> Sample:
        sample = decode_inputs(value, self.graph_spec)
        if self.max_batch_size is not None:
            rows = max((t.shape[0] for t in flatten_tensors((sample.args, sample.kwargs)) if t.dim()), default=0)
            if rows > self.max_batch_size:
                raise BadRequestError(f"the request has {rows} rows (dim 0), at most {self.max_batch_size} "
                                      "per request (the archive's --max-batch-size): split it")
        return sample

    def answer(self, backend: Backend, decoded: list[Sample]) -> list[Reply]:
        if len(decoded) == 1:
            return [run_alone(backend, decoded[0], encode_output)]
        groups: dict[Any, list[int]] = {}
        for index, sample in enumerate(decoded):
            groups.setdefault(batch_key(sample), []).append(index)
        replies: list[Reply | None] = [None] * len(decoded)
        for indices in groups.values():
            for index, reply in zip(indices, run_batched(backend, [decoded[i] for i in indices], encode_output)):
                replies[index] = reply
        return replies


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

    def encode(self, output: Any) -> dict[str, Any]:
        return {self.options.output_key: encode_output(output)}

    def answer(self, backend: Backend, decoded: list[list[str]]) -> list[Reply]:
        # One tokenization for the whole batch: padded to its longest text, split back by count.
        everything = self.tokenize([text for texts in decoded for text in texts])
        bounds = [0]
        for texts in decoded:
            bounds.append(bounds[-1] + len(texts))
        samples = [Sample(args=tuple(t[start:end] for t in everything.args))
                   for start, end in zip(bounds, bounds[1:])]
        return run_batched(backend, samples, self.encode)


def make_codec(request_section: dict[str, Any] | None, model_dir: Path, graph_spec: GraphSpec) -> Codec:
    """The codec an archive's manifest asks for (``request.codec``); tensors when it names none."""
    if not request_section or request_section.get("codec", "tensor") == "tensor":
        return TensorCodec(graph_spec, (request_section or {}).get("max_batch_size"))
    if request_section["codec"] == "text":
        options = TextOptions(**{k: v for k, v in request_section.items() if k != "codec"})
        return TextCodec(options, model_dir / check_file_name(options.tokenizer))
    raise CheckpointError(f"The manifest asks for an unknown request codec {request_section['codec']!r}: "
                          "expected 'tensor' or 'text'")
