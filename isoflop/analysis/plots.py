"""The report's figures, drawn from the tidy table and the fits only (so anyone can redraw them).

Figures are built on matplotlib's object API with the Agg canvas: no pyplot, no global backend
switch, no display needed. Each architecture keeps one colour in every figure (the baseline black);
each budget keeps one colour of a sequential map in the per-budget figures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from isoflop.analysis.allocation import AllocationLaw
from isoflop.analysis.approach3 import SurfaceFit
from isoflop.analysis.bootstrap import PowerLawSamples
from isoflop.analysis.fits import PowerLawFit, frontier_points
from isoflop.analysis.multiplier import multiplier_band
from isoflop.analysis.seeds import N_SEEDS, SEED_LOSSES, count_span, seed_losses
from isoflop.atomic import atomic_output

DPI = 120
COMPUTE_LABEL = "training compute C [FLOPs]"
LOSS_LABEL = "validation loss [nats/token]"
PARAMS_LABEL = "parameters (non-embedding)"
TOKENS_LABEL = "training tokens"
_FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9}
_BUDGET_CMAP = "viridis"
_ARCH_CMAP = "tab10"

P = ParamSpec("P")
R = TypeVar("R")


def _styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Draw under the report's font sizes without touching the caller's matplotlib settings."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(_FONT):
            return draw(*args, **kwargs)

    return wrapper


def arch_colors(archs: list[str], baseline: str) -> dict[str, object]:
    """One colour per architecture: the baseline black, the others tab10 in sorted order."""
    palette = colormaps[_ARCH_CMAP]
    others = sorted(a for a in archs if a != baseline)
    colors: dict[str, object] = {arch: palette(i % 10) for i, arch in enumerate(others)}
    colors[baseline] = "black"
    return colors


def _arch_order(archs: object, baseline: str) -> list[str]:
    """The baseline first (when present), then the others sorted."""
    archs = set(archs)
    return [a for a in [baseline] if a in archs] + sorted(archs - {baseline})


def _panel_title(arch: str, baseline: str) -> str:
    return arch + (" (baseline)" if arch == baseline else "")


def _new_figure(
    n_panels: int = 1, width: float = 6.4, height: float = 4.6
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, sharex=True, sharey=True, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG through a temporary file, so a reader never sees half a figure."""
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _tick_label(value: float, _position: object = None) -> str:
    return f"{value:.2g}".replace("e+0", "e").replace("e+", "e")


def _log_ticks(axis: Axis, values: np.ndarray) -> None:
    """Readable labels on a log axis: decades when the data span more than about one, else ~6
    round ticks (over less than a decade a log axis gets one label or none, or crowded minor ones)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    axis.set_minor_formatter(NullFormatter())
    if not len(values) or values.max() / values.min() >= 100:
        return
    ticks = np.unique([float(f"{t:.2g}") for t in np.geomspace(values.min(), values.max(), 6)])
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(_tick_label)


def _budget_norm(runs: pd.DataFrame) -> LogNorm | None:
    budgets = runs["budget"].to_numpy(float)
    budgets = budgets[np.isfinite(budgets)]
    if not len(budgets):
        return None
    return LogNorm(vmin=budgets.min(), vmax=max(budgets.max(), budgets.min() * 1.0001))


def _budget_color(norm: LogNorm | None, budget: float) -> object:
    if norm is None or not np.isfinite(budget):
        return "grey"
    return colormaps[_BUDGET_CMAP](0.9 * float(norm(budget)))  # the map's last tenth is too pale


def _budget_label(budget: float) -> str:
    return f"C = {_tick_label(budget)}" if np.isfinite(budget) else "ladder"


@_styled
def plot_isoflop_curves(runs: pd.DataFrame, baseline: str, path: Path) -> Path:
    """Final loss vs model size, one line per budget, one panel per architecture; a star marks the
    best size of each budget (the frontier point). Ladder runs (no budget) are one grey line. Where
    cells were trained with several seeds (analysis/seeds.py), points are their means and a bar
    spans each cell's lowest to highest seed."""
    archs = _arch_order(runs["arch"].unique(), baseline)
    fig, axes = _new_figure(len(archs), width=4.8)
    norm = _budget_norm(runs)
    for ax, arch in zip(axes, archs):
        group = runs[runs["arch"] == arch]
        for budget, cell in group[np.isfinite(group["budget"])].groupby("budget", sort=True):
            cell = cell.sort_values("params_non_embedding")
            color = _budget_color(norm, budget)
            ax.plot(cell["params_non_embedding"], cell["final_val_loss"], "o-", color=color, ms=5,
                    label=_budget_label(budget))
            _seed_ranges(ax, cell, color)
            best = cell.loc[cell["final_val_loss"].idxmin()]
            ax.plot(best["params_non_embedding"], best["final_val_loss"], "*", color=color, ms=15,
                    markeredgecolor="black", zorder=3)
        ladder = group[~np.isfinite(group["budget"])].sort_values("params_non_embedding")
        if len(ladder):
            ax.plot(ladder["params_non_embedding"], ladder["final_val_loss"], "o-", color="grey",
                    label=_budget_label(np.nan))
        ax.set_xscale("log")
        ax.set_title(_panel_title(arch, baseline))
        ax.set_xlabel(PARAMS_LABEL)
        ax.legend(title="budget [FLOPs]" if norm else None, loc="upper right")
    _log_ticks(axes[0].xaxis, runs["params_non_embedding"].to_numpy(float))
    axes[0].set_ylabel(LOSS_LABEL)
    seeds = (f"; mean of {count_span(runs[N_SEEDS])} seeds, bars: their range"
             if N_SEEDS in runs.columns else "")
    fig.suptitle("IsoFLOP curves: final validation loss vs model size (star: best size per budget"
                 f"{seeds})")
    return _save(fig, path)


