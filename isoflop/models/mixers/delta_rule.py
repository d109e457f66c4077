"""Gated DeltaNet's recurrence (the gated delta rule), in plain PyTorch: chunked, naive, one step.

Per head, with a state S [K, V] (key x value channels), unit-norm keys k_t and 0 < beta_t < 1:

    S'  = exp(g_t) * S_{t-1}                               (gate: forget a little of everything)
    S_t = S' + beta_t * k_t (v_t - S'^T k_t)^T             (delta rule: write v_t at key k_t)
    o_t = S_t^T (scale * q_t)

g_t <= 0 is the log decay. Shapes: q, k [b, T, H, K], v [b, T, H, V], g and beta [b, T, H],
state [b, H, K, V] (fla-core's layout). The arithmetic runs in float32 (float64 for float64 inputs);
o has v's dtype and the state stays in the accumulation dtype.

The chunked form (Yang et al., "Gated Delta Networks", 2024; the WY / UT transform). Inside a chunk,
with G the cumulative log decay since the chunk start and S0 the state at the chunk start, the
writes u_t = beta_t (v_t - S'^T k_t) solve a unit lower-triangular system

    (I + A) U = diag(beta) V - diag(beta * exp(G)) K S0,    A[t, j] = beta_t (k_t . k_j) exp(G_t - G_j), j < t,

so with T = (I + A)^-1 (one triangular solve per chunk, no sequential loop inside it):
U = T diag(beta) V - W S0 with W = T diag(beta * exp(G)) K. The chunk's outputs and its end state
are then matmuls:

    o   = diag(exp(G)) Q S0 + ((Q K^T) * Gamma) U,                Gamma[t, j] = exp(G_t - G_j), j <= t
    S_c = exp(G_c) S0 + (K * exp(G_c - G))^T U.

The state is carried from chunk to chunk (T / c sequential steps instead of T).
"""

from __future__ import annotations

import torch
from torch import Tensor

from isoflop.kernels.reference import accumulation_dtype
from isoflop.models.config import RECURRENCE_CHUNK_SIZE
from isoflop.models.mixers.ssd import decay_matrix, from_chunks, to_chunks


def gated_delta_rule_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None = None, chunk_size: int = RECURRENCE_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The recurrence over whole sequences -> (o [b, T, H, V], final state [b, H, K, V])."""
    b, T, H, K = k.shape
    V = v.shape[-1]
    acc = accumulation_dtype(v.dtype)
    c = min(chunk_size, T)
    qs, ks, vs = (to_chunks(t, c, acc) for t in (q, k, v))
    qs = qs * scale
    betas = to_chunks(beta, c, acc)
    cumulative = to_chunks(g, c, acc).cumsum(-1)  # G: [b, H, n, c]
    gamma = decay_matrix(cumulative)  # Gamma, lower triangle including the diagonal

    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=k.device).tril(-1)
    A = (betas[..., :, None] * (ks @ ks.transpose(-1, -2)) * gamma).masked_fill(~strictly_lower, 0)
    eye = torch.eye(c, dtype=acc, device=k.device)
    T_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    U = T_inv @ (betas[..., None] * vs)
    W = T_inv @ ((betas * cumulative.exp())[..., None] * ks)
    scores = (qs @ ks.transpose(-1, -2)) * gamma

    state = v.new_zeros(b, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for i in range(qs.shape[2]):
        G = cumulative[:, :, i]
        writes = U[:, :, i] - W[:, :, i] @ state
        outputs.append((qs[:, :, i] * G.exp()[..., None]) @ state + scores[:, :, i] @ writes)
        to_end = (G[..., -1:] - G).exp()
        state = (G[..., -1, None, None].exp() * state
                 + (ks[:, :, i] * to_end[..., None]).transpose(-1, -2) @ writes)
    o = torch.stack(outputs, dim=2)
    return from_chunks(o, T).to(v.dtype), state


def gated_delta_rule_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, g_t: Tensor, beta_t: Tensor, scale: float,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """One token: q_t, k_t [b, H, K], v_t [b, H, V], g_t and beta_t [b, H], state [b, H, K, V]."""
    acc = accumulation_dtype(v_t.dtype)
    q_t, k_t, v_t, g_t, beta_t = (t.to(acc) for t in (q_t, k_t, v_t, g_t, beta_t))
    state = g_t.exp()[..., None, None] * state.to(acc)
    recalled = (k_t[..., :, None] * state).sum(-2)  # S'^T k_t: what the state holds at k_t
    state = state + k_t[..., :, None] * (beta_t[..., None] * (v_t - recalled))[..., None, :]
    o_t = ((q_t * scale)[..., :, None] * state).sum(-2)
    return o_t.to(v_t.dtype), state


def gated_delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The definition, one token at a time (tests only: T sequential steps)."""
    b, T, H, K = k.shape
    acc = accumulation_dtype(v.dtype)
    state = (v.new_zeros(b, H, K, v.shape[-1], dtype=acc) if initial_state is None
             else initial_state)
    outputs = []
    for t in range(T):
        o_t, state = gated_delta_rule_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale, state
        )
        outputs.append(o_t)
    return torch.stack(outputs, dim=1), state
