"""The tidy results table (results/<sweep>/runs.csv and evals.csv): load, validate, select.

Analysis reads nothing else, so every column it relies on is checked here once, with an error that
names the file, the column and the bad value. The recall columns (task, difficulty, difficulty_rank,
accuracy; empty for language-modelling runs) and the framework versions (torch_version,
triton_version) came later: a table without them reads as if they were empty. Compute C is the column `flops` (analytic training
FLOPs actually spent); the 6N columns are kept for comparison only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

RUNS_FILE = "runs.csv"
EVALS_FILE = "evals.csv"

# Columns read as text whatever they look like: a 12-hex-digit run id or git sha may be all digits.
RUN_TEXT_COLUMNS: tuple[str, ...] = (
    "run_id", "sweep", "arch", "size", "state", "device", "corpus_fingerprint", "git_sha",
    "isoflop_version", "task", "difficulty", "torch_version", "triton_version",
)
RUN_NUMERIC_COLUMNS: tuple[str, ...] = (
    "d_model", "n_layers", "n_heads", "d_ff", "params", "params_non_embedding", "seq_len",
    "batch_size", "tokens", "steps", "budget", "flops", "flops_6n", "flops_6n_total",
    "final_val_loss", "final_train_loss", "lr", "seed", "wall_s", "tokens_per_s", "difficulty_rank",
    "accuracy",
)
RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "sweep", "arch", "is_baseline", "size", "d_model", "n_layers", "n_heads", "d_ff",
    "params", "params_non_embedding", "seq_len", "batch_size", "tokens", "steps", "budget", "flops",
    "flops_6n", "flops_6n_total", "final_val_loss", "final_train_loss", "lr", "seed", "state",
    "wall_s", "tokens_per_s", "device", "corpus_fingerprint", "git_sha", "isoflop_version",
    "task", "difficulty", "difficulty_rank", "accuracy", "torch_version", "triton_version",
)
# Optional: filled with NaN where a table predates them.
LATER_COLUMNS: tuple[str, ...] = (
    "task", "difficulty", "difficulty_rank", "accuracy", "torch_version", "triton_version",
)
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "git_sha", "corpus_fingerprint", "device", "isoflop_version", "torch_version", "triton_version",
)
EVAL_TEXT_COLUMNS: tuple[str, ...] = ("run_id", "arch", "size")
EVAL_COLUMNS: tuple[str, ...] = (
    "run_id", "arch", "size", "step", "tokens", "flops", "train_loss", "val_loss", "lr",
    "tokens_per_s", "elapsed_s",
)

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class TableError(ValueError):
    """A results table that breaks the tidy-table contract."""


def _csv_path(path: str | Path, filename: str) -> Path:
    path = Path(path)
    return path / filename if path.is_dir() else path


def load_runs(path: str | Path) -> pd.DataFrame:
    """Read runs.csv (give the file or the results directory holding it) and validate it."""
    csv = _csv_path(path, RUNS_FILE)
    if not csv.is_file():
        raise FileNotFoundError(f"no runs table at {csv} (write it with `isoflop collect`)")
    df = pd.read_csv(csv, dtype={c: str for c in RUN_TEXT_COLUMNS})
    return validate_runs(df, source=str(csv))


def load_evals(path: str | Path) -> pd.DataFrame | None:
    """Read evals.csv beside runs.csv, or None when the sweep has none."""
    csv = _csv_path(path, EVALS_FILE)
    if not csv.is_file():
        return None
    df = pd.read_csv(csv, dtype={c: str for c in EVAL_TEXT_COLUMNS})
    _require_columns(df, EVAL_COLUMNS, str(csv))
    for column in EVAL_COLUMNS:
        if column not in EVAL_TEXT_COLUMNS:
            df[column] = _numeric(df, column, str(csv))
    return df


def validate_runs(df: pd.DataFrame, source: str = "<DataFrame>") -> pd.DataFrame:
    """A copy of `df` with contract types (numbers as float, is_baseline as bool); raises
    TableError naming `source`, the column and the offending value when the contract is broken."""
    df = df.copy()
    for column in LATER_COLUMNS:
        if column not in df.columns:  # a table written before these columns existed
            df[column] = np.nan
    _require_columns(df, RUN_COLUMNS, source)
    for column in RUN_NUMERIC_COLUMNS:
        df[column] = _numeric(df, column, source)
    for column in ("run_id", "arch", "state"):
        blank = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if blank.any():
            raise TableError(f"{source}: column {column!r} is empty in row {int(np.argmax(blank))}")
    duplicated = df["run_id"][df["run_id"].duplicated()]
    if len(duplicated):
        raise TableError(f"{source}: run_id {duplicated.iloc[0]!r} appears more than once")
    df["is_baseline"] = [_as_bool(v, source, rid) for v, rid in zip(df["is_baseline"], df["run_id"])]
    mixed = df.groupby("arch")["is_baseline"].nunique()
    if (mixed > 1).any():
        raise TableError(
            f"{source}: arch {mixed[mixed > 1].index[0]!r} has rows with is_baseline both true and "
            "false; it must be one or the other for every run of an architecture"
        )
    return df


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{source}: missing column(s) {', '.join(missing)}; the contract needs "
                         f"{', '.join(columns)}")


def _numeric(df: pd.DataFrame, column: str, source: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce").astype(float)
    bad = values.isna() & df[column].notna()
    if bad.any():
        row = int(np.argmax(bad))
        raise TableError(
            f"{source}: column {column!r} holds {df[column].iloc[row]!r} in row {row}; "
            "allowed: a number (or empty)"
        )
    return values


def _as_bool(value: object, source: str, run_id: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TableError(
        f"{source}: column 'is_baseline' holds {value!r} for run {run_id!r}; allowed: true or false"
    )


def usable_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that count: state 'done' with a finite final validation loss and positive compute
    (a run without compute cannot sit on a loss-vs-compute curve)."""
    keep = (
        (df["state"] == "done")
        & np.isfinite(df["final_val_loss"])
        & np.isfinite(df["flops"])
        & (df["flops"] > 0)
    )
    return df[keep]


def is_recall_table(df: pd.DataFrame) -> bool:
    """True when the runs are associative-recall runs (a task), to be reported by accuracy."""
    return bool(df["task"].notna().any())


def baseline_arch(df: pd.DataFrame) -> str:
    """The single architecture whose rows have is_baseline true."""
    archs = sorted(df.loc[df["is_baseline"], "arch"].unique())
    if len(archs) != 1:
        found = ", ".join(archs) if archs else "none"
        raise TableError(
            f"the table needs exactly one baseline architecture (is_baseline true); found {found}"
        )
    return archs[0]


def provenance_lines(runs: pd.DataFrame) -> list[str]:
    """Markdown bullets: every value each provenance column takes in the table."""
    lines = []
    for column in PROVENANCE_COLUMNS:
        values = sorted(str(v) for v in runs[column].dropna().unique())
        lines.append(f"- {column}: {', '.join(f'`{v}`' for v in values) if values else 'not recorded'}")
    return lines
