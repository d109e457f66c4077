"""What `isoflop fit` and `isoflop report` produce, from results/<sweep>/runs.csv alone.

run_fit fits every architecture by one method (frontier, Approach 2 or Approach 3; methods.py),
bootstraps it (paired across architectures), and writes fits.json and multipliers.csv;
write_report reruns it, adds Approaches 2 and 3 for the compute-optimal allocation, the outlier
list and every plot, and writes report.md. Outputs are written through a temporary file and a
rename, and hold no timestamp, so regenerating from an unchanged table gives the same text.
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
from isoflop.analysis.approach2 import Approach2Fit
from isoflop.analysis.approach3 import SurfaceFit, fit_surface
from isoflop.analysis.bootstrap import PERCENTILES, PowerLawSamples
from isoflop.analysis.fits import GRID_CHECK_MIN_SIZES, MIN_POINTS_FOR_E, PowerLawFit, grid_edges
from isoflop.analysis.holdout import Holdout, holdout_check, isoflop_budgets
from isoflop.analysis.methods import (
    MethodResult,
    exponent_tests,
    fit_method,
    kappa_of,
    surface_arrays,
)
from isoflop.analysis.multiplier import (
    INTERVAL,
    multiplier_table,
    seconds_per_flop,
    throughput_range,
    wall_time,
)
from isoflop.analysis.outliers import flag_outliers
from isoflop.analysis.plots import (
    plot_allocation,
    plot_bootstrap_distributions,
    plot_frontier,
    plot_holdout,
    plot_isoflop_curves,
    plot_multiplier,
    plot_residuals,
    plot_training_curves,
)
from isoflop.analysis.recall import write_recall_report
from isoflop.analysis.seeds import N_SEEDS, average_seeds, count_span, per_seed_multipliers, seed_spread
from isoflop.analysis.reference import (
    Reference,
    band_verdict,
    load_reference,
    observed_order,
    published_inside_band,
    swapped_pairs,
)
from isoflop.analysis.table import (
    TableError, baseline_arch, is_recall_table, load_evals, load_runs, provenance_lines, usable_runs,
)
from isoflop.analysis.throughput import (
    RANGE_COLUMNS,
    apply_throughput,
    describe_throughput,
    has_range,
    load_throughput,
    round_columns,
)
from isoflop.atomic import atomic_write_text

FITS_FILE = "fits.json"
MULTIPLIERS_FILE = "multipliers.csv"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
LAWS = {
    "frontier": "L(C) = E + A * C^-alpha through the lowest-loss run of each budget",
    "approach2": "L_opt(C) = E + A * C^-alpha through the interpolated minimum of each budget",
    "approach3": "L*(C) = E + A * C^-alpha along the optimum of L(N, D) = E + A/N^alpha + B/D^beta",
}
UNITS = "C = training FLOPs (column flops), L = final validation loss [nats/token]"


@dataclass(frozen=True)
class FitOutcome:
    """Everything run_fit computed, and where it wrote it."""

    runs: pd.DataFrame  # all rows of runs.csv, validated
    usable: pd.DataFrame  # the rows the fits used: one per cell (a cell's seeds averaged)
    baseline: str
    result: MethodResult
    multipliers: pd.DataFrame
    exponent_tests: pd.DataFrame
    surfaces: dict[str, SurfaceFit]  # Approach-3 fits (no bootstrap) for residuals and outliers
    outliers: pd.DataFrame
    fits_path: Path
    multipliers_path: Path
    throughput: pd.DataFrame | None = None  # throughput.csv when present (wall-clock M's source)

    @property
    def timed(self) -> pd.DataFrame:
        """The usable runs with the throughput the wall-clock multipliers use."""
        return _timed_runs(self.usable, self.throughput)

    @property
    def method(self) -> str:
        return self.result.method

    @property
    def fits(self) -> dict[str, PowerLawFit]:
        return self.result.fits

    @property
    def samples(self) -> dict[str, PowerLawSamples]:
        return self.result.samples

    @property
    def skipped(self) -> dict[str, str]:
        return self.result.skipped

    @property
    def n_boot(self) -> int:
        return self.result.n_boot

    @property
    def seed(self) -> int:
        return self.result.seed


def run_fit(
    results_dir: str | Path,
    at: list[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    method: str = "frontier",
    wallclock: bool | None = None,
    resample_budgets: bool | None = None,
) -> FitOutcome:
    """Fit every architecture of results_dir/runs.csv by `method` (METHODS), bootstrap (paired
    across architectures; resample_budgets None: the method's default), and compute the multipliers
    against the baseline at the grid's budgets and at the named budgets `at` (FLOPs), with the
    wall-clock multiplier when `wallclock` (None: when every architecture has a measured
    throughput); writes results_dir/fits.json and multipliers.csv.
    The wall-clock multiplier takes each run's throughput from results_dir/throughput.csv when
    there is one (analysis/throughput.py), else from the run's own tokens_per_s."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise NotADirectoryError(f"{results_dir}: expected the results directory holding runs.csv")
    runs = load_runs(results_dir)
    usable = average_seeds(usable_runs(runs))  # a cell trained with several seeds: their mean
    baseline = baseline_arch(runs)
    if usable.empty:
        # The table's content, not a bug: one line from the CLI (TableError), like a missing column.
        raise TableError(f"{results_dir}: no usable run (state 'done' with a finite final_val_loss)")
    throughput = load_throughput(results_dir)
    result = fit_method(usable, method, n_boot=n_boot, seed=seed, resample_budgets=resample_budgets)
    if baseline not in result.archs:
        reason = result.skipped.get(baseline, "it has no usable run")
        raise TableError(f"{results_dir}: cannot fit the baseline {baseline!r} by {method}: {reason}")
    timed = _timed_runs(usable, throughput)
    if wallclock is None:
        wallclock = _throughput_measured(timed)
    multipliers = multiplier_table(timed, result.fits, result.samples, baseline, at=at,
                                   wallclock=wallclock)
    if wallclock:
        multipliers = _with_throughput_range(multipliers, usable, throughput, baseline)
    tests = exponent_tests(result, baseline, INTERVAL)
    surfaces = _surfaces(usable, result)
    outliers = flag_outliers(runs, surfaces)
    fits_path, multipliers_path = results_dir / FITS_FILE, results_dir / MULTIPLIERS_FILE
    document = _fits_document(baseline, result, tests, outliers)
    atomic_write_text(fits_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    atomic_write_text(multipliers_path, multipliers.to_csv(index=False))
    return FitOutcome(runs, usable, baseline, result, multipliers, tests, surfaces, outliers,
                      fits_path, multipliers_path, throughput)


def _with_throughput_range(multipliers: pd.DataFrame, usable: pd.DataFrame, throughput: pd.DataFrame | None,
                           baseline: str) -> pd.DataFrame:
    """The wall-clock M's range over throughput.csv's repeated measurements, when it has them:
    round by round (each round's measurements of the architecture and the baseline together), or
    else at the extremes (the architecture at its slowest and the baseline at its fastest, and the
    reverse)."""
    rounds = [apply_throughput(usable, throughput, column) for column in round_columns(throughput)]
    if rounds:
        return throughput_range(multipliers, [(timed, timed) for timed in rounds], baseline)
    if has_range(throughput):
        slowest, fastest = (apply_throughput(usable, throughput, column) for column in RANGE_COLUMNS)
        return throughput_range(multipliers, [(slowest, fastest), (fastest, slowest)], baseline)
    return multipliers


def _timed_runs(usable: pd.DataFrame, throughput: pd.DataFrame | None) -> pd.DataFrame:
    """`usable` with the throughput of each (arch, size) trained alone when throughput.csv gave one:
    runs that shared a GPU measured their own under contention."""
    return usable if throughput is None else apply_throughput(usable, throughput)


def _surfaces(usable: pd.DataFrame, result: MethodResult) -> dict[str, SurfaceFit]:
    """Approach-3 surfaces of every architecture that has enough runs (reused when the method is
    Approach 3; fitted without a bootstrap otherwise)."""
    surfaces = {}
    for arch, group in usable.groupby("arch", sort=True):
        detail = result.archs[arch].detail if arch in result.archs else None
        if isinstance(detail, SurfaceFit):
            surfaces[arch] = detail
            continue
        N, D, L, C = surface_arrays(group)
        try:
            surfaces[arch] = fit_surface(N, D, L, kappa=kappa_of(group), C=C, warn=False)
        except ValueError:
            continue
    return surfaces


def _fits_document(
    baseline: str, result: MethodResult, tests: pd.DataFrame, outliers: pd.DataFrame
) -> dict[str, object]:
    document = {
        "method": result.method, "law": f"{LAWS[result.method]}; {UNITS}", "baseline": baseline,
        "n_boot": result.n_boot, "seed": result.seed, "resample_budgets": result.resample_budgets,
        "interval": INTERVAL, "percentiles": list(PERCENTILES),
        "archs": {arch: r.to_dict() for arch, r in result.archs.items()},
        "skipped": result.skipped,
        "exponent_tests": tests.to_dict(orient="records"),
        "warnings": list(result.warnings),
        "outliers": outliers.to_dict(orient="records"),
    }
    return _json_safe(document)


def _json_safe(value: object) -> object:
    """Plain JSON: non-finite floats become null, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _multiplier_cells(row: pd.Series) -> list[str]:
    """budget, M, interval, P(M > 1), loss of the arch, loss of the baseline at the same compute."""
    cells = [
        f"{row['budget']:.3g}", f"{row['multiplier']:.2f}x", f"{row['lo']:.2f}-{row['hi']:.2f}",
        f"{row['p_gt_1']:.2f}", f"{row['loss_arch']:.3f}", f"{row['loss_baseline_at_C']:.3f}",
    ]
    if "wall_multiplier" in row:
        spread = f"; {row['wall_tp_lo']:.2f}-{row['wall_tp_hi']:.2f}" if "wall_tp_lo" in row else ""
        cells.append(f"{row['wall_multiplier']:.2f}x ({row['wall_lo']:.2f}-{row['wall_hi']:.2f}{spread})")
    return cells


def _multiplier_headers(multipliers: pd.DataFrame, markdown: bool) -> list[str]:
    headers = (["budget C [FLOPs]", "M", f"{INTERVAL:.0%} interval", "P(M > 1)", "loss (arch)",
                "loss (baseline, same C)"] if markdown else
               ["C [FLOPs]", "M", f"{INTERVAL:.0%} CI", "P(M>1)", "L arch", "L base"])
    if "wall_multiplier" in multipliers.columns:
        spread = "; throughput range" if "wall_tp_lo" in multipliers.columns else ""
        headers.append(f"wall-clock M (interval{spread})")
    return headers


def format_multiplier_table(multipliers: pd.DataFrame, baseline: str) -> Table:
    """The multipliers as a rich Table (the CLI prints it); extrapolated rows are dimmed."""
    table = Table(
        title=f"Compute multiplier M vs {baseline}",
        caption=f"M = C_{baseline}(L_arch(C)) / C; M > 1: the architecture reaches the baseline's "
        "loss with M times less compute. P(M>1): share of paired bootstrap replicates with M > 1. "
        "extrap.: a fit used outside the compute it was fitted on",
        box=box.SIMPLE_HEAD,
    )
    for header in ["arch", *_multiplier_headers(multipliers, markdown=False), "note"]:
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
        [row["arch"], *_multiplier_cells(row), "extrapolated" if row["extrapolated"] else "interpolated"]
        for _, row in multipliers.iterrows()
    ]
    headers = ["architecture", *_multiplier_headers(multipliers, markdown=True), "budget is"]
    return _markdown_table(headers, rows)


def _interval(percentiles: dict[str, float]) -> str:
    return f"[{percentiles['p5']:.3g}, {percentiles['p95']:.3g}]"


def _laws_markdown(result: MethodResult, baseline: str) -> str:
    rows = []
    for arch, r in sorted(result.archs.items()):
        fit, boot = r.law, r.samples.percentiles()
        rows.append([
            arch + (" (baseline)" if arch == baseline else ""),
            f"{fit.E:.4g}" if fit.with_E else "0 (fixed)", f"{fit.A:.4g}", f"{fit.alpha:.4g}",
            _interval(boot["alpha"]), str(fit.n_points), f"{fit.c_min:.3g} - {fit.c_max:.3g}",
            f"{fit.rms:.2g}", f"{r.samples.n_valid}/{result.n_boot}",
        ])
    headers = ["architecture", "E", "A", "alpha", f"alpha {INTERVAL:.0%}", "points",
               "C range [FLOPs]", "rms log-loss residual", "valid replicates"]
    return _markdown_table(headers, rows)


def _exponent_tests_markdown(tests: pd.DataFrame) -> str:
    rows = [[
        row["arch"], row["exponent"], f"{row['value']:.4g}", f"{row['baseline_value']:.4g}",
        f"{row['difference']:+.4f}", f"[{row['lo']:+.4f}, {row['hi']:+.4f}]", f"{row['p_value']:.3f}",
    ] for _, row in tests.iterrows()]
    headers = ["architecture", "exponent", "value", "baseline", "difference",
               f"{INTERVAL:.0%} interval", "bootstrap p"]
    return _markdown_table(headers, rows)


def _surface_markdown(result: MethodResult, baseline: str) -> str:
    rows = []
    for arch, r in sorted(result.archs.items()):
        s = r.detail
        boot = r.to_dict()["surface"]["bootstrap"]

        def cell(name: str, fmt: str, s: SurfaceFit = s, boot: dict = boot) -> str:
            return (f"{getattr(s, name):{fmt}} "
                    f"[{boot[name]['p5']:{fmt}}, {boot[name]['p95']:{fmt}}]")

        rows.append([
            arch + (" (baseline)" if arch == baseline else ""), cell("E", ".4g"), cell("A", ".4g"),
            cell("B", ".4g"), cell("alpha", ".3f"), cell("beta", ".3f"),
            f"{s.params_exponent:.3f}", f"{s.kappa:.3g}", str(s.n_points),
            ", ".join(s.at_bounds) or "none",
        ])
    headers = ["architecture", "E", "A", "B", "alpha", "beta", "a = beta/(alpha+beta)", "kappa",
               "runs", "on a bound"]
    return _markdown_table(headers, rows)


def _allocation_markdown(result: MethodResult, baseline: str) -> str:
    rows = []
    for arch, r in sorted(result.archs.items()):
        law = r.allocation
        boot = law.to_dict()["bootstrap"]
        rows.append([
            arch + (" (baseline)" if arch == baseline else ""),
            f"{law.kN:.3g} C^{law.aN:.3f}", _interval(boot["aN"]),
            f"{law.kD:.3g} C^{law.aD:.3f}", _interval(boot["aD"]),
        ])
    headers = ["architecture", "N_opt(C)", f"aN {INTERVAL:.0%}", "D_opt(C)", f"aD {INTERVAL:.0%}"]
    return _markdown_table(headers, rows)


def _minima_markdown(fit: Approach2Fit, arch: str) -> str:
    rows = [[
        arch, f"{m['budget']:.3g}", str(m["n_sizes"]),
        *(("-", "-", "-") if m["rejected"] else
          (f"{m['N_opt']:.3g}", f"{m['D_opt']:.3g}", f"{m['L_opt']:.4f}")),
        m["rejected"] or "kept",
    ] for _, m in fit.minima.iterrows()]
    return _markdown_table(["architecture", "budget", "sizes", "N_opt", "D_opt", "L_opt", "minimum"],
                           rows)


def _outliers_markdown(outliers: pd.DataFrame) -> str:
    if outliers.empty:
        return "No run flagged."
    rows = [[row["run_id"], row["arch"], str(row["size"]),
             f"{row['budget']:.3g}" if np.isfinite(row["budget"]) else "ladder",
             f"{row['final_val_loss']:.4f}" if np.isfinite(row["final_val_loss"]) else "-",
             row["reason"]] for _, row in outliers.iterrows()]
    return _markdown_table(["run", "architecture", "size", "budget", "final loss", "reason"], rows)


def write_report(
    results_dir: str | Path,
    at: list[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    method: str = "frontier",
    wallclock: bool | None = None,
) -> Path:
    """Regenerate fits, multipliers and every plot from results_dir/runs.csv (and evals.csv when
    present) and write results_dir/report.md; returns its path. Plots go to results_dir/plots/.

    Besides `method` (which gives the multipliers), Approaches 2 and 3 are fitted for the
    compute-optimal allocation whenever the table supports them. Wall-clock multipliers are
    included whenever every architecture has a measured throughput (tokens_per_s, wallclock
    None); True includes them regardless (empty for an architecture without one), False leaves
    them out. With a throughput.csv beside runs.csv (`isoflop throughput`: each (architecture,
    size) trained alone) that table's tokens_per_s replaces the runs' own for the wall-clock
    multipliers, and the report says so.
    With a reference.yaml beside runs.csv (analysis/reference.py) the report holds the sweep
    against its figures.

    A table of associative-recall runs (a `task` column filled) gets the recall report instead
    (analysis/recall.py: accuracy per architecture; the fit options do not apply)."""
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    if is_recall_table(runs):
        return write_recall_report(results_dir)
    # Checked before the fits, so that a wrong reference file costs no bootstrap.
    reference = load_reference(results_dir, list(runs["arch"].unique()), baseline_arch(runs))
    outcome = run_fit(results_dir, at=at, n_boot=n_boot, seed=seed, method=method,
                      wallclock=wallclock)
    others = {
        name: (outcome.result if name == method else
               fit_method(outcome.usable, name, n_boot=n_boot, seed=seed, surfaces=outcome.surfaces))
        for name in ("approach2", "approach3")
    }
    plots_dir = results_dir / PLOTS_DIR
    figures = _draw_figures(outcome, others, plots_dir)
    holdout = holdout_check(outcome.usable, method, outcome.baseline, n_boot=n_boot, seed=seed)
    if holdout is not None:
        figures.append(("Held-out budget", plot_holdout(
            outcome.usable, holdout.result.fits, holdout.table, holdout.budget, outcome.baseline,
            plots_dir / "holdout.png")))
    evals = load_evals(results_dir)
    if evals is not None and not evals.empty:
        figures.append(("Training curves", plot_training_curves(
            evals, outcome.runs, outcome.baseline, plots_dir / "training_curves.png")))
    links = [(title, path.relative_to(results_dir)) for title, path in figures]
    seeds = _seed_lines(outcome, at, seed)
    text = _report_text(outcome, others, links, reference, seeds + _holdout_lines(holdout, outcome))
    report_path = results_dir / REPORT_FILE
    atomic_write_text(report_path, text)
    return report_path


def _draw_figures(
    outcome: FitOutcome, others: dict[str, MethodResult], plots_dir: Path
) -> list[tuple[str, Path]]:
    baseline, usable = outcome.baseline, outcome.usable
    figures = [
        ("IsoFLOP curves", plot_isoflop_curves(usable, baseline, plots_dir / "isoflop_curves.png")),
        ("Frontier and fits",
         plot_frontier(usable, outcome.fits, baseline, plots_dir / "frontier.png")),
        ("Compute multiplier", plot_multiplier(outcome.fits, outcome.samples, outcome.multipliers,
                                               baseline, plots_dir / "multiplier.png")),
    ]
    allocation_source = next((others[name] for name in ("approach3", "approach2")
                              if baseline in others[name].archs), None)
    if allocation_source is not None:
        minima = {arch: r.detail.minima[r.detail.minima["rejected"] == ""]
                  for arch, r in others["approach2"].archs.items()}
        allocations = {arch: r.allocation for arch, r in allocation_source.archs.items()}
        c_range = (float(usable["flops"].min()), float(usable["flops"].max()))
        title = (f"Compute-optimal allocation ({allocation_source.method}; points: Approach 2 "
                 "minima)")
        figures.append(("Compute-optimal N and D", plot_allocation(
            allocations, minima, c_range, baseline, title, plots_dir / "allocation.png")))
    if outcome.surfaces:
        figures.append(("Residuals", plot_residuals(usable, outcome.surfaces, outcome.outliers,
                                                    baseline, plots_dir / "residuals.png")))
    exponents = {arch: {"E": (r.law.E, r.samples.E), **r.exponents}
                 for arch, r in outcome.result.archs.items()}
    figures.append(("Bootstrap distributions", plot_bootstrap_distributions(
        exponents, baseline, f"Bootstrap replicates ({outcome.method}, {outcome.n_boot} paired "
        "resamples; line: full-data fit)", plots_dir / "bootstrap.png")))
    return figures


def _throughput_measured(usable: pd.DataFrame) -> bool:
    """Whether every architecture has runs with a measured throughput (for wall-clock M)."""
    archs = usable["arch"].unique()
    return len(archs) > 0 and all(seconds_per_flop(usable, arch) is not None for arch in archs)


def _report_text(
    outcome: FitOutcome,
    others: dict[str, MethodResult],
    figures: list[tuple[str, Path]],
    reference: Reference | None = None,
    checks: list[str] | None = None,  # sections after the multipliers: Seeds, Held-out budget
) -> str:
    runs, usable, result, baseline = outcome.runs, outcome.usable, outcome.result, outcome.baseline
    sweeps = ", ".join(sorted(str(s) for s in runs["sweep"].dropna().unique()))
    archs = sorted(runs["arch"].unique())
    counts = runs["state"].value_counts().sort_index()
    states = ", ".join(f"{state}: {count}" for state, count in counts.items())
    budgets = isoflop_budgets(usable)
    resampled = "budgets and sizes" if result.resample_budgets else "sizes within each budget"
    if N_SEEDS in usable.columns:
        resampled += ", and each cell's seeds"
    lines = [
        f"# Report: {sweeps}",
        "",
        f"- architectures: {', '.join(archs)}; baseline: **{baseline}**",
        f"- runs: {len(runs)} ({states}); used in fits: {_used_in_fits(usable)}",
        "- grid: " + (f"isoflop, budgets {', '.join(f'{b:.3g}' for b in budgets)} FLOPs" if len(budgets)
                      else "ladder (no budgets)"),
        f"- method: **{result.method}**: {LAWS[result.method]}; {UNITS}",
        "",
        "## Compute multipliers",
        "",
        (f"M(C) = C_{baseline}(L_arch(C)) / C: the compute the baseline needs to reach the loss "
         "the architecture reaches with C, over C. Intervals: "
         f"{INTERVAL:.0%} paired bootstrap ({result.n_boot} resamples, seed {result.seed}; "
         f"{resampled} redrawn, the same draws for every architecture). P(M > 1): share of "
         "replicates with M > 1. Extrapolated: a law used outside the compute range it was fitted "
         "on (the architecture's at C or the baseline's at M*C)."),
        "",
        (_multipliers_markdown(outcome.multipliers) if len(outcome.multipliers)
         else "No architecture besides the baseline has a fit."),
        "",
        *(_wallclock_lines(outcome) if "wall_multiplier" in outcome.multipliers.columns else []),
        *(checks or []),
        *_grid_edge_lines(usable),
        *(_reference_lines(reference, outcome.multipliers, baseline) if reference else []),
        "## Do the exponents differ?",
        "",
        ("Difference of each exponent from the baseline's over the paired replicates; p: "
         "two-sided bootstrap p-value of no difference."),
        "",
        (_exponent_tests_markdown(outcome.exponent_tests) if len(outcome.exponent_tests)
         else "No architecture besides the baseline has a fit."),
        "",
        "## Fits",
        "",
        (f"{LAWS[result.method]}. With fewer than {MIN_POINTS_FOR_E} budgets a frontier law fixes "
         "E to 0 (a straight line in log-log)."),
        "",
        _laws_markdown(result, baseline),
        "",
    ]
    if result.skipped:
        reasons = "; ".join(f"{arch} ({why})" for arch, why in sorted(result.skipped.items()))
        lines += [f"Not fitted: {reasons}", ""]
    lines += _approach_sections(others, baseline)
    lines += ["## Flagged runs", "", _outliers_markdown(outcome.outliers), ""]
    notes = sorted(set(result.warnings) | {w for r in others.values() for w in r.warnings})
    if notes:
        lines += ["## Warnings", "", *(f"- {note}" for note in notes), ""]
    lines += ["## Plots", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path.as_posix()})", ""]
    lines += ["## Provenance", "", *provenance_lines(runs),
              f"- generated by isoflop {__version__} from runs.csv", ""]
    return "\n".join(lines)


def _used_in_fits(usable: pd.DataFrame) -> str:
    if N_SEEDS not in usable.columns:
        return f"{len(usable)} (done, finite final loss)"
    return (f"{int(usable[N_SEEDS].sum())} (done, finite final loss), as {len(usable)} cells: each "
            "cell's seeds averaged (section Seeds)")


def _seed_lines(outcome: FitOutcome, at: list[float] | None, boot_seed: int) -> list[str]:
    """The section on cells trained with several seeds (nothing when none was): how far a cell's
    seeds lie apart, and the multipliers each seed's runs give alone against the pooled band."""
    spread = seed_spread(outcome.usable)
    if spread.empty:
        return []
    baseline, method = outcome.baseline, outcome.method

    def multipliers_of(one_seed: pd.DataFrame) -> pd.DataFrame:
        fits = fit_method(one_seed, method, n_boot=1, seed=boot_seed)  # point estimates only
        if baseline not in fits.archs:
            return pd.DataFrame(columns=["arch", "budget", "multiplier"])
        return multiplier_table(one_seed, fits.fits, fits.samples, baseline, at=at)

    runs = usable_runs(outcome.runs)  # each seed's own rows
    per_seed = per_seed_multipliers(runs, baseline, multipliers_of)
    seeds = sorted(int(s) for s in runs["seed"].unique())
    lines = [
        "## Seeds",
        "",
        (f"{len(spread)} cells (architecture, budget, size) were trained with several seeds "
         f"(seeds {', '.join(map(str, seeds))}). Everything above uses each cell's mean loss, and "
         "the bootstrap redraws each cell's seeds with replacement (frontier and Approach 2; "
         "Approach 3 fits the means), so the bands include the run-to-run noise the seeds show. "
         "A cell's spread: the standard deviation of its seeds' losses over their mean."),
        "",
        _markdown_table(
            ["architecture", "cells", "seeds per cell", "median spread", "largest spread (cell)"],
            [[arch, str(len(group)), count_span(group["n_seeds"]),
              f"{100 * (group['std'] / group['mean']).median():.2f}%",
              _largest_spread(group)]
             for arch, group in spread.groupby("arch", sort=True)]),
        "",
    ]
    complete = sorted(int(s) for s in per_seed["seed"].unique())
    if len(complete) < 2:
        # One seed's fit alone has nothing to be compared with: no spread to show.
        which = f"Only seed {complete[0]} ran" if complete else "No seed ran"
        return [*lines, f"{which} every cell, so no two seeds' runs are fitted alone side by side.", ""]
    lines += [
        (f"Each seed's runs fitted alone ({method}): the multiplier a sweep of that one seed would "
         "have reported, beside the pooled fit's and its band."),
        "",
        _per_seed_table(outcome.multipliers, per_seed),
        "",
    ]
    return lines


def _largest_spread(group: pd.DataFrame) -> str:
    row = group.loc[(group["std"] / group["mean"]).idxmax()]
    where = f" at {row['budget']:.3g}" if math.isfinite(row["budget"]) else ", ladder"
    return f"{100 * row['std'] / row['mean']:.2f}% ({row['size']}{where})"


def _per_seed_table(pooled: pd.DataFrame, per_seed: pd.DataFrame) -> str:
    seeds = sorted(per_seed["seed"].unique())
    wide = per_seed.pivot_table(index=["arch", "budget"], columns="seed", values="multiplier")
    rows, inside, total = [], 0, 0
    for _, row in pooled.iterrows():
        key = (row["arch"], row["budget"])
        if key not in wide.index:
            continue
        values = wide.loc[key, seeds].to_numpy(float)
        inside += int(np.sum((values >= row["lo"]) & (values <= row["hi"])))
        total += int(np.sum(np.isfinite(values)))
        rows.append([row["arch"], f"{row['budget']:.3g}",
                     f"{row['multiplier']:.2f}x ({row['lo']:.2f}-{row['hi']:.2f})",
                     *(f"{v:.2f}x" for v in values), f"{np.nanmax(values) - np.nanmin(values):.2f}"])
    headers = ["architecture", "budget C [FLOPs]", "pooled M (90% band)",
               *(f"seed {s}" for s in seeds), "seeds' range"]
    return (_markdown_table(headers, rows)
            + f"\n\n{inside} of {total} single-seed multipliers lie inside the pooled band.")


def _holdout_lines(holdout: Holdout | None, outcome: FitOutcome) -> list[str]:
    """The held-out budget section (nothing with fewer than three budgets): each law refitted
    without the largest budget, its prediction there against the runs, and the multipliers."""
    if holdout is None or holdout.table.empty:
        return []
    held, table = holdout.budget, holdout.table
    fitted = ", ".join(f"{b:.3g}" for b in holdout.fitted_budgets)
    full = outcome.multipliers[outcome.multipliers["budget"] == held].set_index("arch")
    rows = []
    for _, row in table.iterrows():
        edge = ", at the grid's edge" if row["observed_at_edge"] else ""
        if row["arch"] == outcome.baseline:
            without = with_it = "(baseline)"
        else:
            without = f"{row['multiplier']:.2f}x ({row['m_lo']:.2f}-{row['m_hi']:.2f})"
            with_it = (f"{full.loc[row['arch'], 'multiplier']:.2f}x" if row["arch"] in full.index
                       else "-")
        rows.append([row["arch"], f"{row['predicted']:.4g} ({row['lo']:.4g}-{row['hi']:.4g})",
                     f"{row['observed']:.4g} ({row['observed_size']}{edge})",
                     f"{100 * row['error']:+.1f}%", "yes" if row["inside"] else "no", without,
                     with_it])
    if holdout.result.skipped:
        rows += [[arch, f"not fitted without {held:.3g}: {why}", "-", "-", "-", "-", "-"]
                 for arch, why in sorted(holdout.result.skipped.items())]
    missed = table[~table["inside"].astype(bool)]
    verdict = (f"Every architecture's loss at {held:.3g} lies inside the band its law predicted."
               if missed.empty else
               f"Outside the predicted band: {', '.join(missed['arch'])}. The bands of multipliers "
               "read past the grid's largest budget leave out errors of this size.")
    return [
        "## Held-out budget",
        "",
        (f"Does the law predict? Each architecture refitted ({outcome.method}) on {fitted} only, "
         f"without the largest budget {held:.3g}, predicts its compute-optimal loss there, beside "
         "what the runs reached: the lowest loss of that budget (a cell's seeds averaged). The band "
         f"is the {INTERVAL:.0%} paired bootstrap as above: it carries the runs' noise, not the "
         f"choice of law{'' if outcome.method == 'approach3' else ' (E fixed to 0 below four budgets)'}. "
         "Error: predicted over reached, minus 1; "
         "negative where the law promised more than the runs gave. At the grid's edge: the lowest "
         "loss is at the smallest or largest size run there, so the optimum may be lower still. "
         f"The last two columns give the multiplier at {held:.3g} from the laws fitted without it "
         "(with their band) and from the fit on every budget (the table above)."),
        "",
        _markdown_table(
            ["architecture", "predicted loss (90% band)", "reached (size)", "error",
             "inside the band?", f"M without {held:.3g}", "M with it"], rows),
        "",
        verdict,
        "",
    ]


def _grid_edge_lines(usable: pd.DataFrame) -> list[str]:
    """A warning where the frontier runs sit at an edge of the sizes run, or the check's outcome
    where none does: a reader who finds no section cannot tell a passed check from one not made.
    Nothing for tables without isoflop budgets (ladders, recall grids)."""
    isoflop = usable[np.isfinite(usable["budget"])]
    if isoflop.empty:
        return []
    edges = grid_edges(usable)
    if edges.empty:
        sizes = isoflop.groupby(["arch", "budget"])["params"].nunique()
        checked = int((sizes >= GRID_CHECK_MIN_SIZES).sum())
        if checked == 0:
            outcome = (f"No budget ran {GRID_CHECK_MIN_SIZES} sizes or more for an architecture, so "
                       "the grid cannot show whether its lowest-loss runs bracket the compute-optimal "
                       "size.")
        elif checked == len(sizes):
            outcome = ("At every budget each architecture's lowest-loss run is an inner size of the "
                       "grid run there: every frontier point is bracketed by a smaller and a larger "
                       "size.")
        else:
            outcome = (f"In the {checked} of {len(sizes)} (architecture, budget) pairs that ran "
                       f"{GRID_CHECK_MIN_SIZES} sizes or more, the lowest-loss run is an inner size: "
                       "those frontier points are bracketed by a smaller and a larger size. The "
                       "others cannot be checked.")
        return ["## Grid check", "", outcome, ""]
    lines = [
        "## Grid check",
        "",
        ("At these budgets the lowest-loss run is the smallest or the largest size of the grid, so "
         "the compute-optimal size may lie outside it: the frontier passes through that edge run "
         "and overstates the loss reachable with the budget (more so for an architecture whose "
         "optimum lies further out), and the multipliers above inherit that bias. Shift or widen "
         "the sizes there to bracket the optimum."),
        "",
    ]
    for arch, group in edges.groupby("arch", sort=True):
        cells = [f"{edge} size ({size}) at {budget:.3g}"
                 for budget, size, edge in zip(group["budget"], group["size"], group["edge"])]
        lines.append(f"- {arch}: " + "; ".join(cells))
    return [*lines, ""]


def _wallclock_lines(outcome: FitOutcome) -> list[str]:
    """What the wall-clock multipliers mean, which throughput they use (throughput.csv or the
    runs' own), and the relative cost per FLOP behind them."""
    baseline, usable = outcome.baseline, outcome.timed
    base_speed = seconds_per_flop(usable, baseline)
    costs = []
    for arch, rows in outcome.multipliers.groupby("arch", sort=True):
        speed = seconds_per_flop(usable, arch)
        if speed is None or base_speed is None:
            costs.append(f"{arch}: not measured")
            continue
        C = rows["budget"].to_numpy(float)
        ratio = wall_time(speed, C) / wall_time(base_speed, C)
        costs.append(f"{arch}: " + ", ".join(f"{r:.2f} at {c:.3g}" for r, c in zip(ratio, C)))
    return [
        (f"Wall-clock M: the time {baseline} needs to reach the architecture's loss over the time "
         f"the architecture needs for C, {_throughput_source(outcome)}. It is the compute "
         "multiplier divided by the architecture's cost per FLOP "
         f"relative to {baseline}'s (M / s when each FLOP takes s times as long): above M when the "
         "architecture's FLOPs run faster, below it when they run slower. Seconds per FLOP are a "
         "line in log-log against compute through each architecture's frontier runs; the band "
         "carries M's replicates with the throughput taken as known."
         + (_range_note(outcome.throughput) if "wall_tp_lo" in outcome.multipliers.columns else "")
         + ("" if outcome.throughput is not None else _CONTENTION_CAVEAT)),
        "",
        f"Measured seconds per FLOP relative to {baseline}, at each budget: " + "; ".join(costs) + ".",
        "",
    ]


def _range_note(throughput: pd.DataFrame) -> str:
    """What the throughput range after the band is (isoflop throughput --repeats)."""
    if round_columns(throughput):
        how = ("at each measurement round's throughput, lowest to highest, with each round's ratio "
               "taken between that round's measurements of the architecture and the baseline "
               "(throughput.csv's tokens_per_s_rounds), so a drift of the host that hit a whole round "
               "cancels; the point estimate takes each model's median over the rounds, which may come "
               "from different rounds, so it can lie just outside this range")
    else:
        how = ("with the architecture timed at its slowest measurement and the baseline at its "
               "fastest, and the reverse (throughput.csv's tokens_per_s_min and tokens_per_s_max)")
    return (f" The throughput range after the band is M's point estimate {how}: the spread of "
            "repeated measurements, which the band leaves out.")


# Only for the runs' own throughput: measured alone (throughput.csv), nothing ran beside a model.
_CONTENTION_CAVEAT = (
    " Caveat: runs that shared a GPU (several workers on one device) measured their throughput "
    "under contention with whatever ran beside them, and small models use a GPU less well than "
    "large ones, so these costs are those of this sweep's machine and schedule, not of the "
    "operator alone."
)


def _throughput_source(outcome: FitOutcome) -> str:
    if outcome.throughput is None:
        return "at the throughput measured in these runs (tokens_per_s, training only)"
    return ("at the throughput of each (architecture, size) trained alone "
            f"({describe_throughput(outcome.throughput)})")


def _reference_lines(reference: Reference, multipliers: pd.DataFrame, baseline: str) -> list[str]:
    """The section holding our multipliers, their order and their fitted range against the
    published figures of reference.yaml."""
    lines = ["## Against the published figures", "", f"Source: {reference.source}", ""]
    if reference.note:
        lines += [f"Note: {reference.note}", ""]
    lines += [
        (f"Ours: M against {baseline} at each budget with its {INTERVAL:.0%} band (from the "
         "table above). Published inside our band: the published figure lies within it, i.e. "
         "this sweep cannot tell its multiplier from the published one there."),
        "",
    ]
    rows = []
    for arch in sorted(set(multipliers["arch"]) | set(reference.multipliers)):
        ours = multipliers[multipliers["arch"] == arch]
        cells = "; ".join(f"{r.budget:.3g}: {r.multiplier:.2f}x ({r.lo:.2f}-{r.hi:.2f})"
                          for r in ours.itertuples()) or "not fitted"
        published = reference.multipliers.get(arch)
        if published is None:
            rows.append([arch, cells, "not given", "-"])
            continue
        rows.append([arch, cells, f"{published:.2f}x",
                     band_verdict(published_inside_band(multipliers, arch, published))])
    lines += [_markdown_table(["architecture", f"ours: M ({INTERVAL:.0%} band) at each budget",
                               "published", "published inside our band?"], rows), ""]
    budgets = sorted(multipliers["budget"].unique())
    lines += _ordering_lines(reference, multipliers, baseline, budgets)
    lines += ["Fitted range: whether each multiplier is read inside the compute range its laws were "
              "fitted on (interpolated) or outside it (extrapolated).", ""]
    for budget in budgets:
        rows = multipliers[multipliers["budget"] == budget]
        outside = sorted(rows.loc[rows["extrapolated"].astype(bool), "arch"])
        inside = sorted(rows.loc[~rows["extrapolated"].astype(bool), "arch"])
        if not outside:
            verdict = "inside the fitted range for every architecture"
        elif not inside:
            verdict = "outside the fitted range (extrapolated) for every architecture"
        else:
            verdict = (f"inside the fitted range for {', '.join(inside)}; outside (extrapolated) "
                       f"for {', '.join(outside)}")
        lines.append(f"- {budget:.3g}: {verdict}")
    return lines + [""]


def _ordering_lines(
    reference: Reference, multipliers: pd.DataFrame, baseline: str, budgets: list[float]
) -> list[str]:
    expected = reference.ordering
    lines = [("Expected order, worst to best: " + " < ".join(expected) + ".") if expected
             else "No expected order given.",
             "", f"Observed order by M at each budget ({baseline} = 1):", ""]
    for budget in budgets:
        order = observed_order(multipliers, baseline, budget)
        observed = " < ".join(
            p.arch + ("" if p.arch == baseline else
                      f" {p.multiplier:.2f}x ({p.lo:.2f}-{p.hi:.2f})") for p in order)
        line = f"- {budget:.3g}: {observed}"
        if expected:
            swaps = swapped_pairs(order, expected)
            if not swaps:
                line += ": matches the expected order"
            else:
                line += ": does not match; swapped: " + "; ".join(
                    f"{a.arch} above {b.arch}, expected below ("
                    + ("bands overlap: the data cannot tell them apart" if a.overlaps(b)
                       else "bands apart") + ")" for a, b in swaps)
            missing = [arch for arch in expected if arch not in {p.arch for p in order}]
            if missing:
                line += f" (no multiplier here: {', '.join(missing)})"
        lines.append(line)
    return lines + [""]


def _approach_sections(others: dict[str, MethodResult], baseline: str) -> list[str]:
    approach3, approach2 = others["approach3"], others["approach2"]
    lines = ["## Approach 3: the loss surface", ""]
    if approach3.archs:
        lines += [
            ("L(N, D) = E + A/N^alpha + B/D^beta (N non-embedding parameters, D tokens), Huber "
             "(delta 1e-3) on log-loss, L-BFGS-B from a grid of starts; brackets: "
             f"{INTERVAL:.0%} paired bootstrap, budgets and sizes redrawn. kappa: median FLOPs per "
             "parameter-token, the C = kappa N D of the closed-form optimum."),
            "",
            _surface_markdown(approach3, baseline),
            "",
            _allocation_markdown(approach3, baseline),
            "",
        ]
    if approach3.skipped:
        lines += ["Not fitted: " + "; ".join(f"{a} ({w})" for a, w in sorted(approach3.skipped.items())),
                  ""]
    lines += ["## Approach 2: minima of the IsoFLOP curves", ""]
    if approach2.archs:
        lines += [
            ("A robust parabola in log N per budget; a budget whose minimum the grid does not "
             "bracket is rejected."),
            "",
            _allocation_markdown(approach2, baseline),
            "",
            *(line for arch, r in sorted(approach2.archs.items())
              for line in (_minima_markdown(r.detail, arch), "")),
        ]
    if approach2.skipped:
        lines += ["Not fitted: " + "; ".join(f"{a} ({w})" for a, w in sorted(approach2.skipped.items())),
                  ""]
    return lines

