"""Many streams at once through the real torchserve: its continuous batching (the handler called once a decode
step), OpenAI's API (the ``openai`` package, unmodified, and plain HTTP for the SSE framing), the per-model
generation metrics, a full queue's 503, a client leaving mid-stream, load (`make reliability`: 200 requests
at concurrency 16), and a worker killed mid-stream.

Every greedy answer is held against transformers' ``generate`` on the same folder: alone or among others.
"""

import http.client
import json
import os
import random
import signal
import threading
import time

import pytest

from aitune_core.archive import ArchiveOptions, archive_model
from integration.load import run_load, worker_rss_mb
from integration.streams import json_pieces, post_stream, sse_events
from integration.torchserve import TorchServe
from models.llm_folders import greedy, make_llm_folder

FULL = os.environ.get("AITUNE_LOAD") == "full"
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LONG = 900  # tokens a stream of the kill test asks for: long enough to be cut
PROMPTS = ["x", "def main(argv):\n    ", "import os\nimport sys\n\n" * 3, "The quick brown fox jumps over",
           "class Point:\n    def __init__(self, x, y):\n", "1, 2, 3, 4, 5, 6,", "a b c d e f g", "for i in range("]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = make_llm_folder(tmp_path_factory.mktemp("llm") / "llama", context=1024)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, folder):
    store = tmp_path_factory.mktemp("streams_store")
    archive_model(ArchiveOptions(model_name="chat", hf_model=folder, backend="eager", export_path=store))
    tight = tmp_path_factory.mktemp("tight") / "model-config.yaml"
    tight.write_text("jobQueueSize: 1\n")
    archive_model(ArchiveOptions(model_name="tight", hf_model=folder, backend="eager", max_batch=1,
                                 config_file=tight, export_path=store))
    instance = TorchServe(tmp_path_factory.mktemp("streams_torchserve"), store, {"chat": "chat.mar",
                                                                                 "tight": "tight.mar"})
    with instance.serving(timeout=300):
        yield instance


@pytest.fixture(scope="module")
def long_prompts(reference):
    """Prompts the test model continues for LONG tokens without an end-of-sequence token."""
    long = [prompt for prompt in PROMPTS if generate(reference, prompt, LONG)[1] == LONG]
    assert long, "no prompt of the test model decodes LONG tokens without an end-of-sequence token"
    return long


def generate(reference, prompt, max_new_tokens, ids=None):
    """transformers' greedy text and token count for ``prompt`` (or its ``ids``)."""
    _, tokens, text = greedy(reference, prompt, max_new_tokens, ids)
    return text, len(tokens)


def openai_client(server, model="chat"):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.inference_port}/predictions/{model}/1.0/v1",
                         api_key=server.key("inference"), max_retries=0, timeout=120)


def test_streams_decoded_together_answer_as_alone(server, reference):
    """Eight streams sent at once (TorchServe's JSON and OpenAI's SSE): each the text transformers gives alone,
    and every one under way before the first ends (they were decoded together, not in turn)."""
    lengths = [40, 33, 48, 36, 44, 30, 38, 42]
    expected = [generate(reference, prompt, length) for prompt, length in zip(PROMPTS, lengths)]
    results = [None] * len(PROMPTS)

    def one(index):
        body = {"prompt": PROMPTS[index], "max_tokens" if index % 2 else "max_new_tokens": lengths[index],
                "stream": True, "temperature": 0}
        path = "/predictions/chat/1.0/v1/completions" if index % 2 else "/predictions/chat"
        results[index] = post_stream(server, path, body)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for index, (status, content_type, chunks) in enumerate(results):
        assert status == 200, chunks
        if index % 2:
            assert content_type.startswith("text/event-stream")
            events = sse_events(chunks)
            assert events[-1] == "[DONE]"
            payloads = [json.loads(event) for event in events[:-1]]
            text = "".join(payload["choices"][0]["text"] for payload in payloads)
            finish = payloads[-1]["choices"][0]["finish_reason"]
        else:
            values = json_pieces(chunks)
            text = "".join(value["text"] for value in values)
            finish = values[-1]["finish_reason"]
        assert text == expected[index][0], index
        assert finish == ("length" if expected[index][1] == lengths[index] else "stop")
    first_end = min(chunks[-1][1] for _, _, chunks in results)
    assert all(chunks[0][1] < first_end for _, _, chunks in results), "a request waited for another to finish"
    assert "continuous batching of up to 8 sequences" in server.model_log()


