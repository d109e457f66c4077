"""Triton kernels for the head-wise dynamic short convolution, the static one and explicit filters.

    y[t, d] = residual * x[t, d] + sum_k (w[t, k, d // hs] + s[k, d]) * x[t-k, d]

Head-wise filters w [B, T, W, H] carry one tap per group ("head") of hs consecutive channels; hs = 1
is a full per-channel filter [B, T, W, D] (reference.short_conv), and no w at all is the static conv.
Nothing here needs the matrix units: both passes are pure streaming.

Channel tiles always hold whole heads: a tile is HEADS = BLOCK_C / HS_P heads of HS_P lanes each
(HS_P = hs rounded up to a power of two; lanes >= hs are masked), so for a power-of-two hs a tile is
simply BLOCK_C consecutive channels. Because a tile holds whole heads, the filter gradient
dw[t, k, h] = sum_{d in h} dy[t, d] * x[t-k, d] is complete inside one program and is written
directly; only the static filter's gradient needs partial sums, one row per program, reduced in
a fixed order afterwards (deterministic, no float atomics). The forward is one program per
(time tile, channel tile, batch), with no loops, so every program's loads are in flight at once; the
backward's program may walk CHUNK consecutive time tiles (see _headwise_bwd_kernel).

Filters of up to 4 taps (the paper's W=4 included) take the row-walking kernels of
triton_headwise_rows.py instead, which load each row once rather than once per tap (KERNELS.md, v9);
the tiled kernels here serve 5 to 8 taps. `headwise_forward` / `headwise_backward` pick the path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from isoflop.backends import BackendChoice
from isoflop.kernels import gluon_headwise
from isoflop.kernels import triton_headwise_rows as rows
from isoflop.kernels.gluon_common import gluon_hopper, takes_gluon
from isoflop.kernels.reference import rotate_channels
from isoflop.kernels.triton_common import interpreting, next_pow2, seq_pos, sum_partials, tile_channels

# Which kernel the head-wise forward and backward run: "triton" (the row walk), "gluon" (the same walk
# fed by TMA on Hopper, gluon_headwise; an error where it cannot run), or "auto" (gluon wherever it
# runs). Static convs (no dynamic taps) take the Gluon walk under "auto" only where it rotates their
# output by RoPE (static q/k/v convs: _gluon_walk), else the Triton walk. Read once each from
# ISOFLOP_HEADWISE_FWD and ISOFLOP_HEADWISE_BWD.
FORWARD_VARIANT = BackendChoice("ISOFLOP_HEADWISE_FWD", ("auto", "triton", "gluon"), "head-wise forward variant")
BACKWARD_VARIANT = BackendChoice("ISOFLOP_HEADWISE_BWD", ("auto", "triton", "gluon"), "head-wise backward variant")
# Whether a conv whose output is rotated by RoPE (q's or k's) is rotated inside the Gluon walks ("auto":
# the forward rotates each row of y before it stores it, the backward turns each row of dy back as it
# reads it, where they run and take the tables: rope_fuses) or by ops of their own around the kernels
# ("off", what the model's own RoPE costs). Read once from ISOFLOP_HEADWISE_ROPE.
ROPE = BackendChoice("ISOFLOP_HEADWISE_ROPE", ("auto", "off"), "head-wise conv's RoPE fusion setting")


def rope_fuses(x: Tensor, w: Tensor | None, rope: tuple[Tensor, Tensor], packed: bool, width: int,
               rope_channels: int | None = None) -> bool:
    """Whether headwise_forward and headwise_backward would both rotate by rope = (cos, sin) inside
    the Gluon walks (w None: the static conv, of `width` taps; its first rope_channels channels,
    default all): ROPE and both variants allow it, and the walks take these shapes, types and
    tables (gluon_headwise.shapes_missing and cannot_rotate: what torch.compile can see while it
    traces this; where addresses or strides then do not fit, the calls rotate by ops instead, the
    same result)."""
    if ROPE.get() == "off" or "triton" in (FORWARD_VARIANT.get(), BACKWARD_VARIANT.get()) or not x.is_cuda:
        return False
    if gluon_headwise.shapes_missing(x, w, packed, width) or gluon_headwise.cannot_rotate(x, w, rope, rope_channels):
        return False
    return gluon_hopper(x.device.index)


def _walk_rotates(x: Tensor, w: Tensor | None, rope: tuple[Tensor, Tensor], rope_channels: int | None) -> bool:
    """Whether a call that takes the Gluon walk (_gluon_walk) rotates by rope inside it (ROPE)."""
    return ROPE.get() == "auto" and gluon_headwise.cannot_rotate(x, w, rope, rope_channels) is None


def _gluon_walk(variant: BackendChoice, dy: Tensor | None, x: Tensor, w: Tensor | None, pos: Tensor | None,
                blocks: dict | None, width: int, rotates: bool) -> bool:
    """Whether this call takes gluon_headwise's walk (dy None: the forward): no blocks forced on the
    Triton kernels, and the variant takes it (gluon_common.takes_gluon). The static conv (w None)
    takes it under "auto" only where the walk would rotate its output (`rotates`: _walk_rotates;
    training point 29: the saved RoPE pass; elsewhere the Triton walk, pipelined since v11, stays)."""
    if blocks is not None:
        return False
    if w is None and variant.get() == "auto" and not rotates:
        return False
    return takes_gluon(variant, lambda: gluon_headwise.cannot_run(dy, x, w, pos, width))


@triton.jit
def _tap(w_ptr, s_ptr, row, row_ok, h, d, k: tl.constexpr, D, H, WS, W: tl.constexpr,
         HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, RESIDUAL: tl.constexpr,
         BLOCK_T: tl.constexpr, HEADS: tl.constexpr):
    """Effective tap k at rows `row` (float32, broadcastable to [BLOCK_T, HEADS, HS_P]): the head's
    dynamic value (loaded once per head, not per channel; w's rows WS apart) + static + residual."""
    tap = tl.zeros([BLOCK_T, HEADS, 1], dtype=tl.float32)
    if HAS_DYN:
        w_ok = row_ok[:, None] & (h < H)[None, :]
        w = tl.load(w_ptr + row[:, None] * WS + k * H + h[None, :], mask=w_ok, other=0.0)
        tap += w.to(tl.float32)[:, :, None]
    if HAS_STATIC:
        tap = tap + tl.load(s_ptr + k * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :, :]
    if RESIDUAL:
        if k == 0:
            tap += 1.0
    return tap


@triton.jit
def _rows(pos_ptr, T, b, tile, BLOCK_T: tl.constexpr, HAS_POS: tl.constexpr):
    """Time tile `tile` of sequence b: rows t (with mask, positions in their sequences for packed
    inputs, and the 64-bit row index into [B * T])."""
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    p = seq_pos(pos_ptr, t, t_ok, HAS_POS)
    return t, t_ok, p, (b * T + t).to(tl.int64)


@triton.jit
def _headwise_fwd_kernel(
    x_ptr, w_ptr, s_ptr, pos_ptr, y_ptr,
    T, D, H, X_STRIDE, W_STRIDE,
    W: tl.constexpr, HS: tl.constexpr, HS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr,
    DENSE: tl.constexpr = True,
):
    """x's rows X_STRIDE apart and w's W_STRIDE, or D and W * H when DENSE (rows._strides)."""
    HEADS: tl.constexpr = BLOCK_C // HS_P
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h, d, c_ok = tile_channels(pid_c, H, HS, HS_P, HEADS)
    XS, WS = rows._strides(D, H, X_STRIDE, W_STRIDE, W, DENSE)
    t, t_ok, p, row = _rows(pos_ptr, T, b, pid_t, BLOCK_T, HAS_POS)
    x_ptrs = x_ptr + row[:, None, None] * XS + d[None, :, :]
    acc = tl.zeros([BLOCK_T, HEADS, HS_P], dtype=tl.float32)
    for k in tl.static_range(W):
        lag_ok = t_ok & (p >= k) & (t >= k)
        xk = tl.load(x_ptrs - k * XS, mask=lag_ok[:, None, None] & c_ok[None, :, :], other=0.0)
        tap = _tap(w_ptr, s_ptr, row, t_ok, h, d, k, D, H, WS, W, HAS_DYN, HAS_STATIC, RESIDUAL, BLOCK_T, HEADS)
        acc += tap * xk.to(tl.float32)
    y_ptrs = y_ptr + row[:, None, None] * D + d[None, :, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None, None] & c_ok[None, :, :])


