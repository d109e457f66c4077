"""One run in its own process: `python -m isoflop.orchestrator.worker RUNDIR`, or `forked_main`
in a process forked by the local executor.

Reads RUNDIR/spec.json and trains it with `isoflop.train.run` (which writes status, metrics,
checkpoints and result, and resumes from its checkpoint). The only module of the orchestrator that
imports torch, and only here, in the child process.

While it trains, the worker holds an exclusive lock on RUNDIR/.lock, so two sweeps launched on the
same runs folder never train one run twice; a worker that finds the lock taken exits with
EXIT_LOCKED. The lock dies with the process, so a crashed worker never leaves a stale one.
ISOFLOP_THREADS sets torch's intra-op threads (the local executor divides the cores among workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import RunSpec

EXIT_LOCKED = 75  # EX_TEMPFAIL: another process is training this run
LOCK_NAME = ".lock"
THREADS_ENV = "ISOFLOP_THREADS"


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """Yields True while holding the run's lock, False if another process holds it."""
    with open(path / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(path: Path) -> bool:
    """Whether a live worker is training the run in `path` right now."""
    if not (path / LOCK_NAME).exists():
        return False
    with run_lock(path) as acquired:
        return not acquired


def train_rundir(path: Path | str) -> int:
    """Train the run in `path` (its spec.json); the exit status a worker process should return."""
    rundir = RunDir(path)
    spec_dict = rundir.read_spec()
    if spec_dict is None:
        print(f"{rundir.spec_path} does not exist", file=sys.stderr)
        return 2
    with run_lock(rundir.path) as acquired:
        if not acquired:
            print(f"{rundir.path} is being trained by another process", file=sys.stderr)
            return EXIT_LOCKED
        import torch

        from isoflop.train import run

        if os.environ.get(THREADS_ENV):
            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        result = run(RunSpec.from_dict(spec_dict), rundir.path)
    return 0 if result["state"] in ("done", "diverged") else 1


def forked_main(path: str, env: dict[str, str], log_path: str) -> None:
    """Entry point of a worker forked from the local executor's fork server (torch already
    imported there, which saves seconds per run): set the environment, send stdout and stderr to
    the run's log, train."""
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.exit(train_rundir(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m isoflop.orchestrator.worker RUNDIR", file=sys.stderr)
        return 2
    return train_rundir(argv[0])


if __name__ == "__main__":
    sys.exit(main())
