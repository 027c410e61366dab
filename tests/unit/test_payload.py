"""The REST contract without a server: bodies to tensors, the bad-request catalog, batching."""

import json

import pytest
import torch

from aitune_core import BadRequestError, GraphSpec, Sample
from aitune_core.payload import (
    batch_key,
    concat_samples,
    decode_inputs,
    decode_value,
    encode_output,
    split_output,
)

JSON = "application/json"


class TwoInputs(torch.nn.Module):
    def forward(self, x, ids):
        return x.sum(-1), ids * 2


def spec_one():
    return GraphSpec.from_samples(torch.nn.Linear(4, 2), [torch.zeros(3, 4)])


def spec_two():
    return GraphSpec.from_samples(TwoInputs(), [(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.long))])


def test_one_positional_input():
    sample = decode_inputs([[1, 2, 3, 4], [5, 6, 7, 8]], spec_one())
    assert sample.args[0].dtype == torch.float32
    assert sample.args[0].shape == (2, 4)
    assert sample.kwargs == {}


def test_inputs_object_with_dtypes_from_the_spec():
    sample = decode_inputs({"inputs": [[[1.5, 2, 3, 4]], [[1, 2, 3]]]}, spec_two())
    assert sample.args[0].dtype == torch.float32
    assert sample.args[1].dtype == torch.int64
    assert sample.args[1].tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("body, message", [
    ([[1, 2, 3]], "input 0: dim 1 must be 4, got 3"),
    ([1, 2, 3, 4], "input 0: expected rank 2"),
    ([[[1, 2, 3, 4]]], "input 0: expected rank 2"),
    ([], "input 0: expected rank 2|batch dim"),
    ([[1, 2, 3, "a"]], "expected numbers \\(float32\\), got strings"),
    ([[1, 2, 3, None]], "got null"),
    ([[1, 2, 3, True]], "got null|booleans|got"),
    ([[True, False, True, True]], "got booleans"),
    ([[1, 2, 3, 4], [1, 2]], "rectangular"),
    ([[1, 2, 3, float("nan")]], "NaN or Inf"),
    ([[1, 2, 3, float("inf")]], "NaN or Inf"),
    ([[1, 2, 3, 1e39]], "NaN or Inf, or a value beyond the range of float32"),
    ({"inputs": [[[1, 2, 3, 4]]], "extra": 1}, "unknown key\\(s\\) 'extra'"),
    ({"input": [[1, 2, 3, 4]]}, "unknown key"),
    ({"inputs": [[[1, 2, 3, 4]], [[1, 2, 3, 4]]]}, "expected 1 positional input\\(s\\), got 2"),
    ({"inputs": [[[1, 2, 3, 4]]], "kwargs": {"mask": [1]}}, "unknown keyword input\\(s\\) 'mask'"),
    ({"inputs": [[1, 2, 3, 4]], "kwargs": []}, "'kwargs' must be an object"),
    ({"inputs": "x"}, "'inputs' must be a list"),
    ("just a string", "nested list .* got a string"),
    (42, "got an integer"),
    (None, "got null"),
])
def test_bad_inputs_name_the_problem(body, message):
    with pytest.raises(BadRequestError, match=message):
        decode_inputs(body, spec_one())


@pytest.mark.parametrize("ids, message", [
    ([[1.5, 2, 3]], "expected integers"),
    ([[2 ** 70, 2, 3]], "input 1: a value is outside the range of int64"),
    ([[-2 ** 64, 2, 3]], "input 1: a value is outside the range of int64"),
    ([[2 ** 63, 2, 3]], "input 1: a value is outside the range of int64"),
])
def test_integer_inputs(ids, message):
    with pytest.raises(BadRequestError, match=message):
        decode_inputs({"inputs": [[[1, 2, 3, 4]], ids]}, spec_two())


