"""The CPU weight-only kernels, compiled for the machine that runs them and cached.

``native()`` compiles the C++ sources (``cpu_weight_only.cpp``: the products, ``cpu_amx_packed.cpp``: int8
products of weights in the AMX layout, ``cpu_attention.cpp``: attention over the KV cache, ``cpu_ops.cpp``: their
registration) with gcc for this CPU (``-march=native``) the first time a process needs it, into torch's
extensions folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), under a name made of the
source's digest and the CPU's features: a worker on another CPU builds its own (~30 s, once), the same CPU loads
the cached build in milliseconds. Where it cannot be built (no compiler, no ninja) ``native()`` is None, the
reason is kept, and the ops fall back to a plain dequantize-then-matmul in torch (correct, slower); the worker's
ready line names which one runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_weight_only.cpp", HERE / "cpu_attention.cpp", HERE / "cpu_amx_packed.cpp", HERE / "cpu_ops.cpp"]
HEADERS = [HERE / "cpu_kernels.h", HERE / "cpu_amx.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: ATen's parallel_for runs on torch's threads
_failure: list[str] = []


def build_name(flags: list[str] = FLAGS) -> str:
    """The extension's name: source, flags, CPU features and torch version decide which build fits."""
    import torch

    from aitune_core.precision import cpu_features

    features = json.dumps(cpu_features(), sort_keys=True, default=str)
    code = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(code + " ".join(flags).encode() + features.encode()
                            + torch.__version__.encode()).hexdigest()[:16]
    return f"aitune_weight_only_{digest}"


def compile_kernels(flags: list[str]) -> ModuleType:
    """Compile (or load the cached build of) the kernels with these gcc flags; raises where they cannot be built.
    ``native()`` builds for this CPU; other flags (an older instruction set) build the tiles other CPUs run."""
    from torch.utils import cpp_extension

    # ninja comes with the project's packages: make the environment's bin/ findable by torch's builder.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(build_name(flags), [str(path) for path in SOURCES], extra_cflags=flags,
                              extra_include_paths=[str(HERE)], verbose=False)


@functools.cache
def native() -> ModuleType | None:
    """The compiled kernels for this CPU, built on first use; None (and ``failure()`` says why) where they cannot be."""
    try:
        return compile_kernels(FLAGS)
    except Exception as error:  # no compiler, no ninja, a read-only cache: the torch fallback still answers
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
        _failure.append(reason)
        logger.warning("The CPU weight-only kernels could not be built (%s): using torch's dequantize-then-matmul",
                       reason)
        return None


def tried() -> bool:
    """True once a product in this process has asked for the kernels (built, loaded, or failed)."""
    return native.cache_info().currsize > 0


def failure() -> str | None:
    """Why ``native()`` is None, once it has been tried; else None."""
    return _failure[0] if _failure else None


def describe() -> str:
    """One line for a worker's ready message: which kernels run."""
    if native() is not None:
        return f"aitune CPU kernels built for this CPU ({build_name()}: {native().tiles()})"
    return (f"torch (products: dequantize-then-matmul; attention: gathered) (the CPU kernels could not be built: "
            f"{failure()})")
