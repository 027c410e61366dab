"""Texts in, a Hugging Face task's answers out: the codec of archives made with ``--hf-model``.

A request is ``{"text": ["...", ...]}`` (or one JSON string; ``top_k`` where the task has one);
every text of a worker batch is tokenized together with the archive's own tokenizer, the model runs
once (one ``infer``), and each request gets its answer, as transformers' pipelines give it:

- sentence-embeddings: ``{"embeddings": [[...], ...]}``;
- text-classification: ``[{"label", "score"}, ...]``, plus ``"scores"`` (every label, best first) with
  ``"top_k": null``, or the best k with ``"top_k": k``;
- token-classification: per text a list of ``{"entity_group", "score", "word", "start", "end"}``;
- fill-mask: per text the best ``top_k`` (default 5) ``{"score", "token", "token_str", "sequence"}``.

Tensor protocols (KServe v1, v2, OIP) name the outputs ``embeddings``; ``label`` (BYTES), ``score``,
``scores`` (every label, in the config's label order); ``entities`` or ``fills`` (BYTES, one JSON
document per text).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from aitune_core.backend import Backend
from aitune_core.codecs import TEXT_DTYPE, TEXT_INPUT, Outcome, run_batched
from aitune_core.errors import BadRequestError
from aitune_core.graph_spec import Sample
from aitune_core.hf import answers
from aitune_core.payload import encode_output

OUTPUT_NAMES = {"sentence-embeddings": ["embeddings"], "text-classification": ["label", "score", "scores"],
                "token-classification": ["entities"], "fill-mask": ["fills"]}
DEFAULT_FILLS = 5


@dataclasses.dataclass
class HFOptions:
    """The manifest's ``request`` section of an ``--hf-model`` archive (``codec: hf``)."""

    task: str
    max_tokens: int
    labels: list[str] = dataclasses.field(default_factory=list)  # id2label in id order
    scores: str = "softmax"  # text-classification: softmax, sigmoid or none
    mask_token_id: int | None = None
    max_texts: int = 256
    max_chars: int = 100_000

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "hf", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "HFOptions":
        return cls(**{key: value for key, value in section.items() if key != "codec"})


@dataclasses.dataclass
class Texts:
    """One decoded request: its texts, and whether/how many ranked scores or fills it asked for."""

    texts: list[str]
    ranked: bool = False
    top_k: int | None = None


@dataclasses.dataclass
class Answer:
    """One request's answer in both shapes: TorchServe JSON, and named outputs for the tensor protocols."""

    json: Any
    named: dict[str, Any]


