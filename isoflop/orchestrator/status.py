"""Where a sweep stands: each run's state read from its run directory, counts and a table.

Runs are given as label dicts (PlannedRun.labels() or manifest entries), so status works from a
sweep file or from the manifest alone. A run without a run directory is 'not started'; one whose
status says running but whose worker holds no lock was interrupted ('running' is only believed
while a live worker holds the run's lock).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from isoflop.orchestrator.formats import sci
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.worker import is_locked

NOT_STARTED = "not started"
INTERRUPTED = "interrupted"
STATE_STYLES = {
    "done": "green", "diverged": "yellow", "failed": "red", "running": "cyan", INTERRUPTED: "magenta",
}


def run_states(entries: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """Each entry with state, step, total_steps, final_val_loss and error added."""
    rows = []
    for entry in entries:
        rundir = RunDir(directory / entry["run_id"])
        status = rundir.read_status() or {}
        state = status.get("state", NOT_STARTED)
        if state == "running" and not is_locked(rundir.path):
            state = INTERRUPTED
        result = rundir.read_result() or {}
        rows.append(entry | {
            "state": state,
            "step": status.get("step", 0),
            "total_steps": entry["steps"],
            "final_val_loss": result.get("final_val_loss", math.nan),
            "wall_s": result.get("wall_time_s", math.nan),
            "error": status.get("error") or "",
        })
    return rows


def state_counts(rows: list[dict[str, Any]]) -> Counter:
    return Counter(row["state"] for row in rows)


def status_table(sweep_name: str, rows: list[dict[str, Any]]) -> Table:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(state_counts(rows).items()))
    table = Table(title=f"sweep {sweep_name}: {len(rows)} runs ({counts})")
    for header in ("run id", "arch", "size", "budget", "state", "step", "val loss", "time", "error"):
        table.add_column(header, justify="right" if header in ("step", "val loss", "time") else "left")
    for row in rows:
        style = STATE_STYLES.get(row["state"], "")
        table.add_row(
            row["run_id"], row["arch"], row["size"],
            sci(row["budget"]),
            f"[{style}]{row['state']}[/]" if style else row["state"],
            f"{row['step']}/{row['total_steps']}",
            "" if math.isnan(row["final_val_loss"]) else f"{row['final_val_loss']:.4f}",
            "" if math.isnan(row["wall_s"]) else f"{row['wall_s']:.0f}s",
            row["error"][:60],
        )
    return table
