"""What `isoflop fit` and `isoflop report` produce, from results/<sweep>/runs.csv alone.

run_fit writes fits.json and multipliers.csv; write_report reruns it and adds the plots and
report.md. Outputs are written through a temporary file and a rename, and hold no timestamp, so
regenerating from an unchanged table gives the same text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich import box
from rich.table import Table

from isoflop import __version__
from isoflop.atomic import atomic_write_text
from isoflop.analysis.bootstrap import PERCENTILES, PowerLawSamples, bootstrap_fits
from isoflop.analysis.fits import MIN_POINTS_FOR_E, PowerLawFit, fit_frontiers
from isoflop.analysis.multiplier import INTERVAL, multiplier_table
from isoflop.analysis.plots import (
    plot_frontier,
    plot_isoflop_curves,
    plot_multiplier,
    plot_training_curves,
)
from isoflop.analysis.table import baseline_arch, load_evals, load_runs, usable_runs

FITS_FILE = "fits.json"
MULTIPLIERS_FILE = "multipliers.csv"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
LAW = (
    "L(C) = E + A * C^-alpha; C = training FLOPs (column flops), "
    "L = final validation loss [nats/token]"
)
PROVENANCE_COLUMNS = ("git_sha", "corpus_fingerprint", "device", "isoflop_version")


@dataclass(frozen=True)
class FitOutcome:
    """Everything run_fit computed, and where it wrote it."""

    runs: pd.DataFrame  # all rows of runs.csv, validated
    usable: pd.DataFrame  # the rows the fits used
    baseline: str
    fits: dict[str, PowerLawFit]
    samples: dict[str, PowerLawSamples]
    skipped: dict[str, str]  # arch -> why it has no fit
    multipliers: pd.DataFrame
    n_boot: int
    seed: int
    fits_path: Path
    multipliers_path: Path


def run_fit(
    results_dir: str | Path, at: list[float] | None = None, n_boot: int = 1000, seed: int = 0
) -> FitOutcome:
    """Fit every architecture of results_dir/runs.csv, bootstrap, and compute the multipliers
    against the baseline at the grid's budgets and at the named budgets `at` (FLOPs); writes
    results_dir/fits.json and results_dir/multipliers.csv."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise NotADirectoryError(f"{results_dir}: expected the results directory holding runs.csv")
    runs = load_runs(results_dir)
    usable = usable_runs(runs)
    baseline = baseline_arch(runs)
    if usable.empty:
        raise ValueError(f"{results_dir}: no usable run (state 'done' with a finite final_val_loss)")
    fits, skipped = fit_frontiers(usable)
    if baseline not in fits:
        reason = skipped.get(baseline, "it has no usable run")
        raise ValueError(f"{results_dir}: cannot fit the baseline {baseline!r}: {reason}")
    samples = bootstrap_fits(usable, fits, n_boot=n_boot, seed=seed)
    multipliers = multiplier_table(usable, fits, samples, baseline, at=at)
    fits_path, multipliers_path = results_dir / FITS_FILE, results_dir / MULTIPLIERS_FILE
    fits_document = _fits_document(baseline, fits, samples, skipped, n_boot, seed)
    atomic_write_text(fits_path, json.dumps(fits_document, indent=2, allow_nan=False) + "\n")
    atomic_write_text(multipliers_path, multipliers.to_csv(index=False))
    return FitOutcome(runs, usable, baseline, fits, samples, skipped, multipliers, n_boot, seed,
                      fits_path, multipliers_path)


def _fits_document(
    baseline: str,
    fits: dict[str, PowerLawFit],
    samples: dict[str, PowerLawSamples],
    skipped: dict[str, str],
    n_boot: int,
    seed: int,
) -> dict[str, object]:
    archs = {
        arch: {
            **fit.to_dict(),
            "n_boot_valid": samples[arch].n_valid,
            "bootstrap": samples[arch].percentiles(),
        }
        for arch, fit in fits.items()
    }
    document = {
        "law": LAW, "baseline": baseline, "n_boot": n_boot, "seed": seed, "interval": INTERVAL,
        "percentiles": list(PERCENTILES), "archs": archs, "skipped": skipped,
    }
    return _json_safe(document)


