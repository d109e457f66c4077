"""The trainer: one RunSpec in, one result out.

`run(spec, rundir)` trains the spec's model on its corpus for its token budget and records
everything in the run directory (see isoflop.orchestrator.rundir). It is safe to call again on the
same directory: a finished run returns its result without training, an interrupted one resumes from
its checkpoint and ends exactly where an uninterrupted run would have.

One optimiser step sees batch_size x seq_len tokens. Evals on the held-out split happen every
`eval_every_tokens` (about 10 times when 0) and always after the last step; each appends one line
to metrics.jsonl. A NaN or infinite loss stops the run as 'diverged' (no result.json).

Cooldown branches (WSD schedule, `train.cooldown_tokens`): one run gives a finished model at several
token counts. For each count D_i the trunk, still in its stable phase, is checkpointed where a run of
D_i tokens would start its decay (checkpoints/branch-<D_i>.pt, kept), a branch is trained from there
to D_i with the linear decay of that shorter run, evaluated, and recorded in result.json under
`branches`; then the trunk is restored from the checkpoint and goes on. Every branch endpoint is a
point of its own for the analysis, at the cost of its decay steps only. With no warm-up its
endpoint equals that of a separate WSD run of D_i tokens exactly (the same seed, data order, and
learning rate at every step); with a warm-up it differs only in the warm-up's length (a fraction of
the trunk's tokens, not of D_i). A crash inside a branch resumes from the branch point.

Task runs (`data.task`, a synthetic recall task of isoflop/data/synthetic.py): training batches are
generated afresh, batch i a pure function of (seed, i), so resuming stays exact; evals use the task's
fixed test set, and add `accuracy` (exact match per answer token) to each metrics line and
`final_accuracy` to result.json.

Runs of several processes (started by torchrun or the executors; see train/distributed.py) train
the same global batch split over the ranks, with DDP or FSDP, and give the losses of one process.
Rank 0 alone writes the run directory; the result says `world_size` and `parallel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from isoflop.data.corpora import load_corpus
from isoflop.data.loader import BatchSampler, eval_windows
from isoflop.data.synthetic import (
    TaskSampler,
    answer_hits,
    fixed_test_set,
    task_fingerprint,
)
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.lm import build_model
from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import RunSpec, TrainConfig
from isoflop.train import distributed
from isoflop.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_checkpoint_distributed,
    save_checkpoint,
    save_checkpoint_distributed,
)
from isoflop.train.distributed import World
from isoflop.train.provenance import provenance
from isoflop.train.schedules import lr_at

# Per-step losses stay on the device and are read back in groups: a .item() every step would make
# the CPU wait for the GPU each step, which costs small models much of their throughput. On CPU
# reading back is free, so divergence is caught at the step it happens.
LOSS_READBACK_EVERY = {"cpu": 1, "cuda": 16}
TRACEBACK_TAIL_CHARS = 4000


class Diverged(Exception):
    """A loss became NaN or infinite."""

    def __init__(self, step: int, value: float, where: str) -> None:
        super().__init__(f"{where} loss is {value} at step {step}")
        self.step, self.value, self.where = step, value, where


class Stopped(Exception):
    """Training stopped because `should_stop` said so (a preemption or time-limit signal), right
    after saving a checkpoint at `step`; the next start resumes there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on request at step {step} after saving a checkpoint")
        self.step = step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device='cuda' but CUDA is not available here; allowed here: auto, cpu"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device={name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def every_steps(every_tokens: int, tokens_per_step: int, total_steps: int) -> int:
    """An interval in tokens as a whole number of steps (0 tokens: about 10 times per run)."""
    if every_tokens <= 0:
        return max(1, round(total_steps / 10))
    return max(1, round(every_tokens / tokens_per_step))


@dataclass
class Progress:
    """The trainer's running numbers; checkpointed so a resumed run continues them exactly."""

    step: int = 0
    interval_loss_sum: float = 0.0  # train losses since the last eval (float64 on the host)
    interval_steps: int = 0
    interval_train_s: float = 0.0
    train_s: float = 0.0  # time spent in training steps, all attempts
    elapsed_s: float = 0.0  # wall time including evals and checkpoints, all attempts
    lr: float = 0.0
    branches: list[dict[str, Any]] = field(default_factory=list)  # finished cooldown branches

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Progress":
        return cls(**state)


