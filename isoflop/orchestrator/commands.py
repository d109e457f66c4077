"""The sweep subcommands of `isoflop`: plan, run, status and collect.

Each has `add_<name>(subparsers)` (its arguments; sets `handler=`) and `<name>_command(args)`, the
convention of isoflop/cli.py. Imports happen inside the handlers so `isoflop --help` stays fast, and
none of them imports torch (only the worker processes that `run` starts do).
A sweep problem (SweepError) prints one line naming file, key path, value and what is allowed, and
exits with EXIT_SWEEP_ERROR.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_SWEEP_ERROR = 2


Handler = Callable[[argparse.Namespace], int]


def _reports_sweep_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from isoflop.orchestrator.spec import SweepError

        try:
            return handler(args)
        except (SweepError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_SWEEP_ERROR

    return wrapped


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="root of the run folders (default: $ISOFLOP_RUNS or ./runs)")


def _console() -> Any:
    """A rich console; wide when writing to a file or pipe, where wrapped table rows help no one."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    return console


def _load(sweep_file: Path) -> tuple[Any, list[Any]]:
    from isoflop.orchestrator.grid import expand
    from isoflop.orchestrator.spec import load_sweep

    sweep = load_sweep(sweep_file)
    return sweep, expand(sweep)


def _entries(sweep_arg: Path, runs_dir: Path | None) -> tuple[str, Path, list[dict[str, Any]]]:
    """(sweep name, its folder of runs, the runs' labels) from a sweep file or a sweep's run folder."""
    from isoflop.orchestrator.layout import read_manifest, sweep_dir

    if sweep_arg.is_dir():
        name, entries = read_manifest(sweep_arg)
        return name, sweep_arg, entries
    sweep, runs = _load(sweep_arg)
    return sweep.name, sweep_dir(sweep.name, runs_dir), [run.labels() for run in runs]


# -- isoflop plan ---------------------------------------------------------------------------------


def add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="validate a sweep and show its runs, FLOPs and estimated time",
        description="Validate a sweep file and print one row per run (architecture, size, params, "
        "tokens, FLOPs, estimated time) and the totals. Does not import torch.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--device", default=None,
                        help="time-estimate profile: cpu or h200 (default: from train.device)")
    parser.add_argument("--no-data-check", action="store_true",
                        help="do not load the corpus to check that no run repeats data")
    parser.set_defaults(handler=plan_command)


@_reports_sweep_errors
def plan_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.estimate import profile_for
    from isoflop.orchestrator.plan import corpus_train_tokens, make_plan, plan_table

    sweep, runs = _load(args.sweep)
    profile = profile_for(args.device or sweep.train["device"])
    train_tokens = None if args.no_data_check else corpus_train_tokens(sweep.data)
    plan = make_plan(sweep, runs, profile, train_tokens)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0
    console = _console()
    console.print(plan_table(plan))
    if train_tokens is None:
        console.print(f"data check skipped: the size of {sweep.data.corpus} ({sweep.data.tokenizer}) "
                      "is not cheaply known here; `isoflop run` checks it after loading the corpus")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    return 0


# -- isoflop run ----------------------------------------------------------------------------------


def add_run(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="train every run of a sweep that has not finished",
        description="Train every run of the sweep not yet finished, each in its own process, N at a "
        "time. Rerunning is safe: finished runs are skipped, interrupted ones resume.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once (default: executor.workers of the sweep file)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="train only matching runs (arch, size, budget, seed, run_id); repeatable")
    _add_runs_dir(parser)
    parser.set_defaults(handler=run_command)


@_reports_sweep_errors
def run_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.executors import make_executor
    from isoflop.orchestrator.launch import launch, parse_only, select
    from isoflop.orchestrator.layout import sweep_dir, write_manifest

    sweep, all_runs = _load(args.sweep)
    try:
        runs = select(all_runs, parse_only(args.only))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SWEEP_ERROR
    if not runs:
        print(f"error: --only {' '.join(args.only)} matches none of the {len(all_runs)} runs of "
              f"sweep {sweep.name}", file=sys.stderr)
        return EXIT_SWEEP_ERROR
    directory = sweep_dir(sweep.name, args.runs_dir)
    write_manifest(directory, sweep.name, str(sweep.path), all_runs)  # the whole sweep, even with --only
    workers = args.workers or sweep.executor.workers
    console = _console()

    def prepare_data() -> None:
        from isoflop.data import load_corpus

        console.print(f"loading corpus {sweep.data.corpus} ({sweep.data.tokenizer}) ...")
        corpus = load_corpus(sweep.data)
        console.print(corpus.describe())
        for run in runs:
            if run.tokens > corpus.n_train_tokens:
                console.print(f"[yellow]warning:[/] {run.arch} {run.size} needs {run.tokens:,} tokens: "
                              f"{run.tokens / corpus.n_train_tokens:.2f} epochs of the corpus (data repeats)")

    executor = make_executor(sweep.executor.kind, workers)
    report = launch(sweep, runs, directory, executor, console, prepare_data)
    return 0 if report.all_finished else 1


# -- isoflop status -------------------------------------------------------------------------------


def add_status(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="count a sweep's runs by state and list them",
        description="Show how many runs of a sweep are done, running, failed, ... and a table of runs.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file, or its folder of runs")
    parser.add_argument("--json", action="store_true", help="print the runs and states as JSON")
    _add_runs_dir(parser)
    parser.set_defaults(handler=status_command)


@_reports_sweep_errors
def status_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.grid import without_nan
    from isoflop.orchestrator.status import run_states, state_counts, status_table

    name, directory, entries = _entries(args.sweep, args.runs_dir)
    rows = run_states(entries, directory)
    if args.json:
        runs = [without_nan({k: v for k, v in row.items() if k != "spec"}) for row in rows]
        print(json.dumps({"sweep": name, "counts": state_counts(rows), "runs": runs}, indent=1))
        return 0
    _console().print(status_table(name, rows))
    return 0


# -- isoflop collect ------------------------------------------------------------------------------


def add_collect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collect", help="write a sweep's tidy tables runs.csv and evals.csv",
        description="Read every run directory of the sweep and write runs.csv (one row per run) and "
        "evals.csv (one row per eval point), the tables the analysis reads.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file, or its folder of runs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/<sweep>)")
    _add_runs_dir(parser)
    parser.set_defaults(handler=collect_command)


@_reports_sweep_errors
def collect_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.collect import collect
    from isoflop.orchestrator.status import run_states, state_counts

    name, directory, entries = _entries(args.sweep, args.runs_dir)
    out = args.out or Path("results") / name
    runs_path, evals_path = collect(name, entries, directory, out)
    states = state_counts(run_states(entries, directory))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    print(f"wrote {runs_path} ({len(entries)} runs: {counts}) and {evals_path}")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_plan, add_run, add_status, add_collect,
)