@triton.jit
def _headwise_bwd_kernel(
    x_ptr, w_ptr, s_ptr, pos_ptr, dy_ptr,
    dx_ptr, dw_ptr, ds_part_ptr,
    T, D, H, X_STRIDE, W_STRIDE,
    W: tl.constexpr, HS: tl.constexpr, HS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr,
    DENSE: tl.constexpr = True,
):
    """One program per (CHUNK consecutive time tiles, channel tile, batch), tile after tile. The
    static filter's gradient is accumulated element-wise over the chunk and summed over rows once
    at its end: a row sum per tap and tile costs a cross-warp reduction (shared memory and a
    barrier) that stalls the tile's loads, so CHUNK > 1 pays it once per CHUNK tiles. x and w may
    be strided views as in the forward; dy, dx and dw are contiguous."""
    HEADS: tl.constexpr = BLOCK_C // HS_P
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h, d, c_ok = tile_channels(pid_c, H, HS, HS_P, HEADS)
    XS, WS = rows._strides(D, H, X_STRIDE, W_STRIDE, W, DENSE)
    # The static filter's gradient, per tap, accumulated element-wise over the chunk.
    acc = ()
    for k in tl.static_range(W):
        acc = acc + (tl.zeros([BLOCK_T, HEADS, HS_P], dtype=tl.float32),)
    for i in range(CHUNK):
        t, t_ok, p, row = _rows(pos_ptr, T, b, pid_t * CHUNK + i, BLOCK_T, HAS_POS)
        tile_ok = t_ok[:, None, None] & c_ok[None, :, :]
        offsets = row[:, None, None] * D + d[None, :, :]
        x_offsets = row[:, None, None] * XS + d[None, :, :]
        # dy[t] and x[t] first, so their latency overlaps the shifted loads that mostly hit their lines.
        dy0 = tl.load(dy_ptr + offsets, mask=tile_ok, other=0.0)
        x0 = tl.load(x_ptr + x_offsets, mask=tile_ok, other=0.0)

        # dx: the taps that read x[t] sit at later positions t+k.
        dx = tl.zeros([BLOCK_T, HEADS, HS_P], dtype=tl.float32)
        for k in tl.static_range(W):
            if k == 0:
                dyk = dy0
                lead_ok = t_ok
            else:
                lead_ok = t_ok & (t + k < T)
                lead_ok = lead_ok & (seq_pos(pos_ptr, t + k, lead_ok, HAS_POS) >= k)
                dyk = tl.load(dy_ptr + offsets + k * D, mask=lead_ok[:, None, None] & c_ok[None, :, :], other=0.0)
            tap = _tap(w_ptr, s_ptr, row + k, lead_ok, h, d, k, D, H, WS, W, HAS_DYN, HAS_STATIC, RESIDUAL,
                       BLOCK_T, HEADS)
            dx += tap * dyk.to(tl.float32)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)

        # Filter gradients df = dy[t] * x[t-k]: dw summed over each head's lanes, written directly;
        # the static filter's accumulated for the chunk's partial row.
        acc_next = ()
        for k in tl.static_range(W):
            if k == 0:
                xk = x0
            else:
                lag_ok = t_ok & (p >= k) & (t >= k)
                xk = tl.load(x_ptr + x_offsets - k * XS, mask=lag_ok[:, None, None] & c_ok[None, :, :], other=0.0)
            df = dy0.to(tl.float32) * xk.to(tl.float32)
            if HAS_DYN:
                dw_ptrs = dw_ptr + row[:, None] * (W * H) + k * H + h[None, :]
                tl.store(dw_ptrs, tl.sum(df, axis=2).to(dw_ptr.dtype.element_ty), mask=t_ok[:, None] & (h < H)[None, :])
            if HAS_STATIC:
                acc_next = acc_next + (acc[k] + df,)
        if HAS_STATIC:
            acc = acc_next
    if HAS_STATIC:
        partial_row = (b * tl.num_programs(0) + pid_t).to(tl.int64)  # (b, chunk)
        ds_ptr = ds_part_ptr + partial_row * W * D
        for k in tl.static_range(W):
            tl.store(ds_ptr + k * D + d, tl.sum(acc[k], axis=0), mask=c_ok)


