"""SLURM through submitit: job arrays, job records, batched state queries, preemption and retry.

The first half needs no cluster (parsing SLURM's answers, merging them with run directories,
settings, chunking). The second half runs against a real single-node cluster with accounting,
started by scripts/local-slurm.sh (by .ci/run, or by the `cluster` fixture here, which then stops it
again); those tests are skipped only when SLURM cannot be installed on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from isoflop.cli import main
from isoflop.orchestrator.executors.slurm import chunks, sbatch_parameters
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.jobs import (
    GONE,
    JobState,
    SlurmQueryError,
    combined_state,
    query_states,
)
from isoflop.orchestrator.rundir import RunDir
from isoflop.orchestrator.spec import (
    SlurmSettings,
    SweepError,
    load_sweep,
    slurm_settings_with,
)
from isoflop.orchestrator.status import run_states

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-slurm.sh"
EXIT_CANNOT_INSTALL = 3  # scripts/local-slurm.sh: SLURM cannot be installed here

SWEEP = """
name: {name}
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
{architectures}
grid: {{kind: isoflop, budgets: [{budget}], sizes: [tiny]}}
train: {{batch_size: 2, seq_len: 32, lr: 0.003, eval_tokens: 256, device: cpu}}
executor: {{kind: slurm, array_parallelism: 2, {executor}}}
"""
TWO_ARCHS = "  transformer: {baseline: true}\n  dynamic-qkv: {overrides: {conv: {rank: 4}}}"
THREE_ARCHS = TWO_ARCHS + "\n  static-qkv: {}"
ONE_ARCH = "  transformer: {baseline: true}"



def write_sweep(tmp_path: Path, corpus: Path, name: str, architectures: str = TWO_ARCHS,
                budget: str = "1.0e+9", executor: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, corpus=corpus, architectures=architectures,
                                 budget=budget, executor=executor))
    return path


# -- without a cluster ------------------------------------------------------------------------


def test_slurm_settings_come_from_the_sweep_and_the_command_line(tmp_path, corpus):
    sweep = load_sweep(write_sweep(tmp_path, corpus, "settings",
                                   executor='partition: gpu, time: "1:30:00", mem: 500M, gpus_per_run: 1'))
    settings = sweep.executor.slurm
    assert (sweep.executor.kind, settings.partition, settings.time_min, settings.gpus_per_run) == \
        ("slurm", "gpu", 90, 1)
    assert settings.mem_gb == pytest.approx(500 / 1024) and settings.array_parallelism == 2
    changed = slurm_settings_with(settings, {"time": "45", "array_parallelism": "8"}, "command line")
    assert (changed.time_min, changed.array_parallelism, changed.partition) == (45, 8, "gpu")
    with pytest.raises(SweepError, match=r"command line: time = '1 hour'.*2:00:00"):
        slurm_settings_with(settings, {"time": "1 hour"}, "command line")
    with pytest.raises(SweepError, match=r"executor.array_parallelism = 0.*>= 1"):
        load_sweep(write_sweep(tmp_path, corpus, "bad", executor="array_parallelism: 0"))
    with pytest.raises(SweepError, match=r"executor.partition = 'a b'.*SLURM name"):
        load_sweep(write_sweep(tmp_path, corpus, "bad", executor="partition: a b"))


def test_sbatch_parameters_pin_the_code_and_ask_for_what_the_settings_say(tmp_path):
    settings = SlurmSettings(partition="gpu", gpus_per_run=2, cpus_per_run=8, mem_gb=16, time_min=120,
                             array_parallelism=4, setup=("module load cuda",))
    parameters = sbatch_parameters(settings, "isoflop-x", tmp_path / ".code" / "abc")
    assert parameters["setup"][0] == f"export PYTHONPATH={tmp_path}/.code/abc${{PYTHONPATH:+:$PYTHONPATH}}"
    assert parameters["setup"][1:] == ["export PYTHONSAFEPATH=1", "module load cuda"]
    assert {k: parameters[k] for k in ("partition", "gpus_per_node", "cpus_per_task", "mem", "time",
                                       "array_parallelism")} == \
        {"partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 8, "mem": "16384M", "time": 120,
         "array_parallelism": 4}
    assert "gpus_per_node" not in sbatch_parameters(SlurmSettings(), "x", tmp_path)  # CPU runs ask for none
    assert [list(c) for c in chunks(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_states_of_all_jobs_come_from_at_most_two_slurm_calls():
    calls = []

    def fake_slurm(command: list[str]) -> str:
        calls.append(command)
        if command[0] == "squeue":  # knows the live array 12 only
            return "12_0|RUNNING|None\n12_1|PENDING|JobArrayTaskLimit\n"
        # sacct: array 9 ended long ago; its never-started tasks come as one range line
        return "9_0|COMPLETED|0:0\n9_0.batch|COMPLETED|0:0\n9_1|CANCELLED by 0|0:0\n9_[2-3]|CANCELLED|0:0\n"

    wanted = ["12_0", "12_1", "9_0", "9_1", "9_2", "9_3", "9_7"]
    states = query_states(wanted, fake_slurm)
    assert len(calls) == 2, "one squeue and one sacct call for the whole sweep"
    assert calls[0][:2] == ["squeue", "-h"] and "12,9" in calls[0]
    assert calls[1][0] == "sacct" and "9" in calls[1] and "12" not in ",".join(calls[1])
    assert {j: s.state for j, s in states.items()} == {
        "12_0": "RUNNING", "12_1": "PENDING", "9_0": "COMPLETED", "9_1": "CANCELLED",
        "9_2": "CANCELLED", "9_3": "CANCELLED", "9_7": GONE,
    }
    calls.clear()
    query_states(["12_0", "12_1"], fake_slurm)
    assert len(calls) == 1, "sacct is only asked about jobs squeue has forgotten"


@pytest.mark.parametrize("run_state, slurm, expected", [
    ("pending", "PENDING", ("pending", "")),
    ("preempted", "PENDING", ("preempted", "")),  # requeued after a preemption, waiting to resume
    ("pending", "RUNNING", ("running", "")),
    ("running", "CANCELLED", ("cancelled", "SLURM job 5_1 was cancelled")),
    ("pending", GONE, ("cancelled", "SLURM job 5_1 left the queue before it started")),
    ("failed", "FAILED", ("failed", "FileNotFoundError: no corpus")),  # the run's own error wins
    ("interrupted", "TIMEOUT", ("failed", "SLURM job 5_1 hit its time limit")),
    ("interrupted", "OUT_OF_MEMORY", ("failed", "SLURM job 5_1 ran out of memory")),
    ("pending", "FAILED", ("failed", "SLURM job 5_1 ended FAILED (exit 1:0); log: /x/5_1.err")),
    ("done", "CANCELLED", ("done", "")),  # a finished result stands whatever happened after
    ("interrupted", "COMPLETED", ("failed", "SLURM job 5_1 completed but the run is interrupted")),
])
def test_a_runs_state_merges_its_directory_and_its_job(run_state, slurm, expected):
    status = {"error": "FileNotFoundError: no corpus"} if run_state == "failed" else {}
    state, error = combined_state(run_state, status, JobState("5_1", slurm, "1:0"), {"stderr": "/x/5_1.err"})
    assert state == expected[0] and error.startswith(expected[1])


def test_status_says_when_slurm_cannot_be_asked(tmp_path):
    rundir = RunDir(tmp_path / "abc").create()
    rundir.write_status("pending")
    rundir.write_job({"job_id": "7_0"})

    def no_slurm(command: list[str]) -> str:
        raise SlurmQueryError("squeue is not installed here")

    entry = {"run_id": "abc", "steps": 10}
    [row] = run_states([entry], tmp_path, slurm=no_slurm)
    assert row["state"] == "pending" and row["job_id"] == "7_0"
    assert row["error"] == "cannot ask SLURM: squeue is not installed here"
    with pytest.raises(SlurmQueryError):
        run_states([entry], tmp_path, slurm=no_slurm, strict=True)


def test_submit_needs_slurm_and_retry_needs_a_choice(tmp_path, corpus, capsys):
    sweep = write_sweep(tmp_path, corpus, "local-kind")
    sweep.write_text(sweep.read_text().replace("kind: slurm", "kind: local"))
    assert main(["submit", str(sweep), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "allowed: --executor slurm" in capsys.readouterr().err
    assert main(["retry", str(sweep), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "allowed: --failed, --cancelled" in capsys.readouterr().err
    assert main(["submit", str(sweep), "--executor", "slurm", "--time", "soon",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "command line: time = 'soon'" in capsys.readouterr().err


def test_retry_without_slurm_trains_the_failed_runs_here(tmp_path, corpus, capsys):
    late_corpus = tmp_path / "late-corpus"  # missing at first
    sweep = write_sweep(tmp_path, late_corpus, "retry-here", ONE_ARCH)
    sweep.write_text(sweep.read_text().replace("kind: slurm", "kind: local"))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert main(["run", str(sweep), *runs]) == 2  # a missing corpus is one line, not a traceback
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweep}: data.corpus=") and err.count("\n") == 1
    [planned] = expand(load_sweep(sweep))
    rundir = RunDir(tmp_path / "runs" / "retry-here" / planned.run_id).create()
    rundir.write_spec(planned.spec.to_dict())
    rundir.write_status("failed", error="RuntimeError: as if a worker had failed")
    assert main(["retry", str(sweep), "--cancelled", *runs]) == 0
    assert "no cancelled runs to retry" in capsys.readouterr().out
    shutil.copytree(corpus, late_corpus)
    assert main(["retry", str(sweep), "--failed", *runs]) == 0
    assert rundir.state == "done" and rundir.read_status()["error"] is None


# -- against a real cluster -------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster():
    """A running local SLURM cluster: the one .ci/run started, or one started (and stopped) here."""
    env_line = subprocess.run([SCRIPT, "env"], capture_output=True, text=True, check=True).stdout
    conf = env_line.strip().split("=", 1)[1]
    started_here = False
    if subprocess.run([SCRIPT, "status"], capture_output=True, check=False).returncode != 0:
        up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=900, check=False)
        if up.returncode == EXIT_CANNOT_INSTALL:
            pytest.skip(f"SLURM cannot be installed here: {up.stderr.strip()}")
        assert up.returncode == 0, f"scripts/local-slurm.sh up failed:\n{up.stdout}\n{up.stderr}"
        started_here = True
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sbatch, squeue, sacct and the jobs themselves read it
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous
    if started_here:
        subprocess.run([SCRIPT, "down"], capture_output=True, timeout=120, check=False)


def rows_of(sweep_path: Path, runs_root: Path) -> list[dict]:
    sweep = load_sweep(sweep_path)
    return run_states([run.labels() for run in expand(sweep)], runs_root / sweep.name)


def wait_until(sweep_path: Path, runs_root: Path, settled, timeout_s: float = 150) -> list[dict]:
    """Poll the sweep's rows (as `isoflop status` computes them) until settled(rows) holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = rows_of(sweep_path, runs_root)
        if settled(rows):
            return rows
        assert time.monotonic() < deadline, f"timed out; states: {[(r['state'], r['error']) for r in rows]}"
        time.sleep(0.5)


