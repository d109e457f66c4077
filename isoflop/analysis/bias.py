"""How far each method lands from a known truth, on grids centred on the optimum and off it.

Sweeps are simulated from a loss surface (synthetic.py) with multiplicative noise, on a grid of
sizes centred on the compute-optimal size (grid_centre 1) or on a multiple of it (the usual mistake:
a guessed optimum that is off by a factor), then fitted by every method without a bootstrap. The
table gives, per method and grid, the mean relative error of each estimate over the simulations
(bias) and its spread (sd). docs/analysis.md holds the table for the default settings
(`python benchmarks/analysis.py --bias` regenerates it).

Estimates: aN, the exponent of N_opt(C) (truth b/(a+b)); N_opt at the middle budget; and the
exponent of the compute-optimal loss L*(C) (truth gamma = a b / (a + b)) where the method has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from isoflop.analysis.approach2 import budget_minima
from isoflop.analysis.approach3 import fit_surface
from isoflop.analysis.blas import single_blas_thread
from isoflop.analysis.bootstrap import ArchGrid
from isoflop.analysis.fits import fit_power_law, frontier_points, weighted_line
from isoflop.analysis.synthetic import LossSurface, simulate_runs
from isoflop.analysis.table import usable_runs, validate_runs

BIAS_COLUMNS = ("method", "grid", "estimate", "truth", "bias", "sd", "n_ok")
GRIDS = {"centred": 1.0, "off-centre (x3)": 3.0}


def _estimates(runs: pd.DataFrame, budgets: Sequence[float]) -> dict[str, dict[str, float]]:
    """Point estimates of every method on one simulated sweep: method -> estimate -> value."""
    grid = ArchGrid.of(runs, runs["arch"].iloc[0])
    C_mid = float(np.sqrt(budgets[0] * budgets[-1]))
    out: dict[str, dict[str, float]] = {}
    for interpolation in ("quadratic", "akima"):
        minima = budget_minima(grid, interpolation)
        kept = minima[minima["rejected"] == ""]
        if len(kept) < 2:
            continue
        log_C = np.log(kept["C"].to_numpy(float))[None]
        u, aN = weighted_line(log_C, np.log(kept["N_opt"].to_numpy(float))[None])
        law = fit_power_law(kept["C"].to_numpy(float), kept["L_opt"].to_numpy(float))
        out[f"approach2-{interpolation}"] = {
            "aN": float(aN[0]), "N_opt(C_mid)": float(np.exp(u[0]) * C_mid ** aN[0]),
            "gamma": law.alpha,
        }
    N, D, L = (runs[c].to_numpy(float) for c in ("params_non_embedding", "tokens", "final_val_loss"))
    for variant in ("lbfgs", "varpro"):
        fit = fit_surface(N, D, L, method=variant, warn=False)
        out[f"approach3-{variant}"] = {
            "aN": fit.params_exponent, "N_opt(C_mid)": float(fit.optimal_params(C_mid)),
            "gamma": fit.compute_law().alpha,
        }
    points = frontier_points(runs)
    out["frontier"] = {"gamma": fit_power_law(points["C"].to_numpy(), points["L"].to_numpy()).alpha}
    return out


@single_blas_thread()
def bias_table(
    surface: LossSurface | None = None,
    budgets: Sequence[float] = tuple(np.logspace(17, 20, 7)),
    grids: dict[str, float] = GRIDS,
    sizes_per_budget: int = 7,
    size_step: float = 1.6,
    noise: float = 0.005,
    n_sims: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """BIAS_COLUMNS, one row per (method, grid, estimate); bias and sd are relative (0.01 = 1%).
    surface None: Chinchilla's (LossSurface's defaults)."""
    surface = surface or LossSurface()
    truth = {
        "aN": surface.b / (surface.a + surface.b),
        "N_opt(C_mid)": float(surface.optimal_params(np.sqrt(budgets[0] * budgets[-1]))),
        "gamma": surface.a * surface.b / (surface.a + surface.b),
    }
    rows = []
    for grid_name, centre in grids.items():
        collected: dict[tuple[str, str], list[float]] = {}
        for sim in range(n_sims):
            runs = simulate_runs(budgets, {"model": 1.0}, "model", surface, sizes_per_budget,
                                 size_step, noise, seed=seed + sim, grid_centre=centre)
            for method, values in _estimates(usable_runs(validate_runs(runs)), budgets).items():
                for name, value in values.items():
                    collected.setdefault((method, name), []).append(value / truth[name] - 1)
        for (method, name), errors in sorted(collected.items()):
            errors = np.array(errors)
            rows.append((method, grid_name, name, truth[name], float(errors.mean()),
                         float(errors.std(ddof=1)) if len(errors) > 1 else float("nan"), len(errors)))
    return pd.DataFrame(rows, columns=list(BIAS_COLUMNS))
