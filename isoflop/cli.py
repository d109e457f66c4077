"""The `isoflop` command.

One small function adds each subcommand's arguments and one runs it; heavy imports (torch, pandas)
happen inside the run function, so `isoflop --help` and the torch-free subcommands stay fast.
To add a subcommand, write `add_<name>(subparsers)` that sets `handler=` and list it in
_subcommands() (the sweep subcommands live in isoflop/orchestrator/commands.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import isoflop

EXIT_CONFIG_ERROR = 2

Handler = Callable[[argparse.Namespace], int]
EXIT_INTERRUPTED = 130


# -- isoflop train -------------------------------------------------------------------------------


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one model from a YAML config file",
        description="Train one model from a YAML config file (see examples/train-tiny.yaml). "
        "Rerunning the same command resumes an interrupted run or returns a finished one.",
    )
    parser.add_argument("config", type=Path, help="the run's YAML file")
    parser.add_argument(
        "--rundir", type=folder, default=None,
        help="run directory (default: runs/train/<run_id>)",
    )
    parser.add_argument(
        "--parallel", choices=("auto", "ddp", "fsdp"), default=None,
        help="under torchrun (one process per GPU): replicate the model (ddp) or shard it (fsdp); "
        "default: $ISOFLOP_PARALLEL, else auto (fsdp when a replica would not fit). The global "
        "batch, and so the result, stays the config's whatever the number of processes",
    )
    parser.set_defaults(handler=run_train)


def folder(text: str) -> Path:
    """An argparse type for folders that may not exist yet (created when needed), but must not be
    a file: the mistake is then one usage line, not a traceback from mkdir."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file; allowed: a folder, existing or not")
    return path


def _si(value: float) -> str:
    """1234567 -> '1.23M': short numbers for a summary line."""
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def run_train(args: argparse.Namespace) -> int:
    from isoflop.models.counting import count_params, flops_per_token
    from isoflop.train.config_file import load_train_config

    spec = load_train_config(args.config)
    rundir = args.rundir or Path("runs") / "train" / spec.run_id
    params = count_params(spec.model)
    flops = flops_per_token(spec.model, spec.train.seq_len)
    steps = spec.train.total_steps
    tokens = steps * spec.train.tokens_per_step
    # Under torchrun every rank runs this command; one of them speaks.
    speaks = os.environ.get("RANK", "0") == "0"
    if speaks:
        print(f"run {spec.run_id} -> {rundir}")
        print(
            f"{spec.arch} {spec.size}: {_si(params.total)} params ({_si(params.non_embedding)} "
            f"non-embedding) | {_si(tokens)} tokens in {steps} steps"
            f" | {_si(flops.train * tokens)} FLOPs",
            flush=True,
        )

    from isoflop.train import run

    result = run(spec, rundir, echo=True, parallel=args.parallel)
    if not speaks:
        return 0 if result["state"] == "done" else 1
    if result["state"] != "done":
        print(f"run {spec.run_id} {result['state']}: {result['reason']}", file=sys.stderr)
        return 1
    print(
        f"final train loss {result['final_train_loss']:.4f}"
        f" | val loss {result['final_val_loss']:.4f} | {result['tokens_per_s']:,.0f} tokens/s"
        f" | {result['wall_time_s']:.1f} s"
    )
    return 0


# -- isoflop fit / report -------------------------------------------------------------------------


def _budgets(text: str) -> list[float]:
    """'1e18,3e19' -> [1e18, 3e19]: budgets (training FLOPs) at which to report multipliers."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at {text!r}: expected FLOP budgets like 1e18,3e19")
    if not values or any(not value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"--at {text!r}: budgets must be positive numbers")
    return values


def _positive_int(text: str) -> int:
    """An argparse type for counts that must be >= 1 (--n-boot)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed: a whole number >= 1")
    return value