class HFCodec:
    """The codec of one task; ``tokenizer`` is transformers' fast tokenizer saved in the archive."""

    def __init__(self, options: HFOptions, tokenizer: Any) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.task = options.task

    @classmethod
    def from_model_dir(cls, section: dict[str, Any], model_dir: Path) -> "HFCodec":
        from aitune_core.hf.folder import load_tokenizer

        return cls(HFOptions.from_dict(section), load_tokenizer(Path(model_dir)))

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, value: Any) -> Texts:
        if isinstance(value, str):
            return self._checked(Texts([value], top_k=self._default_top_k()))
        if not isinstance(value, dict):
            raise BadRequestError(f"expected {{\"text\": [\"...\", ...]}} or a JSON string, got {type(value).__name__}")
        allowed = [TEXT_INPUT, "top_k"] if self.task in ("text-classification", "fill-mask") else [TEXT_INPUT]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise BadRequestError(f"unknown key(s) {', '.join(map(repr, unknown))}: this {self.task} model takes "
                                  f"{' and '.join(map(repr, allowed))}")
        if TEXT_INPUT not in value:
            raise BadRequestError(f"missing 'text': expected {{\"text\": [\"...\", ...]}}, got keys {sorted(value)}")
        texts = value[TEXT_INPUT] if isinstance(value[TEXT_INPUT], list) else [value[TEXT_INPUT]]
        request = Texts(texts, top_k=self._default_top_k())
        if "top_k" in value:
            request.ranked, request.top_k = True, self._top_k(value["top_k"])
        return self._checked(request)

    def decode_named(self, named: dict[str, Any]) -> Texts:
        unknown = sorted(set(named) - {TEXT_INPUT})
        if unknown or TEXT_INPUT not in named:
            raise BadRequestError(f"this text model takes one BYTES input named {TEXT_INPUT!r}, got "
                                  f"{', '.join(map(repr, named)) or 'none'}")
        texts = named[TEXT_INPUT]
        return self._checked(Texts(texts if isinstance(texts, list) else [texts], top_k=self._default_top_k()))

    def _default_top_k(self) -> int | None:
        return DEFAULT_FILLS if self.task == "fill-mask" else None

    def _top_k(self, value: Any) -> int | None:
        if value is None and self.task == "text-classification":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            what = "a positive integer" + (" or null (every label)" if self.task == "text-classification" else "")
            raise BadRequestError(f"'top_k' must be {what}, got {value!r}")
        return value

    def _checked(self, request: Texts) -> Texts:
        texts = request.texts
        if not texts:
            raise BadRequestError("'text' is an empty list: send at least one text")
        if len(texts) > self.options.max_texts:
            raise BadRequestError(f"'text' has {len(texts)} texts, at most {self.options.max_texts} per request: split it")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadRequestError(f"text[{index}]: expected a string, got {type(text).__name__}")
            if len(text) > self.options.max_chars:
                raise BadRequestError(f"text[{index}] has {len(text)} characters, at most {self.options.max_chars} "
                                      f"(longer texts are truncated to {self.options.max_tokens} tokens anyway)")
        if self.task == "fill-mask":
            mask = self.tokenizer.mask_token
            ids = self.tokenizer(texts, truncation=True, max_length=self.options.max_tokens)["input_ids"]
            for index, row in enumerate(ids):
                found = row.count(self.options.mask_token_id)
                if found != 1:
                    raise BadRequestError(f"text[{index}] must hold the mask token {mask!r} exactly once "
                                          f"(within its first {self.options.max_tokens} tokens), found {found}")
        return request

    # -- what the protocols see ----------------------------------------------------------------
    def input_types(self) -> dict[str, str]:
        return {TEXT_INPUT: TEXT_DTYPE}

    def output_names(self) -> list[str]:
        return OUTPUT_NAMES[self.task]

    def to_json(self, output: Answer) -> Any:
        return output.json

    def named_outputs(self, output: Answer) -> dict[str, Any]:
        return output.named

    # -- one infer for the batch ---------------------------------------------------------------
    def tokenize(self, texts: list[str], offsets: bool = False) -> dict[str, Any]:
        """The texts padded to the longest and truncated to the archive's limit (with offsets when asked)."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.options.max_tokens,
                              return_tensors="pt", return_offsets_mapping=offsets,
                              return_special_tokens_mask=offsets)

    def sample(self, encoded: dict[str, Any]) -> Sample:
        return Sample(args=(encoded["input_ids"], encoded["attention_mask"]))

    def answer(self, backend: Backend, decoded: list[Texts]) -> list[Outcome]:
        texts = [text for request in decoded for text in request.texts]
        encoded = self.tokenize(texts, offsets=self.task == "token-classification")
        bounds = [0]
        for request in decoded:
            bounds.append(bounds[-1] + len(request.texts))
        everything = self.sample(encoded)
        samples = [Sample(args=tuple(t[start:end] for t in everything.args)) for start, end in zip(bounds, bounds[1:])]
        outcomes = run_batched(backend, samples)
        for request, start, outcome in zip(decoded, bounds, outcomes):
            if outcome.status == 200:
                outcome.output = self._answer(request, encoded, start, outcome.output)
        return outcomes

    def _answer(self, request: Texts, encoded: dict[str, Any], start: int, output: torch.Tensor) -> Answer:
        if self.task == "sentence-embeddings":
            return Answer({"embeddings": encode_output(output)}, {"embeddings": output})
        values = output.detach().float().cpu().numpy()
        rows = range(start, start + len(request.texts))
        if self.task == "text-classification":
            scores = answers.class_scores(values, self.options.scores)
            json = answers.classification(scores, self.options.labels, request.ranked, request.top_k)
            return Answer(json, {"label": [item["label"] for item in json],
                                 "score": torch.tensor([item["score"] for item in json]),
                                 "scores": torch.from_numpy(scores)})
        if self.task == "token-classification":
            json = [answers.entities(text, encoded["input_ids"][row].tolist(), encoded["offset_mapping"][row].tolist(),
                                     encoded["special_tokens_mask"][row].tolist(), values[index], self.options.labels,
                                     self.tokenizer)
                    for index, (text, row) in enumerate(zip(request.texts, rows))]
            return Answer(json, {"entities": json})
        json = [answers.fills(encoded["input_ids"][row].tolist(), values[index], request.top_k,
                              self.options.mask_token_id, self.tokenizer)
                for index, row in enumerate(rows)]
        return Answer(json, {"fills": json})
