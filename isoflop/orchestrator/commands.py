"""The sweep subcommands of `isoflop`: plan, run, submit, retry, status, collect and throughput.

Each has `add_<name>(subparsers)` (its arguments; sets `handler=`) and `<name>_command(args)`, the
convention of isoflop/cli.py. Imports happen inside the handlers so `isoflop --help` stays fast, and
none of them imports torch (only the worker processes that `run` starts do) except `throughput`,
which trains in its own process, inside its handler.
A sweep problem (SweepError) or a bad option prints one line naming file, key path, value and what
is allowed, and exits with EXIT_SWEEP_ERROR; a full disk or an unwritable runs folder prints which
file and why (EXIT_UNWRITABLE); SLURM refusing a submission or query prints what it said
(EXIT_SLURM_ERROR). Never a traceback for any of these.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from isoflop.cli import ErrorExits, folder, one_line_errors

EXIT_SWEEP_ERROR = 2
EXIT_SLURM_ERROR = 3
EXIT_UNWRITABLE = 74  # EX_IOERR


class UsageError(Exception):
    """A command-line value that cannot work (e.g. --only matching nothing); one line, exit 2."""


def _sweep_error_exits() -> ErrorExits:
    from isoflop.orchestrator.jobs import SlurmQueryError
    from isoflop.orchestrator.rundir import UnwritableError
    from isoflop.orchestrator.spec import SweepError
    from isoflop.orchestrator.submit import SubmitError

    return [
        ((SweepError, UsageError, FileNotFoundError), EXIT_SWEEP_ERROR),
        ((UnwritableError,), EXIT_UNWRITABLE),
        ((SubmitError, SlurmQueryError), EXIT_SLURM_ERROR),
    ]


_reports_sweep_errors = one_line_errors(_sweep_error_exits)


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", type=folder, default=None,
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
    train_tokens = None if args.no_data_check else _corpus_checked(sweep, corpus_train_tokens)
    plan = make_plan(sweep, runs, profile, train_tokens)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0
    console = _console()
    console.print(plan_table(plan))
    if train_tokens is None and sweep.data.task is None:  # task batches are generated, never run out
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
    parser.add_argument("--gpus-per-run", type=int, default=None, metavar="N",
                        help="GPUs per run, one process each (default: executor.gpus_per_run; "
                        "workers x N must fit the machine)")
    parser.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default=None,
                        help="how a run of several GPUs splits (default: executor.parallel)")
    _add_only(parser, "train")
    _add_runs_dir(parser)
    parser.set_defaults(handler=run_command)


def _selected_runs(args: argparse.Namespace) -> tuple[Any, list[Any], Path]:
    """(sweep, the runs --only selects, the sweep's folder of runs); records the sweep's manifest."""
    from isoflop.orchestrator.layout import sweep_dir, write_manifest

    sweep, all_runs = _load(args.sweep)
    runs = _only(args.only, all_runs, sweep.name)
    directory = sweep_dir(sweep.name, args.runs_dir)
    write_manifest(directory, sweep.name, str(sweep.path), all_runs)  # the whole sweep, even with --only
    return sweep, runs, directory


def _only(filters: list[str], all_runs: list[Any], sweep_name: str) -> list[Any]:
    """The runs that the --only filters select, in plan order; UsageError when they are malformed
    or select nothing."""
    from isoflop.orchestrator.launch import parse_only, select

    try:
        runs = select(all_runs, parse_only(filters))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not runs:
        raise UsageError(f"--only {' '.join(filters)} matches none of the {len(all_runs)} runs of "
                         f"sweep {sweep_name}")
    return runs


def _load_corpus(sweep: Any) -> Any:
    """The sweep's corpus; a corpus that does not exist or cannot be read is said once, in one
    line naming the sweep file, instead of failing in every run."""
    from isoflop.data import load_corpus

    return _corpus_checked(sweep, load_corpus)


def _corpus_checked(sweep: Any, read: Callable[[Any], Any]) -> Any:
    """read(sweep.data), with the corpus's ValueError (a missing path, an empty folder, a bad
    tokenizer: each names its data.* key and what is allowed) as a UsageError naming the file."""
    try:
        return read(sweep.data)
    except ValueError as error:
        raise UsageError(f"{sweep.path}: {error}") from None


def _add_only(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help=f"{verb} only matching runs (arch, size, budget, seed, run_id); repeatable")


def _train_here(sweep: Any, runs: list[Any], directory: Path, workers: int,
                gpus_per_run: int | None = None, parallel: str | None = None) -> int:
    """Train `runs` on this machine with the local executor; exit status 0 if all finished."""
    from isoflop.orchestrator.executors import make_executor
    from isoflop.orchestrator.launch import launch

    console = _console()

    def prepare_data() -> None:
        if sweep.data.task is not None:  # a synthetic task: runs generate their own batches
            return
        console.print(f"loading corpus {sweep.data.corpus} ({sweep.data.tokenizer}) ...")
        corpus = _load_corpus(sweep)
        console.print(corpus.describe())
        for run in runs:
            if run.tokens > corpus.n_train_tokens:
                console.print(f"[yellow]warning:[/] {run.arch} {run.size} needs {run.tokens:,} tokens: "
                              f"{run.tokens / corpus.n_train_tokens:.2f} epochs of the corpus (data repeats)")

    try:
        executor = make_executor("local", workers, gpus_per_run or sweep.executor.gpus_per_run,
                                 sweep.executor.nodes_per_run, parallel or sweep.executor.parallel)
    except ValueError as error:  # more GPUs than the machine has, several nodes
        raise UsageError(str(error)) from None
    report = launch(sweep, runs, directory, executor, console, prepare_data)
    return 0 if report.all_finished else 1


@_reports_sweep_errors
def run_command(args: argparse.Namespace) -> int:
    sweep, runs, directory = _selected_runs(args)
    # `run` trains here whatever executor.kind says: `submit` is the way to SLURM.
    return _train_here(sweep, runs, directory, args.workers or sweep.executor.workers,
                       args.gpus_per_run, args.parallel)


# -- isoflop submit / retry -----------------------------------------------------------------------

# --option -> (sweep key of SLURM_KEYS, metavar, help)
SLURM_OPTIONS: dict[str, tuple[str, str, str]] = {
    "--partition": ("partition", "NAME", "SLURM partition (default: the cluster's default)"),
    "--account": ("account", "NAME", "SLURM account to charge"),
    "--qos": ("qos", "NAME", "SLURM quality of service"),
    "--gpus-per-run": ("gpus_per_run", "N", "GPUs per run and node, one task each (default 0)"),
    "--nodes-per-run": ("nodes_per_run", "N", "nodes per run (default 1)"),
    "--parallel": ("parallel", "MODE", "how a run of several GPUs splits: ddp, fsdp or auto (default)"),
    "--cpus-per-run": ("cpus_per_run", "N", "CPUs per run, also its torch threads (default 1)"),
    "--mem": ("mem", "SIZE", "memory per run, e.g. 16G (default: the partition's)"),
    "--time": ("time", "TIME", ("time limit per attempt: minutes or [D-]HH:MM[:SS] (default 60); "
                                "a run that hits it is requeued and resumes from its checkpoint")),
    "--array-parallelism": ("array_parallelism", "N", "array tasks running at once (default 64)"),
    "--max-array-size": ("max_array_size", "N", "tasks per job array (default 1000)"),
    "--max-requeues": ("max_requeues", "N", "time-limit requeues per run (default 3)"),
}


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    from isoflop.orchestrator.spec import EXECUTOR_KINDS

    parser.add_argument("--executor", choices=EXECUTOR_KINDS, default=None,
                        help="where the runs train (default: executor.kind of the sweep file)")
    group = parser.add_argument_group("SLURM settings (default: the sweep file's executor section)")
    for option, (key, metavar, help_text) in SLURM_OPTIONS.items():
        group.add_argument(option, dest=f"slurm_{key}", metavar=metavar, default=None, help=help_text)


def _slurm_settings(args: argparse.Namespace, sweep: Any) -> Any:
    from isoflop.orchestrator.spec import slurm_settings_with

    overrides = {key: getattr(args, f"slurm_{key}") for key, _, _ in SLURM_OPTIONS.values()
                 if getattr(args, f"slurm_{key}") is not None}
    return slurm_settings_with(sweep.executor.slurm, overrides, "command line")


def add_submit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="submit a sweep's unfinished runs to SLURM as job arrays, and return",
        description="Submit every run of the sweep that is not finished and has no live job as "
        "SLURM job arrays (one task per run), then return at once; the job ids go into the run "
        "directories (job.json) and `isoflop status` follows them. The isoflop package is copied "
        "to <runs>/<sweep>/.code/<hash>/ and the jobs run that copy, so editing the checkout "
        "does not change waiting jobs. Failed and cancelled runs are left to `isoflop retry`.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    _add_executor_options(parser)
    _add_only(parser, "submit")
    _add_runs_dir(parser)
    parser.set_defaults(handler=submit_command)


def _submit_to_slurm(args: argparse.Namespace, sweep: Any, runs: list[Any], directory: Path,
                     wanted: frozenset[str]) -> int:
    from isoflop.orchestrator.submit import submit

    settings = _slurm_settings(args, sweep)
    report = submit(sweep.name, runs, directory, settings, wanted)
    arrays = sorted({job_id.split("_")[0] for job_id in report.submitted.values()}, key=int)
    runs_dir = f" --runs-dir {args.runs_dir}" if args.runs_dir else ""
    notes = [f"{report.finished} finished"] if report.finished else []
    notes += [f"{report.busy} queued or running already"] if report.busy else []
    notes += [f"{n} {state}" for state, n in sorted(report.left.items())]
    print(f"sweep {sweep.name}: submitted {len(report.submitted)} of {report.selected} runs"
          + (f" ({', '.join(notes)})" if notes else ""))
    if report.submitted:
        print(f"  SLURM job arrays {', '.join(arrays)}: partition {settings.partition or '(default)'}, "
              f"{settings.time_min} min per attempt, {settings.cpus_per_run} CPUs and "
              f"{settings.gpus_per_run} GPUs per run, at most {settings.array_parallelism} at once")
        print(f"  code pinned at {report.code}")
        print(f"  follow them with: isoflop status {args.sweep}{runs_dir}")
    if set(report.left) & {"failed", "cancelled"} and "failed" not in wanted:
        print(f"  failed or cancelled runs are not resubmitted: isoflop retry {args.sweep} --failed{runs_dir}")
    return 0


@_reports_sweep_errors
def submit_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.submit import SUBMITTABLE

    sweep, runs, directory = _selected_runs(args)
    if (args.executor or sweep.executor.kind) != "slurm":
        raise UsageError(f"submit hands runs to SLURM but {args.sweep} has executor.kind="
                         f"{sweep.executor.kind!r}; allowed: --executor slurm (or kind: slurm in the "
                         f"sweep file); `isoflop run` trains on this machine")
    return _submit_to_slurm(args, sweep, runs, directory, SUBMITTABLE)


def add_retry(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retry", help="run a sweep's failed (or cancelled) runs again",
        description="Run again the runs of the sweep that failed (--failed) or were cancelled "
        "(--cancelled): submitted to SLURM with --executor slurm, else trained here. They resume "
        "from their checkpoints where they have one.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--failed", action="store_true", help="retry the failed runs")
    parser.add_argument("--cancelled", action="store_true", help="retry the cancelled runs")
    parser.add_argument("--workers", type=int, default=None,
                        help="local executor: runs at once (default: executor.workers of the sweep)")
    _add_executor_options(parser)
    _add_only(parser, "retry")
    _add_runs_dir(parser)
    parser.set_defaults(handler=retry_command)


@_reports_sweep_errors
def retry_command(args: argparse.Namespace) -> int:
    from isoflop.orchestrator.submit import choose

    wanted = frozenset(state for state, chosen in (("failed", args.failed), ("cancelled", args.cancelled))
                       if chosen)
    if not wanted:
        raise UsageError("retry which runs? allowed: --failed, --cancelled (or both)")
    sweep, runs, directory = _selected_runs(args)
    if (args.executor or sweep.executor.kind) == "slurm":
        return _submit_to_slurm(args, sweep, runs, directory, wanted)
    todo, report = choose(runs, directory, wanted)
    if not todo:
        print(f"sweep {sweep.name}: no {' or '.join(sorted(wanted))} runs to retry "
              f"({report.finished} of {report.selected} finished)")
        return 0
    return _train_here(sweep, todo, directory, args.workers or sweep.executor.workers)


# -- isoflop status -------------------------------------------------------------------------------


def add_status(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="count a sweep's runs by state and list them",
        description="Show how many runs of a sweep are done, running, failed, ... and a table of runs. "
        "Runs submitted to SLURM also get their job's state (pending, running, preempted, cancelled, "
        "failed), asked of SLURM in one batch for the whole sweep.",
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
    parser.add_argument("--out", type=folder, default=None, help="output folder (default: results/<sweep>)")
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


# -- isoflop throughput ---------------------------------------------------------------------------

THROUGHPUT_COLUMNS: tuple[str, ...] = (
    "arch", "size", "params", "tokens_per_step", "steps", "repeats", "tokens_per_s", "tokens_per_s_min",
    "tokens_per_s_max", "tokens_per_s_rounds", "device", "compile", "torch_version", "git_sha",
)
THROUGHPUT_FOLDER = "_throughput"  # beside the sweep's run folders; not a run id, so never a run


def add_throughput(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "throughput", help="throughput of each (architecture, size) trained alone, for honest "
        "wall-clock multipliers when runs shared a GPU",
        description="Train each distinct (architecture, size) of the sweep alone for a few steps, "
        "one after another in this process and through the code path of real runs, and write "
        "throughput.csv (tokens/s of the second half of the steps; the median of --repeats "
        "measurements taken in interleaved rounds, so drifts of the host hit every model alike, and "
        "each round's value). "
        "Runs that shared a GPU measured their throughput under contention; with throughput.csv "
        "beside runs.csv, `isoflop report` computes the wall-clock multipliers from these numbers "
        "instead.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--steps", type=int, default=30,
                        help="training steps per model, half of them warm-up (default 30, at least 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per model, one per round over all models; the table keeps "
                             "their median, min and max (default 3, at least 1). Small models' steps "
                             "are bound by host time, which drifts by 10%% and more over minutes")
    parser.add_argument("--out", type=folder, default=None, help="output folder (default: results/<sweep>)")
    _add_only(parser, "measure")
    _add_runs_dir(parser)
    parser.set_defaults(handler=throughput_command)


def _first_of_each_pair(runs: list[Any]) -> list[Any]:
    """The first run of each (arch, size), in plan order: every budget trains the same model, and
    one model is one measurement."""
    first: dict[tuple[str, str], Any] = {}
    for run in runs:
        first.setdefault((run.arch, run.size), run)
    return list(first.values())


@_reports_sweep_errors
def throughput_command(args: argparse.Namespace) -> int:
    from isoflop.analysis.throughput import THROUGHPUT_FILE  # the name `isoflop report` reads
    from isoflop.orchestrator.layout import sweep_dir
    from isoflop.train.throughput import MIN_STEPS  # torch loads only when measuring starts

    if args.steps < MIN_STEPS:
        raise UsageError(f"--steps {args.steps}; allowed: {MIN_STEPS} or more (half of them warm up, "
                         "half are timed)")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}; allowed: 1 or more")
    sweep, all_runs = _load(args.sweep)
    pairs = _first_of_each_pair(_only(args.only, all_runs, sweep.name))
    if sweep.data.task is None:
        _load_corpus(sweep)  # a missing corpus: one line now, not a traceback in the first run
    folder = sweep_dir(sweep.name, args.runs_dir) / THROUGHPUT_FOLDER
    rows = _measure_pairs(pairs, folder, args.steps, args.repeats, _console())
    path = (args.out or Path("results") / sweep.name) / THROUGHPUT_FILE
    _write_throughput_csv(path, rows)
    print(f"wrote {path} ({len(rows)} (architecture, size) pairs, {args.steps} steps each, median of "
          f"{args.repeats})")
    return 0


def _measure_pairs(pairs: list[Any], folder: Path, steps: int, repeats: int,
                   console: Any) -> list[dict[str, Any]]:
    """One throughput.csv row per planned run of `pairs`, each trained alone in folder/<arch>-<size>,
    `repeats` times in rounds over all pairs; the row keeps the median tokens/s and the range."""
    import statistics

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from isoflop.train.provenance import git_sha
    from isoflop.train.throughput import measure

    common = {"steps": steps, "repeats": repeats, "torch_version": torch.__version__,
              "git_sha": git_sha() or ""}
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {(run.arch, run.size): [] for run in pairs}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("throughput", total=len(pairs) * repeats)
        for round_index in range(repeats):
            for run in pairs:
                result = measure(run.spec, folder / f"{run.arch}-{run.size}", steps=steps)
                measured[(run.arch, run.size)].append(result)
                progress.advance(task)
                progress.console.print(f"{run.arch} {run.size}: {result['tokens_per_s']:,.0f} tokens/s "
                                       f"({result['params']:,} params, {result['device']}; round "
                                       f"{round_index + 1}/{repeats})")
    rows = []
    for run in pairs:
        results = measured[(run.arch, run.size)]
        rates = [r["tokens_per_s"] for r in results]
        rows.append({"arch": run.arch, "size": run.size, "tokens_per_step": run.spec.train.tokens_per_step,
                     "params": results[0]["params"], "device": results[0]["device"],
                     "compile": run.spec.train.compile,
                     "tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates),
                     "tokens_per_s_max": max(rates),
                     # round by round, so the report can take each round's ratios apart
                     "tokens_per_s_rounds": ";".join(f"{rate:.1f}" for rate in rates)} | common)
    return rows


def _write_throughput_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from isoflop.atomic import atomic_write_text

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=THROUGHPUT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # str() of a float round-trips: every digit of tokens_per_s is kept
    atomic_write_text(path, text.getvalue())


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_plan, add_run, add_submit, add_retry, add_status, add_collect, add_throughput,
)
