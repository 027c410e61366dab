"""What a worker does, without a server: load an unpacked archive and answer batches."""

import json

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.checkpoint import MANIFEST_NAME
from aitune_core.errors import CheckpointError
from aitune_core.serving import answer_batch, batch_failure, load_model, serving_device
from models.builders import MODELS, dict_output_inputs, mlp_inputs, two_inputs_inputs

JSON = "application/json"
# What TorchServe's worker hands over for POST /predictions with a JSON body.
PREDICTIONS_HEADERS = {"body": {"content-type": JSON}, "Content-Type": JSON, "url_path": "", "explain": "False"}


def unpacked(tmp_path, model_file, make_inputs, **changes):
    weights, samples = make_inputs(tmp_path / "inputs")
    result = archive_model(ArchiveOptions(model_name="m", model_file=model_file, weights=weights, samples=samples,
                                          export_path=tmp_path / "store", archive_format="no-archive", **changes))
    return result.archive_path


def post(body):
    return ({"body": body}, PREDICTIONS_HEADERS)


def test_serving_device_without_cuda():
    assert serving_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert serving_device(0) == torch.device("cpu")


@pytest.mark.parametrize("backend, quantization, compile_at", [
    ("eager", None, "archive"), ("torchao", "int8wo", "archive"), ("torchao", "int8dq", "archive"),
    ("compile", None, "archive"), ("compile", None, "start")])
def test_loaded_archive_answers_like_the_original(tmp_path, backend, quantization, compile_at):
    from models.small import seeded_mlp

    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs, backend=backend, quantization=quantization,
                         compile_at=compile_at)
    loaded = load_model(model_dir, torch.device("cpu"))
    manifest = loaded.manifest
    assert loaded.backend.state.name == "DEPLOYED"
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    [reply] = answer_batch(loaded, [post(x.tolist())])
    assert reply.status == 200
    expected = seeded_mlp()(x)
    got = torch.tensor(reply.json())
    assert got.shape == (3, 8)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > manifest["accuracy"]["min_cosine"]
    if backend == "compile" and compile_at == "start":
        assert loaded.backend.compiles_on_first_calls
        assert (model_dir / "inductor-cache").is_dir()
        assert "the archive has no AOTInductor package" in loaded.notes[0]
        assert "compiled in" in loaded.notes[1] and "graphs from the inductor cache" in loaded.notes[1]
    elif backend == "compile":
        assert not loaded.backend.compiles_on_first_calls
        assert loaded.notes[0].startswith("AOTInductor package loaded (compiled at archive time for a cpu")


def test_batch_with_bad_requests_answers_the_good_ones(tmp_path):
    loaded = load_model(unpacked(tmp_path, MODELS / "small.py", mlp_inputs), torch.device("cpu"))
    rows = [torch.randn(n, 32, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3)]
    replies = answer_batch(loaded, [post(rows[0].tolist()), post([[1, 2]]), post(bytearray(b"{")),
                                    post(rows[1].tolist()), ({}, {"url_path": ""}), post(rows[2].tolist())])
    assert [r.status for r in replies] == [200, 400, 400, 200, 400, 200]
    assert "dim 1 must be 32" in replies[1].json()["error"] == replies[1].error
    assert "not sent as JSON" in replies[4].error
    for reply, row in zip([replies[0], replies[3], replies[5]], rows):
        alone = answer_batch(loaded, [post(row.tolist())])[0]
        assert torch.allclose(torch.tensor(reply.json()), torch.tensor(alone.json()), atol=1e-5)
    # REST keeps its per-request status; only a lone failed gRPC request fails its batch.
    assert batch_failure([post([[1, 2]])], [replies[1]]) is None
    grpc = [({"data": bytearray(b"[[1, 2]]")}, {"data": {"content-type": None}})]
    [grpc_reply] = answer_batch(loaded, grpc)
    assert batch_failure(grpc, [grpc_reply]) == (400, grpc_reply.error) and "dim 1 must be 32" in grpc_reply.error


def test_two_inputs_and_tuple_output(tmp_path):
    from models.two_inputs import TwoInputs

    loaded = load_model(unpacked(tmp_path, MODELS / "two_inputs.py", two_inputs_inputs), torch.device("cpu"))
    x, ids = torch.randn(2, 16), torch.randint(0, 100, (2, 9))
    [reply] = answer_batch(loaded, [post({"inputs": [x.tolist(), ids.tolist()]})])
    assert reply.status == 200
    torch.manual_seed(0)
    expected = TwoInputs()(x, ids)
    assert len(reply.json()) == 2
    assert torch.allclose(torch.tensor(reply.json()[1]), expected[1], rtol=1e-2)
    [bad] = answer_batch(loaded, [post({"inputs": [x.tolist(), [[1000, 1, 2]] * 2]})])
    assert bad.status == 400 and "could not run this input: IndexError" in bad.json()["error"]


def test_dict_output_and_kwargs(tmp_path):
    loaded = load_model(unpacked(tmp_path, MODELS / "dict_output.py", dict_output_inputs), torch.device("cpu"))
    x = torch.randn(2, 12).tolist()
    [hot, cold] = answer_batch(loaded, [post({"inputs": [x], "kwargs": {"temperature": 1.0}}),
                                        post({"inputs": [x], "kwargs": {"temperature": 10.0}})])
    assert set(hot.json()) == {"logits", "probs"}
    assert max(hot.json()["probs"][0]) > max(cold.json()["probs"][0])
    [bad] = answer_batch(loaded, [post({"inputs": [x], "kwargs": {"temperature": "hot"}})])
    assert bad.status == 400 and "expected a float, got a string" in bad.json()["error"]


