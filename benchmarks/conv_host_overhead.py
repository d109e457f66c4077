"""Host (CPU) time of the conv ops in eager training, where small models spend their steps.

    PYTHONPATH=. python benchmarks/conv_host_overhead.py [--sizes d128-l3,d384-l6] [--steps 10]
        [--rounds 5] [--no-graphs]

A small model's eager training step is bound by host time (launches and Python), not by the GPU:
at d128-l3, batch 64 x 512, the step's kernels take well under half its wall time. Each conv adds
its host time to every step. Eager calls run the kernels through a plain autograd.Function; the
torch.library custom ops are kept for torch.compile (isoflop/kernels/ops.py). This prints, side by
side in one run:

1. per call, forward + backward at the first size's shape of a q/k/v conv (batch 64 x 512 tokens,
   d_model channels, bf16): host microseconds (median, the GPU idle at each call's start) of
   the direct path, the custom ops and the eager PyTorch reference, next to a one-multiply op's
   forward + backward (the autograd engine's own cost per backward call);
2. per size, training steps of the transformer and the conv variants (eager, as `isoflop run` trains
   by default), each conv variant once through the direct path and once through the custom ops,
   and every variant compiled with CUDA graphs (train.compile: graphs, which takes host time out
   of the step), timed in interleaved rounds: ms per step and the ratio to the transformer's step
   on the same path.

Needs CUDA (on CPU the ops run the reference, so there is nothing to compare); says so and exits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (VariantRun: the whole training step, as that benchmark times it)

from isoflop import kernels  # noqa: E402
from isoflop.kernels import reference  # noqa: E402
from isoflop.models.registry import make_model_config  # noqa: E402
from isoflop.models.sizes import resolve_size  # noqa: E402

VARIANTS = ("transformer", "static-qkv", "dynamic-qkv", "dynamic-headwise-qkv", "dynamic-all-linear")
BATCH, SEQ_LEN, VOCAB = 64, 512, 256  # the small sweeps' step (sweeps/paper-small.yaml)


def through_custom_ops(op, direct, *args):
    """ops._dispatch as it was before the direct path: every eager call through the custom op."""
    return op(*args)


def host_us(fn, calls: int = 60, warmup: int = 10) -> float:
    """Median host microseconds of fn(), each call starting with the GPU idle."""
    times = []
    for i in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def per_call(ops, d_model: int) -> None:
    W, R = 4, 16
    on = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(BATCH, SEQ_LEN, d_model, **on, requires_grad=True)
    static = (torch.randn(W, d_model, **on) / 2).requires_grad_()
    z = torch.randn(BATCH, SEQ_LEN, R, **on, requires_grad=True)
    U = (torch.randn(R, W * d_model, **on) / 4).requires_grad_()
    w = torch.randn(BATCH, SEQ_LEN, W, d_model // 16, **on, requires_grad=True)
    dy = torch.randn_like(x)
    calls = {
        "static": lambda: kernels.static_conv(x, static, residual=True),
        "low-rank": lambda: kernels.dynamic_conv_lowrank(x, z, U, static),
        "head-wise hs=16": lambda: kernels.dynamic_conv_headwise(x, w, static),
    }
    references = {
        "static": lambda: reference.static_conv(x, static, residual=True),
        "low-rank": lambda: reference.dynamic_conv_lowrank(x, z, U, static),
        "head-wise hs=16": lambda: reference.dynamic_conv_headwise(x, w, static),
    }
    direct = ops._dispatch
    print(f"\nhost us per forward + backward, [{BATCH}, {SEQ_LEN}, {d_model}] bf16, W={W}; "
          f"one multiply: {host_us(lambda: (x * 2).backward(dy)):.0f} us")
    print(f"{'op':16s} {'direct':>8s} {'custom op':>10s} {'reference':>10s}")
    for name, call in calls.items():
        ops._dispatch = through_custom_ops
        custom = host_us(lambda: call().backward(dy))
        ops._dispatch = direct
        fast = host_us(lambda: call().backward(dy))
        slow_ref = host_us(lambda: references[name]().backward(dy))
        print(f"{name:16s} {fast:8.0f} {custom:10.0f} {slow_ref:10.0f}", flush=True)


def steps(ops, size: str, variants: list[str], n_steps: int, rounds: int, graphs: bool) -> None:
    shape = resolve_size(size)
    direct = ops._dispatch
    runs = {}  # (variant, path) -> [VariantRun, dispatch, seconds]
    for variant in variants:
        cfg = make_model_config(variant, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
                                VOCAB, SEQ_LEN)
        paths = [("direct", direct, "none")]
        if variant != "transformer":
            paths.append(("custom op", through_custom_ops, "none"))
        if graphs:
            paths.append(("graphs", direct, "graphs"))
        for path, dispatch, compile_mode in paths:
            ops._dispatch = dispatch
            run = train_throughput.VariantRun(cfg, torch.device("cuda"), compile_mode, SEQ_LEN, BATCH, "off")
            for _ in range(3):  # graphs: compiled on the first step, recorded by the third
                run.step()
            runs[(variant, path)] = [run, dispatch, 0.0]
    for _ in range(rounds):
        for entry in runs.values():
            ops._dispatch = entry[1]
            entry[2] += entry[0].timed(n_steps)
    ops._dispatch = direct
    total = n_steps * rounds
    print(f"\n{shape.name}, batch {BATCH} x {SEQ_LEN}: ms per step over {total} steps "
          f"({rounds} interleaved rounds); x transformer: against its step on the same path")
    print(f"{'variant':22s} {'path':10s} {'ms/step':>8s} {'x transformer':>14s}")
    for (variant, path), (_, _, seconds) in runs.items():
        # The custom ops' rows compare with the transformer's eager (direct) step.
        base = runs.get(("transformer", "graphs" if path == "graphs" else "direct"), [None, None, None])[2]
        ratio = f"{seconds / base:14.2f}" if base else f"{'-':>14s}"
        print(f"{variant:22s} {path:10s} {seconds / total * 1e3:8.2f} {ratio}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="d128-l3,d384-l6", help="comma-separated model sizes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated architectures")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="leave out the steps under CUDA graphs (train.compile: graphs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_host_overhead: needs CUDA (on CPU the conv ops run the PyTorch reference); skipped")
        return 0
    from isoflop.kernels import ops

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    per_call(ops, resolve_size(sizes[0]).d_model)
    for size in sizes:
        steps(ops, size, variants, args.steps, args.rounds, args.graphs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
