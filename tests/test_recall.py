"""Associative recall through the orchestrator: task settings in RunSpec, the recall grid, the
trainer's task mode, the analysis, and the CPU recall sweep end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isoflop.analysis.recall import best_learning_rates, head_to_head, summarise, write_recall_report
from isoflop.cli import main
from isoflop.models.config import ModelConfig
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.spec import SweepError, load_sweep, parse_sweep
from isoflop.runspec import DataConfig, RunSpec, TaskConfig, TrainConfig
from isoflop.train.trainer import run

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
TASK = TaskConfig(kind="mqar", vocab_size=24, n_pairs=3, n_test=32)


def test_runs_without_a_task_keep_their_ids_and_a_task_enters_the_identity():
    model = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=128)
    plain = RunSpec(arch="transformer", model=model, data=DataConfig(), train=TrainConfig(total_tokens=100_000))
    assert plain.run_id == "e597a3912817"  # computed before DataConfig.task existed
    assert "task" not in plain.to_dict()["data"]
    recall = dataclasses.replace(plain, data=DataConfig(task=TASK))
    harder = dataclasses.replace(plain, data=DataConfig(task=dataclasses.replace(TASK, n_pairs=4)))
    assert len({plain.run_id, recall.run_id, harder.run_id}) == 3
    assert RunSpec.from_dict(json.loads(json.dumps(recall.to_dict()))) == recall


def tiny_task_spec(seed: int = 0, steps: int = 12) -> RunSpec:
    model = ModelConfig(vocab_size=TASK.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                        max_seq_len=16).replace(conv={"kind": "dynamic-lowrank", "rank": 4})
    return RunSpec(arch="dynamic-qkv", model=model, data=DataConfig(task=TASK),
                   train=TrainConfig(total_tokens=steps * 8 * 16, batch_size=8, seq_len=16,
                                     eval_every_tokens=4 * 8 * 16, device="cpu"),
                   seed=seed)


def test_task_runs_record_accuracy_and_resume_exactly(tmp_path):
    spec = tiny_task_spec()
    whole = run(spec, tmp_path / "whole")
    assert 0 <= whole["final_accuracy"] <= 1 and np.isfinite(whole["final_val_loss"])
    assert whole["provenance"]["corpus_fingerprint"].startswith("task-")
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12] and all("accuracy" in m for m in metrics)

    def crash_at_6(step: int) -> None:
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(spec, tmp_path / "resumed", on_step=crash_at_6)
    resumed = run(spec, tmp_path / "resumed")  # from the step-4 checkpoint
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["final_accuracy"] == whole["final_accuracy"]


SWEEP = """
name: r
data: {task: {kind: mqar, vocab_size: 32, n_pairs: 4}}
architectures:
  none: {arch: transformer, baseline: true}
  dynamic-qkv: {}
grid: {kind: recall, sizes: [d32-l2-h2, d64-l2], difficulties: [{n_pairs: 2}, {n_pairs: 4}],
       lrs: [1.0e-3, 3.0e-3, 1.0e-2], steps: 20}
