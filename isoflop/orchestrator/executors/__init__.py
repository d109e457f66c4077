"""Executors: hand a list of run directories to something that trains them.

An executor is a tiny interface (after submitit): `execute(jobs, on_finish)` trains
every job, each in its own process, and returns when all have ended. A Job is a run directory
whose spec.json is written; what the run did is read back from its status.json, so executors
differ only in where the process runs. SLURM jobs go through `isoflop submit`
(orchestrator/submit.py), which returns at once instead of waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from isoflop.orchestrator.spec import EXECUTOR_KINDS


@dataclass(frozen=True)
class Job:
    run_id: str
    rundir: Path
    label: str  # what progress lines call the run, e.g. "dynamic-qkv d64-l2 1e12"


@dataclass(frozen=True)
class JobEnd:
    job: Job
    returncode: int
    seconds: float


class Executor(Protocol):
    workers: int  # runs at once

    def execute(
        self,
        jobs: Sequence[Job],
        on_finish: Callable[[JobEnd], None] = ...,
    ) -> list[JobEnd]: ...


def make_executor(
    kind: str, workers: int, gpus_per_run: int = 1, nodes_per_run: int = 1, parallel: str | None = None
) -> Executor:
    """gpus_per_run > 1: each run trains on that many GPUs of its own, one process per GPU."""
    if kind == "local":
        from isoflop.orchestrator.executors.local import LocalExecutor

        return LocalExecutor(workers, gpus_per_run=gpus_per_run, nodes_per_run=nodes_per_run,
                             parallel=parallel)
    if kind == "slurm":
        raise ValueError("executor kind 'slurm' submits jobs and returns at once: use `isoflop submit`; "
                         "`isoflop run` trains on this machine (kind: local)")
    raise ValueError(f"executor kind={kind!r}; allowed: {', '.join(EXECUTOR_KINDS)}")
