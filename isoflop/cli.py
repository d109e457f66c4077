"""The `isoflop` command.

One small function adds each subcommand's arguments and one runs it; heavy imports (torch, pandas)
happen inside the run function, so `isoflop --help` and the torch-free subcommands stay fast.
To add a subcommand, write `add_<name>(subparsers)` that sets `handler=` and list it in
SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import isoflop

EXIT_CONFIG_ERROR = 2
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
        "--rundir", type=Path, default=None,
        help="run directory (default: runs/train/<run_id>)",
    )
    parser.set_defaults(handler=run_train)


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
    print(f"run {spec.run_id} -> {rundir}")
    print(
        f"{spec.arch} {spec.size}: {_si(params.total)} params ({_si(params.non_embedding)} "
        f"non-embedding) | {_si(tokens)} tokens in {steps} steps"
        f" | {_si(flops.train * tokens)} FLOPs",
        flush=True,
    )

    from isoflop.train import run

    result = run(spec, rundir, echo=True)
    if result["state"] != "done":
        print(f"run {spec.run_id} {result['state']}: {result['reason']}", file=sys.stderr)
        return 1
    print(
        f"final train loss {result['final_train_loss']:.4f}"
        f" | val loss {result['final_val_loss']:.4f} | {result['tokens_per_s']:,.0f} tokens/s"
        f" | {result['wall_time_s']:.1f} s"
    )
    return 0


# -- the command ---------------------------------------------------------------------------------

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_train,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isoflop",
        description="Scaling-law experiments: sweeps of training runs, power-law fits and "
        "compute multipliers.",
    )
    parser.add_argument("--version", action="version", version=f"isoflop {isoflop.__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True)
    for add in SUBCOMMANDS:
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
