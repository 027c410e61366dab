"""Archive and serve through the real torchserve: answers, structures, batching, bad requests."""

import json
import re
import threading

import pytest
import torch

from integration.conftest import MAX_BATCH_SIZE

JSON = "application/json"
GOOD = torch.randn(3, 32, generator=torch.Generator().manual_seed(11))


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a).flatten(), b.detach().flatten(), dim=0))


@pytest.mark.parametrize("model, min_cosine", [("mlp_eager", 0.99999), ("mlp_int8wo", 0.999), ("mlp_int8dq", 0.99)])
def test_archives_answer_like_in_process_eager(server, reference_mlp, model, min_cosine):
    status, body = server.predict(model, json.dumps(GOOD.tolist()))
    assert status == 200, body
    expected = reference_mlp(GOOD)
    assert torch.tensor(body).shape == (3, 8)
    assert cosine(body, expected) >= min_cosine
    if model == "mlp_eager":
        assert torch.allclose(torch.tensor(body), expected, atol=1e-5)


def test_two_inputs_and_tuple_output(server):
    from models.two_inputs import TwoInputs

    torch.manual_seed(0)
    reference = TwoInputs().eval()
    x, ids = torch.randn(2, 16), torch.randint(0, 100, (2, 6))
    status, body = server.predict("two_inputs", json.dumps({"inputs": [x.tolist(), ids.tolist()]}))
    assert status == 200, body
    projected, norms = reference(x, ids)
    assert isinstance(body, list) and len(body) == 2
    assert cosine(body[0], projected) >= 0.999
    assert cosine(body[1], norms) >= 0.999


def test_bf16_inside_keeps_the_request_and_answer_dtypes(server, inputs):
    from aitune_core import Sample, TorchEagerBackend
    from aitune_core.backends import TorchEagerBackendConfig
    from models.two_inputs import TwoInputs

    torch.manual_seed(0)
    reference = TwoInputs().eval()
    weights, samples = inputs["two"]
    in_process = TorchEagerBackend(TorchEagerBackendConfig(precision="bf16")).build(
        reference, None, [Sample.of(torch.load(path, weights_only=True)) for path in samples], "cpu")
    x, ids = torch.randn(3, 16), torch.randint(0, 100, (3, 6))  # float32 and int64, as recorded
    status, body = server.predict("two_inputs_bf16", json.dumps({"inputs": [x.tolist(), ids.tolist()]}))
    assert status == 200, body
    for served, local, fp32 in zip(body, in_process.infer(x, ids), reference(x, ids)):
        assert local.dtype == torch.float32
        assert torch.equal(torch.tensor(served), local)
        assert cosine(served, fp32) >= 0.999
    status, body = server.predict("two_inputs_bf16", json.dumps({"inputs": [x.tolist(), (ids + 0.5).tolist()]}))
    assert status == 400 and "input 1: expected integers (int64)" in body["error"]


def test_dict_output_with_kwargs(server):
    from models.dict_output import DictOutput

    torch.manual_seed(0)
    reference = DictOutput().eval()
    x = torch.randn(2, 12)
    status, body = server.predict("dict_output", json.dumps({"inputs": [x.tolist()], "kwargs": {"temperature": 0.5}}))
    assert status == 200, body
    expected = reference(x, temperature=0.5)
    assert set(body) == {"logits", "probs"}
    assert torch.allclose(torch.tensor(body["probs"]), expected["probs"], atol=1e-5)


