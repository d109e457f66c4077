"""Frontier selection and the power-law fit L(C) = E + A * C^-alpha, against data with a known truth."""

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.fits import (
    PowerLawFit,
    fit_frontiers,
    fit_power_law,
    fit_with_E_batch,
    frontier_points,
    grid_edges,
)
from isoflop.analysis.synthetic import simulate_runs
from isoflop.analysis.table import usable_runs, validate_runs

E_TRUE, ALPHA_TRUE = 1.8, 0.15
A_TRUE = 1.5 * 1e17**ALPHA_TRUE  # the reducible term is 1.5 nats at 1e17 FLOPs


def truth(C):
    return E_TRUE + A_TRUE * C**-ALPHA_TRUE


def rel(a, b):
    return abs(a / b - 1)


def test_recovers_E_A_alpha_from_noiseless_points():
    C = np.logspace(15, 19, 8)
    fit = fit_power_law(C, truth(C))
    assert fit.with_E and fit.n_points == 8
    assert rel(fit.E, E_TRUE) < 1e-4 and rel(fit.alpha, ALPHA_TRUE) < 1e-4 and rel(fit.A, A_TRUE) < 1e-3
    assert fit.rms < 1e-8
    assert (fit.c_min, fit.c_max) == (1e15, 1e19)


def test_recovers_E_A_alpha_within_a_few_percent_under_low_noise():
    rng = np.random.default_rng(0)
    C = np.logspace(15, 19, 9)
    L = truth(C) * np.exp(0.001 * rng.standard_normal(len(C)))
    fit = fit_power_law(C, L)
    assert rel(fit.E, E_TRUE) < 0.03
    assert rel(fit.alpha, ALPHA_TRUE) < 0.03
    assert rel(fit.A, A_TRUE) < 0.05


def test_start_grid_finds_the_fit_far_from_typical_values():
    # A steep law with most of the loss reducible, where a single default start could stall.
    C = np.logspace(12, 14, 6)
    L = 0.3 + 4e5 * C**-0.5
    fit = fit_power_law(C, L)
    assert rel(fit.E, 0.3) < 1e-3 and rel(fit.alpha, 0.5) < 1e-3


def test_bounds_hold_when_data_want_a_negative_E():
    C = np.logspace(15, 19, 6)
    L = 5 * (C / 1e15) ** -0.05 - 0.5  # log-convex the wrong way: the best E would be negative
    fit = fit_power_law(C, L)
    assert 0 <= fit.E < 1e-9 and 0 < fit.alpha <= 2
    # The batched fit (bootstrap) holds the same bound and finds the same optimum.
    log_ref = np.mean(np.log(C))
    lx = (np.log(C) - log_ref)[None, :]
    E, _, alpha = fit_with_E_batch(lx, np.log(L)[None, :], np.array([1.0, 1.0, 0.1]))[0]
    assert 0 <= E < 1e-6 and rel(alpha, fit.alpha) < 1e-4


def test_fewer_than_four_budgets_fall_back_to_a_line_in_log_log():
    C = np.array([1e15, 1e16, 1e17])
    fit = fit_power_law(C, 40 * C**-0.07)
    assert not fit.with_E and fit.E == 0.0
    assert rel(fit.alpha, 0.07) < 1e-9 and rel(fit.A, 40) < 1e-9
    # Repeated compute values count once: still three budgets, still no E.
    assert not fit_power_law(np.repeat(C, 2), np.repeat(truth(C), 2)).with_E


def test_fit_refuses_what_it_cannot_determine():
    with pytest.raises(ValueError, match="2 distinct compute value.*with E needs >= 4"):
        fit_power_law(np.array([1e15, 1e16]), np.array([3.0, 2.5]), with_E=True)
    with pytest.raises(ValueError, match="1 distinct compute value.*needs >= 2"):
        fit_power_law(np.array([1e15, 1e15]), np.array([3.0, 2.9]))
    with pytest.raises(ValueError, match="finite and positive"):
        fit_power_law(np.array([1e15, -1e16, 1e17]), np.array([3.0, 2.5, 2.0]))


