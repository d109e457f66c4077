"""Checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the model and optimiser, the step, every RNG state (torch CPU and CUDA, numpy,
python), the data sampler's position and the trainer's running accumulators (train-loss sum
since the last eval, cumulative times). Restoring all of it makes a resumed run's losses equal an
uninterrupted run's. The file is written to a temp name and renamed, so a crash mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isoflop.orchestrator.rundir import atomic_output

CHECKPOINT_NAME = "latest.pt"


def capture_rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    # A checkpoint taken on another machine may have a different number of GPUs (or none).
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    """Atomically write a checkpoint; `model` is the uncompiled module (plain state-dict keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
        "sampler": sampler_state,
        "trainer": trainer_state,
    }
    with atomic_output(path) as f:
        torch.save(payload, f)


def load_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimiser and RNG states in place; return (sampler_state, trainer_state)."""
    # weights_only=False: the file holds numpy and python RNG states (not plain tensors), and it is
    # one this package wrote into its own run directory.
    payload = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    # RNG states must be CPU ByteTensors whatever map_location did.
    rng = dict(payload["rng"])
    rng["torch"] = rng["torch"].cpu()
    rng["cuda"] = [s.cpu() for s in rng["cuda"]]
    restore_rng_state(rng)
    return payload["sampler"], payload["trainer"]
