"""Continuous batching: requests join the running decode batch between steps and leave as soon as they end.

``Batcher.step`` is one turn, driven by whoever owns the requests (TorchServe's continuous batching calls
the handler once a step with the requests that arrived and those still running). It is ``join`` then
``advance``, which a caller may also run apart (the service runs a lone stream's ``advance`` ahead, while
TorchServe carries the last step's text out and brings the next call in):

``join`` (quick, between steps):

1. a live sequence whose request is neither arriving nor continuing lost its client: its slot is freed;
2. each arriving request gets a free KV-cache slot.

``advance`` (one step of the model):

3. while sequences decode, every one of them runs one token, all together in one ``infer`` of ``[rows, 1]``
   tokens (the weights are read once for all of them, which is where many streams gain), and the prompts
   of joining requests ride along in the same ``infer``, one row a prompt token, up to ``STEP_ROWS`` rows
   in all: a prompt goes in over a few steps instead of stalling every stream for a whole prompt pass
   (chunked prefill). A row attends to its slot's positions up to its own, and every row writes its keys
   and values before any row attends, so the tokens of one prompt in one step see each other as in a chunk;
4. when nothing decodes, waiting prompts run at once, a prompt chunk an ``infer``; a request's first token
   comes from the logits of its prompt's last token.

Each request's ``Progress`` says what text it produced this turn and, once it ended, its ``Generation``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import torch

from aitune_core.errors import AITuneError
from aitune_core.generate.engine import Engine, Generation, Sequence, prefill, window
from aitune_core.generate.request import GenerateRequest
from aitune_core.generate.sampling import greedy_tokens

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
# A busy step runs at most this many rows: its decode rows, then prompt tokens of joining requests. Measured
# (254M decoder, int8 on AMX, 2 cores): 1 row 10 ms, 8 rows 19, 12 rows 24, 16 rows 30, a 32-token prompt pass 36:
# 16 rows (8 of them a prompt's however many decode) take a 26-token prompt in over 3 steps while 7 streams
# decode, each step within ~1.6x an 8-row one (streams bench: first token 1.8x idle, where 12 rows with 4 gave
# 2.5x, and p99 between tokens 5.2x against 4.3x; docs/benchmarks.md "Many streams").
STEP_ROWS = 16
MIN_PROMPT_ROWS = 8  # however many sequences decode, a joining prompt moves on by at least this much a step


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
    progress: Progress
    joined_at: float  # the start of the step it arrived in
    step: tuple[int, int] | None = None  # the (token, position) of its next decode step; None until its first token
    prompt_done: int = 0  # prompt tokens already in its cache slot
    first_token_at: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.step is not None


class Batcher:
    """Requests, keyed by their id, decoded together on one engine in up to ``max_batch`` cache slots."""

    def __init__(self, engine: Engine, max_batch: int, observe: Observe | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.observe = observe or (lambda name, value, dimensions: None)
        self.free_slots = list(range(max_batch))
        self.live: dict[str, Live] = {}
        self.reported_live = 0

    def step(self, arrivals: dict[str, GenerateRequest], continuing: Iterable[str] = ()) -> dict[str, Progress]:
        """One turn (see the module's docstring); the ``Progress`` of every arriving and continuing request."""
        refused = self.join(arrivals, continuing)
        return {**self.advance(), **refused}

    def join(self, arrivals: dict[str, GenerateRequest], continuing: Iterable[str] = ()) -> dict[str, Progress]:
        """Free the slots of live requests that are neither arriving nor ``continuing`` (their client went away) and
        give each arrival a slot; the ``Progress`` of those that cannot go on (no free slot, not decoding here).
        The others' progress comes from the next ``advance``."""
        present = set(arrivals) | set(continuing)
        for key in [key for key in self.live if key not in present]:
            self._leave(key, "client_gone")
        refused = {key: Progress(error=KeyError(f"request {key} is not decoding in this worker"))
                   for key in continuing if key not in self.live}
        joined_at = time.perf_counter()
        for key, request in arrivals.items():
            progress = self._admit(key, request, joined_at)
            if progress.finished:
                refused[key] = progress
        self._report_live()
        return refused

    def advance(self) -> dict[str, Progress]:
        """One step of every live request (see the module's docstring): what each one did, by key, including those
        that ended in it."""
        records = {key: live.progress for key, live in self.live.items()}
        try:
            # no_grad, not inference_mode: see Engine.generate.
            with torch.no_grad():
                decoding = [key for key, live in self.live.items() if live.decoding]
                if decoding:
                    self._decode(decoding, self._prompt_rows(len(decoding)))
                else:
                    self._run_prompts()
        except Exception as error:  # noqa: BLE001 - past the requests' own handling: this step's requests fail
            logger.exception("A generation step failed")
            for key, record in records.items():
                if not record.finished:
                    record.error = error
                if key in self.live:
                    self._leave(key, "error")
        for live in self.live.values():  # a fresh record for the next step
            live.progress = Progress()
            live.sequence.emit = self._collect(live.progress)
        self._report_live()
        return records

    def _report_live(self) -> None:
        """The LiveSequences gauge, when it changed (a gauge keeps its last value: one metric line less a step)."""
        if len(self.live) != self.reported_live:
            self.reported_live = len(self.live)
            self.observe("LiveSequences", self.reported_live, {})

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
        """A free slot for ``request``, live under ``key`` (its prompt runs in this step or the next ones)."""
        if not self.free_slots:
            return self._failed(BusyError(f"all {len(self.live)} cache slots are decoding: retry later"))
        progress = Progress()
        slot = self.free_slots.pop(0)
        self.live[key] = Live(self.engine.sequence(request, slot, self._collect(progress)), progress, started)
        self.observe("PromptTokens", len(request.prompt_ids), {})
        return progress

    def _prompt_rows(self, decode_rows: int) -> list[tuple[str, int, int]]:
        """The prompt tokens that ride along with ``decode_rows`` decode rows: (key, first, end) of each prompt."""
        budget = max(STEP_ROWS - decode_rows, MIN_PROMPT_ROWS)
        parts = []
        for key, live in self.live.items():
            if live.decoding or budget <= 0:
                continue
            end = min(len(live.sequence.request.prompt_ids), live.prompt_done + budget)
            parts.append((key, live.prompt_done, end))
            budget -= end - live.prompt_done
        return parts

    def _run_prompts(self) -> None:
        """Nothing decodes: every waiting prompt runs now, a prompt chunk an ``infer``, and takes its first token."""
        for key, live in list(self.live.items()):
            sequence = live.sequence
            try:
                logits = prefill(self.engine.infer, sequence.request.prompt_ids, sequence.slot, self.engine.options,
                                 done=live.prompt_done)
            except Exception as error:  # noqa: BLE001 - this request fails; the others go on
                logger.exception("Generation failed in the prompt of request %s", key)
                self._leave(key, "error")
                live.progress.error = error
                continue
            live.prompt_done = len(sequence.request.prompt_ids)
            self._first_token(key, live, logits)

    def _decode(self, keys: list[str], prompt_parts: list[tuple[str, int, int]]) -> None:
        """One decode step of the sequences ``keys`` and the prompt tokens ``prompt_parts``, in one ``infer``."""
        rows = [self.live[key] for key in keys]
        tokens = [live.step[0] for live in rows]
        positions = [live.step[1] for live in rows]
        slots = [live.sequence.slot for live in rows]
        last_rows = {}  # key -> the row of its prompt's last token, for a prompt that ends in this step
        for key, first, end in prompt_parts:
            sequence = self.live[key].sequence
            tokens += sequence.request.prompt_ids[first:end]
            positions += range(first, end)
            slots += [sequence.slot] * (end - first)
            if end == len(sequence.request.prompt_ids):
                last_rows[key] = len(tokens) - 1
        try:
            logits = self.engine.infer(torch.tensor(tokens).view(-1, 1), torch.tensor(positions).view(-1, 1),
                                       torch.tensor(slots), *window(self.engine.options, max(positions), len(tokens)))
        except Exception as error:  # noqa: BLE001 - the requests in this step fail; the next ones are served
            logger.exception("Generation failed in a decode step of %d rows", len(tokens))
            for key in [*keys, *(key for key, _, _ in prompt_parts)]:
                live = self.live[key]
                self._leave(key, "error")
                live.progress.error = error
            return
        now = time.perf_counter()
        for key, first, end in prompt_parts:
            self.live[key].prompt_done = end
        greedy = greedy_tokens(logits[:len(rows), -1]) if any(
            live.sequence.request.sampling.greedy for live in rows) else []
        for row, (key, live) in enumerate(zip(keys, rows)):
            sequence = live.sequence
            try:
                live.step = sequence.accept(greedy[row]) if sequence.request.sampling.greedy else sequence.take(
                    logits[row, -1])
            except Exception as error:  # noqa: BLE001 - e.g. its sampling: this request fails, the others go on
                logger.exception("Generation failed in a decode step of request %s", key)
                self._leave(key, "error")
                live.progress.error = error
                continue
            if live.step is None:
                self._leave(key, None)
                self._finish(live, now)
        for key, row in last_rows.items():
            self._first_token(key, self.live[key], logits[row, -1])

    def _first_token(self, key: str, live: Live, logits: torch.Tensor) -> None:
        """``live``'s prompt is in: its first token from the logits of the prompt's last token."""
        try:
            live.step = live.sequence.take(logits)
        except Exception as error:  # noqa: BLE001 - this request fails; the others go on
            logger.exception("Generation failed at the first token of request %s", key)
            self._leave(key, "error")
            live.progress.error = error
            return
        live.first_token_at = now = time.perf_counter()
        self.observe("TimeToFirstToken", (now - live.joined_at) * 1000, {})
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
