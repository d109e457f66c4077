"""The low-rank conv's pass on Hopper, in Gluon (Triton's explicit-layout language): the forward and
dx, which is the same pass run on dy with leads instead of lags, as in `triton_lowrank`. What
ISOFLOP_LOWRANK_FWD=gluon and ISOFLOP_LOWRANK_DX select (`triton_lowrank.lowrank_forward` and
`lowrank_backward`; see FORWARD_VARIANT and DX_VARIANT there), for half types, R <= 16, W <= 4, T a
multiple of 64 and unpacked sequences (`cannot_run` says why not).

The forward computes what `triton_lowrank._lowrank_conv_kernel`'s does: f_k = z @ U_k on the matrix
units and y[t] = x[t] + sum_k (f_k[t] + s_k) x[t-k] in float32, with s_k added to f_k in registers
(v39; the Triton kernel folds s_k into its product as a rounded head and the tail the rounding lost,
and this kernel did so too, in a second product per tap that read 16 KB of operands per tile).
Its results are the Triton kernel's bit for bit without a static filter, and within a rounding of
f_k + s_k with one. dx[t] = dy[t] + sum_k (f_k[t+k] + s_k) dy[t+k] is the Triton dx's bit for bit
without a static filter; with one, the Triton dx adds s_k in float32 and this kernel its head and
tail (~16 bits) by the second product (in registers, as the forward, dx was slower: 42.6 -> 45.4 us
at the paper's shape, 195 registers). What is new is the orientation of the product (KERNELS.md,
v27 and v28):
- the product runs with channels along M and times along N, f_k^T = U_k^T @ z^T (64 x 64 tiles, one
  warpgroup). Its rows are channels 16w + 2g + h and its columns times 16c + 2j + s, so each thread
  holds two adjacent channels (one 32-bit pair) at 16 consecutive times (a run), and the four runs
  of a tile sit in the four lanes of a quad. A lag x[t-k] is then a register of the same thread,
  except for a run's first W - 1 times, which come from the lane to its left by shuffle (run 0's from
  the previous tile's run 3: the shuffle's result of the tile before). The Triton kernel (times
  along M) copies W + 1 shifted pieces of x through shared memory per tile instead. dx walks down
  in time, and its leads (of dy and of each tap's f) come from the lane to the right;
- x's tile arrives by TMA as [16 i, 4 c, 64 channels] (row 4i + c holds time 16c + i) from a
  strided view of x, so a thread's reads from shared memory are 32-bit pairs, and with the 128-byte
  swizzle the four runs of a read fall in at most two ways of bank conflict; z's tile arrives by
  TMA in the product's time order (a 5-D view of z); y goes back through shared memory by TMA store;
- STAGES tiles of x and z are in flight (4: 74 KB of shared memory, 65 KB since v39, three programs per
  multiprocessor at 156 registers); loads straight into registers, in the same layout, took 59-88
  us (each warp's 32-byte rows split every 128-byte line four ways: L1 stalls), and fewer stages
  lost (2: 59.4 us, 3: 44.7, 4: 41.2, 5: 42.4, 6: 43.6).
On the H200 at the paper's shape 41.2 us against the Triton kernel's 48.6 (same run), 300M conv
43.1 against 48.8, and faster at every shape of the 150M and 300M models' convs (-7% to -33%);
with the static filter in registers (v39) 40.1-40.8 us at the paper's shape.

The forward can also rotate y as attention's RoPE does (`rope`, ROPE; v31): each tile goes through
shared memory anyway, so before its TMA store the warps read it back with both halves of a 64-channel
head in one thread, rotate them by the tile's angles and write it again. The angles of time 64n + i
are the sum of the tables' rows 64n and i (v32; hence tables of positions 0 to T-1): cos and sin of
rows 0-63 stay in registers, and a tile reads 256 bytes of table instead of its 16 KB of rows, which
had bounded the kernel (v31: 67 us at the 300M q conv; v32: 53 against 44 without the rotation,
where the model's own compiled RoPE takes 40 more: benchmarks/rope_fusion.py). dx turns dy back the
same way (v33): each dy tile is rotated back in its ring slot before the walk reads it, by the
angles of the tile's first time (its table row, copied by TMA with the tile: loaded at use, its
latency made the pass cost 50 us a call instead of 20) and rows 0-63."""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from isoflop.kernels.gluon_common import (
    TensorDescriptor,
    angle_sum,
    cta_barrier,
    fence_async_shared,
    gl,
    gl_dtype,
    gluon,
    hopper_missing,
    lowrank_limits_missing,
    mbarrier,
    tma,
    tma_load,
    tma_misaligned,
    tma_store,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from isoflop.kernels.triton_common import processor_count, wave_fill

TILE, WARPS, STAGES, CHUNK = 64, 4, 4, 32  # times and channels per tile; copies in flight; tiles per program
# dx's registers where it turns dy back: with the filter gradients' 96 per thread at launch
# (gluon_lowrank.ROPE_REGS), one program of each fills a multiprocessor's 65,536.
DX_ROPE_REGS = 224
MAX_RANK, MAX_WIDTH = 16, 4


def cannot_run(x: Tensor, z: Tensor, U: Tensor, pos: Tensor | None, d_group: int) -> str | None:
    """Why the Gluon pass cannot take these inputs here (x: the forward's x, or dx's dy), or None if
    it can."""
    missing = hopper_missing(x) or shapes_missing(x, z, U, pos is not None, d_group)
    if missing:
        return missing
    T = x.shape[1]
    for name, t in (("x", x), ("z", z)):
        if t.stride(0) != T * t.stride(1):
            return f"{name}'s batches must follow each other (strides {tuple(t.stride())})"
    return tma_misaligned("x", x) or tma_misaligned("z", z)


def stores_into(out: Tensor, like: Tensor) -> bool:
    """Whether dx of dy = `like` can be stored by TMA into `out` in place: a view of like's shape and
    type into a wider buffer (a fused projection's gradient) with 16-byte aligned rows and sequences
    one after another."""
    B, T = out.shape[:2]
    return (out.shape == like.shape and out.dtype == like.dtype and (B == 1 or out.stride(0) == T * out.stride(1))
            and tma_misaligned("out", out) is None)


def shapes_missing(x: Tensor, z: Tensor, U: Tensor, packed: bool, d_group: int) -> str | None:
    """What `cannot_run` says of the inputs' shapes and types alone (no device, address or stride:
    what torch.compile can see while it traces a call, triton_lowrank.rope_fuses), or None."""
    if packed:
        return "packed sequences take the Triton kernel"
    if not (x.dtype == z.dtype and x.dtype in (torch.float16, torch.bfloat16)):
        return f"it takes float16 or bfloat16 x and z (got {x.dtype}, {z.dtype})"
    limits = lowrank_limits_missing(x, U, d_group, MAX_RANK, MAX_WIDTH, TILE)
    if limits:
        return limits
    T = x.shape[1]
    return f"T must be a multiple of {TILE} (got {T})" if T % TILE else None


def forward_tiles_per_program(T: int, D: int, B: int, device: torch.device, rotates: bool = False) -> int:
    """The forward's tiles per program (the sequence's last chunk may be shorter; KERNELS.md, point 39):
    up to three programs share a multiprocessor (156 registers, 65 KB), two where it rotates y (230
    registers: the angles of rows 0-63, and those of the next rotation through a tile's products)."""
    return _chunk(T // TILE, triton.cdiv(D, TILE) * B, processor_count(device), three_fit=not rotates,
                  extra_step=False)


def dx_tiles_per_program(T: int, D: int, B: int, device: torch.device) -> int:
    """dx's tiles per program, as the forward's, but at most two programs share a multiprocessor (190
    registers), and a chunk that ends before its sequence walks one more tile (its leads)."""
    return _chunk(T // TILE, triton.cdiv(D, TILE) * B, processor_count(device), three_fit=False, extra_step=True)


@functools.lru_cache(maxsize=1024)
def _chunk(tiles: int, across: int, processors: int, three_fit: bool, extra_step: bool) -> int:
    """Tiles per program for `tiles` per sequence and `across` (channel tiles x sequences), once per
    shape: of the even splits of a sequence into chunks of 2 to CHUNK tiles, the longest whose score
    is within 3% of the best, by a small model of H200 timings (KERNELS.md, point 39; it ranks the
    timed chunks of the paper's shape in their measured order, for both kernels). A grid of up to two
    programs per multiprocessor runs as one wave at two each; where three fit, a larger one runs three
    at a time, each ~10% slower than at two (the forward at the paper's shape: 22 tiles per program,
    three per multiprocessor, 46.7 us against 32 tiles, two, 41.1). A grid scores what its last wave
    leaves busy, times the share of a program's time spent on its own tiles: each program pays ~1.5
    tiles' time to start (copies in flight, U and its first lags or leads loaded), and dx's extra
    step where its chunk ends before the sequence does."""
    def score(chunk: int) -> float:
        programs = triton.cdiv(tiles, chunk) * across
        if programs <= 2 * processors or not three_fit:
            fill = wave_fill(programs, 2 * processors)
        else:
            fill = 0.9 * wave_fill(programs, 3 * processors)
        overhead = 1.5 + (1 if extra_step and chunk < tiles else 0)
        return fill * chunk / (chunk + overhead)

    splits = {triton.cdiv(tiles, n) for n in range(1, tiles + 1)}
    chunks = sorted((c for c in splits if 2 <= c <= CHUNK), reverse=True) or [min(tiles, 2)]
    best = max(score(c) for c in chunks)
    return next(c for c in chunks if score(c) >= 0.97 * best)


def forward(x: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool, d_group: int,
            chunk: int | None = None, rope: tuple | None = None) -> Tensor:
    """y [B, T, D] (contiguous) for inputs `cannot_run` accepts; U and static in any float type (the
    kernel rounds U to x's type for the products, as the Triton kernel does, and adds static in
    float32). `chunk` overrides the tiles per program (benchmarks). rope: (cos, sin, channels),
    float32 contiguous [T, 32] of positions 0 to T-1 (reference.check_rope_from_zero): the first
    `channels` channels (whole 64-channel heads) come out rotated (reference.rotate_channels), each
    tile in shared memory before its TMA store."""
    B, T, D = x.shape
    R, W = U.shape[0], U.shape[1] // D
    chunk = chunk or forward_tiles_per_program(T, D, B, x.device, rotates=rope is not None)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(T // TILE, chunk), triton.cdiv(D, TILE), B)
    _lowrank_gluon_fwd_kernel[grid](
        _runs_descriptor(x), _z_descriptor(z), _runs_descriptor(y), x, U, static if static is not None else x,
        *(rope if rope is not None else (x, x, 0)), T, D, R, x.stride(1), d_group,
        W=W, CHUNK=chunk, STAGES=STAGES, HAS_STATIC=static is not None, RESIDUAL=residual, DTYPE=gl_dtype(x),
        ROPE=rope is not None, num_warps=WARPS,
    )
    return y


def dx(dy: Tensor, z: Tensor, U: Tensor, static: Tensor | None, residual: bool, d_group: int,
       chunk: int | None = None, rope: tuple | None = None, out: Tensor | None = None) -> Tensor:
    """dx [B, T, D] (contiguous) for dy, z, U and static as `forward` takes x, z, U and static. rope:
    as `forward` takes it; dy is then the gradient of the rotated output, and each of its tiles is
    turned back (the rotation's gradient) in shared memory before the walk reads it. out: a view of
    dx's shape that the kernel stores into instead (`stores_into(out, dy)` must hold)."""
    B, T, D = dy.shape
    R, W = U.shape[0], U.shape[1] // D
    chunk = chunk or dx_tiles_per_program(T, D, B, dy.device)
    out = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device) if out is None else out
    grid = (triton.cdiv(T // TILE, chunk), triton.cdiv(D, TILE), B)
    dy_tiles = _runs_descriptor(dy)
    rows = (_row_descriptor(rope[0]), _row_descriptor(rope[1])) if rope is not None else (dy_tiles, dy_tiles)
    _lowrank_gluon_dx_kernel[grid](
        dy_tiles, _z_descriptor(z), _runs_descriptor(out), *rows, U, static if static is not None else dy,
        *(rope if rope is not None else (dy, dy, 0)), T, D, R, d_group,
        W=W, CHUNK=chunk, STAGES=STAGES, HAS_STATIC=static is not None, RESIDUAL=residual, DTYPE=gl_dtype(dy),
        ROPE=rope is not None, num_warps=WARPS, **({"maxnreg": DX_ROPE_REGS} if rope is not None else {}),
    )
    return out


# Host time per call counts: all-linear models make ~7 of these calls per layer and step (v27's first
# version cost ~90 us per call more than the Triton kernel's launch; profiled, the descriptors' views,
# layouts and the device query were half of it). The descriptors take the tensor itself as their
# base (only its address and type are read), and their layouts are made once.


def _runs_descriptor(t: Tensor) -> TensorDescriptor:
    """x, y, dy or dx [B, T, D] as tiles [B * T / 64, 16 i, 4 c, D]: element (n, i, c, d) is time 16c + i of
    tile n, so a box [1, 16, 4, 64] lands row 4i + c of shared memory with time 16c + i."""
    B, T, D = t.shape
    rs = t.stride(1)
    return TensorDescriptor(t, [B * T // TILE, 16, 4, D], [TILE * rs, rs, 16 * rs, 1], [1, 16, 4, TILE],
                            _swizzled(128, t.element_size() * 8, 4))


def _row_descriptor(table: Tensor) -> TensorDescriptor:
    """A rope table (cos or sin [T, 32], float32) as rows, one per box: dx copies each tile's first row
    along with the tile."""
    return TensorDescriptor(table, list(table.shape), list(table.stride()), [1, 32], _swizzled(0, 32, 2))


def _z_descriptor(z: Tensor) -> TensorDescriptor:
    """z [B, T, G*R] as tiles [B * T / 64, 8 j, 4 c, 2 s, G*R]: a box [1, 8, 4, 2, 16] lands row
    8j + 2c + s (the product's column) with time 16c + 2j + s, as the product's B operand wants it.
    Columns past this group's R come along; U's rows for them are zeros."""
    B, T, C = z.shape
    rs = z.stride(1)
    return TensorDescriptor(z, [B * T // TILE, 8, 4, 2, C], [TILE * rs, 2 * rs, 16 * rs, rs, 1], [1, 8, 4, 2, MAX_RANK],
                            _swizzled(32, z.element_size() * 8, 5))


@functools.cache
def _swizzled(swizzle: int, bits: int, rank: int):
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=bits, rank=rank)


if gluon is not None:  # the kernels exist only where Gluon's Hopper ops do

    @gluon.jit
    def _channel(m):
        """The product's row m holds channel 16w + 2g + h of the tile (m = 16w + g + 8h): the rows a
        thread holds (g and g + 8 of its warp's 16) are then two adjacent channels."""
        return (m // 16) * 16 + (m % 8) * 2 + (m // 8) % 2

    @gluon.jit
    def _split_times(t, run_l: gl.constexpr):
        """[64 channels, 4 runs, 2, 2, 2, 2] (the time within a run, its bits from the lowest) as 16
        tensors [64, 4] (run_l), tensor i holding time i of each run. Only registers are renamed."""
        parts = (t,)
        for level in gl.static_range(4):
            new = ()
            for p in gl.static_range(len(parts)):
                lo, hi = gl.split(parts[p])
                new = new + (lo, hi)
            parts = new
        out = ()
        for i in gl.static_range(16):
            out = out + (gl.convert_layout(parts[i], run_l, assert_trivial=True),)
        return out

    @gluon.jit
    def _product_runs(f, run_l: gl.constexpr):
        """The product's accumulator [64 rows, 64 columns] as 16 tensors [64 channels, 4 runs] (see
        _channel and the module's docstring): channel = m5 m4 m2 m1 m0 m3, run = n2 n1, time in the
        run = n5 n4 n3 n0 in the bits of row m and column n."""
        f = gl.reshape(f, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # m5 .. m0, n5 .. n0
        f = gl.permute(f, [0, 1, 3, 4, 5, 2, 9, 10, 11, 8, 7, 6])
        return _split_times(gl.reshape(f, [64, 4, 2, 2, 2, 2]), run_l)

    @gluon.jit
    def _tile_runs(t, run_l: gl.constexpr):
        """A tile [16 i, 4 runs, 64 channels] as 16 tensors [64 channels, 4 runs] (run_l)."""
        return _split_times(gl.permute(gl.reshape(t, [2, 2, 2, 2, 4, 64]), [5, 4, 3, 2, 1, 0]), run_l)

    @gluon.jit
    def _runs_tile(parts):
        """The inverse of _tile_runs."""
        for level in gl.static_range(4):
            new = ()
            for p in gl.static_range(len(parts) // 2):
                new = new + (gl.join(parts[2 * p], parts[2 * p + 1]),)
            parts = new
        return gl.reshape(gl.permute(parts[0], [5, 4, 3, 2, 1, 0]), [16, 4, 64])

    @gluon.jit
    def _from_left(v):
        """v [64, 4] (run_l, 16-bit) of the lane to the left in each quad: run c - 1's (run 0 gets run 3's)."""
        return gl.inline_asm_elementwise(
            "{ .reg .b32 l, s; mov.u32 l, %laneid; add.u32 s, l, 3; and.b32 s, s, 3; "
            "and.b32 l, l, 0xfffffffc; or.b32 s, s, l; shfl.sync.idx.b32 $0, $1, s, 0x1f, 0xffffffff; }",
            "=r,r", [v], dtype=v.dtype, is_pure=True, pack=2)

    @gluon.jit
    def _from_right(v, PACK: gl.constexpr):
        """v [64, 4] (run_l; PACK 2 for 16-bit values, 1 for 32-bit) of the lane to the right in each
        quad: run c + 1's (run 3 gets run 0's)."""
        return gl.inline_asm_elementwise(
            "{ .reg .b32 l, s; mov.u32 l, %laneid; add.u32 s, l, 1; and.b32 s, s, 3; "
            "and.b32 l, l, 0xfffffffc; or.b32 s, s, l; shfl.sync.idx.b32 $0, $1, s, 0x1f, 0xffffffff; }",
            "=r,r", [v], dtype=v.dtype, is_pure=True, pack=PACK)

    @gluon.jit
    def _walk_operands(u_ptr, s_ptr, d0, D, R, W: gl.constexpr, HAS_STATIC: gl.constexpr, DTYPE: gl.constexpr):
        """The A and B operands every tile of a walk shares, in shared memory: U_k^T [64 rows, 16] per
        tap (rows in _channel's order), S_k^T (columns 0 and 1 the static tap's head and tail, as the
        Triton forward folds them) and ONES^T, whose rows 0 and 1 are ones, so S_k^T @ ONES^T is s_k."""
        BLOCK: gl.constexpr = 64
        small_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])  # [64, 16] operand tiles
        a_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, 16], DTYPE)
        b_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
        um = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, small_l))
        ur = gl.arange(0, 16, layout=gl.SliceLayout(0, small_l))
        ud = d0 + _channel(um)
        ut_smem = gl.allocate_shared_memory(DTYPE, [W, BLOCK, 16], a_s)
        st_smem = gl.allocate_shared_memory(DTYPE, [W, BLOCK, 16], a_s)
        for k in gl.static_range(W):
            u = gl.load(u_ptr + ur[None, :] * (W * D) + k * D + ud[:, None],
                        mask=(ud < D)[:, None] & (ur < R)[None, :], other=0.0)
            ut_smem.index(k).store(u.to(DTYPE))
            if HAS_STATIC:
                s_k = gl.load(s_ptr + k * D + ud, mask=ud < D, other=0.0).to(gl.float32)
                head = s_k.to(DTYPE)
                tail = (s_k - head.to(gl.float32)).to(DTYPE)
                st = gl.where((ur == 0)[None, :], head[:, None], gl.zeros([BLOCK, 16], DTYPE, small_l))
                st_smem.index(k).store(gl.where((ur == 1)[None, :], tail[:, None], st))
        ones_smem = gl.allocate_shared_memory(DTYPE, [BLOCK, 16], b_s)
        ones_smem.store(gl.where((ur < 2)[None, :], 1.0, gl.zeros([BLOCK, 16], gl.float32, small_l)).to(DTYPE))
        return ut_smem, st_smem, ones_smem.permute((1, 0))

    @gluon.jit
    def _program(u_ptr, s_ptr, D, R, D_GROUP, W: gl.constexpr, HAS_STATIC: gl.constexpr, DTYPE: gl.constexpr):
        """This program's place (its chunk, first channel, batch and the R columns of z its channels'
        group reads), the walk's operands (_walk_operands) and the products' zero accumulator."""
        gl.static_assert(W <= 4)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 64, 16])
        pid_t = gl.program_id(0)
        d0 = gl.program_id(1) * 64
        b = gl.program_id(2)
        g_col = (d0 // D_GROUP) * R
        ut_smem, st_smem, onest = _walk_operands(u_ptr, s_ptr, d0, D, R, W, HAS_STATIC, DTYPE)
        return pid_t, d0, b, g_col, ut_smem, st_smem, onest, gl.zeros([64, 64], gl.float32, acc_l)

    @gluon.jit
    def _static_taps(s_ptr, ch, D, W: gl.constexpr, HAS_STATIC: gl.constexpr):
        """s_k of the thread's channels `ch` as [64, 1] float32 in the runs' layout (k < W; nothing
        without a static filter), which the forward adds to f_k in registers (KERNELS.md, v39)."""
        out = ()
        for k in gl.static_range(W):
            if HAS_STATIC:
                out = out + (gl.load(s_ptr + k * D + ch, mask=ch < D, other=0.0).to(gl.float32)[:, None],)
            else:
                out = out + (0,)
        return out

    @gluon.jit
    def _rings(in_desc, z_desc, out_desc, STAGES: gl.constexpr, DTYPE: gl.constexpr):
        """STAGES slots for the walk's tiles of x (or dy) and z, each with its barrier, and two buffers
        for the tiles going out by TMA store."""
        BLOCK: gl.constexpr = 64
        in_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 16, 4, BLOCK], in_desc.layout)
        z_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 8, 4, 2, 16], z_desc.layout)
        out_bufs = gl.allocate_shared_memory(DTYPE, [2, 1, 16, 4, BLOCK], out_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        cta_barrier()
        return in_ring, z_ring, out_bufs, bars

    @gluon.jit
    def _tap_products(ut_smem, st_smem, zt, onest, k: gl.constexpr, zero, HAS_STATIC: gl.constexpr):
        """f_k^T + s_k, issued asynchronously: U_k^T @ z^T, then S_k^T @ ONES^T (the static filter's
        head and tail, as the Triton forward folds them)."""
        f = warpgroup_mma(ut_smem.index(k), zt, zero, use_acc=False, is_async=True)
        if HAS_STATIC:
            f = warpgroup_mma(st_smem.index(k), onest, f, is_async=True)
        return f

    @gluon.jit
    def _issue(x_desc, z_desc, x_ring, z_ring, bars, n, step, d0, g_col, STAGES: gl.constexpr, EXTRA: gl.constexpr = 0):
        """TMA copies of tile n of the [B * T / 64] view, the walk's step `step`, into its ring slot (and
        the caller's EXTRA bytes more, which it copies with the slot's barrier next)."""
        slot = step % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + z_desc.block_type.nbytes + EXTRA)
        tma_load(x_desc, [n, 0, 0, d0], bar, x_ring.index(slot))
        tma_load(z_desc, [n, 0, 0, 0, g_col], bar, z_ring.index(slot))

    @gluon.jit
    def _issue_dx(dy_desc, z_desc, cos_desc, sin_desc, dy_ring, z_ring, rows, bars, n, step, d0, g_col, t_first,
                  STAGES: gl.constexpr, ROPE: gl.constexpr):
        """_issue for dx; with ROPE also the tables' row t_first (the tile's first time) into `rows`."""
        if ROPE:
            _issue(dy_desc, z_desc, dy_ring, z_ring, bars, n, step, d0, g_col, STAGES,
                   EXTRA=cos_desc.block_type.nbytes + sin_desc.block_type.nbytes)
            slot = step % STAGES
            tma_load(cos_desc, [t_first, 0], bars.index(slot), rows.index(2 * slot))
            tma_load(sin_desc, [t_first, 0], bars.index(slot), rows.index(2 * slot + 1))
        else:
            _issue(dy_desc, z_desc, dy_ring, z_ring, bars, n, step, d0, g_col, STAGES)

    @gluon.jit
    def _slot_row(rows, step, STAGES: gl.constexpr):
        """The tables' row that _issue_dx copied for step `step` (its slot's copies landed), as
        _summed takes it."""
        half_l: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [2, 2, 1], [2, 1, 0])
        j_l: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, half_l))
        slot = step % STAGES
        return (rows.index(2 * slot).reshape([32]).load(j_l), rows.index(2 * slot + 1).reshape([32]).load(j_l))

    @gluon.jit
    def _slot_z(z_ring, bars, step, STAGES: gl.constexpr, DTYPE: gl.constexpr):
        """z^T of step `step`, the products' B operand, once the step's copies have landed."""
        b_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
        slot = step % STAGES
        mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
        return z_ring.index(slot).reshape([64, 16]).reinterpret(DTYPE, [64, 16], b_s).permute((1, 0))

    @gluon.jit
    def _slot_runs(in_ring, step, run_l: gl.constexpr, STAGES: gl.constexpr, DTYPE: gl.constexpr):
        """Step `step`'s tile of x (or dy) as 16 run tensors (see _tile_runs)."""
        runs_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        # The tile [16 i, 4 runs, 64 channels] as the runs hold it: a thread's channel pair, then i.
        tile_l: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [1, 0, 0], [2, 0, 0], [4, 0, 0], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 2], [0, 0, 4], [0, 0, 8]],
            warp_bases=[[0, 0, 16], [0, 0, 32]], block_bases=[], shape=[16, 4, 64])
        tile = in_ring.index(step % STAGES).reinterpret(DTYPE, [16, 4, 64], runs_s)
        return _tile_runs(tile.load(tile_l), run_l)

    @gluon.jit
    def _angle_offsets(cos_ptr, sin_ptr, rotate):
        """cos and sin [T, 32] (float32) at times 0-63, laid out as a tile [16 i, 4 c, 64 channels]
        holds them (16c + i), the halves _rotate_tile takes; nothing is read unless `rotate`."""
        # A thread's 16 angles of a time are 64 contiguous bytes of a table row (vector loads); this is
        # the layout _halves leaves each half of _rotate_tile's tile in.
        half_l: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [2, 2, 1], [2, 1, 0])
        i = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, half_l)))
        c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, half_l)))
        j = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, half_l)))
        at = (16 * c[None, :, None] + i[:, None, None]) * 32 + j[None, None, :]
        return gl.load(cos_ptr + at, mask=rotate, other=0.0), gl.load(sin_ptr + at, mask=rotate, other=0.0)

    @gluon.jit
    def _angles(t_first, cos_ptr, sin_ptr, rotate, offsets):
        """cos and sin at the times of the tile from t_first on, by the angles' sum from the tables'
        row t_first and `offsets` (_angle_offsets, times 0-63): 256 bytes a tile instead of its 16 KB
        of table rows, which bounded the forward (67 against 47 us without them at the 300M q conv)."""
        return _summed(_first_row(t_first, cos_ptr, sin_ptr, rotate), offsets)

    @gluon.jit
    def _first_row(t_first, cos_ptr, sin_ptr, rotate):
        """cos and sin of the tables' row t_first, as _summed takes them (the forward loads them at the
        top of a tile, before its products; dx has them copied with its tiles, _slot_row)."""
        half_l: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [2, 2, 1], [2, 1, 0])
        j = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, half_l)))
        return (gl.load(cos_ptr + t_first * 32 + j, mask=rotate, other=0.0),
                gl.load(sin_ptr + t_first * 32 + j, mask=rotate, other=0.0))

    @gluon.jit
    def _summed(row, offsets):
        """cos and sin of the angles' sums of a tile's first time (`row`, _first_row) and its offsets."""
        return angle_sum(row[0][None, None, :], row[1][None, None, :], *offsets)

    @gluon.jit
    def _rotate_tile(tile, angles, DTYPE: gl.constexpr, INVERSE: gl.constexpr = False):
        """Rotate a tile [16 i, 4 c, 64 channels] of one head in shared memory in place by its
        `angles` (_angles): pairs (j, j + 32), from the values in DTYPE, as reference.rotate_heads
        does (INVERSE: back, by the negated angles). A thread holds 16 channels of each half."""
        pair_l: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [2, 2, 1], [2, 1, 0])
        lo, hi = _halves(tile.load(pair_l).to(gl.float32))
        cos = gl.convert_layout(angles[0], lo.type.layout, assert_trivial=True)
        sin = gl.convert_layout(angles[1], lo.type.layout, assert_trivial=True)
        if INVERSE:
            sin = -sin
        tile.store(_joined(lo * cos - hi * sin, lo * sin + hi * cos).to(DTYPE))

    @gluon.jit
    def _halves(v):
        """v [16, 4, 64] as its channels 0-31 and 32-63, each [16, 4, 32] (registers renamed)."""
        return gl.split(gl.permute(gl.reshape(v, [16, 4, 2, 32]), [0, 1, 3, 2]))

    @gluon.jit
    def _joined(lo, hi):
        """The inverse of _halves."""
        return gl.reshape(gl.permute(gl.join(lo, hi), [0, 1, 3, 2]), [16, 4, 64])

    @gluon.jit
    def _store_runs(out_bufs, out_desc, sums, n, d0, step, DTYPE: gl.constexpr, rotate, angles, ROPE: gl.constexpr):
        """The tile's 16 run tensors of float32 sums out to tile n by TMA store, through buffer step % 2
        (the caller has waited for the store two steps back, which read it); with ROPE and `rotate`,
        rotated first by `angles` (_rotate_tile)."""
        runs_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        out = ()
        for i in gl.static_range(16):
            out = out + (sums[i].to(DTYPE),)
        buf = out_bufs.index(step % 2)
        tile = buf.reinterpret(DTYPE, [16, 4, 64], runs_s)
        tile.store(_runs_tile(out))
        if ROPE:
            if rotate:
                cta_barrier()  # (every warp's part of the tile written)
                _rotate_tile(tile, angles, DTYPE)
        fence_async_shared()
        cta_barrier()
        tma_store(out_desc, [n, 0, 0, d0], buf)

    @gluon.jit
    def _first_lags(x_ptr, b, T, X_STRIDE, ch, D, t_first, rq, W: gl.constexpr):
        """x at the W - 1 times before t_first at the thread's channels `ch`, as [64, 4] (run_l) tensors
        (zeros before t = 0): the lags of a walk's first run, as _conv_tile's shuffles leave them for
        the tiles after."""
        before = ()
        for j in gl.static_range(W - 1):
            t = t_first - (W - 1) + j
            p = x_ptr + (b.to(gl.int64) * T + t) * X_STRIDE + ch
            before = before + (gl.load(p[:, None] + rq[None, :] * 0,
                                       mask=(ch < D)[:, None] & (rq >= 0)[None, :] & (t >= 0), other=0.0),)
        return before

    @gluon.jit
    def _conv_tile(ut_smem, zt, zero, x_ring, step, before, s_regs, first_run, run_l: gl.constexpr,
                   W: gl.constexpr, STAGES: gl.constexpr, HAS_STATIC: gl.constexpr, RESIDUAL: gl.constexpr,
                   DTYPE: gl.constexpr):
        """The forward's sums of step `step`'s tile (its x in x_ring, z^T `zt`) as 16 float32 run
        tensors, and `before` (the lags of the next tile's first run, _first_lags) moved on."""
        BLOCK: gl.constexpr = 64
        f = _tap_products(ut_smem, ut_smem, zt, zt, 0, zero, False)
        xr = _slot_runs(x_ring, step, run_l, STAGES, DTYPE)
        # The W - 1 times before each run: run c - 1's last (run 0: the previous tile's run 3's).
        xs = ()
        for j in gl.static_range(W - 1):
            h = _from_left(xr[16 - (W - 1) + j])
            xs = xs + (gl.where(first_run, before[j], h).to(gl.float32),)
            before = before[:j] + (h,) + before[j + 1:]
        for i in gl.static_range(16):
            xs = xs + (xr[i].to(gl.float32),)  # xs[i + W - 1]: time i of each run
        ys = ()
        for i in gl.static_range(16):
            if RESIDUAL:  # the sum starts as x[t]
                ys = ys + (xs[i + W - 1],)
            else:
                ys = ys + (gl.zeros([BLOCK, 4], gl.float32, run_l),)
        # Tap by tap, tap k + 1's products issued once tap k's are consumed (one accumulator live:
        # 156 registers, three programs per multiprocessor; two taps in flight timed the same).
        for k in gl.static_range(W):
            f = warpgroup_mma_wait(0, deps=(f,))
            taps = _product_runs(f, run_l)
            new = ()
            for i in gl.static_range(16):
                if HAS_STATIC:
                    new = new + (ys[i] + (taps[i] + s_regs[k]) * xs[i + W - 1 - k],)
                else:
                    new = new + (ys[i] + taps[i] * xs[i + W - 1 - k],)
            ys = new
            if k + 1 < W:
                f = _tap_products(ut_smem, ut_smem, zt, zt, k + 1, zero, False)
        return ys, before

    @gluon.jit
    def _lowrank_gluon_fwd_kernel(  # (the _lowrank_ prefix: profiles file it as conv time)
        x_desc, z_desc, y_desc, x_ptr, u_ptr, s_ptr, cos_ptr, sin_ptr, ROPE_CHANNELS,
        T, D, R, X_STRIDE, D_GROUP,
        W: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr, HAS_STATIC: gl.constexpr,
        RESIDUAL: gl.constexpr, DTYPE: gl.constexpr, ROPE: gl.constexpr,
    ):
        """y[t] = x[t] + sum_k (f_k[t] + s_k) x[t-k], walking CHUNK tiles up in time; with ROPE,
        channels below ROPE_CHANNELS rotated by cos and sin [T, 32]."""
        BLOCK: gl.constexpr = 64
        run_l: gl.constexpr = gl.BlockedLayout([2, 1], [8, 4], [4, 1], [1, 0])  # [64 channels, 4 runs]
        # (no static operands: s_k is added to f_k in registers, s_regs below)
        pid_t, d0, b, g_col, ut_smem, st_smem, onest, zero = _program(u_ptr, s_ptr, D, R, D_GROUP, W, False, DTYPE)
        x_ring, z_ring, y_bufs, bars = _rings(x_desc, z_desc, y_desc, STAGES, DTYPE)

        tile0 = pid_t * CHUNK  # the program's first tile in its sequence, and in the [B * T / 64] view:
        n0 = b * (T // BLOCK) + tile0
        n_tiles = gl.minimum(CHUNK, T // BLOCK - tile0)  # (the sequence's last chunk may be shorter)
        for j in gl.static_range(STAGES - 1):
            if j < n_tiles:
                _issue(x_desc, z_desc, x_ring, z_ring, bars, n0 + j, j, d0, g_col, STAGES)

        rc = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, run_l))
        rq = gl.arange(0, 4, layout=gl.SliceLayout(0, run_l))
        ch = d0 + rc
        s_regs = _static_taps(s_ptr, ch, D, W, HAS_STATIC)
        first_run = (rq == 0)[None, :]
        before = _first_lags(x_ptr, b, T, X_STRIDE, ch, D, tile0 * BLOCK, rq, W)

        rotate = d0 < ROPE_CHANNELS
        if ROPE:
            offsets = _angle_offsets(cos_ptr, sin_ptr, rotate)
        for tile in range(n_tiles):
            if ROPE:
                angles = _angles((tile0 + tile) * BLOCK, cos_ptr, sin_ptr, rotate, offsets)
            else:
                angles = 0
            zt = _slot_z(z_ring, bars, tile, STAGES, DTYPE)
            ys, before = _conv_tile(ut_smem, zt, zero, x_ring, tile, before, s_regs, first_run, run_l, W, STAGES,
                                    HAS_STATIC, RESIDUAL, DTYPE)
            # Every warp is done with this slot (x read, products waited for): refill it. And the TMA
            # store of two tiles back has read its buffer (y's two buffers): write this tile's y there.
            tma.store_wait(1)
            cta_barrier()
            if tile + STAGES - 1 < n_tiles:
                _issue(x_desc, z_desc, x_ring, z_ring, bars, n0 + tile + STAGES - 1, tile + STAGES - 1, d0, g_col,
                       STAGES)
            _store_runs(y_bufs, y_desc, ys, n0 + tile, d0, tile, DTYPE, rotate, angles, ROPE)
        tma.store_wait(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _lowrank_gluon_dx_kernel(  # (the _lowrank_ prefix: profiles file it as conv time)
        dy_desc, z_desc, dx_desc, cos_desc, sin_desc, u_ptr, s_ptr, cos_ptr, sin_ptr, ROPE_CHANNELS,
        T, D, R, D_GROUP,
        W: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr, HAS_STATIC: gl.constexpr,
        RESIDUAL: gl.constexpr, DTYPE: gl.constexpr, ROPE: gl.constexpr,
    ):
        """dx[t] = dy[t] + sum_k (f_k[t+k] + s_k) dy[t+k], walking CHUNK tiles down in time.

        Each tap's products give f_k at the run's own times; the leads of the run's last k times are
        the run to the right's first (by shuffle), and run 3's the next tile's run 0's: the walk goes
        down, so that tile came one step earlier, and the same shuffle left them in run 3's lanes
        then. A chunk that ends before its sequence does starts one tile later, a step that only
        leaves those values (leads past the sequence's end are zeros). With ROPE, channels below
        ROPE_CHANNELS of dy are turned back by cos and sin [T, 32] in each tile's ring slot first."""
        BLOCK: gl.constexpr = 64
        run_l: gl.constexpr = gl.BlockedLayout([2, 1], [8, 4], [4, 1], [1, 0])  # [64 channels, 4 runs]
        pid_t, d0, b, g_col, ut_smem, st_smem, onest, zero = _program(u_ptr, s_ptr, D, R, D_GROUP, W, HAS_STATIC,
                                                                      DTYPE)
        dy_ring, z_ring, dx_bufs, bars = _rings(dy_desc, z_desc, dx_desc, STAGES, DTYPE)

        tiles = T // BLOCK
        tile0 = pid_t * CHUNK
        n_tiles = gl.minimum(CHUNK, tiles - tile0)  # (the sequence's last chunk may be shorter)
        extra = (tile0 + n_tiles < tiles).to(gl.int32)  # 1: the walk starts at the tile after the chunk
        steps = n_tiles + extra
        n_top = b * tiles + tile0 + n_tiles - 1 + extra  # step w's tile is n_top - w in the [B * T / 64] view
        if ROPE:  # the tables' first row of each tile in flight
            rows = gl.allocate_shared_memory(gl.float32, [2 * STAGES, 1, 32], cos_desc.layout)
        else:
            rows = 0
        for j in gl.static_range(STAGES - 1):
            if j < steps:
                _issue_dx(dy_desc, z_desc, cos_desc, sin_desc, dy_ring, z_ring, rows, bars, n_top - j, j, d0, g_col,
                          (n_top - j - b * tiles) * BLOCK, STAGES, ROPE)

        rq = gl.arange(0, 4, layout=gl.SliceLayout(0, run_l))
        last_run = (rq == 3)[None, :]
        # What run 3 takes from the tile after: dy at its first W - 1 times, and tap k's f at its
        # first k (tap k's at after_f[k (k - 1) / 2 + j]); zeros past the sequence's end.
        after_dy = ()
        for j in gl.static_range(W - 1):
            after_dy = after_dy + (gl.zeros([BLOCK, 4], DTYPE, run_l),)
        after_f = ()
        for j in gl.static_range(W * (W - 1) // 2):
            after_f = after_f + (gl.zeros([BLOCK, 4], gl.float32, run_l),)

        rotate = d0 < ROPE_CHANNELS
        if ROPE:
            offsets = _angle_offsets(cos_ptr, sin_ptr, rotate)
        for step in range(steps):
            zt = _slot_z(z_ring, bars, step, STAGES, DTYPE)
            f = _tap_products(ut_smem, st_smem, zt, onest, 0, zero, HAS_STATIC)
            if ROPE:
                if rotate:  # dy turned back in its slot (while tap 0's products run)
                    runs_s: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
                    _rotate_tile(dy_ring.index(step % STAGES).reinterpret(DTYPE, [16, 4, 64], runs_s),
                                 _summed(_slot_row(rows, step, STAGES), offsets), DTYPE, INVERSE=True)
                    cta_barrier()  # (every warp's part of the tile turned)
            dyr = _slot_runs(dy_ring, step, run_l, STAGES, DTYPE)
            dyf = ()
            for i in gl.static_range(16):
                dyf = dyf + (dyr[i].to(gl.float32),)  # dyf[i]: dy at time i of each run
            for j in gl.static_range(W - 1):  # dyf[16 + j]: the W - 1 times after each run
                h = _from_right(dyr[j], 2)
                dyf = dyf + (gl.where(last_run, after_dy[j], h).to(gl.float32),)
                after_dy = after_dy[:j] + (h,) + after_dy[j + 1:]
            sums = ()
            for i in gl.static_range(16):
                if RESIDUAL:  # the sum starts as dy[t]
                    sums = sums + (dyf[i],)
                else:
                    sums = sums + (gl.zeros([BLOCK, 4], gl.float32, run_l),)
            for k in gl.static_range(W):
                f = warpgroup_mma_wait(0, deps=(f,))
                taps = _product_runs(f, run_l)
                for j in gl.static_range(k):  # taps[16 + j]: f_k at the k times after each run
                    h = _from_right(taps[j], 1)
                    taps = taps + (gl.where(last_run, after_f[k * (k - 1) // 2 + j], h),)
                    after_f = after_f[:k * (k - 1) // 2 + j] + (h,) + after_f[k * (k - 1) // 2 + j + 1:]
                new = ()
                for i in gl.static_range(16):
                    new = new + (sums[i] + taps[i + k] * dyf[i + k],)
                sums = new
                if k + 1 < W:
                    f = _tap_products(ut_smem, st_smem, zt, onest, k + 1, zero, HAS_STATIC)
            tma.store_wait(1)
            if ROPE:  # (the slot refilled next was written by the warps: order that before the copy)
                fence_async_shared()
            cta_barrier()
            if step + STAGES - 1 < steps:
                n = n_top - step - (STAGES - 1)
                _issue_dx(dy_desc, z_desc, cos_desc, sin_desc, dy_ring, z_ring, rows, bars, n, step + STAGES - 1, d0,
                          g_col, (n - b * tiles) * BLOCK, STAGES, ROPE)
            if step >= extra:  # (the extra step's tile is the next chunk's)
                _store_runs(dx_bufs, dx_desc, sums, n_top - step, d0, step, DTYPE, False, 0, False)
        tma.store_wait(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
