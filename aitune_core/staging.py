"""Writing outputs whole or not at all: build in a temporary folder beside the target, move into place last."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(staged: Path, target: Path) -> None:
    """Replace ``target`` (a file, a folder or nothing) by ``staged``.

    A symbolic link at ``target`` is replaced, never followed: its target stays untouched.
    """
    if target.is_symlink() or (target.is_file() and staged.is_dir()):
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(staged, target)
