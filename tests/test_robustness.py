"""Runs that survive what goes wrong: a worker killed with SIGKILL, two launches racing on one
sweep, dead, hung and foreign lease holders, writers killed at random points, a full disk and an
unwritable runs folder. Every fault here is real (real signals, real processes, a real full
device) except where a comment says it is injected, and why.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from isoflop.cli import main
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.rundir import (
    LEASE_NAME,
    ResultExistsError,
    RunDir,
    RunLease,
    UnwritableError,
    atomic_write_json,
    hold_lease,
    lease_holder,
    read_json,
    read_jsonl,
)
from isoflop.orchestrator.spec import load_sweep
from isoflop.orchestrator.status import run_states

ISOFLOP = [sys.executable, "-m", "isoflop"]
SWEEP = """
name: {name}
data: {{corpus: {corpus}, tokenizer: bytes}}
architectures:
  transformer: {{baseline: true}}
{more}
grid: {{kind: isoflop, budgets: [{budget}], sizes: [tiny]}}
train: {{batch_size: 2, seq_len: 32, lr: 0.003, eval_tokens: 256, device: cpu}}
seeds: {seeds}
executor: {{workers: {workers}}}
"""



def write_sweep(folder: Path, corpus: Path, name: str, budget: str = "1.0e+9", more: str = "",
                seeds: str = "[0]", workers: int = 2) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, corpus=corpus, budget=budget, more=more, seeds=seeds,
                                 workers=workers))
    return path


def rows_of(sweep_path: Path, runs_root: Path) -> list[dict]:
    sweep = load_sweep(sweep_path)
    return run_states([run.labels() for run in expand(sweep)], runs_root / sweep.name)


# -- crashes ----------------------------------------------------------------------------------


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, corpus):
    from isoflop.train import run as train

    sweep_path = write_sweep(tmp_path, corpus, "killed", budget="5.0e+9")  # ~175 steps, eval every ~17
    runs_root = tmp_path / "runs"
    command = ISOFLOP + ["run", str(sweep_path), "--runs-dir", str(runs_root)]
    # Its own session, so that killing the group takes the launcher, its fork server and the worker.
    launcher = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    [planned] = expand(load_sweep(sweep_path))
    rundir = RunDir(runs_root / "killed" / planned.run_id)
    deadline = time.monotonic() + 60
    while (rundir.read_status() or {}).get("step", 0) < 40:  # a checkpoint after each eval
        assert time.monotonic() < deadline and launcher.poll() is None, "the run never got going"
        time.sleep(0.02)
    worker = rundir.read_status()["pid"]
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while Path(f"/proc/{worker}/stat").exists() and Path(f"/proc/{worker}/stat").read_text().split(")")[1].split()[0] != "Z":
        time.sleep(0.01)  # SIGKILL is delivered asynchronously
    [row] = rows_of(sweep_path, runs_root)
    assert row["state"] == "interrupted", "status says running but nobody holds the lease"
    assert lease_holder(rundir.path) is None, "a dead worker's lease is free at once"

    again = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    log = rundir.log_path.read_text()
    resumed_at = int(log.split("resumed from step ")[1].split()[0])
    assert resumed_at >= 34 and rundir.read_status()["attempts"] == 2
    steps = [m["step"] for m in rundir.read_metrics()]
    assert steps == sorted(set(steps)), "no eval recorded twice after the resume"
    reference = train(planned.spec, tmp_path / "reference")  # never interrupted
    assert rundir.read_result()["final_val_loss"] == reference["final_val_loss"]


def test_a_worker_asked_to_stop_saves_a_checkpoint_where_it_is_and_resumes_there(tmp_path, corpus):
    """SIGTERM (what SLURM sends on preemption or scancel) stops a worker at the end of its current
    step, with a checkpoint there: nothing is lost, unlike a kill."""
    from isoflop.orchestrator.worker import EXIT_PREEMPTED

    [planned] = expand(load_sweep(write_sweep(tmp_path, corpus, "stopped", budget="5.0e+9")))
    rundir = RunDir(tmp_path / "run").create()
    rundir.write_spec(planned.spec.to_dict())
    command = [sys.executable, "-m", "isoflop.orchestrator.worker", str(rundir.path)]
    env = os.environ | {"ISOFLOP_THREADS": "1"}
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (rundir.read_status() or {}).get("step", 0) < 20:
        assert time.monotonic() < deadline and worker.poll() is None, "the run never got going"
        time.sleep(0.01)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == EXIT_PREEMPTED, worker.stderr.read()
    status = rundir.read_status()
    assert status["state"] == "preempted" and 20 <= status["step"] < planned.steps
    assert lease_holder(rundir.path) is None
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {status['step']}" in rundir.log_path.read_text()
    assert rundir.read_status()["state"] == "done" and rundir.read_result()["steps"] == planned.steps


NESTED_SIGNALS = """
import os, signal, sys
from isoflop.orchestrator.worker import stop_requests

