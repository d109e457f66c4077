"""The head-wise conv's forward and backward on Hopper, in Gluon (Triton's explicit-layout language),
for heads of 8 to 64 channels and up to 4 taps, on unpacked sequences.

Same algorithm as `triton_headwise_rows`' walks: a program owns ROWS rows of 512 channels and walks
them one row at a time, carrying the few neighbouring rows a tap needs, so each row of x, dy and w
is read once. D may be any multiple of 256: where it is an odd one (the 150M model's 768 and 2304),
the last program's upper half reads zeros and stores nothing (RAGGED_D). What the Triton kernels
could not say (ncu on the backward: issue-bound, 62% of issue slots used, ~43 instructions per
element where its arithmetic needs ~17):
- rows arrive by TMA, TR rows of x, dy and w per copy, STAGES tiles ahead into a ring, so no load
  needs registers, addresses or masks; rows before 0 and from T on come as zeros. x's and dy's boxes
  have 256-channel inner rows (512 bytes): with one head's 16 channels (32 bytes) per inner row, as
  first written, the walks streamed at ~83% of the copy rate even with their arithmetic stripped
  out, at 90-96% with these (KERNELS.md v26, point 31);
- the walk goes up: dw[u] and the static gradient's pairs dy[u] x[u-k] are complete at row u, and
  dx[u-W+1] completes there; the halo (W-1 rows below and above the program's rows) is a separate
  tile at each end, so the walk over the program's own rows needs no row masks;
- dw's head sums stay in the layout the reduction leaves them in (a head's lanes in neighbouring
  threads): no trip through shared memory and no barrier per sum, which the Triton kernel's store
  layout forced.
The loop takes 30 instructions per element instead of 43 (offline, Triton 3.6), and on the H200 the
paper's hs=16 backward 72.7 us instead of 90.1 (v25); with the wide boxes, halo tiles that copy only
what the walk reads and 4 stages, ~65 us (v26). The forward is the same walk without dy: ~41.5 us
against the Triton walk's 43.9. Errors against float64 equal the Triton walks'.
Heads of 128 channels are 4 per 512-channel tile, too few for w's 16-byte TMA rows; they and packed
sequences take the Triton walk (`cannot_run` says why). The static conv (no dynamic taps: HAS_W off,
rows laid out as heads of STATIC_HEAD) runs here where it rotates by RoPE (static q/k/v convs: one
call whose first channels rotate, ROPE_CHANNELS, a program's channels all or none); without RoPE
the two walks are equal (H200, [8, 4096, 3072]: forward 107.9 against the Triton walk's 110.1 us,
backward 183.0 against 181.0), and "auto" keeps the Triton one (triton_headwise._gluon_walk).

RoPE (q's and k's convs, KERNELS.md v34): the forward rotates each row of y before it stores it, and
the backward turns each row of dy back as it reads it, the halo rows above included. A row is then
laid out with a thread holding 4 channels of each half of one RoPE head (`_walk_layout`), so a pair's
two values are its own registers; a row's angles are the previous row's plus one step (the tables
are of positions 0 to T-1). At the 300M q conv ([8, 4096, 1024], hs=16, RoPE heads of 64) the
forward takes 40.3 us against 39.7 without rotating and the backward 72.7 against 71.7, where the
model's RoPE kernels took 40-41 us each. The backward rotating runs 128 rows per program in 2
stages (ROPE_BACKWARD_BLOCKS): with 256, two programs per multiprocessor left the longer chain
unhidden (94.6 us).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from isoflop.kernels.gluon_common import (
    TensorDescriptor,
    angle_sum,
    gl,
    gl_dtype,
    gluon,
    hopper_missing,
    mbarrier,
    tma_load,
    tma_misaligned,
)
from isoflop.kernels.triton_common import processor_count, sum_partials

CHANNELS, WARPS, MAX_WIDTH = 512, 2, 4
MIN_HEAD, MAX_HEAD = 8, 64  # a thread's 8 channels in one head; w's 16-byte TMA rows (512 / 64 = 8 heads)
BOX = 256  # channels per inner row of x's and dy's TMA boxes: the most a box dimension may hold
TR = 4  # rows per copy (KERNELS.md v25: 4 best of 4 and 8)
# Rows per program and copies in flight, the forward's and, by head size, the backward's: the best of
# 128-256 rows x 2-5 stages on the H200 at the paper's shape (KERNELS.md v26).
FORWARD_ROWS, FORWARD_STAGES = 128, 2
BACKWARD_BLOCKS = {8: (256, 3), 16: (256, 4), 32: (128, 2), 64: (128, 2)}
# The same turning dy back (RoPE), for every head size: 128 rows in 2 stages. At the 300M model's q
# conv ([8, 4096, 1024], RoPE heads of 64) 256 rows left two programs per multiprocessor and the
# walk's longer chain unhidden (hs=16: 94.6 us, 73.3 with these; hs=8: 84.1 -> 80.7; KERNELS.md v34).
ROPE_BACKWARD_BLOCKS = (128, 2)
# The static conv's walk (no dynamic taps, HAS_W false) lays its rows out as heads of 16 channels
# and walks with their blocks.
STATIC_HEAD = 16


def cannot_run(dy: Tensor | None, x: Tensor, w: Tensor | None, pos: Tensor | None, width: int) -> str | None:
    """Why the Gluon walks cannot take these inputs here (dy None: the forward's; w None: the static
    conv's, of `width` taps), or None if they can."""
    missing = hopper_missing(x) or shapes_missing(x, w, pos is not None, width)
    if missing:
        return missing
    dy = x if dy is None else dy
    if dy.dtype != x.dtype:
        return f"dy's type must be x's (got {dy.dtype}, {x.dtype})"
    misaligned = tma_misaligned("x", x) or tma_misaligned("dy", dy) or (w is not None and tma_misaligned("w", w))
    if misaligned:
        return misaligned
    if w is not None and w.stride(2) != w.shape[3]:
        return f"w's taps must lie H={w.shape[3]} apart (strides {tuple(w.stride())})"
    return None


def shapes_missing(x: Tensor, w: Tensor | None, packed: bool, width: int) -> str | None:
    """What `cannot_run` says of the inputs' shapes and types alone (no device, address or stride:
    what torch.compile can see while it traces a call, triton_headwise.rope_fuses), or None."""
    if packed:
        return "packed sequences take the Triton kernel"
    B, T, D = x.shape
    hs = head_size(x, w)
    if width > MAX_WIDTH:
        return f"it takes up to {MAX_WIDTH} taps (got {width})"
    if not (MIN_HEAD <= hs <= MAX_HEAD and hs & (hs - 1) == 0):
        return f"it takes heads of {MIN_HEAD} to {MAX_HEAD} channels, a power of two (got {hs})"
    if D % BOX:
        return f"D must be a multiple of {BOX} (got {D})"
    if not ((w is None or x.dtype == w.dtype) and x.dtype in (torch.float16, torch.bfloat16)):
        return f"it takes float16 or bfloat16 x, dy and w (got {x.dtype}, {w.dtype if w is not None else 'no w'})"
    if x.numel() == 0:
        return "the inputs are empty (a TMA descriptor needs every dimension > 0)"
    return None


def head_size(x: Tensor, w: Tensor | None) -> int:
    """The walk's head size: w's, or STATIC_HEAD for the static conv (which has no heads: it only
    lays out the rows, and RoPE heads must hold whole ones)."""
    return x.shape[-1] // w.shape[-1] if w is not None else STATIC_HEAD


def cannot_rotate(x: Tensor, w: Tensor | None, rope: tuple[Tensor, Tensor], channels: int | None = None) -> str | None:
    """Why the walks cannot rotate the first `channels` channels (default: all) by rope = (cos, sin)
    [T, half] (given that they take x and w), or None if they can: a thread holds 4 channels of each
    half of a RoPE head (_walk_layout), so the half must hold whole conv heads and at most 128
    channels (a warp's 32 threads of 4), and a program's 512 channels rotate all or none (so the
    rotated channels are a multiple of 512, or all D). Shapes only (as shapes_missing); the kernels
    take the tables as float32 contiguous."""
    cos, sin = rope
    half, hs = cos.shape[-1], head_size(x, w)
    if channels is not None and not _whole_programs(channels, x.shape[-1]):
        return f"it rotates whole programs' channels, a multiple of {CHANNELS} or all (got {channels})"
    if not (hs <= half <= 128 and half & (half - 1) == 0):
        return f"RoPE heads of 2 x {half} channels: the walks rotate halves of {hs} to 128 channels, a power of two"
    if cos.shape != (x.shape[1], half) or sin.shape != cos.shape:
        return f"cos and sin must be [T={x.shape[1]}, {half}] (got {tuple(cos.shape)}, {tuple(sin.shape)})"
    return None


def rows_per_program(T: int, D: int, B: int, device: torch.device, rows: int) -> int:
    """`rows` rows per program unless the grid would then leave multiprocessors idle: halved down to
    32 until it has a program for each (v25: [3, 1000, 512]'s backward 29.0 -> 12.6 us)."""
    while rows > 32 and triton.cdiv(T, rows) * triton.cdiv(D, CHANNELS) * B < processor_count(device):
        rows //= 2
    return rows


def backward(dy: Tensor, x: Tensor, w: Tensor | None, static: Tensor | None, residual: bool,
             blocks: dict | None = None, out: tuple[Tensor, Tensor | None] | None = None,
             rope: tuple[Tensor, Tensor] | None = None,
             rope_channels: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dx, dw (None for the static conv: w None) and the static filter's gradient (None without one),
    as `rows_backward` returns them (contiguous). x and w may be views (rows evenly strided:
    `cannot_run`). `blocks` overrides ROWS, TR and STAGES (benchmarks). out: views (dx [B, T, D], dw
    [B, T, W, H] or None) to store dx and dw into instead (columns of a fused projection's gradient;
    `stores_into` must accept them). rope: (cos, sin) as `forward` takes them, when dy is the
    gradient of the output whose first rope_channels channels (default: all) were rotated: the walk
    turns each row of theirs back as it reads it."""
    B, T, D = x.shape
    W = w.shape[2] if w is not None else static.shape[0]
    hs = head_size(x, w)
    rows, stages = ROPE_BACKWARD_BLOCKS if rope is not None else BACKWARD_BLOCKS[hs]
    blocks = {"ROWS": rows_per_program(T, D, B, x.device, rows), "TR": TR, "STAGES": stages} | (blocks or {})
    heads = CHANNELS // hs
    grid = (triton.cdiv(T, blocks["ROWS"]), triton.cdiv(D, CHANNELS), B)
    # dx and dw contiguous whatever x's and w's layouts, or the caller's views (stored by row strides)
    dx, dw = out if out is not None else (x.new_empty(x.shape), w.new_empty(w.shape) if w is not None else None)
    ds_part = torch.empty(B * grid[0], W * D, device=x.device, dtype=torch.float32) if static is not None else None
    tr = blocks["TR"]
    rows_x = _rows_descriptor(x, tr)
    _headwise_gluon_bwd_kernel[grid](
        rows_x, _rows_descriptor(dy, tr), _taps_descriptor(w, tr, heads) if w is not None else rows_x,
        static if static is not None else x, *_tables(rope, x), dx, dw if dw is not None else dx,
        ds_part if ds_part is not None else dx,
        T, D, D // hs, dx.stride(1), dw.stride(1) if dw is not None else 0, _rotated_channels(rope, rope_channels, D),
        W=W, W_P=triton.next_power_of_2(W), HS=hs, HEADS=heads, ROWS=blocks["ROWS"], TR=tr, STAGES=blocks["STAGES"],
        HAS_STATIC=static is not None, RESIDUAL=residual, **_rope_constants(rope, hs), DTYPE=gl_dtype(x), BOX=BOX,
        NUM_WARPS=WARPS, HAS_W=w is not None, RAGGED_D=D % CHANNELS != 0, num_warps=WARPS,
    )
    ds = sum_partials(ds_part, static.dtype).view(W, D) if static is not None else None
    return dx, dw, ds


def stores_into(out: tuple[Tensor, Tensor], x: Tensor, w: Tensor) -> bool:
    """Whether `backward` can store dx and dw into the views `out` (x's and w's shapes and types):
    rows evenly strided, each row's channels (taps by heads) contiguous."""
    def rows_of(view: Tensor, like: Tensor) -> bool:
        B, T = view.shape[:2]
        inner = view.stride()[-1] == 1 and (view.ndim == 3 or view.stride(2) == view.shape[3])
        return (view.shape == like.shape and view.dtype == like.dtype and inner
                and (B == 1 or view.stride(0) == T * view.stride(1)))

    return rows_of(out[0], x) and rows_of(out[1], w)


def forward(x: Tensor, w: Tensor | None, static: Tensor | None, residual: bool, blocks: dict | None = None,
            rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None) -> Tensor:
    """y [B, T, D] (contiguous), as `rows_forward` returns it; x and w may be views (`cannot_run`);
    w None is the static conv (static's taps alone). `blocks` overrides ROWS, TR and STAGES
    (benchmarks). rope: (cos, sin), float32 contiguous tables [T, head_dim / 2] of positions 0 to
    T-1 that `cannot_rotate` accepts: y's first rope_channels channels (default: all; a multiple of
    512, the programs' channels) come out rotated as reference.rotate_channels rotates them, in the
    walk, before they are stored."""
    B, T, D = x.shape
    blocks = {"ROWS": rows_per_program(T, D, B, x.device, FORWARD_ROWS), "TR": TR, "STAGES": FORWARD_STAGES} | (
        blocks or {})
    W = w.shape[2] if w is not None else static.shape[0]
    hs = head_size(x, w)
    heads = CHANNELS // hs
    y = x.new_empty(x.shape)
    grid = (triton.cdiv(T, blocks["ROWS"]), triton.cdiv(D, CHANNELS), B)
    tr = blocks["TR"]
    rows_x = _rows_descriptor(x, tr)
    _headwise_gluon_fwd_kernel[grid](
        rows_x, _taps_descriptor(w, tr, heads) if w is not None else rows_x, static if static is not None else x,
        *_tables(rope, x), y, T, D, D // hs, _rotated_channels(rope, rope_channels, D),
        W=W, W_P=triton.next_power_of_2(W), HS=hs, HEADS=heads, ROWS=blocks["ROWS"], TR=tr,
        STAGES=blocks["STAGES"], HAS_STATIC=static is not None, RESIDUAL=residual, **_rope_constants(rope, hs),
        DTYPE=gl_dtype(x), BOX=BOX, NUM_WARPS=WARPS, HAS_W=w is not None, RAGGED_D=D % CHANNELS != 0,
        num_warps=WARPS,
    )
    return y


def _rotated_channels(rope: tuple[Tensor, Tensor] | None, channels: int | None, D: int) -> int:
    """The kernels' ROPE_CHANNELS: how many leading channels rotate (a multiple of CHANNELS, or all
    D: a program's channels rotate all or none)."""
    channels = D if channels is None else channels
    if rope is not None and not _whole_programs(channels, D):
        raise ValueError(f"rope_channels={channels}: the walks rotate whole programs' channels, a multiple of "
                         f"{CHANNELS} or all {D}")
    return channels if rope is not None else 0


def _whole_programs(channels: int, D: int) -> bool:
    """Whether the first `channels` of D rotate as whole programs' channels (a program's rotate all or
    none): a multiple of CHANNELS, or all D."""
    return channels % CHANNELS == 0 or channels == D


def _tables(rope: tuple[Tensor, Tensor] | None, x: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin for the kernels' pointers (x, unread, without rope)."""
    return rope if rope is not None else (x, x)


def _rope_constants(rope: tuple[Tensor, Tensor] | None, hs: int) -> dict:
    """ROPE and HALF (half a RoPE head's channels; hs, unused, without rope)."""
    return {"ROPE": rope is not None, "HALF": rope[0].shape[-1] if rope is not None else hs}


def _rows_descriptor(t: Tensor, tr: int) -> TensorDescriptor:
    """x or dy [B, T, D] (rows evenly strided, channels contiguous) read in boxes of tr rows of a
    program's 512 channels, seen as [B, T, D // BOX, BOX] so that a box's inner rows are 512 bytes."""
    B, T, D = t.shape
    view = t.as_strided((B, T, D // BOX, BOX), (t.stride(0), t.stride(1), BOX, 1))
    return _descriptor(view, [1, tr, CHANNELS // BOX, BOX])


def _taps_descriptor(w: Tensor, tr: int, heads: int) -> TensorDescriptor:
    """w [B, T, W, H] read in boxes of tr rows of a program's heads; boxes are powers of two, so with
    W = 3 a zero-filled fourth tap comes along."""
    return _descriptor(w, [1, tr, triton.next_power_of_2(w.shape[2]), heads])


def _descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of a 4-D tensor read in `block` boxes, rows unswizzled (the walk reads them back
    one row at a time)."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=t.element_size() * 8, rank=4)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


if gluon is not None:  # the kernels exist only where Gluon's Hopper ops do

    @gluon.constexpr_function
    def _walk_layout(SHAPE, ROPE, NUM_WARPS):
        """The layout of a row of SHAPE, [NB, 2, NH, HS] (`_row_shape`). Without RoPE (NH = 1) a thread
        holds 8 channels of one head (16 bytes), a head's lanes in HS / 8 neighbouring threads, so its
        sum is a few shuffles and stays in their registers. With RoPE (RoPE heads of 2 NH HS channels,
        pairs (i, i + NH HS)) a thread holds 4 channels of each half of one RoPE head, so a pair's two
        values are its own registers and rotating them moves nothing between threads."""
        nh, hs, warps = int(SHAPE[2]), int(SHAPE[3]), int(NUM_WARPS)
        if ROPE:
            return gl.BlockedLayout([1, 2, 1, 4], [32 // (nh * hs // 4), 1, nh, hs // 4], [warps, 1, 1, 1],
                                    [3, 1, 2, 0])
        return gl.BlockedLayout([1, 1, 1, 8], [128 // hs, 2, 1, hs // 8], [warps, 1, 1, 1], [3, 2, 1, 0])

    @gluon.constexpr_function
    def _row_shape(HEADS, HS, ROPE, HALF):
        """A row of the program's 512 channels as [NB, 2, NH, HS]: NH heads of HS channels make a half
        of a RoPE head (one head without RoPE), two halves a pair of them, NB pairs the row; head
        (2 nb + half) NH + nh, channel that head's HS + lane."""
        nh = int(HALF) // int(HS) if ROPE else 1
        return [int(HEADS) // (2 * nh), 2, nh, int(HS)]

    @gluon.jit
    def _static_tap(s_ptr, offs, channels, c0, D, k: gl.constexpr, W: gl.constexpr, HAS_STATIC: gl.constexpr,
                    RESIDUAL: gl.constexpr, L: gl.constexpr):
        """Static tap k on this program's channels (+1 on tap 0 for the residual), float32."""
        tap = gl.zeros(offs.shape, gl.float32, L)
        if k < W:
            if HAS_STATIC:
                tap += gl.load(s_ptr + k * D + c0 + offs, mask=channels).to(gl.float32)
            if RESIDUAL:
                if k == 0:
                    tap += 1.0
        return tap

    @gluon.jit
    def _program(s_ptr, D, W: gl.constexpr, ROWS: gl.constexpr, TR: gl.constexpr, HAS_STATIC: gl.constexpr,
                 RESIDUAL: gl.constexpr, HEADS: gl.constexpr, HS: gl.constexpr, SHAPE: gl.constexpr,
                 L: gl.constexpr, RAGGED_D: gl.constexpr):
        """This program's first row, first head and first channel, its heads ([NB, 2, NH] in L's slice),
        channel offsets ([NB, 2, NH, HS] in L) and which of those lie in x (_channels), and the static
        taps on its channels. Both walks' limits: up to 4 taps, the W - 1 lags within one copy of TR
        rows, whole copies per program."""
        gl.static_assert(W <= 4)
        gl.static_assert(TR >= W - 1)
        gl.static_assert(ROWS % TR == 0)
        t_lo = gl.program_id(0) * ROWS
        h0 = gl.program_id(1) * HEADS
        c0 = h0 * HS
        head_l: gl.constexpr = gl.SliceLayout(3, L)
        nb = gl.arange(0, SHAPE[0], layout=gl.SliceLayout(1, gl.SliceLayout(2, head_l)))
        half = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, head_l)))
        nh = gl.arange(0, SHAPE[2], layout=gl.SliceLayout(0, gl.SliceLayout(1, head_l)))
        heads = ((gl.expand_dims(gl.expand_dims(nb, 1), 2) * 2 + gl.expand_dims(gl.expand_dims(half, 0), 2)) * SHAPE[2]
                 + gl.expand_dims(gl.expand_dims(nh, 0), 1))
        offs = gl.expand_dims(heads, 3) * HS + _lanes(HS, L)
        channels = _channels(offs, c0, D, RAGGED_D)
        s = ()
        for k in gl.static_range(W):
            s = s + (_static_tap(s_ptr, offs, channels, c0, D, k, W, HAS_STATIC, RESIDUAL, L),)
        return t_lo, h0, c0, heads, offs, channels, s

    @gluon.jit
    def _channels(offs, c0, D, RAGGED_D: gl.constexpr):
        """Which of the program's channels (offs from c0; or heads from h0 of H) lie in x: all (a mask
        the compiler drops) unless D is an odd multiple of 256 (RAGGED_D), where the last program's
        upper half lies past D: its TMA boxes read zeros there, and its loads and stores of those
        channels are masked."""
        if RAGGED_D:
            return c0 + offs < D
        return offs >= 0

    @gluon.jit
    def _lanes(HS: gl.constexpr, L: gl.constexpr):
        """0..HS-1 as [1, 1, 1, HS] in layout L: a channel's place in its head."""
        lanes = gl.arange(0, HS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(lanes, 0), 1), 2)

    @gluon.jit
    def _angles(cos_ptr, sin_ptr, t, T, rotate, inverse: gl.constexpr, HS: gl.constexpr, SHAPE: gl.constexpr,
                L: gl.constexpr):
        """cos and sin [1, 1, NH, HS] (in L) of the angles at row t of this thread's pairs' frequencies,
        and of their step from one row to the next (row 1; none with one row). The tables are of
        positions 0 to T-1 (check_rope_from_zero), so the angles of row t + 1 are those of row t plus
        the step's: the walk carries them (gluon_common.angle_sum) and reads 4 rows of the tables
        per program instead of one per row. `inverse` negates the angles (RoPE's gradient). Where
        the program's channels are not rotated (`rotate` false: past ROPE_CHANNELS) the angles are
        zero: cos 1 and sin 0 at every row, so the rotation leaves the values as they are."""
        nh = gl.arange(0, SHAPE[2], layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))
        f = gl.expand_dims(gl.expand_dims(gl.expand_dims(nh, 0), 1), 3) * HS + _lanes(HS, L)
        half = SHAPE[2] * HS
        on = (f >= 0) & rotate
        one = on & (T > 1)
        cos, sin = gl.load(cos_ptr + t * half + f, mask=on, other=1.0), gl.load(sin_ptr + t * half + f, mask=on,
                                                                              other=0.0)
        cos1, sin1 = gl.load(cos_ptr + half + f, mask=one, other=1.0), gl.load(sin_ptr + half + f, mask=one, other=0.0)
        if inverse:
            sin, sin1 = -sin, -sin1
        return cos, sin, cos1, sin1

    @gluon.jit
    def _rotated(y, cos, sin, L: gl.constexpr):
        """y [NB, 2, NH, HS] (float32, the pairs' two halves in each thread's registers: _walk_layout)
        rotated by the angles whose cos and sin are given: (lo, hi) -> (lo cos - hi sin, hi cos + lo sin),
        as reference.rotate_heads. The halves trade places by renaming registers (split, join)."""
        lo, hi = gl.split(gl.permute(y, [0, 2, 3, 1]))
        swapped = gl.convert_layout(gl.permute(gl.join(-hi, lo), [0, 3, 1, 2]), L, assert_trivial=True)
        return y * cos + swapped * sin

    @gluon.jit
    def _issue(x_tma, dy_tma, w_tma, x_desc, dy_desc, w_desc, bars, j, n_tiles, t, b, c, h0,
               STAGES: gl.constexpr, HAS_W: gl.constexpr):
        """TMA copies of the backward's tile j (rows t..) into ring slot j % STAGES, only what the walk
        reads of it: tile 0 (the rows below the program's) x alone, the last (the rows above) dy and
        w alone, the tiles between all three (w only with dynamic taps, HAS_W); none past the last."""
        s = j % STAGES
        bar = bars.index(s)
        w_bytes: gl.constexpr = w_desc.block_type.nbytes if HAS_W else 0
        if j == 0:
            mbarrier.expect(bar, x_desc.block_type.nbytes)
            tma_load(x_desc, [b, t, c, 0], bar, x_tma.index(s))
        elif j < n_tiles - 1:
            mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + w_bytes)
            tma_load(x_desc, [b, t, c, 0], bar, x_tma.index(s))
            tma_load(dy_desc, [b, t, c, 0], bar, dy_tma.index(s))
            if HAS_W:
                tma_load(w_desc, [b, t, 0, h0], bar, w_tma.index(s))
        elif j == n_tiles - 1:
            mbarrier.expect(bar, dy_desc.block_type.nbytes + w_bytes)
            tma_load(dy_desc, [b, t, c, 0], bar, dy_tma.index(s))
            if HAS_W:
                tma_load(w_desc, [b, t, 0, h0], bar, w_tma.index(s))

    @gluon.jit
    def _issue_forward(x_tma, w_tma, x_desc, w_desc, bars, j, n_tiles, t, b, c, h0, STAGES: gl.constexpr,
                       HAS_W: gl.constexpr):
        """The forward's tile j: tile 0 (the lags below the program's rows) x alone, then x and w (x
        alone without dynamic taps)."""
        s = j % STAGES
        bar = bars.index(s)
        w_bytes: gl.constexpr = w_desc.block_type.nbytes if HAS_W else 0
        if j == 0:
            mbarrier.expect(bar, x_desc.block_type.nbytes)
            tma_load(x_desc, [b, t, c, 0], bar, x_tma.index(s))
        elif j < n_tiles:
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_bytes)
            tma_load(x_desc, [b, t, c, 0], bar, x_tma.index(s))
            if HAS_W:
                tma_load(w_desc, [b, t, 0, h0], bar, w_tma.index(s))

    @gluon.jit
    def _rows_ring(desc, STAGES: gl.constexpr, TR: gl.constexpr, HEADS: gl.constexpr, HS: gl.constexpr,
                   SHAPE: gl.constexpr, BOX: gl.constexpr, DTYPE: gl.constexpr):
        """A ring of STAGES tiles of TR rows of x or dy: plain rows [STAGES * TR, NB, 2, NH, HS] for the
        walk's reads, and the same bytes seen as the TMA boxes [STAGES, 1, TR, 512 / BOX, BOX]."""
        ring = gl.allocate_shared_memory(DTYPE, [STAGES * TR] + SHAPE, gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
        return ring, ring.reinterpret(DTYPE, [STAGES, 1, TR, HEADS * HS // BOX, BOX], desc.layout)

    @gluon.jit
    def _taps_ring(desc, STAGES: gl.constexpr, TR: gl.constexpr, W_P: gl.constexpr, HEADS: gl.constexpr,
                   SHAPE: gl.constexpr, DTYPE: gl.constexpr):
        """The taps' ring: rows of W_P x [NB, 2, NH] heads' values, seen as the TMA boxes [STAGES, 1, TR,
        W_P, HEADS] (a view's layout may have one dimension less than the view: index() then drops the
        first)."""
        ring = gl.allocate_shared_memory(DTYPE, [STAGES * TR * W_P, SHAPE[0], 2, SHAPE[2]],
                                         gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        return ring, ring.reinterpret(DTYPE, [STAGES, 1, TR, W_P, HEADS], desc.layout)

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        """One barrier per ring slot, each waiting for its slot's copies."""
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _first_lags(x_ring, bars, TR: gl.constexpr, W: gl.constexpr, L: gl.constexpr):
        """x[u-1], x[u-2], ... for the program's first row u, from tile 0 (the rows below its own)."""
        mbarrier.wait(bars.index(0), 0)
        lags = ()
        for i in gl.static_range(W - 1):
            lags = lags + (x_ring.index(TR - 1 - i).load(L).to(gl.float32),)
        return lags

    @gluon.jit
    def _shifted(xr, lags, W: gl.constexpr):
        """The lags of the next row: x[u] becomes its x[u-1] and the oldest lag drops out."""
        if W > 1:
            new_lags = (xr,)
            for i in gl.static_range(W - 2):
                new_lags = new_lags + (lags[i],)
            lags = new_lags
        return lags

    @gluon.jit
    def _filters(w_ring, row, s, W: gl.constexpr, W_P: gl.constexpr, head_l: gl.constexpr, HAS_W: gl.constexpr):
        """The filter at row `row`: tap k is the ring's dynamic tap (a value per head, HAS_W) plus
        s_k, the static tap (with the residual), each [NB, 2, NH, HS] float32; s alone without
        dynamic taps (the static conv)."""
        f = s
        if HAS_W:
            f = ()
            for k in gl.static_range(W):
                f = f + (gl.expand_dims(w_ring.index(row * W_P + k).load(head_l).to(gl.float32), 3) + s[k],)
        return f

    @gluon.jit
    def _dx_step(dyr, f, pend, W: gl.constexpr):
        """Row u's dx contributions f_k[u] dy[u] (f: _filters) joined to the pending sums of
        dx[u-1..u-W+1] (pend[i]: dx[u-1-i]). Returns dx[u-W+1], now complete, and the pending sums
        for row u+1."""
        new = ()
        done = f[W - 1] * dyr
        if W > 1:
            done += pend[W - 2]
        for i in gl.static_range(W - 1):  # pending for rows u, u-1, ..., u-W+2
            p = f[i] * dyr
            if i > 0:
                p += pend[i - 1]
            new = new + (p,)
        return done, new

    @gluon.jit
    def _dy_row(dy_ring, row, angles, ROPE: gl.constexpr, L: gl.constexpr):
        """Row `row` of dy in float32, turned back by RoPE's inverse rotation where the forward rotated
        (angles: _angles' four, inverse), and the angles of the next row."""
        dyr = dy_ring.index(row).load(L).to(gl.float32)
        if ROPE:
            cos, sin, cos1, sin1 = angles
            dyr = _rotated(dyr, cos, sin, L)
            cos, sin = angle_sum(cos, sin, cos1, sin1)
            angles = (cos, sin, cos1, sin1)
        return dyr, angles

    @gluon.jit
    def _headwise_gluon_bwd_kernel(
        x_desc, dy_desc, w_desc, s_ptr, cos_ptr, sin_ptr, dx_ptr, dw_ptr, ds_part_ptr,
        T, D, H, DX_STRIDE, DW_STRIDE, ROPE_CHANNELS,
        W: gl.constexpr, W_P: gl.constexpr, HS: gl.constexpr, HEADS: gl.constexpr, ROWS: gl.constexpr, TR: gl.constexpr,
        STAGES: gl.constexpr, HAS_STATIC: gl.constexpr, RESIDUAL: gl.constexpr, ROPE: gl.constexpr,
        HALF: gl.constexpr, DTYPE: gl.constexpr, BOX: gl.constexpr, NUM_WARPS: gl.constexpr, HAS_W: gl.constexpr,
        RAGGED_D: gl.constexpr,
    ):
        """dx, dw (with dynamic taps, HAS_W) and the static filter's partial gradient, walking up; with
        ROPE, dy is the gradient of y's first ROPE_CHANNELS channels rotated by RoPE (heads of 2 HALF
        channels), and each of their rows is turned back as it is read."""
        SHAPE: gl.constexpr = _row_shape(HEADS, HS, ROPE, HALF)
        L: gl.constexpr = _walk_layout(SHAPE, ROPE, NUM_WARPS)
        head_l: gl.constexpr = gl.SliceLayout(3, L)

        b = gl.program_id(2)
        t_lo, h0, c0, heads, offs, channels, s = _program(s_ptr, D, W, ROWS, TR, HAS_STATIC, RESIDUAL, HEADS, HS,
                                                          SHAPE, L, RAGGED_D)
        x_ring, x_tma = _rows_ring(x_desc, STAGES, TR, HEADS, HS, SHAPE, BOX, DTYPE)
        dy_ring, dy_tma = _rows_ring(dy_desc, STAGES, TR, HEADS, HS, SHAPE, BOX, DTYPE)
        if HAS_W:
            w_ring, w_tma = _taps_ring(w_desc, STAGES, TR, W_P, HEADS, SHAPE, DTYPE)
        else:  # (no taps to copy: never read)
            w_ring, w_tma = x_ring, x_tma
        bars = _ring_barriers(STAGES)
        angles = ()
        if ROPE:
            angles = _angles(cos_ptr, sin_ptr, t_lo, T, c0 < ROPE_CHANNELS, True, HS, SHAPE, L)

        # Tiles: 0 holds the TR rows below the program's (x's lags), 1..ROWS/TR its rows, the last
        # the TR rows above (dy and taps for its last rows' dx).
        n_tiles = ROWS // TR + 2
        # The program's first rows of dx and dw; rows below are 32-bit offsets from them. A 64-bit
        # address per row from the runtime row strides cost ~5 us at the paper's shape (KERNELS.md v37).
        dx_base = dx_ptr + (b * T + t_lo).to(gl.int64) * DX_STRIDE + c0
        dw_base = dw_ptr + (b * T + t_lo).to(gl.int64) * DW_STRIDE + h0
        for j in gl.static_range(STAGES):
            _issue(x_tma, dy_tma, w_tma, x_desc, dy_desc, w_desc, bars, j, n_tiles, t_lo + (j - 1) * TR, b, c0 // BOX,
                   h0, STAGES, HAS_W)
        lags = _first_lags(x_ring, bars, TR, W, L)
        pend = ()
        for i in gl.static_range(W - 1):
            pend = pend + (gl.zeros(SHAPE, gl.float32, L),)
        acc = ()
        for k in gl.static_range(W):
            acc = acc + (gl.zeros(SHAPE, gl.float32, L),)

        for j in range(1, n_tiles - 1):
            _issue(x_tma, dy_tma, w_tma, x_desc, dy_desc, w_desc, bars, j + STAGES - 1, n_tiles,
                   t_lo + (j + STAGES - 2) * TR, b, c0 // BOX, h0, STAGES, HAS_W)
            slot = j % STAGES
            mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
            for r in gl.static_range(TR):
                u = t_lo + (j - 1) * TR + r
                row = slot * TR + r
                xr = x_ring.index(row).load(L).to(gl.float32)
                dyr, angles = _dy_row(dy_ring, row, angles, ROPE, L)
                f = _filters(w_ring, row, s, W, W_P, head_l, HAS_W)
                # pairs dy[u] x[u-k]: dw[u, k] (a head's sum) and the static filter's gradient
                dw_row = dw_base + (u - t_lo) * DW_STRIDE
                new_acc = ()
                for k in gl.static_range(W):
                    if k == 0:
                        df = dyr * xr
                    else:
                        df = dyr * lags[k - 1]
                    if HAS_W:
                        gl.store(dw_row + k * H + heads, gl.sum(df, axis=3).to(DTYPE),
                                 mask=_channels(heads, h0, H, RAGGED_D) & (u < T))
                    new_acc = new_acc + (acc[k] + df,)
                if HAS_STATIC:
                    acc = new_acc
                lags = _shifted(xr, lags, W)
                done, pend = _dx_step(dyr, f, pend, W)
                v = u - (W - 1)
                gl.store(dx_base + (v - t_lo) * DX_STRIDE + offs, done.to(DTYPE),
                         mask=channels & (v >= t_lo) & (v < T))

        # The rows above: their taps complete dx of the program's last W - 1 rows.
        last = n_tiles - 1
        slot = last % STAGES
        mbarrier.wait(bars.index(slot), (last // STAGES) & 1)
        for r in gl.static_range(W - 1):
            u = t_lo + ROWS + r
            row = slot * TR + r
            dyr, angles = _dy_row(dy_ring, row, angles, ROPE, L)
            done, pend = _dx_step(dyr, _filters(w_ring, row, s, W, W_P, head_l, HAS_W), pend, W)
            v = u - (W - 1)
            gl.store(dx_base + (v - t_lo) * DX_STRIDE + offs, done.to(DTYPE),
                     mask=channels & (v < T))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        if HAS_STATIC:
            part = ds_part_ptr + (b * gl.num_programs(0) + gl.program_id(0)).to(gl.int64) * (W * D) + c0 + offs
            for k in gl.static_range(W):
                gl.store(part + k * D, acc[k], mask=channels)

    @gluon.jit
    def _headwise_gluon_fwd_kernel(
        x_desc, w_desc, s_ptr, cos_ptr, sin_ptr, y_ptr,
        T, D, H, ROPE_CHANNELS,
        W: gl.constexpr, W_P: gl.constexpr, HS: gl.constexpr, HEADS: gl.constexpr, ROWS: gl.constexpr, TR: gl.constexpr,
        STAGES: gl.constexpr, HAS_STATIC: gl.constexpr, RESIDUAL: gl.constexpr, ROPE: gl.constexpr,
        HALF: gl.constexpr, DTYPE: gl.constexpr, BOX: gl.constexpr, NUM_WARPS: gl.constexpr, HAS_W: gl.constexpr,
        RAGGED_D: gl.constexpr,
    ):
        """y[u] = sum_k (w_k[u] + s_k) x[u-k] (s_0 + 1 with the residual; no w_k without dynamic taps,
        HAS_W), walking up with x[u-1..u-W+1] carried in registers; tile 0 brings the lags of the
        program's first row. With ROPE, y[u]'s first ROPE_CHANNELS channels come out rotated by RoPE
        (heads of 2 HALF channels) before they are stored."""
        SHAPE: gl.constexpr = _row_shape(HEADS, HS, ROPE, HALF)
        L: gl.constexpr = _walk_layout(SHAPE, ROPE, NUM_WARPS)
        head_l: gl.constexpr = gl.SliceLayout(3, L)

        b = gl.program_id(2)
        t_lo, h0, c0, heads, offs, channels, s = _program(s_ptr, D, W, ROWS, TR, HAS_STATIC, RESIDUAL, HEADS, HS,
                                                          SHAPE, L, RAGGED_D)
        x_ring, x_tma = _rows_ring(x_desc, STAGES, TR, HEADS, HS, SHAPE, BOX, DTYPE)
        if HAS_W:
            w_ring, w_tma = _taps_ring(w_desc, STAGES, TR, W_P, HEADS, SHAPE, DTYPE)
        else:  # (no taps to copy: never read)
            w_ring, w_tma = x_ring, x_tma
        bars = _ring_barriers(STAGES)
        if ROPE:
            cos, sin, cos1, sin1 = _angles(cos_ptr, sin_ptr, t_lo, T, c0 < ROPE_CHANNELS, False, HS, SHAPE, L)

        n_tiles = ROWS // TR + 1  # tile 0: the TR rows below the program's (lags), then its rows
        for j in gl.static_range(STAGES):
            _issue_forward(x_tma, w_tma, x_desc, w_desc, bars, j, n_tiles, t_lo + (j - 1) * TR, b, c0 // BOX, h0,
                           STAGES, HAS_W)
        lags = _first_lags(x_ring, bars, TR, W, L)

        for j in range(1, n_tiles):
            _issue_forward(x_tma, w_tma, x_desc, w_desc, bars, j + STAGES - 1, n_tiles,
                           t_lo + (j + STAGES - 2) * TR, b, c0 // BOX, h0, STAGES, HAS_W)
            slot = j % STAGES
            mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
            for r in gl.static_range(TR):
                u = t_lo + (j - 1) * TR + r
                row = slot * TR + r
                xr = x_ring.index(row).load(L).to(gl.float32)
                f = _filters(w_ring, row, s, W, W_P, head_l, HAS_W)
                y = f[0] * xr
                for k in gl.static_range(1, W):
                    y += f[k] * lags[k - 1]
                if ROPE:
                    y = _rotated(y, cos, sin, L)
                    cos, sin = angle_sum(cos, sin, cos1, sin1)
                gl.store(y_ptr + (b * T + u).to(gl.int64) * D + c0 + offs, y.to(DTYPE), mask=channels & (u < T))
                lags = _shifted(xr, lags, W)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
