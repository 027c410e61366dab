"""A machine that never saw the project, through the real torchserve: empty caches (HOME, TORCH_EXTENSIONS_DIR,
inductor's and this project's cache folders all new), no compiler (CXX and CC are /bin/false), TorchServe's own
worker defaults (no default_workers_per_model).

Two generation archives of one small Llama folder on one server: ``chat`` batches continuously (one worker, the
archive pins it) and decodes its attention with the CPU kernels; ``plain`` answers one request at a time in each of
two workers with int8 weights multiplied by the CPU kernels. Every worker loads the kernels' build shipped in its
archive (its ready line says which), every request is answered (streamed and not, OpenAI's routes too), ``plain``'s
requests spread over its workers, scaling works both ways (a second continuous-batching worker refuses to start and
``chat`` keeps answering), a lower build than the CPU could run (``AITUNE_CPU_KERNELS``) answers the same tokens, and
a worker killed at several moments of its start comes READY again with nothing cleaned by hand.
"""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.kernels.build import LEVELS, SWITCH, levels_here
from integration.streams import json_pieces, post_stream, sse_events
from integration.torchserve import REPO, TorchServe
from models.llm_folders import greedy, make_llm_folder

PROMPTS = ["def main(argv):\n    ", "import os\nimport sys\n\n", "class Point:\n    def __init__(self, x, y):\n", "x"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_llm_folder(tmp_path_factory.mktemp("llm") / "llama", context=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory, folder):
    store = tmp_path_factory.mktemp("fresh_store")
    archive_model(ArchiveOptions(model_name="chat", hf_model=folder, backend="eager", max_batch=4, export_path=store))
    plain = tmp_path_factory.mktemp("plain") / "model-config.yaml"
    plain.write_text("continuousBatching: false\nminWorkers: 2\nmaxWorkers: 2\n")
    archive_model(ArchiveOptions(model_name="plain", hf_model=folder, backend="weight-only", quantization="int8wo",
                                 config_file=plain, export_path=store))
    return store


def fresh_machine(root):
    """The environment of a machine that never ran the project, and has no compiler."""
    folders = {name: root / name for name in ("home", "torch_extensions", "inductor", "aitune", "xdg")}
    for path in folders.values():
        path.mkdir(parents=True)
    return folders, {"HOME": str(folders["home"]), "TORCH_EXTENSIONS_DIR": str(folders["torch_extensions"]),
                     "TORCHINDUCTOR_CACHE_DIR": str(folders["inductor"]), "AITUNE_CACHE_DIR": str(folders["aitune"]),
                     "XDG_CACHE_HOME": str(folders["xdg"]), "CXX": "/bin/false", "CC": "/bin/false"}


def torchserve_defaults(path):
    """The repository's config.properties without its worker count: TorchServe then starts its default number of
    workers for a model whose archive does not say (one a core on a CPU)."""
    lines = (REPO / "config.properties").read_text().splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith("default_workers_per_model")) + "\n")
    return path


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, store):
    root = tmp_path_factory.mktemp("fresh_machine")
    folders, env = fresh_machine(root / "machine")
    instance = TorchServe(root / "torchserve", store, {"chat": "chat.mar", "plain": "plain.mar"},
                          config=torchserve_defaults(root / "config.properties"), env=env)
    started = time.monotonic()
    with instance.serving(timeout=180):
        print(f"fresh machine: chat and plain READY {time.monotonic() - started:.1f} s after the start")
        instance.folders = folders
        yield instance


def ready_lines(server, model):
    return [line for line in server.model_log().splitlines() if f"model {model} ready" in line]


def ask(server, model, body):
    status, answer = server.predict(model, json.dumps(body))
    assert status == 200, answer
    return answer


