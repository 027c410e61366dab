"""A generation archive's requests as TorchServe's continuous batching hands them over, without a server: each
call one step, each request one reply per call, in its protocol (TorchServe's JSON, OpenAI's API and SSE)."""

import json
import threading
from pathlib import Path

import pytest

from aitune_core.backends import make_backend
from aitune_core.generate.codec import GenerateCodec
from aitune_core.generate.engine import Engine
from aitune_core.generate.prepare import prepare
from aitune_core.generate.request import parse
from aitune_core.generate.service import RUN_AHEAD_STEPS, GenerateService
from aitune_core.graph_spec import GraphSpec
from aitune_core.wire import ModelInfo, Request, openai
from models.llm_folders import make_llm_folder, make_tokenizer

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Loaded:
    """What serving.load_model gives a handler: the deployed backend, the codec, the model's name."""

    def __init__(self, prepared):
        spec, _ = GraphSpec.record(prepared.module, prepared.samples)
        self.backend = make_backend("eager").build(prepared.module, spec, prepared.samples, "cpu")
        self.codec = GenerateCodec(prepared.options, prepared.tokenizer)
        self.info = ModelInfo("llm")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tokenizer = make_tokenizer(512)
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = make_llm_folder(tmp_path_factory.mktemp("llm") / "llama", tokenizer=tokenizer)
    return prepare(Path(folder), 256, 4)


@pytest.fixture(scope="module")
def model(prepared):
    return Loaded(prepared)


def rest(body, path=None):
    headers = {"body": {"content-type": "application/json"}, "url_path": path or ""}
    return {"body": json.dumps(body).encode()}, headers


def run(service, requests, gone_after=None):
    """Call ``service.step`` as TorchServe does until every request ended: (bodies joined, replies) per id."""
    pending = dict(requests)
    bodies, replies, turn = {key: b"" for key in pending}, {key: [] for key in pending}, 0
    while pending:
        if gone_after is not None and turn == gone_after[1]:
            pending.pop(gone_after[0])
        call = [(key, *pending[key]) if not replies[key] else (key, {}, pending[key][1]) for key in pending]
        for (key, _, _), reply in zip(call, service.step(call)):
            body = reply.response.body
            bodies[key] += body.encode() if isinstance(body, str) else body
            replies[key].append(reply)
            if not reply.more:
                pending.pop(key)
        turn += 1
    return bodies, replies


def json_pieces(body):
    """The JSON objects of a TorchServe JSON stream, one after the other."""
    decoder, pieces, text = json.JSONDecoder(), [], body.decode()
    while text:
        value, end = decoder.raw_decode(text)
        pieces.append(value)
        text = text[end:]
    return pieces


def test_streams_in_each_protocol_answer_as_alone(model, prepared):
    options, tokenizer = prepared.options, prepared.tokenizer
    engine = Engine(prepared.module, tokenizer, options)
    expected = engine.generate(parse({"prompt": "The quick brown fox", "max_new_tokens": 20}, tokenizer, options))
    service = GenerateService(model)
    bodies, replies = run(service, {
        "ts": rest({"prompt": "The quick brown fox", "max_new_tokens": 20, "stream": True}),
        "whole": rest({"prompt": "The quick brown fox", "max_new_tokens": 20}),
        "sse": rest({"prompt": "The quick brown fox", "max_tokens": 20, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}}, "v1/completions"),
        "chat": rest({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                      "stream": True}, "v1/chat/completions")})
    pieces = json_pieces(bodies["ts"])
    assert "".join(piece["text"] for piece in pieces) == expected.text
    assert pieces[-1]["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.tokens)}
    assert json.loads(bodies["whole"])["text"] == expected.text  # the empty chunks before it add nothing
    assert [reply.more for reply in replies["ts"]][-2:] == [True, False]
    events = bodies["sse"].decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(event[len("data: "):]) for event in events[:-2]]
    assert "".join(choice["text"] for payload in payloads for choice in payload["choices"]) == expected.text
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == len(expected.tokens)
    assert replies["sse"][0].response.content_type == "text/event-stream"
    chat = [json.loads(event[len("data: "):]) for event in bodies["chat"].decode().split("\n\n")[:-2]]
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not service.running and len(service.batcher.free_slots) == 4


