"""Cells trained with several seeds: one point per cell (the mean), seeds redrawn by the bootstrap,
and the report's section on how far the seeds lie apart and what each seed alone would say."""

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.bootstrap import arch_grids, paired_draws, replicate_losses
from isoflop.analysis.fits import frontier_points
from isoflop.analysis.report import run_fit, write_report
from isoflop.analysis.seeds import (
    N_SEEDS,
    SEED_LOSSES,
    average_seeds,
    has_repeats,
    per_seed_multipliers,
    seed_spread,
)
from isoflop.analysis.synthetic import simulate_runs

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5}
BUDGETS = [1e17, 1e18, 1e19, 1e20]


def seeded_runs(seeds=(0, 1, 2), noise=0.01) -> pd.DataFrame:
    """The same grid once per seed, each with its own loss noise and run ids."""
    tables = []
    for seed in seeds:
        runs = simulate_runs(BUDGETS, FACTORS, baseline="transformer", noise=noise, seed=100 + seed)
        runs["seed"] = seed
        runs["run_id"] = runs["run_id"].str[:10] + f"s{seed}"
        tables.append(runs)
    return pd.concat(tables, ignore_index=True)


def test_a_table_of_one_seed_per_cell_passes_through_unchanged():
    runs = seeded_runs(seeds=(0,))
    assert not has_repeats(runs)
    assert average_seeds(runs) is runs
    assert seed_spread(runs).empty


def test_each_cell_becomes_one_row_with_its_seeds_mean():
    runs = seeded_runs()
    averaged = average_seeds(runs)
    assert len(averaged) == len(runs) // 3 and (averaged[N_SEEDS] == 3).all()
    assert (averaged["seed"] == 0).all()  # the kept row is the lowest seed's
    cells = runs.groupby(["arch", "budget", "size"])
    for row in averaged.itertuples():
        group = cells.get_group((row.arch, row.budget, row.size)).sort_values("seed")
        assert row.final_val_loss == pytest.approx(group["final_val_loss"].mean(), rel=1e-12)
        assert row.tokens_per_s == pytest.approx(group["tokens_per_s"].mean(), rel=1e-12)
        assert getattr(row, SEED_LOSSES) == tuple(group["final_val_loss"])


def test_ladder_cells_without_a_budget_are_averaged_too():
    runs = seeded_runs(seeds=(0, 1))
    runs["budget"] = np.nan  # as a ladder's rows are
    averaged = average_seeds(runs)
    assert len(averaged) == len(runs) // 2 and averaged["budget"].isna().all()


def test_the_frontier_takes_a_cells_mean_not_its_luckiest_seed():
    """Size s1's seeds are steady, size s2 has one lucky seed and two bad ones: the minimum over
    runs would pick s2's lucky seed, the mean picks s1."""
    runs = seeded_runs(noise=0.0)
    one_budget = runs[(runs["arch"] == "transformer") & (runs["budget"] == 1e18)].copy()
    losses = {"s0": (1.10, 1.10, 1.10), "s1": (1.00, 1.00, 1.00), "s2": (0.95, 1.20, 1.20),
              "s3": (1.10, 1.10, 1.10)}
    for (size, seed), index in one_budget.groupby(["size", "seed"]).groups.items():
        one_budget.loc[index, "final_val_loss"] = losses[size][seed]
    assert frontier_points(one_budget)["L"].iloc[0] == 0.95
    averaged = average_seeds(one_budget)
    assert frontier_points(averaged)["L"].iloc[0] == pytest.approx(1.0)


def test_point_estimates_are_those_of_the_seed_means(tmp_path):
    runs = seeded_runs()
    (tmp_path / "seeds").mkdir()
    (tmp_path / "means").mkdir()
    runs.to_csv(tmp_path / "seeds" / "runs.csv", index=False)
    average_seeds(runs).drop(columns=[SEED_LOSSES, N_SEEDS]).to_csv(tmp_path / "means" / "runs.csv",
                                                                     index=False)
    seeded = run_fit(tmp_path / "seeds", n_boot=50).multipliers
    means = run_fit(tmp_path / "means", n_boot=50).multipliers
    np.testing.assert_allclose(seeded["multiplier"], means["multiplier"], rtol=1e-12)
    assert not np.allclose(seeded["lo"], means["lo"], rtol=1e-6)  # the bands redraw the seeds


