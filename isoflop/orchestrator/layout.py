"""Where a sweep's runs live on disk, and the sweep manifest that labels them.

    <runs root>/<sweep name>/manifest.json     which runs belong to the sweep, with their labels
    <runs root>/<sweep name>/<run id>/         one RunDir per run (see rundir.py)

The runs root is, first found: an explicit argument (--runs-dir), the environment variable
ISOFLOP_RUNS, ./runs. The manifest holds each run's labels (architecture, baseline flag, size,
budget, counts) and its RunSpec, so that status and collect work from the run folder alone, without
the sweep file and without torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from isoflop.orchestrator.grid import PlannedRun, without_nan
from isoflop.orchestrator.rundir import RunDir, atomic_write_json, read_json, writing

RUNS_ENV = "ISOFLOP_RUNS"
DEFAULT_RUNS_ROOT = Path("runs")
MANIFEST_NAME = "manifest.json"


def runs_root(explicit: Path | str | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_ROOT)


def sweep_dir(sweep_name: str, root: Path | str | None = None) -> Path:
    return runs_root(root) / sweep_name


def run_dir(sweep_name: str, run_id: str, root: Path | str | None = None) -> RunDir:
    return RunDir(sweep_dir(sweep_name, root) / run_id)


def manifest_entry(run: PlannedRun) -> dict[str, Any]:
    return run.labels() | {"spec": run.spec.to_dict()}


def write_manifest(directory: Path, sweep_name: str, sweep_file: str, runs: list[PlannedRun]) -> None:
    """Record the sweep's current runs (a later `run` of an edited sweep file rewrites it)."""
    with writing(directory):  # the first write into a runs folder: say clearly if it is unwritable
        directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / MANIFEST_NAME, {
        "sweep": sweep_name,
        "sweep_file": sweep_file,
        "runs": [without_nan(manifest_entry(run)) for run in runs],
    })


def read_manifest(directory: Path) -> tuple[str, list[dict[str, Any]]]:
    """(sweep name, run entries) of the sweep whose runs are in `directory`."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the sweep first (isoflop run SWEEP.yaml)")
    manifest = read_json(path)
    # A ladder grid's budget is NaN, stored as null (JSON has no NaN).
    entries = [e | {"budget": math.nan if e["budget"] is None else e["budget"]} for e in manifest["runs"]]
    return manifest["sweep"], entries