train: {batch_size: 4, seq_len: 32}
seeds: [0, 1]
"""


def sweep_document(**changes: object) -> dict:
    import yaml

    document = yaml.safe_load(SWEEP)
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = document
        for parent in parents:
            target = target[parent]
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    return document


def test_the_recall_grid_expands_arch_width_difficulty_lr_and_seed():
    runs = expand(parse_sweep(sweep_document(), "r.yaml"))
    assert len(runs) == 2 * 2 * 2 * 3 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.difficulty for r in runs[:24]] == ["n_pairs=2"] * 24  # difficulty first, then size, ...
    assert {(r.spec.data.task.n_pairs, r.difficulty_rank) for r in runs} == {(2, 0), (4, 1)}
    assert {r.spec.optim.lr for r in runs} == {1e-3, 3e-3, 1e-2}
    assert {r.spec.model.vocab_size for r in runs} == {32}  # the task's vocabulary
    assert {r.steps for r in runs} == {20}
    labels = runs[0].labels()
    assert labels["task"] == "mqar" and labels["difficulty"] == "n_pairs=2" and labels["difficulty_rank"] == 0


@pytest.mark.parametrize("changes, path, message", [
    ({"data__task": None}, "data.task", "is missing, but grid.kind is 'recall'"),
    ({"grid": {"kind": "ladder", "sizes": ["tiny"], "tokens_per_param": 20}}, "grid.kind",
     "does not train on data.task"),
    ({"grid__difficulties": [{"n_pairs": 2}, {"pairs": 4}]}, "grid.difficulties[1]", "names 'pairs'"),
    ({"grid__difficulties": [{"n_pairs": 2}, {"n_pairs": 9}]}, "grid.difficulties[1]",
     "seq_len=32 is too short"),
    ({"grid__difficulties": [{"n_pairs": 2}, {"n_pairs": 2}]}, "grid.difficulties", "repeated"),
    ({"data__task__kind": "copy"}, "data.task.kind", "allowed: mqar, mqar-varkey, fuzzy"),
    ({"grid__lrs": []}, "grid.lrs", "is not a non-empty list"),
])
def test_bad_recall_sweeps_name_the_key(changes, path, message):
    with pytest.raises(SweepError, match=message) as error:
        parse_sweep(sweep_document(**changes), "r.yaml")
    assert error.value.path == path


def test_the_gpu_sweep_plans_and_validates():
    sweep = load_sweep(SWEEPS / "recall.yaml")
    runs = expand(sweep)
    archs = {r.arch for r in runs}
    assert archs == {"none", "static-qkv", "dynamic-qkv", "dynamic-headwise-qkv"}
    assert len(sweep.seeds) == 5 and len(runs) == 4 * 2 * 3 * 2 * 5


def test_the_best_lr_is_chosen_by_mean_accuracy_over_seeds():
    rows = [  # lr 0.01 has the best single seed, lr 0.003 the best mean
        ("a", 0.001, 0, 0.2), ("a", 0.001, 1, 0.2), ("a", 0.003, 0, 0.5), ("a", 0.003, 1, 0.6),
        ("a", 0.01, 0, 0.9), ("a", 0.01, 1, 0.1), ("b", 0.001, 0, 0.4), ("b", 0.003, 0, 0.4),
    ]
    runs = pd.DataFrame(rows, columns=["arch", "lr", "seed", "accuracy"]).assign(
        size="s", difficulty="n_pairs=2", difficulty_rank=0, d_model=32, task="mqar", state="done")
    best = best_learning_rates(runs).set_index("arch")["lr"]
    assert best.to_dict() == {"a": 0.003, "b": 0.001}  # b: a tie goes to the smaller LR
    summary = summarise(runs).set_index("arch")
    assert summary.loc["a", ["median", "min", "max", "n_seeds"]].tolist() == [0.55, 0.5, 0.6, 2]


def test_head_to_head_counts_cells_won_over_each_rival():
    summary = pd.DataFrame(
        [("a", "s", "d1", 0.9), ("b", "s", "d1", 0.5), ("a", "s", "d2", 0.4), ("b", "s", "d2", 0.6),
         ("a", "t", "d1", 0.7), ("b", "t", "d1", 0.7), ("c", "t", "d1", 0.1)],
        columns=["arch", "size", "difficulty", "median"])
    duels = head_to_head(summary).set_index(["arch", "versus"])
    assert duels.loc[("a", "b"), ["cells", "wins", "ties"]].tolist() == [3, 1, 1]
    assert duels.loc[("a", "b"), "mean_margin"] == pytest.approx((0.4 - 0.2 + 0.0) / 3)
    assert duels.loc[("b", "a"), "wins"] == 1
    assert duels.loc[("c", "a"), ["cells", "wins"]].tolist() == [1, 0]  # c ran one cell only


def test_the_committed_gpu_results_regenerate_from_their_table(tmp_path):
    """results/recall: the report comes back from runs.csv alone, and says what the runs found."""
    committed = Path(__file__).parent.parent / "results" / "recall"
    (tmp_path / "runs.csv").write_bytes((committed / "runs.csv").read_bytes())
    report = write_recall_report(tmp_path).read_text()
    assert report == (committed / "report.md").read_text()
    assert (tmp_path / "recall_summary.csv").read_text() == (committed / "recall_summary.csv").read_text()
    assert "240 of 240 runs finished" in report and "torch_version: `2.11.0+cu130`" in report


def test_the_cpu_recall_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = SWEEPS / "recall-cpu.yaml"
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    assert main(["plan", str(sweep), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_runs"] == 16
    assert main(["run", str(sweep), "--runs-dir", str(runs_dir)]) == 0
    assert "16 done" in capsys.readouterr().out
    assert main(["collect", str(sweep), "--runs-dir", str(runs_dir), "--out", str(results)]) == 0
    table = pd.read_csv(results / "runs.csv")
    assert (table.state == "done").all() and table.accuracy.between(0, 1).all()
    assert set(table.task) == {"mqar"} and set(table.difficulty) == {"n_pairs=2", "n_pairs=4"}
    assert main(["report", str(results)]) == 0
    summary = pd.read_csv(results / "recall_summary.csv")
    assert len(summary) == 2 * 2 and (summary.n_seeds == 2).all()
    assert (summary["min"] <= summary["median"]).all() and (summary["median"] <= summary["max"]).all()
    # Learning happened: on 2 pairs every architecture beats guessing among the 16 value ids.
    assert (summary[summary.difficulty == "n_pairs=2"]["median"] > 2 / 16).all()
    report = (results / "report.md").read_text()
    assert "dynamic-qkv" in report and "n_pairs=4" in report
    assert {p.name for p in (results / "plots").iterdir()} == {"recall_vs_difficulty.png", "recall_vs_width.png"}
