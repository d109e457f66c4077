"""Bootstrap over runs and compute multipliers, on synthetic sweeps whose true multiplier is known."""

import time

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.bootstrap import (
    PowerLawSamples,
    arch_grids,
    bootstrap_fits,
    paired_draws,
    replicate_frontiers,
)
from isoflop.analysis.fits import PowerLawFit, fit_frontiers
from isoflop.analysis.multiplier import (
    MULTIPLIER_COLUMNS,
    multiplier_band,
    multiplier_table,
)
from isoflop.analysis.synthetic import LossSurface, simulate_runs
from isoflop.analysis.table import usable_runs, validate_runs

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5, "static-qkv": 1.25}
SIX_BUDGETS = list(np.logspace(17, 19.5, 6))


def sweep(budgets, noise=0.0, seed=0, sizes_per_budget=4) -> pd.DataFrame:
    runs = simulate_runs(budgets, FACTORS, baseline="transformer", noise=noise, seed=seed,
                         sizes_per_budget=sizes_per_budget)
    return usable_runs(validate_runs(runs))


def analyse(runs, n_boot=1000, seed=0, at=None):
    fits, skipped = fit_frontiers(runs)
    assert not skipped
    samples = bootstrap_fits(runs, fits, n_boot=n_boot, seed=seed)
    return fits, samples, multiplier_table(runs, fits, samples, "transformer", at=at)


