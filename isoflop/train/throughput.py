"""Training throughput of one planned run's model, measured alone.

`measure(spec, folder)` trains a shortened copy of a sweep's RunSpec through `isoflop.train.run`,
the very code path of real runs (same device, compile setting, kernels and data loader), and reads
its tokens/s. Runs of a sweep that shared a GPU measured their throughput under contention with
whatever ran beside them; this number is what the architecture costs on the device by itself, for
the wall-clock multipliers of the report (isoflop/analysis/throughput.py reads the table that
`isoflop throughput` writes from these).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import RunSpec

MIN_STEPS = 4  # two eval intervals of at least two steps: one to warm up, one to time


def measure(spec: RunSpec, folder: Path | str, steps: int = 30) -> dict[str, Any]:
    """Train `spec` for `steps` steps in `folder` (deleted first) and return its throughput:
    {"tokens_per_s", "params" (total), "device" (its name where known, else spec.train.device)}.

    tokens_per_s is that of the last eval interval, the second half of the steps: the first half
    carries device initialisation and compilation."""
    if steps < MIN_STEPS:
        raise ValueError(f"steps={steps}; allowed: >= {MIN_STEPS} (half of them warm up, half are timed)")
    from isoflop.train import run

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a finished measurement would be returned as is, not remeasured
    short = shortened(spec, steps)
    result = run(short, folder)
    if result["state"] != "done":
        raise RuntimeError(f"throughput run of {spec.arch} {spec.size} in {folder} ended "
                           f"{result['state']}: {result.get('reason', '')}; no throughput measured")
    last = RunDir(folder).read_metrics()[-1]
    return {
        "tokens_per_s": float(last["tokens_per_s"]),
        "params": int(result["params"]["total"]),
        "device": _device_name(result, spec),
    }


def shortened(spec: RunSpec, steps: int) -> RunSpec:
    """`spec` cut to `steps` steps: an eval halfway and at the end, one batch per eval, no
    checkpoint and no cooldown branch. Model, batch shape, device and compile stay as planned."""
    per_step = spec.train.tokens_per_step
    total = steps * per_step
    # Evals close the timed intervals. Rounding the half up keeps the last interval the longer
    # one for an odd count (with steps // 2 an odd count would end on a one-step interval).
    half = (steps + 1) // 2
    train = dataclasses.replace(
        spec.train,
        total_tokens=total,
        eval_every_tokens=half * per_step,
        eval_tokens=per_step,
        # The trainer rounds this to steps + 1 steps, a step it never reaches: no checkpoint is
        # written (nothing resumes a measurement; it is rerun from scratch).
        checkpoint_every_tokens=total + per_step,
        cooldown_tokens=(),  # branches planned for the full budget do not fit a few steps
    )
    return dataclasses.replace(spec, train=train)


def _device_name(result: dict[str, Any], spec: RunSpec) -> str:
    provenance = result.get("provenance", {})
    return provenance.get("device_name") or provenance.get("device") or spec.train.device
