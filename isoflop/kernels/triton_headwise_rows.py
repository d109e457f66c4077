"""Row-walking kernels for the head-wise and static short convolution, for filters of up to 4 taps.

    y[t, d] = residual * x[t, d] + sum_k (w[t, k, d // hs] + s[k, d]) * x[t-k, d]

The tiled kernels (triton_headwise.py) load every row W times, once per lag, from L1; ncu found their
backward bound by L1 (KERNELS.md, v9). Here a program owns ROWS consecutive rows of one channel tile
and walks them one row at a time, keeping the few neighbouring rows a tap needs in registers, so
each element of x and dy is loaded once (plus a halo of W-1 rows per program):

- forward, walking up: y[u] = sum_k tap_k[u] * x[u-k], with x[u-1..u-3] carried;
- backward, walking down from W-1 rows above the program's rows to W-1 rows below them:
  dy[u] * tap_k[u] is added to a pending sum of dx[u-k] (c1..c3 carried), which is complete when the
  walk reaches u-k; the filter gradient's pairs dy[u+k] * x[u] use dy[u+1..u+3] carried.

Rows are read 4 at a time, all of a group's loads before its arithmetic: a store may alias a later
load as far as the compiler knows, so loads issued row by row would each wait for the previous
row's store (one load latency per row: the first prototype, KERNELS.md v9). The backward's walk can
also be software-pipelined (STAGES > 1): the compiler then copies the next groups' rows into shared
memory asynchronously while this group's arithmetic runs, so loads stay in flight without costing
registers. The static conv's backward takes it (KERNELS.md v11), and since the position masks went
(v24) so does the backward of heads of 8+ channels; narrower heads' were slower with it (their
per-head tap loads are too narrow to copy asynchronously). Taps are
written out one by one up to 4 (Triton has no arrays of tensors); wider filters take the tiled
kernels. Channel tiles hold whole heads, as in triton_headwise.py, so dw is complete in one program
and written directly; the static filter's gradient has one partial row per program, summed in a
fixed order afterwards (deterministic, no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from isoflop.kernels.triton_common import sum_partials, tile_channels

MAX_WIDTH = 4


@triton.jit
def _static_tap(s_ptr, d, c_ok, k: tl.constexpr, W: tl.constexpr, D, HAS_STATIC: tl.constexpr,
                RESIDUAL: tl.constexpr, HEADS: tl.constexpr, HS_P: tl.constexpr):
    """Static tap k (+1 on tap 0 for the residual), [HEADS, HS_P] float32; zero for k >= W."""
    tap = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    if k < W:
        if HAS_STATIC:
            tap += tl.load(s_ptr + k * D + d, mask=c_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            if k == 0:
                tap += 1.0
    return tap


@triton.jit
def _row(ptr, b, T, STRIDE, u, d, c_ok):
    """Row u of a [B, T, D] tensor whose rows lie STRIDE elements apart, on the tile's channels,
    float32; zeros where u is outside [0, T)."""
    ok = (u >= 0) & (u < T)
    return tl.load(ptr + (b * T + u).to(tl.int64) * STRIDE + d, mask=c_ok & ok, other=0.0).to(tl.float32)


@triton.jit
def _position(pos_ptr, T, u, HAS_POS: tl.constexpr):
    """u's index inside its own sequence (u itself unless packed); -1 outside [0, T)."""
    ok = (u >= 0) & (u < T)
    q = u
    if HAS_POS:
        q = tl.load(pos_ptr + u, mask=ok, other=0)
    return tl.where(ok, q, -1)


@triton.jit
def _dyn_tap(w_ptr, b, T, H, WS, u, h, ok, k: tl.constexpr, W: tl.constexpr, HAS_DYN: tl.constexpr,
             HEADS: tl.constexpr):
    """Dynamic tap k of row u (rows WS elements apart), one value per head as [HEADS, 1] (broadcast
    over the head's lanes)."""
    w = tl.zeros([HEADS], dtype=tl.float32)
    if HAS_DYN:
        if k < W:
            row = (b * T + u).to(tl.int64)
            w = tl.load(w_ptr + row * WS + k * H + h, mask=ok & (h < H), other=0.0).to(tl.float32)
    return w[:, None]


