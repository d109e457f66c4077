"""The low-rank filter gradients on Hopper, in Gluon (Triton's explicit-layout language): the
backward's "gluon" variant, which "auto" takes wherever it can run (`cannot_run`) unless sequences
are packed (there it lost: triton_lowrank.lowrank_backward).

Same algorithm and results as `triton_lowrank._lowrank_filter_grad_kernel` (bit-identical: the same
df values, products and partial sums), one program per (64 channels, time chunk), 64-row tiles,
dU_k^T += df_k^T @ z and dz += df_k @ U_k^T per tap. What plain Triton could not say, and what it
buys (KERNELS.md, v22 and v29; paper shape 100 -> 67 -> 55 us, kernel alone):
- every tile's dy and lagged x[t-k] come by TMA, one box each, into a two-slot ring (the lags as
  their own boxes: a shared-memory view cannot start at a row offset, and the copies of the
  overlapping rows hit L2). Boxes start at t - k < 0 or reach past T: TMA fills zeros, so tiles need
  no masks;
- the two products run in warps of their own (v29): a loader warp fills the ring; the default
  partition (4 warps) forms df^T and runs dU's products (and ds_k = df_k^T @ E_k, E_k ones in column
  k, one accumulator for all taps); a worker partition (4 warps) forms df and runs dz's. Each reads
  dy and x from the ring in its own product's operand layout, so df never goes through shared
  memory, and each holds only its own accumulators: 128 and 88 registers, so two programs (16
  working warps) share a multiprocessor where the one-partition kernel's 214 registers gave 8;
- the products run asynchronously: tap k's are waited for only once tap k + 1's are issued, so a
  tap's df is formed while the previous tap's products run;
- where the forward rotated its output by RoPE (`rope`, v33), each consumer turns dy back in its
  own registers as it reads it: channels j and j + 32 of a head in one thread (dz's operand has
  them; dU's reads its rows in the order 8w + g + 32h, see _DU_NATURAL), the angles of a time the
  sum of two table rows' as in the forward (gluon_lowrank_conv._angles). That saves the separate
  inverse rotation's read and write of dy; it takes 96 registers per thread at launch (ROPE_REGS).
Gluon is experimental: its TMA load was renamed between Triton 3.6 and 3.7 (gluon_common); where
Gluon or its Hopper ops are missing, `cannot_run` says so and the Triton kernel runs.
"""

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
    tma_load,
    tma_misaligned,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_T, BLOCK_D, WARPS, STAGES = 64, 64, 4, 2
MAX_RANK, MAX_WIDTH = 16, 4
# Registers per thread of each part (v29). The launch gives every warp LAUNCH_REGS; the loader's warp
# group gives most of its share back, so the dU partition (the default, 4 warps) runs with
# 3 * LAUNCH_REGS - DZ_REGS - LOADER_REGS = 128: two programs of 12 warps fill the register file.
LAUNCH_REGS, DZ_REGS, LOADER_REGS = 80, 88, 24
# Ring slots when the kernel shares each multiprocessor with a dx program instead of a second
# program of its own (triton_lowrank._overlapped_backward): 139 KB beside dx's 76 KB.
OVERLAP_STAGES = 3
# (launch, dz partition) registers where the kernel turns dy back (rope): each consumer partition
# holds the angles of times 0-63 at its own elements for the program's life, so the dU partition
# gets 3 * 96 - 112 - LOADER_REGS = 152 (at 80 per thread at launch both spilled; KERNELS.md v33).
ROPE_REGS = (96, 112)


def cannot_run(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, d_group: int) -> str | None:
    """Why the Gluon kernel cannot take these inputs here, or None if it can."""
    missing = hopper_missing(x)
    if missing:
        return missing
    if not (x.dtype == dy.dtype == z.dtype and x.dtype in (torch.float16, torch.bfloat16)):
        return f"it takes float16 or bfloat16 x, dy and z (got {x.dtype}, {dy.dtype}, {z.dtype})"
    return (lowrank_limits_missing(x, U, d_group, MAX_RANK, MAX_WIDTH, BLOCK_D)
            or tma_misaligned("x", x) or tma_misaligned("dy", dy))


