"""Where a sweep stands: each run's state read from its run directory (and its SLURM job), counts
and a table.

Runs are given as label dicts (PlannedRun.labels() or manifest entries), so status works from a
sweep file or from the manifest alone. A run without a run directory is 'not started'; one whose
status says running but whose worker holds no lease was interrupted ('running' is only believed
while a live worker holds the run's lease). A run submitted to SLURM (it has a job.json) also gets
its job's state, asked of SLURM for all runs at once (jobs.py), which adds 'pending' (queued),
'cancelled' and the failures that happen outside the training (time limit, out of memory).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from isoflop.orchestrator.formats import sci
from isoflop.orchestrator.jobs import (
    JobState,
    Runner,
    SlurmQueryError,
    combined_state,
    query_states,
    run_command,
)
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.worker import is_locked

NOT_STARTED = "not started"
INTERRUPTED = "interrupted"
STATE_STYLES = {
    "done": "green", "diverged": "yellow", "failed": "red", "running": "cyan", INTERRUPTED: "magenta",
    "preempted": "magenta", "cancelled": "yellow",
}


def run_states(entries: list[dict[str, Any]], directory: Path,
               slurm: Runner = run_command, strict: bool = False) -> list[dict[str, Any]]:
    """Each entry with state, step, total_steps, final_val_loss, error, job_id and slurm_state
    added. `slurm` runs squeue/sacct (called only if some run has a SLURM job). If SLURM cannot be
    asked, strict raises SlurmQueryError; otherwise the runs' rows say so in their error."""
    rundirs = [RunDir(directory / entry["run_id"]) for entry in entries]
    records = [rundir.read_job() for rundir in rundirs]
    jobs: dict[str, JobState] = {}
    slurm_error = ""
    job_ids = [record["job_id"] for record in records if record]
    if job_ids:
        try:
            jobs = query_states(job_ids, slurm)
        except SlurmQueryError as error:
            if strict:
                raise
            slurm_error = f"cannot ask SLURM: {error}"
    rows = []
    for entry, rundir, record in zip(entries, rundirs, records):
        status = rundir.read_status() or {}
        state = status.get("state", NOT_STARTED)
        if state == "running" and not is_locked(rundir.path):
            state = INTERRUPTED
        job = jobs.get(record["job_id"]) if record else None
        state, error = combined_state(state, status, job, record)
        if record and job is None and slurm_error and state not in ("done", "diverged"):
            error = slurm_error
        result = rundir.read_result() or {}
        rows.append(entry | {
            "state": state,
            "step": status.get("step", 0),
            "total_steps": entry["steps"],
            "final_val_loss": result.get("final_val_loss", math.nan),
            "wall_s": result.get("wall_time_s", math.nan),
            "error": error,
            "job_id": record["job_id"] if record else "",
            "slurm_state": job.state if job else "",
        })
    return rows


def state_counts(rows: list[dict[str, Any]]) -> Counter:
    return Counter(row["state"] for row in rows)


def status_table(sweep_name: str, rows: list[dict[str, Any]]) -> Table:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(state_counts(rows).items()))
    table = Table(title=f"sweep {sweep_name}: {len(rows)} runs ({counts})")
    with_jobs = any(row["job_id"] for row in rows)
    seeds = len({row.get("seed", 0) for row in rows}) > 1  # otherwise a cell's rows would look alike
    headers = ["run id", "arch", "size", "budget", *(["seed"] if seeds else []), "state", "step", "val loss", "time"]
    headers += ["job", "error"] if with_jobs else ["error"]
    for header in headers:
        table.add_column(header, justify="right" if header in ("step", "val loss", "time") else "left")
    for row in rows:
        style = STATE_STYLES.get(row["state"], "")
        cells = [
            row["run_id"], row["arch"], row["size"],
            sci(row["budget"]), *([str(row.get("seed", 0))] if seeds else []),
            f"[{style}]{row['state']}[/]" if style else row["state"],
            f"{row['step']}/{row['total_steps']}",
            "" if math.isnan(row["final_val_loss"]) else f"{row['final_val_loss']:.4f}",
            "" if math.isnan(row["wall_s"]) else f"{row['wall_s']:.0f}s",
        ]
        cells += [row["job_id"], row["error"][:80]] if with_jobs else [row["error"][:60]]
        table.add_row(*cells)
    return table
