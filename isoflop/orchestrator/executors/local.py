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

CUDA MPS. Where single-GPU runs share a GPU (more workers than GPUs), the executor starts a CUDA MPS
daemon of its own for the sweep (orchestrator/mps.py) and makes every worker its client, so the
small runs' kernels overlap instead of time-slicing the GPU (recall sweep on one H200: 3.3x the
throughput of one run at a time under MPS, 1.9x without). Where MPS cannot start, workers share the
GPU as before. ISOFLOP_MPS=off turns it off.

Runs larger than one GPU (gpus_per_run > 1): a run is a group of gpus_per_run worker processes, one
per GPU, started with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free
MASTER_PORT) and training it together (isoflop/train/distributed.py); slot k owns GPUs
k*gpus_per_run to (k+1)*gpus_per_run - 1, never shared. Rank 0 writes to the run's log, rank r to
train.rank<r>.log beside it. When one rank dies the others would wait for it forever in their next
collective, so the group is stopped. Without GPUs the ranks are CPU processes (gloo), which is how
the tests run it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from isoflop.orchestrator import mps
from isoflop.orchestrator.executors import Job, JobEnd
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.spec import PARALLEL_MODES
from isoflop.orchestrator.worker import PARALLEL_ENV, THREADS_ENV, forked_main

POLL_SECONDS = 0.1
PRELOAD = ("torch", "isoflop.train.trainer")  # imported once by the fork server
MPS_ENV = "ISOFLOP_MPS"  # "auto" (default) or "off"
MPS_PROBE = (sys.executable, "-c", "import torch; torch.ones(1, device='cuda')")
RANK_STOP_GRACE_S = 30.0  # after one rank died: time the others get to end on SIGTERM before SIGKILL


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


def free_port() -> int:
    """A TCP port nobody listens on now, for a rank group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """The worker processes of one run of several ranks, seen by the executor as one process:
    `exitcode` is None while any rank runs, then rank 0's (a lease refused, a preemption), or the
    first failing rank's. Reading it also stops the group once a rank has failed."""

    def __init__(self, processes: list[BaseProcess]) -> None:
        self.processes = processes
        self.stopping_since: float | None = None

    @property
    def exitcode(self) -> int | None:
        codes = [process.exitcode for process in self.processes]
        if None not in codes:
            return codes[0] or next((code for code in codes if code), 0)
        if any(codes) and self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.terminate()
        elif self.stopping_since is not None and time.monotonic() - self.stopping_since > RANK_STOP_GRACE_S:
            for process in self.processes:
                if process.exitcode is None:
                    process.kill()  # stuck in a collective: SIGTERM only asked it to stop
        return None

    def terminate(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()

    def join(self) -> None:
        for process in self.processes:
            process.join()

    def close(self) -> None:
        for process in self.processes:
            process.close()


def start_ranks(context: BaseContext, job: Job, env: dict[str, str], ranks: int) -> RankGroup:
    """One forked worker per rank, with torchrun's variables; rank r > 0 logs to train.rank<r>.log."""
    log = RunDir(job.rundir).log_path
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                  "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks)}
    processes = []
    for rank in range(ranks):
        rank_log = log if rank == 0 else log.with_name(f"{log.stem}.rank{rank}{log.suffix}")
        rank_env = env | rendezvous | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        process = context.Process(target=forked_main, args=(str(job.rundir), rank_env, str(rank_log)),
                                  name=f"isoflop-{job.run_id}-rank{rank}")
        process.start()
        processes.append(process)
    return RankGroup(processes)


def mps_wanted(workers: int, gpus: int, gpus_per_run: int) -> bool:
    """Whether to try MPS: ISOFLOP_MPS allows it and runs would share a GPU."""
    setting = os.environ.get(MPS_ENV, "auto")
    if setting not in ("auto", "off"):
        raise ValueError(f"{MPS_ENV}={setting!r}; allowed: auto, off")
    return setting == "auto" and mps.worth_it(workers, gpus, gpus_per_run)


class LocalExecutor:
    """Trains jobs `workers` at a time, slot k on GPU k mod n_gpus (if any), each in its own process;
    with gpus_per_run > 1, each job on gpus_per_run GPUs of its own, one process per GPU."""

    def __init__(
        self,
        workers: int,
        gpus: list[str] | None = None,
        cores: int | None = None,
        gpus_per_run: int = 1,
        nodes_per_run: int = 1,
        parallel: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}; allowed: >= 1")
        if nodes_per_run != 1:
            raise ValueError(f"executor.nodes_per_run={nodes_per_run}: the local executor trains on "
                             "this machine; allowed: 1 (`isoflop submit` runs on several nodes)")
        if parallel is not None and parallel not in PARALLEL_MODES:
            raise ValueError(f"executor.parallel={parallel!r}; allowed: {', '.join(PARALLEL_MODES)}")
        self.workers = workers
        self.gpus = visible_gpus() if gpus is None else gpus
        self.ranks = max(1, gpus_per_run)  # processes per run; 0 GPUs (a CPU run) is one process
        if self.ranks > 1 and self.gpus and workers * self.ranks > len(self.gpus):
            raise ValueError(
                f"executor.workers={workers} x gpus_per_run={gpus_per_run} needs "
                f"{workers * self.ranks} GPUs; this machine has {len(self.gpus)}; allowed: workers "
                f"<= {max(1, len(self.gpus) // self.ranks)} (or fewer GPUs per run)"
            )
        self.parallel = parallel
        self.use_mps = mps_wanted(workers, len(self.gpus), self.ranks)
        self.mps_env: dict[str, str] = {}
        self.threads = max(1, (cores or available_cores()) // (workers * self.ranks))
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))

    def worker_env(self, slot: int) -> dict[str, str]:
        """What a worker in this slot sets before training: threads and its GPU (GPUs)."""
        env = {THREADS_ENV: str(self.threads), "OMP_NUM_THREADS": str(self.threads)} | self.mps_env
        if self.parallel is not None:
            env[PARALLEL_ENV] = self.parallel
        if self.gpus and self.ranks == 1:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        elif self.gpus:
            # The whole slot's GPUs: each rank takes the one at its LOCAL_RANK.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * self.ranks:(slot + 1) * self.ranks])
        return env

    def execute(
        self,
        jobs: Sequence[Job],
        on_finish: Callable[[JobEnd], None] = lambda end: None,
    ) -> list[JobEnd]:
        with self.mps_daemon():
            return self._execute(list(jobs), on_finish)

    @contextlib.contextmanager
    def mps_daemon(self):
        """An MPS daemon while the jobs run, where it pays and can start; its clients' variables
        go into every worker's environment."""
        if not self.use_mps:
            yield
            return
        with tempfile.TemporaryDirectory(prefix="isoflop-mps-") as folder, \
                mps.mps_daemon(folder, probe=MPS_PROBE) as env:
            self.mps_env = env or {}
            try:
                yield
            finally:
                self.mps_env = {}

    def _execute(self, queue: list[Job], on_finish: Callable[[JobEnd], None]) -> list[JobEnd]:
        running: dict[int, tuple[Job, BaseProcess | RankGroup, float]] = {}  # slot -> job, process, start
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

    def start(self, job: Job, slot: int) -> BaseProcess | RankGroup:
        if self.ranks > 1:
            return start_ranks(self.context, job, self.worker_env(slot), self.ranks)
        process = self.context.Process(
            target=forked_main,
            args=(str(job.rundir), self.worker_env(slot), str(RunDir(job.rundir).log_path)),
            name=f"isoflop-{job.run_id}",
        )
        process.start()
        return process