def filter_grad_partials(dy: Tensor, x: Tensor, z: Tensor, U: Tensor, pos: Tensor | None, meta: dict,
                         d_group: int, chunk_t: int, chunks: int, dz_part: Tensor, du_part: Tensor,
                         ds_part: Tensor, stages: int = STAGES, rope: tuple | None = None) -> None:
    """Fill the partial buffers as `triton_lowrank._fused_filter_grads` allocates them (`meta` there:
    RZ_P, W, HAS_STATIC, HAS_POS, DOT_DTYPE), with `stages` ring slots. rope: (cos, sin, channels) as
    gluon_lowrank_conv.forward takes it (unpacked sequences only): dy is the gradient of the output
    rotated there, and each of its tiles is turned back (the rotation's gradient) as it is read."""
    B, T, D = x.shape
    launch_regs, dz_regs = ROPE_REGS if rope is not None else (LAUNCH_REGS, DZ_REGS)
    _lowrank_gluon_filter_grad_kernel[(triton.cdiv(D, BLOCK_D), B * chunks)](
        tile_descriptor(x), tile_descriptor(dy), z, U, pos if pos is not None else x,
        *(rope if rope is not None else (x, x, 0)),
        dz_part, du_part, ds_part,
        B, T, D, U.shape[0], z.stride(1), d_group, chunks, chunk_t,
        W=meta["W"], RZ_P=meta["RZ_P"], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        HAS_STATIC=meta["HAS_STATIC"], HAS_POS=meta["HAS_POS"], DOT_DTYPE=gl_dtype(x), STAGES=stages,
        ROPE=rope is not None, DZ_REGS=dz_regs, LOADER_REGS=LOADER_REGS, num_warps=WARPS, maxnreg=launch_regs,
    )


