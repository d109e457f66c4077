"""A paired bootstrap over runs: how much the fits (and so the multipliers) move when runs are redrawn.

Each architecture's usable runs are laid out as a grid: one cell per budget (its runs ordered by
size), plus its ladder runs (budget NaN), which are points of their own. A replicate draws, with
replacement,

- budgets (when resample_budgets is true; otherwise every budget is kept once), and
- within each drawn budget, as many sizes as the cell holds,
- and ladder points, as many as there are,
- and, where a point is a cell trained with several seeds (analysis/seeds.py: the table holds
  their mean), as many of its seeds as it has, whose mean is the point's loss in that replicate,

from ONE set of uniform random numbers shared by every architecture: draw u picks position
floor(u * n) of whatever that architecture has there. When the architectures share a grid (the
usual sweep) the same replicate therefore drops and repeats the same budgets and the same size
slots for all of them, so what is common to them (an unlucky budget, a size slot where every
architecture does badly) cancels in their comparison, and a multiplier's band reflects what
differs between architectures rather than what is shared. Row order of the table does not matter:
cells are sorted by budget, then size, then run_id.

Resampling budgets (a cluster bootstrap) also captures how much the law depends on which budgets
were run. A 3-parameter law needs 4 distinct budgets, which a resample of 4 to 6 budgets often
lacks: such replicates are left out (NaN) and counted (n_valid). So budgets are resampled by
default only for Approach 3, which fits every run and has points to spare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from isoflop.analysis.fits import (
    MIN_POINTS_FOR_E,
    PowerLawFit,
    fit_with_E_batch,
    inverse_power_law,
    line_fit,
    power_law,
)
from isoflop.analysis.seeds import seed_losses

PERCENTILES = (5.0, 50.0, 95.0)  # the 90% interval and the median
SIZE_COLUMN = "params_non_embedding"


@dataclass(frozen=True)
class ArchGrid:
    """One architecture's usable runs for resampling. runs: its rows sorted by (budget, size,
    run_id), index 0..n-1; cells: row positions of each budget, budgets ascending; ladder: row
    positions of the runs without a budget."""

    runs: pd.DataFrame
    cells: tuple[np.ndarray, ...]
    ladder: np.ndarray
    seeds: tuple[np.ndarray, ...]  # each row's seeds' final losses (one value without repeats)

    @classmethod
    def of(cls, runs: pd.DataFrame, arch: str) -> ArchGrid:
        group = runs[runs["arch"] == arch].sort_values(["budget", SIZE_COLUMN, "run_id"])
        group = group.reset_index(drop=True)
        budget = group["budget"].to_numpy(float)
        finite = np.isfinite(budget)
        cells = tuple(np.flatnonzero(finite & (budget == b)) for b in np.unique(budget[finite]))
        return cls(group, cells, np.flatnonzero(~finite), tuple(seed_losses(group)))

    @property
    def max_seeds(self) -> int:
        return max((len(s) for s in self.seeds), default=1)

    @property
    def budgets(self) -> np.ndarray:
        return np.array([self.runs["budget"].iloc[cell[0]] for cell in self.cells])


@dataclass(frozen=True)
class PairedDraws:
    """The uniform numbers of n_boot replicates, shared by all architectures: budget_u [B, K],
    size_u [B, K, S], ladder_u [B, P], and seed_u [B, R, Q] where points repeat seeds, else None
    (K, S, P, R, Q the largest budget count, cell size, ladder length, row count and seed count
    over the architectures)."""

    budget_u: np.ndarray
    size_u: np.ndarray
    ladder_u: np.ndarray
    resample_budgets: bool
    seed_u: np.ndarray | None = None

    @property
    def n_boot(self) -> int:
        return self.budget_u.shape[0]


def paired_draws(
    grids: dict[str, ArchGrid], n_boot: int, seed: int, resample_budgets: bool
) -> PairedDraws:
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; allowed: >= 1")
    K = max((len(g.cells) for g in grids.values()), default=0)
    S = max((len(c) for g in grids.values() for c in g.cells), default=0)
    P = max((len(g.ladder) for g in grids.values()), default=0)
    rng = np.random.default_rng(seed)
    budget_u, size_u, ladder_u = rng.random((n_boot, K)), rng.random((n_boot, K, S)), rng.random((n_boot, P))
    # Drawn last, and only where seeds repeat, so that single-seed tables keep their replicates.
    Q = max((g.max_seeds for g in grids.values()), default=1)
    R = max((len(g.runs) for g in grids.values()), default=0)
    seed_u = rng.random((n_boot, R, Q)) if Q > 1 else None
    return PairedDraws(budget_u, size_u, ladder_u, resample_budgets, seed_u)


def _pick(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    return np.minimum((u * n).astype(int), np.asarray(n) - 1)


def drawn_cells(grid: ArchGrid, draws: PairedDraws) -> tuple[np.ndarray, np.ndarray]:
    """(cell index [B, K], row positions [B, K, S]) of each replicate's budget draws; a cell with
    fewer runs than S has its unused slots at -1."""
    K = len(grid.cells)
    B = draws.n_boot
    if K == 0:
        return np.zeros((B, 0), int), np.zeros((B, 0, 0), int)
    cell = _pick(draws.budget_u[:, :K], K) if draws.resample_budgets else np.tile(np.arange(K), (B, 1))
    sizes = np.array([len(c) for c in grid.cells])
    S = sizes.max()
    table = np.full((K, S), -1)
    for k, rows in enumerate(grid.cells):
        table[k, : len(rows)] = rows
    n = sizes[cell][:, :, None]  # [B, K, 1]
    slot = _pick(draws.size_u[:, :K, :S], n)
    rows = np.take_along_axis(table[cell], slot, axis=2)
    return cell, np.where(np.arange(S)[None, None, :] < n, rows, -1)


def drawn_ladder(grid: ArchGrid, draws: PairedDraws) -> np.ndarray:
    """Row positions [B, P] of each replicate's ladder draws."""
    P = len(grid.ladder)
    return grid.ladder[_pick(draws.ladder_u[:, :P], P)] if P else np.zeros((draws.n_boot, 0), int)


