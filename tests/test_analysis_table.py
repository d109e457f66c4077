"""The tidy runs table: loading, contract validation with errors that name file, column and value."""

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.synthetic import simulate_evals, simulate_runs
from isoflop.analysis.table import (
    EVAL_COLUMNS,
    RUN_COLUMNS,
    TableError,
    baseline_arch,
    load_evals,
    load_runs,
    usable_runs,
    validate_runs,
)

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5}


@pytest.fixture
def runs() -> pd.DataFrame:
    return simulate_runs([1e15, 1e16], FACTORS, baseline="transformer")


def write(df: pd.DataFrame, directory) -> str:
    path = directory / "runs.csv"
    df.to_csv(path, index=False)
    return path


def test_round_trip_through_csv_keeps_types(runs, tmp_path):
    runs.loc[0, "run_id"] = "000000001234"  # all digits: must stay text, zeros kept
    runs.loc[1, "git_sha"] = "1234567"
    runs.loc[2, "budget"] = np.nan  # a ladder row
    write(runs, tmp_path)
    loaded = load_runs(tmp_path)  # the directory works as well as the file
    assert list(loaded.columns) == list(RUN_COLUMNS)
    assert loaded["run_id"].iloc[0] == "000000001234"
    assert loaded["git_sha"].iloc[1] == "1234567"
    assert loaded["is_baseline"].dtype == bool
    assert loaded["is_baseline"].sum() == (runs["arch"] == "transformer").sum()
    assert np.isnan(loaded["budget"].iloc[2])
    np.testing.assert_allclose(loaded["flops"], runs["flops"])
    pd.testing.assert_frame_equal(load_runs(tmp_path / "runs.csv"), loaded)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs.csv"):
        load_runs(tmp_path)


def test_missing_column_names_file_and_column(runs, tmp_path):
    path = write(runs.drop(columns=["flops"]), tmp_path)
    with pytest.raises(TableError, match=r"runs\.csv: missing column\(s\) flops;"):
        load_runs(path)


def test_bad_number_names_column_and_value(runs, tmp_path):
    runs["final_val_loss"] = runs["final_val_loss"].astype(object)
    runs.loc[3, "final_val_loss"] = "three"
    with pytest.raises(TableError, match=r"runs\.csv: column 'final_val_loss' holds 'three' in row 3"):
        load_runs(write(runs, tmp_path))


def test_bad_is_baseline_names_value_and_run(runs):
    runs["is_baseline"] = runs["is_baseline"].astype(object)
    runs.loc[0, "is_baseline"] = "maybe"
    expected = r"'is_baseline' holds 'maybe' for run '.+'; allowed: true or false"
    with pytest.raises(TableError, match=expected):
        validate_runs(runs)


def test_is_baseline_accepts_text_spellings(runs):
    runs["is_baseline"] = np.where(runs["arch"] == "transformer", "TRUE", "0")
    assert baseline_arch(validate_runs(runs)) == "transformer"


def test_duplicate_run_id_is_rejected(runs):
    runs.loc[1, "run_id"] = runs.loc[0, "run_id"]
    with pytest.raises(TableError, match="appears more than once"):
        validate_runs(runs)


def test_empty_arch_is_rejected(runs):
    runs.loc[4, "arch"] = " "
    with pytest.raises(TableError, match="column 'arch' is empty in row 4"):
        validate_runs(runs)


def test_arch_with_mixed_baseline_flags_is_rejected(runs):
    runs.loc[runs.index[runs["arch"] == "transformer"][0], "is_baseline"] = False
    with pytest.raises(TableError, match="arch 'transformer' has rows with is_baseline both"):
        validate_runs(runs)


def test_baseline_arch_needs_exactly_one(runs):
    assert baseline_arch(validate_runs(runs)) == "transformer"
    with pytest.raises(TableError, match="found none"):
        baseline_arch(validate_runs(runs.assign(is_baseline=False)))
    with pytest.raises(TableError, match="found dynamic-qkv, transformer"):
        baseline_arch(validate_runs(runs.assign(is_baseline=True)))


def test_usable_runs_keeps_done_runs_with_finite_loss_and_compute(runs):
    runs.loc[0, "state"] = "diverged"
    runs.loc[1, "final_val_loss"] = np.nan
    runs.loc[2, "final_val_loss"] = np.inf
    runs.loc[3, "state"] = "failed"
    runs.loc[4, "flops"] = 0.0
    usable = usable_runs(validate_runs(runs))
    assert sorted(usable.index) == list(range(5, len(runs)))


def test_evals_are_optional_and_validated(runs, tmp_path):
    assert load_evals(tmp_path) is None
    evals = simulate_evals(runs, FACTORS)
    evals.to_csv(tmp_path / "evals.csv", index=False)
    loaded = load_evals(tmp_path)
    assert len(loaded) == 8 * len(runs)
    evals.drop(columns=["val_loss"]).to_csv(tmp_path / "evals.csv", index=False)
    with pytest.raises(TableError, match=r"evals\.csv: missing column\(s\) val_loss"):
        load_evals(tmp_path)


def test_contract_matches_what_collect_writes():
    from isoflop.orchestrator.collect import EVALS_COLUMNS as collected_evals
    from isoflop.orchestrator.collect import RUNS_COLUMNS as collected_runs

    assert tuple(collected_runs) == RUN_COLUMNS
    assert tuple(collected_evals) == EVAL_COLUMNS
