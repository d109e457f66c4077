"""`isoflop throughput` and throughput.csv: each (architecture, size) trained alone, and the report's
wall-clock multipliers taken from those numbers instead of the runs' own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.report import write_report
from isoflop.analysis.synthetic import simulate_runs
from isoflop.analysis.throughput import THROUGHPUT_FILE, apply_throughput, load_throughput
from isoflop.cli import main

# Two tiny models at one budget and size: two (arch, size) pairs, a few steps each on CPU.
SWEEP = """
name: tput-test
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
  transformer: {{baseline: true}}
  dynamic-qkv: {{overrides: {{conv: {{rank: 4}}}}}}
grid: {{kind: isoflop, budgets: [1.0e+9, 2.0e+9], sizes: [tiny]}}
train: {{batch_size: 2, seq_len: 32, lr: 0.003, eval_tokens: 256, device: cpu}}
executor: {{workers: 2}}
"""
COLUMNS = ["arch", "size", "params", "tokens_per_step", "steps", "repeats", "tokens_per_s",
           "tokens_per_s_min", "tokens_per_s_max", "tokens_per_s_rounds", "device", "compile", "torch_version",
           "git_sha"]


def test_command_writes_one_row_per_architecture_and_size(tmp_path, corpus, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.format(corpus=corpus))
    out, runs_dir = tmp_path / "results", tmp_path / "runs"
    assert main(["throughput", str(sweep), "--steps", "4", "--repeats", "2", "--out", str(out),
                 "--runs-dir", str(runs_dir)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "round 2/2" in printed
    table = pd.read_csv(out / THROUGHPUT_FILE, dtype={"git_sha": str})
    assert list(table.columns) == COLUMNS
    # Two budgets of the same model are one measurement.
    assert sorted(zip(table["arch"], table["size"])) == [("dynamic-qkv", "tiny"), ("transformer", "tiny")]
    assert (table["tokens_per_s"] > 0).all() and (table["params"] > 0).all()
    assert (table["steps"] == 4).all() and (table["tokens_per_step"] == 64).all()
    assert (table["compile"] == False).all()  # noqa: E712  (the sweep trains eagerly: train.compile false)
    # Two measurements each (rounds over both models): the median of two lies between them.
    assert (table["repeats"] == 2).all()
    assert (table["tokens_per_s_min"] <= table["tokens_per_s"]).all()
    assert (table["tokens_per_s"] <= table["tokens_per_s_max"]).all()
    assert (table["tokens_per_s_min"] < table["tokens_per_s_max"]).all()  # timed twice, not copied
    rounds = table["tokens_per_s_rounds"].str.split(";").apply(lambda values: [float(v) for v in values])
    np.testing.assert_allclose(rounds.apply(min), table["tokens_per_s_min"], atol=0.05)
    np.testing.assert_allclose(rounds.apply(max), table["tokens_per_s_max"], atol=0.05)
    assert load_throughput(out) is not None  # what the report reads accepts what the command wrote
    assert (runs_dir / "tput-test" / "_throughput" / "transformer-tiny" / "metrics.jsonl").is_file()


def test_command_refuses_too_few_steps(tmp_path, corpus, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.format(corpus=corpus))
    assert main(["throughput", str(sweep), "--steps", "3", "--runs-dir", str(tmp_path)]) == 2
    assert "--steps 3; allowed: 4 or more" in capsys.readouterr().err
    assert main(["throughput", str(sweep), "--repeats", "0", "--runs-dir", str(tmp_path)]) == 2
    assert "--repeats 0; allowed: 1 or more" in capsys.readouterr().err


def write_table(folder: Path, rows: list[dict]) -> Path:
    path = folder / THROUGHPUT_FILE
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    path = write_table(tmp_path, [{"arch": "transformer", "size": "tiny", "params": 10}])
    with pytest.raises(ValueError, match=rf"{path}: missing column tokens_per_s; allowed:"):
        load_throughput(tmp_path)


@pytest.mark.parametrize("column", ["tokens_per_s", "tokens_per_s_min", "tokens_per_s_max"])
@pytest.mark.parametrize("value", [0.0, -5.0, np.inf, np.nan, "fast"])
def test_a_bad_throughput_names_the_file_and_the_column(tmp_path, column, value):
    good = {"tokens_per_s": 100.0, "tokens_per_s_min": 90.0, "tokens_per_s_max": 110.0}
    path = write_table(tmp_path, [{"arch": "transformer", "size": "tiny", **good},
                                  {"arch": "conv", "size": "tiny", **good, column: value}])
    with pytest.raises(ValueError, match=rf"{path}: column {column} .* row 2 \(conv tiny\); "
                                         "allowed: a positive finite number"):
        load_throughput(tmp_path)


def test_no_table_is_none_and_missing_pairs_are_unmeasured(tmp_path):
    assert load_throughput(tmp_path) is None
    write_table(tmp_path, [{"arch": "transformer", "size": "100", "tokens_per_s": 50.0}])
    runs = pd.DataFrame({"arch": ["transformer", "transformer", "conv"], "size": ["100", "200", "100"],
                         "tokens_per_s": [1.0, 2.0, 3.0]})
    applied = apply_throughput(runs, load_throughput(tmp_path))
    np.testing.assert_array_equal(applied["tokens_per_s"], [50.0, np.nan, np.nan])
    assert list(runs["tokens_per_s"]) == [1.0, 2.0, 3.0]  # a copy: the runs are left as they were


def synthetic_results(folder: Path) -> pd.DataFrame:
    """A synthetic sweep whose runs measured no throughput of their own; each run's size label is
    its own model (the generator's labels s0..s3 name different models at each budget)."""
    runs = simulate_runs([1e17, 1e18, 1e19], {"transformer": 1.0, "dynamic-qkv": 1.5},
                         baseline="transformer", sweep="tput")
    runs["size"] = [f"{size}-{budget:.0e}" for size, budget in zip(runs["size"], runs["budget"])]
    runs["tokens_per_s"] = np.nan
    runs.to_csv(folder / "runs.csv", index=False)
    return runs


def test_report_takes_wallclock_multipliers_from_throughput_csv(tmp_path):
    runs = synthetic_results(tmp_path)
    text = write_report(tmp_path, n_boot=20).read_text()
    assert "Wall-clock M" not in text  # no throughput anywhere: no wall-clock multipliers

    # dynamic-qkv runs at half the baseline's FLOPs per second at every size. seconds_per_flop is
    # tokens / (tokens_per_s * flops), so tokens_per_s = (FLOP/s) / (flops per token) makes it
    # exactly 1 / (FLOP/s): 2x the baseline's, and wall-clock M = M / 2 at every budget.
    flops_per_s = {"transformer": 2e12, "dynamic-qkv": 1e12}
    write_table(tmp_path, [
        {"arch": run.arch, "size": run.size, "steps": 30, "repeats": 3, "device": "NVIDIA H200",
         "compile": "graphs", "tokens_per_s": flops_per_s[run.arch] * run.tokens / run.flops}
        for run in runs.itertuples()])
    text = write_report(tmp_path, n_boot=20).read_text()
    multipliers = pd.read_csv(tmp_path / "multipliers.csv")
    np.testing.assert_allclose(multipliers["wall_multiplier"], multipliers["multiplier"] / 2, rtol=1e-9)
    np.testing.assert_allclose(multipliers["wall_lo"], multipliers["lo"] / 2, rtol=1e-9)
    assert ("at the throughput of each (architecture, size) trained alone "
            "(throughput.csv: 30 steps each, median of 3 repeats on NVIDIA H200, torch.compile with "
            "CUDA graphs)") in text
    assert "Caveat: runs that shared a GPU" not in text
    assert "dynamic-qkv: 2.00 at 1e+17, 2.00 at 1e+18, 2.00 at 1e+19" in text
    assert "wall_tp_lo" not in multipliers.columns  # no repeats' extremes: no throughput range


def test_report_gives_the_wallclock_range_over_the_repeated_measurements(tmp_path):
    """Every pair measured between 1/1.1 and 1.1 times its median: at the extremes (architecture
    slowest, baseline fastest, and the reverse) wall-clock M moves by exactly 1.1^2 either way."""
    runs = synthetic_results(tmp_path)
    flops_per_s = {"transformer": 2e12, "dynamic-qkv": 1e12}
    rows = []
    for run in runs.itertuples():
        median = flops_per_s[run.arch] * run.tokens / run.flops
        rows.append({"arch": run.arch, "size": run.size, "repeats": 3, "tokens_per_s": median,
                     "tokens_per_s_min": median / 1.1, "tokens_per_s_max": median * 1.1})
    write_table(tmp_path, rows)
    text = write_report(tmp_path, n_boot=20).read_text()
    multipliers = pd.read_csv(tmp_path / "multipliers.csv")
    np.testing.assert_allclose(multipliers["wall_tp_lo"], multipliers["wall_multiplier"] / 1.21, rtol=1e-9)
    np.testing.assert_allclose(multipliers["wall_tp_hi"], multipliers["wall_multiplier"] * 1.21, rtol=1e-9)
    first = multipliers.iloc[0]
    assert (f"{first['wall_multiplier']:.2f}x ({first['wall_lo']:.2f}-{first['wall_hi']:.2f}; "
            f"{first['wall_tp_lo']:.2f}-{first['wall_tp_hi']:.2f})") in text
    assert "wall-clock M (interval; throughput range)" in text
    assert "the spread of repeated measurements, which the band leaves out" in text


def test_the_range_is_taken_round_by_round_when_the_table_has_the_rounds(tmp_path):
    """A drift that hits a whole round (every model x0.8 in one round, x1.25 in another) cancels
    in the ratios taken within each round: the range collapses onto the point estimate, where the
    extremes (also in the table) would give 1.25^2 either way. A model that alone runs faster in
    one round widens the range by exactly that factor."""
    runs = synthetic_results(tmp_path)
    flops_per_s = {"transformer": 2e12, "dynamic-qkv": 1e12}
    drift = [0.8, 1.0, 1.25]

    def table(own: dict[str, list[float]]) -> None:
        rows = []
        for run in runs.itertuples():
            median = flops_per_s[run.arch] * run.tokens / run.flops
            rates = [median * d * f for d, f in zip(drift, own.get(run.arch, [1.0] * 3))]
            rows.append({"arch": run.arch, "size": run.size, "repeats": 3, "tokens_per_s": median,
                         "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
                         "tokens_per_s_rounds": ";".join(str(r) for r in rates)})
        write_table(tmp_path, rows)

    table({})
    text = write_report(tmp_path, n_boot=20).read_text()
    multipliers = pd.read_csv(tmp_path / "multipliers.csv")
    for column in ("wall_tp_lo", "wall_tp_hi"):
        np.testing.assert_allclose(multipliers[column], multipliers["wall_multiplier"], rtol=1e-9)
    assert "each round's ratio taken between that round's measurements" in text

    table({"dynamic-qkv": [1.0, 1.1, 1.0]})  # 10% faster in round 2 alone: wall-clock M x1.1 there
    write_report(tmp_path, n_boot=20)
    multipliers = pd.read_csv(tmp_path / "multipliers.csv")
    np.testing.assert_allclose(multipliers["wall_tp_lo"], multipliers["wall_multiplier"], rtol=1e-9)
    np.testing.assert_allclose(multipliers["wall_tp_hi"], multipliers["wall_multiplier"] * 1.1, rtol=1e-9)


@pytest.mark.parametrize("rounds, message", [
    ("100;x;120", r"column tokens_per_s_rounds has 'x' for round 2 in row 2 \(conv tiny\); allowed: positive"),
    ("100;120;-1", r"column tokens_per_s_rounds has '-1' for round 3 in row 2 \(conv tiny\); allowed: positive"),
    ("100;120", r"column tokens_per_s_rounds has 2 values in row 2 \(conv tiny\) and 3 in row 1; allowed: one "
                "value per round"),
])
def test_bad_rounds_name_the_file_the_column_and_the_row(tmp_path, rounds, message):
    path = write_table(tmp_path, [
        {"arch": "transformer", "size": "tiny", "tokens_per_s": 100.0, "tokens_per_s_rounds": "90;100;110"},
        {"arch": "conv", "size": "tiny", "tokens_per_s": 100.0, "tokens_per_s_rounds": rounds}])
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        load_throughput(tmp_path)
