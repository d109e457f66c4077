"""isoflop merge: several results folders as one table, copied cell for cell, first folder wins."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from isoflop.analysis.merge import merge_results
from isoflop.analysis.report import write_report
from isoflop.analysis.table import TableError, load_runs
from isoflop.cli import main

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5}
RESULTS = Path(__file__).parent.parent / "results"


def simulated(folder: Path, sweep: str, seed: int, grid_centre: float) -> pd.DataFrame:
    from isoflop.analysis.synthetic import simulate_evals, simulate_runs

    runs = simulate_runs([1e17, 1e18, 1e19], FACTORS, baseline="transformer", noise=0.002, seed=seed,
                         sweep=sweep, grid_centre=grid_centre)
    folder.mkdir()
    runs.to_csv(folder / "runs.csv", index=False)
    simulate_evals(runs, FACTORS).to_csv(folder / "evals.csv", index=False)
    return runs


def throughput(folder: Path, sizes: list[str], tokens_per_s: float, rounds: bool) -> None:
    rows = [{"arch": arch, "size": size, "tokens_per_s": tokens_per_s}
            | ({"tokens_per_s_rounds": f"{tokens_per_s};{tokens_per_s}"} if rounds else {})
            for arch in FACTORS for size in sizes]
    pd.DataFrame(rows).to_csv(folder / "throughput.csv", index=False)


@pytest.fixture
def two_sweeps(tmp_path):
    """Sweep a, and a follow-up b with other sizes that also trained two of a's runs again."""
    a = simulated(tmp_path / "a", "a", seed=0, grid_centre=1.0)
    b = simulated(tmp_path / "b", "b", seed=1, grid_centre=0.25)
    repeated = a.iloc[:2].assign(sweep="b", final_val_loss=a["final_val_loss"].iloc[:2] + 0.01)
    pd.concat([b, repeated]).to_csv(tmp_path / "b" / "runs.csv", index=False)
    throughput(tmp_path / "a", ["s0", "s1"], 1000.0, rounds=True)
    throughput(tmp_path / "b", ["s1", "s9"], 2000.0, rounds=False)
    (tmp_path / "a" / "reference.yaml").write_text(
        "source: a paper\nbaseline: transformer\nmultipliers: {dynamic-qkv: 1.33}\n")
    return tmp_path, a, b


def test_merge_copies_every_row_once_and_the_first_folder_wins(two_sweeps):
    root, a, b = two_sweeps
    merged = merge_results([root / "a", root / "b"], root / "ab")
    out = root / "ab"
    lines_a = (root / "a" / "runs.csv").read_text().splitlines()
    lines_b = (root / "b" / "runs.csv").read_text().splitlines()
    lines = (out / "runs.csv").read_text().splitlines()
    # a's table first, then b's rows that a does not hold, each line exactly as it was.
    assert lines[: len(lines_a)] == lines_a
    assert lines[len(lines_a):] == lines_b[1: 1 + len(b)]
    assert merged.runs == len(a) + len(b) == len(load_runs(out))
    assert [d["run_id"] for d in merged.duplicates] == list(a["run_id"].iloc[:2])
    assert merged.duplicates[0]["kept_from"] == str(root / "a")
    assert float(merged.duplicates[0]["final_val_loss_dropped"]) == pytest.approx(
        a["final_val_loss"].iloc[0] + 0.01)

    evals = pd.read_csv(out / "evals.csv")
    evals_a = pd.read_csv(root / "a" / "evals.csv")
    assert set(evals["run_id"]) == set(a["run_id"]) | set(b["run_id"])
    repeated = a["run_id"].iloc[0]
    pd.testing.assert_frame_equal(evals[evals.run_id == repeated].reset_index(drop=True),
                                  evals_a[evals_a.run_id == repeated].reset_index(drop=True))

    speed = pd.read_csv(out / "throughput.csv")
    assert list(speed.columns) == ["arch", "size", "tokens_per_s"]  # rounds: only a has them
    assert speed.set_index(["arch", "size"])["tokens_per_s"].to_dict() == {
        (arch, size): (2000.0 if size == "s9" else 1000.0) for arch in FACTORS for size in ("s0", "s1", "s9")}
    assert (out / "reference.yaml").read_text() == (root / "a" / "reference.yaml").read_text()

    record = json.loads((out / "merge.json").read_text())
    assert [s["runs_taken"] for s in record["sources"]] == [len(a), len(b)]
    assert set(record["sources"][0]["sha256"]) == {"runs.csv", "evals.csv", "throughput.csv"}
    assert len(record["duplicates_dropped"]) == 2
    assert "Report: a, b" in write_report(out, n_boot=20).read_text()


