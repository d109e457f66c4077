"""Collect: run directories -> the tidy tables runs.csv (one row per run) and evals.csv (one row per eval).

The column contract (what the analysis reads) is RUNS_COLUMNS and EVALS_COLUMNS. Every run of the
sweep gets a row, finished or not; the analysis keeps rows with state 'done' and a finite
final_val_loss. Numbers a run has not produced yet are left empty (NaN when read by pandas).
Labels (arch, baseline, size, budget) come from the sweep, measured numbers from result.json and
metrics.jsonl; tokens, steps and FLOPs are the run's actual ones when it finished, else the plan's.

A run with WSD cooldown branches (an entry with `branches`, from `grid: {cooldowns: true}`) stands
for several runs of the isoflop grid: its own row (the trunk, at the largest budget) is followed by
one row per branch endpoint, run_id `<run id>-c<tokens>`, with the branch's budget, tokens and steps,
the FLOPs a separate run to those tokens spends (docs/analysis.md, section 5), and the losses and
throughput of the branch's record in result.json (wall_s: the branch's own training time). Until the
run finishes, a branch row carries the run's state and the plan's numbers, like the trunk's row.

Recall runs (a synthetic task, `grid: {kind: recall}`) fill task (its kind), difficulty (the label of
its task setting), difficulty_rank (that setting's place in the grid) and accuracy (exact match per
answer token on the task's fixed test set); language-modelling runs leave them empty.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.status import run_states

RUNS_COLUMNS: tuple[str, ...] = (
    "run_id", "sweep", "arch", "is_baseline", "size", "d_model", "n_layers", "n_heads", "d_ff",
    "params", "params_non_embedding", "seq_len", "batch_size", "tokens", "steps",
    "budget", "flops", "flops_6n", "flops_6n_total",
    "final_val_loss", "final_train_loss", "lr", "seed", "state",
    "wall_s", "tokens_per_s", "device", "corpus_fingerprint", "git_sha", "isoflop_version",
    "task", "difficulty", "difficulty_rank", "accuracy", "torch_version", "triton_version",
)
EVALS_COLUMNS: tuple[str, ...] = (
    "run_id", "arch", "size", "step", "tokens", "flops", "train_loss", "val_loss", "lr",
    "tokens_per_s", "elapsed_s",
)


def run_rows(sweep_name: str, entries: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """One runs.csv row per entry (PlannedRun.labels() or a manifest entry), each followed by the
    rows of its cooldown branches (module docstring)."""
    rows = []
    for entry in run_states(entries, directory):
        rundir = RunDir(directory / entry["run_id"])
        result = rundir.read_result()
        row = {column: entry.get(column) for column in RUNS_COLUMNS} | {"sweep": sweep_name}
        if result is not None:
            provenance = result.get("provenance", {})
            tokens = result["tokens"]
            row |= {
                "tokens": tokens,
                "steps": result["steps"],
                "flops": result["total_flops"],
                "flops_6n": result["flops_per_token"]["six_n"] * tokens,
                "flops_6n_total": result["flops_per_token"]["six_n_total"] * tokens,
                "final_val_loss": result["final_val_loss"],
                "final_train_loss": result["final_train_loss"],
                "accuracy": result.get("final_accuracy"),
                "wall_s": result["wall_time_s"],
                "tokens_per_s": result["tokens_per_s"],
                "device": provenance.get("device_name") or provenance.get("device"),
                "corpus_fingerprint": provenance.get("corpus_fingerprint"),
                "git_sha": provenance.get("git_sha"),
                "isoflop_version": provenance.get("isoflop_version"),
                "torch_version": provenance.get("torch_version"),
                "triton_version": provenance.get("triton_version"),
            }
        rows.append(row)
        rows += [branch_row(row, branch, result, rundir) for branch in entry.get("branches", [])]
    return rows


def branch_row(trunk: dict[str, Any], branch: dict[str, Any], result: dict[str, Any] | None,
               rundir: RunDir) -> dict[str, Any]:
    """The row of one cooldown branch endpoint ({tokens, budget} of the entry's `branches`), built
    on its run's row `trunk`: same labels, state and provenance, the branch's own numbers."""
    tokens = branch["tokens"]
    row = trunk | {
        "run_id": f"{trunk['run_id']}-c{tokens}",
        "budget": branch["budget"],
        "tokens": tokens,
        "steps": tokens // (trunk["batch_size"] * trunk["seq_len"]),
    }
    if result is None:  # the plan's FLOPs, scaled to the branch's tokens; measured numbers empty
        scale = tokens / trunk["tokens"]
        return row | {column: trunk[column] * scale for column in ("flops", "flops_6n", "flops_6n_total")}
    record = next((r for r in result.get("branches", []) if r["tokens"] == tokens), None)
    if record is None:
        recorded = [r["tokens"] for r in result.get("branches", [])]
        raise ValueError(f"{rundir.result_path}: no cooldown branch record at {tokens} tokens "
                         f"(recorded: {recorded}), though the sweep's manifest names one; "
                         "allowed: a result.json written by the run of this manifest entry")
    per_token = result["flops_per_token"]
    return row | {
        "flops": record["flops"],
        "flops_6n": per_token["six_n"] * tokens,
        "flops_6n_total": per_token["six_n_total"] * tokens,
        "final_val_loss": record["final_val_loss"],
        "final_train_loss": record["final_train_loss"],
        "wall_s": record["train_time_s"],
        "tokens_per_s": record["tokens_per_s"],
    }


def eval_rows(entries: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """One evals.csv row per line of each run's metrics.jsonl."""
    rows = []
    for entry in entries:
        for record in RunDir(directory / entry["run_id"]).read_metrics():
            rows.append({column: record.get(column) for column in EVALS_COLUMNS}
                        | {"run_id": entry["run_id"], "arch": entry["arch"], "size": entry["size"]})
    return rows


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Plain CSV: missing values and NaN as empty cells, floats at full precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(_cell(row.get(column)) for column in columns)
    temp.replace(path)


def collect(sweep_name: str, entries: list[dict[str, Any]], directory: Path, out: Path) -> tuple[Path, Path]:
    """Write out/runs.csv and out/evals.csv; returns their paths."""
    runs_path, evals_path = out / "runs.csv", out / "evals.csv"
    write_csv(runs_path, RUNS_COLUMNS, run_rows(sweep_name, entries, directory))
    write_csv(evals_path, EVALS_COLUMNS, eval_rows(entries, directory))
    return runs_path, evals_path


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)
