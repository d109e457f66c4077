"""The local executor: N worker processes at a time on this machine.

Each run trains in a process of its own (a crash, an out-of-memory kill or a CUDA error takes down
one run, not the sweep), with its stdout and stderr appended to the run's log file
(RunDir.log_path). Processes are forked from a multiprocessing fork server that has imported torch
and the trainer once (PRELOAD): a fresh interpreter would spend ~3 s importing torch for every run,
which on CPU costs more than many small runs train. The executor's own process never imports torch,
and the fork server imports nothing that starts threads or touches CUDA, so forking from it is safe.

Devices. Worker slot k gets GPU k mod n_gpus through CUDA_VISIBLE_DEVICES, so with more workers than
GPUs several small runs share a GPU (small models leave an H200 mostly idle). GPUs are listed by
`nvidia-smi -L` (or taken from CUDA_VISIBLE_DEVICES when it is set), never by importing torch here.
Each worker gets cores // workers CPU threads (ISOFLOP_THREADS, OMP_NUM_THREADS), so workers do not
oversubscribe the cores.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from isoflop.orchestrator.executors import Job, JobEnd
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.worker import THREADS_ENV, forked_main

POLL_SECONDS = 0.1
PRELOAD = ("torch", "isoflop.train.trainer")  # imported once by the fork server


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalExecutor:
    """Trains jobs `workers` at a time, slot k on GPU k mod n_gpus (if any), each in its own process."""

    def __init__(self, workers: int, gpus: list[str] | None = None, cores: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}; allowed: >= 1")
        self.workers = workers
        self.gpus = visible_gpus() if gpus is None else gpus
        self.threads = max(1, (cores or available_cores()) // workers)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))

    def worker_env(self, slot: int) -> dict[str, str]:
        """What a worker in this slot sets before training: threads and its GPU."""
        env = {THREADS_ENV: str(self.threads), "OMP_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def execute(
        self,
        jobs: Sequence[Job],
        on_finish: Callable[[JobEnd], None] = lambda end: None,
    ) -> list[JobEnd]:
        queue = list(jobs)
        running: dict[int, tuple[Job, BaseProcess, float]] = {}  # slot -> job, process, start
        ended: list[JobEnd] = []
        try:
            while queue or running:
                for slot in range(self.workers):
                    if slot not in running and queue:
                        job = queue.pop(0)
                        running[slot] = (job, self.start(job, slot), time.monotonic())
                for slot, (job, process, started) in list(running.items()):
                    if process.exitcode is not None:
                        del running[slot]
                        end = JobEnd(job, process.exitcode, time.monotonic() - started)
                        process.close()
                        ended.append(end)
                        on_finish(end)
                time.sleep(POLL_SECONDS)
        finally:
            # Ctrl-C or an error here: stop our workers; their checkpoints let a rerun resume.
            for _, process, _ in running.values():
                process.terminate()
            for _, process, _ in running.values():
                process.join()
        return ended

    def start(self, job: Job, slot: int) -> BaseProcess:
        process = self.context.Process(
            target=forked_main,
            args=(str(job.rundir), self.worker_env(slot), str(RunDir(job.rundir).log_path)),
            name=f"isoflop-{job.run_id}",
        )
        process.start()
        return process