def tile_descriptor(t: Tensor) -> TensorDescriptor:
    """The TMA descriptor the kernel reads t [B, T, D] (x or dy) through: [1, BLOCK_T, BLOCK_D] boxes,
    zeros outside t."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), _BLOCK, _tile_layout(gl_dtype(t)))


_BLOCK = [1, BLOCK_T, BLOCK_D]


@functools.cache
def _tile_layout(dtype):
    """The tiles' shared-memory layout for Gluon type `dtype`, made once per type (~6 us of host time
    per descriptor)."""
    return gl.NVMMASharedLayout.get_default_for(_BLOCK, dtype)


if gluon is not None:  # the kernel exists only where Gluon's Hopper ops do
    _R_P = gl.constexpr(MAX_RANK)  # dU's and ds's product width: R padded

    # Where the kernel turns dy back (ROPE): the rotation pairs channels j and j + 32 of a head (a
    # 64-channel tile), so each consumer reads dy in a layout where one thread holds both. dz's
    # operand (times along M, channels along K) already does: channel bit 5 is a register bit. dU's
    # (channels along M) holds rows 16w + g + 8h, channels 16w + g + 8h in the natural order; read
    # with rows and channels matched as channel 8w + g + 32h instead (_DU_NATURAL: the operand's
    # linear layout with the row bits permuted), a thread holds j and j + 32, and the product's rows
    # come out in that order (_du_channel), which the stores undo.
    _DU_NATURAL = gl.constexpr(gl.DistributedLinearLayout(  # [64 channels, 64 times], natural channel order
        reg_bases=[[0, 1], [32, 0], [0, 8], [0, 16], [0, 32]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[64, 64]))
    _DU_HALF = gl.constexpr(gl.DistributedLinearLayout(  # [32 channel pairs, 64 times]: _DU_NATURAL's halves
        reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8, 0], [16, 0]], block_bases=[], shape=[32, 64]))
    _DZ_HALF = gl.constexpr(gl.DistributedLinearLayout(  # [64 times, 32 channel pairs]: dz's operand's halves
        reg_bases=[[0, 1], [8, 0], [0, 8], [0, 16]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 32]))

    @gluon.jit
    def _du_channel(m, ROPE: gl.constexpr):
        """The tile channel of dU's product row m: m itself, or 8w + g + 32h for m = 16w + 8h + g
        where the kernel turns dy back (see _DU_NATURAL)."""
        if ROPE:
            return (m // 16) * 8 + m % 8 + ((m // 8) % 2) * 32
        return m

    @gluon.jit
    def _as_du_rows(v, layout: gl.constexpr):
        """v [64 channels, 64 times] (_DU_NATURAL) with its rows in _du_channel's order, as `layout`
        (dU's operand) holds them: only registers are renamed."""
        v = gl.reshape(gl.permute(gl.reshape(v, [2, 4, 8, 64]), [1, 0, 2, 3]), [64, 64])
        return gl.convert_layout(v, layout, assert_trivial=True)

    @gluon.jit
    def _offset_angles(cos_ptr, sin_ptr, times, pairs, rotate):
        """cos and sin of times 0-63 (the tables' first rows) at broadcast index tensors `times` and
        `pairs` (channel j of each half); 1 and 0 (no rotation) unless `rotate`."""
        at = times * 32 + pairs
        return gl.load(cos_ptr + at, mask=rotate, other=1.0), gl.load(sin_ptr + at, mask=rotate, other=0.0)

    @gluon.jit
    def _first_row(cos_ptr, sin_ptr, t0, T, pairs, rotate):
        """cos and sin of the tables' row t0 (clipped to T - 1: a partition loads the next tile's a tile
        ahead, whose latency would be the tile's at use) at `pairs`; 1 and 0 unless `rotate`."""
        return _offset_angles(cos_ptr, sin_ptr, gl.minimum(t0, T - 1), pairs, rotate)

    @gluon.jit
    def _turned_back(lo, hi, row, offsets):
        """The inverse rotation of the halves lo and hi (channels j and j + 32) of a tile, whose time
        t0 + i angles are the sum of the tables' row t0 (`row`, _first_row) and row i (`offsets`, as
        in gluon_lowrank_conv._angles: angle_sum): the pairs (lo cos + hi sin, hi cos - lo sin)."""
        cos, sin = angle_sum(*row, *offsets)
        cos = gl.convert_layout(cos, lo.type.layout, assert_trivial=True)
        sin = gl.convert_layout(sin, lo.type.layout, assert_trivial=True)
        return lo * cos + hi * sin, hi * cos - lo * sin

    @gluon.jit
    def _load_z(z_ptr, rows, t_end, base, Z_STRIDE, g_col, zr, R):
        """z's R columns for `rows` of this channel tile's group (zeros past the chunk and beyond R)."""
        return gl.load(z_ptr + (base + rows.to(gl.int64))[:, None] * Z_STRIDE + g_col + zr[None, :],
                       mask=(rows < t_end)[:, None] & (zr < R)[None, :], other=0.0)

    @gluon.jit
    def _positions(pos_ptr, t, t_end, HAS_POS: gl.constexpr):
        """Positions inside their packed sequences of rows t (with HAS_POS; else t itself, unused)."""
        if HAS_POS:
            return gl.load(pos_ptr + t, mask=t < t_end, other=0)
        return t

    @gluon.jit
    def _loader(x_desc, dy_desc, ring, ready, empty, b, d0, t_start, n_tiles,
                W: gl.constexpr, STAGES: gl.constexpr, BLOCK_T: gl.constexpr):
        """The loader warp: for tile number `it`, dy and x[t-k] for each tap k by TMA into ring slot
        it % STAGES, once both partitions have released that slot."""
        for it in range(n_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # (a fresh slot passes at once)
            bar = ready.index(s)
            mbarrier.expect(bar, (W + 1) * dy_desc.block_type.nbytes)
            t0 = t_start + it * BLOCK_T
            tma_load(dy_desc, [b, t0, d0], bar, ring.index(s * (W + 1)))
            for k in gl.static_range(W):
                tma_load(x_desc, [b, t0 - k, d0], bar, ring.index(s * (W + 1) + 1 + k))

    @gluon.jit
    def _dz_partition(ring, ready, empty, ut_smem, pos_ptr, cos_ptr, sin_ptr, rotate, dz_part_ptr, pid_d, B, T, R,
                      base, t_start, t_end, n_tiles, W: gl.constexpr, STAGES: gl.constexpr, RZ_P: gl.constexpr,
                      BLOCK_T: gl.constexpr, BLOCK_D: gl.constexpr, HAS_POS: gl.constexpr, DOT_DTYPE: gl.constexpr,
                      ROPE: gl.constexpr):
        """dz = sum_k df_k @ U_k^T per tile, stored as this channel tile's partial."""
        dz_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, RZ_P, 16])
        df_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dz_l, k_width=2)
        i = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, df_l))
        dzi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, dz_l))
        dzr = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, dz_l))
        if ROPE:
            times = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, _DZ_HALF))[:, None]
            pairs = gl.arange(0, 32, layout=gl.SliceLayout(0, _DZ_HALF))[None, :]
            offsets = _offset_angles(cos_ptr, sin_ptr, times, pairs, rotate)
            row_next = _first_row(cos_ptr, sin_ptr, t_start, T, pairs, rotate)
        for it in range(n_tiles):
            t0 = t_start + it * BLOCK_T
            if ROPE:
                row = row_next
                row_next = _first_row(cos_ptr, sin_ptr, t0 + BLOCK_T, T, pairs, rotate)
            p = _positions(pos_ptr, t0 + i, t_end, HAS_POS)
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            dy0 = ring.index(s * (W + 1)).reshape([BLOCK_T, BLOCK_D]).load(df_l).to(gl.float32)
            if ROPE:  # dy turned back, rounded as the ops' inverse rotation rounds it
                lo, hi = gl.split(gl.permute(gl.reshape(dy0, [BLOCK_T, 2, 32]), [0, 2, 1]))
                lo, hi = _turned_back(lo, hi, row, offsets)
                dy0 = gl.reshape(gl.permute(gl.join(lo, hi), [0, 2, 1]), [BLOCK_T, BLOCK_D])
                dy0 = gl.convert_layout(dy0.to(DOT_DTYPE), df_l, assert_trivial=True).to(gl.float32)
            dz = gl.zeros([BLOCK_T, RZ_P], gl.float32, dz_l)
            for k in gl.static_range(W):
                xk = ring.index(s * (W + 1) + 1 + k).reshape([BLOCK_T, BLOCK_D]).load(df_l).to(gl.float32)
                if HAS_POS:  # x[t-k] of the previous packed sequence
                    xk = gl.where((p >= k)[:, None], xk, 0.0)
                dz = warpgroup_mma((dy0 * xk).to(DOT_DTYPE), ut_smem.index(k), dz, is_async=True)
                if k >= 1:  # tap k - 1's product done: its df operand's registers free again
                    dz = warpgroup_mma_wait(1, deps=(dz,))
            dz = warpgroup_mma_wait(0, deps=(dz,))
            # The last product read this partition's last operands from the slot, and a warp group's
            # products start only once all its warps have issued them: every warp is done with it.
            mbarrier.arrive(empty.index(s), count=1)
            dt = t0 + dzi
            dz_ptrs = dz_part_ptr + (pid_d.to(gl.int64) * B * T + base + dt.to(gl.int64))[:, None] * R + dzr[None, :]
            gl.store(dz_ptrs, dz, mask=(dt < t_end)[:, None] & (dzr < R)[None, :])

    @gluon.jit
    def _du_partition(ring, ready, empty, z_smem, e_smem, z_ptr, pos_ptr, cos_ptr, sin_ptr, rotate, du_part_ptr,
                      ds_part_ptr, pid_n, d0, T, D, R, Z_STRIDE, g_col, base, t_start, t_end, n_tiles,
                      W: gl.constexpr, STAGES: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_D: gl.constexpr,
                      HAS_STATIC: gl.constexpr, HAS_POS: gl.constexpr, DOT_DTYPE: gl.constexpr, ROPE: gl.constexpr):
        """dU_k^T += df_k^T @ z and ds += df_k^T @ E_k over the chunk, stored as its partials."""
        du_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, _R_P, 16])
        dft_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=du_l, k_width=2)
        small_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])  # z's tiles
        i_t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, dft_l))
        zi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, small_l))
        zr = gl.arange(0, _R_P, layout=gl.SliceLayout(0, small_l))
        # One dU_k accumulator per tap, by name: the waits take and return them.
        du0 = gl.zeros([BLOCK_D, _R_P], gl.float32, du_l)
        du1 = gl.zeros([BLOCK_D, _R_P], gl.float32, du_l)
        du2 = gl.zeros([BLOCK_D, _R_P], gl.float32, du_l)
        du3 = gl.zeros([BLOCK_D, _R_P], gl.float32, du_l)
        ds = gl.zeros([BLOCK_D, _R_P], gl.float32, du_l)  # column k: ds_k
        PER_TAP: gl.constexpr = 2 if HAS_STATIC else 1  # products issued per tap
        z_next = _load_z(z_ptr, t_start + zi, t_end, base, Z_STRIDE, g_col, zr, R)  # z one tile ahead
        if ROPE:
            pairs = gl.arange(0, 32, layout=gl.SliceLayout(1, _DU_HALF))[:, None]
            offsets = _offset_angles(cos_ptr, sin_ptr, gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, _DU_HALF))[None, :],
                                     pairs, rotate)
            row_next = _first_row(cos_ptr, sin_ptr, t_start, T, pairs, rotate)
        for it in range(n_tiles):
            t0 = t_start + it * BLOCK_T
            z = z_next
            z_next = _load_z(z_ptr, t0 + BLOCK_T + zi, t_end, base, Z_STRIDE, g_col, zr, R)
            if ROPE:
                row = row_next
                row_next = _first_row(cos_ptr, sin_ptr, t0 + BLOCK_T, T, pairs, rotate)
            z_smem.store(z)  # (the last tile's products were waited for)
            fence_async_shared()
            cta_barrier()  # (this partition's warps)
            p_t = _positions(pos_ptr, t0 + i_t, t_end, HAS_POS)
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            dy_tile = ring.index(s * (W + 1)).reshape([BLOCK_T, BLOCK_D]).permute((1, 0))
            if ROPE:  # dy turned back (as _dz_partition does) with its rows in _du_channel's order
                lo, hi = gl.split(gl.permute(gl.reshape(dy_tile.load(_DU_NATURAL).to(gl.float32), [2, 32, BLOCK_T]),
                                             [1, 2, 0]))
                lo, hi = _turned_back(lo, hi, row, offsets)
                dy0_t = gl.reshape(gl.permute(gl.join(lo, hi), [2, 0, 1]), [BLOCK_D, BLOCK_T])
                dy0_t = _as_du_rows(dy0_t.to(DOT_DTYPE), dft_l).to(gl.float32)
            else:
                dy0_t = dy_tile.load(dft_l).to(gl.float32)
            for k in gl.static_range(W):
                x_tile = ring.index(s * (W + 1) + 1 + k).reshape([BLOCK_T, BLOCK_D]).permute((1, 0))
                if ROPE:
                    xk_t = _as_du_rows(x_tile.load(_DU_NATURAL), dft_l).to(gl.float32)
                else:
                    xk_t = x_tile.load(dft_l).to(gl.float32)
                if HAS_POS:  # x[t-k] of the previous packed sequence
                    xk_t = gl.where((p_t >= k)[None, :], xk_t, 0.0)
                df_t = (dy0_t * xk_t).to(DOT_DTYPE)
                if k == 0:
                    du0 = warpgroup_mma(df_t, z_smem, du0, is_async=True)
                elif k == 1:
                    du1 = warpgroup_mma(df_t, z_smem, du1, is_async=True)
                elif k == 2:
                    du2 = warpgroup_mma(df_t, z_smem, du2, is_async=True)
                else:
                    du3 = warpgroup_mma(df_t, z_smem, du3, is_async=True)
                if HAS_STATIC:
                    ds = warpgroup_mma(df_t, e_smem.index(k), ds, is_async=True)
                if k >= 1:  # tap k - 1's products done: their df operands' registers free again
                    ds, du0, du1, du2, du3 = warpgroup_mma_wait(PER_TAP, deps=(ds, du0, du1, du2, du3))
            ds, du0, du1, du2, du3 = warpgroup_mma_wait(0, deps=(ds, du0, du1, du2, du3))
            mbarrier.arrive(empty.index(s), count=1)  # (as in _dz_partition)
        od = d0 + _du_channel(gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, du_l)), ROPE)
        orr = gl.arange(0, _R_P, layout=gl.SliceLayout(0, du_l))
        _store_du(du_part_ptr, ds_part_ptr, du0, ds, pid_n, orr, od, R, D, 0, W, HAS_STATIC)
        if W > 1:
            _store_du(du_part_ptr, ds_part_ptr, du1, ds, pid_n, orr, od, R, D, 1, W, HAS_STATIC)
        if W > 2:
            _store_du(du_part_ptr, ds_part_ptr, du2, ds, pid_n, orr, od, R, D, 2, W, HAS_STATIC)
        if W > 3:
            _store_du(du_part_ptr, ds_part_ptr, du3, ds, pid_n, orr, od, R, D, 3, W, HAS_STATIC)

    @gluon.jit
    def _store_du(du_part_ptr, ds_part_ptr, du, ds, pid_n, r, d, R, D, k: gl.constexpr, W: gl.constexpr,
                  HAS_STATIC: gl.constexpr):
        """This chunk's dU_k partial and, from ds's column k, its ds_k partial."""
        d_ok = d < D
        ptrs = du_part_ptr + pid_n.to(gl.int64) * R * W * D + r[None, :] * (W * D) + k * D + d[:, None]
        gl.store(ptrs, du, mask=d_ok[:, None] & (r < R)[None, :])
        if HAS_STATIC:
            ds_k = gl.sum(gl.where((r == k)[None, :], ds, 0.0), axis=1)
            gl.store(ds_part_ptr + pid_n.to(gl.int64) * W * D + k * D + d, ds_k, mask=d_ok)

    @gluon.jit
    def _lowrank_gluon_filter_grad_kernel(  # (the _lowrank_ prefix: profiles file it as conv time)
        x_desc, dy_desc, z_ptr, u_ptr, pos_ptr, cos_ptr, sin_ptr, ROPE_CHANNELS,
        dz_part_ptr, du_part_ptr, ds_part_ptr,
        B, T, D, R, Z_STRIDE, D_GROUP, chunks_per_seq, chunk_t,
        W: gl.constexpr, RZ_P: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_D: gl.constexpr,
        HAS_STATIC: gl.constexpr, HAS_POS: gl.constexpr, DOT_DTYPE: gl.constexpr, STAGES: gl.constexpr,
        ROPE: gl.constexpr, DZ_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
    ):
        gl.static_assert(W <= 4)
        gl.static_assert(not (ROPE and HAS_POS))  # (the angles' sum needs positions 0 to T-1)
        ut_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_D, RZ_P], DOT_DTYPE)
        z_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, _R_P], DOT_DTYPE)
        small_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])  # U^T and E tiles

        pid_d = gl.program_id(0)
        pid_n = gl.program_id(1)
        b = pid_n // chunks_per_seq
        t_start = (pid_n % chunks_per_seq) * chunk_t
        t_end = gl.minimum(T, t_start + chunk_t)
        n_tiles = gl.cdiv(t_end - t_start, BLOCK_T)
        d0 = pid_d * BLOCK_D
        g_col = (d0 // D_GROUP) * R  # this channel tile's group's R columns of z
        base = b.to(gl.int64) * T
        rotate = d0 < ROPE_CHANNELS  # (ROPE: this tile's channels were rotated)

        # U_k^T [BLOCK_D, RZ_P] per tap and E_k [BLOCK_T, 16] (ones in column k), in shared memory
        # for the whole walk.
        ud = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, small_l))
        ur = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, small_l))
        ut_smem = gl.allocate_shared_memory(DOT_DTYPE, [W, BLOCK_D, RZ_P], ut_s)
        for k in gl.static_range(W):
            u = gl.load(u_ptr + ur[None, :] * (W * D) + k * D + ud[:, None],
                        mask=(ud < D)[:, None] & (ur < R)[None, :], other=0.0)
            ut_smem.index(k).store(u.to(DOT_DTYPE))
        ei = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, small_l))
        er = gl.arange(0, _R_P, layout=gl.SliceLayout(0, small_l))
        e_smem = gl.allocate_shared_memory(DOT_DTYPE, [W, BLOCK_T, _R_P], z_s)
        for k in gl.static_range(W):
            e_smem.index(k).store(gl.where((er == k)[None, :] & (ei >= 0)[:, None], 1.0, 0.0).to(DOT_DTYPE))
        z_smem = gl.allocate_shared_memory(DOT_DTYPE, [BLOCK_T, _R_P], z_s)
        # The ring: per slot dy and W lagged x tiles; 2 slots, U^T, E and z: 98 KB at W = 4, so two
        # programs share a multiprocessor (3 slots leave one: slower alone, but the overlapped
        # backward takes 3 beside a dx program, OVERLAP_STAGES).
        ring = gl.allocate_shared_memory(DOT_DTYPE, [STAGES * (W + 1), 1, BLOCK_T, BLOCK_D], dy_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(STAGES):
            mbarrier.init(ready.index(slot), count=1)
            mbarrier.init(empty.index(slot), count=2)  # released by both partitions
        fence_async_shared()
        cta_barrier()
        gl.warp_specialize([
            (_du_partition, (ring, ready, empty, z_smem, e_smem, z_ptr, pos_ptr, cos_ptr, sin_ptr, rotate, du_part_ptr,
                             ds_part_ptr, pid_n, d0, T, D, R, Z_STRIDE, g_col, base, t_start, t_end, n_tiles,
                             W, STAGES, BLOCK_T, BLOCK_D, HAS_STATIC, HAS_POS, DOT_DTYPE, ROPE)),
            (_dz_partition, (ring, ready, empty, ut_smem, pos_ptr, cos_ptr, sin_ptr, rotate, dz_part_ptr, pid_d, B, T,
                             R, base, t_start, t_end, n_tiles, W, STAGES, RZ_P, BLOCK_T, BLOCK_D, HAS_POS, DOT_DTYPE,
                             ROPE)),
            (_loader, (x_desc, dy_desc, ring, ready, empty, b, d0, t_start, n_tiles, W, STAGES, BLOCK_T)),
        ], [4, 1], [DZ_REGS, LOADER_REGS])
        for slot in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(slot))
            mbarrier.invalidate(empty.index(slot))