def _blocks(D: int, hs_p: int, backward: bool, dynamic: bool = True) -> dict:
    """Block sizes, warps and (backward) CHUNK of the tiled kernels; a channel tile holds at least
    one whole (padded) head; dynamic=False is the static conv. Picked by `benchmarks/kernels.py
    --sweep` on an H200 at W=4 before v9; since then these kernels serve 5 to 8 taps, not re-tuned
    (see benchmarks/KERNELS.md)."""
    if interpreting():  # CHUNK 2: the interpreter tests walk the backward's chunk loop
        return {"BLOCK_T": 8, "BLOCK_C": max(8, hs_p), "num_warps": 1} | ({"CHUNK": 2} if backward else {})
    # Backward: chunked (CHUNK tiles per program); at the paper's shape this took the static conv's
    # backward from 224 to 118 us, hs=16's from 233 to 168 and hs=1's from 284 to 236 (KERNELS.md, v6).
    # The static one keeps 16-row tiles: 32 rows were 7% faster on Triton 3.6 but spill on 3.9.
    channels = next_pow2(D)
    if not dynamic:  # the static conv
        if backward:
            return {"BLOCK_T": 16, "BLOCK_C": min(64, channels), "num_warps": 2, "num_stages": 1, "CHUNK": 32}
        return {"BLOCK_T": 16, "BLOCK_C": min(128, channels), "num_warps": 4, "num_stages": 1}
    if backward and hs_p == 1:
        return {"BLOCK_T": 8, "BLOCK_C": min(128, channels), "num_warps": 2, "num_stages": 1, "CHUNK": 16}
    if backward:
        return {"BLOCK_T": 8, "BLOCK_C": max(hs_p, min(128, channels)), "num_warps": 4, "num_stages": 1,
                "CHUNK": 32}
    if hs_p == 1:
        return {"BLOCK_T": 32, "BLOCK_C": min(128, channels), "num_warps": 4}
    return {"BLOCK_T": 16, "BLOCK_C": max(hs_p, min(256, channels)), "num_warps": 4}


