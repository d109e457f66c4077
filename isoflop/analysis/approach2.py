"""Chinchilla Approach 2: the minimum of each IsoFLOP curve, then power laws through the minima.

Per budget, final loss is interpolated against log N (N = non-embedding parameters) by

- 'quadratic': a parabola fitted robustly (iteratively reweighted least squares with Huber weights,
  k = 1.345 robust standard deviations, the scale from the median absolute residual), so one bad run
  does not move the vertex much; or
- 'akima': Akima's piecewise-cubic interpolant through the runs (no global shape imposed), its
  minimum found on a fine grid of log N.

A minimum is kept only when the grid brackets it: the curve must be convex with its lowest point
strictly inside the sizes that were run, and the lowest-loss run must not be the smallest or largest
size. Otherwise the budget is rejected, with the reason, because a minimum at (or beyond) the edge of
the grid is an extrapolation, and it biases N_opt towards that edge.

Through the kept minima: N_opt(C) = kN C^aN and D_opt(C) = kD C^aD (least squares in log-log; the
tokens at the minimum come from a line through log D vs log N of that budget's runs, which holds
whatever the FLOPs-per-token of each size) and L_opt(C) = E + A C^-alpha (fits.fit_power_law, with E
from 4 kept budgets on). C of a budget is the geometric mean of the compute its runs spent.

Bootstrap replicates come from the paired draws (bootstrap.py); the quadratic is refitted to all of
them at once, Akima one replicate and budget at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.interpolate import Akima1DInterpolator

from isoflop.analysis.allocation import AllocationLaw
from isoflop.analysis.bootstrap import (
    SIZE_COLUMN,
    ArchGrid,
    PairedDraws,
    PowerLawSamples,
    drawn_cells,
    replicate_losses,
    refit,
)
from isoflop.analysis.fits import PowerLawFit, fit_power_law, weighted_line

INTERPOLATIONS: tuple[str, ...] = ("quadratic", "akima")
MIN_SIZES = 3  # distinct sizes a budget needs for a minimum
HUBER_K = 1.345
ROBUST_ITERATIONS = 10
AKIMA_GRID = 512
MINIMA_COLUMNS = ("budget", "C", "n_sizes", "N_opt", "D_opt", "L_opt", "rejected")


def robust_quadratic(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coefficients (c0, c1, c2) of y = c0 + c1 x + c2 x^2 for each row of [M, S], by IRLS with
    Huber weights. weights: multiplicities (0 leaves a slot out; its x and y may be anything)."""
    x, y = np.where(weights > 0, x, 0.0), np.where(weights > 0, y, 0.0)
    design = np.stack([np.ones_like(x), x, x * x], axis=-1)  # [M, S, 3]
    robust = np.ones_like(x)
    scale_floor = 1e-6 * np.maximum(np.abs(y).max(axis=1, keepdims=True), 1e-12)
    coef = np.zeros(x.shape[:-1] + (3,))
    for _ in range(ROBUST_ITERATIONS):
        w = weights * robust
        normal = np.einsum("msi,ms,msj->mij", design, w, design)
        rhs = np.einsum("msi,ms->mi", design, w * y)
        with np.errstate(invalid="ignore"):
            coef = np.linalg.solve(normal + 1e-12 * np.eye(3), rhs[..., None])[..., 0]
        residual = np.abs(y - np.einsum("msi,mi->ms", design, coef))
        masked = np.where(weights > 0, residual, np.nan)
        with np.errstate(all="ignore"):
            scale = np.maximum(1.4826 * np.nanmedian(masked, axis=1, keepdims=True), scale_floor)
        limit = HUBER_K * scale
        robust = np.where(residual <= limit, 1.0, limit / np.maximum(residual, 1e-300))
    return coef


def _edge_reason(vertex: float, x_lo: float, x_hi: float, best_x: float, convex: bool) -> str:
    if not convex:
        return "no minimum: loss is not convex in log N over the sizes run"
    if best_x <= x_lo:
        return "lowest loss at the smallest size: the grid does not bracket the optimum"
    if best_x >= x_hi:
        return "lowest loss at the largest size: the grid does not bracket the optimum"
    if not x_lo < vertex < x_hi:
        return "interpolated minimum at the edge of the sizes run"
    return ""


