"""The SwiGLU of two low-rank convs on Hopper, in Gluon: h = silu(g') * u', where g' and u' are the
gate's and up's outputs of `gluon_lowrank_conv`'s forward, formed in registers. With `save` (what
training takes) g' and u' are written too, for the SwiGLU's gradient; the SwiGLU itself never reads
them back.

Why (KERNELS.md, training point 33): with convs after every linear, the MLP's gate and up convs hold
5,632 of a 300M layer's 10,752 conv channels. Apart, the convs write g' and u' and the compiled
SwiGLU reads them back and writes h: 7 tensors of [tokens, d_ff] moved where this kernel moves 5.
At the 300M MLP (B=8, T=4096, 2,816 channels) it takes 289 us against 359 for the convs' op and the
compiled SwiGLU, and the all-linear step's slowdown went from +14.85% to +14.21% (paired, 14 of 16
rounds). The walk is issue-bound, not bound by its bytes: without writing g' and u' it takes 232 us,
and recomputing them in the backward instead of saving them (a kernel reading dh beside the convs'
inputs, writing dg' and du') took 306 us against the compiled gradient's 215, more than the forward
saved.

One program walks a chunk of 64-time tiles of one 64-channel tile of both convs (the gate's channels
c and the up's channels c: each thread holds the same channels of both, _conv_tile's layout), so the
SwiGLU pairs values a thread already has. g' and u' are rounded to the convs' type before the SwiGLU,
as the separate convs' outputs are, and are the conv kernel's outputs bit for bit; the SwiGLU runs in
float32 and is rounded once, as torch.compile's kernel for `F.silu(g) * u` does.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from isoflop.kernels import gluon_lowrank_conv as conv
from isoflop.kernels.gluon_common import (
    cta_barrier,
    fence_async_shared,
    gl,
    gl_dtype,
    gluon,
    mbarrier,
    tma,
    tma_load,
)
from isoflop.kernels.triton_common import processor_count

# Ring slots, each a tile of x and z of both convs: with them and the outputs' buffers two programs
# share a multiprocessor (~110 KB of shared memory each, 228 registers). At the 300M MLP 2 slots
# took 304 us, 3 290 and 4 (one program per multiprocessor) 360.
STAGES = 3


def shapes_missing(gate_x: Tensor, up_x: Tensor, gate_z: Tensor, up_z: Tensor, gate_U: Tensor, up_U: Tensor,
                   packed: bool) -> str | None:
    """Why the kernel cannot take convs of these shapes and types (no device, address or stride: what
    torch.compile sees while it traces), or None."""
    if gate_x.shape != up_x.shape or gate_U.shape != up_U.shape or gate_z.shape != up_z.shape:
        return (f"the gate's and up's convs must have one shape (x {tuple(gate_x.shape)} and {tuple(up_x.shape)}, "
                f"U {tuple(gate_U.shape)} and {tuple(up_U.shape)})")
    return conv.shapes_missing(gate_x, gate_z, gate_U, packed, gate_x.shape[-1])


def cannot_run(gate_x: Tensor, up_x: Tensor, gate_z: Tensor, up_z: Tensor, gate_U: Tensor, up_U: Tensor) -> str | None:
    """Why the kernel cannot take these inputs here, or None if it can."""
    missing = shapes_missing(gate_x, up_x, gate_z, up_z, gate_U, up_U, packed=False)
    for x, z, U in ((gate_x, gate_z, gate_U), (up_x, up_z, up_U)):
        missing = missing or conv.cannot_run(x, z, U, None, x.shape[-1])
    return missing


def forward(gate_x: Tensor, up_x: Tensor, gate_z: Tensor, up_z: Tensor, gate_U: Tensor, up_U: Tensor,
            gate_s: Tensor | None, up_s: Tensor | None, residual: bool, save: bool = True,
            stages: int = STAGES, chunk: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(h, g', u'): h = silu(g') * u' [B, T, D] for the convs g' = conv(gate_x; gate_z, gate_U, gate_s)
    and u' likewise, as `gluon_lowrank_conv.forward` takes each (one channel group; both with a
    static filter or neither), all contiguous; g' and u' (what the SwiGLU's gradient reads) only
    with `save`, else None. `stages` and `chunk` (tiles per program) override the defaults
    (benchmarks, tests)."""
    B, T, D = gate_x.shape
    R, W = gate_U.shape[0], gate_U.shape[1] // D
    if (gate_s is None) != (up_s is None):
        raise ValueError("the gate's and up's convs must both have a static filter or neither")
    h = torch.empty(gate_x.shape, dtype=gate_x.dtype, device=gate_x.device)
    gate, up = (torch.empty_like(h) for _ in range(2)) if save else (None, None)
    # Tiles per program as the conv's forward picks them where two programs share a multiprocessor.
    tiles, channel_tiles = T // conv.TILE, triton.cdiv(D, conv.TILE)
    chunk = chunk or conv._chunk(tiles, channel_tiles * B, processor_count(gate_x.device), three_fit=False,
                                 extra_step=False)
    outs = [conv._runs_descriptor(t) for t in (h, *((gate, up) if save else (h, h)))]
    static = (gate_s, up_s) if gate_s is not None else (gate_x, gate_x)
    _lowrank_gluon_swiglu_kernel[(triton.cdiv(tiles, chunk), channel_tiles, B)](
        conv._runs_descriptor(gate_x), conv._runs_descriptor(up_x), conv._z_descriptor(gate_z),
        conv._z_descriptor(up_z), *outs, gate_x, up_x, gate_U.contiguous(), up_U.contiguous(),
        *(s.contiguous() for s in static), T, D, R, gate_x.stride(1), up_x.stride(1),
        W=W, CHUNK=chunk, STAGES=stages, HAS_STATIC=gate_s is not None, RESIDUAL=residual, DTYPE=gl_dtype(gate_x),
        SAVE=save, num_warps=conv.WARPS,
    )
    return h, gate, up


