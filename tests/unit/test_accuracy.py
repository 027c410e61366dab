"""Accuracy of the quantizations on a seeded MLP, and the comparison itself."""

import pytest
import torch

from aitune_core import TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.accuracy import compare_outputs
from models.small import seeded_mlp

SAMPLE = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("quantization, min_cosine", [("int8wo", 0.999), ("int8dq", 0.99), ("fp8wo", 0.999)])
def test_quantized_mlp_is_close_to_eager(quantization, min_cosine):
    module = seeded_mlp(256, 1024, 256)
    eager = TorchEagerBackend().build(module, None, [SAMPLE], "cpu")
    quantized = TorchAOBackend(TorchAOBackendConfig(quantization=quantization)).build(module, None, [SAMPLE], "cpu")
    accuracy = compare_outputs(eager.infer(SAMPLE), quantized.infer(SAMPLE))
    assert accuracy.cosine >= min_cosine
    assert 0 < accuracy.max_abs_error < 0.1


def test_compare_outputs_flattens_structures():
    a = {"x": torch.ones(2, 2), "y": (torch.zeros(3),)}
    assert compare_outputs(a, a).cosine == 1.0
    b = {"x": -torch.ones(2, 2), "y": (torch.zeros(3),)}
    assert compare_outputs(a, b).cosine == pytest.approx(-1.0)
    assert compare_outputs(a, b).max_abs_error == 2.0


def test_compare_outputs_refuses_mismatches():
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="structure"):
        compare_outputs((torch.ones(2), torch.ones(2)), torch.ones(2))
    assert compare_outputs(torch.ones(2), torch.tensor([1.0, float("nan")])).max_abs_error == float("inf")
