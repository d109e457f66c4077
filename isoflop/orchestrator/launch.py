"""Run the unfinished runs of a sweep: write their specs, hand them to an executor, show progress.

Idempotent: a run whose status is done or diverged is never started again (training is
deterministic, so a diverged run would diverge again), a failed, preempted or interrupted one is
restarted and resumes from its checkpoint, and one that a live worker is training (it holds the
run's lease) is left to it. A run whose worker process was killed (SIGKILL, out of memory) is
recorded as failed with the worker's exit code; its checkpoint survives, so the next launch resumes
it from there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from isoflop.orchestrator.estimate import profile_for
from isoflop.orchestrator.executors import Executor, Job, JobEnd
from isoflop.orchestrator.formats import sci
from isoflop.orchestrator.grid import PlannedRun
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.spec import Sweep
from isoflop.orchestrator.worker import EXIT_LOCKED, is_locked

FINISHED_STATES = ("done", "diverged")
SELECTABLE = ("arch", "size", "budget", "seed", "run_id")


@dataclass
class LaunchReport:
    selected: int
    already_finished: int
    busy_elsewhere: int
    states: Counter = field(default_factory=Counter)  # state of each run started here, at its end

    @property
    def all_finished(self) -> bool:
        return self.states["done"] + self.states["diverged"] == sum(self.states.values())


def run_label(run: PlannedRun) -> str:
    budget = "" if math.isnan(run.budget) else f" {sci(run.budget)}"
    seed = f" seed {run.spec.seed}" if run.spec.seed else ""
    return f"{run.arch} {run.size}{budget}{seed}"


def parse_only(filters: list[str]) -> dict[str, set[str]]:
    """['arch=dynamic-qkv,transformer', 'size=d64-l2'] -> {'arch': {...}, 'size': {...}}."""
    selection: dict[str, set[str]] = {}
    for text in filters:
        key, sep, values = text.partition("=")
        if not sep or key not in SELECTABLE or not values:
            raise ValueError(f"--only {text!r}; allowed: KEY=VALUE[,VALUE...] with KEY one of "
                             f"{', '.join(SELECTABLE)}")
        selection.setdefault(key, set()).update(v.strip() for v in values.split(","))
    return selection


def select(runs: list[PlannedRun], selection: dict[str, set[str]]) -> list[PlannedRun]:
    """The runs matching every key of the selection (any of its values); budgets compare as numbers."""
    def matches(run: PlannedRun, key: str, values: set[str]) -> bool:
        if key == "budget":
            return any(float(v) == run.budget for v in values)
        actual = {"arch": run.arch, "size": run.size, "seed": str(run.spec.seed), "run_id": run.run_id}[key]
        return actual in values

    return [run for run in runs if all(matches(run, k, v) for k, v in selection.items())]


def longest_first(runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs ordered by estimated time, longest first (stable for ties).

    With a pool of workers this is the classic longest-processing-time rule: the short runs fill
    the gaps at the end instead of one long run starting last and leaving the other workers idle,
    and a sweep cut off by a time limit loses short runs in progress rather than long ones.
    """
    return sorted(runs, key=lambda run: -profile_for(run.spec.train.device).run_seconds(run))


def launch(
    sweep: Sweep,
    runs: list[PlannedRun],
    directory: Path,
    executor: Executor,
    console: Console,
    prepare_data: Callable[[], None] = lambda: None,
) -> LaunchReport:
    """Train every run in `runs` not yet finished; `directory` is the sweep's folder of runs.

    prepare_data runs once before any worker starts (loading the corpus fills its cache, so the
    workers do not all tokenize it at once).
    """
    todo, finished, busy = [], 0, 0
    for run in runs:
        rundir = RunDir(directory / run.run_id)
        if rundir.state in FINISHED_STATES:
            finished += 1
        elif is_locked(rundir.path):
            busy += 1
        else:
            todo.append(run)
    report = LaunchReport(len(runs), finished, busy)
    todo = longest_first(todo)
    if not todo:
        console.print(f"nothing to do: {finished} of {len(runs)} runs of sweep {sweep.name} are finished"
                      + (f", {busy} running in another process" if busy else ""))
        return report
    console.print(f"sweep {sweep.name}: {len(todo)} runs to train ({finished} already finished) "
                  f"with {executor.workers} workers; logs in {directory}/<run id>/train.log")
    prepare_data()
    jobs = []
    for run in todo:
        rundir = RunDir(directory / run.run_id).create()
        rundir.write_spec(run.spec.to_dict())
        if rundir.read_status() is None:
            rundir.write_status("pending", run_id=run.run_id)
        jobs.append(Job(run.run_id, rundir.path, run_label(run)))

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(sweep.name, total=len(jobs))

        def finished_job(end: JobEnd) -> None:
            state = _final_state(end)
            report.states[state] += 1
            progress.advance(task)
            rundir = RunDir(end.job.rundir)
            result = rundir.read_result()
            loss = f" val {result['final_val_loss']:.4f}" if result else ""
            # A failure says why here, so a sweep that fails everywhere needs no digging.
            error = (rundir.read_status() or {}).get("error") if state == "failed" else None
            why = f": {error.splitlines()[0]}" if error else ""
            progress.console.print(f"{state:>8}  {end.job.label}{loss}  ({end.seconds:.0f} s){why}",
                                   markup=False)

        executor.execute(jobs, on_finish=finished_job)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report.states.items()))
    console.print(f"sweep {sweep.name}: {counts}")
    return report


def _final_state(end: JobEnd) -> str:
    """The run's state after its worker ended; a worker killed before it could say so is failed."""
    rundir = RunDir(end.job.rundir)
    if end.returncode == EXIT_LOCKED:
        return "busy elsewhere"
    state = rundir.state
    if state in FINISHED_STATES or state in ("failed", "preempted"):
        return state
    rundir.write_status("failed", error=f"worker exited with code {end.returncode} while {state}")
    return "failed"
