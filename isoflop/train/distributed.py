"""Runs larger than one process: data-parallel (DDP) or sharded (FSDP2) training of one run.

A process started by a distributed launcher (torchrun, the local executor's rank groups, a
multi-task SLURM job through executors/slurm.py) finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT in its environment and joins one process group (`session`); any other process is a
world of one, and nothing here touches it.

The math is that of one process. Every rank draws the same global batch (batch i is a pure function
of (seed, i)) and trains on its contiguous block of batch_size / world_size rows; gradients are
averaged over ranks (DDP's all-reduce, FSDP's reduce-scatter), so each step follows the gradient of
the global batch's mean loss. That holds exactly when every rank has as many targets; task runs,
whose ignored targets (-100) may fall unevenly, weight each rank's loss by its share of the
targets. Global batch, learning rate and schedule are the spec's whatever the world size, which is
why the world size must divide train.batch_size.

DDP keeps a full replica on every rank; FSDP2 (fully_shard on every block and at the root) shards
parameters, gradients and optimiser state, for models too big for one GPU. `auto` takes FSDP when
the weights, gradients and AdamW moments would fill more than half the GPU. Neither is part of the
run's identity: they change how a result is computed, not what it is.

Only rank 0 writes files. Whatever decides the course of the run (losses, evals, stop requests, a
finished or claimed run directory) is agreed through a collective, so no rank is left waiting in a
collective the others skipped.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from isoflop.orchestrator.spec import PARALLEL_MODES
from isoflop.orchestrator.worker import PARALLEL_ENV

T = TypeVar("T")

# fp32 weights, gradients and AdamW's two moments: what one parameter costs a replica.
TRAIN_BYTES_PER_PARAM = 16
# `auto` shards when a replica's state would take more than this share of the GPU's memory (the
# rest is for activations).
REPLICA_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes. `joined`: in a process group; a world of
    one that was not launched as such is a plain process and every helper here is a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.joined:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's value, on every rank (any picklable value)."""
        if not self.joined:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone, its value given to every rank. If it raises, rank 0 raises
        that error and every other rank a RuntimeError quoting it (instead of waiting forever)."""
        return self._after_main(fn, share=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on every rank, rank 0 first: e.g. loading a corpus, which fills a cache the other
        ranks then read instead of all tokenizing it at once."""
        value = self._after_main(fn, share=False)
        return value if self.is_main else fn()

    def _after_main(self, fn: Callable[[], T], share: bool) -> T:
        if not self.joined:
            return fn()
        if self.is_main:
            try:
                value = fn()
            except Exception as error:
                self.broadcast((False, f"{type(error).__name__}: {error}"))
                raise
            self.broadcast((True, value if share else None))
            return value
        ok, value = self.broadcast((False, ""))
        if not ok:
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place)."""
        if self.joined:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any rank's flag is set."""
        if not self.joined:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The world the launcher describes (torchrun's variables); one process if none."""
    if "WORLD_SIZE" not in env:
        return World()
    return World(rank=int(env.get("RANK", "0")), size=int(env["WORLD_SIZE"]),
                 local_rank=int(env.get("LOCAL_RANK", "0")))


def launched(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started as one rank of a distributed run (even a world of one)."""
    return "WORLD_SIZE" in env


@contextlib.contextmanager
def session(device_type: str) -> Iterator[World]:
    """Join the process group the environment describes for the block (NCCL on CUDA, each rank on
    GPU LOCAL_RANK of those it sees; gloo on CPU), or yield a world of one for a plain process.
    A group joined already (by the worker, to agree on the run's lease) is used and left open."""
    world = world_from_env()
    if not launched():
        yield world
        return
    if dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), world.local_rank, joined=True)
        return
    if device_type == "cuda":
        # LOCAL_RANK among the GPUs this process sees: all of the node's, or (SLURM's GPU binding,
        # CUDA_VISIBLE_DEVICES per task) only its own.
        gpu = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")
    try:
        yield World(world.rank, world.size, world.local_rank, joined=True)
        # Free what still holds the group's pending work (DDP's reducer inside a trainer kept by a
        # reference cycle) now, while the group and the interpreter are alive: left to interpreter
        # shutdown, gloo's threads abort the process ("terminate called without an active
        # exception"). Then leave together, so no rank tears down while another still talks to it.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """This rank's device: its own GPU (the one `session` made current) when on CUDA."""
    if world.joined and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_batch_split(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ValueError(
            f"train.batch_size={batch_size} does not split evenly over {world.size} processes (the "
            f"global batch is the spec's whatever the world size); allowed: a world size that "
            f"divides {batch_size}, or a batch_size that is a multiple of {world.size}"
        )


def rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous block of the global batch's rows."""
    if world.size == 1:
        return batch
    share = batch.shape[0] // world.size
    return batch[world.rank * share:(world.rank + 1) * share]


def parallel_mode(requested: str | None, n_params: int, device: torch.device) -> str:
    """'ddp' or 'fsdp': `requested`, else $ISOFLOP_PARALLEL, else 'auto' (FSDP when a replica
    would not fit, see REPLICA_MEMORY_SHARE)."""
    mode = requested or os.environ.get(PARALLEL_ENV) or "auto"
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r} (--parallel, executor.parallel or ${PARALLEL_ENV}); "
                         f"allowed: {', '.join(PARALLEL_MODES)}")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "ddp"
    memory = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if TRAIN_BYTES_PER_PARAM * n_params > REPLICA_MEMORY_SHARE * memory else "ddp"


def wrap(
    model: nn.Module, groups: list[dict[str, Any]], mode: str, world: World, device: torch.device
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(the module to run forward and backward through, the optimiser's parameter groups).

    `groups` must be built from the unwrapped model, whose parameters still carry their marks
    (`_no_weight_decay`); fully_shard replaces every parameter by a sharded one, so the groups are
    rebuilt by name, in the same order (checkpoints number optimiser states in that order). The
    optimiser must be built after this. `model` stays the module whose state and `last_losses` one
    reads: DDP wraps it, FSDP shards it in place.
    """
    if mode == "ddp":
        # No buffer broadcast, so DDP's forward is no collective: evaluation, which ranks run on
        # unequal shares, needs none. (The model's only buffers, the RoPE tables, are computed
        # alike on every rank.)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False), groups
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    name_of = {param: name for name, param in model.named_parameters()}
    names = [[name_of[param] for param in group["params"]] for group in groups]
    mesh = init_device_mesh(device.type, (world.size,))
    for block in model.blocks:  # one all-gather per block: only a block's weights are ever whole
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    return model, [{**group, "params": [params[name] for name in group_names]}
                   for group, group_names in zip(groups, names)]
