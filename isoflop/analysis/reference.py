"""Published figures to hold a sweep against: the optional reference.yaml beside runs.csv.

    source: "Dynamic Short Convolutions Improve Transformers, scaling-law fits"   # required
    baseline: transformer                 # required: the table's baseline architecture
    multipliers:                          # required: arch label in runs.csv -> published M
      dynamic-qkv: 1.33
      dynamic-all-linear: 1.60
    ordering: [transformer, static-qkv, dynamic-qkv, dynamic-all-linear]   # optional: worst to best
    note: "free text shown in the report"                                  # optional

load_reference validates it against the table; compare_* read the multipliers table
(multiplier.MULTIPLIER_COLUMNS) against it: whether each published figure lies inside our band,
the observed order of the architectures at each budget and which expected pairs it swaps. Nothing
here knows what the architectures are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from isoflop.analysis.table import TableError

REFERENCE_FILE = "reference.yaml"
KEYS: tuple[str, ...] = ("source", "baseline", "multipliers", "ordering", "note")
REQUIRED_KEYS: tuple[str, ...] = ("source", "baseline", "multipliers")
WHAT_EACH_KEY_HOLDS = {
    "source": "text saying where the figures come from",
    "baseline": "the table's baseline architecture",
    "multipliers": "a mapping of architectures to published multipliers, e.g. {dynamic-qkv: 1.33}",
}


class ReferenceFileError(TableError):
    """A reference.yaml that cannot be used: names the file, the key, the value and what is allowed.
    A TableError, since it is part of the results folder: the CLI prints it as one line."""

    def __init__(self, file: Path, key: str, value: Any, problem: str, allowed: str) -> None:
        where = f"{key} = {value!r}: " if key else ""
        super().__init__(f"{file}: {where}{problem}; allowed: {allowed}")


@dataclass(frozen=True)
class Reference:
    source: str
    baseline: str
    multipliers: dict[str, float]  # arch -> published compute multiplier against the baseline
    ordering: tuple[str, ...]  # expected order, worst to best; empty when not given
    note: str


def load_reference(results_dir: str | Path, archs: list[str], baseline: str) -> Reference | None:
    """results_dir/reference.yaml checked against the table's architectures `archs` and its
    `baseline`, or None when there is no such file."""
    path = Path(results_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReferenceFileError(path, "", None, f"cannot be read as YAML ({exc})",
                                 "a UTF-8 YAML mapping with keys " + ", ".join(KEYS)) from None
    return parse_reference(document, path, sorted(archs), baseline)


def parse_reference(document: Any, path: Path, archs: list[str], baseline: str) -> Reference:
    if not isinstance(document, dict):
        raise ReferenceFileError(path, "", None, f"is a {type(document).__name__}, not a mapping",
                                 "a mapping with keys " + ", ".join(KEYS))
    for key in document:
        if key not in KEYS:
            raise ReferenceFileError(path, str(key), document[key], "is not a known key",
                                     ", ".join(KEYS))
    for key in REQUIRED_KEYS:
        if key not in document:
            raise ReferenceFileError(path, "", None, f"{key}: is missing (required)",  # (no value to show)
                                     WHAT_EACH_KEY_HOLDS[key])
    in_table = ", ".join(archs)

    def text(key: str) -> str:
        value = document.get(key, "")
        if not isinstance(value, str):
            raise ReferenceFileError(path, key, value, "is not text", "a string")
        return value

    def arch_of(key: str, value: Any) -> str:
        if value not in archs:
            raise ReferenceFileError(path, key, value, "is not an architecture of the table",
                                     in_table)
        return value

    if document["baseline"] != baseline:
        raise ReferenceFileError(path, "baseline", document["baseline"],
                                 f"the table's baseline is {baseline!r}", baseline)
    multipliers = document["multipliers"]
    if not isinstance(multipliers, dict) or not multipliers:
        raise ReferenceFileError(path, "multipliers", multipliers, "is not a non-empty mapping",
                                 WHAT_EACH_KEY_HOLDS["multipliers"])
    published = {}
    for arch, value in multipliers.items():
        key = f"multipliers.{arch}"
        arch_of(key, arch)
        if arch == baseline:
            raise ReferenceFileError(path, key, value, "is the baseline (M = 1 by definition)",
                                     "architectures of the table other than " + baseline)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                np.isfinite(value) and value > 0):
            raise ReferenceFileError(path, key, value, "is not a positive number",
                                     "a number > 0, e.g. 1.33")
        published[arch] = float(value)
    ordering = document.get("ordering", [])
    if not isinstance(ordering, list) or len(ordering) == 1:
        raise ReferenceFileError(path, "ordering", ordering, "is not a list of 2 or more",
                                 "a list of architectures of the table, worst to best")
    for i, arch in enumerate(ordering):
        arch_of(f"ordering[{i}]", arch)
        if arch in ordering[:i]:
            raise ReferenceFileError(path, f"ordering[{i}]", arch, "appears twice",
                                     "each architecture once")
    return Reference(text("source"), baseline, published, tuple(ordering), text("note"))


# -- comparing a multipliers table with it ---------------------------------------------------------


def published_inside_band(multipliers: pd.DataFrame, arch: str, published: float) -> dict[float, bool]:
    """budget -> whether `published` lies inside our band there (budgets without a band left out)."""
    rows = multipliers[(multipliers["arch"] == arch) & multipliers["lo"].notna()]
    return {float(r.budget): bool(r.lo <= published <= r.hi) for r in rows.itertuples()}


def band_verdict(inside: dict[float, bool]) -> str:
    """'yes' / 'no' when every budget agrees, else the budgets of each; 'no band' without any."""
    if not inside:
        return "no band"
    if len(set(inside.values())) == 1:
        return "yes" if next(iter(inside.values())) else "no"
    at = {answer: ", ".join(f"{b:.3g}" for b, a in inside.items() if a == answer)
          for answer in (True, False)}
    return f"yes at {at[True]}; no at {at[False]}"


@dataclass(frozen=True)
class Placement:
    """One architecture at one budget: its multiplier and band (the baseline: exactly 1)."""

    arch: str
    multiplier: float
    lo: float
    hi: float

    def overlaps(self, other: Placement) -> bool:
        return bool(self.lo <= other.hi and other.lo <= self.hi)


def observed_order(multipliers: pd.DataFrame, baseline: str, budget: float) -> list[Placement]:
    """Every architecture with a finite-or-inf multiplier at `budget` and the baseline, worst
    (smallest M) to best; architectures whose M is undetermined (NaN) are left out."""
    rows = multipliers[(multipliers["budget"] == budget) & multipliers["multiplier"].notna()]
    placements = [Placement(baseline, 1.0, 1.0, 1.0)]
    placements += [Placement(r.arch, float(r.multiplier), float(r.lo), float(r.hi))
                   for r in rows.itertuples()]
    return sorted(placements, key=lambda p: (p.multiplier, p.arch))


def swapped_pairs(order: list[Placement], expected: tuple[str, ...]) -> list[tuple[Placement, Placement]]:
    """(a, b) for every pair that `expected` puts a below b but whose multipliers say otherwise
    (M_a > M_b); architectures missing from `order` are not compared."""
    placed = {p.arch: p for p in order}
    ranked = [placed[arch] for arch in expected if arch in placed]
    return [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a.multiplier > b.multiplier]