sent = 0

def inside_handler(frame):
    while frame is not None:
        if frame.f_code.co_name == "request_stop":
            return True
        frame = frame.f_back
    return False

def interrupt_each_line(frame, event, arg):
    # Another signal at every line the handlers run: each interrupts the handler running then,
    # wherever it is, as a signal arriving at that moment would.
    global sent
    if event == "line" and sent < 50 and inside_handler(frame):
        sent += 1
        os.kill(os.getpid(), signal.SIGUSR2)
    return interrupt_each_line

with stop_requests() as stop:
    sys.settrace(interrupt_each_line)
    os.kill(os.getpid(), signal.SIGTERM)
    sys.settrace(None)
print("stopped" if stop.is_set() else "not stopped", sent)
"""


def test_stop_signals_interrupting_each_others_handlers_never_hang_the_worker():
    """A preemption brings SIGTERM and two USR2 (scancel's and submitit's) within milliseconds; a
    handler interrupted by the next signal's must not wait on anything it holds itself."""
    child = subprocess.run([sys.executable, "-c", NESTED_SIGNALS], capture_output=True, text=True,
                           timeout=30, check=False)
    assert child.returncode == 0, child.stderr
    stopped, sent = child.stdout.split()
    assert stopped == "stopped" and int(sent) > 0, "the handler ran, interrupted by nested signals"


def test_two_launches_on_one_sweep_never_train_a_run_twice(tmp_path, corpus):
    sweep_path = write_sweep(tmp_path, corpus, "race", more="  dynamic-qkv: {overrides: {conv: {rank: 4}}}",
                             seeds="[0, 1]", workers=2)  # one torch thread per worker
    runs_root = tmp_path / "runs"
    command = ISOFLOP + ["run", str(sweep_path), "--runs-dir", str(runs_root)]
    launches = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    outputs = [launch.communicate(timeout=180)[0] for launch in launches]
    rows = rows_of(sweep_path, runs_root)
    assert [row["state"] for row in rows] == ["done"] * 4, outputs
    for row in rows:
        rundir = RunDir(runs_root / "race" / row["run_id"])
        log = rundir.log_path.read_text()
        assert log.count("done:") == 1 and "resumed" not in log, f"{row['run_id']} trained twice:\n{log}"
        assert rundir.read_status()["attempts"] == 1
        steps = [m["step"] for m in rundir.read_metrics()]
        assert steps == sorted(set(steps))


# -- leases -----------------------------------------------------------------------------------

HOLDER = """
import sys, time
from isoflop.orchestrator.rundir import hold_lease
with hold_lease(sys.argv[1], lease_s=float(sys.argv[2])) as lease:
    assert lease is not None
    print("held", flush=True)
    while True:
        time.sleep(0.02)
"""


