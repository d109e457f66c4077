"""A run directory on disk: spec, status, metrics, checkpoints, log and result.

Pure Python (no torch): the orchestrator reads and writes these while planning and collecting.
Every whole-file write goes through a temp file in the same directory and `os.replace`, so a
reader (or a process killed mid-write) never sees half a file. metrics.jsonl is append-only, one
flushed and fsynced line per eval; a line torn by a crash is dropped when read.

Layout of a run directory:
    spec.json       the RunSpec (RunSpec.to_dict())
    status.json     state, attempts, host, pid, timestamps, error
    metrics.jsonl   one line per eval
    checkpoints/    the trainer's checkpoint (latest.pt)
    train.log       progress lines
    result.json     final numbers and provenance; written once, never overwritten
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from isoflop.atomic import (  # noqa: F401 (re-exported for callers of rundir)
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    json_text,
)

STATES: tuple[str, ...] = ("pending", "running", "done", "failed", "diverged")
FINAL_STATES: tuple[str, ...] = ("done", "failed", "diverged")


class ResultExistsError(FileExistsError):
    """A finished run's result.json is never replaced: results are the record of what happened."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def append_jsonl(path: Path | str, record: dict[str, Any]) -> None:
    """Append one JSON line and make it durable before returning."""
    line = _json_line(record)
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path | str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """All complete records; a last line torn by a crash mid-append is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
    return records


class RunDir:
    """One run's directory. Creating the object touches nothing; `create()` makes the folders."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def create(self) -> "RunDir":
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return self

    # -- spec ---------------------------------------------------------------------------------

    def write_spec(self, spec: dict[str, Any]) -> None:
        atomic_write_json(self.spec_path, spec)

    def read_spec(self) -> dict[str, Any] | None:
        return read_json(self.spec_path) if self.spec_path.exists() else None

    # -- status -------------------------------------------------------------------------------

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status_path) if self.status_path.exists() else None

    @property
    def state(self) -> str | None:
        status = self.read_status()
        return None if status is None else status["state"]

    def write_status(self, state: str, **fields: Any) -> dict[str, Any]:
        """Record a state change (or progress within 'running') and return the new status.

        Keeps what earlier writes recorded: `attempts` counts the starts of 'running' by a new
        process (a rerun after a crash or a requeue counts, progress updates do not); `error` is
        cleared when a new attempt starts and set by `error=` on failure. Extra fields (step,
        tokens, reason, traceback, ...) are stored as given.
        """
        if state not in STATES:
            raise ValueError(f"status state={state!r}; allowed: {', '.join(STATES)}")
        now = utc_now()
        old = self.read_status() or {"attempts": 0, "created_at": now}
        host, pid = socket.gethostname(), os.getpid()
        new = dict(old)
        new_attempt = state == "running" and (
            old.get("state") != "running" or old.get("pid") != pid or old.get("host") != host
        )
        if new_attempt:
            new.update(attempts=old["attempts"] + 1, started_at=now, finished_at=None)
            for stale in ("error", "traceback", "reason"):
                new.pop(stale, None)
        if state != "pending":
            new.update(host=host, pid=pid)
        if state in FINAL_STATES:
            new["finished_at"] = now
        new.update(fields)
        new.update(state=state, updated_at=now)
        new.setdefault("error", None)
        atomic_write_json(self.status_path, new)
        return new

    # -- metrics ------------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, max_step: int) -> None:
        """Drop records past `max_step` (a resumed run recomputes them from its checkpoint)."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.read_metrics() if r["step"] <= max_step]
        atomic_write_text(self.metrics_path, "".join(_json_line(r) for r in kept))

    # -- result -------------------------------------------------------------------------------

    def has_result(self) -> bool:
        return self.result_path.exists()

    def read_result(self) -> dict[str, Any] | None:
        return read_json(self.result_path) if self.result_path.exists() else None

    def write_result(self, result: dict[str, Any]) -> None:
        """Write result.json once. Raises ResultExistsError if the run already has a result."""
        try:
            with atomic_output(self.result_path, replace=False) as f:
                f.write(json_text(result).encode("utf-8"))
        except FileExistsError:
            raise ResultExistsError(
                f"{self.result_path} already exists; a finished result is never overwritten "
                f"(delete the run directory to train again)"
            ) from None

    # -- log ----------------------------------------------------------------------------------

    def append_log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
