"""Pinning the code of submitted jobs: a copy of the isoflop package, named by a hash of its files.

A SLURM job may wait in the queue for days. If it imported the checkout, it would run whatever the
checkout holds when it starts, and the runs of one sweep could train with different code. So
`isoflop submit` copies the package once per distinct content to

    <sweep folder>/.code/<hash>/isoflop/

and every job of that submission puts <sweep folder>/.code/<hash> first on PYTHONPATH. Equal code
gives an equal hash, so resubmitting unchanged code reuses the copy. Caches (__pycache__, *.pyc)
are neither hashed nor copied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import isoflop
from isoflop.atomic import atomic_directory

HASH_CHARS = 12


def package_dir() -> Path:
    """The isoflop package this process imported (the checkout, for an editable install)."""
    return Path(isoflop.__file__).resolve().parent


def read_package(package: Path) -> dict[str, bytes]:
    """The package's files (relative POSIX path -> content), without caches or hidden files. Read
    once, so that the hash and the copy are of the same bytes even if the checkout changes meanwhile."""
    files = {}
    for path in sorted(package.rglob("*")):
        relative = path.relative_to(package)
        if path.is_file() and path.suffix != ".pyc" and not any(
            part == "__pycache__" or part.startswith(".") for part in relative.parts
        ):
            files[relative.as_posix()] = path.read_bytes()
    return files


def code_hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(files):
        digest.update(relative.encode() + b"\0" + files[relative] + b"\0")
    return digest.hexdigest()[:HASH_CHARS]


def snapshot_package(root: Path, package: Path | None = None) -> Path:
    """Copy `package` (default: the imported isoflop) to root/<hash>/<package name>/ unless that copy
    exists; returns root/<hash>, the folder to put on PYTHONPATH."""
    package = package or package_dir()
    files = read_package(package)
    target = root / code_hash(files)
    if not (target / package.name).is_dir():
        with atomic_directory(target) as staging:
            for relative, content in files.items():
                destination = staging / package.name / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(content)
    return target