def _row_blocks(T: int, D: int, hs_p: int, backward: bool, dynamic: bool = True, dense: bool = True) -> dict:
    """Channels per program, rows per program, warps, pipeline stages (backward) and register caps
    of the row-walking kernels: 8 channels per thread (16-byte loads) for the static conv's forward
    and heads of 8+ channels, 4 for narrower heads. Picked side by side on an H200 at the paper's
    shape and the 300M model's (KERNELS.md, v9, v11 and v24):
    - the static conv's backward walks 4 stages deep with 4 channels per thread and 256 rows (128
      for sequences under 1024 tokens, to keep enough programs);
    - the head-wise backward of heads of 8+ channels walks 3 stages deep, 128 rows (64 under 1024
      tokens); hs=1's takes 256 rows (128 under 1024 tokens) and no stages, hs=2..4's 64 rows;
    - forwards take 64 rows, hs=1's 128 and hs=2..4's 32, whose dense forward is capped at 64
      registers (72 at hs=2: there 64 spills) to keep 16 programs per multiprocessor (hs=4: 80
      registers uncapped, 59.6 -> 66.7 us; capped 57.5).

    The forward on views (not dense: x's row stride is a second runtime integer) compiles to 130
    registers at hs=16, where 128 is the most that lets 8 programs of 2 warps share a
    multiprocessor; with 7, the paper's and the 300M conv's 1,024 programs take a second wave (hs=16
    forward 45.2 -> 61.9 us; KERNELS.md, training point 14). Capped at 128, it needs 123 and spills
    nothing (offline, Triton 3.6: benchmarks/kernel_resources.py --views). Narrower tiles on views
    keep no cap (hs=4: 95 registers, 107 with one: its forward on views 63.9 -> 66.7 us)."""
    long_rows = T >= 1024
    if interpreting():  # 5 rows: chunk edges fall inside the walk's 4-row groups
        pipelined = backward and (not dynamic or hs_p >= 8)
        return {"BLOCK_C": max(8, hs_p), "ROWS": 5, "num_warps": 1} | ({"STAGES": 3} if pipelined else {})
    if backward and not dynamic:
        return {"BLOCK_C": min(256, next_pow2(D)), "ROWS": 256 if long_rows else 128, "num_warps": 2, "STAGES": 4}
    block_c = 512 if not dynamic or hs_p >= 8 else 256
    blocks = {"BLOCK_C": max(hs_p, min(block_c, next_pow2(D))), "ROWS": 64, "num_warps": 2}
    if backward:
        if dynamic and hs_p >= 8:
            return blocks | {"ROWS": 128 if long_rows else 64, "STAGES": 3}
        if dynamic and hs_p == 1:
            return blocks | {"ROWS": 256 if long_rows else 128, "STAGES": 1}
        return blocks | {"STAGES": 1}
    if dynamic and hs_p == 1:
        return blocks | {"ROWS": 128}
    if dynamic and hs_p <= 4:
        blocks["ROWS"] = 32
        return blocks | ({"maxnreg": 64 if hs_p == 4 else 72} if dense else {})
    if dense or blocks["BLOCK_C"] < 512:  # a cap only adds registers to the narrower tiles
        return blocks
    return blocks | {"maxnreg": 128}


