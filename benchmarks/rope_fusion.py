"""RoPE in the low-rank conv's kernels against RoPE as a kernel of its own, kernel time only.

A dynamic-qkv model whose q and k convs are low-rank rotates their outputs inside the conv's Gluon
forward (triton_lowrank.ROPE, KERNELS.md v31 and v32), and its backward kernels turn dy back as they
read it (v33); without that, the model's compiled RoPE reads q and k again and writes them rotated,
and its gradient does the same with dy. For the q (or k) conv of the 300M and 150M models (B=8,
T=4096, 64-channel heads) this prints, as medians of CUDA-graph replays (no host time): the conv
forward and backward, the same rotating (turning back), the model's compiled RoPE (its inverse)
alone, and what the fusion saves per call. Training steps are what counts:
benchmarks/train_throughput.py, and KERNELS.md v31-v33 for paired A/Bs in one process.

    PYTHONPATH=. python benchmarks/rope_fusion.py

Without a Hopper GPU it says so and exits cleanly (the rotation needs the Gluon forward).
"""

from __future__ import annotations

import sys

import torch

SHAPES = {"300M q conv": (8, 4096, 1024), "150M q conv": (8, 4096, 768)}
R, W, HEAD_DIM = 16, 4, 64


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("benchmarks/rope_fusion.py: no Hopper GPU here; the fused rotation runs in the Gluon forward "
              "(its results are checked by tests/test_kernels_triton.py on a GPU).")
        return 0
    from triton.testing import do_bench_cudagraph

    from isoflop.kernels import triton_lowrank
    from isoflop.kernels.reference import rotate_heads
    from isoflop.models.attention import rope_angles

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, R={R}, W={W}, heads of {HEAD_DIM}")
    print(f"{'shape':14s} {'pass':9s} {'conv us':>8s} {'rotating':>9s} {'RoPE alone':>11s} {'saved/call':>11s}")
    for name, (B, T, D) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x, dy = (torch.randn(B, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        z = torch.randn(B, T, R, device="cuda", generator=g, dtype=torch.bfloat16)
        U, s = torch.randn(R, W * D, device="cuda", generator=g) / 4, torch.randn(W, D, device="cuda", generator=g)
        cos, sin = rope_angles(torch.arange(T, device="cuda"), HEAD_DIM, 10000.0)
        rope = (cos, sin, D)
        assert triton_lowrank.rope_fuses(x, z, U, HEAD_DIM, packed=False) and triton_lowrank.backward_rotates(x, rope), \
            "the backward would turn dy back by ops here"
        heads = x.view(B, T, D // HEAD_DIM, HEAD_DIM)
        turns = {inverse: torch.compile(lambda t, inverse=inverse: rotate_heads(t, cos, sin, inverse))
                 for inverse in (False, True)}  # the model's RoPE, and its gradient
        for turn in turns.values():
            turn(heads)  # compiled before the graph capture
        cases = {
            "forward": (lambda: triton_lowrank.lowrank_forward(x, z, U, s, True, None),
                        lambda: triton_lowrank.lowrank_forward(x, z, U, s, True, None, rope=rope),
                        lambda: turns[False](heads)),
            "backward": (lambda: triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None),
                         lambda: triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None, rope=rope),
                         lambda: turns[True](heads)),
        }
        for part, fns in cases.items():
            conv, rotating, alone = (do_bench_cudagraph(fn, rep=300) * 1e3 for fn in fns)
            print(f"{name:14s} {part:9s} {conv:8.1f} {rotating:9.1f} {alone:11.1f} {conv + alone - rotating:11.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