def start_holder(path: Path, lease_s: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(lease_s)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lease_is_exclusive_until_given_back(tmp_path):
    first = RunLease.acquire(tmp_path)
    assert first is not None and RunLease.acquire(tmp_path) is None
    assert lease_holder(tmp_path)["pid"] == os.getpid()
    first.release()
    assert lease_holder(tmp_path) is None and not (tmp_path / LEASE_NAME).exists()
    second = RunLease.acquire(tmp_path)
    assert second is not None and not first.renew(), "a lease given back is not renewed"
    second.release()


def test_a_dead_holder_on_this_host_frees_the_lease_at_once(tmp_path):
    holder = start_holder(tmp_path, lease_s=600)
    assert lease_holder(tmp_path)["pid"] == holder.pid and RunLease.acquire(tmp_path) is None
    holder.kill()
    holder.wait()
    lease = RunLease.acquire(tmp_path)  # long before the 600 s lease would expire
    assert lease is not None
    lease.release()


def test_a_lease_held_on_another_host_holds_until_it_expires(tmp_path):
    foreign = {"token": "t", "host": "node-elsewhere", "pid": 1, "pid_start": None, "lease_s": 60}
    atomic_write_json(tmp_path / LEASE_NAME, foreign | {"expires_at": time.time() + 60})
    assert RunLease.acquire(tmp_path) is None and lease_holder(tmp_path)["host"] == "node-elsewhere"
    atomic_write_json(tmp_path / LEASE_NAME, foreign | {"expires_at": time.time() - 1})
    lease = RunLease.acquire(tmp_path)
    assert lease is not None and lease_holder(tmp_path)["host"] == socket.gethostname()
    lease.release()


def test_a_recycled_pid_is_not_taken_for_the_holder(tmp_path):
    # The recorded pid is alive (it is ours) but started at another time: another process.
    record = {"token": "t", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1",
              "lease_s": 60, "expires_at": time.time() + 60}
    atomic_write_json(tmp_path / LEASE_NAME, record)
    assert lease_holder(tmp_path) is None


def test_a_stopped_holder_loses_its_lease_and_stops_at_once(tmp_path):
    holder = start_holder(tmp_path, lease_s=0.8)
    holder.send_signal(signal.SIGSTOP)  # hung: it cannot renew
    time.sleep(1.2)
    lease = RunLease.acquire(tmp_path)
    assert lease is not None, "an expired lease is taken over although its holder still exists"
    holder.send_signal(signal.SIGCONT)
    # Its renewal finds the lease taken and kills the process before it writes anything more.
    assert holder.wait(timeout=5) == -signal.SIGKILL
    assert lease.renew()
    lease.release()


def test_the_lease_is_renewed_while_held(tmp_path):
    with hold_lease(tmp_path, lease_s=0.4):
        first = read_json(tmp_path / LEASE_NAME)["expires_at"]
        time.sleep(0.5)  # longer than the lease: only renewals keep it
        assert lease_holder(tmp_path)["expires_at"] > first
    assert lease_holder(tmp_path) is None


# -- writers killed at random points ----------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from isoflop.orchestrator.rundir import ResultExistsError, RunDir
root, pad = Path(sys.argv[1]), "x" * 300_000
for i in range(1_000_000):
    rundir = RunDir(root / f"run{i % 4}").create()
    rundir.write_status("running", step=i, pad=pad)
    rundir.append_metrics({"step": i, "val_loss": 1.0 / (i + 1)})
    try:
        rundir.write_result({"run": i % 4, "written_at_step": i, "pad": pad})
    except ResultExistsError:
        pass
    rundir.write_status("done", step=i, pad=pad)
    if i == 0:
        print("writing", flush=True)
"""


def test_a_writer_killed_at_random_points_leaves_whole_files_and_never_touches_a_result(tmp_path):
    rng = random.Random(5)
    results: dict[str, bytes] = {}  # the first result.json seen for each run: it must never change
    kills = 20
    for _ in range(kills):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        assert writer.stdout.readline().strip() == b"writing"
        time.sleep(rng.uniform(0, 0.15))
        writer.kill()
        writer.wait()
        for rundir in map(RunDir, sorted(tmp_path.glob("run*"))):
            status = rundir.read_status()  # parses: never half a file
            assert status is None or (status["state"] in ("running", "done") and len(status["pad"]) == 300_000)
            read_jsonl(rundir.metrics_path)  # a line torn by the kill is skipped, nothing else is wrong
            if rundir.has_result():
                content = rundir.result_path.read_bytes()
                assert len(json.loads(content)["pad"]) == 300_000
                assert results.setdefault(rundir.path.name, content) == content, "a result was rewritten"
    assert len(results) == 4
    with pytest.raises(ResultExistsError, match="never overwritten"):
        RunDir(tmp_path / "run0").write_result({"run": "another"})


def test_two_writers_racing_on_one_result_leave_exactly_one(tmp_path):
    script = ("import sys\nfrom isoflop.orchestrator.rundir import ResultExistsError, RunDir\n"
              "try:\n    RunDir(sys.argv[1]).write_result({'writer': sys.argv[2], 'pad': 'x' * 5_000_000})\n"
              "    print('won')\nexcept ResultExistsError:\n    print('lost')\n")
    racers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                               text=True) for i in range(4)]
    answers = sorted(racer.communicate()[0].strip() for racer in racers)
    assert answers == ["lost", "lost", "lost", "won"]
    assert len(read_json(tmp_path / "result.json")["pad"]) == 5_000_000


# -- full disk, unwritable folders ------------------------------------------------------------


def test_a_real_full_device_gives_a_clear_error(tmp_path):
    # /dev/full answers every write with ENOSPC: a full disk without filling one.
    rundir = RunDir(tmp_path / "run").create()
    rundir.metrics_path.symlink_to("/dev/full")
    with pytest.raises(UnwritableError) as caught:
        rundir.append_metrics({"step": 1, "val_loss": 2.0})
    message = str(caught.value)
    assert message.startswith(f"cannot write {rundir.metrics_path}: the disk is full")
    assert "--runs-dir or $ISOFLOP_RUNS" in message and caught.value.errno == errno.ENOSPC


def test_a_full_disk_while_replacing_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    # Injected: ENOSPC when the new status is flushed to disk (where a full network disk reports it).
    rundir = RunDir(tmp_path / "run").create()
    rundir.write_status("running", step=3)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UnwritableError, match=r"cannot write .*status.json: the disk is full"):
        rundir.write_status("running", step=4)
    monkeypatch.undo()
    assert rundir.read_status()["step"] == 3
    assert sorted(p.name for p in rundir.path.iterdir()) == ["checkpoints", "status.json"], "no temp left"


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs: room for a run's small files, not for its checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_that_fills_up_mid_training_fails_the_run_with_a_clear_error(tmp_path, corpus, small_disk, capsys):
    sweep_path = write_sweep(tmp_path, corpus, "full")
    assert main(["run", str(sweep_path), "--runs-dir", str(small_disk)]) == 1
    capsys.readouterr()
    assert main(["status", str(sweep_path), "--json", "--runs-dir", str(small_disk)]) == 0
    [row] = json.loads(capsys.readouterr().out)["runs"]
    assert row["state"] == "failed"
    assert row["error"].startswith("UnwritableError: cannot write") and "the disk is full" in row["error"]
    assert "latest.pt" in row["error"], "the checkpoint is what no longer fits"


def exit_code_and_stderr_as(uid: int | None, argv: list[str]) -> tuple[int, str]:
    """Run `isoflop ARGV` in a forked child, as user `uid` (None: as we are), with its stderr."""
    import traceback

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so it needs no access to the interpreter's files
        code = 99
        os.close(read_end)
        sys.stderr = os.fdopen(write_end, "w")  # pytest has replaced sys.stderr in this process
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            code = main(argv)
        except Exception:  # noqa: BLE001 - a forked child must report whatever happened, then exit
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as stderr:
        err = stderr.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_an_unwritable_runs_folder_gives_a_clear_error(corpus):
    # A real permission error from the kernel: root may write anywhere, so as root the command
    # runs in a child process that has become the user nobody.
    uid = None
    if os.geteuid() == 0:
        import pwd

        try:
            uid = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            pytest.skip("running as root and there is no user 'nobody' to lack permissions")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        os.chmod(folder, 0o755)
        sweep_path = write_sweep(folder, corpus, "locked-out")
        runs = folder / "runs"
        runs.mkdir(mode=0o555)
        code, err = exit_code_and_stderr_as(uid, ["run", str(sweep_path), "--runs-dir", str(runs)])
    assert code == 74, err
    assert err.startswith(f"error: cannot write {runs}/locked-out: permission denied"), err
    assert "--runs-dir or $ISOFLOP_RUNS" in err and "Traceback" not in err


def test_a_read_only_disk_gives_a_clear_error(tmp_path, corpus, monkeypatch, capsys):
    # Injected: EROFS from creating the temporary file (a remounted-read-only disk).
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    sweep_path = write_sweep(tmp_path, corpus, "read-only")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["run", str(sweep_path), "--runs-dir", str(tmp_path / "runs")]) == 74
    err = capsys.readouterr().err
    assert "manifest.json: the file system is read-only" in err and "Traceback" not in err