def _takes_rows(width: int, blocks: dict | None) -> bool:
    """The row-walking kernels serve up to 4 taps; caller-given blocks name their kernel by their
    keys (ROWS: row-walking, BLOCK_T: tiled)."""
    return width <= rows.MAX_WIDTH and (blocks is None or "ROWS" in blocks)


def _meta(x: Tensor, w: Tensor | None, static: Tensor | None, pos: Tensor | None, width: int) -> dict:
    hs = x.shape[-1] // w.shape[-1] if w is not None else 1
    return {
        "W": width, "HS": hs, "HS_P": next_pow2(hs), "HAS_DYN": w is not None,
        "HAS_STATIC": static is not None, "HAS_POS": pos is not None, "DENSE": rows.dense(x, w),
    }


def _grid(T: int, H: int, B: int, hs_p: int, blocks: dict) -> tuple[int, int, int]:
    rows_per_program = blocks["BLOCK_T"] * blocks.get("CHUNK", 1)
    return triton.cdiv(T, rows_per_program), triton.cdiv(H, blocks["BLOCK_C"] // hs_p), B


def headwise_forward(
    x: Tensor, w: Tensor | None, static: Tensor | None, residual: bool, pos: Tensor | None,
    blocks: dict | None = None, rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """y [B, T, D] (contiguous) for x [B, T, D] and w [B, T, W, H] or None with evenly strided rows
    (rows.row_strides: views into a fused projection are read in place), static [W, D] or None
    (not both None), pos int32 [T] (packed sequences) or None. `blocks` overrides block sizes
    (benchmarks). rope: (cos, sin), float32 contiguous [T, head_dim / 2] of positions 0 to T-1: y's
    first rope_channels channels (default: all) come out rotated (reference.rotate_channels), by the
    Gluon walk where it can (_walk_rotates), else by ops after the kernel."""
    B, T, D = x.shape
    width = w.shape[2] if w is not None else static.shape[0]
    rotates = rope is not None and _walk_rotates(x, w, rope, rope_channels)
    walk = _gluon_walk(FORWARD_VARIANT, None, x, w, pos, blocks, width, rotates)
    if rope is not None and not (walk and rotates):
        return rotate_channels(headwise_forward(x, w, static, residual, pos, blocks), rope, rope_channels)
    if walk:
        return gluon_headwise.forward(x, w, static, residual, rope=rope, rope_channels=rope_channels)
    meta = _meta(x, w, static, pos, width)
    if _takes_rows(width, blocks):
        blocks = blocks or _row_blocks(T, D, meta["HS_P"], backward=False, dynamic=w is not None,
                                       dense=meta["DENSE"])
        return rows.rows_forward(x, w, static, pos, meta | {"RESIDUAL": residual}, blocks)
    blocks = blocks or _blocks(D, meta["HS_P"], backward=False, dynamic=w is not None)
    H = D // meta["HS"]
    y = x.new_empty(x.shape)
    _headwise_fwd_kernel[_grid(T, H, B, meta["HS_P"], blocks)](
        x, w if w is not None else x, static if static is not None else x, pos if pos is not None else x, y,
        T, D, H, *rows.row_strides(x, w), RESIDUAL=residual, **meta, **blocks,
    )
    return y


def headwise_backward(
    dy: Tensor, x: Tensor, w: Tensor | None, static: Tensor | None, residual: bool,
    pos: Tensor | None, blocks: dict | None = None, out: tuple[Tensor, Tensor] | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx, dw or None, dstatic or None), each contiguous and in its input's dtype; dy contiguous,
    x and w as in headwise_forward. out: (dx, dw) views to write them into instead (columns of one
    fused projection's gradient, ops.headwise_projected_backward): the Gluon walk stores into them
    in place, the Triton kernels' results are copied into them. rope, rope_channels: as
    headwise_forward takes them, when dy is the gradient of the rotated output: dy is turned back
    first (the rotation's gradient), by the Gluon walk as it reads it where it can, else by ops."""
    width = w.shape[2] if w is not None else static.shape[0]
    rotates = rope is not None and _walk_rotates(x, w, rope, rope_channels)
    walk = _gluon_walk(BACKWARD_VARIANT, dy, x, w, pos, blocks, width, rotates)
    if rope is not None and not (walk and rotates):  # (dy then a new tensor: asked again)
        return headwise_backward(rotate_channels(dy, rope, rope_channels, inverse=True), x, w, static, residual, pos,
                                 blocks, out)
    if out is not None:
        if walk and gluon_headwise.stores_into(out, x, w):
            return gluon_headwise.backward(dy, x, w, static, residual, out=out, rope=rope)
        dx, dw, ds = headwise_backward(dy, x, w, static, residual, pos, blocks, rope=rope)
        return out[0].copy_(dx), out[1].copy_(dw), ds
    B, T, D = x.shape
    if walk:
        return gluon_headwise.backward(dy, x, w, static, residual, rope=rope, rope_channels=rope_channels)
    meta = _meta(x, w, static, pos, width)
    if _takes_rows(width, blocks):
        blocks = blocks or _row_blocks(T, D, meta["HS_P"], backward=True, dynamic=w is not None)
        return rows.rows_backward(dy, x, w, static, pos, meta | {"RESIDUAL": residual}, blocks)
    blocks = {"CHUNK": 1} | (blocks or _blocks(D, meta["HS_P"], backward=True, dynamic=w is not None))
    H = D // meta["HS"]
    grid = _grid(T, H, B, meta["HS_P"], blocks)
    dx = x.new_empty(x.shape)
    dw = w.new_empty(w.shape) if w is not None else None
    f32 = dict(device=x.device, dtype=torch.float32)
    ds_part = torch.empty(B * grid[0], width * D, **f32) if static is not None else None
    _headwise_bwd_kernel[grid](
        x, w if w is not None else x, static if static is not None else x, pos if pos is not None else x, dy,
        dx, dw if dw is not None else dx, ds_part if ds_part is not None else dx,
        T, D, H, *rows.row_strides(x, w), RESIDUAL=residual, **meta, **blocks,
    )
    ds = sum_partials(ds_part, static.dtype).view(width, D) if static is not None else None
    return dx, dw, ds
