"""The low-rank filter gradients, Triton kernel against its Gluon twin, side by side.

    PYTHONPATH=. python benchmarks/gluon_filter_grads.py [--rounds 3]

`triton_lowrank._fused_filter_grads` runs the plain-pointer Triton kernel ("fused") or, on Hopper,
`gluon_lowrank`'s kernel ("gluon", what the backward's "auto" takes there for unpacked sequences):
the same algorithm with its tiles fed by TMA and its products asynchronous, so the results must be
bit-identical. Per shape
it prints whether they are, and the median GPU time of both, kernel and partial sums (graph replay,
the median of interleaved rounds). On the H200 (session 20, KERNELS.md v22): paper shape 100.4 ->
67.2 us, the 300M conv 102.7 -> 69.0, ragged 7.1 -> 6.4, packed 8.9 -> 10.3 (so "auto" keeps the
Triton kernel for packed sequences), bit-identical at all four.

History: session 19's first Gluon version (asynchronous products, tiles loaded into registers)
gave 98 against 100 us (KERNELS.md, point 23); feeding the tiles through shared memory by TMA
and taking df from registers for both products made the difference. Needs a Hopper GPU; says so otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import triton

from isoflop.kernels import gluon_lowrank, ops
from isoflop.kernels import triton_lowrank as lr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = parser.parse_args(argv)
    if gluon_lowrank.gluon is None or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("gluon_filter_grads: needs Triton's Gluon and a Hopper GPU; skipped")
        return 0
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    shapes = (("paper", 4, 4096, 2048, 16, 4, None), ("300M conv", 8, 4096, 1024, 16, 4, None),
              ("ragged", 2, 1000, 192, 5, 3, None), ("packed", 1, 3000, 256, 16, 4, [0, 700, 1900, 3000]))
    print(f"{torch.cuda.get_device_name()}, Triton {triton.__version__}; us, median of {args.rounds} rounds")
    for label, B, T, D, R, W, cu in shapes:
        x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        z = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16)
        U = (torch.randn(R, W * D, device="cuda") * 0.1).to(torch.bfloat16)
        s = torch.randn(W, D, device="cuda", dtype=torch.bfloat16)
        pos = ops._positions(torch.tensor(cu), T, x.device) if cu else None
        meta = lr._meta(z, U, D, s, pos)
        calls = {name: (lambda gluon=name == "gluon": lr._fused_filter_grads(dy, x, z, U, s, pos, meta, None, gluon))
                 for name in ("triton", "gluon")}
        identical = all(torch.equal(a, b) for a, b in zip(calls["gluon"](), calls["triton"]()))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3)
        print(f"{label:10s} [{B}, {T}, {D}] R={R} W={W}: bit-identical {identical}; "
              f"triton {statistics.median(times['triton']):.1f}, gluon {statistics.median(times['gluon']):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
