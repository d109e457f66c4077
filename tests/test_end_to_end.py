"""A tiny sweep end to end on CPU through the sweep commands: plan, run, status, collect, rerun,
then fit and report on the collected table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from isoflop.cli import main

# 2 architectures x 2 budgets x 2 sizes of tiny models, ~20-100 steps each.
SWEEP = """
name: e2e
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
  transformer: {{baseline: true}}
  dynamic-qkv: {{overrides: {{conv: {{rank: 4}}}}}}
grid: {{kind: isoflop, budgets: [1.0e+9, 3.0e+9], sizes: [tiny, d64-l2]}}
train: {{batch_size: 2, seq_len: 32, lr: "0.004 * (params / 1e5) ** -0.25", eval_tokens: 512, device: cpu}}
executor: {{workers: 2}}
"""


def isoflop(*argv: str) -> int:
    """Run one subcommand through the real `isoflop` entry point."""
    return main([str(a) for a in argv])


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    import email.message
    import json as json_module
    import textwrap

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for module in (json_module, textwrap, os, email.message):
        (corpus / Path(module.__file__).name).write_text(Path(module.__file__).read_text())
    path = tmp_path / "e2e.yaml"
    path.write_text(SWEEP.format(corpus=corpus))
    return path


def test_plan_run_status_collect_fit_report(tmp_path, sweep_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders (runs/, results/) land in tmp_path
    monkeypatch.setenv("ISOFLOP_RUNS", str(tmp_path / "runs-from-env"))

    assert isoflop("plan", sweep_file, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_runs"] == 8 and plan["total_est_seconds"] > 0

    assert isoflop("run", sweep_file) == 0
    output = capsys.readouterr().out
    assert "8 runs to train" in output and "8 done" in output
    sweep_dir = tmp_path / "runs-from-env" / "e2e"  # ISOFLOP_RUNS is the default runs root
    run_ids = [r["run_id"] for r in plan["runs"]]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(run_ids)

    assert isoflop("run", sweep_file) == 0  # idempotent: nothing left to train
    assert "nothing to do: 8 of 8 runs of sweep e2e are finished" in capsys.readouterr().out

    assert isoflop("status", sweep_file, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {"done": 8}

    assert isoflop("collect", sweep_dir) == 0  # from the run folder's manifest alone
    results = tmp_path / "results" / "e2e"
    runs = pd.read_csv(results / "runs.csv")
    evals = pd.read_csv(results / "evals.csv")
    assert len(runs) == 8 and set(runs.state) == {"done"} and runs.final_val_loss.notna().all()
    assert set(evals.run_id) == set(runs.run_id) and len(evals) >= 2 * len(runs)
    # Compute matching held in the trained runs: each within half a step of its budget.
    half_step = runs.flops / runs.steps / 2
    assert ((runs.flops - runs.budget).abs() <= half_step).all()
    # Training did something: every run ends well below the loss of a uniform guess, ln(256).
    assert (runs.final_val_loss < 0.8 * 5.545).all()

    analysis = pytest.importorskip("isoflop.analysis.report")
    outcome = analysis.run_fit(results, n_boot=50)
    assert set(outcome.multipliers.arch) >= {"dynamic-qkv"}
    assert (results / "fits.json").exists() and (results / "multipliers.csv").exists()
    report = analysis.write_report(results, n_boot=50)
    assert report.exists() and "dynamic-qkv" in report.read_text()
    assert list((results / "plots").glob("*.png"))


def test_only_runs_the_selected_architecture(tmp_path, sweep_file, capsys):
    runs_dir = tmp_path / "runs"
    assert isoflop("run", sweep_file, "--only", "arch=transformer", "--only", "size=tiny",
                   "--runs-dir", runs_dir, "--workers", "1") == 0
    assert "2 runs to train" in capsys.readouterr().out
    assert isoflop("status", sweep_file, "--runs-dir", runs_dir, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {"done": 2, "not started": 6}
    done = {(r["arch"], r["size"]) for r in status["runs"] if r["state"] == "done"}
    assert done == {("transformer", "tiny")}
    # The manifest names the whole sweep, so collect from the run folder sees all 8 runs.
    assert isoflop("collect", runs_dir / "e2e", "--out", tmp_path / "out") == 0
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(table) == 8 and (table.state == "done").sum() == 2
    capsys.readouterr()
    assert isoflop("run", sweep_file, "--only", "size=d999-l9", "--runs-dir", runs_dir) == 2
    assert "matches none of the 8 runs" in capsys.readouterr().err


def test_a_bad_sweep_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(SWEEP.format(corpus="python-stdlib").replace("budgets: [1.0e+9", "budgets: [-1"))
    for command in ("plan", "run", "status", "collect"):
        assert isoflop(command, path) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {path}: grid.budgets[0] = -1") and error.count("\n") == 1


@pytest.mark.parametrize("command", ["fit", "report"])
def test_analysis_of_a_missing_results_folder_is_one_line(tmp_path, capsys, command):
    missing = tmp_path / "no-such-results"
    assert isoflop(command, missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1
