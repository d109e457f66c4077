"""Registers, spills, shared memory and layout conversions of the conv kernels, compiled offline.

    python benchmarks/kernel_resources.py [--arch 90] [--dtype bf16] [--views]

Compiles each Triton kernel at the paper's shape (bf16, W=4, R=16; hs=16, hs=1, static) with the block
sizes the dispatch picks, for an sm_<arch> target, with no GPU: Triton's bundled ptxas builds the
cubin and cuobjdump reads its resource usage. Timings need the GPU (benchmarks/kernels.py); this
shows, in seconds and on any machine, what a code change does to what usually explains them:
register pressure (occupancy; 255 is the cap), the per-thread stack that spills and unrolled
arrays land in, shared memory, how many layout conversions
the compiler inserted (each a round trip through shared memory) and which matrix instructions
tl.dot became (wgmma: Hopper warp-group MMA; mma: the older warp-level one).

Arguments are specialised as Triton's launcher does at run time: pointers (torch allocations) are
16-byte aligned, integer arguments divisible by 16 say so (T, D, R at the paper's shape; chunk_t, a
multiple of BLOCK_T) and those equal to 1 become constants. Without that the compiler cannot prove
rows contiguous and aligned, loads are not vectorised, and registers and spills come out far above
what the GPU runs (the first reading in KERNELS.md had that error).

The local Triton may differ from the GPU machine's (registers move between versions), so compare
a change against its parent with the same Triton.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 = its default
os.environ.pop("TRITON_INTERPRET", None)  # compiling is the point: never the interpreter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

try:
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # no Gluon: gluon_lowrank has no kernel to compile either
    GluonASTSource = None

from isoflop.kernels import (
    gluon_common,
    gluon_headwise,
    gluon_lowrank,
    gluon_lowrank_conv,
    gluon_lowrank_swiglu,
    triton_headwise,
    triton_lowrank,
)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
BATCH, SEQ, D_MODEL, R, W = 4, 4096, 2048, 16, 4
# Integer arguments' values at the paper's shape (chunk_t: any multiple of BLOCK_T); others
# (chunks_per_seq) compile as plain integers.
INT_ARGS = {"B": BATCH, "T": SEQ, "D": D_MODEL, "R": R, "chunk_t": 16,
            "X_STRIDE": D_MODEL, "Z_STRIDE": R, "D_GROUP": D_MODEL,
            "XG_STRIDE": D_MODEL, "XU_STRIDE": D_MODEL}  # low-rank: contiguous, one group
# --views: the head-wise and static kernels' path for inputs read in place from a fused q/k/v +
# hs=16 generators' projection (DENSE off; rows this many elements apart, as runtime integers).
VIEW_STRIDE = 3 * D_MODEL + 3 * W * (D_MODEL // 16)
DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16}
# Pointer arguments that are not activations: their element types.
POINTER_TYPES = {"pos_ptr": "*i32", "dz_part_ptr": "*fp32", "du_part_ptr": "*fp32", "ds_part_ptr": "*fp32",
                 "cos_ptr": "*fp32", "sin_ptr": "*fp32"}


@dataclass(frozen=True)
class Case:
    name: str
    kernel: triton.runtime.jit.JITFunction
    constexprs: dict
    options: dict
    ints: dict = field(default_factory=dict)  # this kernel's own integer arguments (over INT_ARGS)
    gluon: bool = False  # a Gluon kernel, whose *_desc arguments are these TMA descriptors:
    descriptors: dict = field(default_factory=dict)  # name -> TensorDescriptor (only its type matters)


def cases(dtype: tl.dtype, views: bool = False) -> list[Case]:
    """Each kernel with the constants and block sizes the dispatch uses at the paper's shape; with
    `views`, the head-wise and static kernels as they read views (VIEW_STRIDE)."""
    lowrank = dict(W=W, R_P=R, HAS_STATIC=True, HAS_POS=False, DOT_DTYPE=dtype, FP32_DOT=False)
    fwd_blocks = triton_lowrank._conv_blocks(SEQ, R, W, lead=False, fp32=False)
    dx_blocks = triton_lowrank._conv_blocks(SEQ, R, W, lead=True, fp32=False)
    # The filter-gradient kernel pads R for z's column of ones (ds from the dU product).
    grad_r_p = triton_lowrank._grad_rank(R, has_static=True)
    grad_blocks = triton_lowrank._grad_blocks(grad_r_p, W)
    split_blocks = triton_lowrank._split_blocks(R, W, fp32=False)
    found = [
        # The forward folds the static filter into the product (z gets two columns of ones), and the
        # paper's shape is whole tiles, so it masks only the lags (EVEN).
        Case("low-rank forward", triton_lowrank._lowrank_conv_kernel,
             lowrank | dict(RESIDUAL=True, LEAD=False, FOLD=True, EVEN=True, R_P=triton_lowrank._folded_rank(R)),
             fwd_blocks),
        Case("low-rank dx (lead)", triton_lowrank._lowrank_conv_kernel,
             lowrank | dict(RESIDUAL=True, LEAD=True, FOLD=False, EVEN=False), dx_blocks),
        Case("low-rank filter grads", triton_lowrank._lowrank_filter_grad_kernel,
             lowrank | {"R_P": grad_r_p, "RZ_P": lowrank["R_P"]}, grad_blocks),
        # The split candidate (ISOFLOP_LOWRANK_BWD=split): dz and dU/ds in two kernels.
        Case("low-rank dz (split)", triton_lowrank._lowrank_dz_kernel,
             {k: v for k, v in lowrank.items() if k != "HAS_STATIC"}, split_blocks["dz"]),
        Case("low-rank dU (split)", triton_lowrank._lowrank_du_kernel, lowrank, split_blocks["du"]),
    ]
    if gluon_lowrank.gluon is not None:  # its Hopper twin (the backward's "auto" there)
        tiles = gluon_lowrank.tile_descriptor(torch.empty(BATCH, SEQ, D_MODEL, dtype=_torch_dtype(dtype)))
        # Alone (two programs per multiprocessor), and with the ring the overlapped backward gives it
        # beside a dx program (triton_lowrank._overlapped_backward).
        # And beside dx turning dy back (RoPE's gradient) as it reads it.
        for name, stages, rope in (("low-rank filter grads (gluon)", gluon_lowrank.STAGES, False),
                                   ("low-rank filter grads (gluon, beside dx)", gluon_lowrank.OVERLAP_STAGES, False),
                                   ("low-rank filter grads (gluon, rope)", gluon_lowrank.OVERLAP_STAGES, True)):
            launch_regs, dz_regs = gluon_lowrank.ROPE_REGS if rope else (gluon_lowrank.LAUNCH_REGS,
                                                                         gluon_lowrank.DZ_REGS)
            found.append(Case(name, gluon_lowrank._lowrank_gluon_filter_grad_kernel,
                              {k: v for k, v in lowrank.items() if k not in ("FP32_DOT", "R_P")}
                              | {"RZ_P": lowrank["R_P"], "STAGES": stages, "ROPE": rope,
                                 "BLOCK_T": gluon_lowrank.BLOCK_T, "BLOCK_D": gluon_lowrank.BLOCK_D,
                                 "DZ_REGS": dz_regs, "LOADER_REGS": gluon_lowrank.LOADER_REGS},
                              {"num_warps": gluon_lowrank.WARPS, "maxnreg": launch_regs}, gluon=True,
                              descriptors={"x_desc": tiles, "dy_desc": tiles}))
    if gluon_lowrank_conv.gluon is not None:  # the conv pass in Gluon (ISOFLOP_LOWRANK_FWD, ISOFLOP_LOWRANK_DX)
        found += _gluon_lowrank_conv_cases(dtype)
    if gluon_headwise.gluon is not None:  # the head-wise walks' "auto" on Hopper
        found += _gluon_headwise_cases(dtype, head_size=16)
    # Head-wise and static: the row-walking kernels (up to 4 taps, so the paper's W=4) ...
    rows = triton_headwise.rows
    strides = {"X_STRIDE": VIEW_STRIDE, "W_STRIDE": VIEW_STRIDE} if views else {}
    row_blocks = functools.partial(triton_headwise._row_blocks, SEQ, D_MODEL, dense=not views)
    for hs in (16, 1):
        head = dict(W=W, HS=hs, HS_P=hs, HAS_DYN=True, HAS_STATIC=True, HAS_POS=False, RESIDUAL=True,
                    DENSE=not views)
        found += [
            Case(f"head-wise hs={hs} forward", rows._rows_fwd_kernel, head,
                 row_blocks(hs, backward=False), {"H": D_MODEL // hs, **strides}),
            Case(f"head-wise hs={hs} backward", rows._rows_bwd_kernel, head,
                 row_blocks(hs, backward=True), {"H": D_MODEL // hs, **strides}),
        ]
    static = dict(W=W, HS=1, HS_P=1, HAS_DYN=False, HAS_STATIC=True, HAS_POS=False, RESIDUAL=True,
                  DENSE=not views)
    found += [
        Case("static forward", rows._rows_fwd_kernel, static,
             row_blocks(1, backward=False, dynamic=False), {"H": D_MODEL, **strides}),
        Case("static backward", rows._rows_bwd_kernel, static,
             row_blocks(1, backward=True, dynamic=False), {"H": D_MODEL, **strides}),
    ]
    # ... and the tiled kernels, which serve 5 to 8 taps (here 8).
    tiled = [("head-wise hs=16", dict(head, W=8, HS=16, HS_P=16), D_MODEL // 16, True),
             ("static", dict(static, W=8), D_MODEL, False)]
    for name, consts, heads, dynamic in tiled:
        for part, kernel in (("forward", triton_headwise._headwise_fwd_kernel),
                             ("backward", triton_headwise._headwise_bwd_kernel)):
            blocks = triton_headwise._blocks(D_MODEL, consts["HS_P"], backward=part == "backward", dynamic=dynamic)
            found.append(Case(f"{name} {part} (tiled, W=8)", kernel, consts, blocks, {"H": heads, **strides}))
    return found


def _gluon_lowrank_conv_cases(dtype: tl.dtype) -> list[Case]:
    """gluon_lowrank_conv's forward and dx at the paper's shape, with the descriptors they build."""
    gc = gluon_lowrank_conv
    x = torch.empty(BATCH, SEQ, D_MODEL, dtype=_torch_dtype(dtype))
    z = torch.empty(BATCH, SEQ, R, dtype=_torch_dtype(dtype))
    runs, zs = gc._runs_descriptor(x), gc._z_descriptor(z)
    rows = gc._row_descriptor(torch.empty(SEQ, 32))  # a rope table's
    dx_descriptors = {"dy_desc": runs, "z_desc": zs, "dx_desc": runs}
    consts = dict(W=W, CHUNK=gc.CHUNK, STAGES=gc.STAGES, HAS_STATIC=True, RESIDUAL=True, DTYPE=dtype)
    forward = functools.partial(Case, kernel=gc._lowrank_gluon_fwd_kernel, options={"num_warps": gc.WARPS},
                                gluon=True, descriptors={"x_desc": runs, "z_desc": zs, "y_desc": runs})
    return [
        forward("low-rank forward (gluon)", constexprs=consts | {"ROPE": False}),
        forward("low-rank forward (gluon, rope)", constexprs=consts | {"ROPE": True}),  # y rotated (RoPE)
        Case("low-rank dx (gluon)", gc._lowrank_gluon_dx_kernel, consts | {"ROPE": False}, {"num_warps": gc.WARPS},
             gluon=True, descriptors=dx_descriptors | {"cos_desc": runs, "sin_desc": runs}),
        Case("low-rank dx (gluon, rope)", gc._lowrank_gluon_dx_kernel, consts | {"ROPE": True},  # dy turned back
             {"num_warps": gc.WARPS, "maxnreg": gc.DX_ROPE_REGS}, gluon=True, descriptors=dx_descriptors | {"cos_desc": rows, "sin_desc": rows}),
        *_gluon_swiglu_cases(runs, zs, consts),
    ]


def _gluon_swiglu_cases(runs, zs, consts: dict) -> list[Case]:
    """gluon_lowrank_swiglu's kernel (gate and up convs and their SwiGLU), writing h alone and with the
    convs' outputs (SAVE, what training takes)."""
    gs = gluon_lowrank_swiglu
    descriptors = {"xg_desc": runs, "xu_desc": runs, "zg_desc": zs, "zu_desc": zs, "h_desc": runs, "g_desc": runs,
                   "u_desc": runs}
    return [Case(f"low-rank SwiGLU {name} (gluon)", gs._lowrank_gluon_swiglu_kernel,
                 {k: v for k, v in consts.items() if k != "STAGES"} | {"STAGES": gs.STAGES, "SAVE": save},
                 {"num_warps": gluon_lowrank_conv.WARPS}, gluon=True, descriptors=descriptors)
            for name, save in (("forward", False), ("forward, saving g' and u'", True))]


