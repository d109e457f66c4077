"""Time the analysis: an Approach-3 fit plus 1000 paired bootstrap resamples on a 200-point table.

    python benchmarks/analysis.py [--n-boot 1000] [--repeat 3] [--bias [--n-sims 20]]

The table is synthetic (isoflop.analysis.synthetic): two architectures (a baseline and one with a
compute factor of 1.3) x 10 budgets x 10 sizes = 200 runs, 0.5% log-normal noise on the losses.
Timed: fit_method(..., 'approach3', n_boot) (the surface of each architecture from the grid of
starts, then every replicate refitted at once from the paired draws, budgets and sizes redrawn) and
the multiplier table with its bands. The issue's target: at most 30 s on 2 CPU cores.

--bias prints the bias table of docs/analysis.md (each method on centred and off-centre grids).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from isoflop.analysis.bias import bias_table
from isoflop.analysis.methods import fit_method
from isoflop.analysis.multiplier import multiplier_table
from isoflop.analysis.synthetic import simulate_runs
from isoflop.analysis.table import usable_runs, validate_runs

FACTORS = {"baseline": 1.0, "variant": 1.3}


def table() -> pd.DataFrame:
    runs = simulate_runs(list(np.logspace(17, 20, 10)), FACTORS, "baseline", sizes_per_budget=10,
                         size_step=1.35, noise=0.005, seed=0)
    return usable_runs(validate_runs(runs))


def time_fit(n_boot: int) -> tuple[float, object]:
    runs = table()
    start = time.perf_counter()
    result = fit_method(runs, "approach3", n_boot=n_boot, seed=0)
    multipliers = multiplier_table(runs, result.fits, result.samples, "baseline", at=[1e21])
    return time.perf_counter() - start, (runs, result, multipliers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--bias", action="store_true", help="also print the bias table")
    parser.add_argument("--n-sims", type=int, default=20, help="simulations per bias-table cell")
    args = parser.parse_args()

    times = []
    for _ in range(args.repeat):
        seconds, (runs, result, multipliers) = time_fit(args.n_boot)
        times.append(seconds)
    print(f"Approach 3 + {args.n_boot} paired bootstrap resamples, {len(runs)} runs "
          f"({len(FACTORS)} architectures): best {min(times):.2f} s, all "
          f"{', '.join(f'{t:.2f}' for t in times)} s (target <= 30 s on 2 cores)")
    for arch, r in result.archs.items():
        s = r.detail
        print(f"  {arch}: E={s.E:.3f} alpha={s.alpha:.3f} beta={s.beta:.3f} "
              f"valid replicates {r.samples.n_valid}/{args.n_boot}")
    middle = multipliers.iloc[len(multipliers) // 2]
    print(f"  M at {middle['budget']:.3g} FLOPs: {middle['multiplier']:.3f} "
          f"[{middle['lo']:.3f}, {middle['hi']:.3f}] (truth {FACTORS['variant']})")

    if args.bias:
        start = time.perf_counter()
        bias = bias_table(n_sims=args.n_sims)
        print(f"\nbias table ({args.n_sims} simulations per cell, {time.perf_counter() - start:.0f} s)")
        print("| method | grid | estimate | truth | bias | sd | fits |")
        print("|---|---|---|---|---|---|---|")
        for row in bias.itertuples():
            print(f"| {row.method} | {row.grid} | {row.estimate} | {row.truth:.4g} | "
                  f"{row.bias:+.1%} | {row.sd:.1%} | {row.n_ok} |")


if __name__ == "__main__":
    main()
