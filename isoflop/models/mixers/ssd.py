"""Mamba-2's recurrence (SSD), in plain PyTorch: the chunked form, the naive loop, one decode step.

Per head, with a state S [N, P] (state size x head channels):

    S_t = exp(a_t) * S_{t-1} + B_t x_t^T        y_t = S_t^T C_t

a_t <= 0 is the log decay (Mamba-2: dt_t * A) and x_t is already scaled by dt_t. This is linear
attention with one scalar decay per head and token, C the query, B the key, x the value, which is
how fla-core computes it (`chunk_simple_gla` with scale 1; see fla.py).

Shapes: x [b, T, H, P], a [b, T, H], B and C [b, T, H, N] (groups already expanded to heads),
state [b, H, N, P] (fla-core's [K, V] layout). The arithmetic runs in float32 (float64 for float64
inputs); y has x's dtype and the state stays in the accumulation dtype.

`ssd_chunked` is the reference the model runs: chunks of c tokens, a masked c x c product inside each
chunk (matmuls only) and the state carried from chunk to chunk (T / c sequential steps instead of T).
`ssd_recurrent` is the definition, token by token; tests hold the chunked form to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from isoflop.kernels.reference import accumulation_dtype
from isoflop.models.config import RECURRENCE_CHUNK_SIZE


def to_chunks(t: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
    """[b, T, H, *rest] -> [b, H, n, chunk, *rest], zero-padded at the end to n * chunk tokens.
    Padding is harmless: a zero key/value adds nothing to the state and a zero log decay keeps it."""
    b, T, H = t.shape[:3]
    n = -(-T // chunk)
    t = t.to(dtype)
    if n * chunk != T:
        t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, n * chunk - T))
    return t.reshape(b, n, chunk, H, *t.shape[3:]).movedim(3, 1)


def from_chunks(t: Tensor, T: int) -> Tensor:
    """[b, H, n, chunk, D] -> [b, T, H, D] (padding dropped)."""
    b, H, n, chunk, D = t.shape
    return t.movedim(1, 3).reshape(b, n * chunk, H, D)[:, :T]


def decay_matrix(cumulative: Tensor) -> Tensor:
    """exp(G_i - G_j) for j <= i and 0 above the diagonal, from cumulative log decays G [..., c].
    Masked before the exp, so the (positive) differences above the diagonal never overflow."""
    c = cumulative.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=cumulative.device).tril()
    diff = cumulative[..., :, None] - cumulative[..., None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()


def ssd_chunked(
    x: Tensor, a: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None,
    chunk_size: int = RECURRENCE_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The recurrence over whole sequences -> (y [b, T, H, P], final state [b, H, N, P])."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    acc = accumulation_dtype(x.dtype)
    c = min(chunk_size, T)
    xs, Bs, Cs = (to_chunks(t, c, acc) for t in (x, B, C))
    cumulative = to_chunks(a, c, acc).cumsum(-1)  # [b, H, n, c]: log decay since the chunk start

    # Inside each chunk: a masked "attention" C B^T weighted by the decay between the two tokens.
    y_inside = ((Cs @ Bs.transpose(-1, -2)) * decay_matrix(cumulative)) @ xs
    # What each chunk adds to the state, decayed to the chunk's end.
    to_end = (cumulative[..., -1:] - cumulative).exp()
    chunk_states = (Bs * to_end[..., None]).transpose(-1, -2) @ xs  # [b, H, n, N, P]

    state = x.new_zeros(b, H, N, P, dtype=acc) if initial_state is None else initial_state.to(acc)
    y_from_state = []
    for i in range(xs.shape[2]):
        y_from_state.append((Cs[:, :, i] * cumulative[:, :, i, :, None].exp()) @ state)
        state = cumulative[:, :, i, -1, None, None].exp() * state + chunk_states[:, :, i]
    y = y_inside + torch.stack(y_from_state, dim=2)
    return from_chunks(y, T).to(x.dtype), state


def ssd_step(
    x_t: Tensor, a_t: Tensor, B_t: Tensor, C_t: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: x_t [b, H, P], a_t [b, H], B_t and C_t [b, H, N], state [b, H, N, P]."""
    acc = accumulation_dtype(x_t.dtype)
    state = (a_t.to(acc).exp()[..., None, None] * state.to(acc)
             + B_t.to(acc)[..., :, None] * x_t.to(acc)[..., None, :])
    y_t = (C_t.to(acc)[..., :, None] * state).sum(-2)
    return y_t.to(x_t.dtype), state


def ssd_recurrent(
    x: Tensor, a: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The definition, one token at a time (tests only: T sequential steps)."""
    b, T, H, P = x.shape
    acc = accumulation_dtype(x.dtype)
    state = (x.new_zeros(b, H, B.shape[-1], P, dtype=acc) if initial_state is None
             else initial_state)
    ys = []
    for t in range(T):
        y_t, state = ssd_step(x[:, t], a[:, t], B[:, t], C[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state