def _akima_minimum(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(x at the minimum, loss there) of the interpolant over [x[0], x[-1]] (sorted distinct x);
    at an end of that range when the interpolant has no interior minimum."""
    grid = np.linspace(x[0], x[-1], AKIMA_GRID)
    values = Akima1DInterpolator(x, y)(grid)
    i = int(np.argmin(values))
    return float(grid[i]), float(values[i])


def _distinct(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct x (sorted) with the weighted mean y of their repeats."""
    keep = w > 0
    xs, inverse = np.unique(x[keep], return_inverse=True)
    totals = np.bincount(inverse, weights=w[keep])
    return xs, np.bincount(inverse, weights=(w * y)[keep]) / totals


def cell_minimum(
    x: np.ndarray, L: np.ndarray, log_D: np.ndarray, weights: np.ndarray, interpolation: str
) -> tuple[float, float, float, str]:
    """(log N_opt, L_opt, log D_opt, rejection reason or '') of one budget's runs (x = log N)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; allowed: {', '.join(INTERPOLATIONS)}")
    xs, ys = _distinct(x, L, weights)
    if len(xs) < MIN_SIZES:
        return np.nan, np.nan, np.nan, f"{len(xs)} distinct size(s); a minimum needs >= {MIN_SIZES}"
    if interpolation == "quadratic":
        c0, c1, c2 = robust_quadratic(x[None], L[None], weights[None])[0]
        convex = c2 > 0
        vertex = -c1 / (2 * c2) if convex else np.nan
        loss = c0 + c1 * vertex + c2 * vertex**2
    else:  # no global shape: only where its minimum falls counts
        (vertex, loss), convex = _akima_minimum(xs, ys), True
    reason = _edge_reason(vertex, xs[0], xs[-1], xs[int(np.argmin(ys))], convex)
    intercept, slope = weighted_line(x[None], log_D[None], weights[None])
    log_D_opt = float(intercept[0] + slope[0] * vertex)
    if reason:
        return np.nan, np.nan, np.nan, reason
    return float(vertex), float(loss), log_D_opt, ""


def budget_minima(grid: ArchGrid, interpolation: str = "quadratic") -> pd.DataFrame:
    """One row per budget of `grid`: MINIMA_COLUMNS (N_opt, D_opt, L_opt NaN where rejected)."""
    runs = grid.runs
    x, L = np.log(runs[SIZE_COLUMN].to_numpy(float)), runs["final_val_loss"].to_numpy(float)
    log_D, log_C = np.log(runs["tokens"].to_numpy(float)), np.log(runs["flops"].to_numpy(float))
    rows = []
    for cell, budget in zip(grid.cells, grid.budgets):
        ones = np.ones(len(cell))
        vertex, loss, log_D_opt, reason = cell_minimum(x[cell], L[cell], log_D[cell], ones,
                                                       interpolation)
        rows.append((budget, float(np.exp(log_C[cell].mean())), len(np.unique(x[cell])),
                     float(np.exp(vertex)), float(np.exp(log_D_opt)), loss, reason))
    return pd.DataFrame(rows, columns=list(MINIMA_COLUMNS))


@dataclass(frozen=True)
class Approach2Fit:
    """One architecture's Approach 2: the per-budget minima, the allocation laws through them
    (with replicates) and the law L_opt(C) (with replicates)."""

    interpolation: str
    minima: pd.DataFrame
    allocation: AllocationLaw
    loss_law: PowerLawFit
    loss_samples: PowerLawSamples

    @property
    def rejected(self) -> pd.DataFrame:
        return self.minima[self.minima["rejected"] != ""]

    def to_dict(self) -> dict[str, object]:
        minima = self.minima.replace({np.nan: None}).to_dict(orient="records")
        return {
            "interpolation": self.interpolation,
            "allocation": self.allocation.to_dict(),
            "loss_law": {**self.loss_law.to_dict(), "bootstrap": self.loss_samples.percentiles(),
                         "n_boot_valid": self.loss_samples.n_valid},
            "minima": minima,
        }


def _allocation_params(log_C: np.ndarray, log_N: np.ndarray, log_D: np.ndarray,
                       weights: np.ndarray) -> np.ndarray:
    """(kN, aN, kD, aD) [B, 4] from log-log lines through each row's weighted minima."""
    uN, aN = weighted_line(log_C, log_N, weights)
    uD, aD = weighted_line(log_C, log_D, weights)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.stack([np.exp(uN), aN, np.exp(uD), aD], axis=1)


def fit_approach2(
    grid: ArchGrid, draws: PairedDraws, interpolation: str = "quadratic"
) -> Approach2Fit:
    """Approach 2 for one architecture, with its paired-bootstrap replicates.

    Raises ValueError when fewer than 2 budgets keep a minimum."""
    minima = budget_minima(grid, interpolation)
    kept = minima[minima["rejected"] == ""]
    if len(kept) < 2:
        rejected = minima[minima["rejected"] != ""]  # the kept budgets have no reason to give
        reasons = "; ".join(f"{b:.3g}: {r}" for b, r in zip(rejected["budget"], rejected["rejected"]))
        raise ValueError(f"{len(kept)} budget(s) with a bracketed minimum; Approach 2 needs >= 2"
                         + (f" (rejected: {reasons})" if reasons else ""))
    log_C = np.log(kept["C"].to_numpy(float))[None]
    full = _allocation_params(log_C, np.log(kept["N_opt"].to_numpy(float))[None],
                              np.log(kept["D_opt"].to_numpy(float))[None], np.ones_like(log_C))[0]
    loss_law = fit_power_law(kept["C"].to_numpy(float), kept["L_opt"].to_numpy(float))
    C, log_N, log_D, L = _replicate_minima(grid, draws, interpolation)
    valid = np.isfinite(log_N).astype(float)
    samples = _allocation_params(np.log(C), log_N, log_D, valid)
    allocation = AllocationLaw(*(float(v) for v in full), samples=samples)
    return Approach2Fit(interpolation, minima, allocation, loss_law, refit(C, L, loss_law, valid))


def _replicate_minima(
    grid: ArchGrid, draws: PairedDraws, interpolation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(C, log N_opt, log D_opt, L_opt), each [B, K]: the minimum of every drawn budget of every
    replicate, NaN where that budget's draw has no bracketed minimum."""
    runs = grid.runs
    x_all, log_D_all = np.log(runs[SIZE_COLUMN].to_numpy(float)), np.log(runs["tokens"].to_numpy(float))
    cell_C = np.array([np.exp(np.log(runs["flops"].to_numpy(float)[c]).mean()) for c in grid.cells])
    cell, rows = drawn_cells(grid, draws)
    B, K, S = rows.shape
    w = (rows >= 0).astype(float)
    safe = np.maximum(rows, 0)
    x, log_D = x_all[safe], log_D_all[safe]
    L = replicate_losses(grid, draws)[np.arange(B)[:, None, None], safe]  # seeds redrawn, if any
    if interpolation == "akima":
        out = [cell_minimum(x[b, k], L[b, k], log_D[b, k], w[b, k], "akima")
               for b in range(B) for k in range(K)]
        vertex, loss, log_D_opt = (np.array([o[i] for o in out]).reshape(B, K) for i in range(3))
        return cell_C[cell], vertex, log_D_opt, loss
    xf, Lf, wf, Df = (a.reshape(B * K, S) for a in (x, L, w, log_D))
    c0, c1, c2 = robust_quadratic(xf, Lf, wf).T
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = -c1 / (2 * c2)
    loss = c0 + c1 * vertex + c2 * vertex**2
    x_lo = np.where(wf > 0, xf, np.inf).min(axis=1)
    x_hi = np.where(wf > 0, xf, -np.inf).max(axis=1)
    best = np.argmin(np.where(wf > 0, Lf, np.inf), axis=1)
    best_x = np.take_along_axis(xf, best[:, None], axis=1)[:, 0]
    ok = (c2 > 0) & (vertex > x_lo) & (vertex < x_hi) & (best_x > x_lo) & (best_x < x_hi)
    ok &= _distinct_count(rows.reshape(B * K, S)) >= MIN_SIZES
    intercept, slope = weighted_line(xf, Df, wf)
    log_D_opt = intercept + slope * vertex

    def kept(values: np.ndarray) -> np.ndarray:
        return np.where(ok, values, np.nan).reshape(B, K)

    return cell_C[cell], kept(vertex), kept(log_D_opt), kept(loss)


def _distinct_count(rows: np.ndarray) -> np.ndarray:
    """Distinct non-negative entries of each row of [M, S] (-1 is padding)."""
    r = np.sort(rows, axis=1)
    changes = (r[:, 1:] != r[:, :-1]) & (r[:, 1:] >= 0)
    return changes.sum(axis=1) + (r[:, 0] >= 0)
