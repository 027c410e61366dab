"""KServe v1 (instances -> predictions) without a server: answers equal the TorchServe JSON answers."""

import json

import pytest
import torch

from aitune_core.serving import answer_batch
from unit.torchserve_requests import assert_answers_close, rest

X = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))


def v1(body):
    return rest(json.dumps(body), predictions=False)


def test_one_input_rows_are_instances(mlp_model):
    [answer, reference] = answer_batch(mlp_model, [v1({"instances": X.tolist()}), rest(json.dumps(X.tolist()))])
    assert answer.status == 200
    assert_answers_close(answer.json(), {"predictions": reference.json()})  # the two ran in one batch


def test_several_inputs_take_an_object_per_instance_and_answer_one_per_row(two_model):
    x, ids = torch.randn(2, 16), torch.randint(0, 100, (2, 6))
    instances = [{"x": x[i].tolist(), "ids": ids[i].tolist()} for i in range(2)]
    [answer, reference] = answer_batch(two_model, [v1({"instances": instances}),
                                                   rest(json.dumps({"inputs": [x.tolist(), ids.tolist()]}))])
    assert answer.status == 200, answer.body
    projected, norms = reference.json()
    assert_answers_close(answer.json(), {"predictions": [{"output_0": projected[i], "output_1": norms[i]}
                                                         for i in range(2)]})


def test_dict_output_and_keyword_input(dict_model):
    x = torch.randn(2, 12)
    instances = [{"x": row, "temperature": 0.5} for row in x.tolist()]
    [answer] = answer_batch(dict_model, [v1({"instances": instances})])
    # A keyword input that is a number arrives once per instance: not a tensor, refused by name.
    assert answer.status == 400 and "input 'temperature'" in answer.error


def test_text_model_takes_strings(text_model):
    texts = ["a short one", "a somewhat longer sentence to embed"]
    [answer, reference] = answer_batch(text_model, [v1({"instances": texts}), rest(json.dumps({"text": texts}))])
    assert_answers_close(answer.json(), {"predictions": reference.json()["embeddings"]})


@pytest.mark.parametrize("body, message", [
    ({"instances": []}, "'instances' must be a non-empty list"),
    ({"instances": [[1.0] * 31]}, "input 'x': dim 1 must be 32, got 31"),
    ({"instances": "x"}, "'instances' must be a non-empty list"),
])
def test_bad_instances(mlp_model, body, message):
    [answer] = answer_batch(mlp_model, [v1(body)])
    assert answer.status == 400 and message in answer.json()["error"], answer.body


@pytest.mark.parametrize("instances, message", [
    ([[0.0] * 16], "each instance must be an object with the keys ['ids', 'x'], got list"),
    ([{"x": [0.0] * 16, "ids": [1]}, {"x": [0.0] * 16}], "instances[1] has the keys ['x']"),
    ([{"x": [0.0] * 16}], "missing input(s) 'ids'"),
    ([{"x": [0.0] * 16, "ids": [1], "y": [2]}], "unknown input(s) 'y'"),
])
def test_bad_instances_of_a_two_input_model(two_model, instances, message):
    [answer] = answer_batch(two_model, [v1({"instances": instances})])
    assert answer.status == 400 and message in answer.error, answer.body
