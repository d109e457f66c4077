"""The local executor and launch: every run in its own process, reruns idempotent, failures recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from isoflop.orchestrator.executors import Job, make_executor
from isoflop.orchestrator.executors.local import LocalExecutor, visible_gpus
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.estimate import profile_for
from isoflop.orchestrator.launch import launch, longest_first, parse_only, select
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.spec import load_sweep
from isoflop.orchestrator.worker import EXIT_LOCKED, is_locked, run_lock, train_rundir

# Two tiny models, ~20 steps each: a run takes well under a second once torch is imported.
SWEEP = """
name: exec-test
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
  transformer: {{baseline: true}}
  dynamic-qkv: {{overrides: {{conv: {{rank: 4}}}}}}
grid: {{kind: isoflop, budgets: [1.0e+9], sizes: [tiny]}}
train: {{batch_size: 2, seq_len: 32, lr: 0.003, eval_tokens: 256, device: cpu}}
executor: {{workers: 2}}
"""



def load(tmp_path: Path, corpus: Path | str):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(corpus=corpus))
    sweep = load_sweep(path)
    return sweep, expand(sweep)


def test_runs_each_run_then_a_rerun_does_nothing(tmp_path, corpus):
    sweep, runs = load(tmp_path, corpus)
    directory = tmp_path / "runs" / sweep.name
    console = Console(record=True, width=200)
    report = launch(sweep, runs, directory, LocalExecutor(workers=2, gpus=[], cores=2), console)
    assert report.states == {"done": 2} and report.all_finished
    for run in runs:
        rundir = RunDir(directory / run.run_id)
        assert rundir.state == "done"
        assert rundir.read_result()["tokens"] == run.tokens
        assert "done:" in rundir.log_path.read_text()  # the worker's output went to the run's log
    pids = {RunDir(directory / r.run_id).read_status()["pid"] for r in runs}
    assert len(pids) == 2 and os.getpid() not in pids  # each run in a process of its own

    before = {r.run_id: (directory / r.run_id / "result.json").stat().st_mtime_ns for r in runs}
    console = Console(record=True, width=200)
    again = launch(sweep, runs, directory, LocalExecutor(workers=2, gpus=[], cores=2), console)
    assert again.already_finished == 2 and not again.states
    assert "nothing to do: 2 of 2 runs" in console.export_text()
    assert before == {r.run_id: (directory / r.run_id / "result.json").stat().st_mtime_ns for r in runs}


def test_a_failing_run_is_recorded_and_retried_on_the_next_launch(tmp_path, corpus):
    sweep, runs = load(tmp_path, tmp_path / "no-such-corpus")
    directory = tmp_path / "runs" / sweep.name
    console = Console(record=True, width=2000)  # no wrapping: the error is one long line
    report = launch(sweep, runs, directory, LocalExecutor(workers=2, gpus=[], cores=2), console)
    assert report.states == {"failed": 2} and not report.all_finished
    status = RunDir(directory / runs[0].run_id).read_status()
    assert status["state"] == "failed" and "no-such-corpus" in status["error"]
    # Each failed run's line says why (the error's first line), not only that it failed.
    failed_lines = [line for line in console.export_text().splitlines() if line.strip().startswith("failed")]
    assert len(failed_lines) == 2
    assert all(line.endswith(status["error"].splitlines()[0]) for line in failed_lines)
    assert "Traceback" in RunDir(directory / runs[0].run_id).log_path.read_text()
    # Failed runs are not finished: the next launch tries them again (and they fail again).
    again = launch(sweep, runs, directory, LocalExecutor(workers=1, gpus=[], cores=2), Console(record=True))
    assert again.already_finished == 0 and again.states == {"failed": 2}
    assert RunDir(directory / runs[0].run_id).read_status()["attempts"] == 2


def test_a_worker_killed_mid_run_leaves_the_run_failed(tmp_path, corpus):
    from isoflop.orchestrator.executors import JobEnd
    from isoflop.orchestrator.launch import _final_state

    rundir = RunDir(tmp_path / "run").create()
    rundir.write_status("running")  # what a worker records before it is killed
    end = JobEnd(Job("x", rundir.path, "x"), returncode=-9, seconds=1.0)
    assert _final_state(end) == "failed"
    assert "code -9" in rundir.read_status()["error"]


def test_a_run_locked_by_another_process_is_left_alone(tmp_path, corpus):
    sweep, runs = load(tmp_path, corpus)
    directory = tmp_path / "runs" / sweep.name
    rundir = RunDir(directory / runs[0].run_id).create()
    rundir.write_spec(runs[0].spec.to_dict())
    assert not is_locked(rundir.path)
    with run_lock(rundir.path) as acquired:
        assert acquired and is_locked(rundir.path)
        assert train_rundir(rundir.path) == EXIT_LOCKED  # a second worker refuses
        console = Console(record=True, width=200)
        report = launch(sweep, runs[:1], directory, LocalExecutor(1, gpus=[], cores=2), console)
        assert report.busy_elsewhere == 1 and "running in another process" in console.export_text()
    assert not is_locked(rundir.path)


def test_gpus_are_assigned_round_robin_and_cores_divided():
    executor = LocalExecutor(workers=4, gpus=["0", "1"], cores=16)
    envs = [executor.worker_env(slot) for slot in range(4)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0", "1", "0", "1"]
    assert {env["ISOFLOP_THREADS"] for env in envs} == {"4"}
    cpu_only = LocalExecutor(workers=3, gpus=[], cores=2)
    assert "CUDA_VISIBLE_DEVICES" not in cpu_only.worker_env(0)
    assert cpu_only.worker_env(0)["ISOFLOP_THREADS"] == "1"


def test_visible_gpus_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_only_selects_runs_by_label(tmp_path, corpus):
    _, runs = load(tmp_path, corpus)
    assert [r.arch for r in select(runs, parse_only(["arch=dynamic-qkv"]))] == ["dynamic-qkv"]
    assert len(select(runs, parse_only(["arch=dynamic-qkv,transformer", "budget=1e9"]))) == 2
    assert select(runs, parse_only(["size=d64-l2"])) == []
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_only(["colour=red"])
    with pytest.raises(ValueError):
        make_executor("slurm", 1)


def test_runs_start_longest_first(tmp_path):
    """The paper-small grid: the runs the estimate calls longest come first, ties keep their order."""
    sweep = load_sweep(Path(__file__).parent.parent / "sweeps" / "paper-small.yaml")
    runs = expand(sweep)
    ordered = longest_first(runs)
    assert sorted(r.run_id for r in ordered) == sorted(r.run_id for r in runs)
    seconds = [profile_for("cuda").run_seconds(r) for r in ordered]
    assert seconds == sorted(seconds, reverse=True)
    assert ordered[0].arch == "dynamic-all-linear" and ordered[0].budget == max(r.budget for r in runs)
    assert ordered[-1].budget == min(r.budget for r in runs)
