"""A switch's effect on training steps, paired in one process.

    PYTHONPATH=. python benchmarks/paired_switch.py ISOFLOP_PROJECTED_CONVS auto,off
        [--variants dynamic-qkv,dynamic-all-linear] [--config 300M|small|tiny] [--rounds 8]
        [--steps 6] [--warmup 3] [--compile blocks|none] [--device cuda|cpu]

A change worth a percent of a training step is below the spread between two runs of
train_throughput.py (each variant against its own transformer moves by ~0.5 points, KERNELS.md
training points 20 and 24), so changes to the conv kernels and their ops are measured here: the
transformer, and for each variant one model per value of the switch (any of isoflop's process-wide
settings, named by its environment variable), built, compiled and warmed up with the switch at its
value, then timed in alternating rounds (the order reversed every other round) with the switch set
before each model's steps. Each model's blocks get a class of their own, so torch.compile keeps
their compiled code apart: a switch read while a block is traced is baked into its graph, and the
compile caches would otherwise hand one model another's graph.

Prints ms/step medians over the rounds, each against the transformer, and in how many rounds each
value beat the first. Steps are train_throughput.py's (forward, backward, clipping, AdamW).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys

import torch

from isoflop.backends import BackendChoice
from isoflop.models.lm import compile_regions
from isoflop.models.registry import architecture_names, make_model_config
from isoflop.models.sizes import resolve_size
from train_throughput import BASELINE, CONFIGS, VariantRun  # the script's directory is on the path

SWITCH_MODULES = ("isoflop.kernels", "isoflop.kernels.triton_lowrank", "isoflop.kernels.triton_headwise",
                  "isoflop.models.conv", "isoflop.models.fused_ce", "isoflop.models.mixers.fla")


def switches() -> dict[str, BackendChoice]:
    """isoflop's process-wide settings by environment variable (the Triton modules import on CPU too)."""
    found = {}
    for name in SWITCH_MODULES:
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, BackendChoice):
                found[value.env] = value
    return found


def build(variant: str, args: argparse.Namespace, device: torch.device, tag: str) -> VariantRun:
    """One variant's model and optimiser, its blocks of a class of their own (named by `tag`)."""
    bench = CONFIGS[args.config]
    shape = resolve_size(bench.size)
    cfg = make_model_config(variant, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
                            bench.vocab_size, bench.seq_len)
    run = VariantRun(cfg, device, "none", bench.seq_len, bench.batch_size, "off")
    block = type(run.model.blocks[0])
    apart = type(f"{block.__name__}_{tag}", (block,), {})
    for b in run.model.blocks:
        b.__class__ = apart
    if args.compile == "blocks":
        run.forward = compile_regions(run.model, dynamic=False)
    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("switch", help="a setting's environment variable, e.g. ISOFLOP_PROJECTED_CONVS")
    parser.add_argument("values", help="comma-separated values to compare; the first is the reference")
    parser.add_argument("--variants", default="dynamic-qkv", help="comma-separated conv variants")
    parser.add_argument("--config", choices=list(CONFIGS), default=None, help="default: 300M on CUDA, else tiny")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (the first compiles)")
    parser.add_argument("--compile", choices=("blocks", "none"), default="blocks")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    known = switches()
    if args.switch not in known:
        parser.error(f"switch {args.switch}: unknown; allowed: {', '.join(sorted(known))}")
    args.choice, args.values = known[args.switch], args.values.split(",")
    bad = [v for v in args.values if v not in args.choice.allowed]
    if bad or len(args.values) < 2:
        parser.error(f"values {args.values}: give two or more of {', '.join(args.choice.allowed)}")
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in architecture_names()]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(architecture_names())}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.config = args.config or ("300M" if args.device.type == "cuda" else "tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    choice, before = args.choice, args.choice.get()
    models = {(BASELINE, before): None, **{(v, value): None for v in args.variants for value in args.values}}
    try:
        for n, (variant, value) in enumerate(models):
            choice.set(value)
            models[(variant, value)] = run = build(variant, args, args.device, f"{n}")
            for _ in range(args.warmup):
                run.step()
        times = {key: [] for key in models}
        for r in range(args.rounds):
            for key in (list(models) if r % 2 == 0 else list(models)[::-1]):
                choice.set(key[1])
                times[key].append(models[key].timed(args.steps) / args.steps * 1e3)
    finally:
        choice.set(before)
    median = {key: statistics.median(t) for key, t in times.items()}
    base = median[(BASELINE, before)]
    print(f"{args.config}, {args.switch}, {args.rounds} rounds x {args.steps} steps, ms/step medians "
          f"(against {BASELINE}):")
    for (variant, value), ms in median.items():
        against = "" if variant == BASELINE else f"  {(ms / base - 1) * 100:+6.2f}%"
        wins = ""
        if variant != BASELINE and value != args.values[0]:
            won = sum(a < b for a, b in zip(times[(variant, value)], times[(variant, args.values[0])]))
            wins = f"  faster than {args.values[0]} in {won} of {args.rounds} rounds"
        print(f"  {variant:22s} {value:8s} {ms:9.2f}{against}{wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
