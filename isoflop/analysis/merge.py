"""Merge results folders: the tables of several sweeps as one table, for one analysis.

`isoflop merge A B ... --out C` writes C/runs.csv, and C/evals.csv and C/throughput.csv where the
sources have them, so that `isoflop report C` fits every run together (a follow-up sweep that moved
the sizes, say, read with the sweep it follows). Rows are copied as text, cell for cell: no number
is parsed and written again.

Rules:
- The sources must measure the same thing: one baseline architecture, one corpus (the
  corpus_fingerprint of their runs) and the same kind of table (language modelling or recall).
  Otherwise TableError names both folders and the values.
- A run in several tables (the same run_id: the same spec, so the same run trained twice) is kept
  from the first folder named, with its evals; the later copies are dropped and listed in
  merge.json, with their final losses beside the kept ones (how well a run repeats).
- throughput.csv holds one row per (arch, size). A pair measured in several folders is kept from the
  first, so all architectures of a size come from one measurement session (the report pairs them
  within a round). Columns that not every source has (the optional min, max and rounds) are left
  out.
- reference.yaml (the published figures) is copied from the first source that has one, unless C
  already has its own.
- merge.json records the sources (folder, sha256 of each table), the rows taken from each and the
  duplicates dropped.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from isoflop.analysis.reference import REFERENCE_FILE
from isoflop.analysis.table import (
    EVALS_FILE,
    RUNS_FILE,
    TableError,
    baseline_arch,
    is_recall_table,
    load_evals,
    load_runs,
)
from isoflop.analysis.throughput import THROUGHPUT_FILE, load_throughput
from isoflop.atomic import atomic_write_bytes, atomic_write_text, json_text
from isoflop.data.cache import sha256_of_file

MERGE_FILE = "merge.json"


@dataclass
class Merged:
    """What `merge` wrote: the output folder, the tables, and the runs dropped as duplicates."""

    out: Path
    files: list[Path] = field(default_factory=list)
    runs: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)
    reference_from: Path | None = None


def merge_results(sources: list[Path], out: Path) -> Merged:
    """Write out/runs.csv (and evals.csv, throughput.csv, reference.yaml, merge.json) from the
    results folders `sources`, in their order of precedence (module docstring)."""
    sources = [Path(s) for s in sources]
    _check_folders(sources, out)
    _check_comparable(sources)
    out.mkdir(parents=True, exist_ok=True)
    merged = Merged(out)

    runs = [_read_rows(s / RUNS_FILE) for s in sources]
    kept_ids: dict[str, tuple[Path, dict[str, str]]] = {}
    runs_out: list[dict[str, str]] = []
    taken: dict[str, int] = {}
    for source, (_, rows) in zip(sources, runs):
        taken[str(source)] = 0
        for row in rows:
            first = kept_ids.get(row["run_id"])
            if first is None:
                kept_ids[row["run_id"]] = (source, row)
                runs_out.append(row)
                taken[str(source)] += 1
            else:
                merged.duplicates.append(_duplicate(row, source, *first))
    merged.runs = len(runs_out)
    merged.files.append(_write_rows(out / RUNS_FILE, _union_header([h for h, _ in runs]), runs_out,
                                    _line_end(sources[0] / RUNS_FILE)))

    # A table no source has is removed from out: one left by an earlier merge would enter the report.
    for name, write in ((EVALS_FILE, lambda: _merge_evals(sources, kept_ids, out)),
                        (THROUGHPUT_FILE, lambda: _merge_throughput(sources, out))):
        if any((s / name).is_file() for s in sources):
            merged.files.append(write())
        else:
            (out / name).unlink(missing_ok=True)
    merged.reference_from = _copy_reference(sources, out)

    record = {
        "sources": [
            {"folder": str(s), "runs_taken": taken[str(s)],
             "sha256": {name: sha256_of_file(s / name) for name in (RUNS_FILE, EVALS_FILE, THROUGHPUT_FILE)
                        if (s / name).is_file()}}
            for s in sources
        ],
        "rule": "a run_id (or a throughput (arch, size)) in several sources is kept from the first",
        "duplicates_dropped": merged.duplicates,
    }
    atomic_write_text(out / MERGE_FILE, json_text(record))
    merged.files.append(out / MERGE_FILE)
    return merged


# -- checks ---------------------------------------------------------------------------------------


def _check_folders(sources: list[Path], out: Path) -> None:
    if len(sources) < 2:
        raise TableError("merge needs at least two results folders")
    for source in sources:
        if not (source / RUNS_FILE).is_file():
            raise TableError(f"{source}: no {RUNS_FILE} (write it with `isoflop collect`)")
        if source.resolve() == out.resolve():
            raise TableError(f"--out {out} is also a source; write the merged tables to a new folder")
    resolved = [s.resolve() for s in sources]
    if len(set(resolved)) != len(resolved):
        raise TableError("a results folder is named twice")


def _check_comparable(sources: list[Path]) -> None:
    """One baseline, one corpus, one kind of table across the sources (each table also passes
    load_runs' own checks, which name its file)."""
    first = None
    for source in sources:
        table = load_runs(source)
        load_evals(source)
        load_throughput(source)
        facts = {
            "baseline": baseline_arch(table),
            "table kind": "recall" if is_recall_table(table) else "language modelling",
            "corpus_fingerprint": ", ".join(sorted(table["corpus_fingerprint"].dropna().unique())) or "none",
        }
        if first is None:
            first = (source, facts)
            continue
        for key, value in facts.items():
            if value != first[1][key]:
                raise TableError(
                    f"{source}: {key} {value!r} differs from {first[0]}'s {first[1][key]!r}; "
                    f"allowed: tables of one baseline, one corpus and one kind of run"
                )


# -- tables as text -------------------------------------------------------------------------------


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _line_end(path: Path) -> str:
    """The first source's line ending, so merged rows stay byte for byte the rows they copy
    (collect writes CSV's CRLF, throughput LF)."""
    with open(path, "rb") as handle:
        return "\r\n" if handle.readline().endswith(b"\r\n") else "\n"


def _union_header(headers: list[list[str]]) -> list[str]:
    """The first header, then any column a later one adds (its cells empty in the other rows)."""
    columns = list(headers[0])
    for header in headers[1:]:
        columns += [c for c in header if c not in columns]
    return columns


def _write_rows(path: Path, header: list[str], rows: list[dict[str, str]], line_end: str) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=header, restval="", extrasaction="ignore",
                            lineterminator=line_end)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