def _seed_ranges(ax, cells: pd.DataFrame, color) -> None:
    """A vertical bar from each cell's lowest to its highest seed's loss (nothing for one seed)."""
    if SEED_LOSSES not in cells.columns:
        return
    losses = seed_losses(cells)
    ax.vlines(cells["params_non_embedding"], [v.min() for v in losses], [v.max() for v in losses],
              color=color, lw=1.5, alpha=0.8)


@_styled
def plot_frontier(
    runs: pd.DataFrame, fits: dict[str, PowerLawFit], baseline: str, path: Path
) -> Path:
    """Every run (faint), the frontier points and each fitted law on log-log axes: solid over the
    compute the law was fitted on, dashed where it is extrapolated to the other laws' range."""
    fig, (ax,) = _new_figure()
    colors = arch_colors(list(runs["arch"].unique()), baseline)
    c_lo = min(f.c_min for f in fits.values()) / 1.5
    c_hi = max(f.c_max for f in fits.values()) * 1.5
    for arch in _arch_order(fits, baseline):
        fit, group, color = fits[arch], runs[runs["arch"] == arch], colors[arch]
        ax.plot(group["flops"], group["final_val_loss"], ".", color=color, alpha=0.25, ms=6)
        points = frontier_points(group)
        ax.plot(points["C"], points["L"], "o", color=color, ms=7, markeredgecolor="white")
        inside = np.geomspace(fit.c_min, fit.c_max, 100)
        law = f"alpha={fit.alpha:.3g}, " + (f"E={fit.E:.3g}" if fit.with_E else "E fixed to 0")
        ax.plot(inside, fit.predict(inside), "-", color=color, lw=2, label=f"{arch}: {law}")
        for span in (np.geomspace(c_lo, fit.c_min, 30), np.geomspace(fit.c_max, c_hi, 30)):
            ax.plot(span, fit.predict(span), "--", color=color, lw=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, np.array([c_lo, c_hi]))
    _log_ticks(ax.yaxis, runs["final_val_loss"].to_numpy(float))
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Compute-optimal frontier and fitted L(C) = E + A C^-alpha")
    ax.legend(loc="upper right")
    return _save(fig, path)


