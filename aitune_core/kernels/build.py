"""The CPU kernels, compiled ahead of serving for a few instruction-set levels, and the build a CPU loads.

A compiler never runs in a starting worker when the archive carries builds that fit its CPU. ``aitune-archive``
compiles the kernels (``cpu_weight_only.cpp``: the products, ``cpu_amx_packed.cpp``: int8 products of weights in
the AMX layout, ``cpu_attention.cpp``: attention over the KV cache, ``cpu_ops.cpp``: their registration) once per
machine for every level of ``LEVELS``, with explicit flags (never ``-march=native``), and ships the shared
libraries in the archive's copy of this package (``builds/``, with an index of their digests). A worker reads its
CPU's features, loads the best shipped build that CPU runs (milliseconds) and names it in its ready line.

Where no shipped build fits (a checkout, another torch, a CPU that is not x86-64), the best level this CPU runs is
loaded from the machine's cache (``AITUNE_CACHE_DIR``, default ``~/.cache/aitune``), or built into it: under an
``fcntl.flock`` lock that the operating system releases when its holder dies, in a temporary folder renamed whole
into place, so that a process killed at any moment leaves nothing that blocks or breaks the next one. Where nothing
can be built (no compiler) the ops fall back to a plain dequantize-then-matmul in torch (correct, slower), and
``failure()`` says why.

``AITUNE_CPU_KERNELS`` is the dispatch switch: a level's name runs that build (a lower one than the CPU could run,
to test what a smaller CPU answers, or ``avx512`` to switch AMX off), ``torch`` runs the torch fallback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from aitune_core.precision import cpu_features

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
# The registration (pybind and torch's library API: the heavy headers) is compiled once at the baseline level and
# linked into every level's library; the kernels are compiled per level.
GLUE = HERE / "cpu_ops.cpp"
KERNELS = [HERE / "cpu_weight_only.cpp", HERE / "cpu_attention.cpp", HERE / "cpu_amx_packed.cpp"]
SOURCES = [*KERNELS, GLUE]
HEADERS = [HERE / "cpu_kernels.h", HERE / "cpu_amx.h"]
SHIPPED = HERE / "builds"  # an archive's builds, beside its copy of the sources
INDEX = "index.json"
SWITCH = "AITUNE_CPU_KERNELS"  # a level's name, or TORCH_FALLBACK
TORCH_FALLBACK = "torch"
# Bumped when the way a build is made changes without the sources changing.
BUILD_RECIPE = 1
MODULE = "aitune_kernels"
COMMON_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-std=c++20"]  # OpenMP: ATen's parallel_for runs on torch's threads


@dataclasses.dataclass(frozen=True)
class Level:
    """An instruction-set level the kernels are built for: gcc's flags, and the CPU features (as
    ``torch.cpu.get_capabilities()`` names them) a CPU needs to run that build."""

    name: str
    flags: tuple[str, ...]
    needs: tuple[str, ...]
    summary: str

    @property
    def file(self) -> str:
        """The build's file name (every level's library is the Python module ``MODULE``)."""
        return f"{MODULE}_{self.name}.so"

    def runs_on(self, features: dict[str, Any]) -> bool:
        return platform.machine() in ("x86_64", "AMD64") and all(features.get(name) for name in self.needs)


_V3 = ("avx", "avx2", "fma3", "bmi", "bmi2", "f16c", "lzcnt")
_V4 = (*_V3, "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_cd")
# Best first. x86-64-v4 is AVX-512 F/BW/VL/DQ/CD (Skylake-SP, Ice Lake, Zen 4 and later); AMX adds the int8 tiles
# (Sapphire Rapids and later); x86-64-v3 is AVX2 with FMA (Haswell, Zen 1 and later); x86-64 runs anywhere.
LEVELS = (
    Level("amx", ("-march=x86-64-v4", "-mamx-tile", "-mamx-int8"), (*_V4, "amx_tile", "amx_int8"),
          "AVX-512 + AMX int8 tiles"),
    Level("avx512", ("-march=x86-64-v4",), _V4, "AVX-512"),
    Level("avx2", ("-march=x86-64-v3",), _V3, "AVX2 + FMA"),
    Level("x86_64", ("-march=x86-64",), (), "SSE2 (any x86-64)"),
)
BY_NAME = {level.name: level for level in LEVELS}


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled (no compiler, a compiler error, no room to write)."""


@dataclasses.dataclass
class Loaded:
    """The build this process runs, and how it got it (for the worker's ready line)."""

    level: Level
    module: ModuleType
    origin: str  # "shipped in the archive", "from this machine's cache", "compiled now (N s)"
    seconds: float


_failure: list[str] = []
_loaded: list[Loaded] = []


def levels_here(features: dict[str, Any] | None = None) -> list[Level]:
    """The levels this CPU (or one with ``features``) runs, best first."""
    features = cpu_features() if features is None else features
    return [level for level in LEVELS if level.runs_on(features)]


def source_digest() -> str:
    """What decides whether a build fits these sources: the sources, the recipe and torch's version (its ABI)."""
    import torch

    code = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    return hashlib.sha256(code + f"{BUILD_RECIPE} {torch.__version__}".encode()).hexdigest()[:16]