def test_the_order_of_the_folders_decides_which_copy_stays(two_sweeps):
    root, a, _ = two_sweeps
    merged = merge_results([root / "b", root / "a"], root / "ba")
    runs = load_runs(root / "ba").set_index("run_id")
    assert runs.loc[a["run_id"].iloc[0], "final_val_loss"] == pytest.approx(a["final_val_loss"].iloc[0] + 0.01)
    assert {d["kept_from"] for d in merged.duplicates} == {str(root / "b")}
    assert merged.reference_from == root / "a" / "reference.yaml"  # b has none


def test_tables_of_other_corpora_or_baselines_do_not_merge(two_sweeps):
    root, _, b = two_sweeps
    b.assign(corpus_fingerprint="other").to_csv(root / "b" / "runs.csv", index=False)
    with pytest.raises(TableError, match=r"b: corpus_fingerprint 'other' differs from .*a's 'synthetic'"):
        merge_results([root / "a", root / "b"], root / "ab")
    b.assign(is_baseline=b["arch"] == "dynamic-qkv").to_csv(root / "b" / "runs.csv", index=False)
    with pytest.raises(TableError, match="baseline 'dynamic-qkv' differs from .*'transformer'"):
        merge_results([root / "a", root / "b"], root / "ab")
    assert not (root / "ab").exists()


@pytest.mark.parametrize("sources, out, message", [
    (["a"], "ab", "merge needs at least two results folders"),
    (["a", "b"], "a", "--out .*a is also a source"),
    (["a", "a"], "ab", "a results folder is named twice"),
    (["a", "missing"], "ab", r"missing: no runs.csv \(write it with `isoflop collect`\)"),
])
def test_bad_merges_are_one_line_errors(two_sweeps, capsys, sources, out, message):
    root, _, _ = two_sweeps
    assert main(["merge", *(str(root / s) for s in sources), "--out", str(root / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_the_command_prints_the_duplicates_and_their_losses(two_sweeps, capsys):
    root, a, _ = two_sweeps
    assert main(["merge", str(root / "a"), str(root / "b"), "--out", str(root / "ab")]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) appear in several sources; kept from the first:" in out
    assert f"{a['run_id'].iloc[0]} transformer s0 1e+17: final_val_loss" in out
    assert f"copied {root / 'a' / 'reference.yaml'}" in out


# Each committed merge: its sources, and how many run ids they share (trained in both).
COMMITTED_MERGES = {
    "paper-small-combined": (("paper-small", "paper-small-centred"), 8),
    "paper-small-seeds": (("paper-small-centred", "paper-small-centred-seeds"), 0),
    "paper-small-four-budgets": (("paper-small-seeds", "paper-small-5e15"), 0),
    "paper-small-bracketed": (("paper-small-seeds", "paper-small-5e15", "paper-small-edges",
                               "paper-small-edges-seeds"), 0),
    "paper-small-full": (("paper-small-seeds", "paper-small-5e15", "paper-small-edges",
                          "paper-small-edges-seeds", "paper-small-5e15-seeds", "paper-small-below"), 0),
}


@pytest.mark.parametrize("folder", sorted(COMMITTED_MERGES))
def test_the_committed_merged_tables_are_the_merge_of_their_sweeps(tmp_path, folder):
    """results/<folder> holds exactly what `isoflop merge` makes of its committed sources' tables
    (its reference.yaml is its own)."""
    sources, n_duplicates = COMMITTED_MERGES[folder]
    merge_results([RESULTS / source for source in sources], tmp_path / "out")
    for name in ("runs.csv", "evals.csv", "throughput.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (RESULTS / folder / name).read_bytes()
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert len(record["duplicates_dropped"]) == n_duplicates


def test_a_table_no_source_has_is_not_left_behind_by_an_earlier_merge(two_sweeps):
    root, _, _ = two_sweeps
    merge_results([root / "a", root / "b"], root / "ab")
    for folder in ("a", "b"):
        (root / folder / "throughput.csv").unlink()
    merge_results([root / "a", root / "b"], root / "ab")
    assert not (root / "ab" / "throughput.csv").exists() and (root / "ab" / "evals.csv").exists()

