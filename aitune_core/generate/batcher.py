"""Continuous batching: requests join the running decode batch between steps and leave as soon as they end.

``Batcher.step`` is one turn, driven by whoever owns the requests (TorchServe's continuous batching calls
the handler once a step with the requests that arrived and those still running):

1. a live sequence whose request is neither arriving nor continuing lost its client: its slot is freed;
2. each arriving request gets a free KV-cache slot, its prompt chunks and its first token;
3. every sequence that was already live decodes one token, all together in one ``infer`` of
   ``[live, 1]`` tokens: the weights are read once for all of them, which is where many streams gain.

Each request's ``Progress`` says what text it produced this turn and, once it ended, its ``Generation``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import torch

from aitune_core.errors import AITuneError
from aitune_core.generate.engine import Engine, Generation, Sequence, window
from aitune_core.generate.request import GenerateRequest

logger = logging.getLogger(__name__)

# What the batcher reports, by name: (unit, kind). The handler turns each into a TorchServe metric.
METRICS = {
    "TimeToFirstToken": ("ms", "HISTOGRAM"),  # from the start of the step it joined to its first token
    "TimeBetweenTokens": ("ms", "HISTOGRAM"),  # one request's mean time from a token to the next
    "GeneratedTokens": ("count", "COUNTER"),
    "PromptTokens": ("count", "COUNTER"),
    "LiveSequences": ("count", "GAUGE"),
    "RequestsFinished": ("count", "COUNTER"),  # with a Reason: stop, length, client_gone, error
}
Observe = Callable[[str, float, dict[str, str]], None]


class BusyError(AITuneError):
    """Every cache slot is taken: the client should retry later (503)."""


@dataclasses.dataclass
class Progress:
    """What one request did in one turn: new text, and how it ended if it did (``generation`` or ``error``)."""

    text: str = ""
    generation: Generation | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.generation is not None or self.error is not None


@dataclasses.dataclass
class Live:
    sequence: Sequence
    step: tuple[int, int] | None  # the (token, position) of its next decode step
    progress: Progress
    first_token_at: float


class Batcher:
    """Requests, keyed by their id, decoded together on one engine in up to ``max_batch`` cache slots."""

    def __init__(self, engine: Engine, max_batch: int, observe: Observe | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.observe = observe or (lambda name, value, dimensions: None)
        self.free_slots = list(range(max_batch))
        self.live: dict[str, Live] = {}

    def step(self, arrivals: dict[str, GenerateRequest], continuing: Iterable[str] = ()) -> dict[str, Progress]:
        """One turn (see the module's docstring); the ``Progress`` of every arriving and continuing request."""
        continuing = list(continuing)
        present = set(arrivals) | set(continuing)
        for key in [key for key in self.live if key not in present]:
            self._leave(key, "client_gone")
        progress = {key: self.live[key].progress if key in self.live else Progress(
            error=KeyError(f"request {key} is not decoding in this worker")) for key in continuing}
        decoding = list(self.live)
        started = time.perf_counter()
        # no_grad, not inference_mode: see Engine.generate.
        with torch.no_grad():
            for key, request in arrivals.items():
                progress[key] = self._admit(key, request, started)
            if decoding:
                self._decode(decoding)
        for live in self.live.values():  # a fresh record for the next turn
            live.progress = Progress()
            live.sequence.emit = self._collect(live.progress)
        if decoding or arrivals:
            self.observe("LiveSequences", len(self.live), {})
        return progress

    def run_alone(self, request: GenerateRequest) -> Progress:
        """``request`` to its end now, in a free slot (for a caller that must answer it in one reply)."""
        if not self.free_slots:
            return self._failed(BusyError(f"all {len(self.live)} cache slots are decoding: retry later"))
        slot = self.free_slots.pop(0)
        try:
            generation = self.engine.generate(request, slot=slot)
        except Exception as error:  # noqa: BLE001 - this request fails; the others go on
            logger.exception("Generation failed in a request run alone")
            return self._failed(error)
        finally:
            self.free_slots.append(slot)
        self.observe("PromptTokens", generation.prompt_tokens, {})
        self.observe("GeneratedTokens", len(generation.tokens), {})
        self.observe("RequestsFinished", 1, {"Reason": generation.finish_reason})
        return Progress(text=generation.text, generation=generation)

    def _admit(self, key: str, request: GenerateRequest, started: float) -> Progress:
        """The prompt into a free slot and the first token: live under ``key``, or already finished."""
        if not self.free_slots:
            return self._failed(BusyError(f"all {len(self.live)} cache slots are decoding: retry later"))
        slot = self.free_slots.pop(0)
        progress = Progress()
        try:
            sequence, step = self.engine.start(request, slot, self._collect(progress))
        except Exception as error:  # noqa: BLE001 - this request fails; the others go on
            logger.exception("Generation failed in the prompt of a request")
            self.free_slots.append(slot)
            return self._failed(error)
        now = time.perf_counter()
        live = Live(sequence, step, progress, now)
        if step is None:
            self.free_slots.append(slot)
        else:
            self.live[key] = live
        self.observe("TimeToFirstToken", (now - started) * 1000, {})
        self.observe("PromptTokens", len(request.prompt_ids), {})
        return self._finish(live, now) if step is None else progress

    def _decode(self, keys: list[str]) -> None:
        """One decode step of the sequences ``keys``, in one ``infer``."""
        rows = [self.live[key] for key in keys]
        tokens = torch.tensor([[live.step[0]] for live in rows])
        positions = torch.tensor([[live.step[1]] for live in rows])
        slots = torch.tensor([live.sequence.slot for live in rows])
        try:
            logits = self.engine.infer(tokens, positions, slots,
                                       *window(self.engine.options, max(live.step[1] for live in rows), len(rows)))
        except Exception as error:  # noqa: BLE001 - the live requests fail; the next ones are served
            logger.exception("Generation failed in a decode step of %d sequences", len(rows))
            for key, live in zip(keys, rows):
                self._leave(key, "error")
                live.progress.error = error
            return
        now = time.perf_counter()
        for row, (key, live) in enumerate(zip(keys, rows)):
            try:
                live.step = live.sequence.take(logits[row, -1])
            except Exception as error:  # noqa: BLE001 - e.g. its sampling: this request fails, the others go on
                logger.exception("Generation failed in a decode step of request %s", key)
                self._leave(key, "error")
                live.progress.error = error
                continue
            if live.step is None:
                self._leave(key, None)
                self._finish(live, now)

    def _collect(self, progress: Progress) -> Callable[[str], None]:
        def emit(piece: str) -> None:
            progress.text += piece
        return emit

    def _leave(self, key: str, reason: str | None) -> None:
        """Free ``key``'s slot; a request that did not finish counts as ended for ``reason``."""
        live = self.live.pop(key)
        self.free_slots.append(live.sequence.slot)
        if reason is not None:
            self.observe("GeneratedTokens", len(live.sequence.tokens), {})
            self.observe("RequestsFinished", 1, {"Reason": reason})

    def _finish(self, live: Live, now: float) -> Progress:
        live.progress.generation = generation = live.sequence.result()
        tokens = len(generation.tokens)
        self.observe("GeneratedTokens", tokens, {})
        if tokens > 1:
            self.observe("TimeBetweenTokens", (now - live.first_token_at) * 1000 / (tokens - 1), {})
        self.observe("RequestsFinished", 1, {"Reason": generation.finish_reason})
        return live.progress

    def _failed(self, error: BaseException) -> Progress:
        self.observe("RequestsFinished", 1, {"Reason": "error"})
        return Progress(error=error)
