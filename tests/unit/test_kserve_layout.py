"""aitune-kserve without a cluster: KServe's storage layout, and the InferenceService against KServe's own schema.

The schema is the v1beta1 openAPIV3Schema of KServe's InferenceService CRD (tests/data/kserve): what
an API server validates. jsonschema checks types, enums and patterns; an API server would also
silently prune fields the schema does not know, so those are flagged here as errors (a misspelt key
would otherwise deploy without what it meant to set).
"""

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.errors import ArchiveError
from aitune_core.kserve import KServeOptions, write_layout
from models.builders import MODELS, mlp_inputs

SCHEMA = Path(__file__).parents[1] / "data" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
# KServe's webhook accepts these protocolVersion values (the CRD only says "string").
PROTOCOLS = {"v1", "v2", "grpc-v2"}


@pytest.fixture(scope="module")
def schema():
    return json.loads(gzip.decompress(SCHEMA.read_bytes()))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve")
    weights, samples = mlp_inputs(root / "inputs")
    config = root / "model-config.yaml"
    config.write_text("batchSize: 4\nmaxBatchDelay: 20\nresponseTimeout: 60\n")
    return archive_model(ArchiveOptions(model_name="mlp_int8wo", model_file=MODELS / "small.py", weights=weights,
                                        samples=samples, export_path=root / "store", config_file=config)).archive_path


def unknown_fields(value, schema, path="") -> list[str]:
    """Fields an API server would prune: keys the schema's properties do not name."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [field for index, item in enumerate(value) for field in unknown_fields(item, schema["items"], f"{path}[{index}]")]
    return []


def check(service: dict, schema: dict) -> None:
    jsonschema.validate(service, schema)
    assert unknown_fields(service, schema) == []
    assert service["spec"]["predictor"]["model"]["protocolVersion"] in PROTOCOLS


@pytest.mark.parametrize("gpus", [0, 1])
def test_layout_and_inference_service(tmp_path, archive, schema, gpus):
    out = tmp_path / "kserve"
    yaml_path = write_layout(KServeOptions(archives=[archive], out=out, gpus=gpus, min_replicas=2, max_replicas=5))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "config/config.properties", "inferenceservice.yaml", "model-store/mlp_int8wo.mar"]
    assert (out / "model-store" / "mlp_int8wo.mar").read_bytes() == archive.read_bytes()
    service = yaml.safe_load(yaml_path.read_text())
    check(service, schema)
    predictor = service["spec"]["predictor"]
    assert service["metadata"]["name"] == "mlp-int8wo"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 5)
    assert predictor["model"]["modelFormat"] == {"name": "pytorch"}
    assert predictor["model"]["protocolVersion"] == "v2"
    assert ("nvidia.com/gpu" in predictor["model"]["resources"]["limits"]) == bool(gpus)
    properties = dict(line.split("=", 1) for line in (out / "config" / "config.properties").read_text().splitlines()
                      if line and not line.startswith("#"))
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["enable_envvars_config"] == "false" and properties["install_py_dep_per_model"] == "true"
    assert properties["number_of_gpu"] == str(gpus)
    assert ("-XX:TieredStopAtLevel=1" in properties.get("vmargs", "")) == (not gpus)  # C1 only on a CPU pod
    snapshot = json.loads(properties["model_snapshot"])
    # The archive's model-config.yaml wins over the defaults.
    assert snapshot["models"]["mlp_int8wo"]["1.0"] == {"defaultVersion": True, "marName": "mlp_int8wo.mar",
                                                        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4,
                                                        "maxBatchDelay": 20, "responseTimeout": 60}


def test_the_schema_check_catches_mistakes(tmp_path, archive, schema):
    service = yaml.safe_load(write_layout(KServeOptions(archives=[archive], out=tmp_path / "k")).read_text())
    misspelt = json.loads(json.dumps(service))
    misspelt["spec"]["predictor"]["minReplica"] = 1
    assert unknown_fields(misspelt, schema) == [".spec.predictor.minReplica"]
    wrong_type = json.loads(json.dumps(service))
    wrong_type["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, schema)


def test_bad_inputs_write_nothing(tmp_path, archive):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArchiveError, match="already exists: use --force"):
        write_layout(KServeOptions(archives=[archive], out=tmp_path / "taken"))
    with pytest.raises(ArchiveError, match="must be a DNS label"):
        write_layout(KServeOptions(archives=[archive], out=tmp_path / "x", name="Not_A_Label"))
    not_a_mar = tmp_path / "model.mar"
    not_a_mar.write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="is not a .mar made by aitune-archive"):
        write_layout(KServeOptions(archives=[not_a_mar], out=tmp_path / "y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mar", "taken"]


def test_command_lines(tmp_path, archive, schema):
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "aitune-kserve"), str(archive), "--out", str(tmp_path / "a"), "--gpus", "1",
                           "--isvc-name", "mlp", "--storage-uri", "s3://bucket/mlp"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    service = yaml.safe_load((tmp_path / "a" / "inferenceservice.yaml").read_text())
    check(service, schema)
    assert service["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/mlp"
    again = subprocess.run([str(bin_dir / "aitune-kserve"), str(archive), "--out", str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [f"aitune-kserve: error: {tmp_path / 'a'} already exists: use --force "
                                                 "to replace it"]
    with zipfile.ZipFile(archive) as mar:
        assert "requirements.txt" in mar.namelist()


def test_archive_with_kserve_writes_both(tmp_path, schema):
    weights, samples = mlp_inputs(tmp_path / "inputs")
    done = subprocess.run([str(Path(sys.executable).parent / "aitune-archive"), "--model-name", "mlp",
                           "--model-file", str(MODELS / "small.py"), "--weights", str(weights), "--sample", str(samples[0]),
                           "--backend", "eager", "--export-path", str(tmp_path / "store"),
                           "--kserve", str(tmp_path / "kserve"), "--max-replicas", "7"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kserve" / "model-store" / "mlp.mar").read_bytes() == (tmp_path / "store" / "mlp.mar").read_bytes()
    service = yaml.safe_load((tmp_path / "kserve" / "inferenceservice.yaml").read_text())
    check(service, schema)
    assert service["spec"]["predictor"]["maxReplicas"] == 7
