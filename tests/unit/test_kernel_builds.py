"""How the CPU kernels' builds are made, kept and chosen: a build killed at any moment leaves nothing that blocks or
breaks the next one, two processes building at once build once, an archive's builds are checked before they load,
and a machine without a compiler falls back to torch with the reason.

Builds here run a stand-in for the compiler (a script that writes its output slowly and logs each call), so that a
build can be killed in the middle, in seconds; the real compiler builds every level in test_kernels.py.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aitune_core.kernels import build

REPO = Path(__file__).resolve().parents[2]
STAND_IN = """#!{python}
import os, sys, time
args = sys.argv[1:]
out = args[args.index("-o") + 1]
folder, name = os.path.split(out)  # name: .TARGET.PID.tmp
with open(os.environ["COMPILER_LOG"], "a") as log:
    log.write(("link " if "-shared" in args else "compile ") + os.path.join(folder, name[1:].rsplit(".", 2)[0]) + "\\n")
with open(out, "wb") as library:  # written in pieces, as a compiler does: a kill leaves half a file
    for _ in range(5):
        library.write(b"built ")
        library.flush()
        time.sleep(float(os.environ["COMPILER_SECONDS"]) / 5)
"""
STEPS = 1 + len(build.KERNELS) * len(build.LEVELS)  # the glue once, each kernel source per level


@pytest.fixture
def stand_in(tmp_path):
    compiler = tmp_path / "c++"
    compiler.write_text(STAND_IN.format(python=sys.executable))
    compiler.chmod(0o755)
    log = tmp_path / "compiler.log"
    env = {**os.environ, "CXX": str(compiler), "COMPILER_LOG": str(log), "AITUNE_CACHE_DIR": str(tmp_path / "cache"),
           "COMPILER_SECONDS": "0.25", "PYTHONPATH": str(REPO)}
    return env, log, tmp_path / "cache" / "kernels"


def builder(env, jobs=1):
    code = f"from aitune_core.kernels import build; build.build_levels(list(build.LEVELS), jobs={jobs})"
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True, stderr=subprocess.PIPE)


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def finished(cache):
    [folder] = cache.iterdir()
    libraries = sorted(path.name for path in folder.glob("*.so"))
    leftovers = [path for path in folder.rglob(".*.tmp")]
    return folder, libraries, leftovers


def test_a_build_killed_midway_leaves_nothing_that_blocks_or_breaks_the_next(stand_in):
    env, log, cache = stand_in
    first = builder(env)
    deadline = time.monotonic() + 60
    while len(calls(log)) < 4 and time.monotonic() < deadline:  # three objects done, the fourth half written
        time.sleep(0.05)
    time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len(calls(log)) - 1  # the last call was cut
    folder, libraries, leftovers = finished(cache)
    assert not libraries and (folder / ".lock").exists()  # the lock file stays; the OS released its lock
    second = builder(env)
    assert second.wait(timeout=60) == 0, second.stderr.read().decode()[-2000:]
    folder, libraries, leftovers = finished(cache)
    assert libraries == sorted(level.file for level in build.LEVELS) and not leftovers
    assert all(path.read_bytes() == b"built " * 5 for path in folder.rglob("*.o"))  # every object whole
    compiled = [line for line in calls(log) if line.startswith("compile")]
    assert len(compiled) == STEPS + 1  # the cut object again, the finished ones not
    assert len(set(compiled[:done_before])) == done_before


def test_two_processes_building_at_once_build_each_file_once(stand_in):
    env, log, cache = stand_in
    both = [builder(env, jobs=2), builder(env, jobs=2)]
    assert [process.wait(timeout=60) for process in both] == [0, 0]
    _, libraries, leftovers = finished(cache)
    assert libraries == sorted(level.file for level in build.LEVELS) and not leftovers
    assert len(calls(log)) == STEPS + len(build.LEVELS) == len(set(calls(log)))


def test_without_a_compiler_the_ops_fall_back_to_torch_and_say_why(tmp_path):
    """No shipped build (a checkout) and no compiler: native() is None, the reason names the compiler, and the
    ops still answer (dequantize-then-matmul in torch)."""
    code = ("import torch; from aitune_core.kernels import build, ops; from aitune_core.kernels.quantize import "
            "quantize_int8; w, s = quantize_int8(torch.randn(8, 64)); x = torch.randn(2, 64); "
            "assert torch.allclose(ops.int8_weight_only_mm(x, w, s), x @ ops.dequantize_int8(w, s).T, atol=1e-5); "
            "print(build.native() is None, '|', build.describe())")
    env = {**os.environ, "CXX": "/bin/false", "AITUNE_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    none, described = done.stdout.strip().split(" | ")
    assert none == "True" and "the CPU kernels do not run here" in described and "/bin/false failed" in described


def test_a_switch_to_torch_turns_the_kernels_off():
    code = "from aitune_core.kernels import build; print(build.native() is None, '|', build.describe())"
    env = {**os.environ, build.SWITCH: build.TORCH_FALLBACK, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == f"True | torch (products: dequantize-then-matmul; attention: gathered) (the CPU " \
                                  f"kernels do not run here: switched off ({build.SWITCH}={build.TORCH_FALLBACK}))"


def test_an_archives_builds_are_used_only_when_they_are_what_its_index_says(tmp_path, monkeypatch):
    shipped = tmp_path / "builds"
    shipped.mkdir()
    level = build.LEVELS[-1]
    (shipped / level.file).write_bytes(b"a library")
    index = {"digest": build.source_digest(), "torch": torch.__version__,
             "levels": {level.name: {"file": level.file, "sha256": hashlib.sha256(b"a library").hexdigest()}}}
    (shipped / build.INDEX).write_text(json.dumps(index))
    monkeypatch.setattr(build, "SHIPPED", shipped)
    assert build.shipped_builds() == {level.name: shipped / level.file}
    (shipped / level.file).write_bytes(b"another library")  # changed after archiving
    assert build.shipped_builds() == {}
    (shipped / level.file).write_bytes(b"a library")
    (shipped / build.INDEX).write_text(json.dumps({**index, "torch": "2.0.0"}))  # another torch's ABI
    assert build.shipped_builds() == {}
    (shipped / build.INDEX).write_text(json.dumps({**index, "digest": "0" * 16}))  # other sources
    assert build.shipped_builds() == {}