def replicate_losses(grid: ArchGrid, draws: PairedDraws) -> np.ndarray:
    """Each row's loss in each replicate [B, n_runs]: its final loss, or where the row is a cell of
    several seeds, the mean of as many of them drawn with replacement."""
    L = grid.runs["final_val_loss"].to_numpy(float)
    if draws.seed_u is None or grid.max_seeds == 1:
        return np.broadcast_to(L, (draws.n_boot, len(L)))
    out = np.empty((draws.n_boot, len(L)))
    for row, values in enumerate(grid.seeds):
        n = len(values)
        out[:, row] = values[_pick(draws.seed_u[:, row, :n], n)].mean(axis=1)
    return out


def replicate_weights(grid: ArchGrid, draws: PairedDraws) -> np.ndarray:
    """How often each run is drawn in each replicate [B, n_runs] (for fits that use every run)."""
    _, rows = drawn_cells(grid, draws)
    drawn = np.concatenate([rows.reshape(draws.n_boot, -1), drawn_ladder(grid, draws)], axis=1)
    n = len(grid.runs)
    weights = np.zeros((draws.n_boot, n + 1))  # the last column catches the -1 padding
    np.add.at(weights, (np.arange(draws.n_boot)[:, None], np.where(drawn < 0, n, drawn)), 1.0)
    return weights[:, :n]


def replicate_frontiers(grid: ArchGrid, draws: PairedDraws) -> tuple[np.ndarray, np.ndarray]:
    """Frontier points of each replicate: (C, L), each [B, K + P]: the lowest-loss drawn run of
    each drawn budget, then the drawn ladder points."""
    C_all = grid.runs["flops"].to_numpy(float)
    L_rep = replicate_losses(grid, draws)
    _, rows = drawn_cells(grid, draws)
    best = np.zeros(rows.shape[:2], int)
    B = np.arange(draws.n_boot)[:, None]
    if rows.size:
        losses = np.where(rows >= 0, L_rep[B[:, :, None], np.maximum(rows, 0)], np.inf)
        best = np.take_along_axis(rows, np.argmin(losses, axis=2)[:, :, None], axis=2)[:, :, 0]
    ladder = drawn_ladder(grid, draws)
    chosen = np.concatenate([best, ladder], axis=1)
    return C_all[chosen], L_rep[B, chosen]