def test_the_bootstrap_redraws_each_cells_seeds_paired_across_architectures():
    runs = seeded_runs()
    # The second architecture's seeds are the first's shifted by 0.5: paired draws keep the shift.
    runs.loc[runs["arch"] == "dynamic-qkv", "final_val_loss"] = (
        runs.loc[runs["arch"] == "transformer", "final_val_loss"].to_numpy() + 0.5)
    grids = arch_grids(average_seeds(runs))
    draws = paired_draws(grids, 400, seed=3, resample_budgets=False)
    base, other = (replicate_losses(grids[arch], draws) for arch in ("transformer", "dynamic-qkv"))
    np.testing.assert_allclose(other - base, 0.5, atol=1e-12)
    seeds = grids["transformer"].seeds
    for row, values in enumerate(seeds):
        column = base[:, row]
        assert column.min() >= values.min() - 1e-12 and column.max() <= values.max() + 1e-12
        assert len(np.unique(column)) > 3  # means of redrawn seeds, not one fixed value
        assert column.mean() == pytest.approx(values.mean(), abs=3 * values.std() / np.sqrt(400))


def test_identical_seeds_give_the_single_seed_fit_and_band(tmp_path):
    """Seeds that agree add no noise: the same multipliers and bands as one seed of the means."""
    runs = seeded_runs(seeds=(0,))
    repeated = pd.concat([runs.assign(seed=s, run_id=runs["run_id"] + str(s)) for s in (0, 1)])
    for name, table in (("one", runs), ("two", repeated)):
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "runs.csv", index=False)
    one, two = (run_fit(tmp_path / name, n_boot=100).multipliers for name in ("one", "two"))
    for column in ("multiplier", "lo", "hi"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-12)


def test_per_seed_multipliers_skip_a_seed_that_missed_cells():
    runs = seeded_runs()
    runs = runs.drop(runs.index[(runs["seed"] == 2) & (runs["size"] == "s1")][:1])
    calls = []

    def multipliers_of(one_seed):
        calls.append(sorted(one_seed["seed"].unique()))
        return pd.DataFrame({"arch": ["dynamic-qkv"], "budget": [1e18], "multiplier": [1.5]})

    table = per_seed_multipliers(runs, "transformer", multipliers_of)
    assert calls == [[0], [1]] and list(table["seed"]) == [0, 1]


def test_the_report_says_how_far_seeds_lie_apart_and_what_each_seed_gives(tmp_path):
    runs = seeded_runs(noise=0.02)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    report = write_report(tmp_path, n_boot=100).read_text()
    assert "used in fits: 96 (done, finite final loss), as 32 cells" in report
    section = report.split("## Seeds")[1].split("\n## ")[0]
    assert "32 cells (architecture, budget, size) were trained with several seeds (seeds 0, 1, 2)" in section
    spread = seed_spread(average_seeds(runs))
    median = 100 * (spread["std"] / spread["mean"])[spread["arch"] == "dynamic-qkv"].median()
    assert f"| dynamic-qkv | 16 | 3 | {median:.2f}% |" in section
    assert "| seed 0 | seed 1 | seed 2 | seeds' range |" in section
    assert len([line for line in section.splitlines() if line.startswith("| dynamic-qkv | 1e+")]) == 4
    assert "single-seed multipliers lie inside the pooled band" in section


def test_a_ladder_of_seeds_gets_the_section_too(tmp_path):
    runs = seeded_runs(seeds=(0, 1), noise=0.02)
    runs = runs[runs["size"] == "s1"].assign(budget=np.nan)  # one size per compute: a ladder
    runs.to_csv(tmp_path / "runs.csv", index=False)
    report = write_report(tmp_path, n_boot=50).read_text()
    section = report.split("## Seeds")[1].split("\n## ")[0]
    assert "| transformer | 4 | 2 |" in section and ", ladder)" in section


def test_the_isoflop_curves_draw_each_cells_seed_range(tmp_path):
    from matplotlib.image import imread

    from isoflop.analysis.plots import plot_isoflop_curves

    averaged = average_seeds(seeded_runs(noise=0.05))
    with_bars = imread(plot_isoflop_curves(averaged, "transformer", tmp_path / "bars.png"))
    without = imread(plot_isoflop_curves(averaged.drop(columns=[SEED_LOSSES, N_SEEDS]), "transformer",
                                         tmp_path / "plain.png"))
    # Below the title (whose words differ): the panels alone.
    ink = [float(np.mean(np.any(p[p.shape[0] // 10:, :, :3] < 0.9, axis=-1))) for p in (with_bars, without)]
    assert ink[0] > ink[1] * 1.01


def test_a_report_where_one_seed_ran_every_cell_sets_no_seeds_side_by_side(tmp_path):
    runs = seeded_runs(seeds=(0, 1), noise=0.02)
    runs = runs[(runs["seed"] == 0) | (runs["budget"] < 1e20)]  # seed 1 skipped the largest budget
    runs.to_csv(tmp_path / "runs.csv", index=False)
    report = write_report(tmp_path, n_boot=50).read_text()
    section = report.split("## Seeds")[1].split("\n## ")[0]
    assert "| dynamic-qkv | 12 | 2 |" in section  # the cells both seeds ran
    assert "Only seed 0 ran every cell, so no two seeds' runs are fitted alone side by side." in section
    assert "seeds' range" not in section
