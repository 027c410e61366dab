"""A bounded load generator: keep-alive clients on loopback, every answer checked as it comes.

Used by the load tests and by `make bench`, so both measure the same way.
"""

from __future__ import annotations

import dataclasses
import http.client
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


def run_load(server: TorchServe, model: str, bodies: list[bytes], concurrency: int, total: int,
             check: Check = status_is_200, rss_at: tuple[int, ...] = ()) -> LoadResult:
    """``total`` requests (request n sends ``bodies[n % len(bodies)]``) from ``concurrency`` clients."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.key('inference')}"}
    latencies: list[float] = []
    failures: list[str] = []
    rss: dict[int, float] = {}
    lock = threading.Lock()
    issued = [0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=120)
        try:
            while True:
                with lock:
                    index = issued[0]
                    if index == total:
                        return
                    issued[0] += 1
                started = time.perf_counter()
                try:
                    connection.request("POST", f"/predictions/{model}", bodies[index % len(bodies)], headers)
                    response = connection.getresponse()
                    status, body = response.status, response.read()
                except (OSError, http.client.HTTPException) as error:
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