def test_every_worker_loads_the_shipped_build_and_nothing_is_compiled_or_cached(fresh):
    best = levels_here()[0]
    assert len(fresh.worker_pids("chat")) == 1 and len(fresh.worker_pids("plain")) == 2
    lines = ready_lines(fresh, "chat") + ready_lines(fresh, "plain")
    assert len(lines) == 3
    for line in lines:
        assert f"CPU kernels: aitune CPU kernels, {best.name} build" in line and "shipped in the archive" in line, line
    # Nothing built, nothing compiled (other libraries' own files in HOME, e.g. onnxruntime's, are theirs).
    assert not [path for name in ("torch_extensions", "inductor", "aitune") for path in fresh.folders[name].rglob("*")]
    log = fresh.model_log()
    assert "compiling" not in log.lower() and "cannot run here" not in log


def test_every_request_is_answered_streamed_or_not_openai_routes_too(fresh, reference):
    for prompt in PROMPTS[:2]:
        _, tokens, text = greedy(reference, prompt, NEW_TOKENS)
        answer = ask(fresh, "chat", {"prompt": prompt, "max_new_tokens": NEW_TOKENS})
        assert answer["text"] == text and answer["usage"]["completion_tokens"] == len(tokens)
        status, _, chunks = post_stream(fresh, "/predictions/chat", {"prompt": prompt, "max_new_tokens": NEW_TOKENS,
                                                                     "stream": True})
        assert status == 200 and "".join(piece["text"] for piece in json_pieces(chunks)) == text
        status, _, chunks = post_stream(fresh, "/predictions/chat/1.0/v1/completions",
                                        {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert status == 200 and json.loads(b"".join(data for data, _ in chunks))["choices"][0]["text"] == text
        status, _, chunks = post_stream(fresh, "/predictions/chat/1.0/v1/completions",
                                        {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True})
        events = sse_events(chunks)
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1]) == text
        plain = ask(fresh, "plain", {"prompt": prompt, "max_new_tokens": NEW_TOKENS})
        status, _, chunks = post_stream(fresh, "/predictions/plain", {"prompt": prompt, "max_new_tokens": NEW_TOKENS,
                                                                      "stream": True})
        pieces = json_pieces(chunks)
        assert status == 200 and len(pieces) > 2 and "".join(piece["text"] for piece in pieces) == plain["text"]


def worker_cpu_seconds(server, model):
    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in server.worker_pids(model)}


