"""Benchmark of the short-convolution Triton kernels against the memory floor and the PyTorch reference.

For each case: forward, backward and forward+backward medians of GPU time (triton.testing.
do_bench_cudagraph, so Python dispatch and launch overhead stay out of the numbers), achieved
GB/s over the fewest bytes the pass must move (each input read once, each output written once), that
as a percentage of the device-to-device copy bandwidth measured in the same run, and the speed-up
over the eager PyTorch reference and over torch.compile of it (forward+backward). The last lines
check issue 4's targets at the paper's shape against these figures (benchmarks/targets.py).

    PYTHONPATH=. python benchmarks/kernels.py [--quick] [--paper] [--sweep] [--no-compile] [--json FILE]

--sweep first times a few block configurations of each kernel at the paper's shape and uses the
fastest for the rest of the run (how the defaults in triton_lowrank.py / triton_headwise.py were
picked). Its plans for wider low-rank filters (W=8, R=32 W=8, R=64, R=128) only print (how v16's
blocks were picked), and its "lowrank ... bwd split" plans time the split low-rank backward
against the fused one's result. The cases below run the backward's "auto" variant, which on Hopper
takes the Gluon filter gradients where they run (gluon_lowrank); ISOFLOP_LOWRANK_BWD=fused times
the Triton kernel instead, =split the split backward; where the Gluon dx and filter gradients both
run and their grids fit, "auto" runs them side by side on two streams (ISOFLOP_LOWRANK_OVERLAP=off
times them one after the other). Likewise the head-wise forward and backward
take the Gluon walks where they run (gluon_headwise); ISOFLOP_HEADWISE_FWD=triton and
ISOFLOP_HEADWISE_BWD=triton time the Triton walks.
Without CUDA it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from isoflop.kernels import reference

from targets import Check, print_checks  # benchmarks/targets.py: the script's directory is on the path


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # lowrank | headwise | static
    B: int
    T: int
    D: int
    W: int = 4
    R: int = 16
    head_size: int = 16
    packed: int = 0  # number of documents packed into one sequence (B must be 1)
    compile_ref: bool = False
    float32_params: bool = False  # U and static in float32, as autocast leaves parameters in training


PAPER = dict(B=4, T=4096, D=2048, W=4)
CASES = [
    Case("lowrank R=16 (paper)", "lowrank", **PAPER, compile_ref=True),
    Case("lowrank R=16 fp32 U (paper)", "lowrank", **PAPER, float32_params=True),
    Case("headwise hs=16 (paper)", "headwise", **PAPER, head_size=16, compile_ref=True),
    Case("headwise hs=4 (paper)", "headwise", **PAPER, head_size=4),
    Case("headwise hs=1 (paper)", "headwise", **PAPER, head_size=1, compile_ref=True),
    Case("static W=4 (paper)", "static", **PAPER),
    Case("lowrank R=64", "lowrank", **PAPER, R=64),
    Case("lowrank R=128", "lowrank", **PAPER, R=128),  # the split filter gradients ("auto", v16)
    Case("lowrank R=16 W=8", "lowrank", B=4, T=4096, D=2048, W=8),
    Case("lowrank packed 8 docs", "lowrank", B=1, T=16384, D=2048, packed=8),
    Case("lowrank D=1024 T=2048 B=8", "lowrank", B=8, T=2048, D=1024),
    Case("headwise hs=128", "headwise", **PAPER, head_size=128),
]


def make_inputs(case: Case, dtype=torch.bfloat16) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    B, T, D, W = case.B, case.T, case.D, case.W
    inputs = dict(x=randn(B, T, D), static=randn(W, D, scale=W**-0.5))
    if case.kind == "lowrank":
        inputs.update(z=randn(B, T, case.R), U=randn(case.R, W * D, scale=case.R**-0.5))
    if case.kind == "headwise":
        inputs.update(w=randn(B, T, W, D // case.head_size, scale=0.5))
    if case.float32_params:
        inputs.update({k: inputs[k].float() for k in ("U", "static") if k in inputs})
    if case.packed:
        cuts = torch.linspace(0, T, case.packed + 1).round().long()
        inputs["cu_seqlens"] = cuts.to(device="cuda", dtype=torch.int32)
    return inputs


def floor_bytes(case: Case, inputs: dict) -> tuple[int, int]:
    """Fewest bytes (forward, backward): x read, y written; dy and x read, dx written; plus the filter
    inputs (z or w) read in both passes and their gradients written, and the small parameters."""
    n = {k: v.numel() * v.element_size() for k, v in inputs.items() if k != "cu_seqlens"}
    params = n.get("U", 0) + n["static"]
    filt = n.get("z", 0) + n.get("w", 0)
    fwd = 2 * n["x"] + filt + params
    bwd = 3 * n["x"] + 2 * filt + 2 * params
    return fwd, bwd


def functions(case: Case):
    from isoflop import kernels
    from isoflop.kernels import ops

    fast = {"lowrank": kernels.dynamic_conv_lowrank, "headwise": kernels.dynamic_conv_headwise,
            "static": kernels.static_conv}[case.kind]
    slow = {"lowrank": reference.dynamic_conv_lowrank, "headwise": reference.dynamic_conv_headwise,
            "static": reference.static_conv}[case.kind]

    def backward_only(inputs, dy):
        res = case.kind != "static"
        cu = inputs.get("cu_seqlens")
        if case.kind == "lowrank":
            return ops.lowrank_conv_backward(dy, inputs["x"], inputs["z"], inputs["U"], inputs["static"], res, cu,
                                             None, None, 0)
        return ops.headwise_conv_backward(dy, inputs["x"], inputs.get("w"), inputs["static"], res, cu)

    return fast, slow, backward_only


def bench(fn, quick: bool) -> float:
    """Median GPU time in microseconds, from replays of a CUDA graph of many calls: what the kernels
    cost once launch and Python dispatch overhead are gone (as under CUDA graphs or when the CPU
    runs ahead of the GPU in training). Eager calls of a custom op add tens of microseconds of CPU
    time each, which a loop of single ops would measure instead."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median") * 1e3


def copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written. Timed with
    plain events, not a graph: inside a CUDA graph the copy becomes a memcpy node served by the copy
    engines (seen at 2.77 TB/s on an H200, against 4.22 TB/s for the same copy launched directly)."""
    from triton.testing import do_bench

    src = torch.randn(256 << 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def fwd_bwd(fn, inputs: dict, dy: torch.Tensor):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if k != "cu_seqlens"}
    others = {k: v for k, v in inputs.items() if k == "cu_seqlens"}
    grads = list(leaves.values())

    def run():
        return torch.autograd.grad(fn(**leaves, **others), grads, dy)

    return run


# Issue 4's targets at the paper's shape: forward + backward in us, and every forward within
# FORWARD_FLOOR_RATIO of its memory floor.
FB_TARGETS_US = {"lowrank R=16 (paper)": 100.0, "headwise hs=16 (paper)": 110.0, "headwise hs=1 (paper)": 320.0}
FORWARD_FLOOR_RATIO = 1.3


def target_checks(rows: list[dict]) -> list[Check]:
    """Issue 4's targets against this run's rows (those it timed: --paper leaves out nothing here)."""
    checks = [Check(f"{r['case']} forward + backward", r["fb_us"], FB_TARGETS_US[r["case"]], "us")
              for r in rows if r["case"] in FB_TARGETS_US]
    checks += [Check(f"{r['case']} forward against its memory floor", r["fwd_us"] / r["fwd_floor_us"],
                     FORWARD_FLOOR_RATIO, "x its floor", digits=2)
               for r in rows if "(paper)" in r["case"]]
    return checks


def run_case(case: Case, bw: float, quick: bool, compile_ref: bool) -> dict:
    fast, slow, backward_only = functions(case)
    inputs = make_inputs(case)
    dy = torch.randn_like(inputs["x"])
    fwd_bytes, bwd_bytes = floor_bytes(case, inputs)
    row = {"case": case.name}
    with torch.no_grad():
        row["fwd_us"] = bench(lambda: fast(**inputs), quick)
        row["ref_fwd_us"] = bench(lambda: slow(**inputs), quick)
    row["bwd_us"] = bench(lambda: backward_only(inputs, dy), quick)
    row["fb_us"] = bench(fwd_bwd(fast, inputs, dy), quick)
    row["ref_fb_us"] = bench(fwd_bwd(slow, inputs, dy), quick)
    if compile_ref and case.compile_ref:
        start = time.time()
        compiled = torch.compile(slow)
        fwd_bwd(compiled, inputs, dy)()
        row["compile_s"] = time.time() - start
        row["compiled_fb_us"] = bench(fwd_bwd(compiled, inputs, dy), quick)
    for part, nbytes in (("fwd", fwd_bytes), ("bwd", bwd_bytes), ("fb", fwd_bytes + bwd_bytes)):
        row[f"{part}_floor_us"] = nbytes / bw * 1e6
        row[f"{part}_GBps"] = nbytes / (row[f"{part}_us"] * 1e-6) / 1e9
        row[f"{part}_pct_copy"] = 100 * row[f"{part}_floor_us"] / row[f"{part}_us"]
    return row


def sweep(quick: bool, only: list[str] | None = None) -> dict[str, dict]:
    """Time block configurations of each kernel at the paper's shape (bf16); returns the fastest
    configuration whose results match the default configuration's, per kernel. The 8-warp
    candidates hold half the elements per thread, so need fewer registers
    (benchmarks/kernel_resources.py; KERNELS.md, "Offline resource check")."""
    from isoflop.kernels import triton_headwise as hw
    from isoflop.kernels import triton_lowrank as lr

    def cfg(bt, bd, warps, stages=1, key="BLOCK_D"):
        return {"BLOCK_T": bt, key: bd, "num_warps": warps, "num_stages": stages}

    def split(dz, du):
        return {"dz": dz, "du": du}

    low = make_inputs(Case("", "lowrank", **PAPER))
    x, z, U, s = low["x"], low["z"], low["U"], low["static"]
    dy = torch.randn_like(x)

    def fused_bwd(b):
        return lr.lowrank_backward(dy, x, z, U, s, True, None, blocks=b, variant="fused")

    def conv(bt, bd, warps, chunk, stages):
        return {"BLOCK_T": bt, "BLOCK_D": bd, "num_warps": warps, "CHUNK": chunk, "STAGES": stages}

    # The conv kernel (forward; dx is the same kernel with leads): CHUNK tiles per program,
    # STAGES of the compiler's pipelining (v7); CHUNK 1 / STAGES 1 is the kernel before v7.
    conv_configs = [conv(64, 64, 4, 32, 3), conv(64, 64, 4, 16, 3), conv(32, 64, 4, 16, 3), conv(32, 128, 4, 8, 3),
                    conv(64, 32, 4, 16, 2), conv(128, 32, 4, 16, 3), conv(32, 128, 4, 1, 1), conv(64, 64, 8, 32, 3),
                    conv(32, 64, 4, 16, 4)]
    plans = [
        ("lowrank fwd", lambda b: lr._conv(x, z, U, s, True, None, lead=False, blocks=b), conv_configs),
        ("lowrank dx", lambda b: lr._conv(dy, z, U, s, True, None, lead=True, blocks=b), conv_configs),
        ("lowrank bwd", fused_bwd,
         [cfg(32, 64, 4), cfg(32, 64, 8), cfg(64, 64, 4), cfg(32, 32, 4), cfg(32, 128, 8),
          cfg(16, 32, 8), cfg(32, 32, 8)]),
        # The split candidate: {"dz": ..., "du": ...} per config, checked against the fused default.
        ("lowrank bwd split", lambda b: lr.lowrank_backward(dy, x, z, U, s, True, None, blocks=b, variant="split"),
         [split(cfg(64, 64, 8), cfg(64, 64, 8)), split(cfg(32, 64, 8), cfg(64, 64, 8)),
          split(cfg(64, 64, 4), cfg(64, 64, 4)), split(cfg(128, 64, 8), cfg(32, 64, 8)),
          split(cfg(64, 128, 8), cfg(64, 128, 8)), split(cfg(64, 64, 8), cfg(64, 64, 8, stages=3)),
          split(cfg(64, 32, 4), cfg(32, 64, 4))]),
    ]
    baselines = {"lowrank bwd split": lambda: fused_bwd(None)}

    def rows(bc, rows_per_program, warps, stages=None):
        return {"BLOCK_C": bc, "ROWS": rows_per_program, "num_warps": warps} | ({"STAGES": stages} if stages else {})

    # The row-walking head-wise/static kernels (W <= 4, v9): channels per program, rows per
    # program, warps; 8 channels per thread are 16-byte loads of bf16.
    row_configs = [rows(512, 64, 2), rows(256, 64, 2), rows(256, 128, 2), rows(512, 128, 4), rows(512, 64, 4),
                   rows(1024, 64, 4), rows(256, 32, 2), rows(128, 64, 1), rows(512, 32, 2)]
    for hs in (16, 4, 1):
        w = make_inputs(Case("", "headwise", **PAPER, head_size=hs))["w"]
        # Each pass also with the tiled kernels' blocks (the W=4 default before v9; BLOCK_T keys
        # select the tiled path), so the sweep prints the row-walking gain side by side.
        fwd_configs = row_configs + [hw._blocks(PAPER["D"], hs, backward=False)]
        bwd_configs = row_configs + [hw._blocks(PAPER["D"], hs, backward=True)]
        plans += [
            (f"headwise hs={hs} fwd", lambda b, w=w: hw.headwise_forward(x, w, s, True, None, blocks=b), fwd_configs),
            (f"headwise hs={hs} bwd", lambda b, w=w: hw.headwise_backward(dy, x, w, s, True, None, blocks=b), bwd_configs),
        ]
    # The static conv (static-qkv's operator): no w, residual, as StaticShortConv calls it.
    plans += [
        ("static fwd", lambda b: hw.headwise_forward(x, None, s, True, None, blocks=b),
         row_configs + [hw._blocks(PAPER["D"], 1, backward=False, dynamic=False)]),
        # ... and its backward with the walk's loads pipelined (STAGES; v11)
        ("static bwd", lambda b: hw.headwise_backward(dy, x, None, s, True, None, blocks=b),
         row_configs + [hw._blocks(PAPER["D"], 1, backward=True, dynamic=False)]
         + [rows(bc, r, 2, stages) for bc, r in ((256, 256), (256, 128), (512, 128)) for stages in (3, 4, 5)]),
    ]
    # Wider filters (v16, v17): the conv's blocks at R_P * W = 128 (W=8), 256 (R=64, R=32 W=8) and 512
    # (R=128), with the one-tile kernel they replaced in v16; and at R=128 the split filter gradients,
    # which "auto" takes from R_P * W = 1024 on, against the fused kernel's result.
    wide_configs = [conv(32, 64, 4, 16, 3), conv(32, 64, 8, 16, 3), conv(64, 32, 4, 16, 2), conv(64, 32, 8, 16, 2),
                    conv(32, 64, 4, 16, 2), conv(64, 64, 4, 16, 2), conv(32, 64, 4, 1, 1), conv(64, 64, 8, 32, 3),
                    conv(64, 64, 8, 16, 3)]
    wide_inputs = {}
    for label, W, R in (("W=8", 8, 16), ("R=32 W=8", 8, 32), ("R=64", 4, 64), ("R=128", 4, 128)):
        wide = wide_inputs[label] = make_inputs(Case("", "lowrank", B=4, T=4096, D=2048, W=W, R=R))
        args = (wide["z"], wide["U"], wide["static"], True, None)
        plans += [
            (f"lowrank {label} fwd", lambda b, a=args, x=wide["x"]: lr._conv(x, *a, lead=False, blocks=b), wide_configs),
            (f"lowrank {label} dx", lambda b, a=args, dy=torch.randn_like(wide["x"]): lr._conv(dy, *a, lead=True, blocks=b),
             wide_configs),
        ]
    r128 = wide_inputs["R=128"]
    r128_dy = torch.randn_like(r128["x"])

    def wide_bwd(b, variant, w=r128):
        return lr.lowrank_backward(r128_dy, w["x"], w["z"], w["U"], w["static"], True, None, blocks=b, variant=variant)

    plans.append(("lowrank R=128 bwd split", lambda b: wide_bwd(b, "split"),
                  [split(cfg(64, 64, 4), cfg(64, 64, 4)), split(cfg(64, 64, 8), cfg(64, 64, 8)),
                   split(cfg(64, 64, 4), cfg(32, 64, 4))]))
    baselines["lowrank R=128 bwd split"] = lambda: wide_bwd(None, "fused")
    if only:
        plans = [plan for plan in plans if any(plan[0].startswith(prefix) for prefix in only)]
    best: dict[str, dict] = {}
    fastest: dict[str, float] = {}
    for name, fn, configs in plans:
        expected = baselines.get(name, lambda fn=fn: fn(None))()  # the default configuration's result
        ref_outs = expected if isinstance(expected, tuple) else (expected,)
        timings = []
        for config in configs:
            try:
                got = fn(config)
                outs = got if isinstance(got, tuple) else (got,)
                ok = all(a is None or _agree(a, b, name in baselines) for a, b in zip(outs, ref_outs))
                us = bench(lambda: fn(config), quick)
            except Exception as error:  # a config the compiler rejects is a result too
                ok, us = False, float("nan")
                print(f"  {name} {config}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
            print(f"  {name:22s} {config} {us:8.1f} us {'ok' if ok else 'MISMATCH'}", flush=True)
            if ok:
                timings.append((us, config))
        if timings:
            fastest[name], best[name] = min(timings, key=lambda item: item[0])
    if "lowrank bwd" in fastest and "lowrank bwd split" in fastest:
        print(f"  lowrank bwd, best of each: fused {fastest['lowrank bwd']:.1f} us, "
              f"split {fastest['lowrank bwd split']:.1f} us", flush=True)
    return best


def _agree(a: torch.Tensor, b: torch.Tensor, other_algorithm: bool) -> bool:
    """Other blocks' results agree with the default's up to rounding element by element; another
    algorithm's (split against fused filter gradients: other summation orders, each rounded to
    bf16) by norm."""
    a, b = a.float(), b.float()
    if other_algorithm:
        return ((a - b).norm() / b.norm()).item() < 1e-2
    return torch.allclose(a, b, rtol=2e-2, atol=2e-2)


def install_tuned(best: dict[str, dict]) -> None:
    """Make the sweep's winners the block sizes for the rest of this run: low-rank ones for R <= 16
    and W <= 4 (the shape they were tuned at); for the row-walking kernels, hs=16's winners for heads
    of 8+ channels, hs=4's for 2 to 4, hs=1's for 1, and the static conv's."""
    from isoflop.kernels import triton_headwise as hw
    from isoflop.kernels import triton_lowrank as lr

    conv_default, grad_default, split_default, row_default = (
        lr._conv_blocks, lr._grad_blocks, lr._split_blocks, hw._row_blocks)

    def conv_blocks(T, R_P, W_P, lead, fp32):
        tuned = best.get("lowrank dx" if lead else "lowrank fwd")
        if tuned is not None and R_P == 16 and W_P <= 4 and not fp32:
            return dict(tuned)
        return conv_default(T, R_P, W_P, lead, fp32)

    def grad_blocks(R_P, W_P):  # R_P 32: R=16 padded for z's column of ones (static filter)
        tuned = best.get("lowrank bwd")
        if tuned is not None and R_P == 32 and W_P <= 4:
            return dict(tuned)
        return grad_default(R_P, W_P)

    def split_blocks(R_P, W_P, fp32):
        tuned = best.get("lowrank bwd split")
        if tuned is not None and R_P == 16 and W_P <= 4 and not fp32:
            return {kernel: dict(blocks) for kernel, blocks in tuned.items()}
        return split_default(R_P, W_P, fp32)

    def row_blocks(T, D, hs_p, backward, dynamic=True, dense=True):
        kind = ("headwise hs=1" if hs_p == 1 else "headwise hs=4" if hs_p <= 4 else "headwise hs=16") if dynamic else "static"
        tuned = best.get(f"{kind} {'bwd' if backward else 'fwd'}")
        if tuned is None or "ROWS" not in tuned or not dense:  # tuned on contiguous inputs, as rows
            return row_default(T, D, hs_p, backward, dynamic, dense)
        return {**tuned, "BLOCK_C": max(tuned["BLOCK_C"], hs_p)}

    lr._conv_blocks, lr._grad_blocks, lr._split_blocks, hw._row_blocks = (
        conv_blocks, grad_blocks, split_blocks, row_blocks)


