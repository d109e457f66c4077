"""reference.yaml: published figures checked against the table, and the report section that holds a
sweep against them (verdicts, ordering, fitted range), on synthetic sweeps with a known truth."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from isoflop.analysis.reference import (
    ReferenceFileError,
    band_verdict,
    observed_order,
    parse_reference,
    published_inside_band,
    swapped_pairs,
)
from isoflop.analysis.report import write_report
from isoflop.analysis.synthetic import simulate_runs
from isoflop.analysis.table import TableError
from isoflop.cli import main

# True multipliers: dynamic-qkv is the best, so an expected order putting dynamic-all-linear on
# top is swapped; the published 1.5 is the truth (inside the band), the published 1.2 is not.
FACTORS = {"transformer": 1.0, "static-qkv": 1.2, "dynamic-all-linear": 1.5, "dynamic-qkv": 2.0}
ARCHS = sorted(FACTORS)
REFERENCE = {
    "source": "a paper, Table 2",
    "baseline": "transformer",
    "multipliers": {"dynamic-all-linear": 1.5, "dynamic-qkv": 1.2},
    "ordering": ["transformer", "static-qkv", "dynamic-qkv", "dynamic-all-linear"],
    "note": "their models are larger",
}
PATH = Path("results/x/reference.yaml")


@pytest.fixture
def results(tmp_path):
    runs = simulate_runs(list(np.logspace(17, 19.5, 6)), FACTORS, baseline="transformer",
                         noise=0.001, seed=0, sweep="ref", slowdowns={"dynamic-qkv": 1.25})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    return tmp_path


def write_reference(results: Path, **changes) -> None:
    (results / "reference.yaml").write_text(yaml.safe_dump({**REFERENCE, **changes}))


def section(text: str) -> str:
    start = text.index("## Against the published figures")
    return text[start:text.index("\n## ", start + 1)]


# -- validation ------------------------------------------------------------------------------------


def parse(**changes):
    document = {k: v for k, v in {**REFERENCE, **changes}.items() if v is not None}
    return parse_reference(document, PATH, ARCHS, "transformer")


def test_a_valid_reference_reads_as_given():
    reference = parse(ordering=None, note=None)
    assert reference.multipliers == {"dynamic-all-linear": 1.5, "dynamic-qkv": 1.2}
    assert reference.ordering == () and reference.note == "" and reference.source == "a paper, Table 2"


@pytest.mark.parametrize("changes, key, allowed", [
    ({"table": 3}, "table", "source, baseline, multipliers, ordering, note"),
    ({"source": None}, "source", "text saying where the figures come from"),
    ({"source": 2024}, "source", "a string"),
    ({"baseline": "static-qkv"}, "baseline", "transformer"),
    ({"multipliers": {"dynamic-qkv": "1.33x"}}, "multipliers.dynamic-qkv", "a number > 0"),
    ({"multipliers": {"dynamic-qkv": 0}}, "multipliers.dynamic-qkv", "a number > 0"),
    ({"multipliers": {"dynamic-qkv": True}}, "multipliers.dynamic-qkv", "a number > 0"),
    ({"multipliers": {"mamba": 1.3}}, "multipliers.mamba", ", ".join(ARCHS)),
    ({"multipliers": {"transformer": 1.0}}, "multipliers.transformer", "other than transformer"),
    ({"multipliers": []}, "multipliers", "a mapping of architectures"),
    ({"ordering": "transformer < dynamic-qkv"}, "ordering", "a list of architectures"),
    ({"ordering": ["transformer", "mamba"]}, "ordering[1]", ", ".join(ARCHS)),
    ({"ordering": ["transformer", "transformer"]}, "ordering[1]", "each architecture once"),
])
def test_each_error_names_the_file_the_key_and_what_is_allowed(changes, key, allowed):
    with pytest.raises(ReferenceFileError) as error:
        parse(**changes)
    message = str(error.value)
    assert message.startswith(f"{PATH}: {key}") and "allowed: " in message
    assert allowed in message.split("allowed: ")[1]
    assert "= None" not in message  # a missing key shows no value


def test_a_bad_reference_is_one_line_from_the_cli_before_any_fit(results, capsys):
    (results / "reference.yaml").write_text("source: x\nbaseline: transformer\nmultipliers: {moe: 2}\n")
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {results / 'reference.yaml'}: multipliers.moe = 'moe'")
    assert err.count("\n") == 1
    assert not (results / "fits.json").exists()  # refused before the bootstrap
    (results / "reference.yaml").write_text("source: [unclosed\n")
    with pytest.raises(TableError, match="cannot be read as YAML"):
        write_report(results, n_boot=10)


# -- comparing --------------------------------------------------------------------------------------


def table(rows):
    return pd.DataFrame(rows, columns=["arch", "budget", "multiplier", "lo", "hi", "extrapolated"])


def test_verdicts_orders_and_swaps_on_a_hand_made_table():
    multipliers = table([
        ("a", 1e18, 1.30, 1.20, 1.40, False), ("a", 1e19, 1.50, 1.45, 1.55, True),
        ("b", 1e18, 1.25, 1.10, 1.35, False), ("b", 1e19, 1.60, 1.56, 1.70, True),
        ("c", 1e18, 0.95, 0.90, 1.02, False), ("c", 1e19, np.nan, np.nan, np.nan, True),
    ])
    assert published_inside_band(multipliers, "a", 1.33) == {1e18: True, 1e19: False}
    assert published_inside_band(multipliers, "c", 1.0) == {1e18: True}  # no band at 1e19
    assert band_verdict(published_inside_band(multipliers, "a", 1.33)) == "yes at 1e+18; no at 1e+19"
    assert band_verdict(published_inside_band(multipliers, "b", 1.65)) == "yes at 1e+19; no at 1e+18"
    assert band_verdict(published_inside_band(multipliers, "c", 2.0)) == "no"
    assert band_verdict(published_inside_band(multipliers, "b", 1.3)) == "yes at 1e+18; no at 1e+19"
    assert band_verdict({}) == "no band"
    order = observed_order(multipliers, "base", 1e18)
    assert [p.arch for p in order] == ["c", "base", "b", "a"]
    swaps = swapped_pairs(order, ("base", "c", "a", "b"))
    assert [(a.arch, b.arch) for a, b in swaps] == [("base", "c"), ("a", "b")]
    assert all(a.overlaps(b) for a, b in swaps)  # c's band holds 1; a's and b's bands meet
    order = observed_order(multipliers, "base", 1e19)
    assert [p.arch for p in order] == ["base", "a", "b"]  # c undetermined there
    assert swapped_pairs(order, ("base", "c", "a", "b")) == []
    swaps = swapped_pairs(order, ("b", "a"))
    assert [(a.arch, b.arch, a.overlaps(b)) for a, b in swaps] == [("b", "a", False)]


def test_report_holds_the_sweep_against_the_published_figures(results):
    write_reference(results)
    text = write_report(results, n_boot=100, at=[1e22]).read_text()
    ours = section(text)
    assert text.index("## Compute multipliers") < text.index("## Against the published figures") \
        < text.index("## Do the exponents differ?")
    assert "Source: a paper, Table 2" in ours and "Note: their models are larger" in ours
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in ours.splitlines()
            if line.startswith("| ") and "architecture" not in line}
    assert set(rows) == {"dynamic-all-linear", "dynamic-qkv", "static-qkv"}
    assert rows["dynamic-all-linear"][2:] == ["1.50x", "yes |"]  # the truth, at every budget
    assert rows["dynamic-qkv"][2:] == ["1.20x", "no |"]  # the truth is 2.0
    assert rows["static-qkv"][2:] == ["not given", "- |"]
    assert "Expected order, worst to best: transformer < static-qkv < dynamic-qkv < " \
           "dynamic-all-linear." in ours
    mid = next(line for line in ours.splitlines() if line.startswith("- 1e+18: transformer"))
    assert mid.index("static-qkv") < mid.index("dynamic-all-linear") < mid.index("dynamic-qkv")
    assert mid.endswith("does not match; swapped: dynamic-qkv above dynamic-all-linear, expected "
                        "below (bands apart)")
    assert "- 1e+18: inside the fitted range for every architecture" in ours
    assert "- 1e+22: outside the fitted range (extrapolated) for every architecture" in ours
    # Regenerating from the same table and reference gives the same report.
    assert write_report(results, n_boot=100, at=[1e22]).read_text() == text


def test_a_matching_order_says_so(results):
    write_reference(results, ordering=["transformer", "static-qkv", "dynamic-all-linear",
                                       "dynamic-qkv"])
    ours = section(write_report(results, n_boot=30).read_text())
    orders = [line for line in ours.splitlines() if line.startswith("- ") and "<" in line]
    assert len(orders) == 6 and all(line.endswith(": matches the expected order") for line in orders)


def test_no_reference_file_no_section(results):
    text = write_report(results, n_boot=30).read_text()
    assert "Against the published figures" not in text
    assert "## Compute multipliers" in text and "## Do the exponents differ?" in text


# -- wall-clock multipliers -------------------------------------------------------------------------


def test_wallclock_multipliers_come_by_themselves_when_every_arch_has_a_throughput(results):
    text = write_report(results, n_boot=30).read_text()
    assert "wall-clock M (interval)" in text
    assert "compute multiplier divided by the architecture's cost per FLOP" in text
    assert "contention" in text
    # dynamic-qkv runs 1.25x slower per FLOP: its wall-clock M is its M / 1.25.
    assert "dynamic-qkv: 1.25 at 1e+17" in text and "static-qkv: 1.00 at 1e+17" in text
    written = pd.read_csv(results / "multipliers.csv")
    qkv = written[written["arch"] == "dynamic-qkv"]
    np.testing.assert_allclose(qkv["wall_multiplier"], qkv["multiplier"] / 1.25, rtol=1e-6)


def test_wallclock_needs_the_flag_when_an_arch_has_no_throughput(results):
    runs = pd.read_csv(results / "runs.csv")
    runs.loc[runs["arch"] == "static-qkv", "tokens_per_s"] = np.nan
    runs.to_csv(results / "runs.csv", index=False)
    assert "wall-clock M" not in write_report(results, n_boot=20).read_text()
    text = write_report(results, n_boot=20, wallclock=True).read_text()
    assert "wall-clock M (interval)" in text and "static-qkv: not measured" in text
    written = pd.read_csv(results / "multipliers.csv")
    assert written.loc[written["arch"] == "static-qkv", "wall_multiplier"].isna().all()
    assert written.loc[written["arch"] == "dynamic-qkv", "wall_multiplier"].notna().all()
