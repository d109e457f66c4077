"""Where a result came from: code version, software, hardware, data and time.

Recorded in every result.json so that a number in a table can be traced back to what produced it.
"""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import isoflop
from isoflop.orchestrator.rundir import utc_now

PACKAGE_DIR = Path(isoflop.__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_sha() -> str | None:
    """Commit of the checkout the package runs from; None outside a git checkout or before a
    first commit."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from that commit (a dirty sha does not pin the code)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    # platform.processor() is empty on most Linux builds; /proc/cpuinfo has the marketing name.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def provenance(run_id: str, corpus_fingerprint: str, device: torch.device) -> dict[str, Any]:
    return {
        "isoflop_version": isoflop.__version__,
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "torch_version": torch.__version__,
        "triton_version": package_version("triton"),
        "python_version": platform.python_version(),
        "device": device.type,
        "device_name": device_name(device),
        "hostname": socket.gethostname(),
        "corpus_fingerprint": corpus_fingerprint,
        "run_id": run_id,
        "timestamp": utc_now(),
    }