def test_a_model_answering_one_request_at_a_time_spreads_requests_over_its_workers(fresh):
    before = worker_cpu_seconds(fresh, "plain")
    answers = []
    threads = [threading.Thread(target=lambda index=index: answers.append(ask(
        fresh, "plain", {"prompt": PROMPTS[index % len(PROMPTS)], "max_new_tokens": 48}))) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    after = worker_cpu_seconds(fresh, "plain")
    assert len(answers) == 8 and all(answer["usage"]["completion_tokens"] >= 1 for answer in answers)
    used = {pid: after[pid] - before[pid] for pid in before}
    print(f"8 requests over plain's workers: CPU seconds {used}")
    assert len(used) == 2 and all(seconds > 0.2 for seconds in used.values()), used


def scale(server, model, workers):
    status, answer = server.request(server.management_port, "PUT",
                                    f"/models/{model}?min_worker={workers}&max_worker={workers}&synchronous=false",
                                    headers=server.auth_header("management"))
    assert status == 202, answer


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_scaling_up_and_down_with_the_management_api(fresh, reference):
    """plain goes to 3 workers and back to 1, answering throughout; chat's second worker refuses to start with a
    line saying why (TorchServe 0.12 stalls continuous batching with two), and chat's streams go on meanwhile."""
    scale(fresh, "plain", 3)
    assert wait_for(lambda: len(fresh.worker_pids("plain")) == 3)
    assert ask(fresh, "plain", {"prompt": PROMPTS[0], "max_new_tokens": 4})["usage"]["completion_tokens"] >= 1
    scale(fresh, "plain", 1)
    assert wait_for(lambda: len(fresh.worker_pids("plain")) == 1 and len(fresh.describe("plain")[0]["workers"]) == 1)
    assert ask(fresh, "plain", {"prompt": PROMPTS[1], "max_new_tokens": 4})["usage"]["completion_tokens"] >= 1

    [engine] = fresh.worker_pids("chat")
    scale(fresh, "chat", 2)
    refused = "model chat already has its one worker"
    assert wait_for(lambda: refused in fresh.model_log())
    _, tokens, text = greedy(reference, PROMPTS[2], NEW_TOKENS)
    started = time.monotonic()
    status, _, chunks = post_stream(fresh, "/predictions/chat", {"prompt": PROMPTS[2], "max_new_tokens": NEW_TOKENS,
                                                                 "stream": True}, timeout=30)
    assert status == 200 and "".join(piece["text"] for piece in json_pieces(chunks)) == text
    print(f"chat scaled to 2: the second worker refused, a stream answered in {time.monotonic() - started:.2f} s")
    assert fresh.worker_pids("chat") == [engine]
    scale(fresh, "chat", 1)
    assert wait_for(lambda: len(fresh.describe("chat")[0]["workers"]) == 1)
    assert fresh.worker_pids("chat") == [engine]
    assert ask(fresh, "chat", {"prompt": PROMPTS[2], "max_new_tokens": NEW_TOKENS})["text"] == text


@pytest.fixture(scope="module")
def lower(tmp_path_factory, store):
    """The same archives on a server whose workers run the lowest build (as a CPU with fewer features would)."""
    root = tmp_path_factory.mktemp("lower_build")
    _, env = fresh_machine(root / "machine")
    instance = TorchServe(root / "torchserve", store, {"chat": "chat.mar", "plain": "plain.mar"},
                          env={**env, SWITCH: LEVELS[-1].name})
    with instance.serving(timeout=180):
        yield instance


def test_a_lower_build_answers_the_same_tokens(fresh, lower, reference):
    lowest = LEVELS[-1]
    for model in ("chat", "plain"):
        [line, *_] = ready_lines(lower, model)
        assert f"CPU kernels: aitune CPU kernels, {lowest.name} build" in line, line
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_new_tokens": NEW_TOKENS}
        assert ask(lower, "chat", body)["text"] == greedy(reference, prompt, NEW_TOKENS)[2]
        assert ask(lower, "plain", body)["text"] == ask(fresh, "plain", body)["text"]


def starting_workers(server, model, known):
    """The PIDs of the model's worker processes that are not in ``known`` (TorchServe's new starts)."""
    frontend = psutil.Process(server.process.pid)
    return [child.pid for child in frontend.children(recursive=True)
            if child.pid not in known and "model_service_worker" in " ".join(child.cmdline())]


def test_a_worker_killed_at_any_moment_of_its_start_comes_ready_without_cleaning(lower):
    """SIGKILL the chat worker, then its replacement 0.3, 1.5 and 3 s into its start (importing torch, loading the
    archive and the kernels' build, warming up): TorchServe's next start is READY and answers, with no file left
    that blocks it."""
    known = set(lower.worker_pids("chat")) | set(lower.worker_pids("plain"))
    os.kill(lower.worker_pids("chat")[0], signal.SIGKILL)
    killed = []
    for delay in (0.3, 1.5, 3.0):
        assert wait_for(lambda: starting_workers(lower, "chat", known), timeout=60)
        [pid] = starting_workers(lower, "chat", known)
        time.sleep(delay)
        known.add(pid)
        if pid not in lower.worker_pids("chat"):  # still starting
            os.kill(pid, signal.SIGKILL)
            killed.append(delay)
    assert killed, "every start ended before its kill: nothing was tested"
    assert wait_for(lambda: [pid for pid in lower.worker_pids("chat") if pid not in known], timeout=120)
    answer = ask(lower, "chat", {"prompt": PROMPTS[0], "max_new_tokens": 4})
    assert answer["usage"]["completion_tokens"] >= 1
    print(f"chat's worker killed {len(killed)} times during its start ({killed} s in): READY again and answering")