@dataclass(frozen=True)
class PowerLawSamples:
    """Bootstrap replicates of one architecture's law: E, A, alpha, each [n_boot], NaN where a
    replicate could not be fitted."""

    E: np.ndarray
    A: np.ndarray
    alpha: np.ndarray

    @property
    def n_valid(self) -> int:
        return int(np.sum(np.isfinite(self.alpha)))

    def predict(self, C: np.ndarray) -> np.ndarray:
        """Loss of every replicate at every compute: [n_boot, len(C)]."""
        C = np.asarray(C, dtype=float)[None, :]
        return power_law(C, self.E[:, None], self.A[:, None], self.alpha[:, None])

    def inverse(self, L: np.ndarray) -> np.ndarray:
        """Compute at which each replicate reaches L [n_boot, k] (row b with replicate b)."""
        return inverse_power_law(L, self.E[:, None], self.A[:, None], self.alpha[:, None])

    def percentiles(self) -> dict[str, dict[str, float]]:
        """{'E': {'p5': .., 'p50': .., 'p95': ..}, 'A': .., 'alpha': ..} over valid replicates."""
        return {name: percentiles_of(getattr(self, name)) for name in ("E", "A", "alpha")}


def percentiles_of(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    return {f"p{q:g}": (float(np.percentile(values, q)) if len(values) else float("nan"))
            for q in PERCENTILES}


def refit(
    C: np.ndarray, L: np.ndarray, full: PowerLawFit, weights: np.ndarray | None = None
) -> PowerLawSamples:
    """Fit the full fit's law (with or without E) to every replicate [n_boot, n] at once.

    weights [n_boot, n]: 0 leaves a point out of its replicate (its C and L may then be NaN). A
    replicate with fewer distinct compute values than the law needs is NaN."""
    w = np.ones(C.shape) if weights is None else np.asarray(weights, dtype=float)
    C, L = np.where(w > 0, C, 1.0), np.where(w > 0, L, 1.0)
    log_ref = float(np.log(C)[w > 0].mean()) if (w > 0).any() else 0.0
    lx, y = np.log(C) - log_ref, np.log(L)
    sorted_C = np.sort(np.where(w > 0, C, np.nan), axis=1)
    distinct = np.sum(np.isfinite(sorted_C), axis=1) - np.sum(np.diff(sorted_C, axis=1) == 0, axis=1)
    valid = distinct >= (MIN_POINTS_FOR_E if full.with_E else 2)
    if full.with_E:
        start = np.array([full.E, np.log(full.A) - full.alpha * log_ref, full.alpha])
        E, u, alpha = fit_with_E_batch(lx, y, start, weights=w).T
    else:
        u, alpha = line_fit(lx, y, w)
        E = np.zeros_like(u)
    with np.errstate(over="ignore", invalid="ignore"):
        A = np.exp(u + alpha * log_ref)
    nan = np.full(len(C), np.nan)
    return PowerLawSamples(
        E=np.where(valid, E, nan), A=np.where(valid, A, nan), alpha=np.where(valid, alpha, nan)
    )


def arch_grids(runs: pd.DataFrame) -> dict[str, ArchGrid]:
    return {arch: ArchGrid.of(runs, arch) for arch in sorted(runs["arch"].unique())}


def bootstrap_fits(
    runs: pd.DataFrame,
    fits: dict[str, PowerLawFit],
    n_boot: int = 1000,
    seed: int = 0,
    resample_budgets: bool = False,
) -> dict[str, PowerLawSamples]:
    """Replicate frontier fits for every fitted architecture of a usable-runs table (paired)."""
    grids = arch_grids(runs)
    draws = paired_draws(grids, n_boot, seed, resample_budgets)
    return {arch: refit(*replicate_frontiers(grids[arch], draws), fits[arch]) for arch in fits}
