"""Small operations on nn.Modules shared by the backends and the loaders."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from aitune_core.errors import CheckpointError


def module_on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An eval-mode copy of ``module`` on ``device``; the caller's module is left untouched."""
    return copy.deepcopy(module).to(device).eval().requires_grad_(False)


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], assign: bool) -> None:
    """Load a state_dict strictly; CheckpointError naming the keys when it does not fit."""
    try:
        module.load_state_dict(weights, strict=True, assign=assign)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[:3])
        raise CheckpointError(
            f"The stored weights do not fit {type(module).__name__}: {detail}"
        ) from None
    module.eval().requires_grad_(False)


def load_module_class(model_file: Path | str, class_name: str | None = None) -> type[torch.nn.Module]:
    """Import ``model_file`` and return its nn.Module subclass named ``class_name``.

    Without ``class_name`` the file must define exactly one nn.Module subclass. The file is
    imported under a private name, so its file name never shadows another module.
    """
    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"Model file {path} does not exist")
    module_name = f"aitune_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    python_module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = python_module
    spec.loader.exec_module(python_module)
    defined = {
        name: value
        for name, value in vars(python_module).items()
        if inspect.isclass(value) and issubclass(value, torch.nn.Module) and value.__module__ == module_name
    }
    if class_name is not None:
        if class_name not in defined:
            raise ValueError(
                f"Model file {path} defines no nn.Module class {class_name!r}; "
                f"it defines: {', '.join(sorted(defined)) or 'none'}"
            )
        return defined[class_name]
    if len(defined) != 1:
        raise ValueError(
            f"Model file {path} defines {len(defined)} nn.Module classes "
            f"({', '.join(sorted(defined)) or 'none'}): name one with --model-class"
        )
    return next(iter(defined.values()))
