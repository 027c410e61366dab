"""Checkpoint and manifest on disk: torch.save / torch.load(weights_only=True), sha256 of every file.

The checkpoint is ``Backend.to_dict()`` written by ``torch.save``; it is only ever read back
with ``weights_only=True``, so loading it cannot run code. The manifest beside it is plain JSON
and lists the sha256 of every file the worker reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from aitune_core.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
MANIFEST_NAME = "aitune_manifest.json"
MANIFEST_FORMAT_VERSION = 1


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: Path | str) -> None:
    """Write a backend state with ``torch.save``."""
    torch.save(state, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; CheckpointError if it is unsafe or broken.

    A checkpoint of quantized weights needs torchao imported first (importing it registers its tensor
    classes as safe globals): import the backend's class (``backends.backend_class``) before this.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"Checkpoint {path} cannot be loaded safely (weights_only=True): {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(state).__name__}, expected a backend state dict")
    return state


def check_file_name(name: str) -> str:
    """``name`` if it is a plain file name; CheckpointError for anything that could leave the model dir."""
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"Manifest names a file {name!r}: expected a plain file name inside the model dir")
    return name


def write_manifest(directory: Path, manifest: dict[str, Any], files: list[Path]) -> Path:
    """Write ``MANIFEST_NAME`` into ``directory``: ``manifest`` plus the format version and sha256 of ``files``."""
    full = {
        "format_version": MANIFEST_FORMAT_VERSION,
        **manifest,
        "files": {check_file_name(path.name): sha256_file(path) for path in files},
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(model_dir: Path | str) -> dict[str, Any]:
    """Read and check the manifest of an unpacked archive, and verify the sha256 of every file it lists."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: archive the model with aitune-archive") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): re-archive the model") from None
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}, this aitune_core reads version "
            f"{MANIFEST_FORMAT_VERSION}: re-archive the model with this version of aitune-archive"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path} lists no files with their sha256: re-archive the model")
    for name, expected in files.items():
        file_path = model_dir / check_file_name(name)
        if not file_path.is_file():
            raise CheckpointError(f"{file_path} is missing from the archive: re-archive the model")
        actual = sha256_file(file_path)
        if actual != expected:
            raise CheckpointError(
                f"sha256 mismatch for {file_path}: manifest says {expected}, file has {actual}; "
                "the file was changed after archiving: re-archive the model"
            )
    return manifest