def status_json(sweep_path: Path, runs_root: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(sweep_path), "--json", "--runs-dir", str(runs_root)]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_tiny_sweep_is_submitted_as_arrays_and_completes(cluster, tmp_path, corpus, capsys):
    sweep_path = write_sweep(tmp_path, corpus, "arrays", THREE_ARCHS, executor="max_array_size: 2")
    runs_root = tmp_path / "runs"
    started = time.monotonic()
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    assert time.monotonic() - started < 15, "submit returns at once, it does not wait for the jobs"
    out = capsys.readouterr().out
    assert "submitted 3 of 3 runs" in out
    directory = runs_root / "arrays"
    records = {p.parent.name: json.loads(p.read_text()) for p in directory.glob("*/job.json")}
    assert len(records) == 3
    arrays = {r["job_id"].split("_")[0] for r in records.values()}
    assert len(arrays) == 2, "max_array_size 2: three runs go as an array of two and one more job"
    code = Path(next(iter(records.values()))["code"])
    assert code.parent == directory / ".code" and (code / "isoflop" / "__init__.py").exists()

    # A second submit while the jobs are queued or running submits nothing twice.
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    assert "submitted 0 of 3 runs" in capsys.readouterr().out

    rows = wait_until(sweep_path, runs_root, lambda rows: all(r["state"] == "done" for r in rows))
    assert all(r["final_val_loss"] < 4.0 and r["job_id"] for r in rows)
    report = status_json(sweep_path, runs_root, capsys)
    assert report["counts"] == {"done": 3}
    for run_id in records:
        log = (directory / run_id / "train.log").read_text()
        # The job imported the snapshot taken at submission, not the checkout.
        assert f"code {code / 'isoflop'}" in log and "done:" in log


