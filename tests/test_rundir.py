"""Run directories: atomic writes, append-only metrics, status bookkeeping, write-once results."""

import json
import os
import subprocess
import sys

import pytest

from isoflop.orchestrator.rundir import (
    STATES,
    ResultExistsError,
    RunDir,
    append_jsonl,
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2, "y": [1, 2]})
    assert read_json(path) == {"x": 2, "y": [1, 2]}
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"


def test_atomic_output_publishes_only_on_success(tmp_path):
    path = tmp_path / "ckpt.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(path) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("killed mid-save")
    assert os.listdir(tmp_path) == []
    with atomic_output(path) as f:
        f.write(b"whole")
    assert path.read_bytes() == b"whole" and os.stat(path).st_mode & 0o777 == 0o644


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    """A process killed (SIGKILL) while rewriting a big file leaves the old or the new version."""
    path = tmp_path / "big.json"
    atomic_write_json(path, {"version": 0})
    script = (
        "import sys\n"
        "from isoflop.orchestrator.rundir import atomic_write_json\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_write_json(sys.argv[1], {'version': i, 'pad': 'x' * 2_000_000})\n"
        "    if i == 3: print('go', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"go"
    proc.kill()
    proc.wait()
    assert read_json(path)["version"] >= 3


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "a.json", {"loss": float("nan")})
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "m.jsonl", {"loss": float("inf")})


def test_jsonl_append_and_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in (1, 2, 3):
        append_jsonl(path, {"step": step})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-append
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_jsonl(path)


def test_truncate_metrics_keeps_steps_up_to(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    for step in (10, 20, 30):
        rd.append_metrics({"step": step, "val_loss": 1.0 / step})
    rd.truncate_metrics(20)
    assert [r["step"] for r in rd.read_metrics()] == [10, 20]
    rd.truncate_metrics(0)
    assert rd.read_metrics() == []


def test_status_lifecycle(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    assert rd.read_status() is None and rd.state is None
    rd.write_status("pending")
    first = rd.write_status("running")
    assert first["attempts"] == 1 and first["pid"] == os.getpid() and first["error"] is None
    progress = rd.write_status("running", step=5)
    assert progress["attempts"] == 1 and progress["step"] == 5, "progress is not a new attempt"
    failed = rd.write_status("failed", error="RuntimeError: boom")
    assert failed["error"] == "RuntimeError: boom" and failed["finished_at"] is not None
    assert failed["created_at"] == first["created_at"] and failed["step"] == 5
    second = rd.write_status("running")
    assert second["attempts"] == 2 and second["error"] is None and second["finished_at"] is None
    done = rd.write_status("done")
    assert rd.state == "done" and done["attempts"] == 2
    assert set(STATES) == {"pending", "running", "done", "failed", "diverged", "preempted"}


def test_status_counts_a_crashed_process_as_an_attempt(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    rd.write_status("running")
    status = read_json(rd.status_path)
    status["pid"] = -1  # another process that died while running
    rd.status_path.write_text(json.dumps(status))
    assert rd.write_status("running")["attempts"] == 2


def test_unknown_state_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="state='finished'; allowed: pending, running"):
        RunDir(tmp_path).write_status("finished")


def test_result_is_written_once(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    assert not rd.has_result()
    rd.write_result({"final_val_loss": 1.5})
    with pytest.raises(ResultExistsError, match="never overwritten"):
        rd.write_result({"final_val_loss": 0.1})
    assert rd.read_result() == {"final_val_loss": 1.5}
    assert sorted(os.listdir(rd.path)) == ["checkpoints", "result.json"]


def test_spec_round_trip(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    assert rd.read_spec() is None
    rd.write_spec({"arch": "transformer"})
    assert rd.read_spec() == {"arch": "transformer"}
