"""Text generation served by the real torchserve: a small Llama folder made in the test, archived from the folder.

The fp32 eager archive, greedy, answers token for token what transformers' ``generate(do_sample=False)``
gives on the same folder, for prompts of 2 to ~300 tokens and up to 64 new tokens, streamed (chunked
HTTP and gRPC ``StreamPredictions``) and not; an int8wo archive compiled at archive time (its KV cache
inside the AOTInductor package) serves too, and so does one of this project's CPU kernels (weight-only),
as it answers in one process. Bad input gets a 400 naming the field.
"""

import http.client
import json
import time

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from integration.torchserve import TorchServe
from models.llm_folders import greedy, make_llm_folder

PROMPTS = ["x", "def main(argv):\n    ", "import os\nimport sys\n\n" * 3,
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n" * 5]
CONTEXT = 512
MODELS = ("gen_eager", "gen_int8", "gen_w8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_llm_folder(tmp_path_factory.mktemp("llm") / "llama", context=CONTEXT)


@pytest.fixture(scope="module")
def gen_server(tmp_path_factory, folder):
    store = tmp_path_factory.mktemp("gen_store")
    archive_model(ArchiveOptions(model_name="gen_eager", hf_model=folder, backend="eager", export_path=store))
    archive_model(ArchiveOptions(model_name="gen_int8", hf_model=folder, quantization="int8wo", compile=True,
                                 export_path=store))
    one_at_a_time = tmp_path_factory.mktemp("config") / "model-config.yaml"
    one_at_a_time.write_text("continuousBatching: false\n")  # the handler's plain path: one request at a time
    archive_model(ArchiveOptions(model_name="gen_w8", hf_model=folder, backend="weight-only", quantization="int8wo",
                                 compile=True, export_path=store, config_file=one_at_a_time))
    instance = TorchServe(tmp_path_factory.mktemp("gen_torchserve"), store,
                          {name: f"{name}.mar" for name in MODELS})
    with instance.serving(timeout=300):
        yield instance


def ask(server, model, body):
    status, answer = server.predict(model, json.dumps(body))
    assert status == 200, answer
    return answer


def stream(server, model, body):
    """POST with ``stream: true``; each chunk's JSON and the seconds after sending it arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=120)
    started = time.perf_counter()
    connection.request("POST", f"/predictions/{model}", json.dumps({**body, "stream": True}),
                       {**server.auth_header("inference"), "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    chunks, buffer, decoder = [], b"", json.JSONDecoder()
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        text = buffer.decode("utf-8")  # a chunk never ends inside a character
        while text.strip():
            value, end = decoder.raw_decode(text.lstrip())
            chunks.append((value, time.perf_counter() - started))
            text = text.lstrip()[end:]
        buffer = b""
    connection.close()
    return chunks


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(gen_server, reference, prompt):
    prompt_tokens, tokens, text = greedy(reference, prompt, 64)
    answer = ask(gen_server, "gen_eager", {"prompt": prompt, "max_new_tokens": 64})
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
    assert answer["text"] == text
    assert answer["finish_reason"] == ("stop" if tokens[-1] == reference[1].eos_token_id else "length")
    chunks = stream(gen_server, "gen_eager", {"prompt": prompt, "max_new_tokens": 64})
    assert len(chunks) > 2 and all(set(value) == {"text"} for value, _ in chunks[:-1])
    assert "".join(value["text"] for value, _ in chunks) == text
    assert chunks[-1][0]["finish_reason"] == answer["finish_reason"] and chunks[-1][0]["usage"] == answer["usage"]
    assert chunks[0][1] < chunks[-1][1]  # pieces arrive as they are decoded, not all at the end


def test_a_long_prompt_in_chunks(gen_server, reference):
    prompt = "x = [1, 2, 3]\n" * 23  # ~300 tokens: three prefill chunks of 128
    prompt_tokens, tokens, text = greedy(reference, prompt, 16)
    assert 256 < prompt_tokens < CONTEXT - 16
    assert ask(gen_server, "gen_eager", {"prompt": prompt, "max_new_tokens": 16})["text"] == text


def test_compiled_int8wo_archive_serves_in_chunks_and_steps(gen_server):
    body = {"prompt": PROMPTS[3], "max_new_tokens": 40}
    answer = ask(gen_server, "gen_int8", body)
    assert answer["usage"]["completion_tokens"] == 40 or answer["finish_reason"] == "stop"
    assert ask(gen_server, "gen_int8", body) == answer  # greedy is deterministic
    assert "AOTInductor package loaded" in gen_server.model_log()


def test_our_cpu_kernels_serve_as_they_answer_in_process(gen_server, tmp_path):
    """The weight-only backend's custom ops inside an AOTInductor package, in a worker: the build of the kernels the
    archive carries for the best level this CPU runs (the ready line says so), the answer the same archive gives in
    one process."""
    import zipfile

    from aitune_core.generate.engine import Engine
    from aitune_core.generate.request import parse
    from aitune_core.serving import load_model

    body = {"prompt": PROMPTS[2], "max_new_tokens": 24}
    answer = ask(gen_server, "gen_w8", body)
    with zipfile.ZipFile(gen_server.model_store / "gen_w8.mar") as mar:
        mar.extractall(tmp_path / "gen_w8")
    model = load_model(tmp_path / "gen_w8", torch.device("cpu"))
    engine = Engine(model.backend.infer, model.codec.tokenizer, model.codec.options)
    assert engine.generate(parse(body, model.codec.tokenizer, model.codec.options)).text == answer["text"]
    ready = [line for line in gen_server.model_log().splitlines() if "model gen_w8 ready" in line]
    from aitune_core.kernels.build import levels_here

    best = levels_here()[0].name
    assert ready and f"CPU kernels: aitune CPU kernels, {best} build" in ready[0], ready
    assert "shipped in the archive" in ready[0], ready


def test_seeded_sampling_repeats_and_stop_strings_are_never_sent(gen_server):
    body = {"prompt": PROMPTS[1], "max_new_tokens": 48, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    first = ask(gen_server, "gen_eager", body)
    assert ask(gen_server, "gen_eager", body) == first
    assert ask(gen_server, "gen_eager", {**body, "seed": 8})["text"] != first["text"]
    greedy = ask(gen_server, "gen_eager", {"prompt": PROMPTS[1], "max_new_tokens": 48})["text"]
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    stopped = ask(gen_server, "gen_eager", {"prompt": PROMPTS[1], "max_new_tokens": 48, "stop": [stop]})
    assert stopped["finish_reason"] == "stop" and stopped["text"] == greedy[:greedy.index(stop)]
    chunks = stream(gen_server, "gen_eager", {"prompt": PROMPTS[1], "max_new_tokens": 48, "stop": stop})
    assert "".join(value["text"] for value, _ in chunks) == stopped["text"]


@pytest.mark.parametrize("model", ["gen_eager", "gen_w8"])
def test_grpc_stream_predictions(gen_server, stubs, reference, model):
    """gRPC StreamPredictions streams where TorchServe runs the model one request at a time (gen_w8); under its
    continuous batching (gen_eager) the whole answer comes in one message (see generate/service.py)."""
    import grpc

    _, _, text = greedy(reference, PROMPTS[2], 32)
    if model == "gen_w8":  # the quantized archive's own greedy text, as it answers over REST
        text = ask(gen_server, model, {"prompt": PROMPTS[2], "max_new_tokens": 32})["text"]
    channel = grpc.insecure_channel(f"127.0.0.1:{gen_server.grpc_port}")
    stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    request = stubs.inference_pb2.PredictionsRequest(
        model_name=model, input={"data": json.dumps({"prompt": PROMPTS[2], "max_new_tokens": 32,
                                                     "stream": True}).encode()})
    metadata = [("authorization", f"Bearer {gen_server.key('inference')}")]
    pieces = [json.loads(reply.prediction) for reply in stub.StreamPredictions(request, metadata=metadata, timeout=120)]
    assert len(pieces) > 2 if model == "gen_w8" else len(pieces) == 1
    assert "".join(piece["text"] for piece in pieces) == text
    assert pieces[-1]["usage"]["completion_tokens"] == 32 or pieces[-1]["finish_reason"] == "stop"
    unary = stub.Predictions(stubs.inference_pb2.PredictionsRequest(
        model_name=model, input={"data": json.dumps({"prompt": PROMPTS[2], "max_new_tokens": 32}).encode()}),
        metadata=metadata, timeout=120)
    assert json.loads(unary.prediction)["text"] == text, unary.prediction
    channel.close()


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": 3}, "'prompt' must be a non-empty string, got 3"),
    ({"text": "hi"}, "unknown key(s) 'text'"),
    ({"prompt": PROMPTS[3] * 10}, f"the archive's context holds {CONTEXT} tokens"),
    ({"prompt": "hi", "max_new_tokens": 0}, "'max_new_tokens' must be between 1 and"),
    ({"prompt": "hi", "max_new_tokens": CONTEXT}, "'max_new_tokens' must be between 1 and"),
    ({"prompt": "hi", "temperature": -1}, "'temperature' must be >= 0"),
    ({"prompt": "hi", "top_p": 0}, "'top_p' must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "'top_p' must be in (0, 1]"),
    ({"prompt": "hi", "top_k": -1}, "'top_k' must be >= 0"),
    ({"prompt": "hi", "stop": [""]}, "'stop' must be a non-empty string or a list of them"),
    ({"prompt": "hi", "stream": "yes"}, "'stream' must be true or false"),
])
def test_bad_requests_get_a_400_naming_the_field(gen_server, body, message):
    pids = gen_server.worker_pids("gen_eager")
    status, answer = gen_server.predict("gen_eager", json.dumps(body))
    assert status == 400 and message in answer["error"], answer
    assert gen_server.worker_pids("gen_eager") == pids
    assert ask(gen_server, "gen_eager", {"prompt": "still", "max_new_tokens": 2})["usage"]["completion_tokens"] >= 1
