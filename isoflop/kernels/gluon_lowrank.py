"""The low-rank filter gradients on Hopper, in Gluon (Triton's explicit-layout language): the
backward's "gluon" variant, which "auto" takes wherever it can run (`cannot_run`) unless sequences
are packed (there it lost: triton_lowrank.lowrank_backward).

Same algorithm and results as `triton_lowrank._lowrank_filter_grad_kernel` (bit-identical: the same
df values, products and partial sums), one program per (64 channels, time chunk), 4 warps, 64-row
tiles, dU_k^T += df_k^T @ z and dz += df_k @ U_k^T per tap, z's column of ones giving ds. What
plain Triton could not say, and what it buys (KERNELS.md, v22; paper shape 100 -> 67 us):
- every tile's dy and lagged x[t-k] come by TMA, one box each, a tile ahead into a two-slot ring
  (the lags as their own boxes: a shared-memory view cannot start at a row offset, and the copies
  of the overlapping rows hit L2). Boxes start at t - k < 0 or reach past T: TMA fills zeros, so
  tiles need no masks;
- the products run asynchronously: tap k's are waited for only once tap k + 1's are issued, so a
  tap's df is formed while the previous tap's products run;
- both products take df from registers, formed twice from the ring (once in each product's operand
  layout, x and dy read transposed for dU's), so df never goes through shared memory. Shared
  memory throughput is what bounds this kernel (ncu, staging df for dU: L1 85%).
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
                         ds_part: Tensor) -> None:
    """Fill the partial buffers as `triton_lowrank._fused_filter_grads` allocates them (`meta` there:
    R_P with the ones column, RZ_P, W, HAS_STATIC, HAS_POS, DOT_DTYPE)."""
    B, T, D = x.shape
    _lowrank_gluon_filter_grad_kernel[(triton.cdiv(D, BLOCK_D), B * chunks)](
        tile_descriptor(x), tile_descriptor(dy), z, U, pos if pos is not None else x,
        dz_part, du_part, ds_part,
        B, T, D, U.shape[0], z.stride(1), d_group, chunks, chunk_t,
        W=meta["W"], R_P=meta["R_P"], RZ_P=meta["RZ_P"], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        HAS_STATIC=meta["HAS_STATIC"], HAS_POS=meta["HAS_POS"], DOT_DTYPE=gl_dtype(x), STAGES=STAGES,
        num_warps=WARPS,
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

    @gluon.jit
    def _store_du(du_part_ptr, ds_part_ptr, du, pid_n, r, d, R, D, k: gl.constexpr, W: gl.constexpr,
                 HAS_STATIC: gl.constexpr):
        """This chunk's dU_k partial and, from du's column R (z's column of ones), its ds_k partial."""
        d_ok = d < D
        ptrs = du_part_ptr + pid_n.to(gl.int64) * R * W * D + r[None, :] * (W * D) + k * D + d[:, None]
        gl.store(ptrs, du, mask=d_ok[:, None] & (r < R)[None, :])
        if HAS_STATIC:
            ds = gl.sum(gl.where((r == R)[None, :], du, 0.0), axis=1)
            gl.store(ds_part_ptr + pid_n.to(gl.int64) * W * D + k * D + d, ds, mask=d_ok)

    @gluon.jit
    def _issue(x_desc, dy_desc, ring, bars, j, t0, b, d0, W: gl.constexpr, STAGES: gl.constexpr, pred):
        """TMA copies of tile j (rows t0..): dy and x[t-k] for each tap k, into ring slot j % STAGES."""
        s = j % STAGES
        bar = bars.index(s)
        mbarrier.expect(bar, (W + 1) * dy_desc.block_type.nbytes, pred=pred)
        tma_load(dy_desc, [b, t0, d0], bar, ring.index(s * (W + 1)), pred=pred)
        for k in gl.static_range(W):
            tma_load(x_desc, [b, t0 - k, d0], bar, ring.index(s * (W + 1) + 1 + k), pred=pred)

    @gluon.jit
    def _load_z(z_ptr, rows, t_end, base, Z_STRIDE, g_col, zr, R):
        """z's R columns for `rows` of this channel tile's group (zeros past the chunk and beyond R)."""
        return gl.load(z_ptr + (base + rows.to(gl.int64))[:, None] * Z_STRIDE + g_col + zr[None, :],
                       mask=(rows < t_end)[:, None] & (zr < R)[None, :], other=0.0)

    @gluon.jit
    def _lowrank_gluon_filter_grad_kernel(  # (the _lowrank_ prefix: profiles file it as conv time)
        x_desc, dy_desc, z_ptr, u_ptr, pos_ptr,
        dz_part_ptr, du_part_ptr, ds_part_ptr,
        B, T, D, R, Z_STRIDE, D_GROUP, chunks_per_seq, chunk_t,
        W: gl.constexpr, R_P: gl.constexpr, RZ_P: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_D: gl.constexpr,
        HAS_STATIC: gl.constexpr, HAS_POS: gl.constexpr, DOT_DTYPE: gl.constexpr, STAGES: gl.constexpr,
    ):
        gl.static_assert(W <= 4)
        dz_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, RZ_P, 16])
        du_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, R_P, 16])
        # Both products take df from registers, formed in each one's A-operand layout: df for dz's,
        # df^T for dU's (dy and x loaded from the ring a second time, transposed), so df never goes
        # through shared memory (v22: 77.9 -> 70.9 us at the paper's shape against staging it for dU).
        df_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dz_l, k_width=2)
        dft_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=du_l, k_width=2)
        ut_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_D, RZ_P], DOT_DTYPE)
        z_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, R_P], DOT_DTYPE)
        small_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # U^T and z tiles

        pid_d = gl.program_id(0)
        pid_n = gl.program_id(1)
        b = pid_n // chunks_per_seq
        t_start = (pid_n % chunks_per_seq) * chunk_t
        t_end = gl.minimum(T, t_start + chunk_t)
        n_tiles = gl.cdiv(t_end - t_start, BLOCK_T)
        d0 = pid_d * BLOCK_D
        g_col = (d0 // D_GROUP) * R  # this channel tile's group's R columns of z
        base = b.to(gl.int64) * T
        i = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, df_l))
        i_t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, dft_l))

        # U_k^T [BLOCK_D, RZ_P] per tap, in shared memory for the whole walk.
        ud = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, small_l))
        ur = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, small_l))
        ut_smem = gl.allocate_shared_memory(DOT_DTYPE, [W, BLOCK_D, RZ_P], ut_s)
        for k in gl.static_range(W):
            u = gl.load(u_ptr + ur[None, :] * (W * D) + k * D + ud[:, None],
                        mask=(ud < D)[:, None] & (ur < R)[None, :], other=0.0)
            ut_smem.index(k).store(u.to(DOT_DTYPE))
        # The ring: per slot dy and W lagged x tiles; 2 slots, U^T and z: 92 KB at W = 4, so two
        # programs share a multiprocessor (registers allow no more; with 3 slots only one: slower).
        ring = gl.allocate_shared_memory(DOT_DTYPE, [STAGES * (W + 1), 1, BLOCK_T, BLOCK_D], dy_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(STAGES):
            mbarrier.init(bars.index(slot), count=1)
        z_smem = gl.allocate_shared_memory(DOT_DTYPE, [BLOCK_T, R_P], z_s)
        zi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, small_l))
        zr = gl.arange(0, R_P, layout=gl.SliceLayout(0, small_l))

        # One dU_k accumulator per tap, by name: the waits take and return them.
        du0 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du1 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du2 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du3 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        dzi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, dz_l))
        dzr = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, dz_l))

        for j in gl.static_range(STAGES - 1):
            _issue(x_desc, dy_desc, ring, bars, j, t_start + j * BLOCK_T, b, d0, W, STAGES, j < n_tiles)
        z_next = _load_z(z_ptr, t_start + zi, t_end, base, Z_STRIDE, g_col, zr, R)  # z one tile ahead
        for it in range(n_tiles):
            t0 = t_start + it * BLOCK_T
            ahead = it + STAGES - 1
            _issue(x_desc, dy_desc, ring, bars, ahead, t0 + (STAGES - 1) * BLOCK_T, b, d0, W, STAGES,
                   ahead < n_tiles)
            z = z_next
            z_next = _load_z(z_ptr, t0 + BLOCK_T + zi, t_end, base, Z_STRIDE, g_col, zr, R)
            if HAS_STATIC:  # the column of ones: dU_k's column R is then ds_k
                z = gl.where((zr == R)[None, :] & ((t0 + zi) < t_end)[:, None], 1.0, z)
            z_smem.store(z.to(DOT_DTYPE))  # (the last tile's products were waited for)
            t = t0 + i
            t_t = t0 + i_t
            p, p_t = t, t_t
            if HAS_POS:
                p = gl.load(pos_ptr + t, mask=t < t_end, other=0)
                p_t = gl.load(pos_ptr + t_t, mask=t_t < t_end, other=0)
            s = it % STAGES
            mbarrier.wait(bars.index(s), (it // STAGES) & 1)
            dy_tile = ring.index(s * (W + 1)).reshape([BLOCK_T, BLOCK_D])
            dy0 = dy_tile.load(df_l).to(gl.float32)
            dy0_t = dy_tile.permute((1, 0)).load(dft_l).to(gl.float32)
            dz = gl.zeros([BLOCK_T, RZ_P], gl.float32, dz_l)
            for k in gl.static_range(W):
                x_tile = ring.index(s * (W + 1) + 1 + k).reshape([BLOCK_T, BLOCK_D])
                xk = x_tile.load(df_l).to(gl.float32)
                xk_t = x_tile.permute((1, 0)).load(dft_l).to(gl.float32)
                if HAS_POS:  # x[t-k] of the previous packed sequence
                    xk = gl.where((p >= k)[:, None], xk, 0.0)
                    xk_t = gl.where((p_t >= k)[None, :], xk_t, 0.0)
                dz = warpgroup_mma((dy0 * xk).to(DOT_DTYPE), ut_smem.index(k), dz, is_async=True)
                df_t = (dy0_t * xk_t).to(DOT_DTYPE)
                if k == 0:
                    du0 = warpgroup_mma(df_t, z_smem, du0, is_async=True)
                elif k == 1:
                    du1 = warpgroup_mma(df_t, z_smem, du1, is_async=True)
                elif k == 2:
                    du2 = warpgroup_mma(df_t, z_smem, du2, is_async=True)
                else:
                    du3 = warpgroup_mma(df_t, z_smem, du3, is_async=True)
                if k >= 1:  # tap k - 1's products done: their df operands' registers free again
                    dz, du0, du1, du2, du3 = warpgroup_mma_wait(2, deps=(dz, du0, du1, du2, du3))
            dz, du0, du1, du2, du3 = warpgroup_mma_wait(0, deps=(dz, du0, du1, du2, du3))
            dt = t0 + dzi
            dz_ptrs = dz_part_ptr + (pid_d.to(gl.int64) * B * T + base + dt.to(gl.int64))[:, None] * R + dzr[None, :]
            gl.store(dz_ptrs, dz, mask=(dt < t_end)[:, None] & (dzr < R)[None, :])

        for slot in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(slot))
        od = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, du_l))
        orr = gl.arange(0, R_P, layout=gl.SliceLayout(0, du_l))
        _store_du(du_part_ptr, ds_part_ptr, du0, pid_n, orr, od, R, D, 0, W, HAS_STATIC)
        if W > 1:
            _store_du(du_part_ptr, ds_part_ptr, du1, pid_n, orr, od, R, D, 1, W, HAS_STATIC)
        if W > 2:
            _store_du(du_part_ptr, ds_part_ptr, du2, pid_n, orr, od, R, D, 2, W, HAS_STATIC)
        if W > 3:
            _store_du(du_part_ptr, ds_part_ptr, du3, pid_n, orr, od, R, D, 3, W, HAS_STATIC)
