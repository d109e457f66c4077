"""run_fit and write_report: files written from runs.csv alone, plots that exist and show something."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from rich.console import Console

from isoflop.analysis.multiplier import MULTIPLIER_COLUMNS, WALLCLOCK_COLUMNS
from isoflop.analysis.report import (
    _grid_edge_lines,
    format_multiplier_table,
    run_fit,
    write_report,
)
from isoflop.analysis.synthetic import simulate_evals, simulate_runs
from isoflop.analysis.table import TableError
from isoflop.cli import main

FACTORS = {"transformer": 1.0, "dynamic-qkv": 1.5, "static-qkv": 1.25}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).parent.parent / "results"


def ink_fraction(pixels: np.ndarray) -> float:
    """Share of pixels that are not (near) white."""
    return float(np.mean(np.any(pixels[..., :3] < 0.9, axis=-1)))


def distinct_colours(pixels: np.ndarray) -> int:
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint32)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


@pytest.fixture
def results(tmp_path):
    runs = simulate_runs([1e17, 1e18, 1e19], FACTORS, baseline="transformer", noise=0.002, seed=0,
                         sweep="quick")
    runs.loc[0, "state"] = "diverged"
    runs.loc[0, "final_val_loss"] = np.nan
    runs.loc[1, "git_sha"] = "abc1234"
    runs.to_csv(tmp_path / "runs.csv", index=False)
    return tmp_path


def test_run_fit_writes_fits_json_and_multipliers_csv(results):
    outcome = run_fit(results, at=[1e20], n_boot=200, seed=1)
    assert outcome.baseline == "transformer" and len(outcome.usable) == 35
    document = json.loads(outcome.fits_path.read_text())
    assert document["baseline"] == "transformer" and document["n_boot"] == 200 and document["seed"] == 1
    assert set(document["archs"]) == set(FACTORS)
    entry = document["archs"]["dynamic-qkv"]
    assert entry["with_E"] is False and entry["E"] == 0.0 and entry["n_points"] == 3
    assert entry["alpha"] == pytest.approx(outcome.fits["dynamic-qkv"].alpha)
    assert entry["bootstrap"]["alpha"]["p5"] < entry["alpha"] < entry["bootstrap"]["alpha"]["p95"]
    assert entry["n_boot_valid"] == 200
    written = pd.read_csv(outcome.multipliers_path)
    # The synthetic runs record their throughput, so the wall-clock columns come by default.
    assert list(written.columns) == list(MULTIPLIER_COLUMNS) + list(WALLCLOCK_COLUMNS)
    assert len(written) == 2 * 4  # two archs x (three grid budgets + one named)
    np.testing.assert_allclose(written["multiplier"], outcome.multipliers["multiplier"])
    assert written.loc[written["budget"] == 1e20, "extrapolated"].all()


def test_multiplier_table_prints_every_row(results):
    outcome = run_fit(results, n_boot=50)
    console = Console(record=True, width=120)
    console.print(format_multiplier_table(outcome.multipliers, outcome.baseline))
    text = console.export_text()
    assert "Compute multiplier M vs transformer" in text
    assert text.count("dynamic-qkv") == 3 and text.count("static-qkv") == 3
    assert "extrap." in text


def test_report_regenerates_everything_from_runs_csv(results):
    evals = simulate_evals(pd.read_csv(results / "runs.csv"), FACTORS)
    evals.to_csv(results / "evals.csv", index=False)
    path = write_report(results, n_boot=100)
    assert path == results / "report.md"
    text = path.read_text()
    assert "# Report: quick" in text
    assert "baseline: **transformer**" in text
    assert "runs: 36 (diverged: 1, done: 35); used in fits: 35" in text
    assert "| dynamic-qkv | 1e+18 |" in text
    assert "`abc1234`" in text and "`synthetic`" in text  # provenance from the table
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert links == [f"plots/{name}.png" for name in (
        "isoflop_curves", "frontier", "multiplier", "allocation", "residuals", "bootstrap",
        "holdout", "training_curves")]
    for link in links:
        image = results / link
        assert image.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(image)
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
        assert ink_fraction(pixels) > 0.02 and distinct_colours(pixels) > 20  # not a blank canvas
    assert (results / "fits.json").is_file() and (results / "multipliers.csv").is_file()
    # Regenerating from the same table gives the same report.
    assert write_report(results, n_boot=100).read_text() == text


def test_report_without_evals_has_no_training_curves(results):
    text = write_report(results, n_boot=20).read_text()
    assert "training_curves.png" not in text
    assert not (results / "plots" / "training_curves.png").exists()


def test_only_the_baseline_gives_an_empty_multiplier_table(tmp_path):
    runs = simulate_runs([1e17, 1e18, 1e19], {"transformer": 1.0}, baseline="transformer")
    runs.to_csv(tmp_path / "runs.csv", index=False)
    text = write_report(tmp_path, n_boot=20).read_text()
    assert "No architecture besides the baseline has a fit." in text
    assert (tmp_path / "plots" / "multiplier.png").stat().st_size > 0


def test_run_fit_wants_the_results_directory(results):
    with pytest.raises(NotADirectoryError, match="expected the results directory holding runs.csv"):
        run_fit(results / "runs.csv")


def test_a_baseline_without_finished_runs_is_a_clear_error(results):
    runs = pd.read_csv(results / "runs.csv")
    runs.loc[runs["arch"] == "transformer", "state"] = "failed"
    runs.to_csv(results / "runs.csv", index=False)
    expected = "cannot fit the baseline 'transformer' by frontier: it has no usable run"
    with pytest.raises(TableError, match=expected):
        run_fit(results, n_boot=10)


def test_fit_and_report_of_a_table_without_finished_runs_say_one_line(results, capsys):
    runs = pd.read_csv(results / "runs.csv")
    runs["state"] = "not started"
    runs.to_csv(results / "runs.csv", index=False)
    for command in ("fit", "report"):
        assert main([command, str(results)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {results}: no usable run (state 'done' with a finite final_val_loss)\n"



@pytest.mark.parametrize("option, value, message", [
    ("--n-boot", "0", "argument --n-boot: 0: allowed: a whole number >= 1"),
    ("--n-boot", "many", "argument --n-boot: 'many': expected a whole number >= 1"),
    ("--at", "1e21,big", "argument --at: --at '1e21,big': expected FLOP budgets like 1e18,3e19"),
    ("--at", "-5", "argument --at: --at '-5': budgets must be positive numbers"),
])
def test_bad_analysis_options_are_usage_errors(results, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", str(results), option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err

def approx_tree(value):
    """A parsed JSON value with every float wrapped in pytest.approx (relative 1e-6, absolute
    1e-12: an intercept E fitted to its bound 0 comes back as any value near 1e-17)."""
    if isinstance(value, dict):
        return {key: approx_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [approx_tree(item) for item in value]
    return pytest.approx(value, rel=1e-6, abs=1e-12) if isinstance(value, float) else value


NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")  # not inside a word or hash


def _last_digit(token: str) -> float:
    """One unit in the last digit a printed number shows: '4.332' -> 0.001, '9.738e+04' -> 10."""
    mantissa, _, exponent = token.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def assert_same_report(regenerated: str, committed: str) -> None:
    """The same words with the same numbers, each within one unit of its last printed digit or 1%.
    Fits near a bound (E at 0, A spanning decades) move in their 5th digit between CPUs'
    floating-point paths, and the Approach-3 surfaces' bootstrap replicates may then settle in
    another of their shallow minima: on 2026-12-03 one such percentile (A's 5th, dynamic-qkv,
    four budgets) read 4.73 against 4.749. multipliers.csv and fits.json are held to 1e-6."""
    assert NUMBER.split(regenerated) == NUMBER.split(committed)
    numbers = list(zip(NUMBER.findall(regenerated), NUMBER.findall(committed)))
    off = [(a, b) for a, b in numbers
           if a != b and abs(float(a) - float(b)) > max(1.001 * _last_digit(b), 0.01 * abs(float(b)))]
    assert not off, f"{len(off)} of {len(numbers)} numbers differ by more than their last digit or 1%: {off[:5]}"


def test_report_comparison_allows_a_last_digit_and_nothing_more():
    committed = "M 1.44x (1.40-1.56) at 2.5e+15; E 8.743e-17; corpus `a3e7393e26b2c20c`, d256-l4"
    assert_same_report(committed.replace("1.56", "1.57").replace("8.743e-17", "8.742e-17"), committed)
    for changed in (committed.replace("1.44x", "1.48x"), committed.replace("2.5e+15", "2.7e+15"),
                    committed.replace("at", "near"), committed.replace("3e7393", "3e7394"),
                    committed.replace("d256-l4", "d256-l6")):
        with pytest.raises(AssertionError):
            assert_same_report(changed, committed)


def copy_committed(folder: str, names: tuple[str, ...], into: Path) -> list[str]:
    """Copy those of `names` that results/<folder> holds into `into`; returns the names copied."""
    copied = [name for name in names if (RESULTS / folder / name).exists()]
    for name in copied:
        (into / name).write_bytes((RESULTS / folder / name).read_bytes())
    return copied


# Each committed H200 results folder, with lines its report must hold and how many budgets keep the
# expected order (transformer < static-qkv < dynamic-qkv < dynamic-all-linear).
COMMITTED_RESULTS = {
    "paper-small": (["runs: 48 (done: 48)", "- dynamic-qkv: smallest size (d128-l3) at 2.5e+14"], 3),
    "paper-small-centred": (["runs: 44 (done: 44)", "- transformer: largest size (d256-l4) at 2.5e+15"], 2),
    "paper-small-combined": (["runs: 84 (done: 84)", "# Report: paper-small, paper-small-centred",
                              "- dynamic-qkv: smallest size (d128-l2) at 2.5e+14"], 3),
    "paper-small-centred-seeds": (["runs: 88 (done: 88)", "as 44 cells: each cell's seeds averaged",
                                   "18 of 18 single-seed multipliers lie inside the pooled band."], 3),
    "paper-small-seeds": (["runs: 132 (done: 132)", "seeds 0, 1, 2", "| transformer | 11 | 3 | 1.78% |",
                           "26 of 27 single-seed multipliers lie inside the pooled band."], 3),
    # The held-out budget: the laws of paper-small-seeds, written into sweeps/paper-small-5e15.yaml
    # before its runs, miss the transformer's loss there.
    "paper-small-four-budgets": (["runs: 148 (done: 148)", "budgets 2.5e+14, 8e+14, 2.5e+15, 5e+15",
                                  "| transformer | 0.6597 (0.6414-0.6795) | 0.6906 (d256-l4) | -4.5% | no |",
                                  "| dynamic-qkv | 0.6627 (0.6597-0.6721) | 0.6599 (d192-l5, at the grid's edge)"],
                                 4),
    # Two more sizes where the four budgets' grid stopped short: one edge left, and every conv
    # variant's held-out loss inside its band.
    "paper-small-bracketed": (["runs: 172 (done: 172)", "as 76 cells", "| dynamic-all-linear | 12 | 3 |",
                               "- dynamic-all-linear: smallest size (d128-l2) at 2.5e+14\n\n## Against",
                               "| dynamic-all-linear | 0.6474 (0.6436-0.6554) | 0.6463 (d192-l5) | +0.2% | yes |"],
                              4),
    # Seeds at 5e15 and one size below 2.5e14: the grid check passes, every conv variant's
    # held-out loss inside its band.
    "paper-small-full": (["runs: 200 (done: 200)", "as 80 cells",
                          "| static-qkv | 15 | 3 | 0.60% | 3.97% (d128-l1 at 2.5e+14) |",
                          "every frontier point is bracketed by a smaller and a larger size",
                          "| 0.6723 (d192-l5) | -0.8% | yes |"],
                         4),
}


@pytest.mark.parametrize("folder", sorted(COMMITTED_RESULTS))
def test_the_committed_results_regenerate_from_their_tables(tmp_path, folder):
    """results/<folder> (sweeps run on the H200): fits, multipliers and report come back from
    runs.csv, evals.csv, throughput.csv (where measured) and reference.yaml alone, and hold the paper's comparison.
    The report comes back word for word, each number within its last printed digit or 1%; the
    full-precision floats of multipliers.csv and fits.json to 1e-6 relative. The fits' last bits
    follow the CPU's floating-point paths, and fits with E at its bound (four budgets) or
    bootstrap replicates far out in A amplify them: one AMD machine's 16th digit is another's 5th
    digit there (2026-12-03: fits.json 1e-8 relative, E 8.743e-17 against 8.742e-17)."""
    committed = RESULTS / folder
    copied = copy_committed(folder, ("runs.csv", "evals.csv", "throughput.csv", "reference.yaml"),
                            tmp_path)
    report = write_report(tmp_path).read_text()
    assert_same_report(report, (committed / "report.md").read_text())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "multipliers.csv"),
                                  pd.read_csv(committed / "multipliers.csv"), check_exact=False, rtol=1e-6)
    regenerated = json.loads((tmp_path / "fits.json").read_text())
    assert regenerated == approx_tree(json.loads((committed / "fits.json").read_text()))
    lines, in_order = COMMITTED_RESULTS[folder]
    for line in lines:
        assert line in report
    assert "device: `NVIDIA H200`" in report and "## Grid check" in report
    assert report.count("matches the expected order") == in_order
    alone = "throughput of each (architecture, size) trained alone (throughput.csv" in report
    assert alone == ("throughput.csv" in copied)  # without one, the runs' own (the report says so)


@pytest.mark.parametrize("flag, wall_columns", [(None, True), ("--no-wallclock", False)])
def test_fit_writes_the_multipliers_report_writes(tmp_path, flag, wall_columns):
    """`isoflop fit` on a committed folder with a throughput table writes its multipliers.csv as
    `report` did, wall-clock columns included, so fitting a committed folder does not strip them;
    --no-wallclock leaves them out."""
    committed = RESULTS / "paper-small-centred"
    copy_committed("paper-small-centred", ("runs.csv", "throughput.csv"), tmp_path)
    assert main(["fit", str(tmp_path), *([flag] if flag else [])]) == 0
    written = pd.read_csv(tmp_path / "multipliers.csv")
    expected = pd.read_csv(committed / "multipliers.csv")
    if not wall_columns:
        expected = expected[[c for c in expected.columns if not c.startswith("wall_")]]
    assert ("wall_multiplier" in written.columns) == wall_columns
    pd.testing.assert_frame_equal(written, expected, check_exact=False, rtol=1e-6)


def _cells(losses_by_budget: dict[float, list[float]]) -> pd.DataFrame:
    """One architecture's runs: each budget's sizes (params 1, 2, ...) with the given losses."""
    rows = [{"arch": "a", "budget": budget, "size": f"s{i}", "params": i + 1, "final_val_loss": loss}
            for budget, losses in losses_by_budget.items() for i, loss in enumerate(losses)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("losses, expected", [
    ({1e15: [0.9, 0.8, 0.85], 2e15: [0.8, 0.7, 0.75]}, "every frontier point is bracketed"),
    ({1e15: [0.9, 0.8, 0.85], 2e15: [0.8, 0.7]}, "In the 1 of 2 (architecture, budget) pairs"),
    ({1e15: [0.9, 0.8], 2e15: [0.8, 0.7]}, "No budget ran 3 sizes or more"),
    ({1e15: [0.9, 0.8, 0.85], 2e15: [0.8, 0.75, 0.7]}, "- a: largest size (s2) at 2e+15"),
    ({float("nan"): [0.9, 0.8, 0.85]}, None),  # a ladder: no budgets, no section
])
def test_the_grid_check_says_what_it_found_and_what_it_could_not_check(losses, expected):
    """A passed check is written out, as is one the grid is too small to make; an edge is named."""
    text = "\n".join(_grid_edge_lines(_cells(losses)))
    if expected is None:
        assert text == ""
    else:
        assert text.startswith("## Grid check") and expected in text
