"""One run in its own process: `python -m isoflop.orchestrator.worker RUNDIR`, `forked_main` in a
process forked by the local executor, or the child process of a SLURM job (executors/slurm.py).

Reads RUNDIR/spec.json and trains it with `isoflop.train.run` (which writes status, metrics,
checkpoints and result, and resumes from its checkpoint). The only module of the orchestrator that
imports torch, and only here, in the child process.

While it trains, the worker holds the run's lease (rundir.RunLease), so two sweeps launched on the
same runs folder, or a SLURM job and a local run, never train one run twice; a worker that finds
the lease taken exits with EXIT_LOCKED. The lease ends with the process (or, on another machine,
a lease period after its last renewal), so a crashed worker never leaves a stale lock.

SIGTERM and SIGUSR2 (what SLURM sends on preemption and before a time limit) and SIGINT ask the
run to stop: it saves a checkpoint at the end of the current step, records status 'preempted' and
the worker exits with EXIT_PREEMPTED; the next start resumes there. A second SIGINT stops at once.
ISOFLOP_THREADS sets torch's intra-op threads (the local executor divides the cores among workers).

Runs of several processes: each rank is a worker of its own, started with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) by the local executor's rank groups, a
multi-task SLURM job, or `torchrun -m isoflop.orchestrator.worker RUNDIR`. Rank 0 holds the lease
for them all; ISOFLOP_PARALLEL (ddp, fsdp, auto) says how they split the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import FrameType

from isoflop.orchestrator.rundir import RunDir, RunLease, hold_lease, lease_holder
from isoflop.runspec import RunSpec

EXIT_LOCKED = 75  # EX_TEMPFAIL: another process is training this run
EXIT_PREEMPTED = 76  # stopped by a signal after saving a checkpoint; a restart resumes
THREADS_ENV = "ISOFLOP_THREADS"
PARALLEL_ENV = "ISOFLOP_PARALLEL"  # ddp | fsdp | auto, for runs of several processes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
LEASE_POLL_S = 1.0


def run_lock(path: Path | str) -> AbstractContextManager[RunLease | None]:
    """Hold the run's lease while the block runs; yields None if a live process holds it."""
    return hold_lease(path)


def is_locked(path: Path) -> bool:
    """Whether a live worker is training the run in `path` right now."""
    return lease_holder(path) is not None


class StopRequest:
    """Whether a stop signal has come. A plain flag, not a threading.Event: a signal arriving while
    another's handler runs interrupts that handler, and Event.set holds a lock across several
    bytecodes, so the nested handler's Event.set waited forever for the lock its own thread held
    (a worker hung that way in CI, with the SIGTERM, USR2 and USR2 of a SLURM preemption)."""

    def __init__(self) -> None:
        self.requested = False

    def is_set(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """A StopRequest set by SIGTERM, SIGUSR2 or SIGINT while the block runs (a repeated SIGINT raises
    KeyboardInterrupt: a user pressing Ctrl-C twice wants out now). Handlers are restored after."""
    stop = StopRequest()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and stop.requested:
            raise KeyboardInterrupt
        stop.requested = True  # one store: safe however handlers nest

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_rundir(path: Path | str, wait_for_lease_s: float = 0.0) -> int:
    """Train the run in `path` (its spec.json); the exit status a worker process should return.

    wait_for_lease_s: how long to wait for a lease held by another process (a requeued SLURM job
    may start before its previous attempt's lease has expired on another node).

    A worker launched as one rank of several (RANK, WORLD_SIZE, ... in its environment; see
    isoflop/train/distributed.py) joins its process group first; rank 0 alone takes the lease, and
    every rank learns whether it got it, so that all train or all exit with EXIT_LOCKED."""
    rundir = RunDir(path)
    spec_dict = rundir.read_spec()
    if spec_dict is None:
        print(f"{rundir.spec_path} does not exist", file=sys.stderr)
        return 2
    spec = RunSpec.from_dict(spec_dict)
    if "WORLD_SIZE" in os.environ:
        return _train_as_rank(rundir, spec, wait_for_lease_s)
    with _lease(rundir, wait_for_lease_s) as lease:
        return _train(rundir, spec) if lease is not None else EXIT_LOCKED


@contextlib.contextmanager
def _lease(rundir: RunDir, wait_for_lease_s: float) -> Iterator[RunLease | None]:
    """The run's lease for the block, waiting up to wait_for_lease_s for it; None if another
    process holds it (after saying so)."""
    deadline = time.monotonic() + wait_for_lease_s
    while True:
        with run_lock(rundir.path) as lease:
            if lease is not None:
                yield lease
                return
        if time.monotonic() >= deadline:
            holder = lease_holder(rundir.path) or {}
            print(f"{rundir.path} is being trained by another process (pid {holder.get('pid')} on "
                  f"{holder.get('host')})", file=sys.stderr)
            yield None
            return
        time.sleep(LEASE_POLL_S)


def _train_as_rank(rundir: RunDir, spec: RunSpec, wait_for_lease_s: float) -> int:
    import torch

    from isoflop.train import distributed

    cuda = spec.train.device == "cuda" or (spec.train.device == "auto" and torch.cuda.is_available())
    with distributed.session("cuda" if cuda else "cpu") as world:
        lease_context = _lease(rundir, wait_for_lease_s) if world.is_main else contextlib.nullcontext()
        with lease_context as lease:
            if not world.broadcast(lease is not None):
                return EXIT_LOCKED
            return _train(rundir, spec)


def _train(rundir: RunDir, spec: RunSpec) -> int:
    """Train with the stop signals caught; the exit status."""
    import torch

    from isoflop.train import run
    from isoflop.train.trainer import Stopped

    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    with stop_requests() as requested:
        try:
            result = run(spec, rundir.path, should_stop=requested.is_set)
        except Stopped as stopped:
            print(f"{rundir.path}: {stopped}", file=sys.stderr)
            return EXIT_PREEMPTED
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
    parser = argparse.ArgumentParser(prog="python -m isoflop.orchestrator.worker",
                                     description="Train one run directory.")
    parser.add_argument("rundir", help="a run directory holding spec.json")
    parser.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for another process's lease to end (default: 0)")
    args = parser.parse_args(argv)
    return train_rundir(args.rundir, args.wait_for_lease)


if __name__ == "__main__":
    sys.exit(main())
