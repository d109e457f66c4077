"""SLURM jobs of a sweep's runs: where each run's job is recorded, what SLURM says about it, and what
that means for the run.

`isoflop submit` writes a job record (job.json) into each run directory it submits; `status`,
`retry` and a later `submit` read the records back and ask SLURM about all of them at once: one
`squeue` call (it knows queued, running and recently ended jobs) and, for jobs it has forgotten, one
`sacct` call (the accounting database). Never one call per job: a sweep has hundreds of runs, and
the controller of a shared cluster should not get hundreds of queries.

The run's own status.json says what the training did (done, diverged, failed, preempted); SLURM says
what happened to the job around it (queued, cancelled, killed at its time limit, failed before
training began). `combined_state` merges the two into what `isoflop status` shows. Torch-free and
submitit-free: status must stay fast and work on a login node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# SLURM states (first word of squeue %T / sacct State) of a job that has not ended.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
RUNNING_STATES = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"})
FAILED_STATES = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
GONE = "GONE"  # neither squeue nor sacct knows the job (a pending array task cancelled, or purged)
QUERY_TIMEOUT_S = 60

Runner = Callable[[list[str]], str]  # runs a command, returns its stdout (tests may pass their own)


class SlurmQueryError(RuntimeError):
    """squeue/sacct could not be run or failed; the message says which command and why."""


@dataclass(frozen=True)
class JobState:
    job_id: str  # "123_4" for array task 4 of array job 123, "123" for a plain job
    state: str  # SLURM's state, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, or GONE
    detail: str = ""  # squeue's reason or sacct's exit code

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def run_command(command: list[str]) -> str:
    """stdout of a SLURM command; SlurmQueryError naming the command if it is missing or fails."""
    if shutil.which(command[0]) is None:
        raise SlurmQueryError(f"{command[0]} is not installed here: run this on a SLURM login node "
                              f"(or start the local cluster: scripts/local-slurm.sh up)")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmQueryError(f"{command[0]} did not answer within {QUERY_TIMEOUT_S} s") from None
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit code {done.returncode}"
        # squeue answers this when none of the ids is known to the controller any more.
        if "Invalid job id" in message:
            return ""
        raise SlurmQueryError(f"{' '.join(command[:2])} ... failed: {message}")
    return done.stdout


def array_id(job_id: str) -> str:
    """'123_4' -> '123' (what squeue -j and sacct -j take to cover a whole array)."""
    return job_id.split("_", 1)[0]


def _expand(job_id: str) -> list[str]:
    """sacct writes not-yet-started array tasks as one line: '123_[2-5,8%2]' -> 123_2 ... 123_8."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if match is None:
        return [job_id]
    ids = []
    for part in match[2].split(","):
        low, _, high = part.partition("-")
        ids += [f"{match[1]}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def _parse(text: str, fields: int) -> dict[str, JobState]:
    """Lines 'id|state|detail' -> JobState per (expanded) id; later lines win (the newest record)."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != fields or not parts[0] or "." in parts[0]:  # '.': a job step, not a job
            continue
        state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        for job_id in _expand(parts[0]):
            states[job_id] = JobState(job_id, state, parts[2])
    return states


def query_states(job_ids: Iterable[str], run: Runner = run_command) -> dict[str, JobState]:
    """What SLURM says about each job, in at most two calls whatever the number of jobs."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    arrays = ",".join(sorted({array_id(j) for j in wanted}))
    # -t all: also jobs that ended within MinJobAge (minutes), with their final state.
    states = _parse(run(["squeue", "-h", "-r", "-t", "all", "-j", arrays, "-o", "%i|%T|%r"]), 3)
    forgotten = [j for j in wanted if j not in states]
    if forgotten:
        older = ",".join(sorted({array_id(j) for j in forgotten}))
        accounting = _parse(run(["sacct", "-n", "-X", "-P", "-j", older, "-o", "JobID,State,ExitCode"]), 3)
        states |= {j: accounting[j] for j in forgotten if j in accounting}
    return {j: states.get(j, JobState(j, GONE)) for j in wanted}


def combined_state(run_state: str, status: dict[str, Any], job: JobState | None,
                   record: dict[str, Any] | None) -> tuple[str, str]:
    """(state, error) that `isoflop status` shows for a run whose directory says `run_state`
    (status.json's state, or 'not started' / 'interrupted' as status.py reads it) and whose SLURM
    job, if it has one, is in `job`."""
    error = status.get("error") or ""
    if job is None or run_state in ("done", "diverged"):
        return run_state, error
    where = f"SLURM job {job.job_id}"
    log = f"; log: {record['stderr']}" if record and record.get("stderr") else ""
    if job.state in RUNNING_STATES:
        return "running", ""
    if job.active:  # queued: for the first time, or again after a preemption or time limit
        return ("preempted" if run_state == "preempted" else "pending"), ""
    if job.state == "CANCELLED":
        return "cancelled", f"{where} was cancelled"
    if job.state == GONE:
        if run_state in ("pending", "not started"):
            return "cancelled", f"{where} left the queue before it started, with no accounting record"
        return run_state, error
    if job.state in FAILED_STATES:
        reason = {"TIMEOUT": "hit its time limit", "OUT_OF_MEMORY": "ran out of memory"}.get(
            job.state, f"ended {job.state} (exit {job.detail or '?'})")
        return "failed", (error if run_state == "failed" and error else f"{where} {reason}{log}")
    if job.state == "PREEMPTED":
        return "preempted", f"{where} was preempted and not requeued"
    # COMPLETED: the job's work is what the run directory says.
    if run_state in ("failed", "preempted", "running"):
        return run_state, error
    return "failed", f"{where} completed but the run is {run_state}{log}"
