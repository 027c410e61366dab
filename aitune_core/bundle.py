"""What an archive carries so that it runs on a TorchServe where this project is not installed.

KServe's TorchServe runtime image has TorchServe and torch, not aitune_core nor torchao. So every
.mar holds its own copy of ``aitune_core`` (the handler imports it first: the code that reads a
checkpoint is the code that wrote it) and a ``requirements.txt`` pinning what such an image lacks
(torchao for a quantized backend; tokenizers for a text model; what the model file imports), which
TorchServe installs per model when ``install_py_dep_per_model=true``.
"""

from __future__ import annotations

import ast
import logging
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

import aitune_core

logger = logging.getLogger(__name__)

REQUIREMENTS_NAME = "requirements.txt"
# Needed by a text model's worker beyond TorchServe and torch (a backend names its own: Backend.REQUIRES).
TEXT_PACKAGES = ("tokenizers",)
# What a TorchServe image already has: never reinstalled beside it (a second torch or numpy in
# the model's folder would shadow the image's own).
IMAGE_PACKAGES = {"torch", "numpy", "pyyaml", "psutil", "packaging", "pillow", "torchserve", "aitune-torchserve"}


def stage_package(folder: Path, cpu_kernels: bool = False,
                  progress: Callable[[str], None] = logger.info) -> dict[str, Any] | None:
    """Copy ``aitune_core`` (sources only) into ``folder``, with the CPU kernels' builds for every instruction-set
    level where ``cpu_kernels`` (a worker then loads the one its CPU runs and never compiles); the builds' index, or
    None.

    torch-model-archiver flattens a folder given in ``--extra-files`` into the archive root, so
    it is given ``folder``, whose one entry is ``aitune_core/``.
    """
    source = Path(aitune_core.__file__).resolve().parent
    shutil.copytree(source, folder / "aitune_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "builds"))
    if not cpu_kernels:
        return None
    from aitune_core.kernels import build

    return build.ship(folder / "aitune_core" / "kernels", progress)


def imported_distributions(model_file: Path) -> list[str]:
    """The installed distributions whose modules ``model_file`` imports (anywhere in it), stdlib excluded."""
    modules = set()
    for node in ast.walk(ast.parse(Path(model_file).read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    owners = packages_distributions()
    found = {dist for module in modules - set(sys.stdlib_module_names) for dist in owners.get(module, ())}
    return sorted(found, key=str.lower)


def requirements(packages: list[str]) -> str:
    """``requirements.txt`` for the archive: the packages the worker needs (its backends', a text model's,
    what the model file imports), pinned to the versions here; what a TorchServe image has is left out."""
    lines = []
    for package in dict.fromkeys(packages):
        if package.lower() in IMAGE_PACKAGES:
            continue
        try:
            lines.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            lines.append(package)
    return "\n".join(lines) + "\n"
