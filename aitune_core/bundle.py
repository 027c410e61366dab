"""What an archive carries so that it runs on a TorchServe where this project is not installed.

KServe's TorchServe runtime image has TorchServe and torch, not aitune_core nor torchao. So every
.mar holds its own copy of ``aitune_core`` (the handler imports it first: the code that reads a
checkpoint is the code that wrote it) and a ``requirements.txt`` pinning what such an image lacks,
which TorchServe installs per model when ``install_py_dep_per_model=true``.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import aitune_core

REQUIREMENTS_NAME = "requirements.txt"
# Needed by every archive's worker beyond TorchServe and torch; tokenizers only by text models.
SERVING_PACKAGES = ("torchao",)
TEXT_PACKAGES = ("tokenizers",)


def stage_package(folder: Path) -> Path:
    """Copy ``aitune_core`` (sources only) into ``folder``; returns ``folder``.

    torch-model-archiver flattens a folder given in ``--extra-files`` into the archive root, so
    it is given ``folder``, whose one entry is ``aitune_core/``.
    """
    source = Path(aitune_core.__file__).resolve().parent
    shutil.copytree(source, folder / "aitune_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return folder


def requirements(text_model: bool) -> str:
    """``requirements.txt`` for the archive: the packages the worker needs, pinned to the versions here."""
    lines = []
    for package in SERVING_PACKAGES + (TEXT_PACKAGES if text_model else ()):
        try:
            lines.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            lines.append(package)
    return "\n".join(lines) + "\n"
