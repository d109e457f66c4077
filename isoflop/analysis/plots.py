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

from isoflop.analysis.bootstrap import PowerLawSamples
from isoflop.atomic import atomic_output
from isoflop.analysis.fits import PowerLawFit, frontier_points
from isoflop.analysis.multiplier import multiplier_band

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
    best size of each budget (the frontier point). Ladder runs (no budget) are one grey line."""
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
    fig.suptitle("IsoFLOP curves: final validation loss vs model size (star: best size per budget)")
    return _save(fig, path)


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
def plot_multiplier(
    fits: dict[str, PowerLawFit],
    samples: dict[str, PowerLawSamples],
    multipliers: pd.DataFrame,
    baseline: str,
    path: Path,
) -> Path:
    """M(C) per architecture with its 90% bootstrap band, the reported budgets as points (hollow
    where extrapolated) and the baseline at M = 1. The curve spans the fits' compute and the
    reported budgets; the y range follows the interpolated part, so a band that explodes far from
    the data does not flatten the rest."""
    fig, (ax,) = _new_figure()
    colors = arch_colors(list(fits), baseline)
    base_fit = fits[baseline]
    budgets = multipliers["budget"].to_numpy(float)
    c_lo = min([f.c_min for f in fits.values()] + list(budgets))
    c_hi = max([f.c_max for f in fits.values()] + list(budgets))
    C = np.geomspace(c_lo, c_hi, 120)
    ax.axhline(1.0, color="black", lw=1.2, label=f"{baseline} (baseline)")
    y_values = [1.0]
    for arch in _arch_order(fits, baseline)[1:]:
        fit, color = fits[arch], colors[arch]
        M, lo, hi = multiplier_band(fit, base_fit, samples[arch], samples[baseline], C)
        inside = fit.covers(C) & base_fit.covers(M * C)
        ax.fill_between(C, lo, hi, color=color, alpha=0.18, lw=0)
        ax.plot(C, np.where(inside, M, np.nan), "-", color=color, lw=2, label=f"{arch} (90% band)")
        ax.plot(C, np.where(inside, np.nan, M), "--", color=color, lw=1.2)
        rows = multipliers[multipliers["arch"] == arch]
        for extrapolated, part in rows.groupby("extrapolated"):
            ax.plot(part["budget"], part["multiplier"], "o", ms=7, color=color,
                    markerfacecolor="white" if extrapolated else color)
        shown = inside & np.isfinite(lo) & np.isfinite(hi)
        y_values += list(M[inside & np.isfinite(M)]) + list(lo[shown]) + list(hi[shown])
        y_values += list(rows["multiplier"][np.isfinite(rows["multiplier"])])
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, C)
    y_lo, y_hi = min(y_values), max(y_values)
    pad = 0.1 * (y_hi - y_lo) + 0.05
    ax.set_ylim(max(0.0, y_lo - pad), y_hi + pad)
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
