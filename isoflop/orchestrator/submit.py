"""`isoflop submit` and `isoflop retry`: hand a sweep's runs to SLURM, record their jobs, return.

Which runs go. `submit` sends every run that is not finished and has no live job: never started,
pending, preempted or interrupted ones (these resume from their checkpoints). Failed and cancelled
runs stay out, so a broken setting does not burn cluster time on every submit: `retry --failed`
(and/or `--cancelled`) sends those. A run whose job is still queued or running, or that a local
process is training, is never submitted twice. All of this is decided from the run directories and
one batched SLURM query (status.run_states).

What is recorded. Each submitted run gets status 'pending' and a job record, job.json: its SLURM job
id, when, the code snapshot it runs, its log files and the settings, plus the ids of its earlier
jobs. The submission returns as soon as sbatch has answered; `isoflop status` reattaches later.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from isoflop.orchestrator.grid import PlannedRun
from isoflop.orchestrator.jobs import ACTIVE_STATES
from isoflop.orchestrator.rundir import RunDir, UnwritableError, utc_now, writing
from isoflop.orchestrator.spec import SlurmSettings
from isoflop.orchestrator.status import run_states

FINISHED = ("done", "diverged")
SUBMITTABLE = frozenset({"not started", "pending", "preempted", "interrupted"})
RETRYABLE = frozenset({"failed", "cancelled"})
CODE_FOLDER = ".code"  # <sweep folder>/.code/<hash>/isoflop: the snapshots (snapshot.py)
SLURM_FOLDER = ".slurm"  # <sweep folder>/.slurm/<job id>/: submitit's pickles and the jobs' logs


class SubmitError(RuntimeError):
    """SLURM refused the submission (sbatch failed, no SLURM here); the message says what it said."""


@dataclass
class SubmitReport:
    selected: int
    finished: int = 0
    busy: int = 0  # a live SLURM job, or a local worker, has it already
    left: Counter = field(default_factory=Counter)  # state -> runs not wanted (e.g. failed without retry)
    submitted: dict[str, str] = field(default_factory=dict)  # run id -> SLURM job id
    code: Path | None = None  # the snapshot the jobs run


def choose(runs: list[PlannedRun], directory: Path, wanted: frozenset[str]) -> tuple[list[PlannedRun], SubmitReport]:
    """The runs to submit (state in `wanted`, no live job), and the report's counts for the rest."""
    rows = run_states([run.labels() for run in runs], directory, strict=True)
    report, todo = SubmitReport(selected=len(runs)), []
    for run, row in zip(runs, rows):
        if row["state"] in FINISHED:
            report.finished += 1
        elif row["slurm_state"] in ACTIVE_STATES or row["state"] == "running":
            report.busy += 1
        elif row["state"] in wanted:
            todo.append(run)
        else:
            report.left[row["state"]] += 1
    return todo, report


def submit(
    sweep_name: str,
    runs: list[PlannedRun],
    directory: Path,
    settings: SlurmSettings,
    wanted: frozenset[str] = SUBMITTABLE,
) -> SubmitReport:
    """Submit the runs among `runs` whose state is in `wanted` as job arrays; see the module doc."""
    from isoflop.orchestrator.executors.slurm import submit_arrays
    from isoflop.orchestrator.snapshot import snapshot_package

    directory = directory.resolve()
    todo, report = choose(runs, directory, wanted)
    if not todo:
        return report
    with writing(directory / CODE_FOLDER):
        report.code = snapshot_package(directory / CODE_FOLDER)
    rundirs = []
    for run in todo:
        rundir = RunDir(directory / run.run_id).create()
        rundir.write_spec(run.spec.to_dict())
        rundir.write_status("pending", run_id=run.run_id, error=None)
        rundirs.append(rundir)
    folder = directory / SLURM_FOLDER
    try:
        with writing(folder):  # submitit writes its pickles and scripts there
            arrays = submit_arrays([rundir.path for rundir in rundirs], settings, folder, report.code,
                                   job_name=f"isoflop-{sweep_name}")
            start = 0
            for job_ids in arrays:
                for rundir, job_id in zip(rundirs[start:start + len(job_ids)], job_ids):
                    _record_job(rundir, job_id, folder, report.code, settings)
                    report.submitted[rundir.path.name] = job_id
                start += len(job_ids)
    except UnwritableError:
        raise
    except Exception as error:  # submitit's and sbatch's errors come in many types
        raise SubmitError(f"submitting to SLURM failed after {len(report.submitted)} of {len(todo)} "
                          f"runs: {type(error).__name__}: {str(error).strip()}") from error
    return report


def _record_job(rundir: RunDir, job_id: str, folder: Path, code: Path, settings: SlurmSettings) -> None:
    from isoflop.orchestrator.executors.slurm import log_paths

    previous = rundir.read_job()
    stdout, stderr = log_paths(folder, job_id)
    rundir.write_job({
        "job_id": job_id,
        "submitted_at": utc_now(),
        "code": str(code),
        "stdout": str(stdout),
        "stderr": str(stderr),
        "settings": dataclasses.asdict(settings),
        "previous_job_ids": (previous["previous_job_ids"] + [previous["job_id"]]) if previous else [],
    })
    rundir.write_status("pending", job_id=job_id)
