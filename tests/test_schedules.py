"""Learning-rate schedules: warm-up, cosine and WSD shapes and their edges."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isoflop.runspec import ScheduleConfig
from isoflop.train.schedules import lr_at, validate_schedule

BASE = 1e-3


def curve(total, schedule):
    return [lr_at(s, total, BASE, schedule) for s in range(total)]


def test_cosine_warmup_then_half_cosine_to_floor():
    schedule = ScheduleConfig(kind="cosine", warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = curve(100, schedule)
    assert lrs[:10] == pytest.approx([BASE * (i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(BASE)
    # Halfway through the decay the cosine sits midway between base and floor.
    assert lrs[55] == pytest.approx(0.1 * BASE + 0.9 * BASE * 0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] > 0.1 * BASE and lrs[-1] == pytest.approx(0.1 * BASE, rel=0.01)
    assert lr_at(100, 100, BASE, schedule) == pytest.approx(0.1 * BASE)


def test_cosine_to_zero_never_takes_a_step_at_zero():
    schedule = ScheduleConfig(kind="cosine", warmup_fraction=0.0, min_lr_ratio=0.0)
    lrs = curve(10, schedule)
    assert lrs[0] == BASE and min(lrs) > 0
    assert lrs[-1] == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_wsd_warmup_stable_linear_decay():
    schedule = ScheduleConfig(kind="wsd", warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = curve(100, schedule)
    assert lrs[9] == pytest.approx(BASE)
    assert lrs[10:80] == [BASE] * 70
    assert lrs[80:] == pytest.approx([BASE * (1 - i / 20) for i in range(20)])
    assert lr_at(100, 100, BASE, schedule) == 0.0


def test_wsd_without_decay_stays_at_base():
    schedule = ScheduleConfig(kind="wsd", warmup_fraction=0.0, decay_fraction=0.0)
    assert curve(5, schedule) == [BASE] * 5


def test_single_step_run():
    assert lr_at(0, 1, BASE, ScheduleConfig(warmup_fraction=0.1)) == BASE
    assert lr_at(0, 1, BASE, ScheduleConfig(warmup_fraction=1.0)) == BASE


@given(
    kind=st.sampled_from(["cosine", "wsd"]),
    total=st.integers(1, 500),
    warmup=st.floats(0, 0.5),
    decay=st.floats(0, 0.5),
    floor=st.floats(0, 1),
)
def test_lr_stays_between_floor_and_base(kind, total, warmup, decay, floor):
    schedule = ScheduleConfig(
        kind=kind, warmup_fraction=warmup, decay_fraction=decay, min_lr_ratio=floor
    )
    warmup_steps = round(warmup * total)
    for step, lr in enumerate(curve(total, schedule)):
        assert 0 < lr <= BASE * (1 + 1e-12)
        if step >= warmup_steps:
            assert lr >= floor * BASE * (1 - 1e-12)


@pytest.mark.parametrize(
    "schedule, message",
    [
        (ScheduleConfig(kind="linear"), "schedule.kind='linear'; allowed: cosine, wsd"),
        (ScheduleConfig(warmup_fraction=1.5),
         r"schedule.warmup_fraction=1.5; allowed: a number in \[0, 1\]"),
        (ScheduleConfig(min_lr_ratio=-0.1), r"schedule.min_lr_ratio=-0.1; allowed"),
        (ScheduleConfig(kind="wsd", warmup_fraction=0.6, decay_fraction=0.6), "sum of at most 1"),
    ],
)
def test_bad_schedules_are_named(schedule, message):
    with pytest.raises(ValueError, match=message):
        validate_schedule(schedule)
    with pytest.raises(ValueError, match=message):
        lr_at(0, 10, BASE, schedule)


def test_bad_steps():
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_at(0, 0, BASE, ScheduleConfig())
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, 10, BASE, ScheduleConfig())
