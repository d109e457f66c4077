"""The benchmarks' target lines: which of issues 4's and 9's targets a run's own figures meet."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return lambda name: importlib.import_module(name)


def kernel_row(case: str, fwd_us: float, fwd_floor_us: float, fb_us: float) -> dict:
    return {"case": case, "fwd_us": fwd_us, "fwd_floor_us": fwd_floor_us, "fb_us": fb_us}


def test_kernel_targets_take_the_paper_rows_and_judge_each(benchmarks):
    kernels = benchmarks("kernels")
    rows = [kernel_row("lowrank R=16 (paper)", 41.6, 31.6, 151.7),
            kernel_row("headwise hs=16 (paper)", 41.4, 35.7, 107.7),
            kernel_row("static W=4 (paper)", 36.6, 31.5, 91.6),
            kernel_row("lowrank R=64", 80.0, 32.0, 300.0)]  # not the paper's shape: no target
    checks = {c.what: c for c in kernels.target_checks(rows)}
    assert set(checks) == {
        "lowrank R=16 (paper) forward + backward", "headwise hs=16 (paper) forward + backward",
        "lowrank R=16 (paper) forward against its memory floor",
        "headwise hs=16 (paper) forward against its memory floor",
        "static W=4 (paper) forward against its memory floor"}
    assert not checks["lowrank R=16 (paper) forward + backward"].met
    assert checks["headwise hs=16 (paper) forward + backward"].met
    assert not checks["lowrank R=16 (paper) forward against its memory floor"].met  # 1.32x
    assert checks["headwise hs=16 (paper) forward against its memory floor"].value == pytest.approx(41.4 / 35.7)
    assert checks["static W=4 (paper) forward against its memory floor"].met


def test_training_targets_hold_for_the_300M_rows_only(benchmarks):
    throughput = benchmarks("train_throughput")

    def result(config, variant, mfu=0.7, slowdown=None, error=None):
        return throughput.Result(config=config, variant=variant, params=1, seq_len=1, batch_size=1,
                                 train_flops_per_token=1, mfu=mfu, slowdown=slowdown, error=error)

    results = [result("300M", "transformer", mfu=0.73), result("300M", "static-qkv", slowdown=0.025),
               result("300M", "dynamic-qkv", slowdown=0.052),
               result("300M", "dynamic-all-linear", error="out of memory"),
               result("small", "dynamic-qkv", slowdown=0.01)]
    checks = throughput.target_checks(results)
    assert [(c.what, c.met) for c in checks] == [
        ("transformer MFU", True), ("static-qkv slowdown", True), ("dynamic-qkv slowdown", False)]
    assert checks[0].at_least and checks[2].value == pytest.approx(5.2) and checks[2].limit == 4


def test_target_lines_say_where_the_targets_hold(benchmarks, capsys):
    targets = benchmarks("targets")
    checks = [targets.Check("a forward", 41.6, 100, "us"), targets.Check("an MFU", 30.0, 40, "%", at_least=True)]
    targets.print_checks(checks, "NVIDIA H200")
    out = capsys.readouterr().out
    assert "targets: 1 of 2 met\n" in out
    assert "met    a forward: 41.6 us (target <= 100)" in out
    assert "MISSED an MFU: 30.0 % (target >= 40)" in out
    assert targets.Check("a ratio", 1.304, 1.3, "x", digits=2).line() == "  MISSED a ratio: 1.30 x (target <= 1.3)"
    targets.print_checks(checks, "NVIDIA A100-SXM4-80GB")
    assert "set for an H200, so on NVIDIA A100-SXM4-80GB for comparison only" in capsys.readouterr().out
    targets.print_checks([], "cpu")
    assert capsys.readouterr().out == ""