def test_big_integers_for_a_float_input():
    assert decode_inputs([[2 ** 70, 0, 1, 2]], spec_one()).args[0][0, 0] == float(2 ** 70)
    with pytest.raises(BadRequestError, match="beyond the range of float32"):
        decode_inputs([[2 ** 200, 0, 1, 2]], spec_one())
    with pytest.raises(BadRequestError, match="beyond the range of float32"):
        decode_inputs([[10 ** 400, 0, 1, 2]], spec_one())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 1, 3), (3, 200), (2, 2, 100)])  # small and numpy paths
def test_float_inputs_of_any_rank_and_dtype(dtype, shape):
    reference = torch.randn(shape, dtype=torch.float64)
    node = {"kind": "tensor", "dtype": str(dtype).removeprefix("torch."), "shapes": [list(shape)], "dynamic_dims": []}
    decoded = decode_value(reference.tolist(), node, "input 0")
    assert decoded.dtype == dtype and decoded.shape == shape
    assert torch.equal(decoded, reference.to(dtype))


@pytest.mark.parametrize("dtype, too_big", [("float16", 70000.0), ("bfloat16", 1e39), ("float32", 1e39)])
@pytest.mark.parametrize("width", [2, 1000])  # small and numpy paths
def test_values_past_a_narrow_dtype_or_not_finite_are_refused(dtype, too_big, width):
    node = {"kind": "tensor", "dtype": dtype, "shapes": [[1, width]], "dynamic_dims": [0]}
    largest = -65504.0 if dtype == "float16" else -1e38
    assert decode_value([[1.0] * (width - 1) + [largest]], node, "input 0").shape == (1, width)
    for value in (too_big, -too_big, float("nan"), float("inf")):
        with pytest.raises(BadRequestError, match=f"input 0: contains NaN or Inf, or a value beyond the range of {dtype}"):
            decode_value([[1.0] * (width - 1) + [value]], node, "input 0")
    with pytest.raises(BadRequestError, match="got booleans"):
        decode_value([[1.0] * (width - 1) + [True]], node, "input 0")


def test_max_batch_size_caps_rows_per_request():
    from aitune_core.codecs import TensorCodec

    codec = TensorCodec(spec_one(), max_batch_size=2)
    assert codec.decode([[1, 2, 3, 4]] * 2).args[0].shape == (2, 4)
    with pytest.raises(BadRequestError, match="the request has 3 rows \\(dim 0\\), at most 2 per request"):
        codec.decode([[1, 2, 3, 4]] * 3)
    assert TensorCodec(spec_one()).decode([[1, 2, 3, 4]] * 300).args[0].shape == (300, 4)


def test_encode_output():
    value = {"a": torch.tensor([[1.0, 2.0]]), "b": (torch.tensor([1], dtype=torch.int64), 3),
             "c": torch.tensor([0.5], dtype=torch.bfloat16)}
    assert encode_output(value) == {"a": [[1.0, 2.0]], "b": [[1], 3], "c": [0.5]}
    json.dumps(encode_output(value))


def test_concat_and_split_round_trip():
    spec = spec_two()
    requests = [decode_inputs({"inputs": [[[1, 2, 3, 4]] * n, [[1, 2, 3]] * n]}, spec) for n in (1, 3, 2)]
    assert len({batch_key(sample) for sample in requests}) == 1
    batched = concat_samples(requests)
    assert batched.args[0].shape == (6, 4)
    parts = split_output(TwoInputs()(*batched.args), [1, 3, 2])
    assert [part[0].shape[0] for part in parts] == [1, 3, 2]
    assert torch.equal(parts[1][1], requests[1].args[1] * 2)


def test_split_output_without_a_batch_dim_is_none():
    assert split_output(torch.tensor(3.0), [1, 2]) is None
    assert split_output(torch.zeros(4, 2), [1, 2]) is None


def test_batch_key_separates_incompatible_requests():
    a = Sample(args=(torch.zeros(1, 4),))
    b = Sample(args=(torch.zeros(2, 4),))
    c = Sample(args=(torch.zeros(1, 5),))
    assert batch_key(a) == batch_key(b) != batch_key(c)
