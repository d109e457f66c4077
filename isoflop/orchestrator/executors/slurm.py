"""The SLURM executor: runs submitted as submitit job arrays, fire and forget.

Unlike the local executor, nothing waits here for the runs: `submit_arrays` hands them to SLURM and
returns the job ids at once; what became of them is read back later from the run directories and
from SLURM (jobs.py, status.py).

Each array task runs `SlurmRun(code)(rundir)` in the job: it starts the ordinary worker
(`python -m isoflop.orchestrator.worker RUNDIR`) as a child process, with the task's CPUs as its
threads, and waits for it. The job's Python imports isoflop from the code snapshot taken at
submission, so the job runs the code that was submitted, whatever the checkout holds when it
starts: the job's setup lines put the snapshot first on PYTHONPATH and set PYTHONSAFEPATH (else
`python -m` would put the submission's working directory, often the checkout, first), and
SlurmRun refuses to train with any other copy of isoflop.

Preemption and time limits. SlurmRun is submitit-Checkpointable: when SLURM signals the job
(USR2 before the time limit, or submitit's own interrupt helper), submitit calls `checkpoint`, which
asks the worker to stop (it saves a checkpoint at the end of its current step) and returns a fresh
SlurmRun for the same run directory; submitit then requeues the job, and the requeued job resumes
from that checkpoint. A job preempted by SLURM itself (SIGTERM, then requeue) stops the same way.

Runs larger than one GPU (gpus_per_run > 1 or nodes_per_run > 1): each array element is a job of
nodes_per_run nodes with one task per GPU. submitit starts SlurmRun in every task; each exports
torchrun's variables from SLURM's (submitit's TorchDistributedEnvironment: rank SLURM_PROCID,
world SLURM_NTASKS, the first node as rendezvous) for its worker, and the workers train the run
together (isoflop/train/distributed.py). Task 0 alone writes to the run directory; the others log
to train.rank<r>.log. submitit calls `checkpoint` in task 0 only: its worker's stop request reaches
every rank, because the ranks agree on stopping.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit

from isoflop.orchestrator.rundir import RunDir, lease_holder, lease_seconds
from isoflop.orchestrator.spec import SlurmSettings
from isoflop.orchestrator.worker import EXIT_LOCKED, EXIT_PREEMPTED, PARALLEL_ENV, THREADS_ENV

POLL_S = 0.2
STOP_WAIT_S = 60  # a worker asked to stop saves within a step; submitit's signal comes 90 s early
REQUEUE_WAIT_S = 120  # after the worker stopped on a signal: time for SLURM to requeue or end us


class RunFailed(RuntimeError):
    """The run failed inside its job; the message holds the run's recorded error. Raising it makes
    the SLURM job FAILED."""


class SlurmRun(submitit.helpers.Checkpointable):
    """What one array task runs: train one run directory in a worker process, with the isoflop
    package of the snapshot folder `code`."""

    def __init__(self, code: Path) -> None:
        self.code = code
        self._worker: subprocess.Popen[bytes] | None = None

    def __call__(self, rundir: str) -> dict[str, Any]:
        import isoflop

        run = RunDir(rundir)
        code = str(Path(isoflop.__file__).resolve().parent)
        job = submitit.JobEnvironment()
        main = job.global_rank == 0  # the task that speaks for the run (all of it, in most jobs)
        if main:
            run.append_log(f"SLURM job {job.job_id} on {job.hostname}; code {code}")
        if Path(code) != (self.code / "isoflop").resolve():
            error = (f"the job imported isoflop from {code}, not from the snapshot taken at submission "
                     f"({self.code}); check PYTHONPATH in the sweep's executor.setup lines")
            if main:
                run.write_status("failed", error=error)
            raise RunFailed(error)
        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        env = os.environ | {THREADS_ENV: threads, "OMP_NUM_THREADS": threads} | rank_env(job)
        command = [sys.executable, "-m", "isoflop.orchestrator.worker", rundir,
                   # a requeued job may start before the last attempt's lease has expired
                   "--wait-for-lease", str(1.5 * lease_seconds())]
        log_path = run.log_path if main else run.log_path.with_name(f"train.rank{job.global_rank}.log")
        with open(log_path, "ab") as log:
            self._worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            # poll(), not wait(): wait() holds a lock that `checkpoint` (a signal handler that
            # interrupts this loop) would then wait on forever.
            while (returncode := self._worker.poll()) is None:
                time.sleep(POLL_S)
        status = run.read_status() or {}
        if not main:  # the run's outcome is task 0's to report
            if returncode in (0, EXIT_LOCKED, EXIT_PREEMPTED):
                return {"run_id": run.path.name, "rank": job.global_rank, "code": code}
            raise RunFailed(f"run {run.path.name}: rank {job.global_rank} failed "
                            f"({_describe(returncode)}); log: {log_path}")
        if returncode == 0:
            return {"run_id": run.path.name, "state": status.get("state"), "code": code}
        if returncode == EXIT_LOCKED:
            return {"run_id": run.path.name, "state": "busy elsewhere", "code": code}
        if returncode == EXIT_PREEMPTED:
            # SLURM signalled the job (preemption, cancellation): it will requeue or end it.
            time.sleep(REQUEUE_WAIT_S)
            raise RunFailed(f"run {run.path.name} stopped on a signal at step {status.get('step')} "
                            f"and the job was not requeued; `isoflop submit` resubmits it")
        if status.get("state") == "running" and lease_holder(run.path) is None:
            # Killed before it could say so (out of memory, a signal): say it for it.
            status = run.write_status("failed", error=f"worker died ({_describe(returncode)})")
        raise RunFailed(f"run {run.path.name} {status.get('state', 'failed')}: "
                        f"{status.get('error') or _describe(returncode)}; log: {run.log_path}")

    def checkpoint(self, rundir: str) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or before the time limit: stop the worker at a
        checkpoint, then have the job requeued with a fresh SlurmRun for the same run."""
        worker = self._worker
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + STOP_WAIT_S
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if worker.poll() is None:
                worker.kill()  # resumes from its previous checkpoint instead
        return submitit.helpers.DelayedSubmission(SlurmRun(self.code), rundir)


