"""A text-generation archive under TorchServe's continuous batching: the handler is called once per decode step.

With ``continuousBatching: true`` in the model-config (what aitune-archive packs for generation), TorchServe's
frontend keeps up to ``batchSize`` requests in the worker and calls ``handle`` again and again with all of
them: the ones that just arrived carry their body, the ones still running come back empty. Every request gets
one reply per call: the text of a step (``more``: the frontend sends it as a chunk and calls again) or its end.
A request the frontend no longer sends lost its client (the frontend drops a job whose connection closed) and
frees its sequence. A worker that dies fails every request it held (the frontend answers them), and the rest
wait in the frontend's job queue (``jobQueueSize``; full: 503).

The model runs on a thread of its own, and a lone stream's steps run ahead of the calls: a call collects the
steps that ran since the last one (their text is this call's replies), joins the arrivals and drops the clients
gone (``Batcher.join``), starts the next steps (``Batcher.advance``, again and again until the next call comes,
at most ``RUN_AHEAD_STEPS``) and returns at once. So the model computes while TorchServe carries the replies out
and brings the next call in, and never waits for it: where the round trip is slower than a step (on 2 cores
the frontend waits for CPU behind the step), a call carries the text of two steps or more. A call that finds no
step run since the last one (more sequences than ``RUN_AHEAD_LIVE``, or an idle worker's arrivals) runs its step
before it answers. An arrival beside a stream that runs ahead joins the step that starts, so its first reply is
empty; a client that went away had the steps ahead computed for nothing.

One worker a model (the archive packs ``minWorkers: 1``, ``maxWorkers: 1``; ``claim_engine`` refuses a second):
TorchServe 0.12's continuous batching stalls a model's streams when it has two workers (archive.continuous_batching).

A request keeps its protocol: TorchServe's JSON, OpenAI's API (by its URL, ``wire/openai``). A request that
is not streamed gets empty chunks until its answer. A gRPC call is run to its end alone in its step and
answered in one message: TorchServe 0.12 ends a ``Predictions`` call at its first reply, and its
``GRPCJob.isOpen()`` returns ``isCancelled()``, so continuous batching drops an open ``StreamPredictions``
after its first chunk (a model-config with ``continuousBatching: false`` streams gRPC, one request at a time).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import logging
import threading
from pathlib import Path
from typing import IO, Any

from aitune_core.codecs import Outcome
from aitune_core.errors import AITuneError, BadRequestError
from aitune_core.generate.batcher import Batcher, BusyError, Observe, Progress
from aitune_core.generate.engine import Engine
from aitune_core.generate.request import GenerateRequest
from aitune_core.wire import Call, Request, Response, compact_json, error_for, openai, read_request

logger = logging.getLogger(__name__)
# The next step runs ahead of the call while this many sequences decode, at most: a lone stream gains the round
# trip on each token (~2 ms on an ~8 ms step), and an arrival waits for the step under way before it joins, which
# with more sequences is a longer step (measured, 7 streams: first token 1.8x -> 2.8x idle plus one step).
RUN_AHEAD_LIVE = 1
# A lone stream's steps run at most this many ahead of the call that collects them: its text waits no longer
# than that in the worker, and a client gone costs no more.
RUN_AHEAD_STEPS = 8


@dataclasses.dataclass
class Reply:
    """One request's reply to one call: a ``Response``, and whether more follow (TorchServe's ``ts_stream_next``:
    True; False for the last of several; None for a request's only reply, which the frontend must get without
    the header: it takes a first reply that says ``false`` for a chunk and never answers)."""

    response: Response
    more: bool | None = None


@dataclasses.dataclass
class Running:
    """A request in the batch and how its protocol writes each step."""

    request: Request
    call: Call | openai.OpenAICall
    stream: bool
    replied: bool = False  # a first reply went out: the status and content type are sent
    sent_text: bool = False  # some text went out: from then on its stream_interval holds its replies back

    @property
    def interval(self) -> int:
        """Steps its next reply waits for: its ``stream_interval`` once a stream has sent text (the first text
        goes out at once, even after tokens that made none), else 1."""
        return self.generate_request.stream_interval if self.stream and self.sent_text else 1

    @property
    def generate_request(self) -> GenerateRequest:
        return self.call.request if isinstance(self.call, openai.OpenAICall) else self.call.inputs

    def reply(self, progress: Progress, model: Any) -> Reply:
        first, self.replied = not self.replied, True
        self.sent_text = self.sent_text or bool(progress.text)
        reply = self._openai(progress, first) if isinstance(self.call, openai.OpenAICall) else self._json(
            progress, first, model)
        if reply.more is None and (not first or self.request.is_grpc):  # gRPC's stream reads the header always
            reply.more = False
        return reply

    def _json(self, progress: Progress, first: bool, model: Any) -> Reply:
        codec, info = model.codec, model.info
        if progress.error is not None:
            status, message = _failure(progress.error)
            if first or not self.stream:
                return Reply(self.call.encode(Outcome.failed(status, message), self.call, codec, info))
            return Reply(Response(200, compact_json({"text": "", "error": message}), error=message))
        generation = progress.generation
        if generation is None:
            return Reply(Response(200, compact_json({"text": progress.text}) if self.stream else b""), more=True)
        output = generation.last_chunk(progress.text) if self.stream else generation
        return Reply(self.call.encode(Outcome(200, output), self.call, codec, info))

    def _openai(self, progress: Progress, first: bool) -> Reply:
        call = self.call
        if progress.error is not None:
            status, message = _failure(progress.error)
            if first or not self.stream:
                return Reply(openai.error_response(status, message))
            return Reply(Response(200, call.failed(status, message) + openai.DONE, openai.SSE_CONTENT_TYPE))
        if not self.stream:
            done = progress.generation is not None
            return Reply(call.answer(progress.generation) if done else Response(200, b""), more=not done)
        events = (call.opening() if first else []) + ([call.piece(progress.text)] if progress.text else [])
        if progress.generation is None:
            return Reply(Response(200, "".join(events), openai.SSE_CONTENT_TYPE), more=True)
        events += [*call.closing(progress.generation), openai.DONE]
        return Reply(Response(200, "".join(events), openai.SSE_CONTENT_TYPE))


def merged(first: Progress, then: Progress) -> Progress:
    """What a request did in two turns, one after the other."""
    return Progress(first.text + then.text, then.generation, then.error)


def _failure(error: BaseException) -> tuple[int, str]:
    if isinstance(error, BusyError):
        return 503, str(error)
    return 500, f"generation failed: {type(error).__name__}: {error}"


class GenerateService:
    """One ``Batcher`` on the loaded model's backend; ``step`` answers one call of TorchServe's continuous batching.

    ``name``: the model's name in TorchServe (what OpenAI's ``model`` must say), the archive's by default.
    """

    def __init__(self, model: Any, observe: Observe | None = None, name: str | None = None,
                 model_thread: concurrent.futures.Executor | None = None) -> None:
        self.model = model
        self.name = name or model.info.name
        codec = model.codec
        # The batcher observes on the model thread too: what it reports waits here for the calls' thread, the one
        # TorchServe's metrics belong to.
        self.observed: list[tuple[str, float, dict[str, str]]] = []
        self.observe = observe or (lambda name, value, dimensions: None)
        self.batcher = Batcher(Engine(model.backend.infer, codec.tokenizer, codec.options), codec.options.max_batch,
                               lambda *observation: self.observed.append(observation))
        self.running: dict[str, Running] = {}
        self.stepping: concurrent.futures.Future | None = None
        # Set by a call: the steps running ahead stop at the next one, once the stream's interval ran; at once
        # where the call changes the batch (an arrival joins sooner, a client gone costs no more steps).
        self.call_waiting = threading.Event()
        self.call_changes = threading.Event()
        # Every step runs on this one thread; so should everything else that runs the model (the handler loads it
        # there): torch's OpenMP keeps a team of threads for each thread that runs it, and with more threads than
        # cores it stops spinning between parallel regions (measured: a 254M decode step 8 -> 24 ms once a
        # second thread had run the model).
        self.model_thread = model_thread or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aitune-model")

    def step(self, requests: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> list[Reply]:
        """``(request id, parameters, headers)`` of every request of the call (a running one has no parameters)
        -> each one's reply, in order."""
        ran_ahead = self.stepping is not None
        ids = {request_id for request_id, _, _ in requests}
        if ids != set(self.running):  # an arrival, or a client gone: the steps ahead stop at the next one
            self.call_changes.set()
        self.call_waiting.set()
        stepped = self._collect(self.stepping) if ran_ahead else None
        replies: dict[str, Reply] = {}
        arrivals, continuing, alone = {}, [], {}
        for request_id, parameters, headers in requests:
            if request_id in self.running:
                continuing.append(request_id)
                continue
            request = Request.from_torchserve(parameters, headers)
            started = self._start(request)
            if isinstance(started, Reply):
                started.more = False if request.is_grpc else None
                replies[request_id] = started
            elif request.is_grpc:
                alone[request_id] = started
            else:
                self.running[request_id] = started
                arrivals[request_id] = started.generate_request
        for request_id in [key for key in self.running if key not in arrivals and key not in continuing]:
            del self.running[request_id]  # its client went away: join frees its sequence
        live_before = len(self.batcher.live)
        progress = self.batcher.join(arrivals, [key for key in continuing if not (
            stepped and key in stepped and stepped[key].finished)])
        if stepped is None:  # no step ran since the last call (an idle worker's arrivals): this call's runs now
            stepped = self._collect(self.model_thread.submit(self.batcher.advance)) if self.batcher.live else {}
        for request_id in [*continuing, *arrivals]:
            done = progress.get(request_id) or stepped.get(request_id) or Progress()
            replies[request_id] = self.running[request_id].reply(done, self.model)
            if done.finished:
                del self.running[request_id]
        for request_id, started in alone.items():  # after join, which freed the slots of clients gone
            alone_progress = self.model_thread.submit(self.batcher.run_alone, started.generate_request).result()
            replies[request_id] = started.reply(alone_progress, self.model)
        # A lone stream's next step runs ahead; so does the one after a step that ran ahead, which the arrivals of
        # this call joined (else they would wait a call for a step with the model idle).
        if self.batcher.live and (len(self.batcher.live) <= RUN_AHEAD_LIVE or (
                ran_ahead and live_before <= RUN_AHEAD_LIVE)):
            self.call_waiting.clear()
            self.call_changes.clear()
            interval = min((self.running[key].interval for key in self.batcher.live if key in self.running),
                           default=1)
            self.stepping = self.model_thread.submit(self._run_ahead, interval)
        self._report()
        return [replies[request_id] for request_id, _, _ in requests]

    def _run_ahead(self, interval: int) -> dict[str, Progress]:
        """On the model thread: a step, then more while a lone stream decodes, until a call has come and
        ``interval`` steps ran (at most ``RUN_AHEAD_STEPS``, or ``interval`` where that is more); what each request
        did in them all. A call waits for its ``interval`` steps (one round trip through the frontend for them),
        unless it changes the batch."""
        done = self.batcher.advance()
        for steps in range(1, max(RUN_AHEAD_STEPS, interval)):
            if (self.call_changes.is_set() or (self.call_waiting.is_set() and steps >= interval)
                    or not 0 < len(self.batcher.live) <= RUN_AHEAD_LIVE):
                break
            for key, progress in self.batcher.advance().items():
                done[key] = merged(done[key], progress) if key in done else progress
        return done

    def _collect(self, stepping: concurrent.futures.Future) -> dict[str, Progress]:
        """What the step ``stepping`` did, once it is done (a step that fails fails its own requests)."""
        self.stepping = None
        try:
            return stepping.result()
        finally:
            self._report()

    def _report(self) -> None:
        while self.observed:
            self.observe(*self.observed.pop(0))

    def _start(self, request: Request) -> Running | Reply:
        """A new request decoded in its protocol, or its reply at once (a bad request, ``/v1/models``)."""
        codec = self.model.codec
        is_openai = openai.is_openai(request)
        try:
            if not is_openai:
                call = read_request(request, codec)
                return Running(request, call, call.inputs.stream)
            call = openai.read(request, codec.tokenizer, codec.options, self.name)
            return Reply(call) if isinstance(call, Response) else Running(request, call, call.request.stream)
        except openai.OpenAIError as error:
            return Reply(openai.error_response(error.status, str(error), error.param, error.code))
        except BadRequestError as error:
            return Reply(openai.error_response(400, str(error)) if is_openai else
                         error_for(request, 400, str(error), self.model.info))
        except Exception as error:  # noqa: BLE001 - this request fails alone; the batch goes on
            logger.exception("A generation request could not be read")
            message = f"the request could not be read: {type(error).__name__}: {error}"
            return Reply(openai.error_response(500, message) if is_openai else
                         error_for(request, 500, message, self.model.info))


