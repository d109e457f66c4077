"""A sweep with WSD cooldown branches end to end on CPU: its plan counts the branches' decays, its
runs train, collect gives one row per branch endpoint, and `isoflop fit` reads the table."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from isoflop.cli import main
from isoflop.orchestrator.collect import RUNS_COLUMNS
from isoflop.orchestrator.estimate import PROFILES, trained_steps
from isoflop.orchestrator.formats import sci
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.plan import make_plan, plan_table
from isoflop.orchestrator.spec import load_sweep

# Two architectures at one tiny size, three budgets: one run each to the largest budget (~60 steps)
# with cooldown branches at the two smaller ones (~20 and ~40 steps).
SWEEP = """
name: branched
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
  transformer: {{baseline: true}}
  dynamic-qkv: {{overrides: {{conv: {{rank: 4}}}}}}
grid: {{kind: isoflop, budgets: [1.0e+9, 2.0e+9, 3.0e+9], sizes: [tiny], cooldowns: true}}
train: {{batch_size: 2, seq_len: 32, lr: 0.004, eval_tokens: 512, device: cpu, schedule: wsd,
         warmup_fraction: 0.05}}
executor: {{workers: 2}}
"""
BUDGETS = (1e9, 2e9, 3e9)


def isoflop(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    import email.message
    import textwrap

    folder = tmp_path_factory.mktemp("branched")
    corpus = folder / "corpus"
    corpus.mkdir()
    for module in (json, textwrap, email.message):
        (corpus / Path(module.__file__).name).write_text(Path(module.__file__).read_text())
    path = folder / "branched.yaml"
    path.write_text(SWEEP.format(corpus=corpus))
    return path


@pytest.fixture(scope="module")
def trained(sweep_file: Path) -> tuple[Path, Path]:
    """The sweep's runs folder and its collected results folder, trained once for the module."""
    runs_dir, results = sweep_file.parent / "runs", sweep_file.parent / "results"
    assert isoflop("run", sweep_file, "--runs-dir", runs_dir) == 0
    assert isoflop("collect", runs_dir / "branched", "--out", results) == 0
    return runs_dir, results


