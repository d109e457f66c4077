"""Associative-recall results: accuracy per architecture, size and difficulty, at each config's best LR.

Reads only the tidy runs table (rows with a `task`, written by `collect` for `grid: {kind: recall}`).
A config is (arch, size, difficulty). Its learning rate is the one with the highest mean test
accuracy over seeds (ties: the smaller LR); the runs at that LR then give the median accuracy over
seeds with the min and max as error bars, as the paper reports it. Choosing the LR on the test set
and reporting on it slightly favours every architecture alike; with a small LR sweep and 5 seeds the
comparison between architectures is what counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from isoflop import __version__
from isoflop.analysis.plots import plot_recall_accuracy
from isoflop.analysis.table import baseline_arch, load_runs, provenance_lines
from isoflop.atomic import atomic_write_text

CONFIG = ["arch", "size", "difficulty"]
SUMMARY_FILE = "recall_summary.csv"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


def usable_recall_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished recall runs with a measured accuracy."""
    return runs[(runs["state"] == "done") & runs["task"].notna() & np.isfinite(runs["accuracy"])]


def best_learning_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config: the LR with the best mean accuracy over seeds (ties: the smaller LR)."""
    per_lr = (runs.groupby(CONFIG + ["lr"], as_index=False)["accuracy"].mean()
              .rename(columns={"accuracy": "mean_accuracy"}))
    ranked = per_lr.sort_values(CONFIG + ["mean_accuracy", "lr"], ascending=[True] * 3 + [False, True])
    return ranked.groupby(CONFIG, as_index=False).first()


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config at its best LR: median, min and max accuracy over seeds, and the seed count."""
    usable = usable_recall_runs(runs)
    if usable.empty:
        raise ValueError("no finished recall run with an accuracy in the table; allowed: a runs table "
                         "collected from a recall sweep with at least one finished run")
    best = best_learning_rates(usable)[CONFIG + ["lr"]]
    chosen = usable.merge(best, on=CONFIG + ["lr"])
    summary = chosen.groupby(CONFIG + ["task", "d_model", "difficulty_rank", "lr"], as_index=False).agg(
        median=("accuracy", "median"), min=("accuracy", "min"), max=("accuracy", "max"),
        n_seeds=("seed", "nunique"))
    return summary.sort_values(["difficulty_rank", "d_model", "arch"]).reset_index(drop=True)


def best_architectures(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (size, difficulty): the architecture with the highest median accuracy (ties: all of them)."""
    rows = []
    for (size, difficulty), cells in summary.groupby(["size", "difficulty"], sort=False):
        top = cells["median"].max()
        rows.append({"size": size, "difficulty": difficulty,
                     "best": ", ".join(sorted(cells.loc[cells["median"] == top, "arch"])), "median": top})
    return pd.DataFrame(rows)


def head_to_head(summary: pd.DataFrame) -> pd.DataFrame:
    """Wins of each architecture (row) over each other (column): the number of (size, difficulty)
    cells where its median accuracy is higher, and its mean margin over the cells both ran."""
    medians = summary.pivot_table(index=["size", "difficulty"], columns="arch", values="median")
    rows = []
    for a in medians.columns:
        for b in medians.columns:
            if a == b:
                continue
            both = medians[[a, b]].dropna()
            rows.append({"arch": a, "versus": b, "cells": len(both),
                         "wins": int((both[a] > both[b]).sum()), "ties": int((both[a] == both[b]).sum()),
                         "mean_margin": float((both[a] - both[b]).mean()) if len(both) else np.nan})
    return pd.DataFrame(rows)


def write_recall_report(results_dir: str | Path) -> Path:
    """recall_summary.csv, the accuracy plots and report.md from results_dir/runs.csv; returns the report."""
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    baseline = baseline_arch(runs)
    summary = summarise(runs)
    atomic_write_text(results_dir / SUMMARY_FILE, summary.to_csv(index=False))
    plots = results_dir / PLOTS_DIR
    figures = [
        ("Accuracy vs difficulty", plot_recall_accuracy(summary, "difficulty", baseline,
                                                         plots / "recall_vs_difficulty.png")),
        ("Accuracy vs model width", plot_recall_accuracy(summary, "d_model", baseline,
                                                          plots / "recall_vs_width.png")),
    ]
    text = _report_text(runs, summary, baseline, [(t, p.relative_to(results_dir)) for t, p in figures])
    report = results_dir / REPORT_FILE
    atomic_write_text(report, text)
    return report


def _cell(row: pd.Series) -> str:
    return f"{row['median']:.3f} [{row['min']:.3f}, {row['max']:.3f}] (lr {row['lr']:.2g}, {row['n_seeds']} seeds)"


def _report_text(runs: pd.DataFrame, summary: pd.DataFrame, baseline: str,
                 figures: list[tuple[str, Path]]) -> str:
    usable = usable_recall_runs(runs)
    tasks = ", ".join(sorted(summary["task"].unique()))
    lines = [
        f"# Associative recall: {', '.join(sorted(runs['sweep'].dropna().unique()))}",
        "",
        (f"{len(usable)} of {len(runs)} runs finished with an accuracy; task {tasks}. Accuracy is exact "
         "match per answer token on the task's fixed test set. Each cell: median over seeds [min, max] "
         "at the learning rate with the best mean accuracy over seeds for that architecture, size and "
         f"difficulty. Baseline: {baseline}."),
        "",
    ]
    difficulties = summary.sort_values("difficulty_rank")["difficulty"].unique()
    for size in summary.sort_values("d_model")["size"].unique():
        lines += [f"## Size {size}", "", "| arch | " + " | ".join(difficulties) + " |",
                  "|---|" + "---|" * len(difficulties)]
        cells = summary[summary["size"] == size]
        for arch in [baseline] + sorted(set(cells["arch"]) - {baseline}):
            by_difficulty = {r["difficulty"]: _cell(r) for _, r in cells[cells["arch"] == arch].iterrows()}
            lines.append(f"| {arch} | " + " | ".join(by_difficulty.get(d, "-") for d in difficulties) + " |")
        lines.append("")
    best = best_architectures(summary)
    lines += ["## Best architecture per cell (highest median)", "", "| size | difficulty | best | median |",
              "|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['difficulty']} | {r['best']} | {r['median']:.3f} |" for _, r in best.iterrows()]
    lines += ["", "## Head to head", "",
              "Cells (size x difficulty) where the row's median accuracy beats the column's, out of the "
              "cells both ran; in brackets the mean difference of medians.", ""]
    duels = head_to_head(summary)
    archs = [baseline] + sorted(set(summary["arch"]) - {baseline})
    lines += ["| arch | " + " | ".join(f"vs {a}" for a in archs) + " |", "|---|" + "---|" * len(archs)]
    for a in archs:
        cells = []
        for b in archs:
            duel = duels[(duels["arch"] == a) & (duels["versus"] == b)]
            cells.append("-" if duel.empty else
                         f"{duel['wins'].iloc[0]}/{duel['cells'].iloc[0]} ({duel['mean_margin'].iloc[0]:+.3f})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{title}]({path.as_posix()})" for title, path in figures]
    lines += ["", "## Provenance", "", *provenance_lines(runs),
              f"- generated by isoflop {__version__} from runs.csv"]
    return "\n".join(lines) + "\n"