def test_only_replies_carry_no_stream_header_and_errors_keep_their_shape(model):
    service = GenerateService(model)
    bodies, replies = run(service, {"models": ({}, {"url_path": "v1/models"}),
                                    "bad": rest({"prompt": ""}),
                                    "n": rest({"prompt": "x", "n": 2}, "v1/completions"),
                                    "short": rest({"prompt": "x", "max_new_tokens": 1})})
    assert all(len(replies[key]) == 1 and replies[key][0].more is None for key in replies)
    assert json.loads(bodies["models"])["data"][0]["id"] == "llm"
    assert replies["bad"][0].response.status == 400 and "'prompt' must be a non-empty" in json.loads(bodies["bad"])[
        "error"]
    error = json.loads(bodies["n"])["error"]
    assert replies["n"][0].response.status == 400 and error["param"] == "n" and error["type"] == "invalid_request_error"
    assert json.loads(bodies["short"])["usage"]["completion_tokens"] == 1


def test_a_request_the_frontend_stops_sending_is_dropped(model):
    service = GenerateService(model)
    bodies, _ = run(service, {"gone": rest({"prompt": "x", "max_new_tokens": 50, "stream": True}),
                              "stays": rest({"prompt": "y", "max_new_tokens": 10})}, gone_after=("gone", 3))
    assert json.loads(bodies["stays"])["usage"]["completion_tokens"] <= 10
    assert not service.running and len(service.batcher.free_slots) == 4


class Recording:
    """A loaded model whose backend's infer records the thread each call ran on."""

    def __init__(self, model):
        self.codec, self.info, self.threads = model.codec, model.info, []
        infer = model.backend.infer

        def recorded(*args):
            self.threads.append(threading.current_thread().name)
            return infer(*args)

        self.backend = type("Backend", (), {"infer": staticmethod(recorded)})()


def test_steps_run_ahead_on_the_model_thread(model, prepared):
    """A lone stream's call returns the text of the steps that ran since the last one and starts the next: an idle
    worker's arrival gets its first step in its own call, an arrival beside a stream running ahead joins the step
    that starts (an empty first reply); with two sequences each call runs its step. The text is the same as alone,
    and every forward runs on the one model thread."""
    recording = Recording(model)
    service = GenerateService(recording)
    body = {"prompt": "The quick brown fox", "max_new_tokens": 12, "stream": True}
    headers = rest(body)[1]
    [first] = service.step([("a", *rest(body))])
    assert first.more and service.stepping is not None  # the next step is under way after the call returned
    a_next, b_first = service.step([("a", {}, headers), ("b", *rest(body))])
    assert b_first.more and json.loads(b_first.response.body) == {"text": ""}
    assert a_next.more and a_next.response.status == 200
    assert service.stepping is not None  # the step b joined: b does not wait a call with the model idle
    service.step([("a", {}, headers), ("b", {}, headers)])
    assert service.stepping is None  # two sequences: an arrival must not wait for a step under way
    run(service, {"a": rest(body), "b": rest(body)})
    assert not service.running and service.stepping is None and len(service.batcher.free_slots) == 4
    alone = {"prompt": "def f(a, b):", "max_new_tokens": 24, "stream": True}
    bodies, replies = run(service, {"lone": rest(alone)})
    expected = Engine(prepared.module, prepared.tokenizer, prepared.options).generate(
        parse(alone, prepared.tokenizer, prepared.options))
    pieces = json_pieces(bodies["lone"])
    assert "".join(piece["text"] for piece in pieces) == expected.text and len(replies["lone"]) > 2
    assert recording.threads and {name.split("_")[0] for name in recording.threads} == {"aitune-model"}


