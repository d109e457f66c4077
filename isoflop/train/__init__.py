"""Training: one RunSpec in, one result out (`run`), plus schedules, checkpoints, provenance and
the YAML front end of `isoflop train`.

`run` is imported on first use so that importing `isoflop.train.config_file` or
`isoflop.train.schedules` does not pay for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from isoflop.train.trainer import run

        return run
    raise AttributeError(f"module 'isoflop.train' has no attribute {name!r}")