def test_predict_and_inverse_are_inverse_and_inverse_is_inf_below_E():
    fit = PowerLawFit(E=2.0, A=30.0, alpha=0.1, n_points=5, with_E=True, c_min=1e15, c_max=1e19,
                      rms=0.0)
    C = np.logspace(14, 20, 7)
    np.testing.assert_allclose(fit.inverse(fit.predict(C)), C, rtol=1e-9)
    np.testing.assert_array_equal(fit.inverse(np.array([2.0, 1.5])), [np.inf, np.inf])
    assert np.isnan(fit.inverse(np.nan))
    np.testing.assert_array_equal(fit.covers(np.array([0.99e15, 0.9e15, 1.01e19, 1.1e19])),
                                  [True, False, True, False])


def test_frontier_is_lowest_loss_per_budget_and_every_ladder_run():
    runs = pd.DataFrame({
        "budget": [1e15, 1e15, 1e15, 1e16, 1e16, np.nan, np.nan],
        "flops": [1.0e15, 0.98e15, 1.01e15, 1e16, 0.99e16, 3e16, 9e16],
        "final_val_loss": [3.2, 3.1, 3.3, 2.9, 2.8, 2.7, 2.6],
    })
    points = frontier_points(runs)
    # The compute is what the chosen run spent (not the nominal budget).
    np.testing.assert_array_equal(points["C"], [0.98e15, 0.99e16, 3e16, 9e16])
    np.testing.assert_array_equal(points["L"], [3.1, 2.8, 2.7, 2.6])


def test_batched_fit_matches_least_squares():
    rng = np.random.default_rng(1)
    C = np.logspace(15, 19, 6)
    sets = truth(C)[None, :] * np.exp(0.003 * rng.standard_normal((20, len(C))))
    log_ref = np.mean(np.log(C))
    lx = np.broadcast_to(np.log(C) - log_ref, sets.shape)
    start_fit = fit_power_law(C, truth(C))
    start = np.array([start_fit.E, np.log(start_fit.A) - start_fit.alpha * log_ref, start_fit.alpha])
    batch = fit_with_E_batch(lx, np.log(sets), start)
    for row, L in zip(batch, sets):
        fit = fit_power_law(C, L)
        E, u, alpha = row
        batch_rms = np.sqrt(np.mean((np.log(E + np.exp(u - alpha * lx[0])) - np.log(L)) ** 2))
        assert batch_rms <= fit.rms * (1 + 1e-6) + 1e-12
        assert abs(E - fit.E) < 1e-3 * E_TRUE and rel(alpha, fit.alpha) < 1e-2


def test_fit_frontiers_fits_each_arch_and_explains_what_it_skips():
    budgets = [1e15, 1e16, 1e17, 1e18]
    runs = validate_runs(simulate_runs(budgets, {"base": 1, "var": 1.5}, baseline="base"))
    runs.loc[(runs["arch"] == "var") & (runs["budget"] != 1e15), "state"] = "running"
    fits, skipped = fit_frontiers(usable_runs(runs))
    assert list(fits) == ["base"] and fits["base"].with_E and fits["base"].n_points == 4
    assert skipped == {"var": "1 distinct compute value(s); a fit without E needs >= 2"}


def test_grid_edges_names_budgets_whose_best_run_is_the_smallest_or_largest_size():
    rows = []
    for budget, losses in [(1e15, [1.0, 1.1, 1.2]), (1e16, [1.3, 1.1, 1.2]), (1e17, [1.3, 1.2, 1.1])]:
        for params, loss in zip([1e6, 2e6, 4e6], losses):
            rows.append({"arch": "a", "budget": budget, "params": params, "size": f"s{int(params)}",
                         "final_val_loss": loss})
    rows += [{"arch": "b", "budget": 1e15, "params": p, "size": "x", "final_val_loss": loss}
             for p, loss in [(1e6, 1.0), (2e6, 1.1)]]  # two sizes: never judged
    rows.append({"arch": "a", "budget": float("nan"), "params": 1e6, "size": "ladder",
                 "final_val_loss": 0.5})  # ladder runs have no grid
    edges = grid_edges(pd.DataFrame(rows))
    assert edges[["arch", "budget", "size", "edge"]].values.tolist() == [
        ["a", 1e15, "s1000000", "smallest"], ["a", 1e17, "s4000000", "largest"]]
    assert (edges["n_sizes"] == 3).all()
