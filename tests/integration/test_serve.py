"""Archive and serve through the real torchserve: answers, structures, batching, bad requests."""

import json
import re
import threading

import pytest
import torch

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


BAD_REQUESTS = [
    ("invalid JSON", "[[1, 2", "application/json", "not valid JSON"),
    ("empty body", "", "application/json", "empty"),
    ("form-encoded (curl without -H)", "[[1]]", "application/x-www-form-urlencoded", "not sent as JSON"),
    ("no Content-Type", "[[1]]", None, "Content-Type must be application/json, got no Content-Type"),
    ("text/plain", "[[1]]", "text/plain", "Content-Type must be application/json"),
    ("wrong rank", json.dumps([1.0] * 32), "application/json", "expected rank 2"),
    ("wrong shape", json.dumps([[1.0] * 31]), "application/json", "dim 1 must be 32, got 31"),
    ("two inputs for one", json.dumps({"inputs": [[[0.0] * 32], [[0.0] * 32]]}), "application/json",
     "expected 1 positional input"),
    ("not numbers", json.dumps([["a"] * 32]), "application/json", "expected numbers"),
    ("booleans", json.dumps([[True] * 32]), "application/json", "got booleans"),
    ("null", "null", "application/json", "got null"),
    ("NaN", "[[" + ",".join(["NaN"] * 32) + "]]", "application/json", "NaN or Inf"),
    ("unknown keys", json.dumps({"inputs": [[[0.0] * 32]], "extra": 1}), "application/json", "unknown key"),
]


@pytest.mark.parametrize("case, body, content_type, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_400_and_the_worker_keeps_serving(server, reference_mlp, case, body, content_type, message):
    pids = server.worker_pids("mlp_int8wo")
    status, answer = server.predict("mlp_int8wo", body, content_type)
    assert status == 400, answer
    assert message in answer["error"]
    status, answer = server.predict("mlp_int8wo", json.dumps(GOOD.tolist()))
    assert status == 200 and cosine(answer, reference_mlp(GOOD)) >= 0.999
    assert server.worker_pids("mlp_int8wo") == pids


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
                     r"on cpu in \d+ ms", log)
