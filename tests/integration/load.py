"""A bounded load generator: keep-alive clients on loopback, every answer checked as it comes.

Used by the load tests and by `make bench`, so both measure the same way.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Callable

import psutil

from integration.torchserve import TorchServe

# check(request number, HTTP status, body bytes) -> None when the answer is right, else why not.
Check = Callable[[int, int, bytes], "str | None"]


def status_is_200(index: int, status: int, body: bytes) -> str | None:
    return None if status == 200 else f"request {index}: HTTP {status}: {body[:200]!r}"


@dataclasses.dataclass
class LoadResult:
    latencies_s: list[float]
    wall_s: float
    failures: list[str]
    rss_mb: dict[int, float]  # worker RSS after that many answers

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    def figures(self) -> dict[str, float]:
        return {"p50_ms": self.percentile_ms(50), "p90_ms": self.percentile_ms(90),
                "p99_ms": self.percentile_ms(99), "rps": len(self.latencies_s) / self.wall_s}


def worker_rss_mb(server: TorchServe, model: str) -> float:
    """Resident memory of the model's worker processes, in MB."""
    return sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids(model)) / 1e6


class KeepAliveConnection:
    """HTTP/1.1 POSTs of pre-built requests over one socket.

    A fraction of http.client's CPU per request (no header objects, no email parser): the client
    shares the cores with the server, so the less it takes, the less it disturbs what it measures.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def post(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = dict((name.strip().lower(), value.strip()) for name, value in
                       (line.split(b":", 1) for line in lines[1:]))
        if b"content-length" in headers:
            body = self._take(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._take(size))
                self._take(2)
            self._line()
            body = b"".join(parts)
        else:
            raise ConnectionError(f"response without a length: {head[:200]!r}")
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body


def post_request(server: TorchServe, model: str, body: bytes, path: str | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one request with the inference key: to /predictions/MODEL as JSON, or ``path`` with ``headers``."""
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", **server.auth_header("inference"),
              **(headers or {}), "Content-Length": str(len(body))}
    head = f"POST {path or f'/predictions/{model}'} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n" + body


def run_load(server: TorchServe, model: str, bodies: list[bytes], concurrency: int, total: int,
             check: Check = status_is_200, rss_at: tuple[int, ...] = (), path: str | None = None,
             headers: dict[str, str] | None = None) -> LoadResult:
    """``total`` requests (request n sends ``bodies[n % len(bodies)]``) from ``concurrency`` clients."""
    requests = [post_request(server, model, body, path, headers) for body in bodies]
    latencies: list[float] = []
    failures: list[str] = []
    rss: dict[int, float] = {}
    lock = threading.Lock()
    issued = [0]

    def client() -> None:
        connection = KeepAliveConnection(server.inference_port, timeout=120)
        try:
            while True:
                with lock:
                    index = issued[0]
                    if index == total:
                        return
                    issued[0] += 1
                started = time.perf_counter()
                try:
                    status, body = connection.post(requests[index % len(requests)])
                except (OSError, ValueError) as error:
                    status, body = 0, repr(error).encode()
                    connection.close()
                elapsed = time.perf_counter() - started
                problem = check(index, status, body)
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        failures.append(problem)
                    done = len(latencies)
                if done in rss_at:
                    rss[done] = worker_rss_mb(server, model)
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(latencies, time.perf_counter() - started, failures, rss)