@_styled
def plot_holdout(
    usable: pd.DataFrame,
    fits: dict[str, PowerLawFit],
    predictions: pd.DataFrame,
    held: float,
    baseline: str,
    path: Path,
) -> Path:
    """The held-out check (analysis/holdout.py) on log-log axes: the frontier points the laws were
    fitted on (filled), each law fitted without the largest budget extended to it (dotted), its
    prediction there with the 90% band (a bar, just left of the budget) and what the runs reached
    (a hollow point on the budget). predictions: holdout.py's table (arch, predicted, lo, hi)."""
    fig, (ax,) = _new_figure()
    predictions = predictions.set_index("arch")
    colors = arch_colors(list(fits), baseline)
    archs = _arch_order(fits, baseline)
    offsets = np.geomspace(0.82, 0.95, len(archs))  # the bars side by side, left of the budget
    for arch, offset in zip(archs, offsets):
        fit, color = fits[arch], colors[arch]
        group = usable[usable["arch"] == arch]
        budgets = group["budget"].to_numpy(float)
        fitted, observed = frontier_points(group[budgets < held]), frontier_points(group[budgets == held])
        ax.plot(fitted["C"], fitted["L"], "o", color=color, ms=7, markeredgecolor="white")
        inside = np.geomspace(fit.c_min, fit.c_max, 60)
        ax.plot(inside, fit.predict(inside), "-", color=color, lw=2, label=arch)
        beyond = np.geomspace(fit.c_max, held, 30)
        ax.plot(beyond, fit.predict(beyond), ":", color=color, lw=1.5)
        if arch in predictions.index:
            predicted, lo, hi = predictions.loc[arch, ["predicted", "lo", "hi"]].astype(float)
            ax.errorbar([held * offset], [predicted], yerr=[[predicted - lo], [hi - predicted]],
                        fmt="s", color=color, ms=5, capsize=3, lw=1.5)
        ax.plot(observed["C"], observed["L"], "o", ms=9, color=color, markerfacecolor="white",
                markeredgewidth=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, usable["flops"].to_numpy(float))
    _log_ticks(ax.yaxis, usable["final_val_loss"].to_numpy(float))
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"Held-out budget {_tick_label(held)}: laws fitted on the budgets below\n"
                 "bar: their prediction there (90% band); hollow: the runs' best")
    ax.legend(loc="upper right")
    return _save(fig, path)


BAND_CLIP = 3.0  # the multiplier axis spans the estimates x/÷ this at most


@_styled
def plot_multiplier(
    fits: dict[str, PowerLawFit],
    samples: dict[str, PowerLawSamples],
    multipliers: pd.DataFrame,
    baseline: str,
    path: Path,
) -> Path:
    """M(C) per architecture with its 90% bootstrap band, the reported budgets as points (hollow
    where extrapolated) and the baseline at M = 1. M is a ratio, so the y axis is logarithmic; its
    range follows the point estimates (x/÷ BAND_CLIP at most), so a band that explodes where the
    data are thin (few sizes per budget, one seed) cannot flatten the curves, and the plot says so
    when it cuts a band."""
    fig, (ax,) = _new_figure()
    colors = arch_colors(list(fits), baseline)
    base_fit = fits[baseline]
    budgets = multipliers["budget"].to_numpy(float)
    c_lo = min([f.c_min for f in fits.values()] + list(budgets))
    c_hi = max([f.c_max for f in fits.values()] + list(budgets))
    C = np.geomspace(c_lo, c_hi, 120)
    ax.axhline(1.0, color="black", lw=1.2, label=f"{baseline} (baseline)")
    estimates, band = [1.0], []
    for arch in _arch_order(fits, baseline)[1:]:
        fit, color = fits[arch], colors[arch]
        M, lo, hi = multiplier_band(fit, base_fit, samples[arch], samples[baseline], C)
        inside = fit.covers(C) & base_fit.covers(M * C)
        ax.fill_between(C, lo, hi, color=color, alpha=0.15, lw=0)
        ax.plot(C, np.where(inside, M, np.nan), "-", color=color, lw=2, label=f"{arch} (90% band)")
        ax.plot(C, np.where(inside, np.nan, M), "--", color=color, lw=1.2)
        rows = multipliers[multipliers["arch"] == arch]
        for extrapolated, part in rows.groupby("extrapolated"):
            ax.plot(part["budget"], part["multiplier"], "o", ms=7, color=color,
                    markerfacecolor="white" if extrapolated else color)
        estimates += list(M[inside & np.isfinite(M) & (M > 0)])
        estimates += list(rows["multiplier"][np.isfinite(rows["multiplier"]) & (rows["multiplier"] > 0)])
        shown = inside & np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
        band += list(lo[shown]) + list(hi[shown])
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, C)
    floor, ceiling = min(estimates) / BAND_CLIP, max(estimates) * BAND_CLIP
    y_lo = max(floor, min(band + estimates)) / 1.1
    y_hi = min(ceiling, max(band + estimates)) * 1.1
    ax.set_ylim(y_lo, y_hi)
    _log_ticks(ax.yaxis, np.array([y_lo, y_hi]))
    if band and (min(band) < floor or max(band) > ceiling):
        ax.text(0.99, 0.01, "band cut at the axis limits", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="0.35")
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(f"compute multiplier vs {baseline}")
    ax.set_title("M(C) = C_baseline(L_arch(C)) / C  (dashed, hollow: extrapolated)")
    ax.legend(loc="best")
    return _save(fig, path)


