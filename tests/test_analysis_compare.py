"""Comparing architectures: every method's multiplier, P(M > 1), exponent tests, the wall-clock
multiplier, named budgets through run_fit, flagged runs and the bias table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.bias import BIAS_COLUMNS, bias_table
from isoflop.analysis.methods import exponent_tests, fit_method
from isoflop.analysis.multiplier import WALLCLOCK_COLUMNS, multiplier_table
from isoflop.analysis.outliers import flag_outliers
from isoflop.analysis.report import run_fit
from isoflop.analysis.synthetic import LossSurface, simulate_runs
from isoflop.analysis.table import usable_runs, validate_runs

BUDGETS = list(np.logspace(17, 20, 6))


def sweep(factors, noise=0.002, seed=0, **kwargs) -> pd.DataFrame:
    runs = simulate_runs(BUDGETS, factors, "base", sizes_per_budget=6, size_step=1.7, noise=noise,
                         seed=seed, **kwargs)
    return usable_runs(validate_runs(runs))


@pytest.mark.parametrize("method", ["frontier", "approach2", "approach3"])
def test_every_method_recovers_the_compute_factor(method):
    runs = sweep({"base": 1.0, "var": 1.4}, noise=0.001)
    result = fit_method(runs, method, n_boot=200)
    table = multiplier_table(runs, result.fits, result.samples, "base")
    inside = table[~table["extrapolated"]]
    assert len(inside) >= 4
    np.testing.assert_allclose(inside["multiplier"], 1.4, rtol=0.04)
    assert (inside["p_gt_1"] == 1.0).all()


def test_p_of_m_above_one_is_undecided_between_equal_architectures():
    runs = sweep({"base": 1.0, "twin": 1.0}, noise=0.004, seed=3)
    result = fit_method(runs, "approach3", n_boot=300)
    table = multiplier_table(runs, result.fits, result.samples, "base")
    middle = table[~table["extrapolated"]].iloc[1]
    assert 0.03 < middle["p_gt_1"] < 0.97 and middle["lo"] < 1 < middle["hi"]


def test_exponent_test_separates_a_real_difference_from_none():
    base = simulate_runs(BUDGETS, {"base": 1.0}, "base", sizes_per_budget=6, size_step=1.7,
                         noise=0.002, seed=0)
    steeper = simulate_runs(BUDGETS, {"steep": 1.0}, "steep", LossSurface(a=0.42),
                            sizes_per_budget=6, size_step=1.7, noise=0.002, seed=1)
    steeper["is_baseline"] = False
    runs = usable_runs(validate_runs(pd.concat([base, steeper], ignore_index=True)))
    tests = exponent_tests(fit_method(runs, "approach3", n_boot=300), "base").set_index("exponent")
    assert tests.loc["alpha", "difference"] == pytest.approx(0.08, abs=0.03)
    assert tests.loc["alpha", "p_value"] < 0.01 and tests.loc["alpha", "lo"] > 0
    assert tests.loc["beta", "p_value"] > 0.05  # both surfaces share beta = 0.28


def test_wallclock_multiplier_divides_by_the_measured_slowdown():
    runs = sweep({"base": 1.0, "var": 1.4}, slowdowns={"var": 1.25})
    result = fit_method(runs, "frontier", n_boot=100)
    table = multiplier_table(runs, result.fits, result.samples, "base", wallclock=True)
    assert list(table.columns[-3:]) == list(WALLCLOCK_COLUMNS)
    np.testing.assert_allclose(table["wall_multiplier"], table["multiplier"] / 1.25, rtol=1e-9)
    np.testing.assert_allclose(table["wall_lo"], table["lo"] / 1.25, rtol=1e-9)


def test_run_fit_by_approach3_gives_the_multiplier_at_a_named_budget(tmp_path):
    runs = simulate_runs(BUDGETS, {"base": 1.0, "var": 1.4}, "base", sizes_per_budget=6,
                         size_step=1.7, noise=0.002)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    outcome = run_fit(tmp_path, at=[1e21], n_boot=100, method="approach3")
    row = outcome.multipliers.set_index("budget").loc[1e21]
    assert row["extrapolated"] and row["multiplier"] == pytest.approx(1.4, rel=0.1)
    document = json.loads(outcome.fits_path.read_text())
    assert document["method"] == "approach3" and document["resample_budgets"] is True
    surface = document["archs"]["var"]["surface"]
    assert surface["alpha"] == pytest.approx(0.34, abs=0.05) and surface["at_bounds"] == []
    assert set(surface["bootstrap"]) == {"E", "A", "B", "alpha", "beta"}
    assert {t["exponent"] for t in document["exponent_tests"]} == {"alpha", "beta", "gamma", "aN"}


def test_flagged_runs_say_why():
    runs = validate_runs(simulate_runs(BUDGETS, {"base": 1.0}, "base", sizes_per_budget=6,
                                       size_step=1.7, noise=0.001))
    runs.loc[3, "final_val_loss"] *= 1.05  # a run that went wrong
    runs.loc[7, "state"] = "diverged"
    second = runs["budget"] == BUDGETS[1]
    runs.loc[second, "final_val_loss"] *= 1.3  # a whole budget worse than the one below it
    surface = fit_method(usable_runs(runs), "approach3", n_boot=2).archs["base"].detail
    flagged = flag_outliers(runs, {"base": surface})
    reasons = flagged.groupby("run_id")["reason"].apply(list)
    assert reasons[runs.loc[7, "run_id"]] == ["state 'diverged': left out of every fit"]
    assert "robust SDs, above)" in reasons[runs.loc[3, "run_id"]][0]
    best = runs[second & (runs["state"] == "done")]["final_val_loss"].idxmin()
    assert any("best loss of budget 3.98e+17 is above the best loss of the smaller budget 1e+17" in r
               for r in reasons[runs.loc[best, "run_id"]])
    clean = validate_runs(simulate_runs(BUDGETS, {"base": 1.0}, "base", sizes_per_budget=6,
                                        size_step=1.7))
    surface = fit_method(usable_runs(clean), "approach3", n_boot=2).archs["base"].detail
    assert flag_outliers(clean, {"base": surface}).empty


def test_bias_table_has_every_method_and_approach3_is_unbiased_on_a_centred_grid():
    table = bias_table(budgets=tuple(np.logspace(17, 20, 5)), grids={"centred": 1.0},
                       sizes_per_budget=6, n_sims=2, noise=0.002)
    assert list(table.columns) == list(BIAS_COLUMNS)
    assert set(table["method"]) == {"approach2-quadratic", "approach2-akima", "approach3-lbfgs",
                                    "approach3-varpro", "frontier"}
    a3 = table[(table["method"] == "approach3-lbfgs")].set_index("estimate")
    assert abs(a3.loc["aN", "bias"]) < 0.03 and abs(a3.loc["N_opt(C_mid)", "bias"]) < 0.1
    assert (table["n_ok"] == 2).all()
