"""`make demo` as a new user runs it: archive, serve, one real answer; stopped at the end here."""

import os
import re
import socket
import subprocess

from integration.torchserve import REPO


def port_in_use(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_make_demo(tmp_path):
    busy = [port for port in (8080, 8081, 8082, 7070, 7071) if port_in_use(port)]
    assert not busy, f"make demo needs the ports of config.properties; in use: {busy} (make stop?)"
    env = {**os.environ, "DEMO_STOP": "1", "TMPDIR": str(tmp_path), "TEMP": str(tmp_path)}
    done = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Model minilm is READY" in done.stdout
    assert "answer: 3 embeddings of 384 floats from the int8wo model" in done.stdout
    related = float(re.search(r"= (-?[0-9.]+)  \(related\)", done.stdout).group(1))
    unrelated = float(re.search(r"= (-?[0-9.]+)  \(unrelated\)", done.stdout).group(1))
    assert related > unrelated + 0.3
    assert "quantization  int8wo" in done.stdout
    assert not any(port_in_use(port) for port in (8080, 8081))
