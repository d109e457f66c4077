"""A run directory on disk: spec, status, metrics, checkpoints, log, result, and who trains it.

Pure Python (no torch): the orchestrator reads and writes these while planning and collecting.
Every whole-file write goes through a temp file in the same directory and `os.replace`, so a
reader (or a process killed mid-write) never sees half a file. metrics.jsonl is append-only, one
flushed and fsynced line per eval; a line torn by a crash is dropped when read. A write that fails
because the disk is full or the folder is not writable raises UnwritableError, whose message names
the file, the cause and what to do.

Layout of a run directory:
    spec.json       the RunSpec (RunSpec.to_dict())
    status.json     state, attempts, host, pid, timestamps, error
    metrics.jsonl   one line per eval
    checkpoints/    the trainer's checkpoint (latest.pt)
    train.log       progress lines
    result.json     final numbers and provenance; written once, never overwritten
    job.json        the SLURM job that trains the run, if it was submitted (orchestrator/jobs.py)
    .lease.json     who trains the run now, until when (RunLease)
    .lock           flock'ed for the few milliseconds a lease is taken, renewed or given back

States: pending (waiting for a worker), running, preempted (stopped by a signal after saving a
checkpoint: SLURM preemption, a time limit, Ctrl-C; the next start resumes), and the final ones
done, failed, diverged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from isoflop import atomic
from isoflop.atomic import json_text

STATES: tuple[str, ...] = ("pending", "running", "preempted", "done", "failed", "diverged")
FINAL_STATES: tuple[str, ...] = ("done", "failed", "diverged")


class ResultExistsError(FileExistsError):
    """A finished run's result.json is never replaced: results are the record of what happened."""


# -- writes that fail say why -----------------------------------------------------------------

# errno -> (what happened, what to do). Other errors pass through unchanged.
_WRITE_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free some space, or put the runs on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or put the runs on another disk"),
    errno.EACCES: ("permission denied", "make the folder writable for this user, or use another folder"),
    errno.EPERM: ("operation not permitted", "make the folder writable for this user, or use another folder"),
    errno.EROFS: ("the file system is read-only", "put the runs on a writable disk"),
}
RUNS_FOLDER_HINT = "(choose the runs folder with --runs-dir or $ISOFLOP_RUNS)"