@_styled
def plot_training_curves(evals: pd.DataFrame, runs: pd.DataFrame, baseline: str, path: Path) -> Path:
    """Validation loss vs tokens seen, one line per run coloured by its budget, one panel per arch."""
    evals = evals[np.isfinite(evals["val_loss"]) & (evals["tokens"] > 0)]
    evals = evals.merge(runs[["run_id", "budget"]], on="run_id", how="left")
    archs = _arch_order(evals["arch"].unique(), baseline)
    fig, axes = _new_figure(max(1, len(archs)), width=4.8)
    norm = _budget_norm(runs)
    for ax, arch in zip(axes, archs):
        curves = evals[evals["arch"] == arch].sort_values(["budget", "run_id", "tokens"])
        labelled: set[str] = set()  # one legend entry per budget
        for _, curve in curves.groupby(["budget", "run_id"], sort=False, dropna=False):
            budget = float(curve["budget"].iloc[0])
            label = _budget_label(budget)
            ax.plot(curve["tokens"], curve["val_loss"], "-", color=_budget_color(norm, budget), lw=1.2,
                    alpha=0.8, label=None if label in labelled else label)
            labelled.add(label)
        ax.set_xscale("log")
        ax.set_xlabel(TOKENS_LABEL)
        ax.set_title(_panel_title(arch, baseline))
        if labelled:
            ax.legend(title="budget [FLOPs]", loc="upper right")
    _log_ticks(axes[0].xaxis, evals["tokens"].to_numpy(float))
    axes[0].set_ylabel(LOSS_LABEL)
    fig.suptitle("Training curves: validation loss vs tokens")
    return _save(fig, path)


def _new_panels(n_panels: int, width: float = 5.2, height: float = 4.4) -> tuple[Figure, list[Axes]]:
    """Side-by-side panels that share nothing (each has its own quantity)."""
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes


