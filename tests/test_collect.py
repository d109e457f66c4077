"""Collect: run directories -> runs.csv and evals.csv with exactly the tidy contract's columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from isoflop.orchestrator.collect import EVALS_COLUMNS, RUNS_COLUMNS, collect
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.layout import read_manifest, write_manifest
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.spec import load_sweep
from isoflop.orchestrator.status import INTERRUPTED, NOT_STARTED, run_states, state_counts, status_table

SWEEP = """
name: collect-test
data: {corpus: python-stdlib, tokenizer: bytes}
architectures:
  transformer: {baseline: true}
  dynamic-qkv: {}
grid: {kind: isoflop, budgets: [1.0e+11], sizes: [tiny, d64-l2]}
train: {batch_size: 4, seq_len: 32, lr: 0.002}
"""

# The tidy contract (runs.csv and evals.csv), in order.
CONTRACT_RUNS = (
    "run_id sweep arch is_baseline size d_model n_layers n_heads d_ff params params_non_embedding "
    "seq_len batch_size tokens steps budget flops flops_6n flops_6n_total final_val_loss "
    "final_train_loss lr seed state wall_s tokens_per_s device corpus_fingerprint git_sha isoflop_version "
    "task difficulty difficulty_rank accuracy torch_version triton_version"
).split()
CONTRACT_EVALS = "run_id arch size step tokens flops train_loss val_loss lr tokens_per_s elapsed_s".split()


def finish(rundir: RunDir, run, val_losses: list[float]) -> None:
    """Write what the trainer writes for a finished run: metrics lines, result, status done."""
    rundir.create()
    rundir.write_spec(run.spec.to_dict())
    rundir.write_status("running")
    per_step = run.spec.train.tokens_per_step
    steps = [run.steps * (i + 1) // len(val_losses) for i in range(len(val_losses))]
    for step, loss in zip(steps, val_losses):
        rundir.append_metrics({
            "step": step, "tokens": step * per_step, "flops": run.flops_per_token * step * per_step,
            "train_loss": loss + 0.1, "val_loss": loss, "lr": 0.002, "tokens_per_s": 5000.0,
            "elapsed_s": step / 10,
        })
    rundir.write_result({
        "state": "done", "final_train_loss": val_losses[-1] + 0.1, "final_val_loss": val_losses[-1],
        "steps": run.steps, "tokens": run.tokens,
        "flops_per_token": {"forward": run.flops_per_token // 3, "train": run.flops_per_token,
                            "six_n": 6 * run.params_non_embedding, "six_n_total": 6 * run.params},
        "total_flops": run.flops, "wall_time_s": 12.5, "train_time_s": 11.0, "tokens_per_s": 5500.0,
        "provenance": {"device": "cpu", "device_name": "Test CPU", "corpus_fingerprint": "abc123",
                       "git_sha": "deadbeef", "isoflop_version": "0.1.0"},
    })
    rundir.write_status("done", step=run.steps)


@pytest.fixture
def sweep_runs(tmp_path: Path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    sweep = load_sweep(path)
    runs = expand(sweep)
    directory = tmp_path / "runs" / sweep.name
    finish(RunDir(directory / runs[0].run_id), runs[0], [3.0, 2.5, 2.2])
    finish(RunDir(directory / runs[1].run_id), runs[1], [3.1, 2.4])
    failed = RunDir(directory / runs[2].run_id).create()
    failed.write_spec(runs[2].spec.to_dict())
    failed.write_status("running")
    failed.write_status("failed", error="RuntimeError: boom")
    interrupted = RunDir(directory / runs[3].run_id).create()
    interrupted.write_status("running", step=3)  # no live worker holds its lock
    return sweep, runs, directory


def test_columns_are_the_contract():
    assert list(RUNS_COLUMNS) == CONTRACT_RUNS
    assert list(EVALS_COLUMNS) == CONTRACT_EVALS


def test_runs_csv_has_one_row_per_run_with_labels_and_results(tmp_path, sweep_runs):
    sweep, runs, directory = sweep_runs
    runs_path, evals_path = collect(sweep.name, [r.labels() for r in runs], directory, tmp_path / "out")
    table = pd.read_csv(runs_path)
    assert list(table.columns) == CONTRACT_RUNS
    assert list(table.run_id) == [r.run_id for r in runs]
    assert table.is_baseline.dtype == bool and list(table.is_baseline) == [r.is_baseline for r in runs]
    assert list(table.state) == ["done", "done", "failed", INTERRUPTED]

    done = table.iloc[0]
    run = runs[0]
    assert (done.sweep, done.arch, done["size"]) == ("collect-test", "transformer", "tiny")
    model = run.spec.model
    assert (done.d_model, done.n_layers, done.params) == (model.d_model, model.n_layers, run.params)
    assert done.tokens == run.tokens and done.steps == run.steps and done.budget == 1e11
    assert done.flops == pytest.approx(run.flops)
    assert done.flops_6n == pytest.approx(6 * run.params_non_embedding * run.tokens)
    assert done.flops_6n_total == pytest.approx(6 * run.params * run.tokens)
    assert done.final_val_loss == 2.2 and done.final_train_loss == pytest.approx(2.3)
    assert (done.wall_s, done.tokens_per_s, done.device) == (12.5, 5500.0, "Test CPU")
    provenance = (done.corpus_fingerprint, done.git_sha, str(done.isoflop_version))
    assert provenance == ("abc123", "deadbeef", "0.1.0")
    assert done.lr == 0.002 and done.seed == 0

    unfinished = table.iloc[2]
    assert math.isnan(unfinished.final_val_loss) and math.isnan(unfinished.wall_s)
    assert unfinished.tokens == runs[2].tokens  # the plan's numbers until the run reports its own
    usable = table[(table.state == "done") & table.final_val_loss.notna()]
    assert len(usable) == 2


def test_evals_csv_has_one_row_per_metrics_line(tmp_path, sweep_runs):
    sweep, runs, directory = sweep_runs
    _, evals_path = collect(sweep.name, [r.labels() for r in runs], directory, tmp_path / "out")
    evals = pd.read_csv(evals_path)
    assert list(evals.columns) == CONTRACT_EVALS
    assert len(evals) == 3 + 2
    first = evals[evals.run_id == runs[0].run_id]
    assert list(first.val_loss) == [3.0, 2.5, 2.2]
    assert list(first.step) == sorted(first.step) and first.step.iloc[-1] == runs[0].steps
    assert set(first.arch) == {"transformer"} and set(first["size"]) == {"tiny"}


def test_ladder_budget_is_empty_in_the_table(tmp_path):
    path = tmp_path / "ladder.yaml"
    path.write_text(SWEEP.replace("{kind: isoflop, budgets: [1.0e+11], sizes: [tiny, d64-l2]}",
                                  "{kind: ladder, sizes: [tiny], tokens_per_param: 5}"))
    sweep = load_sweep(path)
    runs = expand(sweep)
    write_manifest(tmp_path / "runs", sweep.name, str(path), runs)
    name, entries = read_manifest(tmp_path / "runs")
    assert name == sweep.name and math.isnan(entries[0]["budget"])
    runs_path, _ = collect(name, entries, tmp_path / "runs", tmp_path / "out")
    table = pd.read_csv(runs_path)
    assert table.budget.isna().all() and set(table.state) == {NOT_STARTED}


def test_manifest_round_trip_gives_the_same_tables(tmp_path, sweep_runs):
    sweep, runs, directory = sweep_runs
    write_manifest(directory, sweep.name, str(sweep.path), runs)
    name, entries = read_manifest(directory)
    from_manifest, _ = collect(name, entries, directory, tmp_path / "a")
    from_sweep, _ = collect(sweep.name, [r.labels() for r in runs], directory, tmp_path / "b")
    assert from_manifest.read_text() == from_sweep.read_text()


def test_status_counts_states_and_renders(sweep_runs):
    sweep, runs, directory = sweep_runs
    rows = run_states([r.labels() for r in runs], directory)
    assert state_counts(rows) == {"done": 2, "failed": 1, INTERRUPTED: 1}
    assert rows[2]["error"] == "RuntimeError: boom"
    assert rows[0]["final_val_loss"] == 2.2 and rows[0]["step"] == runs[0].steps
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(status_table(sweep.name, rows))
    text = console.export_text()
    assert "4 runs (2 done, 1 failed, 1 interrupted)" in text and "boom" in text


def test_status_and_plan_show_the_seed_where_a_sweep_has_several(tmp_path):
    """A cell's runs differ only by seed: without a seed column their rows would look alike."""
    from rich.console import Console

    from isoflop.orchestrator.plan import make_plan, plan_table
    from isoflop.orchestrator.estimate import PROFILES

    def rendered(table) -> list[str]:
        console = Console(record=True, width=250)
        console.print(table)
        return console.export_text().splitlines()

    for seeds, expected in (("[0]", None), ("[3, 7]", ["3", "7"])):
        path = tmp_path / f"sweep{len(seeds)}.yaml"
        path.write_text(SWEEP + f"seeds: {seeds}\n")
        sweep = load_sweep(path)
        runs = expand(sweep)
        rows = run_states([r.labels() for r in runs], tmp_path / "runs" / sweep.name)
        plan = make_plan(sweep, runs, PROFILES["cpu"], train_tokens=None)
        for lines in (rendered(status_table(sweep.name, rows)), rendered(plan_table(plan))):
            header = next(line for line in lines if "arch" in line and "size" in line)
            if expected is None:
                assert "seed" not in header
                continue
            assert "seed" in header
            column = header.index("seed")
            tiny = [line for line in lines if "transformer" in line and "tiny" in line]
            assert sorted(line[column:column + 4].strip() for line in tiny) == expected


