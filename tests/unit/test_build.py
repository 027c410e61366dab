"""build(): samples run at most once, the GraphSpec, device checks before quantizing."""

import pytest
import torch

from aitune_core import GraphSpec, Sample, TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.errors import UnsupportedDeviceError
from models.small import seeded_mlp


class RunsEachSampleOnce(torch.nn.Module):
    """Raises when it sees the same sample twice, like a model with a KV cache would misbehave."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)
        self.seen = set()

    def forward(self, x):
        key = x.sum().item()
        if key in self.seen:
            raise RuntimeError("sample run twice")
        self.seen.add(key)
        return self.linear(x)


SAMPLES = [torch.randn(2, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]


@pytest.mark.parametrize("make", [TorchEagerBackend, TorchAOBackend])
def test_build_runs_each_sample_at_most_once(make):
    module = RunsEachSampleOnce()
    backend = make().build(module, None, SAMPLES, "cpu")
    assert len(module.seen) == 3
    assert backend.graph_spec.args[0]["shapes"] == [[2, 8]]


@pytest.mark.parametrize("make", [TorchEagerBackend, TorchAOBackend])
def test_build_with_a_spec_runs_no_sample(make):
    spec = GraphSpec.from_samples(RunsEachSampleOnce(), SAMPLES)
    module = RunsEachSampleOnce()
    make().build(module, spec, SAMPLES, "cpu")
    assert module.seen == set()


def test_build_leaves_the_original_module_unchanged():
    module = seeded_mlp()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    TorchAOBackend().build(module, None, [torch.randn(2, 32)], "cpu")
    assert all(type(p) is torch.nn.Parameter for p in module.parameters())
    assert all(torch.equal(module.state_dict()[name], tensor) for name, tensor in before.items())


def test_build_needs_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        TorchAOBackend().build(seeded_mlp(), None, [], "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_fp8dq_on_cpu_names_device_quantization_and_need():
    backend = TorchAOBackend(TorchAOBackendConfig(quantization="fp8dq"))
    with pytest.raises(UnsupportedDeviceError) as raised:
        backend.build(seeded_mlp(), None, [torch.randn(2, 32)], "cpu")
    message = str(raised.value)
    assert "fp8dq" in message and "cpu" in message and "compute capability >= 8.9" in message
    assert backend.state.name == "INIT"


def test_graph_spec_records_structure_and_dynamic_dims():
    class TwoInOut(torch.nn.Module):
        def forward(self, x, tokens, scale=1.0):
            return {"sum": x.sum(-1) * scale, "pair": (x, tokens.float())}

    samples = [Sample(args=(torch.randn(2, 5), torch.zeros(2, 7, dtype=torch.long)), kwargs={"scale": 2.0}),
               Sample(args=(torch.randn(3, 5), torch.zeros(3, 9, dtype=torch.long)), kwargs={"scale": 3.0})]
    spec = GraphSpec.from_samples(TwoInOut(), samples)
    assert spec.signature == ["x", "tokens", "scale"]
    assert spec.args[0] == {"kind": "tensor", "dtype": "float32", "shapes": [[2, 5], [3, 5]], "dynamic_dims": [0]}
    assert spec.args[1]["dtype"] == "int64" and spec.args[1]["dynamic_dims"] == [0, 1]
    assert spec.kwargs == {"scale": {"kind": "value", "type": "float"}}
    assert spec.outputs["kind"] == "dict"
    assert spec.outputs["items"]["pair"]["kind"] == "tuple"
    assert GraphSpec.from_dict(spec.to_dict()) == spec


def test_graph_spec_refuses_disagreeing_samples():
    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="rank"):
        GraphSpec.from_samples(Identity(), [torch.zeros(2, 3), torch.zeros(2, 3, 4)])


@pytest.mark.parametrize("value, args, kwargs", [
    (torch.ones(1), 1, 0),
    ((torch.ones(1), torch.ones(1)), 2, 0),
    (((torch.ones(1),), {"mask": torch.ones(1)}), 1, 1),
])
def test_sample_of(value, args, kwargs):
    sample = Sample.of(value)
    assert (len(sample.args), len(sample.kwargs)) == (args, kwargs)


class Int4Shapes(torch.nn.Module):
    """One layer torch's CPU int4 kernel takes (256 -> 128), one whose 40 outputs it cannot tile, one whose 40
    inputs are no whole group of 128."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fits, self.odd_out, self.odd_in = torch.nn.Linear(256, 128), torch.nn.Linear(128, 40), torch.nn.Linear(40, 16)

    def forward(self, x):
        return self.odd_in(self.odd_out(self.fits(x)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_int4wo_quantizes_the_layers_its_kernel_takes_and_round_trips(compiled, tmp_path, caplog):
    from aitune_core.backends import backend_from_dict
    from aitune_core.checkpoint import load_checkpoint, save_checkpoint

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    module = Int4Shapes()
    reference = module(x).detach()
    built = TorchAOBackend(TorchAOBackendConfig(quantization="int4wo", compile=compiled)).build(module, None, [x],
                                                                                                "cpu")
    weights = built.to_dict()["weights"]
    assert type(weights["fits.weight"]).__name__ == "Int4OpaqueTensor"
    assert type(weights["odd_out.weight"]) is torch.Tensor and type(weights["odd_in.weight"]) is torch.Tensor
    assert "odd_out stays in float: int4wo needs out_features divisible by 16" in caplog.text
    output = built.infer(x)
    assert not torch.equal(output, reference)
    assert float(torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)) > 0.99
    save_checkpoint(built.to_dict(), tmp_path / "checkpoint.pt")
    loaded = backend_from_dict(Int4Shapes(), load_checkpoint(tmp_path / "checkpoint.pt"))
    loaded.deploy("cpu")
    assert torch.equal(loaded.infer(x), output)


def test_int4wo_takes_the_devices_own_int4_kernel():
    """A build on a CUDA GPU quantizes with torchao's CUDA int4 format (bf16 only); weights packed for a CPU are
    refused there with what to do. No GPU is needed to check the choice and the lines."""
    from torchao.quantization import Int4WeightOnlyConfig

    from aitune_core.backends.torchao import check_device_can_run, config_for_device

    config = TorchAOBackendConfig(quantization="int4wo").quantization_config
    cuda = torch.device("cuda:0")
    assert config_for_device(config, torch.device("cpu"), None) is config
    check_device_can_run(config, torch.device("cpu"))
    on_gpu = config_for_device(config, cuda, "bf16")
    assert isinstance(on_gpu, Int4WeightOnlyConfig) and on_gpu.int4_packing_format.value == "tile_packed_to_4d"
    check_device_can_run(on_gpu, cuda)
    with pytest.raises(UnsupportedDeviceError, match="int4wo on cuda:0 is torchao's CUDA int4 kernel .*add --precision bf16"):
        config_for_device(config, cuda, None)
    with pytest.raises(UnsupportedDeviceError, match="int4wo .*cannot run on cuda:0: its weights are packed for a CPU"):
        check_device_can_run(config, cuda)