def _json_safe(value: object) -> object:
    """Non-finite floats become null: plain JSON has no NaN or inf."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _multiplier_cells(row: pd.Series) -> list[str]:
    """budget, M, interval, loss of the arch, loss of the baseline at the same compute."""
    return [
        f"{row['budget']:.3g}", f"{row['multiplier']:.2f}x", f"{row['lo']:.2f}-{row['hi']:.2f}",
        f"{row['loss_arch']:.3f}", f"{row['loss_baseline_at_C']:.3f}",
    ]


def format_multiplier_table(multipliers: pd.DataFrame, baseline: str) -> Table:
    """The multipliers as a rich Table (the CLI prints it); extrapolated rows are dimmed."""
    table = Table(
        title=f"Compute multiplier M vs {baseline}",
        caption=f"M = C_{baseline}(L_arch(C)) / C; M > 1: the architecture reaches the baseline's "
        "loss with M times less compute. extrap.: a fit used outside the compute it was fitted on",
        box=box.SIMPLE_HEAD,
    )
    for header in ("arch", "C [FLOPs]", "M", f"{INTERVAL:.0%} CI", "L arch", "L base", "note"):
        table.add_column(header, justify="left" if header in ("arch", "note") else "right")
    for _, row in multipliers.iterrows():
        note = "extrap." if row["extrapolated"] else ""
        table.add_row(row["arch"], *_multiplier_cells(row), note, style="dim" if note else None)
    return table


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _multipliers_markdown(multipliers: pd.DataFrame) -> str:
    rows = [
        [row["arch"], *_multiplier_cells(row), "extrapolated" if row["extrapolated"] else ""]
        for _, row in multipliers.iterrows()
    ]
    headers = ["architecture", "budget C [FLOPs]", "M", f"{INTERVAL:.0%} interval", "loss (arch)",
               "loss (baseline, same C)", "note"]
    return _markdown_table(headers, rows)


def _fits_markdown(outcome: FitOutcome) -> str:
    rows = []
    for arch, fit in sorted(outcome.fits.items()):
        boot = outcome.samples[arch].percentiles()["alpha"]
        rows.append([
            arch + (" (baseline)" if arch == outcome.baseline else ""),
            f"{fit.E:.4g}" if fit.with_E else "0 (fixed)", f"{fit.A:.4g}", f"{fit.alpha:.4g}",
            f"[{boot['p5']:.3g}, {boot['p95']:.3g}]", str(fit.n_points),
            f"{fit.c_min:.3g} - {fit.c_max:.3g}", f"{fit.rms:.2g}",
        ])
    headers = ["architecture", "E", "A", "alpha", f"alpha {INTERVAL:.0%}", "points",
               "C range [FLOPs]", "rms log-loss residual"]
    return _markdown_table(headers, rows)


def _provenance(runs: pd.DataFrame) -> list[str]:
    lines = []
    for column in PROVENANCE_COLUMNS:
        values = sorted(str(v) for v in runs[column].dropna().unique())
        lines.append(f"- {column}: {', '.join(f'`{v}`' for v in values) if values else 'not recorded'}")
    return lines


def write_report(
    results_dir: str | Path, at: list[float] | None = None, n_boot: int = 1000, seed: int = 0
) -> Path:
    """Regenerate fits, multipliers and every plot from results_dir/runs.csv (and evals.csv when
    present) and write results_dir/report.md; returns its path. Plots go to results_dir/plots/."""
    results_dir = Path(results_dir)
    outcome = run_fit(results_dir, at=at, n_boot=n_boot, seed=seed)
    plots_dir = results_dir / PLOTS_DIR
    baseline, usable = outcome.baseline, outcome.usable
    figures = [
        ("IsoFLOP curves", plot_isoflop_curves(usable, baseline, plots_dir / "isoflop_curves.png")),
        ("Frontier and fits",
         plot_frontier(usable, outcome.fits, baseline, plots_dir / "frontier.png")),
        ("Compute multiplier", plot_multiplier(outcome.fits, outcome.samples, outcome.multipliers,
                                               baseline, plots_dir / "multiplier.png")),
    ]
    evals = load_evals(results_dir)
    if evals is not None and not evals.empty:
        figures.append(("Training curves", plot_training_curves(
            evals, outcome.runs, baseline, plots_dir / "training_curves.png")))
    text = _report_text(outcome, [(title, path.relative_to(results_dir)) for title, path in figures])
    report_path = results_dir / REPORT_FILE
    atomic_write_text(report_path, text)
    return report_path


def _report_text(outcome: FitOutcome, figures: list[tuple[str, Path]]) -> str:
    runs, usable = outcome.runs, outcome.usable
    sweeps = ", ".join(sorted(str(s) for s in runs["sweep"].dropna().unique()))
    archs = sorted(runs["arch"].unique())
    counts = runs["state"].value_counts().sort_index()
    states = ", ".join(f"{state}: {count}" for state, count in counts.items())
    budgets = np.unique(usable["budget"].to_numpy(float))
    budgets = budgets[np.isfinite(budgets)]
    lines = [
        f"# Report: {sweeps}",
        "",
        f"- architectures: {', '.join(archs)}; baseline: **{outcome.baseline}**",
        f"- runs: {len(runs)} ({states}); used in fits: {len(usable)} (done, finite final loss)",
        "- grid: " + (f"isoflop, budgets {', '.join(f'{b:.3g}' for b in budgets)} FLOPs" if len(budgets)
                      else "ladder (no budgets)"),
        f"- law: {LAW}",
        "",
        "## Compute multipliers",
        "",
        f"M(C) = C_{outcome.baseline}(L_arch(C)) / C: the compute the baseline needs to reach the loss "
        "the architecture reaches with C, over C. Intervals: "
        f"{INTERVAL:.0%} bootstrap over runs ({outcome.n_boot} resamples, seed {outcome.seed}, "
        "stratified by architecture and budget). Extrapolated: a law used outside the compute range "
        "it was fitted on.",
        "",
        (_multipliers_markdown(outcome.multipliers) if len(outcome.multipliers)
         else "No architecture besides the baseline has a fit."),
        "",
        "## Fits",
        "",
        "Frontier: the lowest-loss run of each budget (every run of a ladder). With fewer than "
        f"{MIN_POINTS_FOR_E} budgets E is fixed to 0 (a straight line in log-log).",
        "",
        _fits_markdown(outcome),
        "",
    ]
    if outcome.skipped:
        reasons = "; ".join(f"{arch} ({why})" for arch, why in sorted(outcome.skipped.items()))
        lines += [f"Not fitted: {reasons}", ""]
    lines += ["## Plots", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path.as_posix()})", ""]
    lines += ["## Provenance", "", *_provenance(runs),
              f"- generated by isoflop {__version__} from runs.csv", ""]
    return "\n".join(lines)
