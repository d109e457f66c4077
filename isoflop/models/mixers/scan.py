"""The two recurrences over whole sequences, as the mixers call them: fla-core's kernels on CUDA
when it is installed (fla.py), the chunked PyTorch reference everywhere else.

Both start from a zero state. Packed documents (B == 1, cu_seqlens [0, ..., T]) never share a
state: fla-core takes cu_seqlens itself; the reference runs each document on its own (a loop over
documents, not tokens), so a packed row computes exactly what separate rows would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from isoflop.models.mixers import fla
from isoflop.models.mixers.delta_rule import gated_delta_rule_chunked
from isoflop.models.mixers.ssd import ssd_chunked


def _by_document(
    run: Callable[..., Tensor], tensors: tuple[Tensor, ...], cu_seqlens: Tensor | None
) -> Tensor:
    """run(*tensors) on each document's slice of the time axis (dim 1), joined again."""
    if cu_seqlens is None:
        return run(*tensors)
    pieces = [run(*(t[:, start:end] for t in tensors))
              for start, end in itertools.pairwise(cu_seqlens.tolist()) if end > start]
    return torch.cat(pieces, dim=1)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _as_long(cu_seqlens: Tensor | None, device: torch.device) -> Tensor | None:
    return None if cu_seqlens is None else cu_seqlens.to(device=device, dtype=torch.long)


def ssd(x: Tensor, a: Tensor, B: Tensor, C: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Mamba-2's scan: x [b, T, H, P] (scaled by dt), a [b, T, H] (dt * A), B, C [b, T, H, N]
    -> y [b, T, H, P] (see ssd.py)."""
    if fla.use_fla(C, _needs_grad(x, a, B, C)):
        return fla.ssd(x, a, B, C, _as_long(cu_seqlens, C.device))
    return _by_document(lambda *t: ssd_chunked(*t)[0], (x, a, B, C), cu_seqlens)


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Gated DeltaNet's scan: q, k [b, T, H, K] (unit norm), v [b, T, H, V], g and beta
    [b, T, H] -> o [b, T, H, V] (see delta_rule.py)."""
    if fla.use_fla(q, _needs_grad(q, k, v, g, beta)):
        return fla.gated_delta_rule(q, k, v, g, beta, scale, _as_long(cu_seqlens, q.device))
    return _by_document(
        lambda *t: gated_delta_rule_chunked(*t, scale)[0], (q, k, v, g, beta), cu_seqlens
    )