@triton.jit
def _dyn_taps(w_ptr, b, T, H, WS, u, h, ok, W: tl.constexpr, HAS_DYN: tl.constexpr, HEADS: tl.constexpr):
    """Row u's four dynamic taps (zeros beyond W), loaded only where `ok`."""
    ok = ok & (u >= 0) & (u < T)
    return (_dyn_tap(w_ptr, b, T, H, WS, u, h, ok, 0, W, HAS_DYN, HEADS),
            _dyn_tap(w_ptr, b, T, H, WS, u, h, ok, 1, W, HAS_DYN, HEADS),
            _dyn_tap(w_ptr, b, T, H, WS, u, h, ok, 2, W, HAS_DYN, HEADS),
            _dyn_tap(w_ptr, b, T, H, WS, u, h, ok, 3, W, HAS_DYN, HEADS))


@triton.jit
def _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u, d, h, c_ok, taps_ok,
              W: tl.constexpr, HAS_DYN: tl.constexpr, HAS_POS: tl.constexpr, HEADS: tl.constexpr):
    """Row u's position, x and dynamic taps (loaded where taps_ok), in this order (row strides XS
    and WS)."""
    q = _position(pos_ptr, T, u, HAS_POS)
    xr = _row(x_ptr, b, T, XS, u, d, c_ok)
    w0, w1, w2, w3 = _dyn_taps(w_ptr, b, T, H, WS, u, h, taps_ok, W, HAS_DYN, HEADS)
    return xr, q, w0, w1, w2, w3


@triton.jit
def _strides(D, H, X_STRIDE, W_STRIDE, W: tl.constexpr, DENSE: tl.constexpr):
    """Row strides of x and w. DENSE (contiguous inputs) uses D and W * H, the strides y, dx and dw
    are written with, so x's and y's row addresses are one computation and the walk keeps the
    registers it had before views (hs=16 forward: 118 against 130 with a separate x stride, which
    cost a program per multiprocessor and a second wave; KERNELS.md, training point 14)."""
    if DENSE:
        return D, W * H
    return X_STRIDE, W_STRIDE