def test_plan_totals_count_the_branch_decays(sweep_file, capsys):
    sweep = load_sweep(sweep_file)
    runs = expand(sweep)
    separate_runs = expand(load_sweep(_without_cooldowns(sweep_file)))
    plan = make_plan(sweep, runs, PROFILES["cpu"])
    assert len(runs) == 2 and all(len(run.branches) == 2 for run in runs)

    decay = runs[0].spec.schedule.decay_fraction
    branch_decays = sum(decay * run.flops_per_token * tokens for run in runs for tokens, _ in run.branches)
    trunks = sum(run.flops for run in runs)
    assert plan.total_flops == pytest.approx(trunks + branch_decays) and branch_decays > 0
    assert trunks < plan.total_flops < sum(run.flops for run in separate_runs)
    for run, seconds in zip(runs, plan.seconds):
        bare = dataclasses.replace(run, branches=())
        assert trained_steps(run) == pytest.approx(run.steps + sum(decay * t for t, _ in run.branches)
                                                   / run.spec.train.tokens_per_step)
        assert seconds > PROFILES["cpu"].run_seconds(bare) and trained_steps(bare) == run.steps

    assert isoflop("plan", sweep_file, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["n_runs"] == 2 and document["n_branches"] == 4
    assert document["total_flops"] == pytest.approx(plan.total_flops)
    assert [r["spent_flops"] for r in document["runs"]] == [run.spent_flops for run in runs]
    assert document["runs"][0]["branches"] == [{"tokens": t, "budget": b} for t, b in runs[0].branches]

    console = Console(record=True, width=200)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "2 runs + 4 cooldown branches" in text and "1e9..3e9" in text
    assert f"3e9 + {sci(runs[0].spent_flops - runs[0].flops)}" in text


def test_collect_before_training_gives_branch_rows_with_the_plan_numbers(sweep_file, tmp_path):
    runs_dir = tmp_path / "runs"
    assert isoflop("collect", sweep_file, "--runs-dir", runs_dir, "--out", tmp_path / "out") == 0
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    runs = expand(load_sweep(sweep_file))
    assert len(table) == 2 * 3 and set(table.state) == {"not started"}
    assert table.final_val_loss.isna().all() and table.wall_s.isna().all()
    for run in runs:
        rows = table[table.run_id.str.startswith(run.run_id)]
        assert list(rows.budget) == [3e9, 1e9, 2e9]
        assert list(rows.tokens) == [run.tokens] + [tokens for tokens, _ in run.branches]
        assert rows.flops.tolist() == pytest.approx([run.flops_per_token * t for t in rows.tokens])


def test_collect_gives_one_row_per_branch_endpoint(trained):
    runs_dir, results = trained
    table = pd.read_csv(results / "runs.csv")
    assert list(table.columns) == list(RUNS_COLUMNS)
    assert len(table) == 2 * 3 and set(table.state) == {"done"} and table.run_id.is_unique
    trunks = table[~table.run_id.str.contains("-c")]
    assert len(trunks) == 2 and set(trunks.budget) == {3e9}
    for _, trunk in trunks.iterrows():
        result = json.loads((runs_dir / "branched" / trunk.run_id / "result.json").read_text())
        branches = table[table.run_id.str.startswith(f"{trunk.run_id}-c")]
        assert list(branches.run_id) == [f"{trunk.run_id}-c{r['tokens']}" for r in result["branches"]]
        assert list(branches.budget) == [1e9, 2e9]
        assert (branches.tokens < trunk.tokens).all()
        assert list(branches.steps) == [t // 64 for t in branches.tokens]  # batch 2 x seq 32
        # Columns that label the run are the trunk's.
        for column in ("arch", "is_baseline", "size", "params", "lr", "seed", "git_sha",
                       "corpus_fingerprint", "device", "isoflop_version"):
            assert (branches[column] == trunk[column]).all(), column
        # Each endpoint at the compute of a separate run to its tokens, within half a step of its
        # budget, like any isoflop cell.
        endpoints = pd.concat([branches, trunks[trunks.run_id == trunk.run_id]])
        assert endpoints.flops.is_monotonic_increasing and endpoints.tokens.is_monotonic_increasing
        per_token = result["flops_per_token"]
        assert (endpoints.flops == per_token["train"] * endpoints.tokens).all()
        assert (endpoints.flops_6n == per_token["six_n"] * endpoints.tokens).all()
        assert (endpoints.flops_6n_total == per_token["six_n_total"] * endpoints.tokens).all()
        assert ((endpoints.flops - endpoints.budget).abs() <= per_token["train"] * 64 / 2).all()
        # Measured, and trained: below a uniform guess over bytes, ln(256) = 5.55.
        records = result["branches"]
        assert list(branches.final_val_loss) == [r["final_val_loss"] for r in records]
        assert list(branches.wall_s) == [r["train_time_s"] for r in records]
        assert list(branches.tokens_per_s) == [r["tokens_per_s"] for r in records]
        assert all(math.isfinite(v) and v < 0.9 * math.log(256) for v in endpoints.final_val_loss)
        assert (branches.wall_s > 0).all() and (branches.wall_s < trunk.wall_s).all()


def test_fit_reads_the_collected_table(trained, capsys):
    _, results = trained
    capsys.readouterr()
    assert isoflop("fit", results, "--n-boot", "20") == 0
    assert "dynamic-qkv" in capsys.readouterr().out
    fits = json.loads((results / "fits.json").read_text())
    assert "dynamic-qkv" in json.dumps(fits)
    assert len(pd.read_csv(results / "multipliers.csv")) >= 1


def _without_cooldowns(sweep_file: Path) -> Path:
    path = sweep_file.with_name("separate.yaml")
    path.write_text(sweep_file.read_text().replace(", cooldowns: true", ""))
    return path
