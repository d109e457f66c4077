"""RoPE in the dynamic convs' kernels against RoPE as a kernel of its own, kernel time only.

A model whose q and k convs are low-rank rotates their outputs inside the conv's Gluon forward
(triton_lowrank.ROPE, KERNELS.md v31 and v32), and its backward kernels turn dy back as they read it
(v33); head-wise convs (heads of 16) do both in their Gluon walks (triton_headwise.ROPE, v34), and
static convs take those walks to do the same (training point 29; without RoPE they run the Triton
walk, so their "conv us" is that walk's time).
Without that, the model's compiled RoPE reads q and k again and writes them rotated, and its
gradient does the same with dy. For the q (or k) conv of the 300M and 150M models (B=8, T=4096,
64-channel RoPE heads) this prints, as medians of CUDA-graph replays (no host time): the conv
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
R, HEAD_SIZE, W, HEAD_DIM = 16, 16, 4, 64


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("benchmarks/rope_fusion.py: no Hopper GPU here; the fused rotation runs in the Gluon kernels "
              "(their results are checked by tests/test_kernels_triton.py on a GPU).")
        return 0
    from triton.testing import do_bench_cudagraph

    from isoflop.kernels.reference import rotate_heads
    from isoflop.models.attention import rope_angles

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, R={R}, hs={HEAD_SIZE}, W={W}, "
          f"RoPE heads of {HEAD_DIM}")
    print(f"{'shape':14s} {'conv':9s} {'pass':9s} {'conv us':>8s} {'rotating':>9s} {'RoPE alone':>11s} "
          f"{'saved/call':>11s}")
    for name, (B, T, D) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x, dy = (torch.randn(B, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        cos, sin = rope_angles(torch.arange(T, device="cuda"), HEAD_DIM, 10000.0)
        heads = x.view(B, T, D // HEAD_DIM, HEAD_DIM)
        turns = {inverse: torch.compile(lambda t, inverse=inverse: rotate_heads(t, cos, sin, inverse))
                 for inverse in (False, True)}  # the model's RoPE, and its gradient
        for turn in turns.values():
            turn(heads)  # compiled before the graph capture
        for kind, (forward, backward) in _convs(x, (cos, sin), g).items():
            cases = {"forward": (lambda: forward(None), lambda: forward((cos, sin)), lambda: turns[False](heads)),
                     "backward": (lambda: backward(dy, None), lambda: backward(dy, (cos, sin)),
                                  lambda: turns[True](heads))}
            for part, fns in cases.items():
                conv, rotating, alone = (do_bench_cudagraph(fn, rep=300) * 1e3 for fn in fns)
                print(f"{name:14s} {kind:9s} {part:9s} {conv:8.1f} {rotating:9.1f} {alone:11.1f} "
                      f"{conv + alone - rotating:11.1f}", flush=True)
    return 0


def _convs(x: torch.Tensor, tables: tuple, g: torch.Generator) -> dict:
    """For the low-rank, the head-wise and the static conv of x: forward(rope) and backward(dy, rope),
    rope None or the tables, after checking that they rotate inside their kernels."""
    from isoflop.kernels import triton_headwise, triton_lowrank

    B, T, D = x.shape
    on = dict(device="cuda", generator=g)
    z = torch.randn(B, T, R, dtype=x.dtype, **on)
    U, s = torch.randn(R, W * D, **on) / 4, torch.randn(W, D, **on)
    w = torch.randn(B, T, W, D // HEAD_SIZE, dtype=x.dtype, **on)
    lowrank_rope = (*tables, D)
    assert triton_lowrank.rope_fuses(x, z, U, HEAD_DIM, packed=False) and triton_lowrank.backward_rotates(
        x, lowrank_rope), "the low-rank backward would turn dy back by ops here"

    def lowrank_rope_of(rope):
        return (*rope, D) if rope is not None else None

    convs = {
        "low-rank": (lambda rope: triton_lowrank.lowrank_forward(x, z, U, s, True, None, rope=lowrank_rope_of(rope)),
                     lambda dy, rope: triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None,
                                                                      rope=lowrank_rope_of(rope))),
        "head-wise": (lambda rope: triton_headwise.headwise_forward(x, w, s, True, None, rope=rope),
                      lambda dy, rope: triton_headwise.headwise_backward(dy, x, w, s, True, None, rope=rope)),
        "static": (lambda rope: triton_headwise.headwise_forward(x, None, s, True, None, rope=rope),
                   lambda dy, rope: triton_headwise.headwise_backward(dy, x, None, s, True, None, rope=rope)),
    }
    if not triton_headwise.rope_fuses(x, w, tables, packed=False, width=W):  # (D not a multiple of the walks' 256)
        print(f"[{B}, {T}, {D}]: the head-wise walks do not run here; head-wise and static rows left out")
        del convs["head-wise"], convs["static"]
    return convs


if __name__ == "__main__":
    sys.exit(main())