def test_batching_returns_each_client_its_own_rows(server, reference_mlp):
    rows = [torch.randn(1 + i % 3, 32, generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    answers = [None] * len(rows)

    def client(index):
        answers[index] = server.predict("mlp_batched", json.dumps(rows[index].tolist()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for row, (status, body) in zip(rows, answers):
        assert status == 200, body
        assert torch.tensor(body).shape == (row.shape[0], 8)
        assert cosine(body, reference_mlp(row)) >= 0.999
    histogram = server.batch_size_histogram("mlp_batched")
    # More requests than handle() calls: TorchServe handed over batches, and the metric says so.
    assert histogram["AITuneBatchSize_sum"] > histogram["AITuneBatchSize_count"] >= 1


def numbers(*values):
    return "[[" + ",".join(values) + "]]"


X2, IDS2 = [[0.25] * 16] * 2, [[1, 2, 3, 4, 5, 6]] * 2
MAX_REQUEST_BYTES = 6_553_500  # TorchServe's default max_request_size

# (case, model, body, Content-Type, status, what the error must say). NaN, Inf and values past the
# dtype's range are refused, not passed through: a model would answer them with NaN rows.
BAD_REQUESTS = [
    ("invalid JSON", "mlp_int8wo", "[[1, 2", JSON, 400, "not valid JSON"),
    ("empty body", "mlp_int8wo", "", JSON, 400, "empty"),
    ("form-encoded (curl without -H)", "mlp_int8wo", "[[1]]", "application/x-www-form-urlencoded", 400,
     "not sent as JSON"),
    ("no Content-Type", "mlp_int8wo", "[[1]]", None, 400, "Content-Type must be application/json, got no Content-Type"),
    ("text/plain", "mlp_int8wo", "[[1]]", "text/plain", 400, "Content-Type must be application/json"),
    ("wrong rank", "mlp_int8wo", json.dumps([1.0] * 32), JSON, 400, "expected rank 2"),
    ("wrong shape", "mlp_int8wo", json.dumps([[1.0] * 31]), JSON, 400, "dim 1 must be 32, got 31"),
    ("ragged rows", "mlp_int8wo", json.dumps([[1.0] * 32, [1.0] * 31]), JSON, 400, "rectangular"),
    ("empty batch", "mlp_int8wo", "[[]]", JSON, 400, "dim 1 must be 32, got 0"),
    ("two inputs for one", "mlp_int8wo", json.dumps({"inputs": [[[0.0] * 32], [[0.0] * 32]]}), JSON, 400,
     "expected 1 positional input"),
    ("strings for numbers", "mlp_int8wo", json.dumps([["a"] * 32]), JSON, 400, "expected numbers"),
    ("booleans", "mlp_int8wo", json.dumps([[True] * 32]), JSON, 400, "got booleans"),
    ("null", "mlp_int8wo", "null", JSON, 400, "got null"),
    ("null inside", "mlp_int8wo", json.dumps([[None] * 32]), JSON, 400, "got null"),
    ("NaN", "mlp_int8wo", numbers(*["NaN"] * 32), JSON, 400, "NaN or Inf"),
    ("Infinity", "mlp_int8wo", numbers(*["Infinity"] * 32), JSON, 400, "NaN or Inf"),
    ("-Infinity", "mlp_int8wo", numbers("-Infinity", *["0"] * 31), JSON, 400, "NaN or Inf"),
    ("past float32", "mlp_int8wo", numbers("1e39", *["0"] * 31), JSON, 400, "beyond the range of float32"),
    ("400-digit integer", "mlp_int8wo", numbers("1" + "0" * 400, *["0"] * 31), JSON, 400,
     "beyond the range of float32"),
    ("deeply nested list", "mlp_int8wo", "[" * 100_000 + "]" * 100_000, JSON, 400, "nested too deeply"),
    ("deeply nested object", "mlp_int8wo", '{"a":' * 50_000 + "1" + "}" * 50_000, JSON, 400, "nested too deeply"),
    ("unknown keys", "mlp_int8wo", json.dumps({"inputs": [[[0.0] * 32]], "extra": 1}), JSON, 400, "unknown key"),
    ("inputs not a list", "mlp_int8wo", json.dumps({"inputs": "x"}), JSON, 400, "'inputs' must be a list"),
    ("unknown kwargs", "mlp_int8wo", json.dumps({"inputs": [[[0.0] * 32]], "kwargs": {"t": 1}}), JSON, 400,
     "unknown keyword input(s) 't'"),
    ("batch over --max-batch-size", "mlp_int8wo", json.dumps([[0.0] * 32] * (MAX_BATCH_SIZE + 1)), JSON, 400,
     f"has {MAX_BATCH_SIZE + 1} rows (dim 0), at most {MAX_BATCH_SIZE}"),
    ("body over max_request_size", "mlp_int8wo", "[[" + "0.5," * (MAX_REQUEST_BYTES // 4) + "0.5]]", JSON, 413, ""),
    ("negative token id", "two_inputs", json.dumps({"inputs": [X2, [[-1] * 6] * 2]}), JSON, 400, "IndexError"),
    ("out-of-vocabulary token id", "two_inputs", json.dumps({"inputs": [X2, [[100] * 6] * 2]}), JSON, 400,
     "IndexError"),
    ("token id past int64", "two_inputs", json.dumps({"inputs": [X2, [[2 ** 70] * 6] * 2]}), JSON, 400,
     "input 1: a value is outside the range of int64"),
    ("fractional token id", "two_inputs", json.dumps({"inputs": [X2, [[1.5] * 6] * 2]}), JSON, 400,
     "input 1: expected integers (int64)"),
    ("one input for two", "two_inputs", json.dumps({"inputs": [X2]}), JSON, 400, "expected 2 positional input"),
]


@pytest.fixture(scope="module")
def good_requests(reference_mlp):
    """Per model: a good body and the in-process answer it must get."""
    from models.two_inputs import TwoInputs

    torch.manual_seed(0)
    two = TwoInputs().eval()
    return {"mlp_int8wo": (json.dumps(GOOD.tolist()), [reference_mlp(GOOD)]),
            "two_inputs": (json.dumps({"inputs": [X2, IDS2]}), list(two(torch.tensor(X2), torch.tensor(IDS2))))}


@pytest.mark.parametrize("case, model, body, content_type, status, message", BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_the_worker_keeps_serving(server, good_requests, case, model, body, content_type,
                                                           status, message):
    pids = server.worker_pids(model)
    got, answer = server.predict(model, body, content_type)
    assert got == status, answer
    if status == 413:
        # TorchServe's Netty frontend refuses the body before any handler runs, and sends no body (README).
        assert answer == b""
    else:
        assert isinstance(answer, dict) and message in answer["error"], answer
    good, expected = good_requests[model]
    got, answer = server.predict(model, good)
    assert got == 200, answer
    served = answer if model == "two_inputs" else [answer]
    assert all(cosine(s, e) >= 0.999 for s, e in zip(served, expected))
    assert server.worker_pids(model) == pids


def test_bad_request_in_a_batch_fails_alone(server, reference_mlp):
    bodies = [json.dumps(GOOD.tolist()), "[[1, 2]]", json.dumps(GOOD[:1].tolist()), "{", json.dumps(GOOD.tolist())]
    answers = [None] * len(bodies)

    def client(index):
        answers[index] = server.predict("mlp_batched", bodies[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [status for status, _ in answers] == [200, 400, 200, 400, 200]
    assert torch.tensor(answers[2][1]).shape == (1, 8)


def test_request_without_the_key_is_refused(server):
    status, body = server.predict("mlp_int8wo", json.dumps(GOOD.tolist()), auth=False)
    assert status in (400, 401)
    assert "Token Authorization failed" in json.dumps(body)


def test_unknown_model_is_404(server):
    status, _ = server.predict("no_such_model", "[[1]]")
    assert status == 404


def test_worker_logs_what_it_deployed(server):
    log = server.model_log()
    assert re.search(r"AITune: model mlp_int8wo ready: TorchAOBackend\(quantization_config=Int8WeightOnlyConfig\(\)\) "
                     r"on cpu in \d+ ms; \d+ torch threads \(torch's default.*; "
                     r"gc.freeze: \d+ objects out of full collections; ", log)


def test_model_config_sets_the_workers_torch_threads(server):
    """handler.torch_threads in the archive's model-config (workers x threads = cores)."""
    assert re.search(r"AITune: model mlp_batched ready: .*; 1 torch threads \(handler\.torch_threads\)", server.model_log())