def cache_root() -> Path:
    """This machine's cache of builds: ``$AITUNE_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/aitune/kernels``,
    else ``~/.cache/aitune/kernels``."""
    root = os.environ.get("AITUNE_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aitune" / "kernels"


def cached_build(level: Level) -> Path:
    """Where this machine keeps ``level``'s build of these sources."""
    return cache_root() / source_digest() / level.file


# -- compiling ------------------------------------------------------------------------------------------------------

def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compile_flags(level: Level) -> list[str]:
    from torch.utils import cpp_extension

    includes = [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
    return [*COMMON_FLAGS, *level.flags, f"-DTORCH_EXTENSION_NAME={MODULE}", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-I{HERE}", *includes, "-isystem", sysconfig.get_paths()["include"]]


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    # OpenMP's runtime is torch's own (already loaded): linking another libgomp would run two in one process.
    return ["-shared", *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch",
            "-ltorch_python"]


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:  # no compiler at all
        raise KernelBuildError(f"{what}: cannot run {command[0]} ({error.strerror or error})") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        detail = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {done.returncode}")
        raise KernelBuildError(f"{what}: {command[0]} failed: {detail.strip()[:300]}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: waited for while another process builds; the OS releases it when its
    holder dies, so a killed build never blocks the next one (the file itself is harmless to leave)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_levels(levels: list[Level], jobs: int | None = None) -> dict[str, Path]:
    """Compile (or find in this machine's cache) ``levels``' builds; each level's path in the cache.

    Under one lock per cache folder (a second process waits, then finds the builds made). Every file (an object, a
    library) is written to a temporary name and renamed whole, so a build killed at any moment leaves finished
    objects the next one reuses, never a half-written file. The compilations run side by side (``jobs`` at a time,
    default one a core). Raises KernelBuildError.
    """
    folder = cache_root() / source_digest()
    paths = {level.name: folder / level.file for level in levels}
    if all(path.exists() for path in paths.values()):
        return paths
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KernelBuildError(f"cannot write the kernels' cache {folder}: {error.strerror or error}") from None
    with _locked(folder / ".lock"):
        missing = [level for level in levels if not paths[level.name].exists()]  # made while we waited
        if missing:
            _compile_into(folder, missing, jobs or os.cpu_count() or 1)
    return paths


def _written_whole(target: Path) -> Path:
    """A temporary name beside ``target``, for a file renamed to ``target`` once written."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _compile_into(folder: Path, levels: list[Level], jobs: int) -> None:
    """Compile ``levels`` into ``folder``; the caller holds its lock."""
    for stale in folder.rglob(".*.tmp"):  # a build killed before its rename: we hold the lock it held
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    objects = folder / "objects"
    glue = objects / GLUE.with_suffix(".o").name  # at the baseline level: every CPU of every level runs it
    steps = [(GLUE, BY_NAME["x86_64"], glue)]
    steps += [(source, level, objects / level.name / source.with_suffix(".o").name)
              for level in levels for source in KERNELS]
    steps = [step for step in steps if not step[2].exists()]

    def compile_one(source: Path, level: Level, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = _written_whole(target)
        _run([_compiler(), *_compile_flags(level), "-c", str(source), "-o", str(partial)],
             f"{source.name} ({level.name})")
        os.replace(partial, target)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(compile_one, *step) for step in steps]:
            future.result()
    for level in levels:
        library = folder / level.file
        partial = _written_whole(library)
        inputs = [str(objects / level.name / source.with_suffix(".o").name) for source in KERNELS] + [str(glue)]
        _run([_compiler(), *inputs, *_link_flags(), "-o", str(partial)], f"linking {level.file}")
        os.replace(partial, library)
    logger.info("Compiled the CPU kernels for %s in %.0f s (%s)", ", ".join(level.name for level in levels),
                time.perf_counter() - started, folder)


# -- shipping (archive time) ----------------------------------------------------------------------------------------

def ship(package_kernels: Path, progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Put every level's build (compiled now, or from this machine's cache) into an archive's copy of this package
    (``package_kernels``: its ``aitune_core/kernels``), with an index the worker checks; returns the index."""
    if not all(cached_build(level).exists() for level in LEVELS):
        progress(f"Compiling the CPU kernels for {', '.join(level.name for level in LEVELS)} (once per machine and "
                 f"version of the kernels, into {cache_root()}; about a minute on 2 cores)")
    built = build_levels(list(LEVELS))
    target = package_kernels / SHIPPED.name
    target.mkdir(parents=True, exist_ok=True)
    import torch

    index: dict[str, Any] = {"digest": source_digest(), "torch": torch.__version__, "levels": {}}
    for level in LEVELS:
        data = built[level.name].read_bytes()
        (target / built[level.name].name).write_bytes(data)
        index["levels"][level.name] = {"file": built[level.name].name, "sha256": hashlib.sha256(data).hexdigest()}
    (target / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def shipped_builds() -> dict[str, Path]:
    """The builds this package's archive carries that fit these sources and this torch, by level name."""
    path = SHIPPED / INDEX
    if not path.is_file():
        return {}
    import torch

    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("The archive's kernel builds are unreadable (%s): ignoring them", error)
        return {}
    if index.get("digest") != source_digest() or index.get("torch") != torch.__version__:
        logger.warning("The archive's kernel builds were made for torch %s (this worker has %s) or other sources: "
                       "ignoring them", index.get("torch"), torch.__version__)
        return {}
    builds = {}
    for name, entry in index.get("levels", {}).items():
        file = SHIPPED / Path(entry["file"]).name
        if name in BY_NAME and file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]:
            builds[name] = file
    return builds


# -- loading (any process) ------------------------------------------------------------------------------------------

def load_build(path: Path) -> ModuleType:
    """Import the kernels' shared library at ``path``. torch is imported first: the library resolves its symbols
    against the torch already loaded."""
    import torch  # noqa: F401

    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@functools.cache
def load_level(name: str) -> ModuleType:
    """``name``'s build, from the archive, this machine's cache, or compiled into that cache now (tests compare
    levels with it). ValueError for a level this CPU cannot run; KernelBuildError where it cannot be built."""
    level = BY_NAME[name]
    if not level.runs_on(cpu_features()):
        raise ValueError(f"this CPU cannot run the {name} build of the kernels (it needs {', '.join(level.needs)})")
    path = shipped_builds().get(name) or build_levels([level])[name]
    return load_build(path)


def choose() -> Loaded:
    """The best build this CPU runs: shipped, cached, or compiled now. Raises where none can be had."""
    here = levels_here()
    wanted = os.environ.get(SWITCH, "").strip()
    if wanted and wanted != TORCH_FALLBACK:
        if wanted not in BY_NAME:
            raise KernelBuildError(f"{SWITCH}={wanted!r} is no level: expected one of "
                                   f"{', '.join(BY_NAME)} or {TORCH_FALLBACK}")
        if BY_NAME[wanted] not in here:
            raise KernelBuildError(f"{SWITCH}={wanted}: this CPU cannot run that build (it needs "
                                   f"{', '.join(BY_NAME[wanted].needs)})")
        here = [BY_NAME[wanted]]
    if not here:
        raise KernelBuildError(f"no build of the kernels runs on this CPU ({platform.machine()})")
    started = time.perf_counter()
    shipped = shipped_builds()
    for level in here:
        for path, origin in ((shipped.get(level.name), "shipped in the archive"),
                             (cached_build(level), "from this machine's cache")):
            if path is None or not path.is_file():
                continue
            try:
                return Loaded(level, load_build(path), origin, time.perf_counter() - started)
            except ImportError as error:  # e.g. built against another torch's symbols
                logger.warning("The %s build at %s does not load here (%s)", level.name, path, error)
    # Nothing built fits: compile the best level this CPU runs (the only compiler a worker may ever run).
    level = here[0]
    logger.warning("No build of the CPU kernels fits this CPU and torch: compiling the %s build now "
                   "(once per machine, into %s)", level.name, cache_root())
    path = build_levels([level])[level.name]
    seconds = time.perf_counter() - started
    return Loaded(level, load_build(path), f"compiled now in {seconds:.0f} s", seconds)


@functools.cache
def native() -> ModuleType | None:
    """The kernels this process runs (see the module's docstring); None (and ``failure()`` says why) where none
    can be had or the switch says ``torch``."""
    if os.environ.get(SWITCH, "").strip() == TORCH_FALLBACK:
        _failure.append(f"switched off ({SWITCH}={TORCH_FALLBACK})")
        return None
    try:
        loaded = choose()
    except (KernelBuildError, OSError, ImportError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
        _failure.append(reason)
        logger.warning("The CPU kernels cannot run here (%s): using torch's dequantize-then-matmul", reason)
        return None
    _loaded.append(loaded)
    return loaded.module


def tried() -> bool:
    """True once a product in this process has asked for the kernels (loaded, built, or failed)."""
    return native.cache_info().currsize > 0


def failure() -> str | None:
    """Why ``native()`` is None, once it has been tried; else None."""
    return _failure[0] if _failure else None


def loaded() -> Loaded | None:
    """The build ``native()`` loaded, once it has; else None."""
    return _loaded[0] if _loaded else None


def describe() -> str:
    """One line for a worker's ready message: which kernels run, and where their build came from."""
    if native() is not None:
        build = loaded()
        return (f"aitune CPU kernels, {build.level.name} build ({build.level.summary}; {build.origin}, "
                f"loaded in {build.seconds * 1000:.0f} ms): {native().tiles()}")
    return (f"torch (products: dequantize-then-matmul; attention: gathered) (the CPU kernels do not run here: "
            f"{failure()})")


def main(argv: list[str] | None = None) -> int:
    """``python -m aitune_core.kernels.build``: compile every level into this machine's cache now (what the first
    ``aitune-archive`` would do), and say which one this CPU runs."""
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    paths = build_levels(list(LEVELS))
    print(f"CPU kernels for {', '.join(paths)} in {paths[LEVELS[0].name].parent} ({time.perf_counter() - started:.0f} s)")
    print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
