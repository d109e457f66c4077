"""Approach 3: Epoch AI's fit of the Chinchilla data, recovery of a known surface, bounds, refits."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.approach3 import (
    Centring,
    FitWarning,
    SurfaceFit,
    fit_surface,
    objective,
    params_of,
    refit_batch,
    theta_of,
)
from isoflop.analysis.synthetic import LossSurface

CHINCHILLA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chinchilla_svg_extracted.csv"
# Epoch AI (Besiroglu et al. 2024), Approach 3 on these points: estimate and bootstrap SE.
EPOCH = {"E": (1.817, 0.026), "A": (482.0, 124.5), "B": (2085.4, 1293.3),
         "alpha": (0.348, 0.015), "beta": (0.366, 0.021)}


@pytest.fixture(scope="module")
def chinchilla() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not CHINCHILLA.is_file():
        pytest.skip(f"reference data {CHINCHILLA} is absent (see shared/data/README.md)")
    table = pd.read_csv(CHINCHILLA)
    N, C, L = (table[c].to_numpy(float) for c in ("Model Size", "Training FLOP", "loss"))
    keep = np.argsort(L)[:-5]  # Epoch dropped the 5 highest-loss points
    return N[keep], C[keep] / (6 * N[keep]), L[keep]


@pytest.mark.parametrize("method", ["lbfgs", "varpro"])
def test_matches_epochs_fit_of_the_chinchilla_data_within_their_standard_errors(chinchilla, method):
    N, D, L = chinchilla
    assert len(L) == 240
    fit = fit_surface(N, D, L, method=method)
    for name, (value, se) in EPOCH.items():
        assert abs(getattr(fit, name) - value) < se, f"{name}={getattr(fit, name)}"
    # Tighter than the SEs where the fit is well determined (Epoch's E, alpha, beta to 3 digits).
    assert abs(fit.E - 1.817) < 2e-3 and abs(fit.alpha - 0.348) < 2e-3 and abs(fit.beta - 0.366) < 2e-3
    assert fit.at_bounds == () and fit.params_exponent == pytest.approx(0.513, abs=2e-3)


def test_bootstrap_spread_on_the_chinchilla_data_is_epochs(chinchilla):
    N, D, L = chinchilla
    fit = fit_surface(N, D, L)
    data = Centring.of(N, D, L)
    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, len(L), len(L)), minlength=len(L))
                        for _ in range(200)]).astype(float)
    theta, _ = refit_batch(data, weights, theta_of(fit, data))
    spread = dict(zip(("E", "A", "B", "alpha", "beta"), params_of(theta, data).std(axis=0)))
    for name in ("E", "alpha", "beta"):
        assert 0.7 < spread[name] / EPOCH[name][1] < 1.4, f"SE of {name}: {spread[name]}"


def test_batched_refits_reach_the_optimum_of_each_weighting(chinchilla):
    N, D, L = chinchilla
    fit = fit_surface(N, D, L)
    data = Centring.of(N, D, L)
    rng = np.random.default_rng(1)
    weights = np.stack([np.bincount(rng.integers(0, len(L), len(L)), minlength=len(L))
                        for _ in range(2)]).astype(float)
    theta, value = refit_batch(data, weights, theta_of(fit, data))
    for w, batch_theta, batch_value in zip(weights, theta, value):
        single = fit_surface(N, D, L, weights=w)  # from the whole grid of starts
        # The near-L1 objective converges slowly at the end: within 1e-4 of the optimum, and the
        # exponents within a tenth of their bootstrap SE.
        assert batch_value == pytest.approx(objective(theta_of(single, data), data, w), rel=1e-4)
        *_, alpha, beta = params_of(batch_theta, data)
        assert abs(alpha - single.alpha) < 1.5e-3 and abs(beta - single.beta) < 2e-3


def surface_grid(surface: LossSurface, budgets, sizes_per_budget=6, step=1.7, centre=1.0):
    """Every (N, D) of an isoflop grid centred on the surface's optimum (D = C / 6N)."""
    offsets = step ** (np.arange(sizes_per_budget) - (sizes_per_budget - 1) / 2)
    N = np.concatenate([surface.optimal_params(C) * centre * offsets for C in budgets])
    C = np.repeat(budgets, sizes_per_budget)
    return N, C / (6 * N)


@pytest.mark.parametrize("method", ["lbfgs", "varpro"])
def test_recovers_a_known_surface_and_its_compute_optimal_allocation(method):
    truth = LossSurface(E=1.9, A=300.0, B=900.0, a=0.3, b=0.35)
    N, D = surface_grid(truth, np.logspace(17, 21, 5))
    fit = fit_surface(N, D, truth.loss(N, D), method=method)
    for name, value in (("E", 1.9), ("A", 300.0), ("B", 900.0), ("alpha", 0.3), ("beta", 0.35)):
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), name
    C = np.array([1e18, 1e22])
    np.testing.assert_allclose(fit.optimal_params(C), truth.optimal_params(C), rtol=1e-2)
    np.testing.assert_allclose(fit.optimal_tokens(C), C / (6 * truth.optimal_params(C)), rtol=1e-2)
    # L*(C) is the surface along that allocation, itself a power law in C.
    N_opt = fit.optimal_params(C)
    np.testing.assert_allclose(fit.optimal_loss(C), fit.predict(N_opt, C / (6 * N_opt)), rtol=1e-12)
    law = fit.compute_law()
    assert law.alpha == pytest.approx(0.3 * 0.35 / 0.65, rel=1e-3) and law.E == fit.E


def test_the_optimum_minimises_loss_at_fixed_compute():
    fit = SurfaceFit(E=1.7, A=400.0, B=1000.0, alpha=0.32, beta=0.3, method="lbfgs", n_points=1,
                     objective=0.0, rms=0.0, kappa=7.5, n_min=1, n_max=1, d_min=1, d_max=1,
                     c_min=1, c_max=1)
    C = 3e20
    N = fit.optimal_params(C) * np.geomspace(0.8, 1.25, 101)
    losses = fit.predict(N, C / (7.5 * N))
    assert np.argmin(losses) == 50  # the closed form at the centre, with kappa, not 6


def test_a_parameter_on_its_bound_is_warned_about():
    # No dependence on model size: alpha wants to be 0, its lower bound.
    N, D = surface_grid(LossSurface(), np.logspace(17, 20, 4))
    L = 1.8 + 500.0 * D**-0.3
    with pytest.warns(FitWarning, match=r"alpha=0 on its bound.*do not pin this parameter down"):
        fit = fit_surface(N, D, L)
    assert "alpha" in fit.at_bounds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_surface(N, D, L, warn=False)  # the caller records it instead


def test_bad_inputs_are_refused_with_what_is_allowed():
    N, D = np.array([1e6, 2e6, 4e6, 8e6, 1.6e7]), np.full(5, 1e9)
    with pytest.raises(ValueError, match="1 distinct D; the surface needs >= 5 points and >= 2"):
        fit_surface(N, D, np.full(5, 3.0))
    with pytest.raises(ValueError, match="method='adam'; allowed: lbfgs, varpro"):
        fit_surface(N, D * np.arange(1, 6), np.full(5, 3.0), method="adam")
    with pytest.raises(ValueError, match="finite and positive"):
        fit_surface(N, D * np.arange(1, 6), np.array([3.0, 2.9, np.nan, 2.7, 2.6]))
