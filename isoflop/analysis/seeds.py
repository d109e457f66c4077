"""Runs repeated with other seeds: one point per configuration, and how much the seed moves things.

A cell of a sweep (architecture, budget, size, learning rate) trained with several seeds gives
several final losses for one configuration. The fits take their mean: the frontier would otherwise
pick the luckiest seed of each budget (the minimum of several draws is biased low), and an
architecture with more seeds would look better for it. `average_seeds` collapses each cell to one
row, with the seeds' losses kept beside it (SEED_LOSSES) so the bootstrap can redraw them
(analysis/bootstrap.py: within each drawn cell, its seeds are drawn with replacement and averaged).
A table with one seed per cell passes through unchanged.

`seed_spread` says how far the seeds of one cell lie apart, and `per_seed_multipliers` fits each
seed's runs alone: the multipliers a single-seed sweep would have reported, whose spread is the
seed's share of the answer's uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

CELL_COLUMNS = ("arch", "budget", "size", "params_non_embedding", "tokens", "lr")
AVERAGED_COLUMNS = ("final_val_loss", "final_train_loss", "tokens_per_s", "wall_s")
SEED_LOSSES = "seed_losses"  # a tuple of the cell's seeds' final losses (never written to a file)
N_SEEDS = "n_seeds"
SPREAD_COLUMNS = ("arch", "budget", "size", "n_seeds", "mean", "std", "min", "max", "range_pct")


def _cells(usable: pd.DataFrame):
    keys = [c for c in CELL_COLUMNS if c in usable.columns]
    # dropna=False: ladder runs have no budget (NaN) and are cells too.
    return usable.groupby(keys, sort=False, dropna=False)


def has_repeats(usable: pd.DataFrame) -> bool:
    """Whether some cell of the table was trained more than once."""
    return bool(len(usable)) and bool((_cells(usable).size() > 1).any())


def average_seeds(usable: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the first seed's row (lowest seed, then run_id) with AVERAGED_COLUMNS
    replaced by their means over the cell's runs, N_SEEDS and SEED_LOSSES added. Unchanged (the
    same object) when no cell repeats."""
    if not has_repeats(usable):
        return usable
    order = usable.sort_values([c for c in ("seed", "run_id") if c in usable.columns], kind="stable")
    cells = _cells(order)
    first = cells.head(1).copy()
    # Each kept row's cell: groupby's ngroup in the table's order gives the same labels for both.
    labels = cells.ngroup()
    first_labels = labels.loc[first.index].to_numpy()
    for column in AVERAGED_COLUMNS:
        if column in order.columns:
            means = pd.to_numeric(order[column], errors="coerce").groupby(labels).mean()
            first[column] = means.loc[first_labels].to_numpy()
    losses = order["final_val_loss"].astype(float).groupby(labels).agg(tuple)
    first[SEED_LOSSES] = losses.loc[first_labels].to_numpy()
    first[N_SEEDS] = [len(t) for t in first[SEED_LOSSES]]
    return first.sort_index()


def seed_losses(runs: pd.DataFrame) -> list[np.ndarray]:
    """Each row's seeds' final losses (just its own where the table was not averaged)."""
    if SEED_LOSSES not in runs.columns:
        return [np.array([v]) for v in runs["final_val_loss"].to_numpy(float)]
    return [np.asarray(t, dtype=float) for t in runs[SEED_LOSSES]]


def count_span(counts: pd.Series) -> str:
    """'3' where every cell has 3 seeds, '2-3' where they differ."""
    lo, hi = int(counts.min()), int(counts.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def seed_spread(averaged: pd.DataFrame) -> pd.DataFrame:
    """Per cell of an `average_seeds` table with at least two seeds: SPREAD_COLUMNS (std: sample
    standard deviation; range_pct: (max - min) / mean in percent), from the seeds' losses the
    table keeps, so the cells are not grouped a second time."""
    rows = []
    for row, losses in zip(averaged.itertuples(index=False), seed_losses(averaged)):
        if len(losses) < 2:
            continue
        rows.append({"arch": row.arch, "budget": float(row.budget), "size": row.size,
                     "n_seeds": len(losses), "mean": losses.mean(), "std": losses.std(ddof=1),
                     "min": losses.min(), "max": losses.max(),
                     "range_pct": 100 * np.ptp(losses) / losses.mean()})
    return pd.DataFrame(rows, columns=list(SPREAD_COLUMNS))


def per_seed_multipliers(
    usable: pd.DataFrame, baseline: str, multipliers_of: Callable[[pd.DataFrame], pd.DataFrame]
) -> pd.DataFrame:
    """Columns seed, arch, budget, multiplier: `multipliers_of` (a table of one seed's runs -> its
    multiplier table) for each seed that every architecture ran in every cell it has. Empty when
    no cell repeats."""
    if "seed" not in usable.columns or not has_repeats(usable):
        return pd.DataFrame(columns=["seed", "arch", "budget", "multiplier"])
    n_cells = _cells(usable).ngroups
    frames = []
    for seed, runs in usable.groupby("seed", sort=True):
        if _cells(runs).ngroups < n_cells or baseline not in set(runs["arch"]):
            continue  # a seed that missed some cells would compare other grids
        table = multipliers_of(runs)
        frames.append(table[["arch", "budget", "multiplier"]].assign(seed=int(seed)))
    if not frames:
        return pd.DataFrame(columns=["seed", "arch", "budget", "multiplier"])
    return pd.concat(frames, ignore_index=True)[["seed", "arch", "budget", "multiplier"]]
