"""Prototype, not used by the package: the low-rank filter gradients in Gluon, with asynchronous products.

    PYTHONPATH=. python benchmarks/gluon_filter_grads.py [--rounds 3]

KERNELS.md's closing paragraph blamed the filter-gradient kernel's time on a per-tap chain that
plain Triton cannot break: df_k to shared memory, a barrier, dU's product, a wait, dz's product, a
wait. This kernel tests that on Hopper with Gluon (Triton's explicit-layout language, Triton 3.6
and 3.9): each tap's df_k = dy * x[t-k] is stored once into shared memory, both products read it
there (dz += df_k @ U_k^T, and dU_k^T += df_k^T @ z through a transposed view), and both are
issued asynchronously, so the next tap's df is computed while they run; one wait per tile. The rest
is the Triton kernel's algorithm (64 x 64 tiles, 4 warps, z's column of ones for ds, the same
partials and sums), so results must be bit-identical to `triton_lowrank._fused_filter_grads`.

It prints, per shape, whether they are, and the median GPU time of both (graph replay, the
median of interleaved rounds). On the H200 (session 19): bit-identical on four shapes (paper, the
300M conv, ragged T/D/R/W, packed sequences); 98.2 against 100.4 us at the paper's shape, and
three variants that loaded the next tile ahead were slower (KERNELS.md, point 23). So the chain's
waits are not what bounds that kernel. Needs CUDA on a Hopper GPU; says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # Triton without Gluon's Hopper ops
    gluon = None

from isoflop.kernels import triton_lowrank as lr
from isoflop.kernels.triton_common import time_chunks

BLOCK_T, BLOCK_D, WARPS = 64, 64, 4


if gluon is not None:  # the kernels exist only where Gluon's Hopper ops do

    @gluon.jit
    def _load_tile(ptr, rows, row_ok, stride, d, d_ok):
        """[BLOCK_T, BLOCK_D] of ptr at (rows, d) in their parent layout; zeros where masked."""
        offs = rows[:, None].to(gl.int64) * stride + d[None, :]
        return gl.load(ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

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
    def _filter_grad_kernel(
        x_ptr, z_ptr, u_ptr, pos_ptr, dy_ptr,
        dz_part_ptr, du_part_ptr, ds_part_ptr,
        B, T, D, R, X_STRIDE, Z_STRIDE, D_GROUP, chunks_per_seq, chunk_t,
        W: gl.constexpr, R_P: gl.constexpr, RZ_P: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_D: gl.constexpr,
        HAS_STATIC: gl.constexpr, HAS_POS: gl.constexpr, DOT_DTYPE: gl.constexpr,
    ):
        gl.static_assert(W <= 4)
        # Elementwise tiles: 8 channels (16 bytes) per thread and row; the two products' accumulators.
        tile_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, tile_l)
        cols_l: gl.constexpr = gl.SliceLayout(0, tile_l)
        dz_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, RZ_P, 16])
        du_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, R_P, 16])
        df_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_D], DOT_DTYPE)
        ut_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_D, RZ_P], DOT_DTYPE)
        z_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, R_P], DOT_DTYPE)
        small_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # U^T and z tiles

        pid_d = gl.program_id(0)
        pid_n = gl.program_id(1)
        b = pid_n // chunks_per_seq
        t_start = (pid_n % chunks_per_seq) * chunk_t
        t_end = gl.minimum(T, t_start + chunk_t)
        g_col = (pid_d * BLOCK_D // D_GROUP) * R  # this channel tile's group's R columns of z
        d = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=cols_l)
        d_ok = d < D
        i = gl.arange(0, BLOCK_T, layout=rows_l)

        # U_k^T [BLOCK_D, RZ_P] per tap, in shared memory for the whole walk.
        ud = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, small_l))
        ur = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, small_l))
        ut_smem = gl.allocate_shared_memory(DOT_DTYPE, [W, BLOCK_D, RZ_P], ut_s)
        for k in gl.static_range(W):
            u = gl.load(u_ptr + ur[None, :] * (W * D) + k * D + ud[:, None],
                        mask=(ud < D)[:, None] & (ur < R)[None, :], other=0.0)
            ut_smem.index(k).store(u.to(DOT_DTYPE))
        df_smem = gl.allocate_shared_memory(DOT_DTYPE, [W, BLOCK_T, BLOCK_D], df_s)
        z_smem = gl.allocate_shared_memory(DOT_DTYPE, [BLOCK_T, R_P], z_s)
        zi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, small_l))
        zr = gl.arange(0, R_P, layout=gl.SliceLayout(0, small_l))

        # One dU_k accumulator per tap (written out for W <= 4: the waits take them by name).
        du0 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du1 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du2 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        du3 = gl.zeros([BLOCK_D, R_P], gl.float32, du_l)
        dzi = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, dz_l))
        dzr = gl.arange(0, RZ_P, layout=gl.SliceLayout(0, dz_l))

        base = b.to(gl.int64) * T
        for t0 in range(t_start, t_end, BLOCK_T):
            t = t0 + i
            t_ok = t < t_end
            p = t
            if HAS_POS:
                p = gl.load(pos_ptr + t, mask=t_ok, other=0)
            dy0 = _load_tile(dy_ptr + base * D, t, t_ok, D, d, d_ok).to(gl.float32)
            # z with its column of ones (ds from the dU product), into shared memory
            zt = t0 + zi
            zt_ok = zt < t_end
            z = gl.load(z_ptr + (base + zt.to(gl.int64))[:, None] * Z_STRIDE + g_col + zr[None, :],
                        mask=zt_ok[:, None] & (zr < R)[None, :], other=0.0)
            if HAS_STATIC:
                z = gl.where((zr == R)[None, :] & zt_ok[:, None], 1.0, z)
            z_smem.store(z.to(DOT_DTYPE))
            dz = gl.zeros([BLOCK_T, RZ_P], gl.float32, dz_l)
            for k in gl.static_range(W):
                lag_ok = t_ok & (p >= k) & (t >= k)
                xk = _load_tile(x_ptr + base * X_STRIDE, t - k, lag_ok, X_STRIDE, d, d_ok).to(gl.float32)
                # df_k once in shared memory; both products read it there, without waiting
                df_smem.index(k).store((dy0 * xk).to(DOT_DTYPE))
                fence_async_shared()
                dz = warpgroup_mma(df_smem.index(k), ut_smem.index(k), dz, is_async=True)
                df_t = df_smem.index(k).permute((1, 0))
                if k == 0:
                    du0 = warpgroup_mma(df_t, z_smem, du0, is_async=True)
                elif k == 1:
                    du1 = warpgroup_mma(df_t, z_smem, du1, is_async=True)
                elif k == 2:
                    du2 = warpgroup_mma(df_t, z_smem, du2, is_async=True)
                else:
                    du3 = warpgroup_mma(df_t, z_smem, du3, is_async=True)
            # before the next tile overwrites df and z in shared memory
            dz, du0, du1, du2, du3 = warpgroup_mma_wait(0, deps=(dz, du0, du1, du2, du3))
            dt = t0 + dzi
            dz_ptrs = dz_part_ptr + (pid_d.to(gl.int64) * B * T + base + dt.to(gl.int64))[:, None] * R + dzr[None, :]
            gl.store(dz_ptrs, dz, mask=(dt < t_end)[:, None] & (dzr < R)[None, :])

        od = pid_d * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, du_l))
        orr = gl.arange(0, R_P, layout=gl.SliceLayout(0, du_l))
        _store_du(du_part_ptr, ds_part_ptr, du0, pid_n, orr, od, R, D, 0, W, HAS_STATIC)
        if W > 1:
            _store_du(du_part_ptr, ds_part_ptr, du1, pid_n, orr, od, R, D, 1, W, HAS_STATIC)
        if W > 2:
            _store_du(du_part_ptr, ds_part_ptr, du2, pid_n, orr, od, R, D, 2, W, HAS_STATIC)
        if W > 3:
            _store_du(du_part_ptr, ds_part_ptr, du3, pid_n, orr, od, R, D, 3, W, HAS_STATIC)


def filter_grads(kernel, dy, x, z, U, static, pos):
    """(dz, dU, ds) as triton_lowrank._fused_filter_grads gives them (half types, R <= 16, W <= 4)."""
    B, T, D = x.shape
    R, W, d_group = U.shape[0], U.shape[1] // D, lr._group_size(z, U, D)
    d_tiles = triton.cdiv(D, BLOCK_D)
    chunk_t, chunks = time_chunks(T, B, d_tiles, BLOCK_T, x.device, programs_per_processor=2)
    f32 = dict(device=x.device, dtype=torch.float32)
    dz_part = torch.empty(d_tiles, B * T, R, **f32)
    du_part = torch.empty(B * chunks, R, W * D, **f32)
    ds_part = torch.empty(B * chunks, W * D, **f32) if static is not None else du_part
    kernel[(d_tiles, B * chunks)](
        x, z, U.to(z.dtype), pos if pos is not None else x, dy, dz_part, du_part, ds_part,
        B, T, D, R, x.stride(1), z.stride(1), d_group, chunks, chunk_t,
        W=W, R_P=lr._grad_rank(R, static is not None), RZ_P=16, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        HAS_STATIC=static is not None, HAS_POS=pos is not None,
        DOT_DTYPE=gl.bfloat16 if z.dtype == torch.bfloat16 else gl.float16, num_warps=WARPS,
    )
    return lr.sum_filter_grads(dz_part, du_part, ds_part, z, U, static, D // d_group)


def positions(cu: list[int], device) -> torch.Tensor:
    """Each position's index inside its own packed sequence."""
    bounds = torch.tensor(cu, device=device)
    t = torch.arange(cu[-1], device=device)
    return (t - bounds[torch.searchsorted(bounds, t, right=True) - 1]).to(torch.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = parser.parse_args(argv)
    if gluon is None or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("gluon_filter_grads: needs Triton's Gluon and a Hopper GPU; skipped")
        return 0
    from triton.testing import do_bench_cudagraph

    kernel = _filter_grad_kernel
    torch.manual_seed(0)
    shapes = (("paper", 4, 4096, 2048, 16, 4, None), ("300M conv", 8, 4096, 1024, 16, 4, None),
              ("ragged", 2, 1000, 192, 5, 3, None), ("packed", 1, 3000, 256, 16, 4, [0, 700, 1900, 3000]))
    print(f"{torch.cuda.get_device_name()}, Triton {triton.__version__}; us, median of {args.rounds} rounds")
    for label, B, T, D, R, W, cu in shapes:
        x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        z = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16)
        U = (torch.randn(R, W * D, device="cuda") * 0.1).to(torch.bfloat16)
        s = torch.randn(W, D, device="cuda", dtype=torch.bfloat16)
        pos = positions(cu, x.device) if cu else None
        meta = lr._meta(z, U, D, s, pos)

        def triton_kernel():
            return lr._fused_filter_grads(dy, x, z, U, s, pos, meta, None)

        def gluon_kernel():
            return filter_grads(kernel, dy, x, z, U, s, pos)

        identical = all(torch.equal(a, b) for a, b in zip(gluon_kernel(), triton_kernel()))
        times: dict[str, list[float]] = {"triton": [], "gluon": []}
        for _ in range(args.rounds):
            for name, fn in (("triton", triton_kernel), ("gluon", gluon_kernel)):
                times[name].append(do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3)
        print(f"{label:10s} [{B}, {T}, {D}] R={R} W={W}: bit-identical {identical}; "
              f"triton {statistics.median(times['triton']):.1f}, gluon {statistics.median(times['gluon']):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
