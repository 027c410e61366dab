"""``aitune-kserve``: KServe's storage layout and an InferenceService for archived models.

KServe's PyTorch runtime (``kserve-torchserve``) downloads ``storageUri`` to ``/mnt/models`` and
starts ``torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties``; its image also runs KServe's wrapper, which
answers on port 8080 and forwards to TorchServe at ``inference_address`` for the models named in
``model_snapshot``. This writes that layout::

    DIR/config/config.properties
    DIR/model-store/NAME.mar
    DIR/inferenceservice.yaml      (v1beta1, modelFormat pytorch, protocolVersion v2)

Everything is staged in a temporary folder next to DIR and moved into place last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from aitune_core.errors import ArchiveError
from aitune_core.staging import move_into_place

CONFIG = Path("config") / "config.properties"
MODEL_STORE = "model-store"
INFERENCE_SERVICE = "inferenceservice.yaml"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's contents
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Per model in model_snapshot: the archive's model-config.yaml wins over these.
_SNAPSHOT_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120}


@dataclasses.dataclass
class KServeOptions:
    """What to deploy and how big; the CLI's flags, one field each."""

    archives: list[Path]
    out: Path
    name: str | None = None  # the InferenceService's name; default: the first model's, as a DNS label
    storage_uri: str | None = None  # default pvc://aitune-models/<name>
    gpus: int = 0
    cpu: str = "2"
    memory: str = "4Gi"
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = "concurrency"
    scale_target: int = 4
    force: bool = False


def archive_info(archive: Path) -> tuple[str, str, dict[str, Any]]:
    """A .mar's model name, version and the settings of its model-config.yaml (empty when it has none)."""
    try:
        with zipfile.ZipFile(archive) as mar:
            model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
            config_file = model.get("configFile")
            config = yaml.safe_load(mar.read(config_file)) if config_file else {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ArchiveError(f"{archive} is not a .mar made by aitune-archive: {error}") from None
    return model["modelName"], model.get("modelVersion", "1.0"), config or {}


def config_properties(models: list[tuple[str, str, dict[str, Any]]], gpus: int) -> str:
    """TorchServe's config.properties for KServe's runtime image, with a model_snapshot for its wrapper."""
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": {
        name: {version: {"defaultVersion": True, "marName": f"{name}.mar",
                         **{key: config.get(key, value) for key, value in _SNAPSHOT_DEFAULTS.items()}}}
        for name, version, config in models}}
    lines = [
        "# TorchServe in KServe's PyTorch runtime (written by aitune-kserve).",
        "# KServe's wrapper in the image answers on 8080 and forwards to TorchServe here, inside the pod.",
        "inference_address=http://0.0.0.0:8085",
        "management_address=http://0.0.0.0:8085",
        "metrics_address=http://0.0.0.0:8082",
        "grpc_inference_port=7070",
        "grpc_management_port=7071",
        "ts_open_inference_protocol=true",
        "# The wrapper calls TorchServe without a token; KServe's ingress is the front door.",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "# The runtime sets TS_SERVICE_ENVELOPE; an envelope would hand our handler one v2 input per",
        "# request and drop batches: environment variables stay out of this configuration.",
        "enable_envvars_config=false",
        "# Installs each archive's requirements.txt (torchao, tokenizers): the image has torch, not them.",
        "install_py_dep_per_model=true",
        "metrics_mode=prometheus",
        "model_metrics_auto_detect=true",
        f"number_of_gpu={gpus}",
        *([] if gpus else [
            "# A CPU pod: the frontend's Java compiled by C1 only, so C2's compiles do not land inside the model's",
            "# steps when its threads take every core (docs/benchmarks.md, \"Stalls\").",
            "vmargs=-XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1"]),
        f"model_store={MOUNT}/{MODEL_STORE}",
        "load_models=all",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
    ]
    return "\n".join(lines) + "\n"