def test_tampered_checkpoint_is_refused_before_loading(tmp_path):
    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs)
    data = bytearray((model_dir / "checkpoint.pt").read_bytes())
    data[-100] ^= 0xFF
    (model_dir / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch for .*checkpoint.pt"):
        load_model(model_dir, torch.device("cpu"))


def test_tampered_model_file_is_refused_before_import(tmp_path):
    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs)
    marker = tmp_path / "imported"
    with open(model_dir / "small.py", "a") as file:
        file.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(CheckpointError, match="sha256 mismatch for .*small.py"):
        load_model(model_dir, torch.device("cpu"))
    assert not marker.exists()


def test_manifest_cannot_point_outside_the_model_dir(tmp_path):
    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs)
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    manifest["checkpoint"] = "../../inputs/weights.pt"
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="plain file name"):
        load_model(model_dir, torch.device("cpu"))


def test_worker_deploys_the_variant_its_device_can_run(tmp_path):
    from aitune_core import TorchAOBackend, TorchAOBackendConfig
    from aitune_core.checkpoint import read_manifest, save_checkpoint, write_manifest
    from aitune_core.errors import UnsupportedDeviceError
    from aitune_core.graph_spec import Sample
    from aitune_core.tune import TuneOptions
    from aitune_core.variants import Variant
    from models.small import seeded_mlp

    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs,
                         tune=TuneOptions(candidates=("int8wo",), batch_sizes=(1,), repeats=3, max_seconds=0.1))
    manifest = read_manifest(model_dir)
    [cpu_variant] = manifest["variants"]
    assert cpu_variant["device_type"] == "cpu"
    # A GPU-only variant next to it, as an archive tuned on an H100 would carry.
    gpu = TorchAOBackend(TorchAOBackendConfig(quantization="int8wo"))
    gpu.build(seeded_mlp(), None, [Sample.of(torch.zeros(2, 32))], "cpu")
    save_checkpoint(gpu.to_dict(), model_dir / "checkpoint-cuda-sm89.pt")
    gpu_variant = Variant("cuda-sm89", "checkpoint-cuda-sm89.pt", "cuda", (8, 9), gpu.describe(), "fp8dq won on cuda:0")
    files = [model_dir / name for name in manifest.pop("files")] + [model_dir / "checkpoint-cuda-sm89.pt"]
    manifest.pop("format_version")
    manifest["variants"] = [gpu_variant.to_dict(), cpu_variant]
    write_manifest(model_dir, manifest, files)
    loaded = load_model(model_dir, torch.device("cpu"))
    assert loaded.backend.describe() == cpu_variant["describe"]
    assert "variant 'cpu'" in loaded.notes[0]
    assert "skipped 'cuda-sm89' (needs a CUDA GPU with compute capability >= 8.9)" in loaded.notes[0]
    manifest["variants"] = [gpu_variant.to_dict()]
    write_manifest(model_dir, manifest, files)
    with pytest.raises(UnsupportedDeviceError, match="No variant in this archive runs on cpu: 'cuda-sm89'"):
        load_model(model_dir, torch.device("cpu"))


@pytest.mark.parametrize("backend, quantization, needs_torchao", [("eager", None, False), ("compile", None, False),
                                                                  ("torchao", "int8wo", True)])
def test_a_worker_imports_torchao_only_for_an_archive_that_needs_it(tmp_path, backend, quantization, needs_torchao):
    import subprocess
    import sys

    from aitune_core.archive import handler_path

    model_dir = unpacked(tmp_path, MODELS / "small.py", mlp_inputs, backend=backend, quantization=quantization)
    # What a worker runs: the handler's imports, then the load and a request.
    code = ("import importlib.util, sys, torch\n"
            "spec = importlib.util.spec_from_file_location('handler_under_test', sys.argv[1])\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "from aitune_core.serving import answer_batch, load_model\n"
            "loaded = load_model(sys.argv[2], torch.device('cpu'))\n"
            f"[reply] = answer_batch(loaded, [({{'body': [[0.5] * 32]}}, {PREDICTIONS_HEADERS!r})])\n"
            "print(reply.status, 'torchao' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, str(handler_path()), str(model_dir)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", str(needs_torchao)]


def test_settle_heap_collects_then_takes_what_is_alive_out_of_full_collections():
    """What a worker does once its model is loaded (serving.settle_heap): garbage goes, what is alive is frozen;
    objects made later are collected as before. In a process of its own: freezing is for the whole process."""
    import subprocess
    import sys

    code = ("import gc, weakref\n"
            "from aitune_core.serving import settle_heap\n"
            "class Node: pass\n"
            "kept = Node(); kept.me = kept\n"
            "garbage = Node(); garbage.me = garbage; gone = weakref.ref(garbage); del garbage\n"
            "frozen = settle_heap()\n"
            "later = Node(); later.me = later; later_ref = weakref.ref(later); del later\n"
            "tracked = {id(o) for o in gc.get_objects()}\n"
            "gc.collect()\n"
            "print(frozen == gc.get_freeze_count() > 1000, gone() is None, id(kept) in tracked, later_ref() is None)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "True"]
