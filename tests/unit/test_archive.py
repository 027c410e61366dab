"""aitune-archive: a built, checked archive; one clear line and nothing written for each bad input."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model, startup_timeout_for
from aitune_core.checkpoint import MANIFEST_NAME
from aitune_core.errors import ArchiveError, CheckpointError, UnsupportedDeviceError
from models.builders import MODELS, mlp_inputs

REPO = MODELS.parents[1]


@pytest.fixture
def inputs(tmp_path):
    weights, samples = mlp_inputs(tmp_path / "inputs")
    return {"model_file": MODELS / "small.py", "weights": weights, "samples": samples,
            "export_path": tmp_path / "store"}


def options(inputs, **changes):
    return ArchiveOptions(**{"model_name": "mlp", **inputs, **changes})


def test_archive_holds_handler_checkpoint_model_and_manifest(inputs):
    lines = []
    result = archive_model(options(inputs), progress=lines.append)
    assert result.archive_path == inputs["export_path"] / "mlp.mar"
    assert result.quantization == "int8wo" and result.accuracy.cosine >= 0.999
    with zipfile.ZipFile(result.archive_path) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read(MANIFEST_NAME))
        torchserve_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {"aitune_handler.py", "checkpoint.pt", "small.py", MANIFEST_NAME} <= names
    assert torchserve_manifest["model"]["handler"] == "aitune_handler.py"
    assert manifest["backend"] == "TorchAOBackend" and manifest["quantization"] == "int8wo"
    assert manifest["model"] == {"file": "small.py", "class": "MLP", "kwargs": {}}
    assert set(manifest["files"]) == {"checkpoint.pt", "small.py", "requirements.txt"}
    assert manifest["accuracy"]["min_cosine"] == 0.999
    # It runs where this project is not installed: its own aitune_core (sources only) and what to pip install.
    assert {"aitune_core/__init__.py", "aitune_core/serving.py", "aitune_core/wire/kserve_v2.py",
            "aitune_core/backends/torchao.py"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    with zipfile.ZipFile(result.archive_path) as archive:
        assert archive.read("requirements.txt").decode() == "torchao==0.18.0\n"
        assert archive.read("aitune_core/serving.py") == (REPO / "aitune_core" / "serving.py").read_bytes()
    assert torchserve_manifest["model"]["requirementsFile"] == "requirements.txt"
    assert manifest["versions"]["torchao"] == "0.18.0"
    assert manifest["key"].startswith("TorchAOBackend_")
    assert any("Accuracy" in line for line in lines)
    assert sorted(p.name for p in inputs["export_path"].iterdir()) == ["mlp.mar"]


def test_eager_archive_and_model_kwargs(inputs, tmp_path):
    from models.small import MLP

    torch.manual_seed(0)
    torch.save(MLP(32, 16, 8).state_dict(), tmp_path / "w16.pt")
    result = archive_model(options(inputs, backend="eager", weights=tmp_path / "w16.pt",
                                   model_kwargs={"hidden": 16}, archive_format="no-archive"))
    manifest = json.loads((result.archive_path / MANIFEST_NAME).read_text())
    assert manifest["backend"] == "TorchEagerBackend" and manifest["quantization"] is None
    assert manifest["model"]["kwargs"] == {"hidden": 16}
    assert result.accuracy.cosine == 1.0


@pytest.mark.parametrize("changes, error, message", [
    ({"model_file": "missing.py"}, ArchiveError, "--model-file missing.py does not exist"),
    ({"samples": ["missing.pt"]}, ArchiveError, "--sample missing.pt does not exist"),
    ({"samples": []}, ArchiveError, "--sample is required"),
    ({"model_class": "Nope"}, ValueError, "no nn.Module class 'Nope'; it defines: MLP"),
    ({"quantization": "int3"}, ValueError, "Unknown quantization 'int3'"),
    ({"backend": "tensorrt"}, ValueError, "Unknown backend 'tensorrt'"),
    ({"model_name": "../up"}, ArchiveError, "--model-name"),
    ({"model_name": "/tmp/abs"}, ArchiveError, "--model-name"),
    ({"model_name": "a/b"}, ArchiveError, "--model-name"),
    ({"model_name": ".."}, ArchiveError, "--model-name"),
    ({"max_batch_size": 0}, ArchiveError, "--max-batch-size must be at least 1, got 0"),
    ({"model_kwargs": {"hidden": 7}}, CheckpointError, "do not fit MLP"),
    ({"min_cosine": 1.0}, ArchiveError, "Accuracy check failed: cosine .* < required 1.0 \\(missed by"),
])
def test_bad_inputs_write_nothing(inputs, changes, error, message):
    with pytest.raises(error, match=message):
        archive_model(options(inputs, **changes))
    assert not inputs["export_path"].exists() or list(inputs["export_path"].iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_fp8dq_on_cpu_is_refused_before_any_work(inputs):
    with pytest.raises(UnsupportedDeviceError, match="fp8dq .* cannot run on cpu"):
        archive_model(options(inputs, quantization="fp8dq"))
    with pytest.raises(UnsupportedDeviceError, match="CUDA is not available"):
        archive_model(options(inputs, device="cuda:0"))


def test_several_or_no_module_classes(inputs, tmp_path):
    several = tmp_path / "several.py"
    several.write_text("import torch\nclass A(torch.nn.Module):\n    pass\nclass B(torch.nn.Module):\n    pass\n")
    with pytest.raises(ValueError, match="defines 2 nn.Module classes \\(A, B\\): name one with --model-class"):
        archive_model(options(inputs, model_file=several))
    none = tmp_path / "none.py"
    none.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines 0 nn.Module classes"):
        archive_model(options(inputs, model_file=none))


@pytest.mark.parametrize("config, message", [
    ("handler:\n  torch_threads: 0\n", "handler.torch_threads must be a whole number of threads >= 1, got 0"),
    ("handler:\n  torch_threads: two\n", "handler.torch_threads must be a whole number of threads >= 1, got 'two'"),
    ("handler: 2\n", "handler must be a mapping"),
    ("- batchSize\n", "must be a YAML mapping"),
])
def test_bad_model_config_writes_nothing(inputs, tmp_path, config, message):
    """A model-config a worker would refuse is refused when archiving, whatever the backend."""
    (tmp_path / "bad.yaml").write_text(config)
    with pytest.raises(ArchiveError, match=f"--config-file .*bad.yaml.*{message}"):
        archive_model(options(inputs, backend="eager", config_file=tmp_path / "bad.yaml"))
    assert not inputs["export_path"].exists() or list(inputs["export_path"].iterdir()) == []


def test_sample_the_model_cannot_run(inputs, tmp_path):
    torch.save(torch.randn(2, 5), tmp_path / "bad_sample.pt")
    with pytest.raises(ArchiveError, match="cannot run the sample\\(s\\) .*bad_sample.pt"):
        archive_model(options(inputs, samples=[tmp_path / "bad_sample.pt"]))
    torch.save({"not": "a sample"}, tmp_path / "dict.pt")
    with pytest.raises(ArchiveError, match="cannot run the sample"):
        archive_model(options(inputs, samples=[tmp_path / "dict.pt"]))


def test_weights_file_that_is_not_safe(inputs, tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(object()))
    with pytest.raises(ArchiveError, match="--weights .* cannot be read with torch.load\\(weights_only=True\\)"):
        archive_model(options(inputs, weights=tmp_path / "evil.pt"))


def test_existing_archive_needs_force(inputs):
    first = archive_model(options(inputs))
    before = first.archive_path.read_bytes()
    with pytest.raises(ArchiveError, match="already exists: use --force"):
        archive_model(options(inputs, quantization="int8dq"))
    assert first.archive_path.read_bytes() == before
    again = archive_model(options(inputs, quantization="int8dq", force=True))
    assert again.quantization == "int8dq"
    assert sorted(p.name for p in inputs["export_path"].iterdir()) == ["mlp.mar"]


def files_under(root, skip):
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file() and skip not in path.parents}


@pytest.mark.parametrize("archive_format", ["default", "no-archive"])
def test_archive_never_writes_outside_the_export_dir(inputs, tmp_path, archive_format):
    store = inputs["export_path"]
    store.mkdir()
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "keep.txt").write_text("keep")
    suffix = ".mar" if archive_format == "default" else ""
    (store / f"mlp{suffix}").symlink_to(outside / "victim")
    (store / f"dangling{suffix}").symlink_to(outside / "nothing-here")
    before = files_under(tmp_path, store)
    archive_model(options(inputs, force=True, archive_format=archive_format))
    archive_model(options(inputs, model_name="dangling", archive_format=archive_format))
    assert files_under(tmp_path, store) == before
    assert not (outside / "nothing-here").exists()
    for name in (f"mlp{suffix}", f"dangling{suffix}"):
        assert not (store / name).is_symlink() and (store / name).exists()
    assert sorted(p.name for p in store.iterdir()) == sorted([f"mlp{suffix}", f"dangling{suffix}"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "aitune_core.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_prints_progress_and_summary(inputs):
    done = run_cli("--model-name", "mlp", "--model-file", inputs["model_file"], "--weights", inputs["weights"],
                   "--sample", inputs["samples"][0], "--export-path", inputs["export_path"], "--quantization", "int8dq")
    assert done.returncode == 0, done.stderr
    assert "- Building TorchAOBackend on cpu" in done.stdout
    assert "quantization  int8dq" in done.stdout
    assert "the fp32 weights" in done.stdout
    assert "Failed to load" not in done.stderr


def test_cli_error_is_one_line_and_nonzero(inputs):
    done = run_cli("--model-name", "mlp", "--model-file", inputs["model_file"], "--sample", "nope.pt",
                   "--export-path", inputs["export_path"])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["aitune-archive: error: --sample nope.pt does not exist"]
    done = run_cli("--model-name", "mlp", "--model-file", inputs["model_file"], "--sample", inputs["samples"][0],
                   "--quantization", "int4")
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr


def test_compiled_archive_sets_a_startup_timeout_that_fits_and_keeps_the_users(inputs, tmp_path):
    import yaml

    lines = []
    result = archive_model(options(inputs, backend="compile", compile_at="start", archive_format="no-archive"),
                           progress=lines.append)
    config = yaml.safe_load((result.archive_path / "model-config.yaml").read_text())
    assert config["startupTimeout"] == startup_timeout_for(result.build_seconds) >= 120
    assert f"Set startupTimeout: {config['startupTimeout']} s in the packed model-config" in result.startup_timeout
    assert result.startup_timeout in lines

    own = tmp_path / "own.yaml"
    own.write_text("# mine\nbatchSize: 4\nmaxBatchDelay: 50\n")
    result = archive_model(options(inputs, backend="compile", config_file=own, archive_format="no-archive",
                                   force=True))
    text = (result.archive_path / "model-config.yaml").read_text()
    assert text.startswith("# mine\nbatchSize: 4\nmaxBatchDelay: 50\n")
    assert yaml.safe_load(text)["startupTimeout"] >= 120

    own.write_text("startupTimeout: 900\nbatchSize: 2\n")
    result = archive_model(options(inputs, backend="compile", compile_at="start", config_file=own,
                                   archive_format="no-archive", force=True))
    assert (result.archive_path / "model-config.yaml").read_text() == own.read_text()
    assert result.startup_timeout == "Kept your startupTimeout: 900 s"


def test_an_uncompiled_archive_packs_the_users_config_as_it_is(inputs, tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("batchSize: 4\n")
    result = archive_model(options(inputs, config_file=own, archive_format="no-archive"))
    assert (result.archive_path / "model-config.yaml").read_text() == "batchSize: 4\n"
    assert result.startup_timeout == ""
    assert startup_timeout_for(10) == 120 and startup_timeout_for(50) == 260


def test_precision_and_compile_at_flags(inputs):
    from aitune_core.archive import parse_args

    parsed = parse_args(["--model-name", "m", "--model-file", "m.py", "--sample", "s.pt", "--backend", "compile",
                         "--precision", "bf16", "--compile-at", "start"])
    assert (parsed.backend, parsed.precision, parsed.compile_at) == ("compile", "bf16", "start")
    result = archive_model(options(inputs, backend="eager", precision="bf16", archive_format="no-archive"))
    manifest = json.loads((result.archive_path / MANIFEST_NAME).read_text())
    assert manifest["describe"] == "TorchEagerBackend(precision='bf16')"
    assert manifest["accuracy"]["cosine"] >= 0.9999
    with pytest.raises(SystemExit):
        parse_args(["--model-name", "m", "--model-file", "m.py", "--sample", "s.pt", "--precision", "int4"])
