"""throughput.csv: the tokens/s of each (architecture, size) trained alone, beside runs.csv.

`isoflop throughput SWEEP` writes it (isoflop/train/throughput.py trains each model a few steps by
itself). When runs shared a GPU, their own tokens_per_s measured the schedule (whatever ran beside
them) as much as the architecture; with this table present the report's wall-clock multipliers use
its clean numbers instead. Columns: arch, size, tokens_per_s (required; the median of `repeats`
measurements), and params, tokens_per_step, steps, repeats, tokens_per_s_min, tokens_per_s_max,
device, compile (the runs' train.compile: small models' steps are several times faster with CUDA
graphs, and the conv variants' share of them smaller), torch_version, git_sha (provenance, read
when present). The report also gives the wall-clock multipliers' range over the repeats: with
tokens_per_s_rounds (each round's measurement), the range of the ratios taken round by round;
otherwise, with tokens_per_s_min and tokens_per_s_max, the ratios at the extremes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from isoflop.analysis.table import TableError

THROUGHPUT_FILE = "throughput.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("arch", "size", "tokens_per_s")
RANGE_COLUMNS: tuple[str, ...] = ("tokens_per_s_min", "tokens_per_s_max")  # the repeats' extremes
# Every repeat's tokens/s, ';'-separated in round order (each round measured every pair once), so a
# round's drift, which hits all models alike, cancels in a wall-clock ratio taken within the round.
ROUNDS_COLUMN = "tokens_per_s_rounds"
TEXT_COLUMNS: tuple[str, ...] = ("arch", "size", "device", "compile", "torch_version", "git_sha")
# How the steps ran, by train.compile as the CSV writes it.
COMPILE_WORDS = {"False": "eager", "True": "torch.compile", "graphs": "torch.compile with CUDA graphs"}


def load_throughput(results_dir: str | Path) -> pd.DataFrame | None:
    """results_dir/throughput.csv, validated; None when the folder has none.

    Raises ValueError (TableError, which the CLI prints as one line) naming the file, the column
    and what is allowed, for a missing column, a tokens_per_s (or, when present, tokens_per_s_min or
    tokens_per_s_max) that is not a positive finite number, or two rows for one (arch, size)."""
    path = Path(results_dir) / THROUGHPUT_FILE
    if not path.is_file():
        return None
    # Labels as text, as runs.csv reads them: a size like '100' must match the runs' '100'.
    table = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    _require_columns(table, path)
    for column in ("tokens_per_s", *(c for c in RANGE_COLUMNS if c in table.columns)):
        _check_throughput(table, path, column)
    _check_one_row_per_pair(table, path)
    if ROUNDS_COLUMN in table.columns:
        _split_rounds(table, path)
    return table


def _split_rounds(table: pd.DataFrame, path: Path) -> None:
    """ROUNDS_COLUMN's values as the columns round_columns() names, checked: the same number of
    positive finite numbers in every row."""
    rounds = [str(cell).split(";") for cell in table[ROUNDS_COLUMN]]
    for row, values in enumerate(rounds):
        where = f"in row {row + 1} ({table['arch'].iloc[row]} {table['size'].iloc[row]})"
        if len(values) != len(rounds[0]):
            raise TableError(f"{path}: column {ROUNDS_COLUMN} has {len(values)} values {where} and "
                             f"{len(rounds[0])} in row 1; allowed: one value per round, the same rounds in every row")
        numbers = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
        bad = np.flatnonzero(~(np.isfinite(numbers) & (numbers > 0)))
        if len(bad):
            raise TableError(f"{path}: column {ROUNDS_COLUMN} has {values[bad[0]]!r} for round {bad[0] + 1} "
                             f"{where}; allowed: positive finite numbers of tokens per second, ';'-separated")
    for index in range(len(rounds[0])):
        table[f"{ROUNDS_COLUMN}_{index + 1}"] = [float(values[index]) for values in rounds]


def round_columns(table: pd.DataFrame | None) -> list[str]:
    """The columns holding each round's tokens/s (none without ROUNDS_COLUMN or with one round)."""
    if table is None or ROUNDS_COLUMN not in table.columns:
        return []
    columns = [c for c in table.columns if c.startswith(ROUNDS_COLUMN + "_")]
    return columns if len(columns) > 1 else []


def _require_columns(table: pd.DataFrame, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise TableError(f"{path}: missing column {', '.join(missing)}; allowed: a table with the "
                         f"columns {', '.join(REQUIRED_COLUMNS)} (as `isoflop throughput` writes it)")


def _check_throughput(table: pd.DataFrame, path: Path, column: str) -> None:
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TableError(f"{path}: column {column} is {table[column].iloc[row]!r} in row "
                         f"{row + 1} ({table['arch'].iloc[row]} {table['size'].iloc[row]}); "
                         "allowed: a positive finite number of tokens per second")
    table[column] = values


def _check_one_row_per_pair(table: pd.DataFrame, path: Path) -> None:
    repeated = table[table.duplicated(["arch", "size"], keep=False)]
    if not repeated.empty:
        first = repeated.iloc[0]
        raise TableError(f"{path}: columns arch, size repeat ({first['arch']}, {first['size']}); "
                         "allowed: one row per (arch, size)")


def has_range(table: pd.DataFrame | None) -> bool:
    """Whether the table gives each pair's slowest and fastest measurement (RANGE_COLUMNS)."""
    return table is not None and all(c in table.columns for c in RANGE_COLUMNS)


def apply_throughput(runs: pd.DataFrame, table: pd.DataFrame, column: str = "tokens_per_s") -> pd.DataFrame:
    """A copy of `runs` whose tokens_per_s is the table's `column` (the median, or one of
    RANGE_COLUMNS) for the same (arch, size); NaN where the table has no row for it (such runs
    then count as unmeasured)."""
    measured = table.set_index(["arch", "size"])[column]
    keys = pd.MultiIndex.from_arrays([runs["arch"].astype(str), runs["size"].astype(str)])
    out = runs.copy()
    out["tokens_per_s"] = measured.reindex(keys).to_numpy(float)
    return out


def describe_throughput(table: pd.DataFrame) -> str:
    """Where the table's numbers come from, for the report: 'throughput.csv: 30 steps each, median
    of 3 repeats on NVIDIA H200, eager' (the parts the table lacks are left out)."""
    counts = []
    steps, repeats = _counts(table, "steps"), _counts(table, "repeats")
    if steps:
        counts.append(f"{'/'.join(str(n) for n in steps)} steps each")
    if repeats and repeats != [1]:
        counts.append(f"median of {'/'.join(str(n) for n in repeats)} repeats")
    text = ", ".join(counts)
    devices = sorted({str(v) for v in _filled(table, "device")})
    if devices:
        text += (" " if text else "") + f"on {', '.join(devices)}"
    modes = sorted({COMPILE_WORDS.get(str(v), str(v)) for v in _filled(table, "compile")})
    if modes:
        text += (", " if text else "") + " / ".join(modes)
    return THROUGHPUT_FILE + (": " + text if text else "")


def _counts(table: pd.DataFrame, column: str) -> list[int]:
    """The distinct whole numbers of an optional count column, ascending."""
    values = pd.to_numeric(pd.Series(_filled(table, column), dtype=object), errors="coerce")
    return sorted({int(n) for n in values.dropna()})


def _filled(table: pd.DataFrame, column: str) -> list:
    """The non-empty values of an optional provenance column (none when the table lacks it)."""
    if column not in table.columns:
        return []
    return [v for v in table[column].dropna() if str(v).strip()]
