"""The MLP's gate and up convs with their SwiGLU in one kernel, against the convs and then the
compiled SwiGLU, kernel time only.

With convs after every linear, a model's MLP filters gate and up with low-rank convs and multiplies
silu(gate') by up'. Apart, the convs' op writes gate' and up' and the compiled SwiGLU reads them
back. gluon_lowrank_swiglu forms both convs and the SwiGLU in one kernel, writing gate' and up' only
for the SwiGLU's gradient (KERNELS.md, training point 33). For the 300M and 150M models' MLPs (B=8,
T=4096, d_ff channels, R=16, W=4, bf16) this prints, as medians of CUDA-graph replays (no host
time), side by side in one run: the forward apart (the two convs as one op on the fused
projection, then the compiled SwiGLU), the fused kernel as training runs it (saving gate' and up')
and without saving them (what inference would need); and the effective GB/s of each, from the
tensors of [tokens, d_ff] it moves (apart 4 + 3, fused 2 + 3 or 2 + 1). The backward is the same
in both (the compiled SwiGLU gradient, then the convs'). Training steps are what counts:
benchmarks/paired_switch.py ISOFLOP_SWIGLU_CONVS auto,off.

    PYTHONPATH=. python benchmarks/swiglu_fusion.py [--stages 3]

Without a Hopper GPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {"300M MLP": (8, 4096, 2816), "150M MLP": (8, 4096, 2048)}
R, W = 16, 4
UNITS = {"apart": 7, "fused": 5, "fused, no save": 3}  # [tokens, d_ff] tensors read and written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=None, help="ring slots of the fused kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("benchmarks/swiglu_fusion.py: no Hopper GPU here; the fused kernel is Gluon on Hopper "
              "(its results are checked by tests/test_kernels_triton.py on a GPU).")
        return 0
    from triton.testing import do_bench_cudagraph

    from isoflop.kernels import gluon_lowrank_swiglu as gs
    from isoflop.kernels import ops

    stages = args.stages or gs.STAGES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, R={R}, W={W}, ring slots {stages}")
    print(f"{'shape':10s} " + " ".join(f"{name + ' us':>19s}" for name in UNITS) + f" {'fused/apart':>12s} "
          + " ".join(f"{name + ' GB/s':>21s}" for name in UNITS))
    swiglu = torch.compile(lambda g, u: torch.nn.functional.silu(g) * u)
    for name, (B, T, C) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        on = dict(device="cuda", generator=gen)
        projection = torch.randn(B, T, 2 * C + 2 * R, dtype=torch.bfloat16, **on)
        ups = [torch.randn(R, W * C, **on) / 4 for _ in range(2)]
        statics = [torch.randn(W, C, **on) / 2 for _ in range(2)]
        operands = ops._swiglu_operands(projection, ups, statics, W)
        assert gs.cannot_run(*operands[:6]) is None, gs.cannot_run(*operands[:6])
        swiglu(*ops._lowrank_projected(projection, ups, statics, W, True, None, None, None, 0))  # compiled first
        fns = {"apart": lambda: swiglu(*ops._lowrank_projected(projection, ups, statics, W, True, None, None, None, 0)),
               "fused": lambda: gs.forward(*operands, True, stages=stages),
               "fused, no save": lambda: gs.forward(*operands, True, save=False, stages=stages)}
        times = {key: do_bench_cudagraph(fn, rep=300) * 1e3 for key, fn in fns.items()}
        unit = B * T * C * 2 / 1e3  # bytes of one tensor, over 1e9 (GB) times 1e6 (us)
        print(f"{name:10s} " + " ".join(f"{t:19.1f}" for t in times.values())
              + f" {times['fused'] / times['apart']:12.2f} "
              + " ".join(f"{UNITS[key] * unit / t:21.0f}" for key, t in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