@triton.jit
def _program(s_ptr, T, D, H, W: tl.constexpr, HS: tl.constexpr, HS_P: tl.constexpr, ROWS: tl.constexpr,
             HEADS: tl.constexpr, HAS_STATIC: tl.constexpr, RESIDUAL: tl.constexpr):
    """This program's batch, heads, channels and channel mask, rows [t_lo, t_hi), and static taps."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h, d, c_ok = tile_channels(pid_c, H, HS, HS_P, HEADS)
    t_lo = pid_t * ROWS
    t_hi = tl.minimum(t_lo + ROWS, T)
    s0 = _static_tap(s_ptr, d, c_ok, 0, W, D, HAS_STATIC, RESIDUAL, HEADS, HS_P)
    s1 = _static_tap(s_ptr, d, c_ok, 1, W, D, HAS_STATIC, RESIDUAL, HEADS, HS_P)
    s2 = _static_tap(s_ptr, d, c_ok, 2, W, D, HAS_STATIC, RESIDUAL, HEADS, HS_P)
    s3 = _static_tap(s_ptr, d, c_ok, 3, W, D, HAS_STATIC, RESIDUAL, HEADS, HS_P)
    return b, h, d, c_ok, t_lo, t_hi, s0, s1, s2, s3


@triton.jit
def _in_sequence(q, k: tl.constexpr, value, HAS_POS: tl.constexpr):
    """value where lag k stays inside row u's sequence (its position q >= k), else 0. Unpacked, rows
    before 0 and from T on load as zeros and rows outside [t_lo, t_hi) are not stored, so every
    value there is already what the mask would make it: the mask is then left out (a select per
    element and tap; without them the hs=16 backward's loop went from 1550 to 1191 SASS
    instructions, KERNELS.md v24)."""
    if HAS_POS:
        value = tl.where(q >= k, value, 0.0)
    return value


@triton.jit
def _fwd_row(y_ptr, b, T, D, u, d, store_ok, x0, q, w0, w1, w2, w3, s0, s1, s2, s3, x1, x2, x3,
             W: tl.constexpr, HAS_POS: tl.constexpr):
    """y[u] from x[u] and the carried x[u-1..u-3] (lag k exists iff q >= k); returns the carry for
    row u+1."""
    y = (w0 + s0) * x0
    if W > 1:
        y += _in_sequence(q, 1, (w1 + s1) * x1, HAS_POS)
    if W > 2:
        y += _in_sequence(q, 2, (w2 + s2) * x2, HAS_POS)
    if W > 3:
        y += _in_sequence(q, 3, (w3 + s3) * x3, HAS_POS)
    tl.store(y_ptr + (b * T + u).to(tl.int64) * D + d, y.to(y_ptr.dtype.element_ty), mask=store_ok)
    return x0, x1, x2


@triton.jit
def _rows_fwd_kernel(
    x_ptr, w_ptr, s_ptr, pos_ptr, y_ptr,
    T, D, H, X_STRIDE, W_STRIDE,
    W: tl.constexpr, HS: tl.constexpr, HS_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr,
    DENSE: tl.constexpr = True,
):
    """One program per (ROWS rows, channel tile, batch); walks up from W-1 rows below its rows.
    x's rows lie X_STRIDE elements apart and w's W_STRIDE (views into a fused projection), or
    D and W * H when DENSE (see _strides)."""
    tl.static_assert(W <= 4)
    HEADS: tl.constexpr = BLOCK_C // HS_P
    b, h, d, c_ok, t_lo, t_hi, s0, s1, s2, s3 = _program(s_ptr, T, D, H, W, HS, HS_P, ROWS, HEADS,
                                                          HAS_STATIC, RESIDUAL)
    XS, WS = _strides(D, H, X_STRIDE, W_STRIDE, W, DENSE)
    # Separate zeros: on the GPU (Triton 3.6), loop-carried values that start as one value, or are
    # rotated by one tuple assignment (x3, x2, x1 = x2, x1, x0), came out mixed up.
    x1 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    x2 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    x3 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    for g in range(0, tl.cdiv(ROWS + W - 1, 4)):
        # u as a [1] tensor: masks that mix it with the channel mask broadcast in the interpreter too
        u = t_lo - (W - 1) + 4 * g + tl.zeros([1], dtype=tl.int32)
        # a row's x, then its taps (as in the backward; a few % faster than all x rows first)
        xa, qa, wa0, wa1, wa2, wa3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u, d, h, c_ok, u >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        xb, qb, wb0, wb1, wb2, wb3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u + 1, d, h, c_ok, u + 1 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        xc, qc, wc0, wc1, wc2, wc3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u + 2, d, h, c_ok, u + 2 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        xd, qd, wd0, wd1, wd2, wd3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u + 3, d, h, c_ok, u + 3 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        x1, x2, x3 = _fwd_row(y_ptr, b, T, D, u, d, c_ok & (u >= t_lo) & (u < t_hi),
                              xa, qa, wa0, wa1, wa2, wa3, s0, s1, s2, s3, x1, x2, x3, W, HAS_POS)
        x1, x2, x3 = _fwd_row(y_ptr, b, T, D, u + 1, d, c_ok & (u + 1 >= t_lo) & (u + 1 < t_hi),
                              xb, qb, wb0, wb1, wb2, wb3, s0, s1, s2, s3, x1, x2, x3, W, HAS_POS)
        x1, x2, x3 = _fwd_row(y_ptr, b, T, D, u + 2, d, c_ok & (u + 2 >= t_lo) & (u + 2 < t_hi),
                              xc, qc, wc0, wc1, wc2, wc3, s0, s1, s2, s3, x1, x2, x3, W, HAS_POS)
        x1, x2, x3 = _fwd_row(y_ptr, b, T, D, u + 3, d, c_ok & (u + 3 >= t_lo) & (u + 3 < t_hi),
                              xd, qd, wd0, wd1, wd2, wd3, s0, s1, s2, s3, x1, x2, x3, W, HAS_POS)


@triton.jit
def _pair(dw_ptr, df, q_v, v_in, v, b, T, h, H, k: tl.constexpr, W: tl.constexpr,
          HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, acc):
    """The filter gradient's pair (row v = u + k at position q_v, lag k), df = dy[v] * x[u]: dw[v, k]
    written when v is one of the program's rows (zero where x[v-k] lies outside v's sequence), and
    the static filter's gradient accumulated (the carried dy[v] is zero for v outside the
    program's rows: _bwd_row)."""
    df = _in_sequence(q_v, k, df, HAS_POS)
    if HAS_DYN:
        row = (b * T + v).to(tl.int64)
        tl.store(dw_ptr + row * (W * H) + k * H + h, tl.sum(df, axis=1).to(dw_ptr.dtype.element_ty),
                 mask=v_in & (h < H))
    if HAS_STATIC:
        acc += df
    return acc