@_styled
def plot_allocation(
    allocations: dict[str, AllocationLaw],
    minima: dict[str, pd.DataFrame],
    c_range: tuple[float, float],
    baseline: str,
    title: str,
    path: Path,
) -> Path:
    """N_opt(C) and D_opt(C) per architecture with their 90% bootstrap bands, over c_range;
    Approach 2's per-budget minima as points (hollow where a budget was rejected: drawn at the
    best run's size instead)."""
    fig, (ax_n, ax_d) = _new_panels(2)
    colors = arch_colors(list(allocations), baseline)
    C = np.geomspace(*c_range, 100)
    for arch in _arch_order(allocations, baseline):
        law, color = allocations[arch], colors[arch]
        for ax, which, predict in ((ax_n, "params", law.params), (ax_d, "tokens", law.tokens)):
            lo, hi = law.band(C, which)
            ax.fill_between(C, lo, hi, color=color, alpha=0.18, lw=0)
            exponent = law.aN if which == "params" else law.aD
            ax.plot(C, predict(C), "-", color=color, lw=2, label=f"{arch}: C^{exponent:.3f}")
            points = minima.get(arch)
            if points is not None and len(points):
                column = "N_opt" if which == "params" else "D_opt"
                ax.plot(points["C"], points[column], "o", color=color, ms=6, markeredgecolor="white")
    for ax, label, name in ((ax_n, PARAMS_LABEL, "N_opt"), (ax_d, TOKENS_LABEL, "D_opt")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(COMPUTE_LABEL)
        ax.set_ylabel(f"compute-optimal {label}")
        ax.set_title(f"{name}(C) (band: 90% bootstrap)")
        ax.legend(loc="upper left")
    fig.suptitle(title)
    return _save(fig, path)


@_styled
def plot_residuals(
    runs: pd.DataFrame,
    surfaces: dict[str, SurfaceFit],
    flagged: pd.DataFrame,
    baseline: str,
    path: Path,
) -> Path:
    """Log-loss residual of every run against its architecture's Approach-3 surface, vs compute,
    coloured by budget; flagged runs ringed in red."""
    archs = _arch_order(surfaces, baseline)
    fig, axes = _new_figure(max(1, len(archs)), width=4.8)
    norm = _budget_norm(runs)
    flagged_ids = set(flagged["run_id"])
    for ax, arch in zip(axes, archs):
        group = runs[runs["arch"] == arch]
        fit = surfaces[arch]
        residual = np.log(group["final_val_loss"].to_numpy(float)) - np.log(
            fit.predict(group["params_non_embedding"], group["tokens"]))
        colors = [_budget_color(norm, b) for b in group["budget"]]
        ax.axhline(0.0, color="black", lw=1)
        ax.scatter(group["flops"], residual, c=colors, s=28, edgecolors="none")
        ringed = group["run_id"].isin(flagged_ids).to_numpy()
        if ringed.any():
            ax.scatter(group["flops"][ringed], residual[ringed], s=140, facecolors="none",
                       edgecolors="red", linewidths=1.5, label="flagged")
            ax.legend(loc="upper right")
        ax.set_xscale("log")
        ax.set_xlabel(COMPUTE_LABEL)
        ax.set_title(f"{_panel_title(arch, baseline)}: rms {fit.rms:.2g}")
    _log_ticks(axes[0].xaxis, runs["flops"].to_numpy(float))
    axes[0].set_ylabel("log L - log L_fit(N, D)")
    fig.suptitle("Residuals of the Approach-3 surface (colour: budget; red ring: flagged run)")
    return _save(fig, path)


@_styled
def plot_bootstrap_distributions(
    exponents: dict[str, dict[str, tuple[float, np.ndarray]]], baseline: str, title: str, path: Path
) -> Path:
    """Histograms of each parameter's bootstrap replicates, one panel per parameter, the
    architectures overlaid; a vertical line at each full-data estimate."""
    names = sorted({name for by_name in exponents.values() for name in by_name})
    fig, axes = _new_panels(max(1, len(names)), width=4.2, height=3.8)
    colors = arch_colors(list(exponents), baseline)
    for ax, name in zip(axes, names):
        for arch in _arch_order(exponents, baseline):
            if name not in exponents[arch]:
                continue
            value, replicates = exponents[arch][name]
            replicates = replicates[np.isfinite(replicates)]
            if len(replicates):
                ax.hist(replicates, bins=40, color=colors[arch], alpha=0.45, label=arch)
            ax.axvline(value, color=colors[arch], lw=1.5)
        ax.set_xlabel(name)
        ax.set_ylabel("replicates")
        ax.legend(loc="upper right")
    fig.suptitle(title)
    return _save(fig, path)


ACCURACY_LABEL = "test accuracy (exact match per answer token)"


@_styled
def plot_recall_accuracy(summary: pd.DataFrame, x: str, baseline: str, path: Path) -> Path:
    """Recall accuracy per architecture: the median over seeds with min/max error bars (as the
    paper), each config at its best learning rate (analysis/recall.py's summary table).

    x 'difficulty': one panel per model size, difficulties in grid order on a categorical axis;
    x 'd_model': one panel per difficulty, model width on a log2 axis. Architectures are nudged
    sideways a little so their error bars do not hide each other."""
    panel_key, panel_order = ("size", "d_model") if x == "difficulty" else ("difficulty", "difficulty_rank")
    panels = summary.sort_values(panel_order)[panel_key].unique()
    fig, axes = _new_figure(max(1, len(panels)), width=6.4 if len(panels) == 1 else 5.0)
    archs = _arch_order(summary["arch"].unique(), baseline)
    colors = arch_colors(archs, baseline)
    labels = summary.sort_values("difficulty_rank")["difficulty"].unique()
    position = {label: i for i, label in enumerate(labels)}
    for ax, panel in zip(axes, panels):
        cells = summary[summary[panel_key] == panel]
        for index, arch in enumerate(archs):
            points = cells[cells["arch"] == arch]
            nudge = (index - (len(archs) - 1) / 2) * 0.06
            if x == "difficulty":
                points = points.sort_values("difficulty_rank")
                xs = np.array([position[d] for d in points["difficulty"]], float) + nudge
            else:
                points = points.sort_values("d_model")
                xs = points["d_model"].to_numpy(float) * 2.0**nudge
            median = points["median"].to_numpy(float)
            errors = [median - points["min"].to_numpy(float), points["max"].to_numpy(float) - median]
            ax.errorbar(xs, median, yerr=errors, fmt="o-", color=colors[arch], capsize=3, lw=1.4,
                        label=_panel_title(arch, baseline))
        ax.set_title(f"size {panel}" if x == "difficulty" else f"task {panel}")
        ax.set_ylim(-0.03, 1.03)
        if x == "difficulty":
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
            ax.set_xlabel("task difficulty")
        else:
            ax.set_xscale("log", base=2)
            widths = np.unique(summary["d_model"].to_numpy(float))
            ax.set_xticks(widths, [f"{w:g}" for w in widths])
            ax.set_xlim(widths.min() / 1.5, widths.max() * 1.5)  # one width alone: no zoomed-in axis
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("model width d_model")
    axes[0].set_ylabel(ACCURACY_LABEL)
    axes[-1].legend(title="architecture (median, min-max over seeds)", loc="best")
    what = "difficulty" if x == "difficulty" else "model width"
    fig.suptitle(f"Recall accuracy vs {what} (best LR per config)")
    return _save(fig, path)