def _add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="a results folder holding runs.csv (e.g. results/quickstart)")
    parser.add_argument("--at", type=_budgets, default=None, metavar="C[,C...]",
                        help="also report the multiplier at these training budgets (FLOPs), e.g. 1e21")
    parser.add_argument("--n-boot", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument(
        "--method", choices=("frontier", "approach2", "approach3"), default="frontier",
        help="the compute-optimal loss curve behind the multipliers: frontier (lowest-loss run per "
        "budget), approach2 (interpolated minimum per budget) or approach3 (the fitted surface "
        "L(N, D)); default frontier",
    )
    parser.add_argument("--wallclock", action=argparse.BooleanOptionalAction, default=None,
                        help="the wall-clock multiplier, from the measured throughput (default: given "
                             "whenever every architecture has a measured throughput; --wallclock "
                             "forces it, --no-wallclock leaves it out)")


def add_fit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit", help="fit loss-vs-compute power laws and compute multipliers from runs.csv",
        description="Fit each architecture's compute-optimal loss L*(C) = E + A*C^-alpha (by "
        "--method) and report the compute multiplier against the baseline, with a paired bootstrap "
        "90% interval and P(M > 1). Writes fits.json and multipliers.csv next to runs.csv.",
    )
    _add_analysis_arguments(parser)
    parser.add_argument(
        "--resample-budgets", action=argparse.BooleanOptionalAction, default=None,
        help="also redraw whole budgets in the bootstrap (default: only for approach3, which fits "
        "every run; a 3-parameter law through a redrawn set of 4-6 budgets is often undetermined)",
    )
    parser.set_defaults(handler=run_fit)


ErrorExits = list[tuple[tuple[type[BaseException], ...], int]]


def one_line_errors(error_exits: Callable[[], ErrorExits]) -> Callable[[Handler], Handler]:
    """Errors that are the user's to fix (or the world's: a full disk, an unreachable cluster)
    print one line and exit with their code; anything else is a bug and keeps its traceback.
    `error_exits` lists (error types, exit code), first match wins; it is called inside the
    handler so the error classes (and what they import) load only when a command runs."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapped(args: argparse.Namespace) -> int:
            exits = error_exits()
            try:
                return handler(args)
            except tuple(t for types, _ in exits for t in types) as error:
                print(f"error: {error}", file=sys.stderr)
                return next(code for types, code in exits if isinstance(error, types))

        return wrapped

    return decorate


def _table_error_exits() -> ErrorExits:
    # A missing or malformed results table is the user's to fix.
    from isoflop.analysis.table import TableError

    return [((TableError, FileNotFoundError, NotADirectoryError), EXIT_CONFIG_ERROR)]


_reports_table_errors = one_line_errors(_table_error_exits)


@_reports_table_errors
def run_fit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from isoflop.analysis.report import format_multiplier_table, run_fit as fit_results

    outcome = fit_results(args.results, at=args.at, n_boot=args.n_boot, seed=args.seed,
                          method=args.method, wallclock=args.wallclock,
                          resample_budgets=args.resample_budgets)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a file or pipe: wrapped rows help no one
    console.print(format_multiplier_table(outcome.multipliers, outcome.baseline))
    for warning in outcome.result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {outcome.fits_path} and {outcome.multipliers_path}")
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write report.md and every plot from runs.csv alone",
        description="Regenerate fits, multipliers, plots (plots/*.png) and report.md from the tidy "
        "table runs.csv (and evals.csv when present) of a results folder.",
    )
    _add_analysis_arguments(parser)
    parser.set_defaults(handler=run_report)


@_reports_table_errors
def run_report(args: argparse.Namespace) -> int:
    from isoflop.analysis.report import write_report

    path = write_report(args.results, at=args.at, n_boot=args.n_boot, seed=args.seed,
                        method=args.method, wallclock=args.wallclock)
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0


def add_merge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge the tables of several results folders into one, for one analysis",
        description="Write OUT/runs.csv (and evals.csv, throughput.csv, reference.yaml) from several "
        "results folders, so that `isoflop report OUT` fits their runs together: a follow-up sweep "
        "with the sweep it follows, say. The folders must share the baseline and the corpus. A run "
        "in several folders (the same run id) is kept from the first folder named, and OUT/merge.json "
        "lists the sources and the duplicates dropped.",
    )
    parser.add_argument("results", type=Path, nargs="+",
                        help="results folders holding runs.csv, first one wins on duplicates")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged tables")
    parser.set_defaults(handler=run_merge)


@_reports_table_errors
def run_merge(args: argparse.Namespace) -> int:
    from isoflop.analysis.merge import format_merge, merge_results

    print(format_merge(merge_results(args.results, args.out)))
    return 0


# -- the command ---------------------------------------------------------------------------------


def _subcommands() -> tuple[Callable[[argparse._SubParsersAction], None], ...]:
    from isoflop.orchestrator import commands as sweep_commands

    return (
        add_train,
        *sweep_commands.SUBCOMMANDS,
        add_fit,
        add_report,
        add_merge,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isoflop",
        description="Scaling-law experiments: sweeps of training runs, power-law fits and "
        "compute multipliers.",
    )
    parser.add_argument("--version", action="version", version=f"isoflop {isoflop.__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True)
    for add in _subcommands():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here, not at the top: config_file pulls in yaml and the model registry.
    from isoflop.train.config_file import ConfigError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