def test_a_cancelled_job_is_reported_cancelled_and_retried(cluster, tmp_path, corpus, capsys):
    sweep_path = write_sweep(tmp_path, corpus, "cancel", TWO_ARCHS, budget="1.0e+11",
                             executor="array_parallelism: 1")
    runs_root = tmp_path / "runs"
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    rows = wait_until(sweep_path, runs_root, lambda rows: any(r["state"] == "running" for r in rows))
    array = rows[0]["job_id"].split("_")[0]
    # One task runs, the other waits (parallelism 1): cancel the whole array.
    subprocess.run(["scancel", array], check=True)
    rows = wait_until(sweep_path, runs_root, lambda rows: all(r["state"] == "cancelled" for r in rows))
    assert all("cancelled" in r["error"] for r in rows)
    assert status_json(sweep_path, runs_root, capsys)["counts"] == {"cancelled": 2}

    # Cancelled runs are left alone by submit, and resubmitted by retry --cancelled.
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    assert "submitted 0 of 2 runs (2 cancelled)" in capsys.readouterr().out
    first_job = rows[0]["job_id"]
    assert main(["retry", str(sweep_path), "--cancelled", "--only", "arch=transformer",
                 "--runs-dir", str(runs_root)]) == 0
    assert "submitted 1 of 1 runs" in capsys.readouterr().out
    record = RunDir(runs_root / "cancel" / rows[0]["run_id"]).read_job()
    assert record["previous_job_ids"] == [first_job] and record["job_id"] != first_job
    assert rows_of(sweep_path, runs_root)[0]["state"] in ("pending", "running")
    subprocess.run(["scancel", record["job_id"].split("_")[0]], check=True)  # no need to finish it


