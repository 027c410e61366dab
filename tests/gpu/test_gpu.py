"""GPU cases: fp8 quantizations, deploy on cuda:N, memory freed by deactivate. Skipped without CUDA."""

import io

import pytest
import torch

from aitune_core import TorchAOBackend, TorchAOBackendConfig, TorchEagerBackend
from aitune_core.accuracy import compare_outputs
from aitune_core.errors import UnsupportedDeviceError
from models.small import MLP, seeded_mlp

pytestmark = pytest.mark.gpu


def reload(backend):
    buffer = io.BytesIO()
    torch.save(backend.to_dict(), buffer)
    buffer.seek(0)
    return type(backend).from_dict(MLP(256, 1024, 256), torch.load(buffer, map_location="cpu", weights_only=True))


def capability():
    return torch.cuda.get_device_capability(0)


@pytest.mark.parametrize("quantization, min_cosine", [("int8wo", 0.999), ("int8dq", 0.99), ("fp8wo", 0.999),
                                                      ("fp8dq", 0.99)])
def test_build_and_round_trip_on_cuda(quantization, min_cosine):
    if quantization == "fp8dq" and capability() < (8, 9):
        pytest.skip("fp8dq needs compute capability >= 8.9")
    sample = torch.randn(32, 256, device="cuda:0")
    module = seeded_mlp(256, 1024, 256)
    backend = TorchAOBackend(TorchAOBackendConfig(quantization=quantization)).build(module, None, [sample], "cuda:0")
    built = backend.infer(sample)
    assert built.device.type == "cuda"
    assert compare_outputs(module.cuda()(sample), built).cosine >= min_cosine
    loaded = reload(backend)
    loaded.deploy("cuda:0")
    assert torch.equal(loaded.infer(sample), built)


def test_fp8dq_on_an_older_gpu_names_the_capability():
    if capability() >= (8, 9):
        pytest.skip("this GPU runs fp8dq")
    with pytest.raises(UnsupportedDeviceError, match="compute capability"):
        TorchAOBackend(TorchAOBackendConfig(quantization="fp8dq")).build(seeded_mlp(), None, [torch.randn(2, 32)],
                                                                          "cuda:0")


def test_cpu_built_checkpoint_deploys_on_the_gpu_torchserve_assigns():
    sample = torch.randn(8, 256)
    built = TorchAOBackend().build(seeded_mlp(256, 1024, 256), None, [sample], "cpu")
    loaded = reload(built)
    loaded.deploy(f"cuda:{torch.cuda.device_count() - 1}")
    out = loaded.infer(sample)
    assert out.device.type == "cuda"
    assert compare_outputs(built.infer(sample), out.cpu()).cosine >= 0.999


@pytest.mark.parametrize("make", [TorchEagerBackend, TorchAOBackend])
def test_deactivate_frees_gpu_memory(make):
    sample = torch.randn(8, 1024, device="cuda:0")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    backend = make().build(seeded_mlp(1024, 4096, 1024), None, [sample], "cuda:0")
    backend.infer(sample)
    active = torch.cuda.memory_allocated(0)
    backend.deactivate()
    assert torch.cuda.memory_allocated(0) < before + (active - before) / 4
    backend.activate()
    assert backend.infer(sample).device.type == "cuda"


def test_tune_on_cpu_and_cuda_keeps_a_variant_for_each(tmp_path):
    from aitune_core.archive import ArchiveOptions, archive_model
    from aitune_core.serving import load_model
    from aitune_core.tune import TuneOptions
    from models.builders import MODELS, mlp_inputs

    weights, samples = mlp_inputs(tmp_path / "inputs")
    result = archive_model(ArchiveOptions(
        model_name="m", model_file=MODELS / "small.py", weights=weights, samples=samples,
        export_path=tmp_path / "store", archive_format="no-archive", tune_devices=["cpu", "cuda:0"],
        tune=TuneOptions(candidates=("int8wo", "fp8wo", "fp8dq"), batch_sizes=(1, 32), repeats=5)))
    types = {variant.device_type for variant in result.variants}
    assert {"cpu", "cuda"} <= types
    on_gpu = load_model(result.archive_path, torch.device("cuda:0"))
    assert on_gpu.backend.device == torch.device("cuda:0")
    assert "variant 'cuda" in on_gpu.notes[0]
    on_cpu = load_model(result.archive_path, torch.device("cpu"))
    assert "variant 'cpu'" in on_cpu.notes[0]