def test_a_lone_stream_runs_steps_ahead_until_a_call_comes(model, prepared):
    """Where the frontend's round trip is slower than a step, a lone stream's steps go on without it (at most
    RUN_AHEAD_STEPS); the next call carries the text of them all, and the stream's text is the same as alone."""
    body = {"prompt": "def f(a, b):", "max_new_tokens": 24, "stream": True}
    expected = Engine(prepared.module, prepared.tokenizer, prepared.options).generate(
        parse(body, prepared.tokenizer, prepared.options))
    service = GenerateService(model)
    replies = service.step([("a", *rest(body))])
    service.stepping.result()  # no call came: the steps ahead went on to their limit
    assert len(service.batcher.live["a"].sequence.tokens) == min(1 + RUN_AHEAD_STEPS, len(expected.tokens))
    while replies[-1].more:
        replies += service.step([("a", {}, rest(body)[1])])
    pieces = [piece for reply in replies for piece in json_pieces(reply.response.body.encode())]
    assert "".join(piece["text"] for piece in pieces) == expected.text
    assert pieces[-1]["usage"]["completion_tokens"] == len(expected.tokens)
    assert len(replies) < len(expected.tokens)  # some calls carried several steps
    assert service.stepping is None and not service.running and len(service.batcher.free_slots) == 4


def counting_run_ahead(service, key):
    """Wrap ``service._run_ahead``: each run's (interval asked, steps of ``key`` it ran) into the list returned."""
    runs, run_ahead = [], service._run_ahead

    def counted(interval):
        before = len(service.batcher.live[key].sequence.tokens)
        done = run_ahead(interval)
        after = done[key].generation.tokens if done[key].generation else service.batcher.live[key].sequence.tokens
        runs.append((interval, len(after) - before))
        return done

    service._run_ahead = counted
    return runs


@pytest.mark.parametrize("interval", [3, RUN_AHEAD_STEPS + 2])
def test_a_stream_interval_makes_each_call_carry_that_many_steps(model, prepared, interval):
    """With ``stream_interval`` N, a call waits for N steps of the lone stream once it has sent text (its first
    token, and its first text, still come at once): one round trip through the frontend for N tokens, the same
    text."""
    body = {"prompt": "def f(a, b):", "max_new_tokens": 4 * interval, "stream": True, "stream_interval": interval}
    expected = Engine(prepared.module, prepared.tokenizer, prepared.options).generate(
        parse(body, prepared.tokenizer, prepared.options))
    assert len(expected.tokens) > 2 * interval  # the tiny model does not stop early on this prompt
    service = GenerateService(model)
    runs = counting_run_ahead(service, "a")
    bodies, replies = run(service, {"a": rest(body)})
    assert "".join(piece["text"] for piece in json_pieces(bodies["a"])) == expected.text
    assert 1 + sum(steps for _, steps in runs) == len(expected.tokens)  # the first step in the first call
    assert all(steps >= asked for asked, steps in runs[:-1]) and len(replies["a"]) == 1 + len(runs)
    asked = [asked for asked, _ in runs]
    assert set(asked) <= {1, interval} and asked.count(interval) >= 2
    assert asked[:asked.index(interval)] == [1] * asked.index(interval)  # 1 until the first text went out


def test_a_call_that_changes_the_batch_stops_the_steps_ahead(model, prepared):
    """An arrival beside a lone stream with a long interval joins at the next step, not after the interval."""
    body = {"prompt": "def f(a, b):", "max_new_tokens": 120, "stream": True, "stream_interval": 64}
    service = GenerateService(model)
    runs = counting_run_ahead(service, "a")
    headers = rest(body)[1]
    service.step([("a", *rest(body))])
    while not service.running["a"].sent_text:  # a step a call until its first text went out
        service.step([("a", {}, headers)])
    service.step([("a", {}, headers), ("b", *rest({"prompt": "x", "max_new_tokens": 2, "stream": True}))])
    assert runs[-1][0] == 64 and runs[-1][1] < 32  # the run ahead that call found stopped at its next step, not 64
    run(service, {"a": rest(body), "b": rest(body)})
    assert not service.running and len(service.batcher.free_slots) == 4


