"""Load: thousands of requests through the real torchserve, every answer checked, worker RSS steady.

`make test` runs a short form; `make reliability` (AITUNE_LOAD=full) runs the issue's counts:
10,000 requests at concurrency 8 to the MLP and 2,000 at concurrency 4 to MiniLM.
"""

import json
import os
import sys

import torch

from integration.conftest import MINILM
from integration.load import run_load

sys.path.insert(0, str(MINILM))
from sentences import SENTENCES  # noqa: E402

FULL = os.environ.get("AITUNE_LOAD") == "full"
MAX_RSS_GROWTH = 0.10


def answers_alone(server, model, bodies):
    """Each body's answer sent alone, before the load: what every answer under load must match."""
    expected = []
    for body in bodies:
        status, answer = server.predict(model, body)
        assert status == 200, answer
        expected.append(torch.tensor(answer if isinstance(answer, list) else answer["embeddings"]))
    return expected


def checked_load(server, model, bodies, expected, concurrency, total, min_cosine):
    def check(index, status, raw):
        if status != 200:
            return f"request {index}: HTTP {status}: {raw[:200]!r}"
        answer = json.loads(raw)
        got = torch.tensor(answer if isinstance(answer, list) else answer["embeddings"])
        want = expected[index % len(expected)]
        if got.shape != want.shape:
            return f"request {index}: shape {list(got.shape)}, expected {list(want.shape)}"
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min()
        return None if cosine >= min_cosine else f"request {index}: cosine {float(cosine):.6f} to its answer alone"

    # RSS after the second fifth (the second thousand of 10,000) and after the last answer.
    marks = (2 * total // 10, total)
    pids = server.worker_pids(model)
    result = run_load(server, model, bodies, concurrency, total, check, rss_at=marks)
    figures = result.figures()
    growth = result.rss_mb[marks[1]] / result.rss_mb[marks[0]] - 1
    print(f"\n{model}: {total} requests at concurrency {concurrency}: {figures['rps']:.1f} req/s, "
          f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, {len(result.failures)} errors, "
          f"worker RSS {result.rss_mb[marks[0]]:.0f} -> {result.rss_mb[marks[1]]:.0f} MB ({growth:+.1%})")
    assert not result.failures, f"{len(result.failures)} bad answers, first: {result.failures[0]}"
    assert growth < MAX_RSS_GROWTH
    assert server.worker_pids(model) == pids, "the worker was replaced under load"


def test_mlp_under_load(server):
    rows = [torch.randn(1 + i % 4, 32, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    bodies = [json.dumps(row.tolist()).encode() for row in rows]
    expected = answers_alone(server, "mlp_int8wo", bodies)
    checked_load(server, "mlp_int8wo", bodies, expected, concurrency=8, total=10_000 if FULL else 1_500,
                 min_cosine=0.99999)


def test_minilm_under_load(minilm_server):
    bodies = [json.dumps({"text": [text]}).encode() for text in SENTENCES]
    expected = answers_alone(minilm_server, "minilm_load", bodies)
    # Batched with other texts, a text is padded to the longest: equal within float rounding.
    checked_load(minilm_server, "minilm_load", bodies, expected, concurrency=4, total=2_000 if FULL else 300,
                 min_cosine=0.9999)

