"""The on-disk cache: where it lives, atomic writes, and content hashes that skip unchanged files.

Every write goes to a temporary name in the same directory and is renamed into place, so a process
killed half-way leaves at most a stray temporary file, never a half cache entry that a later load
would trust. Temporary names start with '.tmp-' and are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from isoflop.atomic import atomic_directory, atomic_output, atomic_write_bytes, atomic_write_text  # noqa: F401

CACHE_ENV = "ISOFLOP_CACHE"
_HASH_CHUNK_BYTES = 1 << 22


def default_cache_dir() -> Path:
    """$ISOFLOP_CACHE if set, else ~/.cache/isoflop."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "isoflop"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(paths: Sequence[Path], cache_dir: Path) -> list[str]:
    """sha256 of each file, reusing the digest recorded for an unchanged (size, mtime_ns).

    Like git's index: re-reading hundreds of MB of site-packages or GB of shards on every load
    would dominate load time, while a file edited in place keeps neither its size nor its mtime
    in practice. The record is one JSON file per set of files.
    """
    key = hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()[:16]
    record_path = cache_dir / "file-digests" / f"{key}.json"
    try:
        record: dict[str, list] = json.loads(record_path.read_text())
    except (FileNotFoundError, ValueError):
        record = {}
    fresh: dict[str, list] = {}
    digests = []
    for path in paths:
        stat = path.stat()
        known = record.get(str(path))
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            digest = known[2]
        else:
            digest = sha256_of_file(path)
        fresh[str(path)] = [stat.st_size, stat.st_mtime_ns, digest]
        digests.append(digest)
    if fresh != record:
        atomic_write_text(record_path, json.dumps(fresh))
    return digests
