"""Smoke test and throughput of runs of several processes (DDP and FSDP) on GPUs.

    torchrun --standalone --nproc-per-node 1 benchmarks/distributed_smoke.py --out DIR
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_smoke.py --out DIR

Trains one run per mode (ddp, fsdp) through `isoflop.train.run`, as the executors do: NCCL, bf16
autocast, the global batch split over the ranks, checkpoints gathered to rank 0. Then checks that
DDP and FSDP end at the same loss, and that an FSDP run stopped partway (as on preemption) and
resumed ends where the uninterrupted one did, and prints per mode: tokens/s (of the second half of
the run, past the warm-up), tokens/s per GPU, final losses and rank 0's peak GPU memory. Each launch adds its
figures to DIR/smoke.jsonl; once the file holds more than one world size, it also prints the
scaling (throughput against 1 GPU, efficiency = speed-up / GPUs) of every mode. The global batch
is the same at every world size (strong scaling), so the final losses must agree across launches
too (up to bf16 and reduction order).

--device cpu --size d64-l2 --batch-size 8 --seq-len 64 runs it on CPU (gloo), for trying it here.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from isoflop.models.registry import make_model_config
from isoflop.models.sizes import resolve_size
from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import DataConfig, OptimConfig, RunSpec, ScheduleConfig, TrainConfig
from isoflop.train import distributed, run
from isoflop.train.trainer import LOSS_READBACK_EVERY, Stopped

MODES = ("ddp", "fsdp")
LOSS_REL_TOL = {"cuda": 2e-2, "cpu": 1e-5}  # bf16 and atomics on GPU; fp32 on CPU


def make_spec(args: argparse.Namespace) -> RunSpec:
    shape = resolve_size(args.size)
    model = make_model_config(args.arch, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
                              vocab_size=256, max_seq_len=args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    return RunSpec(
        arch=args.arch, size=args.size, model=model,
        data=DataConfig(corpus="python-stdlib", tokenizer="bytes"),
        train=TrainConfig(total_tokens=args.steps * tokens_per_step, batch_size=args.batch_size,
                          seq_len=args.seq_len, eval_every_tokens=args.steps // 2 * tokens_per_step,
                          eval_tokens=4 * tokens_per_step, compile=args.compile, device=args.device),
        optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_fraction=0.1), seed=0,
    )


def stop_step(steps: int, device: str) -> int:
    """The step past the half where the stop-and-resume check stops its run. Under torchrun the
    ranks agree on a stop request only every LOSS_READBACK_EVERY steps (the collective waits for
    the device like a readback), so it is such a step, and it must come before the last."""
    every = LOSS_READBACK_EVERY.get(device, 1)
    stop_at = (steps // 2 // every + 1) * every
    if stop_at >= steps:
        raise ValueError(f"--steps {steps}: too few to stop and resume on {device} (stops fall on "
                         f"multiples of {every} steps); use more than {stop_at}")
    return stop_at


def stopping_at(step: int):
    """(on_step, should_stop) that stop a run at `step`, as a preemption signal would."""
    done = {"steps": 0}
    return (lambda steps: done.update(steps=steps)), (lambda: done["steps"] >= step - 1)


def peak_memory_gb(device: str) -> float:
    if device != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def check(name: str, value: float, expected: float, tolerance: float, world: distributed.World) -> bool:
    ok = math.isclose(value, expected, rel_tol=tolerance)
    if world.is_main:
        print(f"{name}: final val loss {value:.5f} vs {expected:.5f} -> "
              f"{'ok' if ok else 'FAILED'} (rel tol {tolerance})", flush=True)
    return ok


def train_modes(args: argparse.Namespace, world: distributed.World, out: Path) -> tuple[list[dict], bool]:
    spec = make_spec(args)
    launch = out / f"world{world.size}"
    if world.is_main:
        shutil.rmtree(launch, ignore_errors=True)  # a finished run would return without training
    world.barrier()
    records = []
    for mode in MODES:
        result = run(spec, launch / mode, parallel=mode)
        second_half = RunDir(launch / mode).read_metrics()[-1] if world.is_main else {}
        records.append({
            "mode": mode, "world_size": world.size, "size": args.size, "arch": args.arch,
            "params": result["params"]["total"], "tokens_per_step": spec.train.tokens_per_step,
            "tokens_per_s": second_half.get("tokens_per_s", result["tokens_per_s"]),
            "final_train_loss": result["final_train_loss"], "final_val_loss": result["final_val_loss"],
            "peak_memory_gb": peak_memory_gb(args.device), "compile": args.compile, "device": args.device,
        })
    tolerance = LOSS_REL_TOL[args.device]
    ok = check(f"ddp vs fsdp (world {world.size})", records[1]["final_val_loss"],
               records[0]["final_val_loss"], tolerance, world)
    # Preempted partway, resumed in a fresh trainer: must end where the uninterrupted run did.
    stop_at = stop_step(args.steps, args.device)
    on_step, should_stop = stopping_at(stop_at)
    try:
        run(spec, launch / "fsdp-resumed", parallel="fsdp", on_step=on_step, should_stop=should_stop)
        ok = False
        if world.is_main:
            print(f"fsdp run asked to stop at step {stop_at} did not stop -> FAILED", flush=True)
    except Stopped:
        pass
    resumed = run(spec, launch / "fsdp-resumed", parallel="fsdp")
    ok &= check(f"fsdp stopped at step {stop_at} and resumed vs uninterrupted (world {world.size})",
                resumed["final_val_loss"], records[1]["final_val_loss"], tolerance, world)
    return records, ok


def table(records: list[dict]) -> str:
    lines = [f"{'mode':5} {'GPUs':>4} {'size':>9} {'params':>8} {'tokens/s':>11} {'per GPU':>10} "
             f"{'train loss':>10} {'val loss':>9} {'peak GB':>8}"]
    for r in records:
        lines.append(f"{r['mode']:5} {r['world_size']:>4} {r['size']:>9} {r['params'] / 1e6:>7.1f}M "
                     f"{r['tokens_per_s']:>11,.0f} {r['tokens_per_s'] / r['world_size']:>10,.0f} "
                     f"{r['final_train_loss']:>10.4f} {r['final_val_loss']:>9.4f} {r['peak_memory_gb']:>8.2f}")
    return "\n".join(lines)


def scaling(history: list[dict]) -> str:
    """Speed-up and efficiency of every (mode, model) against its 1-process launch."""
    lines = []
    for mode in MODES:
        base = [r for r in history if r["mode"] == mode and r["world_size"] == 1]
        for r in history:
            if r["mode"] != mode or r["world_size"] == 1 or not base:
                continue
            match = [b for b in base if (b["size"], b["tokens_per_step"], b["compile"], b["device"])
                     == (r["size"], r["tokens_per_step"], r["compile"], r["device"])]
            if not match:
                continue
            speedup = r["tokens_per_s"] / match[-1]["tokens_per_s"]
            lines.append(f"{mode} {r['size']} on {r['world_size']} GPUs: {speedup:.2f}x the tokens/s of "
                         f"1 GPU, efficiency {speedup / r['world_size']:.0%}; final val loss "
                         f"{r['final_val_loss']:.4f} vs {match[-1]['final_val_loss']:.4f} on 1 GPU")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and smoke.jsonl")
    parser.add_argument("--arch", default="transformer")
    parser.add_argument("--size", default="d1024-l8", help="a size name or d<width>-l<layers> (default d1024-l8)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, in sequences (default 32)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    try:
        stop_step(args.steps, args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; --device cpu runs the CPU path", file=sys.stderr)
        return 2
    with distributed.session(args.device) as world:
        records, ok = train_modes(args, world, args.out)
    if not world.is_main:
        return 0 if ok else 1
    history_path = args.out / "smoke.jsonl"
    with history_path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(table(records))
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    if len({r["world_size"] for r in history}) > 1:
        print(scaling(history))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
