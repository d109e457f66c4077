"""The held-out budget check: laws fitted without the largest budget, their prediction there
against what the runs reached, in the report and its plot."""

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.holdout import holdout_check
from isoflop.analysis.report import write_report
from isoflop.analysis.seeds import average_seeds
from isoflop.analysis.synthetic import LossSurface, simulate_runs

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5}
BUDGETS = [1e17, 1e18, 1e19, 1e20]


def test_a_law_of_the_right_form_predicts_the_held_out_budget_exactly():
    # E = 0: the compute-optimal loss is a pure power law, the form fitted below four budgets.
    runs = simulate_runs(BUDGETS, FACTORS, "transformer", surface=LossSurface(E=0.0))
    check = holdout_check(runs, "frontier", "transformer", n_boot=100)
    assert check.budget == 1e20 and check.fitted_budgets == (1e17, 1e18, 1e19)
    table = check.table.set_index("arch")
    assert np.abs(table["error"]).max() < 1e-9 and table["inside"].all()
    assert table.loc["dynamic-qkv", "multiplier"] == pytest.approx(1.5, rel=1e-9)
    assert np.isnan(table.loc["transformer", "multiplier"])


def test_a_curve_that_bends_is_caught_outside_the_band():
    # Chinchilla's surface (E = 1.69): a straight line in log-log through three budgets promises
    # more than the fourth gives, by more than the resampling band.
    runs = simulate_runs(BUDGETS, FACTORS, "transformer")
    table = holdout_check(runs, "frontier", "transformer", n_boot=100).table.set_index("arch")
    assert (table["error"] < -0.03).all() and not table["inside"].any()
    observed = runs[runs["budget"] == 1e20].groupby("arch")["final_val_loss"].min()
    assert table["observed"].to_dict() == pytest.approx(observed.to_dict())


def test_the_reached_loss_is_a_cells_seed_mean():
    tables = []
    for seed in (0, 1):
        runs = simulate_runs(BUDGETS, FACTORS, "transformer", noise=0.02, seed=10 + seed)
        tables.append(runs.assign(seed=seed, run_id=runs["run_id"].str[:10] + f"s{seed}"))
    averaged = average_seeds(pd.concat(tables, ignore_index=True))
    table = holdout_check(averaged, "frontier", "transformer", n_boot=50).table.set_index("arch")
    held = averaged[averaged["budget"] == 1e20]
    assert table["observed"].to_dict() == pytest.approx(
        held.groupby("arch")["final_val_loss"].min().to_dict())


def test_fewer_than_three_budgets_have_no_check():
    runs = simulate_runs(BUDGETS[:2], FACTORS, "transformer")
    assert holdout_check(runs, "frontier", "transformer", n_boot=20) is None


def test_the_report_has_the_section_and_the_plot(tmp_path):
    runs = simulate_runs(BUDGETS, FACTORS, "transformer", noise=0.005, seed=1)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    report = write_report(tmp_path, n_boot=100).read_text()
    section = report.split("## Held-out budget")[1].split("\n## ")[0]
    assert "refitted (frontier) on 1e+17, 1e+18, 1e+19 only, without the largest budget 1e+20" in section
    assert "| architecture | predicted loss (90% band) | reached (size) | error |" in section
    assert len([line for line in section.splitlines() if line.startswith("| dynamic-qkv |")]) == 1
    assert "Outside the predicted band:" in section  # the surface bends (E = 1.69)
    assert (tmp_path / "plots" / "holdout.png").stat().st_size > 10_000
    assert "![Held-out budget](plots/holdout.png)" in report


def test_a_two_budget_report_has_neither(tmp_path):
    simulate_runs(BUDGETS[:2], FACTORS, "transformer").to_csv(tmp_path / "runs.csv", index=False)
    report = write_report(tmp_path, n_boot=20).read_text()
    assert "## Held-out budget" not in report and not (tmp_path / "plots" / "holdout.png").exists()
