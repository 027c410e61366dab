"""A second virtual environment with what a plain TorchServe image has, and not this project.

Only torchserve, torch, torchao, pyyaml, numpy, psutil and pytest, from constraints.txt. Built once
under the ignored ``.venv-plain`` and reused while constraints.txt is unchanged. Run this file to
build it by hand.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAIN = REPO / ".venv-plain"
PACKAGES = ("torchserve", "torch", "torchao", "pyyaml", "numpy", "psutil", "pytest")


def plain_venv() -> Path:
    """The venv's folder, built (or rebuilt after a change of constraints.txt) as needed."""
    stamp = PLAIN / ".installed"
    wanted = hashlib.sha256((REPO / "constraints.txt").read_bytes() + " ".join(PACKAGES).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return PLAIN
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PLAIN)], check=True)
    subprocess.run([str(PLAIN / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                    "-c", str(REPO / "constraints.txt"), *PACKAGES], check=True)
    stamp.write_text(wanted)
    return PLAIN


if __name__ == "__main__":
    print(plain_venv())