def print_kernel_resources() -> None:
    """Registers and spills of every compiled specialisation (the compiler's resource report)."""
    from isoflop.kernels import triton_headwise as hw
    from isoflop.kernels import triton_lowrank as lr

    for jit_fn in (lr._lowrank_conv_kernel, lr._lowrank_filter_grad_kernel, lr._lowrank_dz_kernel,
                   lr._lowrank_du_kernel, hw._headwise_fwd_kernel, hw._headwise_bwd_kernel,
                   hw.rows._rows_fwd_kernel, hw.rows._rows_bwd_kernel):
        for cache in getattr(jit_fn, "device_caches", {}).values():
            for key, compiled in cache[0].items():
                consts = {k: v for k, v in getattr(compiled.src, "constants", {}).items() if "BLOCK" in str(k) or "W" == str(k)}
                print(f"  {jit_fn.fn.__name__}: regs {compiled.n_regs} spills {compiled.n_spills} "
                      f"warps {compiled.metadata.num_warps} stages {compiled.metadata.num_stages} "
                      f"smem {compiled.metadata.shared} {consts}")


def print_table(rows: list[dict], bw: float) -> None:
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s (read + write); times are medians in us; "
          "%cp = floor time / measured time (floor = fewest bytes at the copy rate)")
    head = (f"{'case':28s} {'fwd':>7s} {'%cp':>4s} {'bwd':>7s} {'%cp':>4s} {'f+b':>7s} {'floor':>6s} "
            f"{'GB/s':>6s} {'%cp':>4s} {'x ref':>6s} {'x cmp':>6s}")
    print(head)
    for r in rows:
        cmp = f"{r['compiled_fb_us'] / r['fb_us']:6.1f}" if "compiled_fb_us" in r else f"{'-':>6s}"
        print(f"{r['case']:28s} {r['fwd_us']:7.1f} {r['fwd_pct_copy']:4.0f} {r['bwd_us']:7.1f} {r['bwd_pct_copy']:4.0f} "
              f"{r['fb_us']:7.1f} {r['fb_floor_us']:6.1f} {r['fb_GBps']:6.0f} {r['fb_pct_copy']:4.0f} "
              f"{r['ref_fb_us'] / r['fb_us']:6.1f} {cmp}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--paper", action="store_true", help="only the paper's shape")
    parser.add_argument("--sweep", action="store_true", help="also time block configurations")
    parser.add_argument("--sweep-only", default="",
                        help="comma-separated name prefixes of the sweep's plans (e.g. static,headwise)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; the kernels are benchmarked on a GPU "
              "(their correctness on CPU is covered by tests/test_kernels_triton.py under TRITON_INTERPRET=1).")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    bw = copy_bandwidth(args.quick)
    results: dict = {"copy_bandwidth_Bps": bw}
    if args.sweep:
        results["tuned"] = sweep(args.quick, [p for p in args.sweep_only.split(",") if p])
        print(f"  tuned: {results['tuned']}", flush=True)
        install_tuned(results["tuned"])
        try:
            print_kernel_resources()
        except Exception as error:  # the report's layout differs between Triton versions
            print(f"  (no resource report: {type(error).__name__}: {error})")
    cases = [c for c in CASES if "paper" in c.name] if args.paper else CASES
    rows = []
    for case in cases:
        rows.append(run_case(case, bw, args.quick, compile_ref=not args.no_compile))
        print(f"  done {case.name}: fwd {rows[-1]['fwd_us']:.1f} us, bwd {rows[-1]['bwd_us']:.1f} us, "
              f"fwd+bwd {rows[-1]['fb_us']:.1f} us", flush=True)
    results["cases"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_table(rows, bw)
    print_checks(target_checks(rows), torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
