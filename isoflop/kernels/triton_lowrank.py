"""Triton kernels for the low-rank dynamic short convolution (forward and backward).

    y[t, d] = residual * x[t, d] + sum_k (f[t, k, d] + s[k, d]) * x[t-k, d],   f[t, k, :] = z[t] @ U_k

with U_k = U[:, k*D:(k+1)*D]; with z [B, T, G*R], channel group g (D/G channels) uses z's g-th R
columns, and x and z may be views with strided rows. The filters f never touch memory: each
program forms its [rows, channels] slice of f_k = z @ U_k on the matrix units (R padded to >= 16);
the residual starts the sum as x[t].

Forward: `_lowrank_conv_kernel`, one program per (CHUNK time tiles, channel tile, batch); the
lagged x mostly hit the cache lines x[t] brought in, so x comes from memory once, and the chunk
loop is software-pipelined (STAGES): the next tiles' x and z are copied into shared memory while
this tile's products run, and the matrix units read them from there directly. A tile's rows hold
its times permuted (_pair_rows) so that each thread's two accumulator rows are consecutive times
2q and 2q + 1: the lagged x then come as W + 1 pieces x[2q + 1 - j] shared by neighbouring taps,
instead of W shifted tiles, and a thread loads and converts W + 1 values of x per pair of outputs
instead of 2W (v17: the paper's forward 56.7 -> 52.7 us, dx 61.4 -> 56.3). Over whole tiles the
forward masks only the lags before a sequence's start (EVEN, v18: 53.0 -> 50.3 us). CHUNK and
STAGES fit the grid (_fill_processors, v19: small grids walk shorter chunks, grids of at most two
programs per multiprocessor 4 stages deep: 50.1 -> 48.0 us). U is
loaded once per program and stays in shared memory. In half precision the static filter rides on
the product too, as two more rows of U (its rounded head and the tail the rounding lost) met by
two columns of ones in z, so the product gives f_k + s_k with s kept to ~16 bits of mantissa;
otherwise (dx, float32) it is the product's initial value.

Backward, two kernels:
- dx[t] = residual*dy[t] + sum_k (f[t+k, k] + s[k]) * dy[t+k] is the same kernel run on dy with
  leads instead of lags (LEAD), filters recomputed from z[t+k];
- `_lowrank_filter_grad_kernel`, one program per (channel tile, time chunk), walks its chunk tile
  by tile (the next tile's x and dy loaded one iteration ahead) and folds each tap's filter
  gradient df_k[t, d] = dy[t, d] * x[t-k, d] at once into dU_k^T += df_k^T @ z (one accumulator
  per tap, kept in registers across the chunk) and dz += df_k @ U_k^T (a partial over this
  channel tile; U_k^T loaded once per program). With a static filter, z gets a column of ones
  (R padded to R + 1), so dU_k's column R is ds_k = sum_t df_k: the row sums ride on the matrix
  product (df in the product's input precision, as for dU) instead of costing W cross-warp
  reductions per tile. The dz products pad R only to their own RZ_P (no ones column).
Partials go to float32 buffers and are summed in a fixed order afterwards, all of a backward's
sums and casts in one launch (sum_partials_together), so results are bit-reproducible (no float
atomics). Splitting dx out reads x and dy once more than one fused pass would (+134 MB at the
paper's shape); the fused version measured slower (registers spilled), see benchmarks/KERNELS.md.

On Hopper the filter gradients run as the "gluon" variant where it takes the inputs and sequences
are not packed (`gluon_lowrank`: the same algorithm and bit-identical results, its tiles fed by TMA
and its products asynchronous, 100 -> 67 us at the paper's shape); "fused" forces the Triton kernel.
There the forward and dx run in Gluon too, where they take the inputs (`gluon_lowrank_conv`, with
channels along the product's M: FORWARD_VARIANT, DX_VARIANT), and where both Gluon kernels of the
backward run and their grids fit, they run side by side on two streams (OVERLAP,
_overlapped_backward).

The "split" variant (what "auto" takes for the widest filters, see _auto_variant; forced by
ISOFLOP_LOWRANK_BWD=split or variant="split") computes the filter gradients in two kernels with
one accumulator each, so neither spills:
- `_lowrank_dz_kernel`, one program per (time tile, batch), walks all channel tiles and taps and
  writes dz[t] = sum_k (dy[t] * x[t-k]) @ U_k^T directly (no partials over channel tiles);
- `_lowrank_du_kernel`, one program per (tap, channel tile, time chunk), tap fastest so the W
  programs reading the same x and dy tiles run together and share them through L2; it writes
  per-chunk partials of dU_k and ds_k, summed in a fixed order as above.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from isoflop.backends import BackendChoice
from isoflop.kernels import gluon_lowrank, gluon_lowrank_conv
from isoflop.kernels.gluon_common import gluon_hopper, takes_gluon
from isoflop.kernels.reference import rotate_channels
from isoflop.kernels.triton_common import (
    dot_dtype,
    interpreting,
    mma,
    next_pow2,
    processor_count,
    seq_pos,
    side_by_side,
    sum_partials_together,
    time_chunks,
    wave_fill,
)

# Which filter-gradient kernels the backward runs: "fused" (one Triton kernel), "gluon" (the same on
# Hopper in Gluon, gluon_lowrank), "split" (dz and dU in separate kernels), or "auto" (gluon where it
# runs, sequences unpacked; else fused or split by _auto_variant). Read once from ISOFLOP_LOWRANK_BWD.
BACKWARD_VARIANT = BackendChoice("ISOFLOP_LOWRANK_BWD", ("auto", "fused", "gluon", "split"),
                                 "low-rank backward variant")
# Which kernels the conv pass runs, forward and dx: "triton" (_lowrank_conv_kernel, dx with leads),
# "gluon" (gluon_lowrank_conv on Hopper: channels along the product's M, lags and leads in registers;
# forward 41.5 against 47.5 us, dx 44.1 against 57.3 at the paper's shape, KERNELS.md v27-v28), or
# "auto": gluon where it runs (Hopper, half types, R <= 16, W <= 4, T a multiple of 64, unpacked),
# else triton. v27 kept the forward's "auto" on Triton because the 150M all-linear model once trained
# slower with it; v28 found that slowdown in every kernel combination, Triton's included, when the
# combinations alternate round by round in one process (that step is sometimes ~20 ms longer), so it
# was that step's spread, not the kernel. Read once from ISOFLOP_LOWRANK_FWD and ISOFLOP_LOWRANK_DX.
FORWARD_VARIANT = BackendChoice("ISOFLOP_LOWRANK_FWD", ("auto", "triton", "gluon"), "low-rank forward variant")
DX_VARIANT = BackendChoice("ISOFLOP_LOWRANK_DX", ("auto", "triton", "gluon"), "low-rank dx variant")
# Whether the backward may run dx and the filter gradients side by side ("auto"; "off": one after the
# other), where both run in Gluon and each fits one program per multiprocessor (_overlapped_backward).
# Read once from ISOFLOP_LOWRANK_OVERLAP.
OVERLAP = BackendChoice("ISOFLOP_LOWRANK_OVERLAP", ("auto", "off"), "low-rank backward overlap setting")
# Whether a conv that rotates its output (rope) does so in the Gluon forward's epilogue ("auto", where
# that kernel runs and heads are its 64-channel tiles: rope_fuses) or in ops of its own after the
# kernel ("off", what the model's own RoPE costs). With "auto" the backward turns dy back inside its
# kernels too, where it runs them side by side (_overlapped_backward); "forward" fuses the forward's
# rotation only, and the backward's is ops before the kernels (v31-v32). Read once from
# ISOFLOP_LOWRANK_ROPE.
ROPE = BackendChoice("ISOFLOP_LOWRANK_ROPE", ("auto", "forward", "off"), "low-rank conv's RoPE fusion setting")


@triton.jit
def _tap_u(u_ptr, s_ptr, r, r_ok, d, d_ok, D, R, k: tl.constexpr, W: tl.constexpr, FOLD: tl.constexpr,
           DOT_DTYPE: tl.constexpr):
    """U_k [R_P, BLOCK_D] in the product's dtype. With FOLD, rows R and R + 1 hold the static filter
    s_k split into a half-precision head and the remainder it lost (s = head + tail to ~16 bits of
    mantissa), which z's two columns of ones pick up: the product then yields f_k + s_k."""
    u = tl.load(u_ptr + r[:, None] * (W * D) + k * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    u = u.to(DOT_DTYPE)
    if FOLD:
        s_k = _tap_s(s_ptr, d, d_ok, D, k)
        head = s_k.to(DOT_DTYPE)
        tail = (s_k - head.to(tl.float32)).to(DOT_DTYPE)
        u = tl.where((r == R)[:, None], head[None, :], u)
        u = tl.where((r == R + 1)[:, None], tail[None, :], u)
    return u


@triton.jit
def _tap_s(s_ptr, d, d_ok, D, k: tl.constexpr):
    """Static tap s_k [BLOCK_D] in float32."""
    return tl.load(s_ptr + k * D + d, mask=d_ok, other=0.0).to(tl.float32)


@triton.jit
def _walk_tap(u_ptr, s_ptr, r, r_ok, d, d_ok, D, R, k: tl.constexpr, W: tl.constexpr, HAS_STATIC: tl.constexpr,
              FOLD: tl.constexpr, LEAD: tl.constexpr, HOIST: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(U_k, s_k) as the conv kernel's walk keeps them for all its tiles: U_k when hoisted, s_k when
    hoisted in dx (see the kernel); 0 for what _tap_term loads per tile instead."""
    u = 0
    s_k = 0
    if HOIST:
        u = _tap_u(u_ptr, s_ptr, r, r_ok, d, d_ok, D, R, k, W, FOLD, DOT_DTYPE)
        if LEAD and HAS_STATIC:
            s_k = _tap_s(s_ptr, d, d_ok, D, k)
    return u, s_k


@triton.jit
def _pair_rows(BLOCK_T: tl.constexpr):
    """Times of a tile's rows: row 16a + 8s + c holds time 2q + s, q = 8a + c. The matrix units'
    accumulator layouts give each thread rows r and r + 8 of every 16-row block, so each thread
    then holds two consecutive times, and a tile splits into its even and odd times for free
    (_pair_halves: the reshape, permute and split only rename registers)."""
    i = tl.arange(0, BLOCK_T)
    return 2 * (8 * (i // 16) + i % 8) + (i // 8) % 2


@triton.jit
def _pair_halves(f, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """f [BLOCK_T, BLOCK_D] (rows as _pair_rows) as its even- and odd-time halves [BLOCK_T // 16, 8,
    BLOCK_D], element [a, c] at q = 8a + c."""
    f = tl.permute(tl.reshape(f, [BLOCK_T // 16, 2, 8, BLOCK_D]), [0, 2, 3, 1])
    return tl.split(f)


@triton.jit
def _pair_rows_of(even, odd, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The inverse of _pair_halves."""
    return tl.reshape(tl.permute(tl.join(even, odd), [0, 3, 1, 2]), [BLOCK_T, BLOCK_D])


@triton.jit
def _piece(x_tile, X_STRIDE, q, dd, d_ok3, t0, T, j: tl.constexpr, LEAD: tl.constexpr, EVEN: tl.constexpr):
    """Piece j of x for the taps, as float32 [BLOCK_T // 16, 8, BLOCK_D] like the halves: x[t0 + 2q + m]
    with m = j (LEAD) or 1 - j (zeros outside [0, T)); tap k takes pieces k and k + 1, so W + 1
    pieces serve W taps. EVEN: T and D are whole tiles, so lags need masks only before the
    sequence's start (leads keep theirs)."""
    m: tl.constexpr = j if LEAD else 1 - j
    ptrs = x_tile + (2 * q + m) * X_STRIDE + dd
    if LEAD or not EVEN:
        tq = t0 + 2 * q + m
        piece = tl.load(ptrs, mask=(tq >= 0) & (tq < T) & d_ok3, other=0.0)
    elif m >= 0:  # inside the tile
        piece = tl.load(ptrs)
    else:  # (2q + m: the same for every tile, so only the bound moves)
        piece = tl.load(ptrs, mask=2 * q + m >= -t0, other=0.0)
    return piece.to(tl.float32)


@triton.jit
def _tap_term(acc0, acc1, near, far, z, u, s_k, HOIST: tl.constexpr, u_ptr, z_tile, z_offsets_k, s_ptr, pos_ptr,
              d, d_ok, r, r_ok, t, t_ok, p, T, D, R, k: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_D: tl.constexpr, HAS_STATIC: tl.constexpr, FOLD: tl.constexpr, HAS_POS: tl.constexpr,
              LEAD: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Tap k on one tile, by halves: acc0 (even times 2q) + tap(2q, k) * x[2q-k] and acc1 (odd
    times) + tap(2q+1, k) * x[2q+1-k]; with LEAD, tap(t+k, k) * x[t+k]. near and far are _piece k
    and k + 1: x[2q+1-k] and x[2q-k], or with LEAD x[2q+k] and x[2q+k+1], so for each pair of
    outputs a thread loads and converts W + 1 values of x instead of 2W.
    u is U_k, or with HOIST False, loaded here (one tap's U live at a time: the widest filters');
    s_k is the static tap when hoisted with LEAD (see the kernel), else loaded here."""
    if not HOIST:
        u = _tap_u(u_ptr, s_ptr, r, r_ok, d, d_ok, D, R, k, W, FOLD, DOT_DTYPE)
    # Each tap starts as the broadcast static filter rather than zeros + s (an add per element the
    # compiler cannot drop: 0.0 + -0.0 is +0.0), unless the product carries it (FOLD).
    tap = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_STATIC and not FOLD:
        if not (HOIST and LEAD):
            s_k = _tap_s(s_ptr, d, d_ok, D, k)
        tap = tl.broadcast_to(s_k[None, :], [BLOCK_T, BLOCK_D])
    if k == 0:
        tap = mma(z, u, tap, FP32_DOT)
    elif LEAD:
        lead_ok = t_ok & (t + k < T)
        lead_ok = lead_ok & (seq_pos(pos_ptr, t + k, lead_ok, HAS_POS) >= k)
        zk = tl.load(z_tile + z_offsets_k, mask=lead_ok[:, None] & r_ok[None, :], other=0.0)
        tap = mma(zk.to(DOT_DTYPE), u, tap, FP32_DOT)
        if HAS_POS:  # x[t+k] of the next sequence (the pieces are zeros only beyond T)
            tap = tl.where(lead_ok[:, None], tap, 0.0)
    else:
        tap = mma(z, u, tap, FP32_DOT)
        if HAS_POS:  # x[t-k] of the previous sequence (the pieces are zeros only before 0)
            tap = tl.where((p >= k)[:, None], tap, 0.0)
    even, odd = _pair_halves(tap, BLOCK_T, BLOCK_D)
    if LEAD:
        acc0 += even * near
        acc1 += odd * far
    else:
        acc0 += even * far
        acc1 += odd * near
    return acc0, acc1


@triton.jit
def _lowrank_conv_kernel(
    x_ptr, z_ptr, u_ptr, s_ptr, pos_ptr, y_ptr,
    T, D, R, X_STRIDE, Z_STRIDE, D_GROUP,
    W: tl.constexpr, R_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr, LEAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr,
    FOLD: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    """y[t] = sum_k tap(t, k) * x[t-k] (forward), or with LEAD, y[t] = sum_k tap(t+k, k) * x[t+k]:
    the same pass run on dy gives dx, each tap read by the position that used x[t]. Rows of x and
    z are X_STRIDE and Z_STRIDE elements apart (views into a fused projection's output), y is
    contiguous; this tile's channels belong to group d // D_GROUP, whose R columns of z it reads.
    FOLD (forward only, R + 2 <= R_P): the static filter rides on the product (see _tap_u).
    EVEN: T is a multiple of BLOCK_T * CHUNK and D of BLOCK_D, so only lags need masks (_piece).
    A tile's rows hold its times in the order of _pair_rows (BLOCK_T a multiple of 16)."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row_t = _pair_rows(BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, R_P)
    d_ok, r_ok = d < D, r < R
    z_offsets = row_t[:, None] * Z_STRIDE + (pid_d * BLOCK_D // D_GROUP) * R + r[None, :]
    # The halves' indices: q = 8a + c for element [a, c] (see _pair_halves).
    q = 8 * tl.arange(0, BLOCK_T // 16)[:, None, None] + tl.arange(0, 8)[None, :, None]
    dd = d[None, None, :]
    d_ok3 = d_ok[None, None, :]
    # U is the same for every tile: with several tiles per program it is loaded once, before the walk,
    # and stays in shared memory, instead of being copied again with each tile's pipelined loads
    # (KERNELS.md, v13). The unpipelined one-tile kernel (the widest filters) loads it tap by tap.
    # dx also keeps the static taps in registers for the whole walk (the pipeline would copy each
    # [BLOCK_D] row again per tile, replicated over threads): 67.7 -> 61.7 us at the paper's shape.
    # The unfolded forward (W = 8) was 1.5% slower with it, so it loads them per tile.
    HOIST: tl.constexpr = CHUNK > 1
    walk_u = ()
    walk_s = ()
    for k in tl.static_range(W):
        u, s_k = _walk_tap(u_ptr, s_ptr, r, r_ok, d, d_ok, D, R, k, W, HAS_STATIC, FOLD, LEAD, HOIST, DOT_DTYPE)
        walk_u = walk_u + (u,)
        walk_s = walk_s + (s_k,)
    for c in tl.range(0, CHUNK, num_stages=STAGES):
        t0 = (pid_t * CHUNK + c) * BLOCK_T
        t = t0 + row_t
        t_ok = t < T
        p = seq_pos(pos_ptr, t, t_ok, HAS_POS)
        # 64-bit only in the tile's base row; offsets inside the tile stay 32-bit (fewer registers).
        first_row = b.to(tl.int64) * T + t0
        z_tile = z_ptr + first_row * Z_STRIDE
        x_tile = x_ptr + first_row * X_STRIDE
        # All pieces before the products (loaded tap by tap, between them, the forward took 68.9
        # instead of 52.7 us), x[t] first: the shifted ones mostly hit the cache lines it brought in.
        pieces = ()
        for j in tl.static_range(W + 1):
            pieces = pieces + (_piece(x_tile, X_STRIDE, q, dd, d_ok3, t0, T, j, LEAD, EVEN),)
        z_ok = r_ok[None, :] if EVEN else t_ok[:, None] & r_ok[None, :]
        z = tl.load(z_tile + z_offsets, mask=z_ok, other=0.0)
        if FOLD:
            z = tl.where((r >= R) & (r < R + 2), 1.0, z)  # z's columns of ones pick up U's rows of s
        z = z.to(DOT_DTYPE)
        # The kernel is bound by instruction issue (ncu: ~2.4 of 4 per cycle, neither memory nor L2
        # saturated), so per-element work counts: the residual starts the sum as x[t] instead of
        # adding 1 to tap 0.
        if RESIDUAL:  # x[2q] and x[2q+1]
            acc0, acc1 = (pieces[0], pieces[1]) if LEAD else (pieces[1], pieces[0])
        else:
            acc0 = tl.zeros([BLOCK_T // 16, 8, BLOCK_D], dtype=tl.float32)
            acc1 = acc0
        for k in tl.static_range(W):
            acc0, acc1 = _tap_term(acc0, acc1, pieces[k], pieces[k + 1], z, walk_u[k], walk_s[k], HOIST, u_ptr,
                                   z_tile, z_offsets + k * Z_STRIDE, s_ptr, pos_ptr, d, d_ok, r, r_ok, t, t_ok, p,
                                   T, D, R, k, W, BLOCK_T, BLOCK_D, HAS_STATIC, FOLD, HAS_POS, LEAD, DOT_DTYPE,
                                   FP32_DOT)
        y = _pair_rows_of(acc0, acc1, BLOCK_T, BLOCK_D)
        y_ptrs = y_ptr + first_row * D + row_t[:, None] * D + d[None, :]
        if EVEN:
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty))
        else:
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _lag_x(x_tile, x_offsets, x0, d_ok, t, p, t_ok, X_STRIDE, k: tl.constexpr, W: tl.constexpr):
    """x[t-k] (k >= 1) on a [BLOCK_T, BLOCK_D] tile; x0 (not loaded) for k >= W, past the last tap."""
    xk = x0
    if k < W:
        lag_ok = t_ok & (p >= k) & (t >= k)
        xk = tl.load(x_tile + (x_offsets - k * X_STRIDE), mask=lag_ok[:, None] & d_ok[None, :], other=0.0)
    return xk


@triton.jit
def _lag_grads(xk, dy0, z, u_t, du, dz, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Tap k's filter gradient df = dy[t] * x[t-k] (xk) on a [BLOCK_T, BLOCK_D] tile, folded at once
    into dU_k^T += df^T @ z (du, [BLOCK_D, R_P]; with z's column of ones its column R is ds_k) and
    dz += df @ U_k^T (u_t: U_k^T, [BLOCK_D, RZ_P])."""
    df = (dy0.to(tl.float32) * xk.to(tl.float32)).to(DOT_DTYPE)
    du = mma(tl.trans(df), z, du, FP32_DOT)
    dz = mma(df, u_t, dz, FP32_DOT)
    return du, dz


@triton.jit
def _u_t(u_ptr, r, r_ok, d, d_ok, D, k: tl.constexpr, W: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """U_k^T [BLOCK_D, len(r)] of this program's channels."""
    u_t = tl.load(u_ptr + r[None, :] * (W * D) + k * D + d[:, None], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    return u_t.to(DOT_DTYPE)


@triton.jit
def _store_partials(du_part_ptr, ds_part_ptr, du, pid_n, r, r_ok, d, d_ok, R, D,
                    k: tl.constexpr, W: tl.constexpr, HAS_STATIC: tl.constexpr):
    """This chunk's dU_k partial and, from du's column R (z's column of ones), its ds_k partial."""
    du_ptrs = du_part_ptr + pid_n.to(tl.int64) * R * W * D + r[None, :] * (W * D) + k * D + d[:, None]
    tl.store(du_ptrs, du, mask=d_ok[:, None] & r_ok[None, :])
    if HAS_STATIC:
        ds = tl.sum(tl.where((r == R)[None, :], du, 0.0), axis=1)
        tl.store(ds_part_ptr + pid_n.to(tl.int64) * W * D + k * D + d, ds, mask=d_ok)


@triton.jit
def _chunk_tile(pid_d, pid_n, chunks_per_seq, chunk_t, T, D, R, X_STRIDE, Z_STRIDE, D_GROUP,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, R_P: tl.constexpr):
    """Where a filter-gradient program works: its sequence b, time chunk [t_start, t_end), row,
    channel and rank indices with their masks, and the in-tile offsets of dy, x and z (z's from
    the R columns of this channel tile's group)."""
    b = pid_n // chunks_per_seq
    t_start = (pid_n % chunks_per_seq) * chunk_t
    t_end = tl.minimum(T, t_start + chunk_t)
    i = tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, R_P)
    # 32-bit offsets inside a tile; 64-bit only per tile row
    dy_offsets = i[:, None] * D + d[None, :]
    x_offsets = i[:, None] * X_STRIDE + d[None, :]
    z_offsets = i[:, None] * Z_STRIDE + (pid_d * BLOCK_D // D_GROUP) * R + r[None, :]
    return b, t_start, t_end, i, d, r, d < D, r < R, dy_offsets, x_offsets, z_offsets


@triton.jit
def _lowrank_filter_grad_kernel(
    x_ptr, z_ptr, u_ptr, pos_ptr, dy_ptr,
    dz_part_ptr, du_part_ptr, ds_part_ptr,
    B, T, D, R, X_STRIDE, Z_STRIDE, D_GROUP, chunks_per_seq, chunk_t,
    W: tl.constexpr, R_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr,
    RZ_P: tl.constexpr,
):
    pid_d, pid_n = tl.program_id(0), tl.program_id(1)
    b, t_start, t_end, i, d, r, d_ok, r_ok, dy_offsets, x_offsets, z_offsets = _chunk_tile(
        pid_d, pid_n, chunks_per_seq, chunk_t, T, D, R, X_STRIDE, Z_STRIDE, D_GROUP, BLOCK_T, BLOCK_D, R_P)
    # Per-tap accumulators of dU_k (and ds_k, their column R) over this chunk, and U_k^T, loaded
    # once per program. dz's products pad R to RZ_P, not to R_P: z's column of ones (which can
    # double R_P, 16 -> 32) serves dU only, and the narrower products halve dz's accumulator (v15).
    rz = tl.arange(0, RZ_P)
    rz_ok = rz < R
    du = ()
    u_t = ()
    for k in tl.static_range(W):
        du = du + (tl.zeros([BLOCK_D, R_P], dtype=tl.float32),)
        u_t = u_t + (_u_t(u_ptr, rz, rz_ok, d, d_ok, D, k, W, DOT_DTYPE),)
    # dy[t] and x[t] of the next tile are loaded one iteration ahead, so their latency overlaps
    # the current tile's work.
    first_ok = ((t_start + i) < t_end)[:, None] & d_ok[None, :]
    first_row = (b * T + t_start).to(tl.int64)
    dy_next = tl.load(dy_ptr + first_row * D + dy_offsets, mask=first_ok, other=0.0)
    x_next = tl.load(x_ptr + first_row * X_STRIDE + x_offsets, mask=first_ok, other=0.0)
    for t0 in tl.range(t_start, t_end, BLOCK_T):
        t = t0 + i
        t_ok = t < t_end
        p = seq_pos(pos_ptr, t, t_ok, HAS_POS)
        tile_row = (b * T + t0).to(tl.int64)
        x_tile, dy_tile = x_ptr + tile_row * X_STRIDE, dy_ptr + tile_row * D
        dy0, x0 = dy_next, x_next
        ahead_ok = ((t + BLOCK_T) < t_end)[:, None] & d_ok[None, :]
        dy_next = tl.load(dy_tile + BLOCK_T * D + dy_offsets, mask=ahead_ok, other=0.0)
        x_next = tl.load(x_tile + BLOCK_T * X_STRIDE + x_offsets, mask=ahead_ok, other=0.0)
        z = tl.load(z_ptr + tile_row * Z_STRIDE + z_offsets, mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        z = z.to(DOT_DTYPE)
        if HAS_STATIC:
            # A column of ones (R < R_P, see _fused_filter_grads): df^T @ z then also sums df over
            # the rows, so ds_k rides on the matrix product instead of W cross-warp row sums per
            # tile, whose barriers serialised the tile's work (v8: 230 -> ~140 us).
            z = tl.where((r == R)[None, :] & t_ok[:, None], 1.0, z).to(DOT_DTYPE)

        # Filter gradients, tap by tap, each tap's lagged x loaded before the previous tap's
        # products, so its latency overlaps them (v17: 119.2 -> 112.8 us at the paper's shape; all
        # taps' loaded up front spill and took 161.4).
        dz = tl.zeros([BLOCK_T, RZ_P], dtype=tl.float32)
        lag = x0
        du_next = ()
        for k in tl.static_range(W):
            lag_next = _lag_x(x_tile, x_offsets, x0, d_ok, t, p, t_ok, X_STRIDE, k + 1, W)
            du_k, dz = _lag_grads(lag, dy0, z, u_t[k], du[k], dz, DOT_DTYPE, FP32_DOT)
            du_next = du_next + (du_k,)
            lag = lag_next
        du = du_next
        dz_tile = dz_part_ptr + (pid_d.to(tl.int64) * B * T + tile_row) * R
        tl.store(dz_tile + i[:, None] * R + rz[None, :], dz, mask=t_ok[:, None] & rz_ok[None, :])

    for k in tl.static_range(W):
        _store_partials(du_part_ptr, ds_part_ptr, du[k], pid_n, r, r_ok, d, d_ok, R, D, k, W, HAS_STATIC)


@triton.jit
def _lowrank_dz_kernel(
    x_ptr, u_ptr, pos_ptr, dy_ptr, dz_ptr,
    T, D, R, X_STRIDE, D_GROUP,
    W: tl.constexpr, R_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dz[t] = sum_d sum_k (dy[t, d] * x[t-k, d]) U_k[:, d] for one tile of rows and one channel
    group g: the program walks the group's channel tiles, so the sum over them stays in one
    [BLOCK_T, R_P] accumulator and dz[..., g*R:(g+1)*R] is written once, in z's dtype (no partials,
    no reduction pass)."""
    pid_t, b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i = tl.arange(0, BLOCK_T)
    t = pid_t * BLOCK_T + i
    r = tl.arange(0, R_P)
    t_ok, r_ok = t < T, r < R
    p = seq_pos(pos_ptr, t, t_ok, HAS_POS)
    first_row = (b * T + pid_t * BLOCK_T).to(tl.int64)
    x_rows, dy_rows = x_ptr + first_row * X_STRIDE, dy_ptr + first_row * D
    dz = tl.zeros([BLOCK_T, R_P], dtype=tl.float32)
    group_end = tl.minimum(D, (g + 1) * D_GROUP)
    for d0 in tl.range(g * D_GROUP, group_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < group_end
        x_offsets = i[:, None] * X_STRIDE + d[None, :]
        dy = tl.load(dy_rows + i[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        dy = dy.to(tl.float32)
        for k in tl.static_range(W):
            # x[t-k] for k >= 1 mostly hits the cache lines that tap 0 brought in.
            lag_ok = t_ok & (p >= k) & (t >= k)
            xk = tl.load(x_rows + (x_offsets - k * X_STRIDE), mask=lag_ok[:, None] & d_ok[None, :], other=0.0)
            df = (dy * xk.to(tl.float32)).to(DOT_DTYPE)
            u_t = tl.load(u_ptr + r[None, :] * (W * D) + k * D + d[:, None], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            dz = mma(df, u_t.to(DOT_DTYPE), dz, FP32_DOT)
    dz_tile = dz_ptr + first_row * (D // D_GROUP) * R + g * R + i[:, None] * (D // D_GROUP) * R + r[None, :]
    tl.store(dz_tile, dz.to(dz_ptr.dtype.element_ty), mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def _lowrank_du_kernel(
    x_ptr, z_ptr, pos_ptr, dy_ptr, du_part_ptr, ds_part_ptr,
    T, D, R, X_STRIDE, Z_STRIDE, D_GROUP, chunks_per_seq, chunk_t,
    W: tl.constexpr, R_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """One tap k's dU_k^T = sum_t df_k[t]^T z[t] and ds_k = sum_t df_k[t], df_k = dy[t] * x[t-k], over
    one channel tile and time chunk, written as this chunk's partial. The tap is the fastest program
    id: the W programs of a (channel tile, chunk) run side by side and read x and dy mostly from L2."""
    k, pid_d, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t_start, t_end, i, d, r, d_ok, r_ok, dy_offsets, x_offsets, z_offsets = _chunk_tile(
        pid_d, pid_n, chunks_per_seq, chunk_t, T, D, R, X_STRIDE, Z_STRIDE, D_GROUP, BLOCK_T, BLOCK_D, R_P)
    du = tl.zeros([BLOCK_D, R_P], dtype=tl.float32)
    ds = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in tl.range(t_start, t_end, BLOCK_T):
        t = t0 + i
        t_ok = t < t_end
        lag_ok = t_ok & (seq_pos(pos_ptr, t, t_ok, HAS_POS) >= k) & (t >= k)
        tile_row = (b * T + t0).to(tl.int64)
        dy = tl.load(dy_ptr + tile_row * D + dy_offsets, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        xk = tl.load(x_ptr + tile_row * X_STRIDE + (x_offsets - k * X_STRIDE), mask=lag_ok[:, None] & d_ok[None, :],
                     other=0.0)
        z = tl.load(z_ptr + tile_row * Z_STRIDE + z_offsets, mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        df = dy.to(tl.float32) * xk.to(tl.float32)
        if HAS_STATIC:
            ds += tl.sum(df, axis=0)
        du = mma(tl.trans(df.to(DOT_DTYPE)), z.to(DOT_DTYPE), du, FP32_DOT)
    du_ptrs = du_part_ptr + pid_n.to(tl.int64) * R * W * D + r[None, :] * (W * D) + k * D + d[:, None]
    tl.store(du_ptrs, du, mask=d_ok[:, None] & r_ok[None, :])
    if HAS_STATIC:
        tl.store(ds_part_ptr + pid_n.to(tl.int64) * W * D + k * D + d, ds, mask=d_ok)


def _conv_blocks(T: int, R_P: int, W_P: int, lead: bool, fp32: bool) -> dict:
    """Block sizes of the conv kernel (forward, or dx with `lead`): BLOCK_T x BLOCK_D tiles, CHUNK
    time tiles per program, and STAGES for the compiler's pipelining of the chunk loop (the next
    tiles' x and z copied asynchronously into shared memory while this tile's products run).
    Picked on an H200 (benchmarks/KERNELS.md): at the paper's shape (v7) 105 -> 65 us forward and
    128 -> 73 us dx against the one-tile-per-program kernel; for wider filters by a sweep after v15
    (v16). Shared memory (U, held for the whole walk, and the pipeline's buffers; dx's shifted z
    tiles) and registers grow with R_P * W and with float32, so wider filters take narrower tiles,
    and the widest the unpipelined kernel, which loads U tap by tap (offline compile: shared memory
    under the H200's 227 KB for every R_P * W up to each branch's bound)."""
    width = R_P * W_P
    if interpreting():  # CHUNK 2: the interpreter tests walk the chunk loop, masked tail included
        wide = width > 128  # ... except for the widest filters, which take the one-tile kernel
        return {"BLOCK_T": 16, "BLOCK_D": 16, "num_warps": 1, "CHUNK": 1 if wide else 2, "STAGES": 1}
    if width > (64 if fp32 else 512):  # (float32 tiles take twice the registers and shared memory)
        return {"BLOCK_T": 32, "BLOCK_D": 128 if R_P <= 32 else 64, "num_warps": 4, "CHUNK": 1, "STAGES": 1}
    if fp32:  # (not re-swept in v16)
        blocks = {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 4, "CHUNK": 16, "STAGES": 2}
    elif lead and (width == 256 and W_P <= 4 or width == 128 and W_P == 8):
        # v17 (pair rows), against the 32 x 64 tiles below: R = 64 114.5 -> 92.7 us; W = 8 equal (109.4
        # and 109.3), where 32 x 64 tiles spill 24 B (offline compile). (R = 32 with W = 8 spills here.)
        blocks = {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8, "CHUNK": 16, "STAGES": 3}
    elif lead:
        # dx: 32 x 64 tiles with 3 stages at every other width (v16, against the blocks before: W = 8
        # 150.1 -> 124.8 us, R = 32 99.2 -> 81.3, R = 128 341.7 -> 239.5, R = 64 with W = 8 333.4 ->
        # 310.4). 8 taps beyond R_P = 16 spill at 4 warps, so 8 there (R = 32, W = 8: 232.0 against
        # 217.3 us; 64 x 32 tiles, 2 stages, as v16 first had it: 383.9).
        warps = 8 if W_P == 8 and width > 128 else 4
        blocks = {"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": warps, "CHUNK": 16, "STAGES": 3}
    elif width <= 64:
        blocks = {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 4, "CHUNK": 32, "STAGES": 3}
    elif width <= 128:
        # v16, against 64 x 32 tiles with 2 stages: W = 8 125.7 -> 107.2 us, R = 32 75.6 -> 69.3.
        blocks = {"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4, "CHUNK": 16, "STAGES": 3}
    else:
        # v17 (pair rows), against v16's 64 x 32 tiles with 2 stages (which beat the one-tile kernel
        # there): R = 64 105.0 -> 98.4 us, R = 128 154.4 -> 124.3.
        blocks = {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8, "CHUNK": 32, "STAGES": 3}
    # Short sequences: no more tiles per program than the sequence has (the rest would be masked).
    blocks["CHUNK"] = min(blocks["CHUNK"], next_pow2(triton.cdiv(T, blocks["BLOCK_T"])))
    return blocks


def _grad_blocks(R_P: int, W_P: int) -> dict:
    """Block sizes and warps of the filter-gradient kernel. Interpreted runs use the smallest legal
    tiles (tl.dot needs >= 16). The kernel keeps W dU accumulators of [BLOCK_D, R_P] floats in
    registers, so wide ranks or filters get narrower tiles. Picked by `benchmarks/kernels.py
    --sweep` on an H200 (see benchmarks/KERNELS.md)."""
    if interpreting():
        return {"BLOCK_T": 16, "BLOCK_D": 16, "num_warps": 1}
    width = R_P * W_P
    if width <= 128:
        return {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}
    # At R_P * W_P = 256, 32 x 64 tiles beat 32 x 32 (v15: R = 16, W = 8 268 against 315 us; R = 32,
    # W = 4 213 against 316); at 512 (R = 64, W = 4) they lose (592 against 412).
    return {"BLOCK_T": 32, "BLOCK_D": 64 if width <= 256 else 32, "num_warps": 4, "num_stages": 1}


def _split_blocks(R_P: int, W_P: int, fp32: bool) -> dict:
    """{"dz": ..., "du": ...}: block sizes of the split variant's two kernels: 64 x 64 tiles (exact
    float32 products need more registers, so float32 takes 32-row tiles). 4 warps beat 8 for both
    kernels wherever they were timed (v16, both kernels together: R = 64, W = 8 1309.9 -> 780.7 us;
    R = 128, W = 4 1095.9 -> 531.3); from R_P * W = 1024 on, the dz kernel spills at 4 warps
    (offline compile), so 8 there."""
    if interpreting():
        small = {"BLOCK_T": 16, "BLOCK_D": 16, "num_warps": 1}
        return {"dz": small, "du": small}
    warps = 8 if fp32 or R_P * W_P >= 1024 else 4
    tile = {"BLOCK_T": 32 if fp32 else 64, "BLOCK_D": 64, "num_warps": warps, "num_stages": 1}
    return {"dz": dict(tile), "du": dict(tile)}


def _meta(z: Tensor, U: Tensor, D: int, static: Tensor | None, pos: Tensor | None) -> dict:
    return {
        "W": U.shape[1] // D,
        "R_P": max(16, next_pow2(U.shape[0])),
        "HAS_STATIC": static is not None,
        "HAS_POS": pos is not None,
        "DOT_DTYPE": dot_dtype(z.dtype),
        "FP32_DOT": dot_dtype(z.dtype) == tl.float32,
    }


def _group_size(z: Tensor, U: Tensor, D: int) -> int:
    """Channels per group: z [B, T, G*R] gives each of G runs of D/G channels its own R columns."""
    return D // (z.shape[-1] // U.shape[0])


def _fit_group(blocks: dict, d_group: int, D: int) -> dict:
    """Channel tiles inside one group each (so one slice of z serves a whole tile): with groups,
    halve BLOCK_D until it divides the group's channels (a multiple of 16, see ops)."""
    block_d = blocks["BLOCK_D"]
    while d_group < D and d_group % block_d:
        block_d //= 2
    return blocks | {"BLOCK_D": block_d}


def _conv(src: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool, pos: Tensor | None,
          lead: bool, blocks: dict | None) -> Tensor:
    B, T, D = src.shape
    meta = _meta(z, U, D, static, pos)
    d_group = _group_size(z, U, D)
    if meta["DOT_DTYPE"] != tl.float32 and U.dtype != z.dtype:
        # The products take U in z's half type anyway, so cast it once here (bit-identical): a
        # float32 U (autocast keeps parameters in float32) doubles the pipeline's shared-memory
        # buffers for U, and at the paper's blocks the forward then fits one program per
        # multiprocessor instead of two (115 vs 105 KB each), dx two instead of three.
        U = U.to(z.dtype)
    # Caller-given blocks without CHUNK/STAGES (the benchmark's) mean one unpipelined tile per program.
    given = blocks is not None
    W_P = next_pow2(meta["W"])
    blocks = blocks or _conv_blocks(T, meta["R_P"], W_P, lead, meta["FP32_DOT"])
    blocks = _fit_group({"CHUNK": 1, "STAGES": 1} | blocks, d_group, D)
    if not (given or interpreting()) and blocks["STAGES"] > 1:
        blocks = _fill_processors(blocks, T, D, B, processor_count(src.device), lead, meta["R_P"] * W_P)
    fold = _fold_static(U.shape[0], meta, lead)
    if fold:
        meta = meta | {"R_P": _folded_rank(U.shape[0])}
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)  # contiguous, whatever src's strides
    grid = (triton.cdiv(T, blocks["BLOCK_T"] * blocks["CHUNK"]), triton.cdiv(D, blocks["BLOCK_D"]), B)
    # Whole tiles: the forward then masks only the lags before the sequence's start, not every
    # copy (KERNELS.md, v18: 53.0 -> 50.3 us at the paper's shape, R = 64 98.7 -> 76.7). It lost
    # with packed sequences (56.5 -> 60.2 us, B=1, T=16384, 8 documents), and dx with the same
    # (leads past the end) lost at the paper's shape (56.2 -> 57.8) and R = 128 (211.7 -> 227.9).
    whole_tiles = T % (blocks["BLOCK_T"] * blocks["CHUNK"]) == 0 and D % blocks["BLOCK_D"] == 0
    even = whole_tiles and not lead and pos is None
    _lowrank_conv_kernel[grid](
        src, z, U, static if static is not None else src, pos if pos is not None else src, out,
        T, D, U.shape[0], src.stride(1), z.stride(1), d_group, RESIDUAL=residual, LEAD=lead, FOLD=fold,
        EVEN=even, **meta, **blocks,
    )
    return out


def _fill_processors(blocks: dict, T: int, D: int, B: int, processors: int, lead: bool, width: int) -> dict:
    """The pipelined conv's CHUNK and STAGES for the grid they make (KERNELS.md, v19; H200, side by
    side, outputs equal).

    Forward: halve CHUNK while the grid has fewer programs than multiprocessors, which would
    otherwise each walk alone: [8, 2048, 1024] 33.9 -> 27.1 us, [1, 4096, 2048] 32.0 -> 14.8,
    [16, 1024, 512] 17.4 -> 14.7. Where the grid has at most two programs per multiprocessor, 64 x
    64 tiles on 4 warps walk 4 stages deep (98 KB of shared memory per program, so 2 fit, as the
    grid needs): the paper's shape 50.1 -> 48.0, the 300M conv [8, 4096, 1024] 50.3 -> 47.8. Short
    walks (CHUNK 8) gained nothing from the fourth stage (14.9 -> 15.2).

    dx (width R_P * W <= 64, 32 x 64 tiles on 4 warps; 3 programs per multiprocessor, capped by
    registers): 4 stages (paper 56.9 -> 56.4 us, 300M conv 56.6 -> 56.3; [8, 2048, 1024] at CHUNK 32
    31.6 -> 29.6), and CHUNK halved while the programs take more than one wave and the last would
    be under 80% full ([8, 2048, 1024]: 512 programs in 396 slots, 35.4 -> 31.3 us with 1024). Grids
    of one wave keep CHUNK 16: halving it to 4 there took 16.8 -> 18.3 us ([1, 4096, 2048]). Grids
    with fewer programs than multiprocessors halve it as the forward does (v23: [1, 3000, 256] had
    24 programs, 20.4 us)."""
    def programs(chunk: int) -> int:
        return triton.cdiv(T, blocks["BLOCK_T"] * chunk) * triton.cdiv(D, blocks["BLOCK_D"]) * B

    chunk, stages = blocks["CHUNK"], blocks["STAGES"]
    tiles = (blocks["BLOCK_T"], blocks["BLOCK_D"], blocks["num_warps"])
    if not lead:
        while chunk > 2 and programs(chunk) < processors:  # (2: U stays loaded once per program)
            chunk //= 2
        if tiles == (64, 64, 4) and chunk >= 16 and programs(chunk) <= 2 * processors:
            stages = 4
    elif tiles == (32, 64, 4) and width <= 64:
        slots = 3 * processors
        while chunk > 4 and programs(chunk) > slots and wave_fill(programs(chunk), slots) < 0.8:
            chunk //= 2
        while chunk > 2 and programs(chunk) < processors:  # as the forward (v23)
            chunk //= 2
        stages = 4
    return blocks | {"CHUNK": chunk, "STAGES": stages}


def _folded_rank(R: int) -> int:
    """R_P with room for z's two columns of ones (the static filter folded into the product)."""
    return max(16, next_pow2(R + 2))


def _fold_static(R: int, meta: dict, lead: bool) -> bool:
    """Whether the conv kernel folds the static filter into the product (forward, half types):
    measured 64.2 -> 58.8 us at the paper's shape on an H200, where R=16 takes R_P from 16 to 32
    (KERNELS.md, v13). Not for dx, whose shifted z tiles would each need the ones written in (88 vs
    69 us there), nor for exact float32 products, nor where the larger R_P would make U's tiles
    outgrow the blocks picked for R_P * W <= 128."""
    folded = _folded_rank(R) * next_pow2(meta["W"]) <= 128
    return meta["HAS_STATIC"] and not lead and not meta["FP32_DOT"] and folded


def lowrank_forward(
    x: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool, pos: Tensor | None,
    blocks: dict | None = None, rope: tuple | None = None,
) -> Tensor:
    """y [B, T, D] (contiguous) for x [B, T, D], z [B, T, R] or [B, T, G*R] (G channel groups, see
    reference.lowrank_filters), U [R, W*D], static [W, D] or None, pos int32 [T] (packed sequences)
    or None. x and z may be views with evenly strided rows (into one fused projection's output);
    U, static and pos are contiguous. `blocks` overrides the Triton kernel's block sizes (benchmarks).
    FORWARD_VARIANT picks the kernel (see there). rope: (cos, sin, channels), float32 contiguous
    tables [T, head_dim/2] (of positions 0 to T-1 unless packed: reference.check_rope_from_zero):
    y's first `channels` channels come out rotated (reference.rotate_channels),
    by the Gluon kernel itself where it runs with 64-channel heads (callers ask rope_fuses first:
    elsewhere the rotation is PyTorch ops after the kernel)."""
    if blocks is None and takes_gluon(FORWARD_VARIANT, lambda: _gluon_conv_missing(x, z, U, pos)):
        fused = rope if rope is not None and _heads_are_tiles(2 * rope[0].shape[-1]) else None
        y = gluon_lowrank_conv.forward(x, z, U, static, residual, _group_size(z, U, x.shape[-1]), rope=fused)
        if fused is not None:
            return y
    else:
        y = _conv(x, z, U, static, residual, pos, lead=False, blocks=blocks)
    return y if rope is None else rotate_channels(y, rope[:2], rope[2])


def _heads_are_tiles(head_dim: int) -> bool:
    """Whether RoPE's heads are the Gluon kernels' channel tiles (64 channels): a tile then holds both
    halves of one head, which the kernels' rotation pairs."""
    return head_dim == gluon_lowrank_conv.TILE


def rope_fuses(x: Tensor, z: Tensor, U: Tensor, head_dim: int, packed: bool) -> bool:
    """Whether lowrank_forward would rotate by a rope of `head_dim` in its Gluon kernel: ROPE and
    FORWARD_VARIANT allow it, heads are the kernel's 64-channel tiles, and the kernel takes these
    shapes and types (gluon_lowrank_conv.shapes_missing: cannot_run but for addresses and strides,
    which torch.compile cannot see while it traces this; where those turn out misaligned,
    lowrank_forward rotates after the Triton kernel instead, the same result)."""
    if ROPE.get() == "off" or FORWARD_VARIANT.get() == "triton" or not _heads_are_tiles(head_dim):
        return False
    if not x.is_cuda or gluon_lowrank_conv.shapes_missing(x, z, U, packed, _group_size(z, U, x.shape[-1])):
        return False
    return gluon_hopper(x.device.index)


def backward_rotates(x: Tensor, rope: tuple) -> bool:
    """Whether lowrank_backward would turn dy back by `rope` (cos, sin) inside its kernels, for a conv
    whose forward rotates inside its kernel (the caller has asked rope_fuses): ROPE is "auto" and the
    backward runs its Gluon kernels side by side. Asked while torch.compile traces (shapes and types
    only, as rope_fuses); where the kernels then cannot take the inputs, lowrank_backward turns dy
    back by ops instead, the same result."""
    if not _kernels_turn_back(rope) or BACKWARD_VARIANT.get() not in ("auto", "gluon") or DX_VARIANT.get() == "triton":
        return False
    return _overlaps(x)


def _gluon_conv_missing(src: Tensor, z: Tensor, U: Tensor, pos: Tensor | None) -> str | None:
    """Why gluon_lowrank_conv cannot run this forward (src = x) or dx (src = dy)."""
    return gluon_lowrank_conv.cannot_run(src, z, U, pos, _group_size(z, U, src.shape[-1]))


def _dx(dy: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool, pos: Tensor | None,
        gluon: bool, out: Tensor | None = None) -> Tensor:
    """dx by the Gluon pass if `gluon` (takes_gluon has said it runs), else the Triton conv with leads.
    The Gluon pass stores dx into `out` in place where it can (_gluon_out); otherwise dx comes back
    in a tensor of its own."""
    if gluon:
        return gluon_lowrank_conv.dx(dy, z, U, static, residual, _group_size(z, U, dy.shape[-1]),
                                     out=_gluon_out(out, dy))
    return _conv(dy, z, U, static, residual, pos, lead=True, blocks=None)


def _gluon_out(out: Tensor | None, dy: Tensor) -> Tensor | None:
    """`out` where the Gluon dx can store into it by TMA (gluon_lowrank_conv.stores_into), else None."""
    return out if out is not None and gluon_lowrank_conv.stores_into(out, dy) else None


def lowrank_backward(
    dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool,
    pos: Tensor | None, blocks: dict | None = None, variant: str | None = None, rope: tuple | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, dz, dU, dstatic or None), each contiguous in its input's dtype; inputs as for
    lowrank_forward, dy contiguous. out: (dx, dz) views to write them into instead (columns of one
    fused projection's gradient, lowrank_projected_backward); the Gluon dx stores into its view in
    place and the fused kernels' sums write dz into its own; the Triton dx and the split kernels'
    dz are copied into theirs. DX_VARIANT picks dx's kernel; `variant` the
    filter-gradient kernels: "fused", "gluon", "split" or "auto" (None: BACKWARD_VARIANT; see
    BACKWARD_VARIANT).
    `blocks` overrides their block sizes (benchmarks; "auto" then picks among the Triton kernels):
    one dict for fused, {"dz": ..., "du": ...} for split. Where both run in Gluon, OVERLAP may run
    them side by side (_overlapped_backward). rope: as lowrank_forward takes it, when dy is the
    gradient of the rotated output: dy is turned back first (the rotation's gradient), by both
    kernels as they read it where they run side by side and ROPE is "auto", else by ops."""
    variant = variant or BACKWARD_VARIANT.get()
    if variant not in BACKWARD_VARIANT.allowed:
        raise ValueError(f"lowrank_backward: variant={variant!r}; allowed: {', '.join(BACKWARD_VARIANT.allowed)}")
    dx_gluon = takes_gluon(DX_VARIANT, lambda: _gluon_conv_missing(dy, z, U, pos))
    meta = _meta(z, U, x.shape[-1], static, pos)
    if variant in ("auto", "gluon"):
        why_not = gluon_lowrank.cannot_run(dy, x, z, U, _group_size(z, U, x.shape[-1]))
        if variant == "gluon" and why_not:
            raise ValueError(f"lowrank_backward: variant='gluon' cannot run here: {why_not}")
        if variant == "auto":
            # Not with packed sequences: there the Gluon kernel lost (H200, 8 documents in [1, 16384,
            # 2048]: backward 214.8 -> 221.0 us; [1, 3000, 256]: 8.9 -> 10.3), its position loads
            # and masks in both operand layouts costing more than the TMA saves; warp-specialised
            # (v29) it still does (196.4 -> 201.1; 3 documents in [1, 3000, 256]: 14.5 -> 16.1).
            takes_gluon_grads = why_not is None and blocks is None and pos is None
            variant = "gluon" if takes_gluon_grads else _auto_variant(U.shape[0], meta["W"], static is not None)
    side_by_side = variant == "gluon" and dx_gluon and _overlaps(x)
    if rope is not None and not (side_by_side and _kernels_turn_back(rope)):
        dy, rope = rotate_channels(dy, rope[:2], rope[2], inverse=True), None
    dx_out, dz_out = (out[0], _sums_target(out[1], z)) if out is not None else (None, None)
    if side_by_side:
        dx, dz, dU, ds = _overlapped_backward(dy, x, z, U, static, residual, meta, rope=rope, dx_out=dx_out,
                                              dz_out=dz_out)
    elif variant == "split":
        dx = _dx(dy, z, U, static, residual, pos, dx_gluon, out=dx_out)
        dz, dU, ds = _split_filter_grads(dy, x, z, U, static, pos, meta, blocks)
    else:
        dx, dz, dU, ds = _fused_backward(dy, x, z, U, static, residual, pos, meta, blocks, dx_gluon,
                                         gluon=variant == "gluon", dx_out=dx_out, dz_out=dz_out)
    if out is not None:
        dx, dz = (target if got is target else target.copy_(got) for target, got in zip(out, (dx, dz)))
    return dx, dz, dU, ds


def _sums_target(dz_out: Tensor, z: Tensor) -> Tensor | None:
    """dz_out where the sums can write dz into it in place (sum_partials_together: z's shape and
    type, unit column stride, rows evenly strided), else None: dz is then copied into it."""
    B, T = z.shape[:2]
    rows_even = B == 1 or dz_out.stride(0) == T * dz_out.stride(1)
    fits = dz_out.shape == z.shape and dz_out.dtype == z.dtype and dz_out.stride(-1) == 1 and rows_even
    return dz_out if fits else None


def _kernels_turn_back(rope: tuple) -> bool:
    """Whether the side-by-side kernels turn dy back themselves (ROPE "auto", 64-channel heads)."""
    return ROPE.get() == "auto" and _heads_are_tiles(2 * rope[0].shape[-1])


def _overlaps(x: Tensor) -> bool:
    """Whether OVERLAP runs this backward's Gluon dx and filter gradients side by side: where one
    program of each per (64 channels, sequence) fits the multiprocessors."""
    B, _, D = x.shape
    return OVERLAP.get() == "auto" and B * triton.cdiv(D, gluon_lowrank.BLOCK_D) <= processor_count(x.device)


@functools.lru_cache(maxsize=1024)
def _overlap_plan(B: int, T: int, D: int, processors: int) -> tuple[int, int, int]:
    """(channel tiles, chunk_t, chunks) of the overlapped backward, once per shape: about one program
    of each kernel per multiprocessor, a sequence split into as many time chunks as there are
    multiprocessors per (channel tile, sequence)."""
    d_tiles = triton.cdiv(D, gluon_lowrank.BLOCK_D)
    per_sequence = max(1, processors // (B * d_tiles))
    chunk_t = triton.cdiv(triton.cdiv(T, per_sequence), gluon_lowrank.BLOCK_T) * gluon_lowrank.BLOCK_T
    return d_tiles, chunk_t, triton.cdiv(T, chunk_t)


def _overlapped_backward(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool,
                         meta: dict, beside: bool = True, rope: tuple | None = None,
                         dx_out: Tensor | None = None, dz_out: Tensor | None = None,
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """lowrank_backward with the Gluon dx on the current stream and the Gluon filter gradients on a
    side stream at once, each with about one program per multiprocessor: a filter-gradient program
    (30 K registers, 139 KB at 3 ring slots) and a dx program (24 K, 76 KB) share each one.

    Each kernel alone is latency-bound and runs two programs per multiprocessor; side by side, one
    of each, they finish sooner than one after the other (H200, KERNELS.md point 43: paper shape
    106.9 -> 100 us, the 300M q conv on views 112.2 -> 101). Grids of more (channel tiles x
    sequences) than multiprocessors would run two of one kernel per multiprocessor and leave no
    room for the other, so they run one after the other (_overlaps). Every buffer, the sums' outputs
    among them, is allocated on the current stream before the side stream starts (which then runs
    the filter gradients and their sums), and the current stream waits for it at the end, so no
    memory is freed while the side stream still uses it. `beside=False` runs the same
    launches one after the other on the current stream (tests: the results are the same bits).
    With `rope` both kernels turn dy back as they read it: dx in its ring slots (224 registers), the
    filter gradients in each consumer's registers (96 per thread at launch), which still fit one
    program of each per multiprocessor (65,536 registers in all), and save the separate inverse
    rotation's read and write of dy. dx_out: a view that dx is stored into by TMA where its rows
    allow (_gluon_out), else dx comes back in a tensor of its own; dz_out: one that the sums write
    dz into (sum_filter_grads)."""
    B, T, D = x.shape
    d_group = _group_size(z, U, D)
    d_tiles, chunk_t, chunks = _overlap_plan(B, T, D, processor_count(x.device))
    meta = _grad_meta(meta, U, static)
    parts = _filter_grad_buffers(x, U, static, d_tiles, chunks)
    outs = _filter_grad_outputs(z, U, static, dz_out)

    def filter_grads():
        gluon_lowrank.filter_grad_partials(dy, x, z, U, None, meta, d_group, chunk_t, chunks, *parts,
                                           stages=gluon_lowrank.OVERLAP_STAGES, rope=rope)
        # The sums follow the filter gradients on the side stream, under dx's tail where it is the
        # longer (H200: the paper's shape 101.7 -> 100.5 us, the 150M q conv 96.5 -> 92.9, KERNELS.md
        # v38); their outputs were allocated before the fork.
        return sum_filter_grads(*parts, z, U, static, D // d_group, outs=outs)

    def dx_pass():
        return gluon_lowrank_conv.dx(dy, z, U, static, residual, d_group, chunk=chunk_t // gluon_lowrank_conv.TILE,
                                     rope=rope, out=_gluon_out(dx_out, dy))

    sums, dx = side_by_side(filter_grads, dx_pass, x.device if beside else None)
    return dx, *sums


def _filter_grad_outputs(z: Tensor, U: Tensor, static: Tensor | None, dz_out: Tensor | None):
    """Empty (dz, dU, ds) for sum_filter_grads to write into (dz: dz_out where given)."""
    return (_dz_target(z, dz_out), torch.empty(U.shape, dtype=U.dtype, device=U.device),
            torch.empty(static.shape, dtype=static.dtype, device=static.device) if static is not None else None)


def _grad_rank(R: int, has_static: bool) -> int:
    """R_P of the fused filter-gradient kernel's dU products: with a static filter, room for z's
    column of ones (ds_k from the dU product, v8)."""
    return max(16, next_pow2(R + 1 if has_static else R))


def _grad_meta(meta: dict, U: Tensor, static: Tensor | None) -> dict:
    """`meta` as the fused filter-gradient kernels take it: the dz products keep R's own padding
    (RZ_P, v15); the dU products make room for the ones column (R_P, _grad_rank)."""
    return meta | {"RZ_P": meta["R_P"], "R_P": _grad_rank(U.shape[0], static is not None)}


def _auto_variant(R: int, W: int, has_static: bool) -> str:
    """The filter-gradient kernels "auto" picks: fused, except where its W accumulators of
    [BLOCK_D, R_P] floats leave it 32 x 32 tiles with R floats of dz partials per row and tile, and
    the split kernels' extra reads of x and dy cost less. Side by side on an H200 at B=4, T=4096,
    D=2048 with a static filter (KERNELS.md, v16): R_P * W = 1024 took split at R = 64, W = 8 (922.8
    -> 780.7 us) and R = 128, W = 4 (1519.9 -> 531.3); at 512 fused stayed ahead (R = 64, W = 4:
    409.7 against 482.9), as it does by far at the paper's shape (118.2 against 330.8)."""
    return "split" if _grad_rank(R, has_static) * next_pow2(W) >= 1024 else "fused"


def _fused_backward(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool,
                    pos: Tensor | None, meta: dict, blocks: dict | None, dx_gluon: bool, gluon: bool,
                    dx_out: Tensor | None, dz_out: Tensor | None):
    """(dx, dz, dU, ds) with the fused filter-gradient kernel (or its Gluon twin) and dx one after the
    other. On a GPU the filter gradients go first, then their sums on a side stream beside dx, since
    they need only the partials (H200, KERNELS.md v38: the 300M gate conv on views 307.6 -> 304.6
    us, [16, 2048, 1024] 107.8 -> 105.6, [2, 1000, 512] with R = 5 and W = 3 12.1 -> 9.8); buffers
    are allocated before the fork (side_by_side; on the CPU one after the other, sums first)."""
    parts = _fused_filter_grad_partials(dy, x, z, U, static, pos, meta, blocks, gluon)
    outs = _filter_grad_outputs(z, U, static, dz_out)
    groups = x.shape[-1] // _group_size(z, U, x.shape[-1])
    sums, dx = side_by_side(lambda: sum_filter_grads(*parts, z, U, static, groups, outs=outs),
                            lambda: _dx(dy, z, U, static, residual, pos, dx_gluon, out=dx_out), x.device)
    return dx, *sums


def _fused_filter_grads(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None,
                        pos: Tensor | None, meta: dict, blocks: dict | None, gluon: bool = False,
                        dz_out: Tensor | None = None):
    """(dz, dU, ds) from the fused filter-gradient kernel, or with `gluon` from its Gluon twin
    (gluon_lowrank: the same tiles, partials and results); dz_out as sum_filter_grads takes it."""
    parts = _fused_filter_grad_partials(dy, x, z, U, static, pos, meta, blocks, gluon)
    D = x.shape[-1]
    return sum_filter_grads(*parts, z, U, static, D // _group_size(z, U, D), dz_out)


def _fused_filter_grad_partials(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None,
                                pos: Tensor | None, meta: dict, blocks: dict | None, gluon: bool):
    """The fused filter-gradient kernel's partials (dz_part, du_part, ds_part; _filter_grad_buffers)."""
    B, T, D = x.shape
    R, W, d_group = U.shape[0], meta["W"], _group_size(z, U, D)
    meta = _grad_meta(meta, U, static)
    if gluon:  # its tiles are fixed (cannot_run has checked that groups take them)
        blocks = {"BLOCK_T": gluon_lowrank.BLOCK_T, "BLOCK_D": gluon_lowrank.BLOCK_D}
    else:
        blocks = _fit_group(blocks or _grad_blocks(meta["R_P"], next_pow2(W)), d_group, D)
    d_tiles = triton.cdiv(D, blocks["BLOCK_D"])
    # dz partials cost d_tiles floats per (row, r) and dU partials R*W*D floats per chunk: about
    # two programs per multiprocessor balances both against keeping the chip busy.
    chunk_t, chunks = time_chunks(T, B, d_tiles, blocks["BLOCK_T"], x.device, programs_per_processor=2)
    dz_part, du_part, ds_part = _filter_grad_buffers(x, U, static, d_tiles, chunks)
    if gluon:
        gluon_lowrank.filter_grad_partials(dy, x, z, U, pos, meta, d_group, chunk_t, chunks, dz_part, du_part, ds_part)
    else:
        _lowrank_filter_grad_kernel[(d_tiles, B * chunks)](
            x, z, U, pos if pos is not None else x, dy,
            dz_part, du_part, ds_part,
            B, T, D, R, x.stride(1), z.stride(1), d_group, chunks, chunk_t,
            **meta, **blocks,
        )
    return dz_part, du_part, ds_part


def _filter_grad_buffers(x: Tensor, U: Tensor, static: Tensor | None, d_tiles: int, chunks: int):
    """The fused filter-gradient kernels' float32 partials (dz_part, du_part, ds_part): dz per channel
    tile, dU and ds per time chunk (ds_part is du_part itself without a static filter)."""
    B, T, D = x.shape
    R, W = U.shape[0], U.shape[1] // D
    f32 = dict(device=x.device, dtype=torch.float32)
    du_part = torch.empty(B * chunks, R, W * D, **f32)
    return (torch.empty(d_tiles, B * T, R, **f32), du_part,
            torch.empty(B * chunks, W * D, **f32) if static is not None else du_part)


def sum_filter_grads(dz_part: Tensor, du_part: Tensor, ds_part: Tensor, z: Tensor, U: Tensor,
                     static: Tensor | None, groups: int, dz_out: Tensor | None = None,
                     outs: tuple | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dz, dU, ds) from the fused filter-gradient kernel's partials, in one launch: each of the
    `groups` channel groups' dz sums its own channel tiles' partials (tiles never straddle
    groups) into its R columns of dz [B, T, groups * R] (z's layout), or of dz_out (a view of the
    same shape, e.g. z's columns of a fused projection's gradient), which then comes back as dz.
    outs: (dz, dU, ds) to write into instead (_filter_grad_outputs)."""
    if outs is None:  # (dU and ds: the sums make their own)
        outs = (_dz_target(z, dz_out), None, None)
    return _sum_param_grads(du_part, ds_part, U, static, (dz_part, z.dtype, groups, outs[0]), outs=outs[1:])


def _dz_target(z: Tensor, dz_out: Tensor | None) -> Tensor:
    """Where the sums write dz: dz_out, or a new tensor in z's layout."""
    return dz_out if dz_out is not None else torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _sum_param_grads(du_part: Tensor, ds_part: Tensor, U: Tensor, static: Tensor | None, *first: tuple,
                     outs: tuple = (None, None)):
    """(*first's sums, dU, ds) from their partials (ds_part is du_part itself without a static
    filter), in one launch with the `first` sum_partials jobs (KERNELS.md, v21); outs: dU and ds
    to write into, where not None."""
    into = [(out.view(1, -1),) if out is not None else () for out in outs]  # (sum_partials_together's rows)
    jobs = [*first, (du_part, U.dtype, 1, *into[0])]
    if static is not None:
        jobs.append((ds_part, static.dtype, 1, *into[1]))
    sums = sum_partials_together(jobs)
    dU = sums[len(first)].view(U.shape)
    ds = sums[-1].view(static.shape) if static is not None else None
    return *sums[:len(first)], dU, ds


def _split_filter_grads(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Tensor | None,
                        pos: Tensor | None, meta: dict, blocks: dict | None):
    B, T, D = x.shape
    R, W, d_group = U.shape[0], meta["W"], _group_size(z, U, D)
    blocks = {**_split_blocks(meta["R_P"], next_pow2(W), meta["FP32_DOT"]), **(blocks or {})}
    pos_arg = pos if pos is not None else x
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dz_blocks = _fit_group(blocks["dz"], d_group, D)
    _lowrank_dz_kernel[(triton.cdiv(T, dz_blocks["BLOCK_T"]), B, D // d_group)](
        x, U, pos_arg, dy, dz, T, D, R, x.stride(1), d_group,
        W=W, R_P=meta["R_P"], HAS_POS=meta["HAS_POS"], DOT_DTYPE=meta["DOT_DTYPE"],
        FP32_DOT=meta["FP32_DOT"], **dz_blocks,
    )
    du_blocks = _fit_group(blocks["du"], d_group, D)
    d_tiles = triton.cdiv(D, du_blocks["BLOCK_D"])
    # One accumulator per program leaves room for several programs per multiprocessor; the
    # partials (R*W*D floats per chunk) stay small next to x and dy.
    chunk_t, chunks = time_chunks(T, B, d_tiles * W, du_blocks["BLOCK_T"], x.device, programs_per_processor=4)
    f32 = dict(device=x.device, dtype=torch.float32)
    du_part = torch.empty(B * chunks, R, W * D, **f32)
    ds_part = torch.empty(B * chunks, W * D, **f32) if static is not None else du_part
    _lowrank_du_kernel[(W, d_tiles, B * chunks)](
        x, z, pos_arg, dy, du_part, ds_part,
        T, D, R, x.stride(1), z.stride(1), d_group, chunks, chunk_t,
        **meta, **du_blocks,
    )
    return dz, *_sum_param_grads(du_part, ds_part, U, static)