def rank_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun's variables for a task of a job of several (none for a job of one task)."""
    if job.num_tasks == 1:
        return {}
    # export() writes them into this task's environment too, where nothing else reads them.
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True)  # a rank picks GPU LOCAL_RANK itself
    return {"MASTER_ADDR": dist_env.master_addr, "MASTER_PORT": str(dist_env.master_port),
            "RANK": str(dist_env.rank), "WORLD_SIZE": str(dist_env.world_size),
            "LOCAL_RANK": str(dist_env.local_rank), "LOCAL_WORLD_SIZE": str(dist_env.local_world_size)}


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def sbatch_parameters(settings: SlurmSettings, job_name: str, code: Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one array of runs."""
    parallel = [f"export {PARALLEL_ENV}={settings.parallel}"] if settings.parallel != "auto" else []
    setup = [f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
             "export PYTHONSAFEPATH=1", *parallel, *settings.setup]
    parameters: dict[str, Any] = {
        "job_name": job_name,
        "time": settings.time_min,
        "cpus_per_task": settings.cpus_per_run,
        "array_parallelism": settings.array_parallelism,
        "setup": setup,
    }
    if settings.gpus_per_run > 1 or settings.nodes_per_run > 1:
        # One task per GPU on each node (one per node without GPUs), each a rank of the run.
        parameters |= {"nodes": settings.nodes_per_run,
                       "ntasks_per_node": max(1, settings.gpus_per_run)}
    optional = {
        "partition": settings.partition,
        "account": settings.account,
        "qos": settings.qos,
        "gpus_per_node": settings.gpus_per_run or None,
        "mem": None if settings.mem_gb is None else f"{max(1, round(settings.mem_gb * 1024))}M",
    }
    return parameters | {key: value for key, value in optional.items() if value is not None}


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def submit_arrays(
    rundirs: Sequence[Path],
    settings: SlurmSettings,
    folder: Path,
    code: Path,
    job_name: str,
) -> Iterator[list[str]]:
    """Submit one array task per run directory, max_array_size tasks per array, and yield each
    array's job ids (in the order of `rundirs`) as soon as it is submitted. `folder` receives
    submitit's pickles and the jobs' stdout/stderr; `code` is the snapshot to import from."""
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=settings.max_requeues)
    executor.update_parameters(**sbatch_parameters(settings, job_name, code))
    for chunk in chunks(list(rundirs), settings.max_array_size):
        jobs = executor.map_array(SlurmRun(code), [str(path.resolve()) for path in chunk])
        yield [job.job_id for job in jobs]


def log_paths(folder: Path, job_id: str) -> tuple[Path, Path]:
    """Where submitit writes the job's stdout and stderr."""
    paths = submitit.core.utils.JobPaths(folder / "%j", job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr
