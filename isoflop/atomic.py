"""Atomic file writes, shared by run directories, the corpus cache and the analysis outputs.

Every whole-file write goes to a temporary name in the same directory, is fsynced, and is renamed
into place, so a reader (or a process killed mid-write) sees the old file or the new one, never
half a file. Temporary names start with '.' and end with '.tmp' and are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (a crash right after os.replace keeps the new file).
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path | str, *, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at `path`, complete and fsynced, only when the block succeeds.

    replace=False publishes only if `path` does not exist yet, else raises FileExistsError: a
    hard link creates the name atomically or not at all, so two racing writers cannot both win.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes 0600; outputs are read by other tools and users
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new, never a mix."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(value: Any) -> str:
    # NaN and inf are not JSON; refusing them catches a diverged number before it reaches a file
    # that other tools must parse.
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: Path | str, value: Any) -> None:
    atomic_write_text(path, json_text(value))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `final` when the block succeeds.

    If another process published `final` first, its copy is kept and ours is discarded: both were
    built from the same inputs, so either is right.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a shared cache should be readable
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
