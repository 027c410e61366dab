"""A real torchserve (Java frontend + Python workers) on free loopback ports, for the tests.

Each instance has its own work dir, TMPDIR and gRPC ports, reads the repository's
config.properties with only the addresses and model store changed, and is stopped by the
PID it was started with (the whole process group: frontend and workers).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHSERVE = Path(sys.executable).parent / "torchserve"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TorchServe:
    """Start with ``start()``, stop with ``stop()``; talk to it with ``predict`` and ``describe``."""

    def __init__(self, workdir: Path, model_store: Path, models: dict[str, str], config: Path | None = None,
                 torchserve: Path = TORCHSERVE, as_kserve: bool = False, env: dict[str, str] | None = None,
                 log_config: Path = REPO / "log4j2.xml") -> None:
        """``config``: the config.properties to start from (the repository's by default); only the
        addresses and the model store are replaced. ``torchserve``: the script to start (its venv
        is the workers' Python). ``as_kserve``: start as KServe's runtime does, the models coming
        from the config's model_snapshot (``models`` then only names them). ``env``: added to the
        environment. ``log_config``: the log4j2 file (the benchmarks' writes the metric lines)."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.model_store = model_store
        self.models = models
        self.torchserve = torchserve
        self.as_kserve = as_kserve
        self.env = env or {}
        self.log_config = log_config
        self.inference_port, self.management_port, self.metrics_port, self.grpc_port, grpc_m = free_ports(5)
        self.process: subprocess.Popen | None = None
        overrides = {
            "inference_address": f"http://127.0.0.1:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_port": str(self.grpc_port),
            "grpc_management_port": str(grpc_m),
            "model_store": str(model_store),
        }
        lines = []
        for line in (config or REPO / "config.properties").read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{key}={value}" for key, value in overrides.items()]
        self.config = workdir / "config.properties"
        self.config.write_text("\n".join(lines) + "\n")
        self.logs = workdir / "logs"

    def start(self) -> "TorchServe":
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(self.logs),
               "METRICS_LOCATION": str(self.logs), **self.env}
        # --foreground keeps the frontend this process's child, so it is stopped by its PID.
        command = [str(self.torchserve), "--start", "--foreground", "--ts-config", str(self.config),
                   "--log-config", str(self.log_config), "--model-store", str(self.model_store)]
        if not self.as_kserve:
            command += ["--ncs", "--models", *(f"{name}={archive}" for name, archive in self.models.items())]
        self.output = open(self.workdir / "torchserve.out", "w")
        self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=self.output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @contextlib.contextmanager
    def serving(self, timeout: float = 120) -> Iterator["TorchServe"]:
        """Started, every model READY (within ``timeout`` s each), and stopped by its PID on the way out."""
        self.start()
        try:
            for name in self.models:
                self.wait_ready(name, timeout=timeout)
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Workers live in the same process group; make sure none outlives the frontend.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.output.close()
        self.process = None

    # -- keys and requests --------------------------------------------------------------------
    @property
    def token_auth(self) -> bool:
        return "disable_token_authorization=true" not in self.config.read_text()

    def key(self, kind: str) -> str:
        return json.loads((self.workdir / "key_file.json").read_text())[kind]["key"]

    def auth_header(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"} if self.token_auth else {}

    def request(self, port: int, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def predict(self, model: str, body: bytes | str, content_type: str | None = "application/json",
                auth: bool = True, timeout: float = 180) -> tuple[int, object]:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if auth:
            headers.update(self.auth_header("inference"))
        data = body.encode() if isinstance(body, str) else body
        status, raw = self.request(self.inference_port, "POST", f"/predictions/{model}", data, headers, timeout)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def status_within(self, model: str, body: str, timeout: float) -> int | None:
        """The HTTP status of a prediction, or None when no answer came within ``timeout`` s.

        For a model that never gets READY, TorchServe answers 503 (no worker thread), 500 (the
        worker it was handed to failed to start), or queues it while a worker restarts, possibly
        for ever.
        """
        try:
            return self.predict(model, body, timeout=timeout)[0]
        except TimeoutError:
            return None

    def describe(self, model: str) -> list[dict]:
        status, raw = self.request(self.management_port, "GET", f"/models/{model}",
                                   headers=self.auth_header("management"))
        return json.loads(raw) if status == 200 else []

    def worker_pids(self, model: str) -> list[int]:
        return [worker["pid"] for entry in self.describe(model) for worker in entry["workers"]
                if worker["status"] == "READY"]

    def wait_ready(self, model: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited: {(self.workdir / 'torchserve.out').read_text()[-2000:]}")
            try:
                if ((self.workdir / "key_file.json").exists() or not self.token_auth) and self.worker_pids(model):
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"model {model} not READY after {timeout} s; see {self.logs}")

    def metrics(self) -> str:
        return self.request(self.metrics_port, "GET", "/metrics")[1].decode()

    def batch_size_histogram(self, model: str) -> dict[str, float]:
        """``AITuneBatchSize_sum`` and ``_count`` of a model, from the prometheus endpoint."""
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines()
                if line.startswith("AITuneBatchSize_") and f'ModelName="{model}"' in line and "le=" not in line}

    def model_log(self) -> str:
        path = self.logs / "model_log.log"
        return path.read_text() if path.exists() else ""
