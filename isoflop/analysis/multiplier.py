"""Compute multipliers: M(C) = C_baseline(L_arch(C)) / C.

The compute the baseline needs to reach the loss an architecture reaches with C, over C. M = 1.5
reads "the architecture gets the baseline's loss with 1.5x less compute". M is inf where the
architecture's predicted loss lies at or below the baseline's irreducible loss E (the baseline
never gets there).

A multiplier is interpolated only where both laws are used inside the compute range they were
fitted on: the architecture's at C, the baseline's at M*C. Anything else is flagged extrapolated.

p_gt_1 is the share of paired bootstrap replicates with M > 1: the bootstrap probability that the
architecture is better than the baseline at that budget.

The wall-clock multiplier asks the same question in seconds: the time the baseline needs to reach
the loss the architecture reaches with compute C, over the time the architecture needs for C. Time
is compute times measured seconds per FLOP (tokens / (tokens_per_s * flops) of each run: training
throughput, evals excluded), and seconds per FLOP is a line in log-log against compute through the
architecture's frontier runs (small models use a GPU less well, so it drifts with scale); a constant
when the frontier has one distinct compute. Its band carries the compute multiplier's replicates
with the throughput taken as known. Measured throughput has its own spread (small models' steps are
bound by host time, which drifts), so where each throughput was measured several times the table
also gives the lowest and highest wall-clock M over pairings of those measurements
(throughput_range; the report pairs them round by round, or else at the extremes): the bounds the
band leaves out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from isoflop.analysis.bootstrap import PowerLawSamples
from isoflop.analysis.fits import PowerLawFit, frontier_rows, weighted_line

INTERVAL = 0.90
MULTIPLIER_COLUMNS = (
    "arch", "budget", "multiplier", "lo", "hi", "p_gt_1", "extrapolated", "loss_arch",
    "loss_baseline_at_C",
)
WALLCLOCK_COLUMNS = ("wall_multiplier", "wall_lo", "wall_hi")
THROUGHPUT_RANGE_COLUMNS = ("wall_tp_lo", "wall_tp_hi")


def multiplier_replicates(
    arch_fit: PowerLawFit,
    baseline_fit: PowerLawFit,
    arch_samples: PowerLawSamples,
    baseline_samples: PowerLawSamples,
    C: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """M(C) from the fits [len(C)] and from each pair of replicates [n_boot, len(C)] (replicate b
    of the architecture with replicate b of the baseline: they come from the same draws)."""
    C = np.asarray(C, dtype=float)
    M = baseline_fit.inverse(arch_fit.predict(C)) / C
    return M, baseline_samples.inverse(arch_samples.predict(C)) / C[None, :]


def band_of(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, share above 1) of each column of [n_boot, k] over its non-NaN replicates.

    Percentiles use the inverted-CDF rule (no interpolation between replicates) so that an inf
    replicate never turns a bound into inf - inf = NaN."""
    tail = (1 - INTERVAL) / 2
    k = replicates.shape[1]
    lo, hi, above = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan)
    for j in range(k):
        column = replicates[~np.isnan(replicates[:, j]), j]
        if len(column):
            lo[j], hi[j] = np.quantile(column, [tail, 1 - tail], method="inverted_cdf")
            above[j] = np.mean(column > 1)
    return lo, hi, above