ENGINE_LOCK = ".aitune-engine.lock"


class EngineTakenError(AITuneError):
    """Another worker of the model already runs its continuous-batching engine."""


def claim_engine(model_dir: Path | str, model_name: str) -> IO[bytes]:
    """Make this worker the one that batches the model's requests continuously; keep the returned file open for the
    worker's life. EngineTakenError where another worker of the model (its workers share ``model_dir``) holds it.

    TorchServe 0.12's continuous batching stalls a model's streams when it has two workers (archive.continuous_batching
    says why), so a second one (a scale-up) must not start; an ``flock``, which the OS releases when its holder dies,
    lets the worker TorchServe starts after a crash take over.
    """
    handle = open(Path(model_dir) / ENGINE_LOCK, "a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EngineTakenError(
            f"model {model_name} already has its one worker: a generation archive batching continuously decodes all "
            f"its streams in one worker (TorchServe 0.12 stalls them with two), so this one does not start; scale back "
            f"with PUT /models/{model_name}?min_worker=1&max_worker=1, or archive with continuousBatching: false for "
            "several workers") from None
    return handle


def is_continuous(model_config: dict[str, Any] | None) -> bool:
    """Whether TorchServe batches this model continuously (``continuousBatching: true`` in its model-config)."""
    return bool((model_config or {}).get("continuousBatching"))

