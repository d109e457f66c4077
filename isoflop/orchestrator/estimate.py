"""How long a run will take: a small throughput model with per-device constants.

    step seconds = step_overhead + tokens_per_step * (flops_per_token / rate
                                                     + conv_elements_per_token * conv_element_seconds)
    run seconds  = startup + trained steps * step seconds + evals

- `rate`: sustained training FLOP/s of the matrix work (matmuls, counted as in models.counting);
- `step_overhead`: the time of a step that does not grow with the model: kernel launches or op
  dispatch, the optimiser, the data batch. It dominates for tiny models, which on any device run
  far below `rate`;
- `conv_element_seconds`: short convolutions are memory-bound elementwise work whose FLOPs say
  little about their time; conv_elements_per_token = sum over conv modules of channels x width;
- evals: about EVALS_PER_RUN per run (the trainer's default when eval_every_tokens is 0), each a
  forward pass over eval_tokens, costed as a third of training on as many tokens;
- startup: the worker's start (forked from the fork server), corpus load, model build;
- cooldown branches (grid `cooldowns: true`): the trained steps are those of run.spent_flops, the
  trunk's plus each branch's decay, and each branch adds one eval.

A sweep's time is the sum over runs divided by how many runs the device sustains at once without
slowing each other (`concurrency`, capped by the workers).

Profiles:
- cpu: the project's development machine (2 cores), per worker of one thread, two at a time;
  fitted on the quickstart's 27 runs (step overhead 3.8 ms, convs 8 ns per element-token) and on
  single runs of 0.4M-parameter models (about 8e10 FLOP/s on one thread).
- h200: one H200 (bf16 autocast, eager PyTorch, the reference conv ops), per run while four runs
  share the GPU (paper-small's setting); fitted on 8 runs of paper-small's smallest budget
  (transformer and dynamic-all-linear, 0.5M-4M parameters, 32K tokens per step): 11 ms per step,
  4e13 FLOP/s per run, 35 ps per conv element-token, 5 s to start (CUDA, model, eval batches).
  With fewer workers each run is faster than this, so the estimate errs long; the last runs of a
  sweep do not fill the GPU, so with four workers it errs short by up to one run's time.
"""

from __future__ import annotations

from dataclasses import dataclass

from isoflop.models.config import ModelConfig
from isoflop.models.counting import conv_streams
from isoflop.orchestrator.grid import PlannedRun

EVALS_PER_RUN = 11  # the trainer's default: about 10 evals over the run, and one at the end


def conv_elements_per_token(cfg: ModelConfig) -> int:
    """Channels x taps summed over every short conv of the model (0 without convs)."""
    streams = conv_streams(cfg).values()
    return cfg.n_layers * sum(channels * cfg.conv.width for _, channels in streams)


def trained_steps(run: PlannedRun) -> float:
    """Optimiser steps the run takes: its own, plus the decay steps of its cooldown branches."""
    decay_flops = run.spent_flops - run.flops
    return run.steps + decay_flops / (run.flops_per_token * run.spec.train.tokens_per_step)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    rate: float  # FLOP/s of the matrix work
    step_overhead: float  # seconds per optimiser step, whatever the model
    conv_element_seconds: float  # seconds per (conv channel x tap) per token
    startup: float  # seconds per run before its first step
    concurrency: int  # runs the device sustains at once at full per-run speed

    def run_seconds(self, run: PlannedRun) -> float:
        train = run.spec.train
        token_seconds = (run.flops_per_token / self.rate
                         + conv_elements_per_token(run.spec.model) * self.conv_element_seconds)
        step_seconds = self.step_overhead + train.tokens_per_step * token_seconds
        n_evals = run.tokens // train.eval_every_tokens + 1 if train.eval_every_tokens else EVALS_PER_RUN
        n_evals += len(run.branches)  # each branch endpoint is evaluated once
        eval_seconds = n_evals * train.eval_tokens / train.tokens_per_step * step_seconds / 3
        return self.startup + trained_steps(run) * step_seconds + eval_seconds

    def sweep_seconds(self, run_seconds: list[float], workers: int) -> float:
        return sum(run_seconds) / max(1, min(workers, self.concurrency))


PROFILES: dict[str, DeviceProfile] = {
    "cpu": DeviceProfile("cpu", rate=8e10, step_overhead=3.8e-3, conv_element_seconds=8e-9,
                         startup=1.5, concurrency=2),
    "h200": DeviceProfile("h200", rate=4e13, step_overhead=1.1e-2, conv_element_seconds=3.5e-11,
                          startup=5.0, concurrency=4),
}


def profile_for(device: str) -> DeviceProfile:
    """The profile for a train.device value (cpu, cuda, auto) or a profile name."""
    name = {"cuda": "h200", "auto": "cpu"}.get(device, device)
    if name not in PROFILES:
        raise ValueError(f"device profile {device!r}; allowed: {', '.join(PROFILES)}, cuda, auto")
    return PROFILES[name]
