"""One interface over the three ways of getting a compute-optimal loss curve L*(C) per architecture.

- 'frontier': the lowest-loss run of each budget, L(C) = E + A C^-alpha through them (fits.py);
- 'approach2': per-budget interpolated minima, L_opt(C) through them (approach2.py);
- 'approach3': the surface L(N, D) fitted to every run, L*(C) in closed form (approach3.py).

Each gives every architecture a PowerLawFit for L*(C) with its paired-bootstrap replicates (the
same draws for all architectures: bootstrap.py), which is all the multiplier needs, plus, for
Approaches 2 and 3, the allocation N_opt(C), D_opt(C) with replicates. The compute of Approach 3 is
C = kappa N D with kappa the median of flops / (N D) over the architecture's runs: the table's
analytic FLOPs per parameter-token (6 in the 6ND convention, more for small models, where attention
and the LM head weigh more); kappa's spread is recorded so a reader sees how constant it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from isoflop.analysis.allocation import AllocationLaw
from isoflop.analysis.approach2 import Approach2Fit, fit_approach2
from isoflop.analysis.approach3 import (
    Centring,
    SurfaceFit,
    allocation_params,
    bound_message,
    compute_law_params,
    fit_surface,
    params_of,
    refit_batch,
    theta_of,
)
from isoflop.analysis.blas import single_blas_thread
from isoflop.analysis.bootstrap import (
    SIZE_COLUMN,
    ArchGrid,
    PairedDraws,
    PowerLawSamples,
    arch_grids,
    paired_draws,
    percentiles_of,
    refit,
    replicate_frontiers,
    replicate_weights,
)
from isoflop.analysis.fits import PowerLawFit, fit_power_law, frontier_points

METHODS: tuple[str, ...] = ("frontier", "approach2", "approach3")
# Resampling budgets leaves a 3-parameter law through 4-6 budgets undetermined in many replicates;
# Approach 3 fits every run and has points to spare (see bootstrap.py).
RESAMPLE_BUDGETS_BY_DEFAULT = {"frontier": False, "approach2": False, "approach3": True}
SURFACE_PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class ArchResult:
    """One architecture under one method: L*(C) and its replicates; the allocation (Approaches 2
    and 3); the method's own fit (Approach2Fit or SurfaceFit); exponent replicates by name."""

    law: PowerLawFit
    samples: PowerLawSamples
    allocation: AllocationLaw | None = None
    detail: Approach2Fit | SurfaceFit | None = None
    exponents: dict[str, tuple[float, np.ndarray]] = field(default_factory=dict)
    surface_samples: np.ndarray | None = None  # Approach 3: [n_boot, 5] (E, A, B, alpha, beta)

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            **self.law.to_dict(), "n_boot_valid": self.samples.n_valid,
            "bootstrap": self.samples.percentiles(),
        }
        if self.allocation is not None:
            d["allocation"] = self.allocation.to_dict()
        if isinstance(self.detail, SurfaceFit):
            d["surface"] = self.detail.to_dict()
            d["surface"]["bootstrap"] = {
                name: percentiles_of(self.surface_samples[:, i])
                for i, name in enumerate(SURFACE_PARAMS)
            }
        elif isinstance(self.detail, Approach2Fit):
            d["approach2"] = self.detail.to_dict()
        return d


@dataclass(frozen=True)
class MethodResult:
    """Every architecture under one method, from one set of paired draws."""

    method: str
    archs: dict[str, ArchResult]
    skipped: dict[str, str]  # arch -> why it has no fit
    warnings: tuple[str, ...]
    n_boot: int
    seed: int
    resample_budgets: bool

    @property
    def fits(self) -> dict[str, PowerLawFit]:
        return {arch: r.law for arch, r in self.archs.items()}

    @property
    def samples(self) -> dict[str, PowerLawSamples]:
        return {arch: r.samples for arch, r in self.archs.items()}


