"""Atomic writes of file sets: a reader sees the old set or the new one, never a mix, and a
failed write leaves what was there (PEFT adapter folders, exported models, run records)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def write_atomically(directory: str, files: dict[str, Callable[[str], None]]) -> None:
    """``files``: name -> writer(path). All are written into a staging folder beside
    ``directory``, which then takes its place in one rename; files of an existing folder that
    ``files`` does not name are carried over. Only the swap itself (two renames) is not one
    step: a crash between them leaves the old folder whole, set aside as ``.NAME.old-*``."""
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
    try:
        for file_name, write in files.items():
            write(os.path.join(staging, file_name))
        if not os.path.isdir(directory):
            os.rename(staging, directory)
            return
        for kept in os.listdir(directory):
            if kept not in files:
                source = os.path.join(directory, kept)
                copy = shutil.copytree if os.path.isdir(source) else shutil.copy2
                copy(source, os.path.join(staging, kept))
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