@dataclass
class LossReadback:
    """Per-step losses waiting on the device, read back in groups (see LOSS_READBACK_EVERY).
    `reduce` turns the stacked losses into what is logged: with several ranks, each adds its
    weighted share and the sum over ranks is the global batch's loss."""

    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda losses: losses

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach()))

    def drain(self) -> list[float]:
        """The pending losses as floats, in step order; raises Diverged at the first non-finite."""
        if not self.pending:
            return []
        values = self.reduce(torch.stack([loss for _, loss in self.pending]).float()).cpu().tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise Diverged(step, value, "train")
        return values


@dataclass(frozen=True)
class Branch:
    """A cooldown branch: it leaves the trunk at step `start` and ends at step `end` (= tokens /
    tokens per step), decaying the LR as a WSD run of `end` steps would."""

    tokens: int
    start: int
    end: int


def plan_branches(spec: RunSpec) -> list[Branch]:
    """The spec's cooldown branches by start step; ValueError naming train.cooldown_tokens for a
    count the schedule cannot branch at."""
    train, schedule = spec.train, spec.schedule
    if not train.cooldown_tokens:
        return []
    if schedule.kind != "wsd":
        raise ValueError(f"train.cooldown_tokens={list(train.cooldown_tokens)} needs schedule.kind="
                         f"'wsd' (a stable phase to branch from); got {schedule.kind!r}")
    warmup_steps = round(schedule.warmup_fraction * train.total_steps)
    branches = []
    for tokens in sorted(set(train.cooldown_tokens)):
        end = tokens // train.tokens_per_step
        start = end - round(schedule.decay_fraction * end)
        if not 1 <= end < train.total_steps:
            raise ValueError(
                f"train.cooldown_tokens has {tokens} = {end} steps of {train.tokens_per_step} tokens; "
                f"allowed: 1 to {train.total_steps - 1} steps (fewer than the run's own)"
            )
        if start == end:
            raise ValueError(
                f"train.cooldown_tokens has {tokens}: schedule.decay_fraction="
                f"{schedule.decay_fraction!r} leaves its branch no decay step; allowed: a decay "
                "fraction that gives every branch at least one step"
            )
        if start < warmup_steps:
            raise ValueError(
                f"train.cooldown_tokens has {tokens}: its cooldown would start at step {start}, inside "
                f"the warm-up ({warmup_steps} steps); allowed: counts whose decay starts after it"
            )
        branches.append(Branch(tokens=end * train.tokens_per_step, start=start, end=end))
    return sorted(branches, key=lambda b: (b.start, b.end))


