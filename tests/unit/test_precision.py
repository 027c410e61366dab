"""Precision (bf16, fp16 inside): dtypes at the edges stay as recorded, which devices run it fast."""

import pytest
import torch

from aitune_core import GraphSpec, Sample, TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.backends import TorchEagerBackendConfig
from aitune_core.precision import missing_support, restore_dtypes
from models.dict_output import DictOutput
from models.small import seeded_mlp
from models.two_inputs import TwoInputs

X = torch.randn(6, 32, generator=torch.Generator().manual_seed(11))
NO_FAST_FLOATS = {"amx_bf16": False, "avx512_bf16": False, "amx_fp16": False, "avx512_fp16": False}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_outputs_keep_the_recorded_dtype_and_stay_close(precision):
    module = seeded_mlp()
    backend = TorchEagerBackend(TorchEagerBackendConfig(precision=precision)).build(module, None, [X], "cpu")
    out = backend.infer(X)
    assert out.dtype == torch.float32
    assert {p.dtype for p in backend._module.parameters()} == {getattr(torch, {"bf16": "bfloat16",
                                                                                "fp16": "float16"}[precision])}
    assert cosine(out, module(X)) > 0.999
    assert not torch.equal(out, module(X))  # it did run in the narrow type


def test_integer_inputs_are_not_cast_and_tuple_outputs_come_back_in_their_dtypes():
    torch.manual_seed(0)
    module = TwoInputs().eval()
    x, ids = torch.randn(3, 16), torch.randint(0, 100, (3, 5))
    backend = TorchEagerBackend(TorchEagerBackendConfig(precision="bf16")).build(module, None, [(x, ids)], "cpu")
    logits, norms = backend.infer(x, ids)
    assert logits.dtype == norms.dtype == torch.float32
    expected = module(x, ids)
    assert cosine(logits, expected[0]) > 0.999 and cosine(norms, expected[1]) > 0.999


def test_dict_outputs_and_python_values_pass_through():
    torch.manual_seed(0)
    module = DictOutput().eval()
    x = torch.randn(4, 12)
    sample = Sample(args=(x,), kwargs={"temperature": 2.0})
    backend = TorchEagerBackend(TorchEagerBackendConfig(precision="bf16")).build(module, None, [sample], "cpu")
    out = backend.infer(x, temperature=2.0)
    assert {name: value.dtype for name, value in out.items()} == {"logits": torch.float32, "probs": torch.float32}
    assert cosine(out["probs"], module(x, temperature=2.0)["probs"]) > 0.999


def test_precision_combines_with_torchao():
    module = seeded_mlp()
    backend = TorchAOBackend(TorchAOBackendConfig(quantization="int8dq", precision="bf16"))
    out = backend.build(module, None, [X], "cpu").infer(X)
    assert out.dtype == torch.float32
    assert cosine(out, module(X)) > 0.99
    assert backend.describe() == ("TorchAOBackend(quantization_config=Int8DynamicActivationInt8WeightConfig(),"
                                  "precision='bf16')")


def test_restore_dtypes_follows_the_spec_node():
    spec = GraphSpec.from_samples(seeded_mlp(), [X])
    assert restore_dtypes(torch.ones(2, 8, dtype=torch.bfloat16), spec.outputs).dtype == torch.float32
    assert restore_dtypes(torch.ones(2, dtype=torch.int64), spec.outputs).dtype == torch.int64


def test_unknown_precision_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown precision 'int4': expected one of bf16, fp16"):
        TorchEagerBackendConfig(precision="int4")


@pytest.mark.parametrize("features, bf16, fp16", [
    (NO_FAST_FLOATS, "a CPU with amx_bf16 or avx512_bf16", "a CPU with amx_fp16 or avx512_fp16"),
    ({**NO_FAST_FLOATS, "avx512_bf16": True}, None, "a CPU with amx_fp16 or avx512_fp16"),  # Cooper Lake
    ({**NO_FAST_FLOATS, "amx_bf16": True, "avx512_fp16": True}, None, None),  # Sapphire Rapids
])
def test_which_cpus_run_a_precision_natively(features, bf16, fp16):
    cpu = torch.device("cpu")
    assert missing_support("bf16", cpu, features) == bf16
    assert missing_support("fp16", cpu, features) == fp16
    assert missing_support(None, cpu, features) is None