BRANCHED = SWEEP.replace("budgets: [1.0e+11], sizes: [tiny, d64-l2]}",
                         "budgets: [1.0e+11, 2.0e+11, 3.0e+11], sizes: [tiny], cooldowns: true}"
                         ).replace("lr: 0.002}", "lr: 0.002, schedule: wsd, warmup_fraction: 0.05}")


def finish_with_branches(rundir: RunDir, run, branch_losses: list[float]) -> list[dict]:
    """A finished run of `run` whose result.json records its cooldown branches, as the trainer does."""
    finish(rundir, run, [3.0, 2.0])
    result = rundir.read_result()
    records = [
        {"tokens": tokens, "steps": tokens // run.spec.train.tokens_per_step,
         "flops": run.flops_per_token * tokens, "branch_flops": 0.2 * run.flops_per_token * tokens,
         "final_val_loss": loss, "final_train_loss": loss + 0.05, "lr": 2e-5,
         "train_time_s": 0.5 + i, "tokens_per_s": 4000.0 + i}
        for i, ((tokens, _), loss) in enumerate(zip(run.branches, branch_losses))
    ]
    rundir.result_path.write_text(json.dumps(result | {"branches": records}))
    return records


@pytest.fixture
def branched_runs(tmp_path: Path):
    path = tmp_path / "branched.yaml"
    path.write_text(BRANCHED)
    sweep = load_sweep(path)
    runs = expand(sweep)
    directory = tmp_path / "runs" / sweep.name
    write_manifest(directory, sweep.name, str(path), runs)
    return sweep, runs, directory