def _merge_evals(sources: list[Path], kept: dict[str, tuple[Path, dict[str, str]]], out: Path) -> Path:
    """The evals of each kept run, from the source its row came from."""
    paths = [s / EVALS_FILE for s in sources if (s / EVALS_FILE).is_file()]
    headers, rows = [], []
    for path in paths:
        header, source_rows = _read_rows(path)
        headers.append(header)
        rows += [r for r in source_rows if r["run_id"] in kept and kept[r["run_id"]][0] == path.parent]
    return _write_rows(out / EVALS_FILE, _union_header(headers), rows, _line_end(paths[0]))


def _merge_throughput(sources: list[Path], out: Path) -> Path:
    """One row per (arch, size), from the first source that measured it, in the columns every
    source's throughput.csv has."""
    paths = [s / THROUGHPUT_FILE for s in sources if (s / THROUGHPUT_FILE).is_file()]
    tables = [_read_rows(path) for path in paths]
    header = [c for c in tables[0][0] if all(c in h for h, _ in tables)]
    seen, rows = set(), []
    for _, source_rows in tables:
        for row in source_rows:
            if (row["arch"], row["size"]) not in seen:
                seen.add((row["arch"], row["size"]))
                rows.append(row)
    return _write_rows(out / THROUGHPUT_FILE, header, rows, _line_end(paths[0]))


def _copy_reference(sources: list[Path], out: Path) -> Path | None:
    if (out / REFERENCE_FILE).is_file():
        return None
    for source in sources:
        if (source / REFERENCE_FILE).is_file():
            shutil.copyfile(source / REFERENCE_FILE, out / REFERENCE_FILE)
            return source / REFERENCE_FILE
    return None


def _duplicate(row: dict[str, str], source: Path, kept_source: Path, kept: dict[str, str]) -> dict[str, str]:
    return {
        "run_id": row["run_id"], "arch": row.get("arch", ""), "size": row.get("size", ""),
        "budget": row.get("budget", ""), "dropped_from": str(source), "kept_from": str(kept_source),
        "final_val_loss_dropped": row.get("final_val_loss", ""),
        "final_val_loss_kept": kept.get("final_val_loss", ""),
    }


def format_merge(merged: Merged) -> str:
    """What the command prints: the tables written, the duplicates and both their losses."""
    lines = [f"wrote {', '.join(str(p) for p in merged.files)} ({merged.runs} runs)"]
    if merged.duplicates:
        lines.append(f"{len(merged.duplicates)} run(s) appear in several sources; kept from the first:")
        for dup in merged.duplicates:
            lines.append(f"  {dup['run_id']} {dup['arch']} {dup['size']} {_number(dup['budget'], '.3g')}: "
                         f"final_val_loss {_number(dup['final_val_loss_kept'], '.4f')} (kept) vs "
                         f"{_number(dup['final_val_loss_dropped'], '.4f')} ({dup['dropped_from']})")
    if merged.reference_from is not None:
        lines.append(f"copied {merged.reference_from} to {merged.out / REFERENCE_FILE}")
    return "\n".join(lines)


def _number(text: str, spec: str) -> str:
    """A table cell as a short number for printing; the cell itself when it is not one."""
    try:
        return format(float(text), spec)
    except ValueError:
        return text or "-"
