"""Checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the model and optimiser, the step, every RNG state (torch CPU and CUDA, numpy,
python), the data sampler's position and the trainer's running accumulators (train-loss sum
since the last eval, cumulative times). Restoring all of it makes a resumed run's losses equal an
uninterrupted run's. The file is written to a temp name and renamed, so a crash mid-save leaves
the previous checkpoint intact.

Runs of several processes (train/distributed.py) write the same file, the same layout: their
model and optimiser states are gathered whole onto rank 0 (torch.distributed.checkpoint's
get_state_dict with full_state_dict, for DDP replicas and FSDP shards alike), which alone writes;
on loading, rank 0 reads the file and every rank takes its part (set_*_state_dict with
broadcast_from_rank0). So a checkpoint resumes at any world size, one process included, and in
either mode. The one difference: distributed APIs name optimiser states by parameter name, the
file (as Optimizer.state_dict) by position in the optimiser's groups; the names are converted to
positions and back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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
    _write(path, model.state_dict(), optimizer.state_dict(), sampler_state, trainer_state)


def _write(
    path: Path | str,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    sampler_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": capture_rng_state(),
        "sampler": sampler_state,
        "trainer": trainer_state,
    }
    with atomic_output(path) as f:
        torch.save(payload, f)


def save_checkpoint_distributed(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    """save_checkpoint for a run of several processes: every rank calls it (it gathers the states
    onto rank 0), rank 0 writes the file. `model` is the DDP or FSDP module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # cpu_offload with full_state_dict: only rank 0 receives the whole state, in CPU memory.
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        _write(path, model_state, _by_position(optimizer_state), sampler_state, trainer_state)


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


def load_checkpoint_distributed(
    path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """load_checkpoint for a run of several processes: every rank calls it, rank 0 reads the file
    and each rank receives its replica or shard. `model` is the DDP or FSDP module."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Loading copies into the sharded parameters; after a forward without backward (an
            # eval) the root's are still gathered whole.
            module.reshard()
    payload: dict[str, Any] = {}
    if dist.get_rank() == 0:
        payload = torch.load(path, map_location="cpu", weights_only=False)  # see load_checkpoint
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, payload.pop("model", {}), options=options)
    optimizer_state = payload.pop("optimizer", None)
    named = {} if optimizer_state is None else _by_name(optimizer_state, optimizer, model)
    set_optimizer_state_dict(model, optimizer, named, options=options)
    rest = [payload]
    dist.broadcast_object_list(rest, src=0)  # RNG, sampler and trainer states: small
    restore_rng_state(rest[0]["rng"])
    return rest[0]["sampler"], rest[0]["trainer"]


def _by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser state keyed by parameter name -> keyed by position, as Optimizer.state_dict()
    numbers parameters: in group order, from 0."""
    position: dict[str, int] = {}
    for group in state["param_groups"]:
        for name in group["params"]:
            position.setdefault(name, len(position))
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                         for group in state["param_groups"]],
    }


def _by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, Any]:
    """The reverse of _by_position, naming parameters as torch.distributed.checkpoint does: by
    their names in the unwrapped module, the first name of a tied parameter."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    name_of = {param: name for name, param in inner.named_parameters()}
    names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
    return {
        "state": {names[position]: value for position, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[position] for position in group["params"]]}
                         for group in state["param_groups"]],
    }