@single_blas_thread()
def fit_method(
    runs: pd.DataFrame,
    method: str = "frontier",
    n_boot: int = 1000,
    seed: int = 0,
    resample_budgets: bool | None = None,
    interpolation: str = "quadratic",
    surfaces: dict[str, SurfaceFit] | None = None,
) -> MethodResult:
    """Fit every architecture of a usable-runs table by `method`, with a paired bootstrap.

    resample_budgets None: the method's default (RESAMPLE_BUDGETS_BY_DEFAULT). interpolation:
    Approach 2's ('quadratic' or 'akima'). surfaces: Approach-3 point fits already made on the same
    runs (reused instead of refitted; the bootstrap is still run)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    if resample_budgets is None:
        resample_budgets = RESAMPLE_BUDGETS_BY_DEFAULT[method]
    grids = arch_grids(runs)
    draws = paired_draws(grids, n_boot, seed, resample_budgets)
    archs: dict[str, ArchResult] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []
    for arch, grid in grids.items():
        try:
            if method == "frontier":
                archs[arch] = _frontier(grid, draws)
            elif method == "approach2":
                archs[arch] = _approach2(grid, draws, interpolation)
            else:
                archs[arch] = _approach3(grid, draws, (surfaces or {}).get(arch))
        except ValueError as error:
            skipped[arch] = str(error)
            continue
        detail = archs[arch].detail
        if isinstance(detail, SurfaceFit) and detail.at_bounds:
            notes.append(f"{arch}: {bound_message(detail)}")
        if isinstance(detail, Approach2Fit):
            for budget, reason in zip(detail.rejected["budget"], detail.rejected["rejected"]):
                notes.append(f"{arch}: Approach 2 rejected budget {budget:.3g}: {reason}")
    return MethodResult(method, archs, skipped, tuple(notes), n_boot, seed, resample_budgets)


def _frontier(grid: ArchGrid, draws: PairedDraws) -> ArchResult:
    points = frontier_points(grid.runs)
    law = fit_power_law(points["C"].to_numpy(), points["L"].to_numpy())
    samples = refit(*replicate_frontiers(grid, draws), law)
    return ArchResult(law, samples, exponents={"alpha": (law.alpha, samples.alpha)})


def _approach2(grid: ArchGrid, draws: PairedDraws, interpolation: str) -> ArchResult:
    fit = fit_approach2(grid, draws, interpolation)
    exponents = {
        "alpha": (fit.loss_law.alpha, fit.loss_samples.alpha),
        "aN": (fit.allocation.aN, fit.allocation.samples[:, 1]),
    }
    return ArchResult(fit.loss_law, fit.loss_samples, fit.allocation, fit, exponents)


def surface_arrays(runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L, C) of a table's runs for Approach 3."""
    return tuple(runs[c].to_numpy(float) for c in (SIZE_COLUMN, "tokens", "final_val_loss", "flops"))


def kappa_of(runs: pd.DataFrame) -> float:
    """Median compute per parameter-token, flops / (N D)."""
    N, D, _, C = surface_arrays(runs)
    return float(np.median(C / (N * D)))


def _approach3(grid: ArchGrid, draws: PairedDraws, fit: SurfaceFit | None) -> ArchResult:
    N, D, L, C = surface_arrays(grid.runs)
    kappa = kappa_of(grid.runs)
    if fit is None:
        fit = fit_surface(N, D, L, kappa=kappa, C=C, warn=False)
    data = Centring.of(N, D, L)
    weights = replicate_weights(grid, draws)
    theta, value = refit_batch(data, weights, theta_of(fit, data))
    params = params_of(theta, data)
    log_N, log_D = np.log(N), np.log(D)
    varies = np.array([np.ptp(log_N[w > 0]) > 0 and np.ptp(log_D[w > 0]) > 0 for w in weights])
    valid = varies & np.isfinite(value) & np.all(np.isfinite(params), axis=1)
    params = np.where(valid[:, None], params, np.nan)
    E, A_star, gamma = compute_law_params(params, kappa)
    samples = PowerLawSamples(E=E, A=A_star, alpha=gamma)
    kN, aN, kD, aD = allocation_params(fit.as_array(), kappa)
    allocation = AllocationLaw(float(kN), float(aN), float(kD), float(aD),
                               samples=allocation_params(params, kappa))
    exponents = {
        "alpha": (fit.alpha, params[:, 3]),
        "beta": (fit.beta, params[:, 4]),
        "gamma": (fit.compute_law().alpha, gamma),
        "aN": (allocation.aN, allocation.samples[:, 1]),
    }
    return ArchResult(fit.compute_law(), samples, allocation, fit, exponents, params)


EXPONENT_TEST_COLUMNS = (
    "arch", "exponent", "value", "baseline_value", "difference", "lo", "hi", "p_value", "n_valid",
)


def exponent_tests(result: MethodResult, baseline: str, interval: float = 0.90) -> pd.DataFrame:
    """Whether each architecture's exponents differ from the baseline's.

    The paired replicates give the distribution of the difference (arch - baseline); lo, hi: its
    central `interval`; p_value: two-sided bootstrap p-value of 'no difference',
    2 * min(P(d <= 0), P(d >= 0)) over valid replicates (at least 1 / n_valid)."""
    rows = []
    if baseline not in result.archs:
        return pd.DataFrame(columns=list(EXPONENT_TEST_COLUMNS))
    base = result.archs[baseline].exponents
    tail = (1 - interval) / 2
    for arch in sorted(a for a in result.archs if a != baseline):
        for name, (value, replicates) in result.archs[arch].exponents.items():
            base_value, base_replicates = base[name]
            d = replicates - base_replicates
            d = d[np.isfinite(d)]
            if len(d):
                lo, hi = np.quantile(d, [tail, 1 - tail])
                p = min(1.0, max(2 * min(np.mean(d <= 0), np.mean(d >= 0)), 1 / len(d)))
            else:
                lo = hi = p = np.nan
            rows.append((arch, name, value, base_value, value - base_value, lo, hi, p, len(d)))
    return pd.DataFrame(rows, columns=list(EXPONENT_TEST_COLUMNS))