def test_a_failing_run_is_reported_with_its_error_and_retried(cluster, tmp_path, corpus, capsys):
    late_corpus = tmp_path / "late-corpus"  # does not exist yet: the run fails
    sweep_path = write_sweep(tmp_path, late_corpus, "failing", ONE_ARCH)
    runs_root = tmp_path / "runs"
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    [row] = wait_until(sweep_path, runs_root, lambda rows: rows[0]["state"] == "failed")
    assert "late-corpus" in row["error"] and row["slurm_state"] == "FAILED"
    report = status_json(sweep_path, runs_root, capsys)
    assert report["runs"][0]["state"] == "failed" and "late-corpus" in report["runs"][0]["error"]
    assert "Traceback" in (runs_root / "failing" / row["run_id"] / "train.log").read_text()

    # submit leaves a failed run alone; retry --failed runs it again, and now it works.
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    assert "submitted 0 of 1 runs (1 failed)" in capsys.readouterr().out
    shutil.copytree(corpus, late_corpus)
    assert main(["retry", str(sweep_path), "--failed", "--runs-dir", str(runs_root)]) == 0
    [row] = wait_until(sweep_path, runs_root, lambda rows: rows[0]["state"] in ("done", "failed"))
    assert row["state"] == "done" and row["error"] == ""
    status = RunDir(runs_root / "failing" / row["run_id"]).read_status()
    assert status["attempts"] == 2


def test_a_preempted_run_resumes_from_its_checkpoint_with_the_same_result(cluster, tmp_path, corpus):
    import submitit

    from isoflop.train import run as train

    sweep_path = write_sweep(tmp_path, corpus, "preempt", ONE_ARCH, budget="1.0e+10")
    runs_root = tmp_path / "runs"
    assert main(["submit", str(sweep_path), "--runs-dir", str(runs_root)]) == 0
    [row] = wait_until(sweep_path, runs_root, lambda rows: rows[0]["state"] == "running"
                       and rows[0]["step"] >= 35)  # past its first checkpoint
    directory = runs_root / "preempt"
    # What SLURM does to a preempted job with submitit: SIGTERM, then USR2; submitit calls
    # SlurmRun.checkpoint and requeues the job.
    submitit.SlurmJob(folder=directory / ".slurm" / "%j", job_id=row["job_id"])._interrupt()
    [row] = wait_until(sweep_path, runs_root, lambda rows: rows[0]["state"] in ("preempted", "done"))
    [row] = wait_until(sweep_path, runs_root, lambda rows: rows[0]["state"] == "done")
    rundir = RunDir(directory / row["run_id"])
    log = rundir.log_path.read_text()
    stopped_at = int(log.split("preempted: stopped on request at step ")[1].split()[0])
    assert 35 <= stopped_at < row["total_steps"]
    assert f"resumed from step {stopped_at}" in log, "resumed from the checkpoint saved on the signal"
    assert rundir.read_status()["attempts"] == 2

    # The same spec trained without interruption ends with the very same numbers.
    [planned] = expand(load_sweep(sweep_path))
    reference = train(planned.spec, tmp_path / "reference")
    result = rundir.read_result()
    assert result["final_val_loss"] == reference["final_val_loss"]
    assert result["final_train_loss"] == reference["final_train_loss"]
    assert [m["val_loss"] for m in rundir.read_metrics()] == \
        [m["val_loss"] for m in RunDir(tmp_path / "reference").read_metrics()]