def test_a_branched_run_gives_a_row_per_branch_endpoint(tmp_path, branched_runs):
    _, (done, failed), directory = branched_runs
    records = finish_with_branches(RunDir(directory / done.run_id), done, [2.6, 2.3])
    failing = RunDir(directory / failed.run_id).create()
    failing.write_status("running")
    failing.write_status("failed", error="RuntimeError: boom")
    name, entries = read_manifest(directory)  # the manifest carries the branches
    runs_path, _ = collect(name, entries, directory, tmp_path / "out")
    table = pd.read_csv(runs_path).set_index("run_id")
    ids = [f"{done.run_id}-c{t}" for t, _ in done.branches]
    assert list(table.index[:3]) == [done.run_id, *ids] and len(table) == 6

    branches = table.loc[ids]
    assert list(branches.budget) == [1e11, 2e11] and list(branches.state) == ["done", "done"]
    assert list(branches.tokens) == [r["tokens"] for r in records]
    assert list(branches.steps) == [r["steps"] for r in records]
    assert list(branches.flops) == [r["flops"] for r in records]
    assert list(branches.flops_6n) == [6 * done.params_non_embedding * r["tokens"] for r in records]
    assert list(branches.flops_6n_total) == [6 * done.params * r["tokens"] for r in records]
    assert list(branches.final_val_loss) == [2.6, 2.3]
    assert list(branches.final_train_loss) == pytest.approx([2.65, 2.35])
    assert list(branches.wall_s) == [0.5, 1.5] and list(branches.tokens_per_s) == [4000.0, 4001.0]
    assert set(branches.lr) == {0.002}  # the run's peak learning rate, as on its own row
    assert set(branches.device) == {"Test CPU"} and set(branches.git_sha) == {"deadbeef"}
    assert table.loc[done.run_id].final_val_loss == 2.0 and table.loc[done.run_id].budget == 3e11

    # The failed run's branches share its state and have no measured numbers.
    unfinished = table.loc[[f"{failed.run_id}-c{t}" for t, _ in failed.branches]]
    assert set(unfinished.state) == {"failed"} and unfinished.final_val_loss.isna().all()
    assert unfinished.device.isna().all() and list(unfinished.budget) == [1e11, 2e11]


def test_a_finished_run_missing_a_branch_record_is_an_error(tmp_path, branched_runs):
    sweep, runs, directory = branched_runs
    rundir = RunDir(directory / runs[0].run_id)
    finish_with_branches(rundir, runs[0], [2.6])  # records the first branch only
    missing = runs[0].branches[1][0]
    with pytest.raises(ValueError, match=rf"result.json: no cooldown branch record at {missing} tokens"):
        collect(sweep.name, [r.labels() for r in runs], directory, tmp_path / "out")