@triton.jit
def _bwd_row(dx_ptr, dw_ptr, b, T, D, H, u, d, h, c_ok, t_lo, t_hi, dy0, x0, q,
             w0, w1, w2, w3, s0, s1, s2, s3, d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3,
             W: tl.constexpr, HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr):
    """Row u of the downward walk. dx[u] = tap_0[u] dy[u] + c1 completes (c1 holds the taps of
    rows above); dy[u] * tap_k[u] starts dx[u-k]'s pending sum (if u-k is in u's sequence); the pairs
    (u+k, k) use the carried dy[u+k] (positions q_k). Returns the carries for row u-1."""
    u_in = (u >= t_lo) & (u < t_hi)
    row = (b * T + u).to(tl.int64)
    tl.store(dx_ptr + row * D + d, ((w0 + s0) * dy0 + c1).to(dx_ptr.dtype.element_ty), mask=c_ok & u_in)
    n1 = c2
    n2 = c3
    n3 = tl.zeros_like(c3)
    if W > 1:
        n1 += _in_sequence(q, 1, (w1 + s1) * dy0, HAS_POS)
    if W > 2:
        n2 += _in_sequence(q, 2, (w2 + s2) * dy0, HAS_POS)
    if W > 3:
        n3 += _in_sequence(q, 3, (w3 + s3) * dy0, HAS_POS)
    # dy[u] as the pairs see it: zero outside the program's rows, whose static gradient is another
    # program's (one select per element and row, where the position masks took one per tap).
    if HAS_STATIC:
        dy0 = tl.where(u_in, dy0, 0.0)
    a0 = _pair(dw_ptr, dy0 * x0, q, u_in, u, b, T, h, H, 0, W, HAS_DYN, HAS_STATIC, HAS_POS, a0)
    if W > 1:
        v_in = (u + 1 >= t_lo) & (u + 1 < t_hi)
        a1 = _pair(dw_ptr, d1 * x0, q1, v_in, u + 1, b, T, h, H, 1, W, HAS_DYN, HAS_STATIC, HAS_POS, a1)
    if W > 2:
        v_in = (u + 2 >= t_lo) & (u + 2 < t_hi)
        a2 = _pair(dw_ptr, d2 * x0, q2, v_in, u + 2, b, T, h, H, 2, W, HAS_DYN, HAS_STATIC, HAS_POS, a2)
    if W > 3:
        v_in = (u + 3 >= t_lo) & (u + 3 < t_hi)
        a3 = _pair(dw_ptr, d3 * x0, q3, v_in, u + 3, b, T, h, H, 3, W, HAS_DYN, HAS_STATIC, HAS_POS, a3)
    return dy0, d1, d2, q, q1, q2, n1, n2, n3, a0, a1, a2, a3


