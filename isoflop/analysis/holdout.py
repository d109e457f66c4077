"""Does the law predict? The largest budget held out of the fits.

A multiplier read past the grid's budgets is an extrapolation of the fitted laws, and the bootstrap
bands carry only the noise of the runs, not the choice of law (E fixed to 0 with fewer than four
budgets; a pure power law where the curve may bend). This check measures that: it fits every
architecture by the report's method on every budget but the largest, predicts the compute-optimal
loss at the largest (with the paired bootstrap's band), and sets it beside what the runs reached
there: the lowest-loss cell of that budget (its seeds' mean), i.e. the frontier point the full fit
uses. It also gives the multiplier the held-out laws predict there, beside the one of the fit on
every budget. A prediction outside its band says the bands of the report's extrapolated multipliers
understate their error by as much.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from isoflop.analysis.fits import frontier_rows, grid_edges
from isoflop.analysis.methods import MethodResult, fit_method
from isoflop.analysis.multiplier import band_of, multiplier_table

MIN_BUDGETS = 3  # the held-out fit keeps at least two budgets
HOLDOUT_COLUMNS = (
    "arch", "predicted", "lo", "hi", "observed", "observed_size", "observed_at_edge", "error",
    "inside", "multiplier", "m_lo", "m_hi",
)


@dataclass(frozen=True)
class Holdout:
    """The largest budget's check: `table` one row per architecture (HOLDOUT_COLUMNS; the
    multiplier columns NaN for the baseline), `result` the fits made without that budget."""

    budget: float
    fitted_budgets: tuple[float, ...]
    table: pd.DataFrame
    result: MethodResult


def isoflop_budgets(usable: pd.DataFrame) -> np.ndarray:
    budgets = usable["budget"].to_numpy(float)
    return np.unique(budgets[np.isfinite(budgets)])


def holdout_check(
    usable: pd.DataFrame, method: str, baseline: str, n_boot: int = 1000, seed: int = 0
) -> Holdout | None:
    """The check on a table of usable cells (seeds averaged), or None when it has fewer than
    MIN_BUDGETS isoflop budgets or the baseline cannot be fitted without the largest."""
    budgets = isoflop_budgets(usable)
    if len(budgets) < MIN_BUDGETS:
        return None
    held = float(budgets[-1])
    fitted = usable[usable["budget"].to_numpy(float) < held]
    result = fit_method(fitted, method, n_boot=n_boot, seed=seed)
    if baseline not in result.archs:
        return None
    multipliers = multiplier_table(fitted, result.fits, result.samples, baseline, at=[held])
    multipliers = multipliers[multipliers["budget"] == held].set_index("arch")
    at_held = usable[usable["budget"].to_numpy(float) == held]
    edges = grid_edges(at_held).set_index("arch")
    rows = []
    for arch in sorted(result.archs):
        runs = at_held[at_held["arch"] == arch]
        if runs.empty:
            continue
        arch_result = result.archs[arch]
        predicted = float(arch_result.law.predict(held))
        lo, hi, _ = (float(v[0]) for v in band_of(arch_result.samples.predict(np.array([held]))))
        best = frontier_rows(runs).iloc[0]
        observed = float(best["final_val_loss"])
        m = multipliers.loc[arch] if arch in multipliers.index else None
        rows.append([
            arch, predicted, lo, hi, observed, best["size"], arch in edges.index,
            predicted / observed - 1, lo <= observed <= hi,
            *((m["multiplier"], m["lo"], m["hi"]) if m is not None else (np.nan,) * 3),
        ])
    table = pd.DataFrame(rows, columns=list(HOLDOUT_COLUMNS))
    return Holdout(held, tuple(float(b) for b in budgets[:-1]), table, result)