if gluon is not None:  # the kernel exists only where Gluon's Hopper ops do
    from isoflop.kernels.gluon_lowrank_conv import (
        _conv_tile,
        _first_lags,
        _slot_z,
        _static_taps,
        _store_runs,
        _walk_operands,
    )

    @gluon.jit
    def _lowrank_gluon_swiglu_kernel(  # (the _lowrank_ prefix: profiles file it as conv time)
        xg_desc, xu_desc, zg_desc, zu_desc, h_desc, g_desc, u_desc,
        xg_ptr, xu_ptr, ug_ptr, uu_ptr, sg_ptr, su_ptr,
        T, D, R, XG_STRIDE, XU_STRIDE,
        W: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr, HAS_STATIC: gl.constexpr,
        RESIDUAL: gl.constexpr, DTYPE: gl.constexpr, SAVE: gl.constexpr,
    ):
        """h = silu(g') * u' (and with SAVE, g' and u') of one channel tile of both convs, walking CHUNK
        tiles up in time as gluon_lowrank_conv's forward does."""
        BLOCK: gl.constexpr = 64
        run_l: gl.constexpr = gl.BlockedLayout([2, 1], [8, 4], [4, 1], [1, 0])  # [64 channels, 4 runs]
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 64, 16])
        pid_t = gl.program_id(0)
        d0 = gl.program_id(1) * BLOCK
        b = gl.program_id(2)
        ug_smem, _, _ = _walk_operands(ug_ptr, sg_ptr, d0, D, R, W, False, DTYPE)
        uu_smem, _, _ = _walk_operands(uu_ptr, su_ptr, d0, D, R, W, False, DTYPE)
        zero = gl.zeros([BLOCK, BLOCK], gl.float32, acc_l)

        xg_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 16, 4, BLOCK], xg_desc.layout)
        xu_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 16, 4, BLOCK], xu_desc.layout)
        zg_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 8, 4, 2, 16], zg_desc.layout)
        zu_ring = gl.allocate_shared_memory(DTYPE, [STAGES, 1, 8, 4, 2, 16], zu_desc.layout)
        h_bufs = gl.allocate_shared_memory(DTYPE, [2, 1, 16, 4, BLOCK], h_desc.layout)
        if SAVE:  # g' in buffer 0, u' in buffer 1 (_store_runs picks by its step's parity)
            gu_bufs = gl.allocate_shared_memory(DTYPE, [2, 1, 16, 4, BLOCK], g_desc.layout)
        else:
            gu_bufs = h_bufs
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        cta_barrier()

        tile0 = pid_t * CHUNK  # the program's first tile in its sequence, and in the [B * T / 64] view
        n0 = b * (T // BLOCK) + tile0
        n_tiles = gl.minimum(CHUNK, T // BLOCK - tile0)
        for j in gl.static_range(STAGES - 1):
            if j < n_tiles:
                _issue_pair(xg_desc, xu_desc, zg_desc, zu_desc, xg_ring, xu_ring, zg_ring, zu_ring, bars, n0 + j, j,
                            d0, STAGES)

        rc = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, run_l))
        rq = gl.arange(0, 4, layout=gl.SliceLayout(0, run_l))
        ch = d0 + rc
        sg_regs = _static_taps(sg_ptr, ch, D, W, HAS_STATIC)
        su_regs = _static_taps(su_ptr, ch, D, W, HAS_STATIC)
        first_run = (rq == 0)[None, :]
        before_g = _first_lags(xg_ptr, b, T, XG_STRIDE, ch, D, tile0 * BLOCK, rq, W)
        before_u = _first_lags(xu_ptr, b, T, XU_STRIDE, ch, D, tile0 * BLOCK, rq, W)
        for tile in range(n_tiles):
            zgt = _slot_z(zg_ring, bars, tile, STAGES, DTYPE)  # (waits for the slot's copies)
            zut = _slot_z(zu_ring, bars, tile, STAGES, DTYPE)
            g, before_g = _conv_tile(ug_smem, zgt, zero, xg_ring, tile, before_g, sg_regs, first_run, run_l, W,
                                     STAGES, HAS_STATIC, RESIDUAL, DTYPE)
            g_rounded = ()  # g' as the conv's output holds it: 16 registers while u' is formed
            for i in gl.static_range(16):
                g_rounded = g_rounded + (g[i].to(DTYPE),)
            u, before_u = _conv_tile(uu_smem, zut, zero, xu_ring, tile, before_u, su_regs, first_run, run_l, W,
                                     STAGES, HAS_STATIC, RESIDUAL, DTYPE)
            # Every warp is done with this slot: refill it. The stores of the last tile (SAVE: g' and
            # u', whose buffers are rewritten now) or of two tiles back (h's buffer) have read theirs.
            if SAVE:
                tma.store_wait(0)
            else:
                tma.store_wait(1)
            cta_barrier()
            if tile + STAGES - 1 < n_tiles:
                _issue_pair(xg_desc, xu_desc, zg_desc, zu_desc, xg_ring, xu_ring, zg_ring, zu_ring, bars,
                            n0 + tile + STAGES - 1, tile + STAGES - 1, d0, STAGES)
            h = ()
            for i in gl.static_range(16):
                gv = g_rounded[i].to(gl.float32)
                h = h + (gv / (1.0 + gl.exp(-gv)) * u[i].to(DTYPE).to(gl.float32),)
            if SAVE:
                _store_runs(gu_bufs, g_desc, g_rounded, n0 + tile, d0, 0, DTYPE, False, 0, False)
                _store_runs(gu_bufs, u_desc, u, n0 + tile, d0, 1, DTYPE, False, 0, False)
            _store_runs(h_bufs, h_desc, h, n0 + tile, d0, tile, DTYPE, False, 0, False)
        tma.store_wait(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _issue_pair(xg_desc, xu_desc, zg_desc, zu_desc, xg_ring, xu_ring, zg_ring, zu_ring, bars, n, step, d0,
                    STAGES: gl.constexpr):
        """TMA copies of tile n (the walk's step `step`) of both convs' x and z into the step's slot."""
        slot = step % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, 2 * xg_desc.block_type.nbytes + 2 * zg_desc.block_type.nbytes)
        tma_load(xg_desc, [n, 0, 0, d0], bar, xg_ring.index(slot))
        tma_load(xu_desc, [n, 0, 0, d0], bar, xu_ring.index(slot))
        tma_load(zg_desc, [n, 0, 0, 0, 0], bar, zg_ring.index(slot))
        tma_load(zu_desc, [n, 0, 0, 0, 0], bar, zu_ring.index(slot))