def with_truth(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(k=table["arch"].map(FACTORS))


def test_noiseless_sweep_gives_exactly_the_compute_factor():
    fits, _, table = analyse(sweep(SIX_BUDGETS), n_boot=50)
    assert all(fit.with_E for fit in fits.values())
    assert fits["transformer"].E == pytest.approx(LossSurface().E, rel=1e-3)
    table = with_truth(table)
    np.testing.assert_allclose(table["multiplier"], table["k"], rtol=1e-3)


def test_known_compute_factor_comes_out_as_the_multiplier_with_its_band():
    table = analyse(sweep(SIX_BUDGETS, noise=0.001))[2]
    assert list(table.columns) == list(MULTIPLIER_COLUMNS)
    table = with_truth(table)
    assert set(table["arch"]) == {"dynamic-qkv", "static-qkv"}  # the baseline is M = 1 by definition
    inside = table[~table["extrapolated"]]
    assert len(inside) >= 8
    np.testing.assert_allclose(inside["multiplier"], inside["k"], rtol=0.03)
    assert ((table["lo"] <= table["k"]) & (table["k"] <= table["hi"])).all()
    assert (table["hi"] - table["lo"] > 0).all()


def test_three_budget_grid_is_fast_without_E_and_brackets_the_factor():
    runs = sweep([1e17, 1e18, 1e19], noise=0.001)
    assert len(runs) == 3 * 3 * 4
    start = time.perf_counter()
    fits, _, table = analyse(runs, n_boot=1000)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"fit + 1000 bootstrap resamples took {elapsed:.1f} s"
    assert not any(fit.with_E for fit in fits.values())
    table = with_truth(table)
    middle = table[table["budget"] == 1e18]
    # A line in log-log is only locally right for a law with E > 0: close in the middle of the grid.
    np.testing.assert_allclose(middle["multiplier"], middle["k"], rtol=0.03)
    assert ((middle["lo"] <= middle["k"]) & (middle["k"] <= middle["hi"])).all()
    # At the grid's ends the line's misfit shows: the paired band is narrow (both archs redraw the
    # same size slots), so it measures noise, not the bias of a misspecified law.
    ends = table[table["budget"] != 1e18]
    assert (np.abs(ends["multiplier"] / ends["k"] - 1) > 0.03).all()


def test_extrapolation_flags_follow_both_fitted_ranges():
    _, _, table = analyse(sweep([1e17, 1e18, 1e19], noise=0.001), n_boot=100, at=[1e16, 3e18, 1e21])
    flags = table.set_index(["arch", "budget"])["extrapolated"]
    for arch in ("dynamic-qkv", "static-qkv"):
        assert not flags[(arch, 1e17)] and not flags[(arch, 1e18)] and not flags[(arch, 3e18)]
        assert flags[(arch, 1e16)] and flags[(arch, 1e21)]  # outside the grid
        # At the top budget the baseline would be read at M * C > its largest budget.
        assert flags[(arch, 1e19)]
    assert len(table) == 2 * 6


def test_a_loss_the_baseline_never_reaches_gives_an_infinite_multiplier():
    common = {"n_points": 5, "with_E": True, "c_min": 1e15, "c_max": 1e19, "rms": 0.0}
    baseline = PowerLawFit(E=2.0, A=1e4, alpha=0.2, **common)
    better = PowerLawFit(E=1.0, A=1e4, alpha=0.2, **common)

    def replicates(fit, n=200):
        jitter = np.random.default_rng(0).normal(1, 0.01, n)
        return PowerLawSamples(E=fit.E * jitter, A=np.full(n, fit.A), alpha=np.full(n, fit.alpha))

    C = np.array([1e15, 1e25])
    M, lo, hi = multiplier_band(better, baseline, replicates(better), replicates(baseline), C)
    assert np.isfinite(M[0]) and M[0] > 1
    assert np.isinf(M[1]) and np.isinf(lo[1]) and np.isinf(hi[1])  # inf, never NaN from inf - inf


def test_named_budgets_must_be_positive():
    runs = sweep([1e17, 1e18, 1e19])
    fits, _ = fit_frontiers(runs)
    samples = bootstrap_fits(runs, fits, n_boot=10)
    with pytest.raises(ValueError, match="positive FLOP counts"):
        multiplier_table(runs, fits, samples, "transformer", at=[-1.0])
    with pytest.raises(ValueError, match="baseline 'gpt' has no fit"):
        multiplier_table(runs, fits, samples, "gpt")


def test_stratified_resampling_keeps_every_budget_and_draws_from_its_own_runs():
    runs = sweep([1e17, 1e18, 1e19], noise=0.01)
    grids = arch_grids(runs)
    draws = paired_draws(grids, n_boot=300, seed=0, resample_budgets=False)
    C, L = replicate_frontiers(grids["dynamic-qkv"], draws)
    assert C.shape == L.shape == (300, 3)
    arch = runs[runs["arch"] == "dynamic-qkv"]
    for j, budget in enumerate([1e17, 1e18, 1e19]):
        cell = arch[arch["budget"] == budget]
        assert set(zip(C[:, j], L[:, j])) <= set(zip(cell["flops"], cell["final_val_loss"]))
        # The best run of the cell is the replicate's point whenever it was drawn, so it dominates
        # but other runs appear when it was not (probability (3/4)^4 per replicate).
        share_best = np.mean(L[:, j] == cell["final_val_loss"].min())
        assert 0.55 < share_best < 0.85


def test_paired_draws_pick_the_same_budgets_and_size_slots_for_every_arch():
    runs = sweep([1e17, 1e18, 1e19, 1e20], noise=0.01)
    grids = arch_grids(runs)
    draws = paired_draws(grids, n_boot=200, seed=1, resample_budgets=True)

    def drawn_budgets_and_ranks(arch):
        grid = grids[arch]
        _, L = replicate_frontiers(grid, draws)
        rows = grid.runs.reset_index(drop=True)
        budget = rows.set_index("final_val_loss")["budget"]
        return budget[L.ravel()].to_numpy().reshape(L.shape)

    base, variant = drawn_budgets_and_ranks("transformer"), drawn_budgets_and_ranks("dynamic-qkv")
    np.testing.assert_array_equal(base, variant)  # the same budgets, dropped and repeated alike
    distinct = np.array([len(set(row)) for row in base])
    assert (distinct < 4).mean() > 0.5  # budgets really are resampled (P(all 4 kept) = 3/32)


def test_bootstrap_is_seeded_and_ignores_row_order():
    runs = sweep([1e17, 1e18, 1e19], noise=0.01)
    fits, _ = fit_frontiers(runs)
    first = bootstrap_fits(runs, fits, n_boot=200, seed=3)
    again = bootstrap_fits(runs.sample(frac=1.0, random_state=1), fits, n_boot=200, seed=3)
    other = bootstrap_fits(runs, fits, n_boot=200, seed=4)
    for arch in fits:
        np.testing.assert_array_equal(first[arch].alpha, again[arch].alpha)
        assert not np.array_equal(first[arch].alpha, other[arch].alpha)
    assert first["transformer"].n_valid == 200
    p = first["transformer"].percentiles()["alpha"]
    assert p["p5"] < fits["transformer"].alpha < p["p95"]


def test_ladder_bootstrap_resamples_points_and_drops_degenerate_replicates():
    surface = LossSurface()
    N = np.array([1e6, 3e6, 1e7, 3e7, 1e8])
    rows = []
    for arch, k in (("transformer", 1.0), ("dynamic-qkv", 1.5)):
        for n in N:
            tokens = 50 * n  # the paper's 50 tokens per parameter
            rows.append({"run_id": f"{arch}-{n:g}", "arch": arch, "budget": np.nan,
                         "params_non_embedding": n,
                         "flops": 6 * n * tokens, "final_val_loss": float(surface.loss(n, k * tokens))})
    runs = pd.DataFrame(rows)
    fits, _ = fit_frontiers(runs)
    assert fits["transformer"].with_E and fits["transformer"].n_points == 5
    samples = bootstrap_fits(runs, fits, n_boot=400, seed=0)
    valid = samples["transformer"].n_valid
    # A replicate needs 4 distinct sizes out of 5 draws: P = (120 + 1200) / 3125 = 0.42.
    assert 0.3 * 400 < valid < 0.55 * 400
    table = multiplier_table(runs, fits, samples, "transformer")
    own_compute = np.sort(runs.loc[runs["arch"] == "dynamic-qkv", "flops"])
    np.testing.assert_array_equal(table["budget"], own_compute)
    assert (table["multiplier"] > 1).all()
