"""CUDA MPS for packed runs (isoflop/orchestrator/mps.py): when it is used, and the daemon's life.

On CPU machines the control program is absent; a stand-in executable on PATH records how the
context manager drives it. The real daemon is exercised by the gpu-marked test."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from isoflop.orchestrator.mps import CONTROL, mps_daemon, worth_it


def test_mps_is_worth_it_only_where_single_gpu_runs_share_a_gpu():
    assert worth_it(workers=8, gpus=1, gpus_per_run=1)
    assert not worth_it(workers=1, gpus=1, gpus_per_run=1)
    assert not worth_it(workers=8, gpus=8, gpus_per_run=1)
    assert not worth_it(workers=8, gpus=0, gpus_per_run=0)  # CPU runs
    assert not worth_it(workers=4, gpus=2, gpus_per_run=2)  # multi-GPU runs never share


def _stand_in(tmp_path: Path, start_status: int) -> Path:
    """An executable named like the control program that logs its arguments, stdin and pipe dir."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    script = bin_dir / CONTROL
    script.write_text(
        f"#!/bin/sh\necho \"args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat <&0 2>/dev/null | tr -d '\\n')\" >> {log}\n"
        f"[ \"$1\" = -d ] && exit {start_status}\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def test_without_the_control_program_runs_share_the_gpu_plainly(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with mps_daemon(tmp_path / "mps") as env:
        assert env is None


def test_the_daemon_starts_private_to_its_folder_and_stops_after(tmp_path, monkeypatch):
    log = _stand_in(tmp_path, start_status=0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with mps_daemon(tmp_path / "mps") as env:
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"),
                       "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
        assert Path(env["CUDA_MPS_PIPE_DIRECTORY"]).is_dir()
        assert log.read_text().splitlines() == [f"args=-d pipe={tmp_path / 'mps' / 'pipe'} stdin="]
    assert log.read_text().splitlines()[-1] == f"args= pipe={tmp_path / 'mps' / 'pipe'} stdin=quit"


def test_a_refused_daemon_or_a_failed_probe_means_no_mps(tmp_path, monkeypatch):
    log = _stand_in(tmp_path, start_status=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with mps_daemon(tmp_path / "mps") as env:
        assert env is None
    assert len(log.read_text().splitlines()) == 1  # started (refused), never told to quit
    (tmp_path / "bin").rename(tmp_path / "old")
    log = _stand_in(tmp_path, start_status=0)
    with mps_daemon(tmp_path / "mps2", probe=[sys.executable, "-c", "raise SystemExit(3)"]) as env:
        assert env is None
    assert log.read_text().splitlines()[-1].endswith("stdin=quit")  # started, so stopped


@pytest.mark.gpu
def test_cuda_processes_run_as_clients_of_a_real_daemon(tmp_path):
    probe = [sys.executable, "-c", "import torch; torch.ones(1, device='cuda')"]
    with mps_daemon(tmp_path / "mps", probe=probe) as env:
        if env is None:
            pytest.skip("MPS cannot start on this machine")
        work = "import torch; x = torch.randn(256, 256, device='cuda'); print(float((x @ x).sum()))"
        procs = [subprocess.Popen([sys.executable, "-c", work], env=os.environ | env) for _ in range(2)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]


def test_the_local_executor_tries_mps_only_where_runs_share_a_gpu(monkeypatch):
    from isoflop.orchestrator.executors.local import MPS_ENV, LocalExecutor

    monkeypatch.delenv(MPS_ENV, raising=False)
    assert LocalExecutor(workers=4, gpus=["0"]).use_mps
    assert not LocalExecutor(workers=1, gpus=["0"]).use_mps
    assert not LocalExecutor(workers=4, gpus=[]).use_mps
    monkeypatch.setenv(MPS_ENV, "off")
    assert not LocalExecutor(workers=4, gpus=["0"]).use_mps
    monkeypatch.setenv(MPS_ENV, "on")
    with pytest.raises(ValueError, match="ISOFLOP_MPS='on'; allowed: auto, off"):
        LocalExecutor(workers=4, gpus=["0"])


def test_workers_become_clients_of_the_executors_daemon(tmp_path, monkeypatch):
    """With a daemon that starts and a probe that passes, every worker's environment names its
    pipe directory; afterwards it is gone again."""
    from isoflop.orchestrator.executors import local

    _stand_in(tmp_path, start_status=0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(local, "MPS_PROBE", (sys.executable, "-c", "pass"))
    monkeypatch.delenv(local.MPS_ENV, raising=False)
    executor = local.LocalExecutor(workers=2, gpus=["0"])
    with executor.mps_daemon():
        pipe = executor.worker_env(1)["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in executor.worker_env(1) and not Path(pipe).exists()