class UnwritableError(OSError):
    """A file of a run could not be written: disk full, quota, permissions or a read-only disk."""

    def __init__(self, path: Path | str, cause: OSError) -> None:
        problem, remedy = _WRITE_PROBLEMS[cause.errno]
        super().__init__(cause.errno, f"cannot write {path}: {problem} ({os.strerror(cause.errno)}); "
                                      f"{remedy} {RUNS_FOLDER_HINT}")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a disk-full or permission error raised while writing `path` into an UnwritableError."""
    try:
        yield
    except UnwritableError:
        raise
    except OSError as error:
        if error.errno in _WRITE_PROBLEMS:
            raise UnwritableError(path, error) from error
        raise


FULL_BELOW_BYTES = 1 << 20  # a write that fails with less free space than this failed for want of it


def _nearly_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BELOW_BYTES


@contextlib.contextmanager
def atomic_output(path: Path | str, *, replace: bool = True) -> Iterator[BinaryIO]:
    """isoflop.atomic.atomic_output, with UnwritableError for a full disk or an unwritable folder.

    Some writers hide the OSError of a full disk in their own error (torch.save raises a
    RuntimeError from its zip writer); such an error, raised while the disk has (almost) no room
    left, is reported as the full disk it is. Checked before the partial temp file is deleted."""
    with writing(path), atomic.atomic_output(path, replace=replace) as f:
        try:
            yield f
        except Exception as error:
            if not isinstance(error, OSError) and _nearly_full(Path(path).parent):
                raise OSError(errno.ENOSPC, f"{type(error).__name__}: {error}") from error
            raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with writing(path):
        atomic.atomic_write_text(path, text)


def atomic_write_json(path: Path | str, value: Any) -> None:
    with writing(path):
        atomic.atomic_write_json(path, value)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def append_jsonl(path: Path | str, record: dict[str, Any]) -> None:
    """Append one JSON line and make it durable before returning."""
    line = _json_line(record)
    with writing(path), open(path, "a", encoding="utf-8", buffering=1) as f:
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

    @property
    def job_path(self) -> Path:
        return self.path / "job.json"

    def create(self) -> "RunDir":
        with writing(self.checkpoint_dir):
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

    # -- SLURM job ----------------------------------------------------------------------------

    def read_job(self) -> dict[str, Any] | None:
        return read_json(self.job_path) if self.job_path.exists() else None

    def write_job(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.job_path, record)

    # -- log ----------------------------------------------------------------------------------

    def append_log(self, line: str) -> None:
        with writing(self.log_path), open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")


# -- leases: who trains a run ------------------------------------------------------------------

LEASE_NAME = ".lease.json"
MUTEX_NAME = ".lock"
LEASE_ENV = "ISOFLOP_LEASE_S"
DEFAULT_LEASE_S = 60.0
RENEWALS_PER_LEASE = 4  # the holder renews every lease_s / 4, so a late renewal or two is harmless


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), so a recycled pid is not taken for the holder."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _holder_is_alive(record: dict[str, Any], now: float) -> bool:
    """A lease is live until it expires; on this host, only while its holder process exists too."""
    if record.get("expires_at", 0) <= now:
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine: only the clock can tell
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(record["pid"])
    if fields is None:
        return True  # no /proc: the pid exists, believe it
    if fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    started = record.get("pid_start")
    return started is None or len(fields) <= 19 or fields[19] == started


def _read_lease(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path / LEASE_NAME)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable: nobody can prove they hold it


@contextlib.contextmanager
def _mutex(path: Path) -> Iterator[None]:
    """Serialises taking, renewing and giving back the lease of one run (held for milliseconds)."""
    with writing(path / MUTEX_NAME), open(path / MUTEX_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lease_holder(path: Path | str) -> dict[str, Any] | None:
    """The record of whoever holds the lease of the run in `path` now (host, pid, expires_at), or None."""
    record = _read_lease(Path(path))
    return record if record is not None and _holder_is_alive(record, time.time()) else None


class RunLease:
    """The right to train one run, held by one process: a lease file naming the holder and until when.

    A lease lasts lease_s seconds and its holder renews it while it trains. It ends when the holder
    gives it back, when the holder's process is gone (seen at once on the same host), or when
    lease_s pass without a renewal (a dead machine, a hung or stopped process). So a crash never
    leaves a run locked for longer than a lease, and a run is never trained by two processes: a
    holder that finds its lease taken over (it was stopped for longer than a lease) must stop at
    once (see `hold_lease`).
    """

    def __init__(self, path: Path, token: str, lease_s: float) -> None:
        self.path, self.token, self.lease_s = path, token, lease_s

    @classmethod
    def acquire(cls, path: Path | str, lease_s: float | None = None) -> RunLease | None:
        """Take the run's lease, or return None if a live holder has it."""
        path, lease_s = Path(path), lease_s or lease_seconds()
        with _mutex(path):
            current = _read_lease(path)
            if current is not None and _holder_is_alive(current, time.time()):
                return None
            lease = cls(path, secrets.token_hex(8), lease_s)
            lease._write(acquired_at=utc_now())
            return lease

    def _write(self, **fields: Any) -> None:
        pid = os.getpid()
        atomic_write_json(self.path / LEASE_NAME, fields | {
            "token": self.token, "host": socket.gethostname(), "pid": pid,
            "pid_start": _process_start(pid), "lease_s": self.lease_s,
            "expires_at": time.time() + self.lease_s,
        })

    def renew(self) -> bool:
        """Extend the lease; False if it was lost (it expired and another process took it)."""
        with _mutex(self.path):
            current = _read_lease(self.path)
            if current is None or current.get("token") != self.token:
                return False
            self._write(acquired_at=current.get("acquired_at"))
            return True

    def release(self) -> None:
        with _mutex(self.path):
            current = _read_lease(self.path)
            if current is not None and current.get("token") == self.token:
                (self.path / LEASE_NAME).unlink()


def _stop_this_process(lease: RunLease) -> None:
    # Another process trains the run now: writing one more byte could corrupt its files.
    print(f"{lease.path}: lease lost to another process; stopping at once", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def hold_lease(
    path: Path | str,
    lease_s: float | None = None,
    on_lost: Callable[[RunLease], None] = _stop_this_process,
) -> Iterator[RunLease | None]:
    """Yields the run's lease, renewed by a background thread while the block runs, or None if a
    live holder has it. If a renewal finds the lease taken over, `on_lost` runs (by default it
    kills this process: see RunLease)."""
    lease = RunLease.acquire(path, lease_s)
    if lease is None:
        yield None
        return
    stop = threading.Event()

    def renew_until_stopped() -> None:
        while not stop.wait(lease.lease_s / RENEWALS_PER_LEASE):
            try:
                renewed = lease.renew()
            except OSError:
                continue  # e.g. a full disk: try again; the lease holds until it expires
            if not renewed:
                on_lost(lease)
                return

    renewer = threading.Thread(target=renew_until_stopped, name=f"lease-{Path(path).name}", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        lease.release()