def inference_service(options: KServeOptions, name: str) -> dict[str, Any]:
    """The InferenceService: KServe's PyTorch runtime, protocol v2, replicas and autoscaling, CPU or GPU."""
    resources = {"cpu": options.cpu, "memory": options.memory}
    limits = {**resources, **({"nvidia.com/gpu": str(options.gpus)} if options.gpus else {})}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": {
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "scaleMetric": options.scale_metric,
            "scaleTarget": options.scale_target,
            "model": {
                "modelFormat": {"name": "pytorch"},
                "protocolVersion": "v2",
                "storageUri": options.storage_uri or f"pvc://aitune-models/{name}",
                "resources": {"requests": resources, "limits": limits},
            },
        }},
    }


def write_layout(options: KServeOptions) -> Path:
    """Write DIR (config, model store, InferenceService YAML); returns the YAML's path."""
    if not options.archives:
        raise ArchiveError("give at least one .mar")
    models = [archive_info(Path(archive)) for archive in options.archives]
    name = options.name or models[0][0].lower().replace("_", "-").replace(".", "-")
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise ArchiveError(f"InferenceService name {name!r} must be a DNS label (lowercase letters, digits, '-'; "
                           "at most 63): give one with --name")
    if options.gpus < 0 or not 1 <= options.min_replicas <= options.max_replicas:
        raise ArchiveError(f"need --gpus >= 0 and 1 <= --min-replicas <= --max-replicas, got {options.gpus}, "
                           f"{options.min_replicas}, {options.max_replicas}")
    out = Path(options.out)
    if out.exists() and not options.force:
        raise ArchiveError(f"{out} already exists: use --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (staging / CONFIG).parent.mkdir(parents=True)
        (staging / CONFIG).write_text(config_properties(models, options.gpus))
        (staging / MODEL_STORE).mkdir()
        for archive, (model_name, _, _) in zip(options.archives, models):
            shutil.copyfile(archive, staging / MODEL_STORE / f"{model_name}.mar")
        (staging / INFERENCE_SERVICE).write_text(yaml.safe_dump(inference_service(options, name), sort_keys=False))
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / INFERENCE_SERVICE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizing flags, shared by ``aitune-kserve`` and ``aitune-archive --kserve``."""
    group = parser.add_argument_group("KServe (InferenceService)")
    group.add_argument("--isvc-name", dest="isvc_name", help="InferenceService name (default: the model's)")
    group.add_argument("--storage-uri", help="where DIR will be uploaded (default pvc://aitune-models/NAME)")
    group.add_argument("--gpus", type=int, default=0, help="GPUs per replica (0: CPU only)")
    group.add_argument("--cpu", default="2", help="CPU request and limit per replica")
    group.add_argument("--memory", default="4Gi", help="memory request and limit per replica")
    group.add_argument("--min-replicas", type=int, default=1)
    group.add_argument("--max-replicas", type=int, default=3)
    group.add_argument("--scale-metric", default="concurrency", choices=["concurrency", "rps", "cpu", "memory"])
    group.add_argument("--scale-target", type=int, default=4, help="autoscaling target per replica")


def options_from(args: argparse.Namespace, archives: list[Path], out: Path, force: bool) -> KServeOptions:
    """KServeOptions from the parsed sizing flags."""
    return KServeOptions(archives=archives, out=out, name=args.isvc_name, storage_uri=args.storage_uri,
                         gpus=args.gpus, cpu=args.cpu, memory=args.memory, min_replicas=args.min_replicas,
                         max_replicas=args.max_replicas, scale_metric=args.scale_metric,
                         scale_target=args.scale_target, force=force)


def main(argv: list[str] | None = None) -> int:
    """``aitune-kserve --out DIR model_store/NAME.mar ...``: one line and exit 1 on any error."""
    parser = argparse.ArgumentParser(prog="aitune-kserve", description=__doc__.splitlines()[0])
    parser.add_argument("archives", nargs="+", type=Path, help=".mar files made by aitune-archive")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (KServe's storage layout)")
    parser.add_argument("--force", action="store_true", help="replace an existing DIR")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        path = write_layout(options_from(args, args.archives, args.out, args.force))
    except ArchiveError as error:
        print(f"aitune-kserve: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {args.out}: upload it to the storageUri, then kubectl apply -f {path}")
    return 0
