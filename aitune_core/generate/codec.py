"""The codec of a text-generation archive: a request's JSON in, the engine run on the backend, its answer out.

TorchServe's JSON (``/predictions``) and gRPC ``Predictions``/``StreamPredictions`` carry it. A request
with ``"stream": true`` has its text sent as it is decoded (``{"text": ...}``, through the ``send`` the
handler gives: TorchServe's intermediate responses; the first piece at once, then ``stream_interval`` pieces
a send) and ends with ``{"text": rest, "finish_reason", "usage"}``; otherwise one answer ``{"text",
"finish_reason", "usage"}``.
This is the path of a worker that answers one request at a time; under TorchServe's continuous batching
``service.py`` answers instead (one chunk a decode step, the last one carrying the rest of the text).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitune_core.backend import Backend
from aitune_core.codecs import Outcome
from aitune_core.errors import BadRequestError
from aitune_core.generate.engine import Engine, Generation
from aitune_core.generate.request import GenerateOptions, GenerateRequest, parse

Send = Callable[[int, Any], None]  # (request index, JSON value) -> sent as an intermediate response


class GenerateCodec:
    """Checks generation requests and runs them through an ``Engine`` on the deployed backend."""

    streams = True

    def __init__(self, options: GenerateOptions, tokenizer: Any) -> None:
        self.options = options
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, section: dict[str, Any], model_dir: Path) -> "GenerateCodec":
        from aitune_core.hf.folder import load_tokenizer

        return cls(GenerateOptions.from_dict(section), load_tokenizer(Path(model_dir)))

    def decode(self, value: Any) -> GenerateRequest:
        return parse(value, self.tokenizer, self.options)

    def decode_named(self, named: dict[str, Any]) -> GenerateRequest:
        raise BadRequestError("a text-generation model is served through /predictions (TorchServe's JSON, or gRPC "
                              "Predictions): send {\"prompt\": \"...\"}")

    def input_types(self) -> dict[str, str]:
        return {"prompt": "bytes"}

    def output_names(self) -> list[str]:
        return ["text"]

    def to_json(self, output: Generation | dict[str, Any]) -> Any:
        if isinstance(output, Generation):
            return output.answer()
        return output  # the last chunk of a stream

    def named_outputs(self, output: Any) -> dict[str, Any]:
        raise BadRequestError("a text-generation model answers through /predictions only")

    def answer(self, backend: Backend, decoded: list[GenerateRequest], send: Send | None = None) -> list[Outcome]:
        """Each request in turn on cache slot 0; a streamed one sends its pieces through ``send``."""
        engine = Engine(backend.infer, self.tokenizer, self.options)
        outcomes = []
        for index, request in enumerate(decoded):
            if not (request.stream and send is not None):
                outcomes.append(Outcome(200, engine.generate(request)))
                continue
            paced = Paced(lambda text, index=index: send(index, {"text": text}), request.stream_interval)
            generation = engine.generate(request, paced)
            outcomes.append(Outcome(200, generation.last_chunk(paced.rest())))
        return outcomes


class Paced:
    """A stream's pieces of text sent the first at once, then ``interval`` pieces joined in one send (the
    request's ``stream_interval``); ``rest`` is the text not sent yet, for the stream's last chunk."""

    def __init__(self, send_text: Callable[[str], None], interval: int) -> None:
        self.send_text, self.interval = send_text, interval
        self.pending: list[str] = []
        self.sent = 0

    def __call__(self, piece: str) -> None:
        self.pending.append(piece)
        if not self.sent or len(self.pending) >= self.interval:
            self.send_text(self.rest())
            self.sent += 1

    def rest(self) -> str:
        text, self.pending = "".join(self.pending), []
        return text