def test_a_stream_interval_where_each_request_runs_alone(model, prepared):
    """Without continuous batching (the codec's own loop, TorchServe's intermediate responses), the first piece
    goes out at once and then every ``stream_interval`` pieces in one send; the last chunk carries the rest."""
    body = {"prompt": "def f(a, b):", "max_new_tokens": 20, "stream": True}
    codec = model.codec
    sent = {1: [], 4: []}
    outcomes = {interval: codec.answer(model.backend, [codec.decode(body | {"stream_interval": interval})],
                                       lambda index, value, interval=interval: sent[interval].append(value["text"]))
                for interval in sent}
    for interval in sent:
        [outcome] = outcomes[interval]
        assert "".join(sent[interval]) + outcome.output["text"] == "".join(sent[1]) + outcomes[1][0].output["text"]
    assert len(sent[1]) > 8  # a piece a token, nearly
    assert sent[4][0] == sent[1][0]  # the first piece at once
    assert sent[4][1:] == ["".join(sent[1][i:i + 4]) for i in range(1, len(sent[1]) - 3, 4)]


def test_a_step_that_fails_unexpectedly_fails_its_requests_and_the_next_are_served(model, monkeypatch):
    service = GenerateService(model)
    body = {"prompt": "x", "max_new_tokens": 4 * RUN_AHEAD_STEPS, "stream": True}
    service.step([("a", *rest(body))])
    service.stepping.result()  # let the steps under way end (the stream goes on), then break the next one
    assert "a" in service.batcher.live

    def broken(keys, prompt_parts):
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(service.batcher, "_decode", broken)
    service.step([("a", {}, rest(body)[1])])
    [reply] = service.step([("a", {}, rest(body)[1])])
    assert reply.more is False and "a bug in a step" in json.loads(reply.response.body)["error"]
    monkeypatch.undo()
    assert not service.batcher.live and len(service.batcher.free_slots) == 4
    bodies, _ = run(service, {"next": rest({"prompt": "y", "max_new_tokens": 3})})
    assert json.loads(bodies["next"])["usage"]["completion_tokens"] <= 3


def test_grpc_calls_are_answered_in_one_message(model):
    service = GenerateService(model)
    [reply] = service.step([("g", {"data": json.dumps({"prompt": "x", "max_new_tokens": 4, "stream": True})}, {})])
    assert reply.more is False and json.loads(reply.response.body)["usage"]["completion_tokens"] <= 4


def test_a_grpc_call_takes_the_slot_a_client_left_in_the_same_call(model):
    service = GenerateService(model)
    full = {f"s{index}": rest({"prompt": "x", "max_new_tokens": 50, "stream": True}) for index in range(4)}
    service.step([(key, *value) for key, value in full.items()])
    assert not service.batcher.free_slots
    replies = service.step([(key, {}, full[key][1]) for key in ("s0", "s1", "s2")] +  # s3's client left
                           [("g", {"data": json.dumps({"prompt": "y", "max_new_tokens": 3})}, {})])
    assert replies[-1].response.status == 200 and json.loads(replies[-1].response.body)["usage"]["completion_tokens"]


def test_one_bad_request_fails_alone(model, prepared):
    """A chat template that refuses the messages is a 400 for that request; the stream beside it goes on."""
    raising = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    prepared.tokenizer.chat_template, saved = raising, prepared.tokenizer.chat_template
    try:
        service = GenerateService(model)
        replies = service.step([("ok", *rest({"prompt": "x", "max_new_tokens": 5, "stream": True})),
                                ("chat", *rest({"messages": [{"role": "user", "content": "a"}]}, "v1/chat/completions"))])
    finally:
        prepared.tokenizer.chat_template = saved
    assert replies[1].response.status == 400 and "roles must alternate" in json.loads(replies[1].response.body)[
        "error"]["message"]
    assert replies[0].more and replies[0].response.status == 200
    service.stepping.result()  # the stream's next step, under way: done before the next test uses the model