@triton.jit
def _store_static_partial(ds_ptr, acc, k: tl.constexpr, W: tl.constexpr, d, c_ok, D):
    if k < W:
        tl.store(ds_ptr + k * D + d, acc, mask=c_ok)


@triton.jit
def _rows_bwd_kernel(
    x_ptr, w_ptr, s_ptr, pos_ptr, dy_ptr,
    dx_ptr, dw_ptr, ds_part_ptr,
    T, D, H, X_STRIDE, W_STRIDE,
    W: tl.constexpr, HS: tl.constexpr, HS_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    HAS_DYN: tl.constexpr, HAS_STATIC: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr,
    STAGES: tl.constexpr = 1, DENSE: tl.constexpr = True,
):
    """One program per (ROWS rows, channel tile, batch); walks down from W-1 rows above its rows
    (their taps reach its dx) to W-1 rows below them (their x pairs with its dy). STAGES > 1
    pipelines the walk's loads (groups of 4 rows in flight; 1: not pipelined). x and w may be
    views with evenly strided rows, as in the forward; dy, dx and dw are contiguous."""
    tl.static_assert(W <= 4)
    HEADS: tl.constexpr = BLOCK_C // HS_P
    b, h, d, c_ok, t_lo, t_hi, s0, s1, s2, s3 = _program(s_ptr, T, D, H, W, HS, HS_P, ROWS, HEADS,
                                                          HAS_STATIC, RESIDUAL)
    XS, WS = _strides(D, H, X_STRIDE, W_STRIDE, W, DENSE)
    # carried: dy[u+1..u+3] and their positions, dx's pending sums, the static gradient (see fwd
    # for why every carry starts as its own zeros)
    d1 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    d2 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    d3 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    q1 = tl.full([1], -1, dtype=tl.int32)
    q2 = tl.full([1], -1, dtype=tl.int32)
    q3 = tl.full([1], -1, dtype=tl.int32)
    c1 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    c2 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    c3 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    a0 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    a1 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    a2 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    a3 = tl.zeros([HEADS, HS_P], dtype=tl.float32)
    for g in tl.range(0, tl.cdiv(ROWS + 2 * (W - 1), 4), num_stages=STAGES):
        u = t_lo + ROWS + W - 2 - 4 * g + tl.zeros([1], dtype=tl.int32)
        # per row: x, taps, then dy (this order measured 10-40% faster than all dy rows, all x
        # rows, then the taps: hs=4 backward 232 -> 134 us). Rows below the program's feed none
        # of its dx: their taps are not loaded.
        xa, qa, wa0, wa1, wa2, wa3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u, d, h, c_ok, u >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        ya = _row(dy_ptr, b, T, D, u, d, c_ok)
        xb, qb, wb0, wb1, wb2, wb3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u - 1, d, h, c_ok, u - 1 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        yb = _row(dy_ptr, b, T, D, u - 1, d, c_ok)
        xc, qc, wc0, wc1, wc2, wc3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u - 2, d, h, c_ok, u - 2 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        yc = _row(dy_ptr, b, T, D, u - 2, d, c_ok)
        xd, qd, wd0, wd1, wd2, wd3 = _load_row(x_ptr, w_ptr, pos_ptr, b, T, XS, WS, H, u - 3, d, h, c_ok, u - 3 >= t_lo,
                                               W, HAS_DYN, HAS_POS, HEADS)
        yd = _row(dy_ptr, b, T, D, u - 3, d, c_ok)
        d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3 = _bwd_row(
            dx_ptr, dw_ptr, b, T, D, H, u, d, h, c_ok, t_lo, t_hi, ya, xa, qa, wa0, wa1, wa2, wa3,
            s0, s1, s2, s3, d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3, W, HAS_DYN, HAS_STATIC, HAS_POS)
        d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3 = _bwd_row(
            dx_ptr, dw_ptr, b, T, D, H, u - 1, d, h, c_ok, t_lo, t_hi, yb, xb, qb, wb0, wb1, wb2, wb3,
            s0, s1, s2, s3, d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3, W, HAS_DYN, HAS_STATIC, HAS_POS)
        d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3 = _bwd_row(
            dx_ptr, dw_ptr, b, T, D, H, u - 2, d, h, c_ok, t_lo, t_hi, yc, xc, qc, wc0, wc1, wc2, wc3,
            s0, s1, s2, s3, d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3, W, HAS_DYN, HAS_STATIC, HAS_POS)
        d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3 = _bwd_row(
            dx_ptr, dw_ptr, b, T, D, H, u - 3, d, h, c_ok, t_lo, t_hi, yd, xd, qd, wd0, wd1, wd2, wd3,
            s0, s1, s2, s3, d1, d2, d3, q1, q2, q3, c1, c2, c3, a0, a1, a2, a3, W, HAS_DYN, HAS_STATIC, HAS_POS)
    if HAS_STATIC:
        ds_ptr = ds_part_ptr + (b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * W * D
        _store_static_partial(ds_ptr, a0, 0, W, d, c_ok, D)
        _store_static_partial(ds_ptr, a1, 1, W, d, c_ok, D)
        _store_static_partial(ds_ptr, a2, 2, W, d, c_ok, D)
        _store_static_partial(ds_ptr, a3, 3, W, d, c_ok, D)


def row_strides(x: Tensor, w: Tensor | None) -> tuple[int, int]:
    """Row strides of x [B, T, D] and w [B, T, W, H] (W * H without w), whose rows must be evenly
    strided with unit channel stride and taps H apart (the ops copy other layouts)."""
    return x.stride(1), w.stride(1) if w is not None else 0


def dense(x: Tensor, w: Tensor | None) -> bool:
    """Whether x's and w's rows lie D and W * H elements apart (DENSE: the kernels' own strides)."""
    return x.stride(1) == x.shape[2] and (w is None or w.stride(1) == w.shape[2] * w.shape[3])


def row_grid(T: int, H: int, B: int, hs_p: int, blocks: dict) -> tuple[int, int, int]:
    return triton.cdiv(T, blocks["ROWS"]), triton.cdiv(H, blocks["BLOCK_C"] // hs_p), B


def rows_forward(x: Tensor, w: Tensor | None, static: Tensor | None, pos: Tensor | None,
                 meta: dict, blocks: dict) -> Tensor:
    """y, contiguous; x and w as `row_strides` describes them (meta holds its DENSE)."""
    B, T, D = x.shape
    H = D // meta["HS"]
    y = x.new_empty(x.shape)
    _rows_fwd_kernel[row_grid(T, H, B, meta["HS_P"], blocks)](
        x, w if w is not None else x, static if static is not None else x, pos if pos is not None else x, y,
        T, D, H, *row_strides(x, w), **meta, **blocks,
    )
    return y


def rows_backward(dy: Tensor, x: Tensor, w: Tensor | None, static: Tensor | None, pos: Tensor | None,
                  meta: dict, blocks: dict) -> tuple[Tensor, Tensor | None, Tensor | None]:
    B, T, D = x.shape
    H, W = D // meta["HS"], meta["W"]
    grid = row_grid(T, H, B, meta["HS_P"], blocks)
    dx = x.new_empty(x.shape)
    dw = w.new_empty(w.shape) if w is not None else None
    ds_part = torch.empty(B * grid[0], W * D, device=x.device, dtype=torch.float32) if static is not None else None
    _rows_bwd_kernel[grid](
        x, w if w is not None else x, static if static is not None else x, pos if pos is not None else x, dy,
        dx, dw if dw is not None else dx, ds_part if ds_part is not None else dx,
        T, D, H, *row_strides(x, w), **meta, **blocks,
    )
    ds = sum_partials(ds_part, static.dtype).view(W, D) if static is not None else None
    return dx, dw, ds