def multiplier_band(
    arch_fit: PowerLawFit,
    baseline_fit: PowerLawFit,
    arch_samples: PowerLawSamples,
    baseline_samples: PowerLawSamples,
    C: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M(C) from the fits and its INTERVAL band from the paired replicates: (M, lo, hi)."""
    M, replicates = multiplier_replicates(arch_fit, baseline_fit, arch_samples, baseline_samples, C)
    lo, hi, _ = band_of(replicates)
    return M, lo, hi


def seconds_per_flop(runs: pd.DataFrame, arch: str) -> tuple[float, float] | None:
    """(u, v) of log(seconds per FLOP) = u + v log C through the frontier runs of `arch` with a
    measured throughput; v = 0 with one distinct compute; None without any measurement."""
    group = runs[runs["arch"] == arch]
    points = frontier_rows(group[np.isfinite(group["tokens_per_s"]) & (group["tokens_per_s"] > 0)])
    if points.empty:
        return None
    C = points["flops"].to_numpy(float)
    log_C = np.log(C)
    log_s = np.log(points["tokens"].to_numpy(float) / (points["tokens_per_s"].to_numpy(float) * C))
    if len(np.unique(log_C)) < 2:
        return float(log_s.mean()), 0.0
    u, v = weighted_line(log_C[None], log_s[None])
    return float(u[0]), float(v[0])


def wall_time(law: tuple[float, float], C: np.ndarray) -> np.ndarray:
    """Seconds to spend compute C at the measured throughput `law` (from seconds_per_flop)."""
    u, v = law
    C = np.asarray(C, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        return C * np.exp(u + v * np.log(C))


def wall_ratio(base_speed: tuple[float, float], speed: tuple[float, float], M: np.ndarray,
               C: np.ndarray) -> np.ndarray:
    """Wall-clock M: the baseline's seconds for compute M*C over the architecture's for C."""
    return wall_time(base_speed, np.asarray(M) * C) / wall_time(speed, C)


def throughput_range(
    multipliers: pd.DataFrame, timings: list[tuple[pd.DataFrame, pd.DataFrame]], baseline: str
) -> pd.DataFrame:
    """`multipliers` with THROUGHPUT_RANGE_COLUMNS: the lowest and highest wall-clock M at the point
    estimate M over `timings`, each a pair (runs timed for the architecture, runs timed for the
    baseline) with tokens_per_s from one measurement of each (see analysis/throughput.py); NaN
    where any of them leaves an architecture unmeasured."""
    out = multipliers.copy()
    bounds = np.full((len(out), 2), np.nan)
    for arch, rows in out.groupby("arch", sort=False):
        speeds = [(seconds_per_flop(base_runs, baseline), seconds_per_flop(arch_runs, arch))
                  for arch_runs, base_runs in timings]
        if any(None in pair for pair in speeds):
            continue
        M, C = rows["multiplier"].to_numpy(float), rows["budget"].to_numpy(float)
        ratios = np.array([wall_ratio(base, speed, M, C) for base, speed in speeds])
        where = out.index.get_indexer(rows.index)
        bounds[where, 0], bounds[where, 1] = ratios.min(axis=0), ratios.max(axis=0)
    out[list(THROUGHPUT_RANGE_COLUMNS)] = bounds
    return out


def grid_budgets(runs: pd.DataFrame, arch: str) -> np.ndarray:
    """Where to report M for `arch`: the nominal budgets of an isoflop grid, or for a pure ladder
    the compute of the architecture's own ladder runs."""
    budgets = runs["budget"].to_numpy(float)
    budgets = budgets[np.isfinite(budgets)]
    if len(budgets):
        return np.unique(budgets)
    return np.unique(runs.loc[runs["arch"] == arch, "flops"].to_numpy(float))


def multiplier_table(
    runs: pd.DataFrame,
    fits: dict[str, PowerLawFit],
    samples: dict[str, PowerLawSamples],
    baseline: str,
    at: list[float] | None = None,
    wallclock: bool = False,
) -> pd.DataFrame:
    """One row per (non-baseline arch, budget): the grid budgets plus the named budgets `at`.

    Columns: MULTIPLIER_COLUMNS, then WALLCLOCK_COLUMNS when `wallclock` (NaN for an architecture
    without measured throughput). loss_baseline_at_C is the baseline's predicted loss at the same C.
    """
    if baseline not in fits:
        raise ValueError(f"the baseline {baseline!r} has no fit; fitted: {', '.join(fits) or 'none'}")
    named = np.asarray(at if at is not None else [], dtype=float)
    if np.any(~np.isfinite(named) | (named <= 0)):
        raise ValueError(f"named budgets must be positive FLOP counts; got {list(named)}")
    base_fit, base_samples = fits[baseline], samples[baseline]
    base_speed = seconds_per_flop(runs, baseline) if wallclock else None
    columns = list(MULTIPLIER_COLUMNS) + (list(WALLCLOCK_COLUMNS) if wallclock else [])
    rows = []
    for arch in sorted(a for a in fits if a != baseline):
        fit = fits[arch]
        C = np.unique(np.concatenate([grid_budgets(runs, arch), named]))
        M, replicates = multiplier_replicates(fit, base_fit, samples[arch], base_samples, C)
        lo, hi, above = band_of(replicates)
        inside = fit.covers(C) & base_fit.covers(M * C)
        loss_arch, loss_base = fit.predict(C), base_fit.predict(C)
        wall = np.full((3, len(C)), np.nan)
        speed = seconds_per_flop(runs, arch) if wallclock else None
        if speed is not None and base_speed is not None:
            ratio = wall_ratio(base_speed, speed, M, C)
            replicate_ratio = wall_ratio(base_speed, speed, replicates, C)
            wall = np.vstack([ratio, *band_of(replicate_ratio)[:2]])
        for j, budget in enumerate(C):
            row = [arch, budget, M[j], lo[j], hi[j], above[j], not inside[j], loss_arch[j],
                   loss_base[j]]
            rows.append(row + (list(wall[:, j]) if wallclock else []))
    return pd.DataFrame(rows, columns=columns)
