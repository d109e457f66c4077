"""Learning-rate schedules, as a pure function of the step.

Both schedules start with a linear warm-up over the first `warmup_fraction` of the steps:
- cosine: then a half cosine from the base LR down to `min_lr_ratio * base_lr`;
- wsd (warm-up, stable, decay): then the base LR until the last `decay_fraction` of the steps,
  then a straight line down to `min_lr_ratio * base_lr`.

`step` is the 0-based index of the optimiser step about to be taken. Warm-up reaches the base LR on
its last step (the first step uses base_lr / warmup_steps, never 0). The decay is laid out so that
it would reach the floor at step == total_steps, one past the last step: no step is spent at an LR
of exactly zero.
"""

from __future__ import annotations

import math

from isoflop.runspec import ScheduleConfig

SCHEDULE_KINDS: tuple[str, ...] = ("cosine", "wsd")


def validate_schedule(schedule: ScheduleConfig) -> None:
    """Raise ValueError naming the schedule key, its value and what is allowed."""
    if schedule.kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule.kind={schedule.kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
    for name in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
        value = getattr(schedule, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"schedule.{name}={value!r}; allowed: a number in [0, 1]")
    if schedule.kind == "wsd" and schedule.warmup_fraction + schedule.decay_fraction > 1.0:
        raise ValueError(
            f"schedule.warmup_fraction={schedule.warmup_fraction!r} + "
            f"schedule.decay_fraction={schedule.decay_fraction!r} > 1; allowed: a sum of at most 1"
        )


def lr_at(step: int, total_steps: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """The learning rate for optimiser step `step` (0-based) of a `total_steps`-step run."""
    validate_schedule(schedule)
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; allowed: >= 1")
    if step < 0:
        raise ValueError(f"step={step}; allowed: >= 0")
    min_lr = schedule.min_lr_ratio * base_lr
    warmup_steps = round(schedule.warmup_fraction * total_steps)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule.kind == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = round(schedule.decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1, decay_steps))
    return base_lr + (min_lr - base_lr) * progress