class Trainer:
    """Holds one run's model, data and bookkeeping; `fit()` runs it to the end."""

    def __init__(
        self,
        spec: RunSpec,
        rundir: RunDir,
        echo: bool,
        on_step: Callable[[int], None] | None,
        should_stop: Callable[[], bool] = lambda: False,
        world: World = World(),
        parallel: str | None = None,
    ) -> None:
        self.spec, self.rundir, self.echo, self.on_step = spec, rundir, echo, on_step
        self.should_stop = should_stop
        self.world = world
        train: TrainConfig = spec.train
        distributed.check_batch_split(train.batch_size, world)
        self.device = distributed.rank_device(resolve_device(train.device), world)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32
        # compile: graphs captures each compiled step in CUDA graphs (on CUDA; elsewhere it is
        # plain torch.compile). The collectives of several processes are not captured here.
        self.graphs = train.compile == "graphs" and self.device.type == "cuda"
        if self.graphs and world.joined:
            raise ValueError(f"train.compile=graphs trains in one process; this run has {world.size} "
                             "(allowed with several: true or false)")
        self.total_steps = train.total_steps
        self.eval_every = every_steps(
            train.eval_every_tokens, train.tokens_per_step, self.total_steps
        )
        # checkpoint_every_tokens 0: checkpoint right after each eval (its metrics line then
        # survives a crash); otherwise on its own grid of steps.
        self.checkpoint_every = (
            None
            if train.checkpoint_every_tokens <= 0
            else every_steps(train.checkpoint_every_tokens, train.tokens_per_step, self.total_steps)
        )
        self.flops = flops_per_token(spec.model, train.seq_len)
        self.params = count_params(spec.model)
        self.branches = plan_branches(spec)

        self.task = spec.data.task
        data = self.corpus_data if self.task is None else self.task_data
        self.sampler, eval_batches, vocab_size, self.data_fingerprint = world.main_first(data)
        if vocab_size > spec.model.vocab_size:
            raise ValueError(
                f"the data has {vocab_size} token ids but model.vocab_size="
                f"{spec.model.vocab_size}; allowed: model.vocab_size >= the data's vocabulary"
            )
        self.eval_batches = [(x.to(self.device), y.to(self.device)) for x, y in eval_batches]

        seed_everything(spec.seed)  # just before init: the same spec gives the same weights
        self.model = build_model(spec.model).to(self.device)  # its state is what checkpoints hold
        groups = self.model.param_groups(spec.optim.weight_decay)
        # What forward and backward run through: the model itself, or DDP / FSDP around it.
        self.wrapped: torch.nn.Module = self.model
        self.parallel = None
        if world.joined:
            self.parallel = distributed.parallel_mode(parallel, self.params.total, self.device)
            self.wrapped, groups = distributed.wrap(self.model, groups, self.parallel, world,
                                                    self.device)
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=spec.optim.lr,
            betas=(spec.optim.beta1, spec.optim.beta2),
            eps=spec.optim.eps,
            fused=self.device.type == "cuda",
        )
        if train.compile:
            self.forward = torch.compile(self.wrapped, mode="reduce-overhead" if self.graphs else None)
        else:
            self.forward = self.wrapped
        self.readback = LossReadback(reduce=world.sum)
        self.progress = Progress()
        self.checkpoint_path = rundir.checkpoint_dir / CHECKPOINT_NAME

    # -- data ---------------------------------------------------------------------------------

    def corpus_data(self) -> tuple[BatchSampler, list[tuple[torch.Tensor, torch.Tensor]], int, str]:
        """Sampler, eval batches, vocabulary and fingerprint of the spec's corpus."""
        train = self.spec.train
        corpus = load_corpus(self.spec.data)
        sampler = BatchSampler(corpus.train, train.batch_size, train.seq_len, self.spec.seed,
                               pin_memory=self.device.type == "cuda")
        batches = eval_windows(corpus.val, train.batch_size, train.seq_len, train.eval_tokens)
        return sampler, batches, corpus.vocab_size, corpus.fingerprint

    def task_data(self) -> tuple[TaskSampler, list[tuple[torch.Tensor, torch.Tensor]], int, str]:
        """The same for a synthetic task: fresh training batches, its fixed test set."""
        train, task = self.spec.train, self.task
        assert task is not None
        inputs, targets = (torch.from_numpy(a) for a in fixed_test_set(task, train.seq_len))
        batches = [(inputs[i:i + train.batch_size], targets[i:i + train.batch_size])
                   for i in range(0, len(inputs), train.batch_size)]
        sampler = TaskSampler(task, train.batch_size, train.seq_len, self.spec.seed)
        return sampler, batches, task.vocab_size, task_fingerprint(task, train.seq_len)

    # -- helpers ------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, line: str) -> None:
        if not self.world.is_main:
            return
        self.rundir.append_log(line)
        if self.echo:
            print(line, flush=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark_graph_step(self) -> None:
        """With CUDA graphs, tell them a new step begins: the last replay's outputs have been
        used, so their memory may be reused (without it, a replay may refuse to overwrite them)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def tokens_at(self, step: int) -> int:
        return step * self.spec.train.tokens_per_step

    # -- checkpoints --------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the checkpoint if there is one; drop metrics recorded after it."""
        if self.world.on_main(self.checkpoint_path.exists):
            self.restore(self.checkpoint_path)
            self.log(f"resumed from step {self.progress.step}")
        self.world.on_main(lambda: self.rundir.truncate_metrics(self.progress.step))

    def restore(self, path: Path) -> None:
        """Model, optimiser, sampler, progress and RNG states as the checkpoint at `path` has them."""
        if self.world.joined:
            self.world.barrier()  # rank 0 may still be writing it
            sampler_state, trainer_state = load_checkpoint_distributed(path, self.wrapped,
                                                                       self.optimizer)
        else:
            sampler_state, trainer_state = load_checkpoint(path, self.model, self.optimizer,
                                                           self.device)
        self.sampler.load_state_dict(sampler_state)
        self.progress = Progress.from_state_dict(trainer_state)

    def save(self, path: Path | None = None) -> None:
        """A checkpoint at `path` (default: the one a restart resumes from)."""
        save = save_checkpoint_distributed if self.world.joined else save_checkpoint
        save(path or self.checkpoint_path, self.wrapped if self.world.joined else self.model,
             self.optimizer, self.sampler.state_dict(), self.progress.state_dict())

    # -- the loop -----------------------------------------------------------------------------

    def train_step(self, step: int, lr: float) -> None:
        spec = self.spec
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = (torch.as_tensor(a) for a in self.sampler.next_batch())
        share = self.target_share(y)
        x, y = (distributed.rows(a, self.world).to(self.device, non_blocking=True) for a in (x, y))
        self.mark_graph_step()
        with self.autocast():
            # the loss alone: no logits kept through backward (none at all with fused CE)
            loss = self.forward(x, targets=y, return_logits=False)[1]
        if share != 1 / self.world.size:
            # Ranks average their gradients; a rank holding more of the targets must weigh more.
            loss = loss * (share * self.world.size)
        loss.backward()
        if spec.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Log the language-modelling loss alone: MoE models add router losses to what they train on.
        logged = getattr(self.model, "last_losses", {}).get("cross_entropy", loss)
        if self.graphs:
            logged = logged.detach().clone()  # the next replay reuses the output's memory
        self.readback.add(step + 1, logged * share if self.world.joined else logged)
        self.progress.lr = lr

    def target_share(self, targets: torch.Tensor) -> float:
        """This rank's share of the global batch's targets (1 for one process). Corpus batches
        have no ignored targets, so their rows share them equally."""
        if self.world.size == 1 or self.task is None:
            return 1 / self.world.size
        counted = int((targets != -100).sum())
        return int((distributed.rows(targets, self.world) != -100).sum()) / max(counted, 1)

    def stop_requested(self, step: int, every: int) -> bool:
        """should_stop(), agreed by all ranks (any rank's request stops them all); with several
        ranks asked every `every` steps, whose collective waits for the device like a readback."""
        if not self.world.joined:
            return self.should_stop()
        return step % every == 0 and self.world.any(self.should_stop(), self.device)

    def trunk_lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.spec.optim.lr, self.spec.schedule)

    def branch_lr(self, step: int, branch: Branch) -> float:
        """The decay of a WSD run of branch.end steps (its warm-up is the trunk's, long past)."""
        schedule = dataclasses.replace(self.spec.schedule, warmup_fraction=0.0)
        return lr_at(step, branch.end, self.spec.optim.lr, schedule)

    def collect_losses(self) -> None:
        values = self.readback.drain()
        self.progress.interval_loss_sum += sum(values)
        self.progress.interval_steps += len(values)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """Mean loss over the eval targets, and for task runs the answer accuracy (else None).
        With several ranks each evaluates every world-size-th batch and the sums are added up."""
        self.model.eval()
        total, count, correct, answers = 0.0, 0, 0, 0
        batches, rank, size = self.eval_batches, self.world.rank, self.world.size
        rounds = -(-len(batches) // size)
        for i in range(rank, rounds * size, size):
            if i >= len(batches) and self.parallel != "fsdp":
                break
            # FSDP gathers weights in every forward, a collective: a rank out of batches runs the
            # last one again (and ignores it) so that all take part equally.
            x, y = batches[min(i, len(batches) - 1)]
            self.mark_graph_step()
            with self.autocast():
                logits, loss = self.forward(x, targets=y)
            if i >= len(batches):
                continue
            counted = int((y != -100).sum())  # the loss is a mean over targets not ignored
            total += loss.float().item() * counted
            count += counted
            if self.task is not None:
                hits, n = answer_hits(logits.argmax(-1).cpu().numpy(), y.cpu().numpy())
                correct, answers = correct + hits, answers + n
        self.model.train()
        if self.parallel == "fsdp":
            self.model.reshard()  # a forward without backward leaves the root's weights gathered
        if self.world.joined:
            sums = torch.tensor([total, count, correct, answers], dtype=torch.float64,
                                device=self.device)
            total, count, correct, answers = self.world.sum(sums).tolist()
        return total / count, (correct / answers if self.task is not None else None)

    def record_eval(self) -> None:
        p = self.progress
        val_loss, accuracy = self.evaluate()
        if not math.isfinite(val_loss):
            raise Diverged(p.step, val_loss, "val")
        tokens = self.tokens_at(p.step)
        record = {
            "step": p.step,
            "tokens": tokens,
            "flops": self.flops.train * tokens,
            "train_loss": p.interval_loss_sum / max(1, p.interval_steps),
            "val_loss": val_loss,
            "lr": p.lr,
            "tokens_per_s": self.tokens_at(p.interval_steps) / max(p.interval_train_s, 1e-9),
            "elapsed_s": p.elapsed_s,
        } | ({"accuracy": accuracy} if accuracy is not None else {})
        p.interval_loss_sum, p.interval_steps, p.interval_train_s = 0.0, 0, 0.0
        if self.world.is_main:
            self.rundir.append_metrics(record)
            self.rundir.write_status(
                "running", step=p.step, tokens=tokens, total_steps=self.total_steps
            )
        self.log(
            f"step {p.step}/{self.total_steps} | tokens {tokens:,}"
            f" | train {record['train_loss']:.4f} | val {val_loss:.4f} | lr {p.lr:.2e}"
            f" | {record['tokens_per_s']:,.0f} tok/s | {p.elapsed_s:.1f} s"
        )

    def fit(self) -> dict[str, Any]:
        p = self.progress
        readback_every = LOSS_READBACK_EVERY.get(self.device.type, 1)
        self.model.train()
        # Wall time carries over from earlier attempts; time lost after their last checkpoint
        # is not counted (that work is redone and timed again).
        wall_origin = time.perf_counter() - p.elapsed_s
        step_start = time.perf_counter()
        while p.step < self.total_steps:
            branch = self.branch_due()
            if branch is not None:
                trained_s = time.perf_counter() - step_start
                p.interval_train_s += trained_s
                p.train_s += trained_s
                self.run_branch(branch, wall_origin)
                p = self.progress  # restored from the branch point
                step_start = time.perf_counter()
                continue
            self.train_step(p.step, self.trunk_lr(p.step))
            p.step += 1
            eval_now = p.step % self.eval_every == 0 or p.step == self.total_steps
            if self.checkpoint_every is None:
                checkpoint_now = eval_now
            else:
                checkpoint_now = p.step % self.checkpoint_every == 0
            # the last step finishes
            stop_now = p.step < self.total_steps and self.stop_requested(p.step, readback_every)
            checkpoint_now = checkpoint_now or stop_now
            if eval_now or checkpoint_now or p.step % readback_every == 0:
                self.collect_losses()
            if eval_now or checkpoint_now:
                self.synchronize()
                trained_s = time.perf_counter() - step_start
                p.interval_train_s += trained_s
                p.train_s += trained_s
                if eval_now:
                    p.elapsed_s = time.perf_counter() - wall_origin
                    self.record_eval()
                if checkpoint_now:
                    p.elapsed_s = time.perf_counter() - wall_origin
                    self.save()
                step_start = time.perf_counter()
            if stop_now:
                raise Stopped(p.step)
            if self.on_step is not None:
                self.on_step(p.step)
        p.elapsed_s = time.perf_counter() - wall_origin
        return self.world.on_main(self.result)  # from the metrics file, which rank 0 writes

    # -- cooldown branches ----------------------------------------------------------------------

    def branch_due(self) -> Branch | None:
        """The branch that leaves the trunk at the current step and has no record yet."""
        done = {record["tokens"] for record in self.progress.branches}
        return next((b for b in self.branches if b.start == self.progress.step
                     and b.tokens not in done), None)

    def run_branch(self, branch: Branch, wall_origin: float) -> None:
        """Checkpoint the trunk, train and evaluate the branch, record it, restore the trunk."""
        self.collect_losses()
        self.synchronize()
        self.progress.elapsed_s = time.perf_counter() - wall_origin
        self.save()  # the resume point if the branch is interrupted
        self.save(self.rundir.checkpoint_dir / f"branch-{branch.tokens}.pt")
        readback_every = LOSS_READBACK_EVERY.get(self.device.type, 1)
        start = time.perf_counter()
        losses: list[float] = []
        for step in range(branch.start, branch.end):
            lr = self.branch_lr(step, branch)
            self.train_step(step, lr)
            if (step + 1 - branch.start) % readback_every == 0:
                losses += self.readback.drain()
        losses += self.readback.drain()
        self.synchronize()
        train_s = time.perf_counter() - start
        val_loss, _ = self.evaluate()
        if not math.isfinite(val_loss):
            raise Diverged(branch.end, val_loss, f"cooldown branch at {branch.tokens} tokens: val")
        steps = branch.end - branch.start
        record = {
            "tokens": branch.tokens,
            "steps": branch.end,
            "flops": self.flops.train * branch.tokens,  # what a separate run to this count spends
            "branch_flops": self.flops.train * self.tokens_at(steps),  # what the branch spent
            "final_val_loss": val_loss,
            "final_train_loss": sum(losses) / max(1, len(losses)),  # mean over the cooldown
            "lr": lr,
            "train_time_s": train_s,
            "tokens_per_s": self.tokens_at(steps) / max(train_s, 1e-9),
        }
        self.restore(self.checkpoint_path)
        self.progress.branches.append(record)
        self.progress.elapsed_s = time.perf_counter() - wall_origin
        self.save()  # the branch is done: a later crash does not redo it
        self.log(f"cooldown branch to {branch.tokens:,} tokens (steps {branch.start}-{branch.end})"
                 f" | train {record['final_train_loss']:.4f} | val {val_loss:.4f}")

    def result(self) -> dict[str, Any]:
        p, flops = self.progress, self.flops
        last = self.rundir.read_metrics()[-1]
        tokens = self.tokens_at(p.step)
        branches = {"branches": sorted(p.branches, key=lambda b: b["tokens"])} if self.branches else {}
        accuracy = {"final_accuracy": last["accuracy"]} if "accuracy" in last else {}
        return {
            "state": "done",
            "run_id": self.spec.run_id,
            "arch": self.spec.arch,
            "size": self.spec.size,
            "final_train_loss": last["train_loss"],
            "final_val_loss": last["val_loss"],
            "steps": p.step,
            "tokens": tokens,
            "params": {"total": self.params.total, "non_embedding": self.params.non_embedding},
            "flops_per_token": {
                "forward": flops.forward,
                "train": flops.train,
                "six_n": flops.six_n,
                "six_n_total": flops.six_n_total,
            },
            "total_flops": flops.train * tokens,
            "wall_time_s": p.elapsed_s,
            "train_time_s": p.train_s,
            "tokens_per_s": tokens / max(p.train_s, 1e-9),
            "provenance": provenance(self.spec.run_id, self.data_fingerprint, self.device),
            **branches,
            **accuracy,
            **({"world_size": self.world.size, "parallel": self.parallel} if self.world.joined else {}),
        }


def _claim_rundir(spec: RunSpec, rundir: RunDir) -> None:
    """Write spec.json, or check that the directory already belongs to this spec."""
    existing = rundir.read_spec()
    if existing is None:
        rundir.write_spec(spec.to_dict())
        return
    existing_id = RunSpec.from_dict(existing).run_id
    if existing_id != spec.run_id:
        raise ValueError(
            f"{rundir.path} holds run {existing_id}, not {spec.run_id}; use a fresh run directory"
        )


def _diverged_result(spec: RunSpec, reason: str, step: int) -> dict[str, Any]:
    return {"state": "diverged", "run_id": spec.run_id, "reason": reason, "step": step}


def _start(spec: RunSpec, rd: RunDir) -> dict[str, Any] | None:
    """Claim the run directory; the result if there is nothing to train, else None."""
    rd.create()
    _claim_rundir(spec, rd)
    finished = rd.read_result()
    if finished is not None:
        return finished
    status = rd.read_status()
    if status is not None and status["state"] == "diverged":
        # Training is deterministic: a rerun would diverge again at the same step.
        return _diverged_result(spec, status["reason"], status["step"])
    rd.write_status("running", run_id=spec.run_id)
    return None


def run(
    spec: RunSpec,
    rundir: Path | str,
    *,
    echo: bool = False,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    parallel: str | None = None,
) -> dict[str, Any]:
    """Train `spec` in `rundir` and return its result (state 'done' or 'diverged').

    echo: also print the progress lines (they always go to the run's log file).
    on_step: called with the number of steps done after each step; an exception it raises
        interrupts the run like a crash would (tests use it to check resuming).
    should_stop: asked after each step; True saves a checkpoint there, records status
        'preempted' and raises Stopped (the worker sets it on SIGTERM/SIGUSR2, i.e. on SLURM
        preemption or an approaching time limit).
    parallel: for a process launched as one rank of several (torchrun): 'ddp', 'fsdp' or 'auto'
        (default: $ISOFLOP_PARALLEL, else auto); see train/distributed.py. Every rank calls run()
        and gets the result; rank 0 alone writes the run directory.
    Raises whatever stopped the run, after recording status 'failed' with the error.
    """
    # (A device that cannot be had fails later, in Trainer, where the run records why.)
    cuda = spec.train.device == "cuda" or (spec.train.device == "auto" and torch.cuda.is_available())
    with distributed.session("cuda" if cuda else "cpu") as world:
        return _run(spec, RunDir(rundir), echo, on_step, should_stop, world, parallel)


def _run(
    spec: RunSpec,
    rd: RunDir,
    echo: bool,
    on_step: Callable[[int], None] | None,
    should_stop: Callable[[], bool],
    world: World,
    parallel: str | None,
) -> dict[str, Any]:
    early = world.on_main(lambda: _start(spec, rd))
    if early is not None:
        return early
    try:
        trainer = Trainer(spec, rd, echo, on_step, should_stop, world, parallel)
        trainer.resume()
        result = trainer.fit()
    except Stopped as stopped:
        if world.is_main:
            rd.write_status("preempted", step=stopped.step, reason=str(stopped))
            rd.append_log(f"preempted: {stopped}")
        raise
    except Diverged as d:  # every rank sees the same (agreed) losses, so all get here
        reason = str(d)
        if world.is_main:
            rd.write_status("diverged", error=reason, reason=reason, step=d.step, value=str(d.value))
            rd.append_log(f"diverged: {reason}")
        return _diverged_result(spec, reason, d.step)
    except BaseException as error:
        if world.is_main:
            tail = traceback.format_exc()[-TRACEBACK_TAIL_CHARS:]
            rd.write_status("failed", error=f"{type(error).__name__}: {error}", traceback=tail)
        else:  # rank 0 may be waiting for this rank in a collective: leave word in the log
            rd.append_log(f"rank {world.rank} failed: {type(error).__name__}: {error}")
        raise
    if world.is_main:
        rd.write_result(result)
        rd.write_status("done", step=result["steps"], tokens=result["tokens"])
    trainer.log(
        f"done: train {result['final_train_loss']:.4f} | val {result['final_val_loss']:.4f}"
        f" | {result['tokens']:,} tokens in {result['wall_time_s']:.1f} s"
    )
    return result
