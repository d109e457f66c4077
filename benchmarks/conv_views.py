"""The head-wise conv kernels on views into a fused projection's output against contiguous inputs.

    PYTHONPATH=. python benchmarks/conv_views.py [--rounds 3]

In training, a conv's x and its head-wise taps w are slices of one projection's output ([B, T,
3D + 3WH] for q, k, v and their generators), so their rows lie wider apart than D and W * H. The
kernels read such views in place (their row strides) rather than having them copied. This prints,
side by side in one run, per shape: forward on contiguous inputs, on views, and on views without
the 512-channel forward's register cap (triton_headwise._row_blocks); backward on contiguous
inputs and on views; and the copies of x and w that views save. Median GPU time by graph replay
(us), the median of interleaved rounds; each output is checked bit-identical to contiguous inputs'.

Needs CUDA; says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from isoflop.kernels import triton_headwise as hw

SHAPES = (("300M q/k/v conv hs=16", 8, 4096, 1024, 16), ("paper hs=16", 4, 4096, 2048, 16),
          ("paper hs=4", 4, 4096, 2048, 4), ("paper hs=1", 4, 4096, 2048, 1))
W = 4


def bench(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def measure(B: int, T: int, D: int, hs: int, rounds: int) -> tuple[dict[str, float], bool]:
    H = D // hs
    projection = torch.randn(B, T, 3 * D + 3 * W * H, device="cuda", dtype=torch.bfloat16)
    x_view = projection[..., D:2 * D]  # k's slice, between q's and v's
    w_view = projection[..., 3 * D + W * H:3 * D + 2 * W * H].unflatten(-1, (W, H))
    x, w = x_view.contiguous(), w_view.contiguous()
    static = torch.randn(W, D, device="cuda") * 0.3  # float32, as autocast leaves parameters
    dy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    uncapped = hw._row_blocks(T, D, hs, backward=False, dynamic=True, dense=True)
    contiguous = [hw.headwise_forward(x, w, static, True, None), *hw.headwise_backward(dy, x, w, static, True, None)]
    views = [hw.headwise_forward(x_view, w_view, static, True, None, blocks) for blocks in (None, uncapped)]
    views += hw.headwise_backward(dy, x_view, w_view, static, True, None)
    identical = all(torch.equal(a, b) for a, b in zip(contiguous, [views[0], *views[2:]]))
    identical &= torch.equal(views[1], contiguous[0])
    cases = {
        "fwd": lambda: hw.headwise_forward(x, w, static, True, None),
        "fwd view": lambda: hw.headwise_forward(x_view, w_view, static, True, None),
        "fwd view, no cap": lambda: hw.headwise_forward(x_view, w_view, static, True, None, uncapped),
        "bwd": lambda: hw.headwise_backward(dy, x, w, static, True, None),
        "bwd view": lambda: hw.headwise_backward(dy, x_view, w_view, static, True, None),
        "copies saved": lambda: (x_view.contiguous(), w_view.contiguous()),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(bench(fn))
    return {name: statistics.median(values) for name, values in times.items()}, identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_views.py needs CUDA: the kernels' timings on views mean nothing elsewhere")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us, median of {args.rounds} rounds")
    header = None
    for label, B, T, D, hs in SHAPES:
        times, identical = measure(B, T, D, hs, args.rounds)
        if header is None:
            header = f"{'shape [B, T, D]':40s}" + "".join(f"{name:>18s}" for name in times) + "  bit-identical"
            print(header)
            print("-" * len(header))
        print(f"{f'{label} [{B}, {T}, {D}]':40s}" + "".join(f"{t:18.1f}" for t in times.values())
              + f"  {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