@pytest.mark.parametrize("path, body, status, message", [
    ("v1/completions", {"prompt": "x", "best_of": 3}, 400, "'best_of' is supported only as 1 or null"),
    ("v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("v1/completions", {"prompt": "x", "model": "other"}, 404, "the model 'other' does not exist here"),
    ("v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "only allowed with"),
    ("v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be between 1 and"),
    ("v1/chat/completions", {"messages": []}, 400, "'messages' must be a non-empty list"),
    ("v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "a 'role' among"),
    ("v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "images and audio are not supported"),
    ("v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "'max_completion_tokens' must be between"),
    ("v1/embeddings", {"input": "x"}, 404, "unknown endpoint /v1/embeddings"),
    ("v1/completions", {"prompt": "x", "model": ["llm"]}, 400, "'model' must be a string"),
    ("v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "'temperature' must be a finite number"),
    ("v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "'presence_penalty' is supported only as 0"),
])
def test_openai_requests_refused_with_a_reason(prepared, path, body, status, message):
    request = Request({"body": json.dumps(body).encode()}, {"body": "application/json"}, {"url_path": path})
    with pytest.raises(openai.OpenAIError, match=message.replace("(", r"\(")) as raised:
        openai.read(request, prepared.tokenizer, prepared.options, "llm")
    assert raised.value.status == status


def test_openai_defaults_and_the_chat_template(prepared):
    def read(path, body):
        return openai.read(Request({"body": json.dumps(body).encode()}, {}, {"url_path": path}), prepared.tokenizer,
                           prepared.options, "llm")

    completion = read("v1/completions", {"prompt": "hello", "temperature": None, "max_tokens": None,
                                         "presence_penalty": 0.0, "frequency_penalty": 0, "n": 1, "logprobs": None})
    assert completion.request.max_new_tokens == openai.COMPLETION_MAX_TOKENS  # OpenAI's default
    assert completion.request.sampling.temperature == 1.0 and not completion.request.stream
    chat = read("v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    rendered = prepared.tokenizer("<|user|>hi\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert chat.request.prompt_ids == rendered
    assert chat.request.max_new_tokens == prepared.options.max_context - len(rendered)
    without = make_tokenizer(512)
    with pytest.raises(openai.OpenAIError, match="no chat template"):
        openai.read(Request({"body": json.dumps({"messages": [{"role": "user", "content": "x"}]})}, {},
                            {"url_path": "v1/chat/completions"}), without, prepared.options, "llm")


def test_archive_packs_continuous_batching(tmp_path, prepared):
    import zipfile

    import yaml

    from aitune_core.archive import ArchiveOptions, archive_model
    from aitune_core.errors import ArchiveError

    own = tmp_path / "model-config.yaml"
    own.write_text("jobQueueSize: 8\nresponseTimeout: 300\n")
    archive_model(ArchiveOptions(model_name="llm", hf_model=prepared.folder, backend="eager", max_batch=4,
                                 stream_interval=3, config_file=own, export_path=tmp_path))
    with zipfile.ZipFile(tmp_path / "llm.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
        assert json.loads(mar.read("aitune_manifest.json"))["request"]["stream_interval"] == 3
    assert config == {"jobQueueSize": 8, "responseTimeout": 300, "continuousBatching": True, "batchSize": 4,
                      "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 1}
    own.write_text("maxWorkers: 2\n")  # TorchServe 0.12's continuous batching stalls with two workers
    with pytest.raises(ArchiveError, match="sets maxWorkers 2: a generation archive batching continuously serves "
                                           "with one worker"):
        archive_model(ArchiveOptions(model_name="stalls", hf_model=prepared.folder, backend="eager", max_batch=4,
                                     config_file=own, export_path=tmp_path))
    assert not (tmp_path / "stalls.mar").exists()
    own.write_text("continuousBatching: false\n")  # one request at a time: nothing added
    archive_model(ArchiveOptions(model_name="plain", hf_model=prepared.folder, backend="eager", max_batch=4,
                                 config_file=own, export_path=tmp_path))
    with zipfile.ZipFile(tmp_path / "plain.mar") as mar:
        assert yaml.safe_load(mar.read("model-config.yaml")) == {"continuousBatching": False}
    own.write_text("batchSize: 16\n")
    with pytest.raises(ArchiveError, match="batchSize 16, but the KV cache holds 4 sequences"):
        archive_model(ArchiveOptions(model_name="big", hf_model=prepared.folder, backend="eager", max_batch=4,
                                     config_file=own, export_path=tmp_path))
    assert not (tmp_path / "big.mar").exists()
