"""Triton kernel for one decode step of the short convolution (low-rank, head-wise or static).

One token x_t [B, D] and a rolling state [B, W-1, D] (the previous W-1 inputs, oldest first) give
    y_t = residual * x_t + sum_k tap[k] * history[k],   history = [x_t, state newest first]
and the new state [state[:, 1:], x_t], both written by the same program, so a step reads x_t, the
state and the filter inputs once and writes y_t and the new state once. Low-rank taps z_t @ U are
formed as a broadcast-and-sum over rank chunks: one token is far too little work for the matrix units.
Inference only (no autograd): ops.py sends steps that need gradients to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from isoflop.kernels.triton_common import interpreting, next_pow2

STATIC, LOWRANK, HEADWISE = 0, 1, 2


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, z_ptr, u_ptr, w_ptr, s_ptr, y_ptr, new_state_ptr,
    D, R, H,
    W: tl.constexpr, W_P: tl.constexpr, HS: tl.constexpr, MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_STATIC: tl.constexpr, RESIDUAL: tl.constexpr,
):
    b, pid_d = tl.program_id(0), tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, W_P)
    d_ok, k_ok = d < D, k < W
    tile_ok = k_ok[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)

    # history[k] = x[t-k]: the token itself, then the state newest first (state[W-1-k]).
    x_t = tl.load(x_ptr + b64 * D + d, mask=d_ok, other=0.0)
    state_rows = state_ptr + b64 * (W - 1) * D + (W - 1 - k)[:, None] * D + d[None, :]
    past = tl.load(state_rows, mask=(k >= 1)[:, None] & tile_ok, other=0.0)
    history = tl.where((k == 0)[:, None], x_t[None, :], past)

    taps = tl.zeros([W_P, BLOCK_D], dtype=tl.float32)
    if MODE == 1:  # low-rank: taps[k, d] = sum_r z[r] * U[r, k*D + d]
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            z = tl.load(z_ptr + b64 * R + r, mask=r < R, other=0.0).to(tl.float32)
            u_ptrs = u_ptr + r[:, None, None] * (W * D) + k[None, :, None] * D + d[None, None, :]
            u = tl.load(u_ptrs, mask=(r < R)[:, None, None] & tile_ok[None, :, :], other=0.0).to(tl.float32)
            taps += tl.sum(z[:, None, None] * u, axis=0)
    if MODE == 2:  # head-wise: one tap per group of HS channels
        w_ptrs = w_ptr + b64 * W * H + k[:, None] * H + (d // HS)[None, :]
        taps += tl.load(w_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_STATIC:
        taps += tl.load(s_ptr + k[:, None] * D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        taps += tl.where((k == 0)[:, None], 1.0, 0.0)
    y = tl.sum(taps * history.to(tl.float32), axis=0)
    tl.store(y_ptr + b64 * D + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)

    # new_state[j] = history[W-2-j]: the state shifted by one, the token last.
    new_rows = new_state_ptr + b64 * (W - 1) * D + (W - 2 - k)[:, None] * D + d[None, :]
    tl.store(new_rows, history.to(new_state_ptr.dtype.element_ty), mask=(k <= W - 2)[:, None] & tile_ok)


def conv_step(
    x_t: Tensor, state: Tensor, z_t: Tensor | None, U: Tensor | None, w_t: Tensor | None,
    static: Tensor | None, residual: bool,
) -> tuple[Tensor, Tensor]:
    """(y_t [B, D], new_state [B, W-1, D]) for contiguous inputs. Pass z_t [B, R] with U [R, W*D]
    (low-rank), or w_t [B, W, H] (head-wise), or neither (static only)."""
    B, D = x_t.shape
    width = state.shape[1] + 1
    mode = LOWRANK if z_t is not None else HEADWISE if w_t is not None else STATIC
    R = z_t.shape[-1] if z_t is not None else 1
    H = w_t.shape[-1] if w_t is not None else D
    y = torch.empty_like(x_t)
    new_state = torch.empty_like(state)
    block_d = 16 if interpreting() else max(16, min(256, next_pow2(D)))
    _conv_step_kernel[(B, triton.cdiv(D, block_d))](
        x_t, state,
        z_t if z_t is not None else x_t, U if U is not None else x_t, w_t if w_t is not None else x_t,
        static if static is not None else x_t, y, new_state,
        D, R, H,
        W=width, W_P=next_pow2(width), HS=D // H, MODE=mode, BLOCK_R=min(16, next_pow2(R)),
        BLOCK_D=block_d, HAS_STATIC=static is not None, RESIDUAL=residual,
        num_warps=1 if interpreting() else 4,
    )
    return y, new_state
