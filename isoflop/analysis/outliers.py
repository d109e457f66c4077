"""Runs that deserve a second look, each with the reason it was flagged.

- Left out of every fit: a state other than 'done', a non-finite final loss, no compute recorded.
- Far from the Approach-3 surface: a log-loss residual beyond ROBUST_SDS robust standard deviations
  (1.4826 x the median absolute residual of its architecture) and beyond MIN_RESIDUAL (so noiseless
  tables flag nothing).
- Against the grain of the frontier: the best run of a budget with a higher loss than the best run of
  a smaller budget (more compute should never hurt; something went wrong in one of them).

Flagging never removes a run: the fits decide what to do with it (the Huber loss of Approach 3 and
the robust parabola of Approach 2 already limit a bad run's pull).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from isoflop.analysis.approach3 import SurfaceFit
from isoflop.analysis.fits import frontier_rows
from isoflop.analysis.table import usable_runs

OUTLIER_COLUMNS = ("run_id", "arch", "size", "budget", "final_val_loss", "reason")
ROBUST_SDS = 4.0
MIN_RESIDUAL = 2e-3  # log-loss


def _row(run: pd.Series, reason: str) -> tuple:
    return (run["run_id"], run["arch"], run["size"], run["budget"], run["final_val_loss"], reason)


def unusable_reasons(runs: pd.DataFrame) -> list[tuple]:
    rows = []
    usable = set(usable_runs(runs)["run_id"])
    for _, run in runs[~runs["run_id"].isin(usable)].iterrows():
        if run["state"] != "done":
            reason = f"state {run['state']!r}: left out of every fit"
        elif not np.isfinite(run["final_val_loss"]):
            reason = "final_val_loss is not finite: left out of every fit"
        else:
            reason = "no compute recorded (flops): left out of every fit"
        rows.append(_row(run, reason))
    return rows


def surface_residual_reasons(usable: pd.DataFrame, surfaces: dict[str, SurfaceFit]) -> list[tuple]:
    rows = []
    for arch, fit in sorted(surfaces.items()):
        group = usable[usable["arch"] == arch]
        predicted = fit.predict(group["params_non_embedding"], group["tokens"])
        residual = np.log(group["final_val_loss"].to_numpy(float)) - np.log(predicted)
        scale = 1.4826 * np.median(np.abs(residual))
        for (_, run), r in zip(group.iterrows(), residual):
            if abs(r) > max(ROBUST_SDS * scale, MIN_RESIDUAL):
                side = "above" if r > 0 else "below"
                sds = f"{abs(r) / scale:.1f} robust SDs" if scale > 0 else "the rest fit exactly"
                rows.append(_row(run, f"log-loss residual {r:+.4f} vs the Approach-3 surface "
                                      f"({sds}, {side})"))
    return rows


def frontier_reversal_reasons(usable: pd.DataFrame) -> list[tuple]:
    rows = []
    for _, group in usable.groupby("arch", sort=True):
        best = frontier_rows(group[np.isfinite(group["budget"])]).sort_values("budget")
        lowest_so_far, at_budget = np.inf, np.nan
        for _, run in best.iterrows():
            if run["final_val_loss"] > lowest_so_far:
                rows.append(_row(run, f"best loss of budget {run['budget']:.3g} is above the best "
                                      f"loss of the smaller budget {at_budget:.3g}"))
            elif run["final_val_loss"] < lowest_so_far:
                lowest_so_far, at_budget = run["final_val_loss"], run["budget"]
    return rows


def flag_outliers(runs: pd.DataFrame, surfaces: dict[str, SurfaceFit]) -> pd.DataFrame:
    """Every flagged run of a validated table (all rows, not only usable ones): OUTLIER_COLUMNS.
    surfaces: Approach-3 fits by architecture (those without one skip the residual check)."""
    usable = usable_runs(runs)
    rows = (unusable_reasons(runs) + surface_residual_reasons(usable, surfaces)
            + frontier_reversal_reasons(usable))
    return pd.DataFrame(rows, columns=list(OUTLIER_COLUMNS))