def _gluon_headwise_cases(dtype: tl.dtype, head_size: int) -> list[Case]:
    """gluon_headwise's forward and backward at the paper's shape, with the descriptors they build
    (taken from CPU tensors: only their types matter); and the static conv's walks (no dynamic taps)
    rotating by RoPE, as the static q/k/v convs run them."""
    gh, H = gluon_headwise, D_MODEL // head_size
    heads = gh.CHANNELS // head_size
    x = torch.empty(BATCH, SEQ, D_MODEL, dtype=_torch_dtype(dtype))
    w = torch.empty(BATCH, SEQ, W, H, dtype=_torch_dtype(dtype))
    rows, taps = gh._rows_descriptor(x, gh.TR), gh._taps_descriptor(w, gh.TR, heads)
    consts = dict(W=W, W_P=triton.next_power_of_2(W), HS=head_size, HEADS=heads, TR=gh.TR, HAS_STATIC=True,
                  RESIDUAL=True, DTYPE=gluon_common.gl_dtype(x), BOX=gh.BOX, NUM_WARPS=gh.WARPS, HAS_W=True,
                  RAGGED_D=False)
    walk = {"num_warps": gh.WARPS}, {"H": H}
    static = {"HS": gh.STATIC_HEAD, "HEADS": gh.CHANNELS // gh.STATIC_HEAD, "HAS_W": False}
    found = []
    # Without RoPE, and rotating y (dy turned back) by RoPE heads of 128 channels (the models' heads);
    # the static conv's also where D is an odd multiple of 256 (the 150M model's q/k/v, 2304).
    rotating = {"ROPE": True, "HALF": 64}
    for suffix, rope, kind in (("", {"ROPE": False, "HALF": head_size}, {}), (", rope", rotating, {}),
                               (", rope", rotating, static),
                               (", rope, ragged D", rotating, static | {"RAGGED_D": True})):
        name = f"head-wise hs={head_size}" if not kind else "static"
        backward_blocks = gh.ROPE_BACKWARD_BLOCKS if rope["ROPE"] else gh.BACKWARD_BLOCKS[head_size]
        found += [
            Case(f"{name} forward (gluon{suffix})", gh._headwise_gluon_fwd_kernel,
                 consts | rope | kind | {"ROWS": gh.FORWARD_ROWS, "STAGES": gh.FORWARD_STAGES}, *walk, gluon=True,
                 descriptors={"x_desc": rows, "w_desc": taps if not kind else rows}),
            Case(f"{name} backward (gluon{suffix})", gh._headwise_gluon_bwd_kernel,
                 consts | rope | kind | dict(zip(("ROWS", "STAGES"), backward_blocks)), *walk, gluon=True,
                 descriptors={"x_desc": rows, "dy_desc": rows, "w_desc": taps if not kind else rows}),
        ]
    return found


def compile_case(case: Case, arch: int, dtype_name: str):
    blocks = {k: v for k, v in case.options.items() if k.isupper()}
    options = {k: v for k, v in case.options.items() if not k.isupper()}
    constexprs = case.constexprs | blocks
    signature, attrs = {}, {}
    divisible = [["tt.divisibility", 16]]  # what the launcher passes for 16-aligned pointers and ints
    for index, name in enumerate(case.kernel.arg_names):
        value = (INT_ARGS | case.ints).get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.descriptors:
            signature[name] = mangle_type(case.descriptors[name])
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, f"*{dtype_name}")
            attrs[(index,)] = divisible
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value is not None and value % 16 == 0:
                attrs[(index,)] = divisible
    source_type = GluonASTSource if case.gluon else ASTSource
    source = source_type(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _torch_dtype(dtype: tl.dtype) -> torch.dtype:
    return {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}[dtype]


def resources(cubin: bytes, tmp: Path) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL from `cuobjdump -res-usage`."""
    tmp.write_bytes(cubin)
    out = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(tmp)], capture_output=True,
                         text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--keep", type=Path, default=None, help="also write each kernel's TTGIR here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--views", action="store_true",
                        help="the head-wise and static kernels as they read views into a fused projection")
    args = parser.parse_args(argv)
    rows = []
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}, B={BATCH} T={SEQ} D={D_MODEL} W={W} R={R}")
    head = (f"{'kernel':28s} {'blocks':34s} {'regs':>5s} {'stack B':>8s} {'local B':>8s} {'smem B':>7s} "
            f"{'converts':>8s} {'dots':>12s}")
    print(head)
    print("-" * len(head))
    tmp = Path(__file__).with_name(".kernel_resources.cubin")
    try:
        for case in cases(DTYPES[args.dtype], views=args.views):
            kernel = compile_case(case, args.arch, args.dtype)
            use = resources(kernel.asm["cubin"], tmp)
            ttgir = kernel.asm["ttgir"]
            wgmma, mma = ttgir.count("warp_group_dot "), ttgir.count("tt.dot ")
            dots = f"{wgmma} wgmma" if wgmma else f"{mma} mma" if mma else "none"
            blocks = " ".join(f"{k}={v}" for k, v in case.options.items())
            print(f"{case.name:28s} {blocks:34s} {use.get('REG', 0):5d} {use.get('STACK', 0):8d} "
                  f"{use.get('LOCAL', 0):8d} {kernel.metadata.shared:7d} "
                  f"{ttgir.count('ttg.convert_layout'):8d} {dots:>12s}")
            rows.append({"kernel": case.name, **case.options, "registers": use.get("REG", 0),
                         "stack_bytes": use.get("STACK", 0), "local_bytes": use.get("LOCAL", 0),
                         "shared_bytes": kernel.metadata.shared,
                         "layout_conversions": ttgir.count("ttg.convert_layout"), "dots": dots})
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"{case.name.replace(' ', '_')}.ttgir").write_text(ttgir)
    finally:
        tmp.unlink(missing_ok=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