def test_openai_client_completions_chat_and_models(server, reference):
    import openai

    client = openai_client(server)
    prompt = PROMPTS[3]
    text, count = generate(reference, prompt, 24)
    completion = client.completions.create(model="chat", prompt=prompt, max_tokens=24, temperature=0)
    assert completion.choices[0].text == text and completion.object == "text_completion"
    assert completion.usage.completion_tokens == count and completion.usage.total_tokens == (
        completion.usage.prompt_tokens + count)
    pieces, usage = [], None
    for chunk in client.completions.create(model="chat", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        pieces += [choice.text for choice in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == text and usage.completion_tokens == count

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    chat_ids = reference[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_text, chat_count = generate(reference, None, 20, ids=reference[1](chat_ids, add_special_tokens=False)[
        "input_ids"])
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0, seed=1)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == chat_text
    assert answer.usage.completion_tokens == chat_count
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(
        model="chat", messages=messages, max_tokens=20, temperature=0, stream=True)]
    assert deltas[0].role == "assistant" and "".join(delta.content or "" for delta in deltas) == chat_text

    assert [model.id for model in client.models.list()] == ["chat"]
    with pytest.raises(openai.BadRequestError, match="'n' is supported only as 1"):
        client.completions.create(model="chat", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be between 1 and"):
        client.completions.create(model="chat", prompt="x", max_tokens=100000)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.completions.create(model="gpt-4o", prompt="x")
    seeded = [client.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0.9, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_sse_framing_and_openai_errors_over_plain_http(server):
    status, content_type, chunks = post_stream(server, "/predictions/chat/1.0/v1/chat/completions",
                                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = sse_events(chunks)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    assert {payload["object"] for payload in payloads} == {"chat.completion.chunk"}
    assert len({payload["id"] for payload in payloads}) == 1
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] <= 5
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    for body, status_expected, param in (({"prompt": "x", "stream": "yes"}, 400, "stream"),
                                         ({"prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias"),
                                         ({"prompt": ""}, 400, "prompt"),
                                         ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate")):
        status, _, chunks = post_stream(server, "/predictions/chat/1.0/v1/completions", body)
        error = json.loads(b"".join(data for data, _ in chunks))["error"]
        assert status == status_expected and error["param"] == param and error["type"] == "invalid_request_error"
    status, _, chunks = post_stream(server, "/predictions/chat/1.0/v1/embeddings", {"input": "x"})
    assert status == 404 and "unknown endpoint /v1/embeddings" in json.loads(b"".join(d for d, _ in chunks))[
        "error"]["message"]


def test_a_full_queue_answers_503_and_the_running_stream_finishes(server, long_prompts):
    """tight: one sequence decoding, one request waiting in the frontend's queue (jobQueueSize: 1): a third
    request gets a 503 saying so; the other two are answered in full."""
    first = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=120)
    first.request("POST", "/predictions/tight", json.dumps({"prompt": long_prompts[0], "max_new_tokens": LONG,
                                                            "stream": True}),
                  {**server.auth_header("inference"), "Content-Type": "application/json"})
    response = first.getresponse()
    body = response.read1(65536)  # under way
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(answer=server.predict(
        "tight", json.dumps({"prompt": "y", "max_new_tokens": 2}))))
    thread.start()
    deadline, status = time.monotonic() + 30, None
    while time.monotonic() < deadline and status != 503:
        time.sleep(0.1)
        status, answer = server.predict("tight", json.dumps({"prompt": "z", "max_new_tokens": 2}))
    while data := response.read1(65536):
        body += data
    first.close()
    thread.join(timeout=120)
    assert status == 503, answer
    print(f"a full queue: {status} {answer}")
    assert response.status == 200 and json_pieces([(body, 0)])[-1]["usage"]["completion_tokens"] == LONG
    assert waiting["answer"][0] == 200 and waiting["answer"][1]["usage"]["completion_tokens"] >= 1


def test_a_client_gone_mid_stream_frees_its_sequence(server, long_prompts):
    """tight has one cache slot: a client that leaves a long stream frees it at the next step, so the next
    request is answered at once (TorchServe drops the job of a closed connection; the worker sees it gone)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=120)
    connection.request("POST", "/predictions/tight", json.dumps({"prompt": long_prompts[0], "max_new_tokens": LONG,
                                                                 "stream": True}),
                       {**server.auth_header("inference"), "Content-Type": "application/json"})
    connection.getresponse().read1(65536)
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    started = time.monotonic()
    status, answer = server.predict("tight", json.dumps({"prompt": "y", "max_new_tokens": 2}))
    waited = time.monotonic() - started
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    assert 'Reason="client_gone"' in "".join(line for line in server.metrics().splitlines()
                                            if line.startswith("RequestsFinished") and 'ModelName="tight"' in line)
    print(f"after a client left mid-stream, the next request was answered in {waited:.2f} s")


def test_generation_metrics_on_the_metrics_port(server):
    server.predict("chat", json.dumps({"prompt": "x", "max_new_tokens": 3}))
    lines = [line for line in server.metrics().splitlines() if 'ModelName="chat"' in line]
    names = {line.split("{")[0] for line in lines}
    for name in ("TimeToFirstToken_count", "TimeBetweenTokens_sum", "GeneratedTokens", "PromptTokens",
                 "LiveSequences", "RequestsFinished"):
        assert name in names, sorted(names)
    finished = {line.split('Reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in lines if line.startswith("RequestsFinished")}
    assert finished.get("length", 0) >= 1
    generated = sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("GeneratedTokens"))
    assert generated >= 3


def test_load_many_streams_every_answer_as_alone(server, reference):
    """Random prompts and lengths, streamed and not, from 16 clients: every answer equal to its solo greedy
    answer, no error, worker RSS flat. `make test`: 48 requests; `make reliability`: 200."""
    rng = random.Random(0)
    cases = []
    for index in range(32):
        prompt = " ".join(rng.choice(["alpha", "beta", "x", "def", "(", "1", "return", "\n"])
                          for _ in range(rng.randint(1, 40)))
        length = rng.randint(1, 48)
        cases.append((prompt, length, index % 2 == 0, generate(reference, prompt, length)[0]))
    bodies = [json.dumps({"prompt": prompt, "max_new_tokens": length, "stream": streamed}).encode()
              for prompt, length, streamed, _ in cases]
    expected = {body: text for body, (_, _, _, text) in zip(bodies, cases)}

    def check(index, status, body):
        if status != 200:
            return f"request {index}: {status} {body[:200]!r}"
        text = "".join(value["text"] for value in json_pieces([(body, 0)]))
        wanted = expected[bodies[index % len(bodies)]]
        return None if text == wanted else f"request {index}: {text!r} != {wanted!r}"

    total = 200 if FULL else 48
    run_load(server, "chat", bodies, concurrency=16, total=16, check=check)  # warm: the allocator's first peaks
    rss_before = worker_rss_mb(server, "chat")
    result = run_load(server, "chat", bodies, concurrency=16, total=total, check=check)
    rss_after = worker_rss_mb(server, "chat")
    assert not result.failures, result.failures[:5]
    growth = rss_after / rss_before - 1
    print(f"{total} requests at concurrency 16: {result.figures()}; worker RSS {rss_before:.0f} -> "
          f"{rss_after:.0f} MB ({growth:+.1%})")
    assert abs(growth) <= 0.05


def test_a_worker_killed_mid_stream_ends_every_stream_and_comes_back(server, long_prompts):
    """kill -9 while four long streams decode: each ends (an error or a closed connection, no hang), a new worker
    is READY and answers. Last in this file: it replaces the chat worker."""
    long = (long_prompts * 4)[:4]
    [pid] = server.worker_pids("chat")
    outcomes, under_way = [None] * len(long), [threading.Event() for _ in long]

    def one(index):
        connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=90)
        try:
            connection.request("POST", "/predictions/chat", json.dumps(
                {"prompt": long[index], "stream": True, "max_new_tokens": LONG}),
                {**server.auth_header("inference"), "Content-Type": "application/json"})
            response = connection.getresponse()
            body = b""
            while data := response.read1(65536):
                body += data
                under_way[index].set()
            outcomes[index] = (response.status, body)
        except (OSError, http.client.HTTPException) as error:
            outcomes[index] = error
        finally:
            under_way[index].set()
            connection.close()

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(long))]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in under_way)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a stream hung after its worker died"
    ended_s = time.monotonic() - killed
    cut = [outcome for outcome in outcomes if not (isinstance(outcome, tuple) and outcome[0] == 200 and
                                                   "finish_reason" in json_pieces([(outcome[1], 0)])[-1])]
    assert cut, "every stream finished before the kill: nothing was tested"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.worker_pids("chat") in ([], [pid]):
        time.sleep(0.5)
    back_s = time.monotonic() - killed
    assert server.worker_pids("chat") not in ([], [pid])
    status, answer = server.predict("chat", json.dumps({"prompt": "x", "max_new_tokens": 3}))
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    assert server.request(server.inference_port, "GET", "/ping", headers=server.auth_header("inference"))[0] == 200
    print(f"kill -9 mid-stream: {len(cut)} of {len(long)} streams cut, all ended {ended_s:.1f} s after the kill, "
          f"answering again after {back_s:.1f} s; "
          f"outcomes {[type(o).__name__ if not isinstance(o, tuple) else o[0] for o in outcomes]}")
