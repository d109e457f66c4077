"""Linear + cross-entropy in chunks of rows: the loss of logits = h @ weight.T without ever holding
the logits of the whole batch.

At the paper's vocabulary (~100k) a batch of 8 x 4096 tokens has 13 GB of float32 logits, written
and read several times a step (the matmul's output, its float32 copy, the softmax, its gradient).
`linear_cross_entropy` computes them one chunk of rows at a time, and with each chunk's loss it
computes that chunk's gradients at once, (softmax - onehot) / n @ weight for h and its transpose
@ h accumulated in float32 for the weight, so the chunk's logits are freed before the next one and
backward only scales the stored gradients by the incoming one. The price: the gradients are
computed even if backward never runs (so evaluations, which want logits anyway, use the plain
path), and they cost an [N, d] and a float32 [V, d] tensor held from forward to backward.

Dtypes are those of the plain path `F.cross_entropy(lm_head(h).float(), targets)`: under autocast
the three matmuls run in autocast's dtype (bf16), like lm_head's forward and backward; the softmax
runs in float32 (float64 inputs stay float64, for exact comparisons).

A process-wide switch chooses it for the language model's training loss (lm.py): "off", "on", or
"auto" (the default: off, see AUTO_IS_ON). Set it with `set_fused_ce` or the
environment variable ISOFLOP_FUSED_CE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from isoflop.backends import BackendChoice

IGNORE_INDEX = -100  # F.cross_entropy's default
SETTINGS = ("auto", "off", "on")
# What "auto" means. Off: on one H200 (300M, vocab 100,352, 8 x 4096 tokens, regional compile, which
# compiles the plain lm_head + cross-entropy into one region) `benchmarks/train_throughput.py
# --fused-ce both` measured 1.8-3.5% fewer tokens/s and 6.4 GiB more peak memory with it on.
AUTO_IS_ON = False
# Rows per chunk: a multiple of 256 (GEMM-friendly) that keeps one chunk's float32 logits under
# 1 GiB (2,560 rows at the paper's 100,352 vocabulary: 13 chunks for 8 x 4096 tokens).
LOGITS_PER_CHUNK = 2**28
CHUNK_ROWS_MULTIPLE = 256

_choice = BackendChoice("ISOFLOP_FUSED_CE", SETTINGS, "fused cross-entropy setting")


def set_fused_ce(name: str) -> None:
    """Choose for every later forward: "auto", "off" or "on"."""
    _choice.set(name)


def get_fused_ce() -> str:
    return _choice.get()


def fused_ce_enabled() -> bool:
    return _choice.name == "on" or (_choice.name == "auto" and AUTO_IS_ON)


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, LOGITS_PER_CHUNK // vocab_size // CHUNK_ROWS_MULTIPLE) * CHUNK_ROWS_MULTIPLE


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None
) -> Tensor:
    """Mean cross-entropy of logits = h @ weight.T over the targets that are not -100, as
    F.cross_entropy(logits, targets) gives it, computed `chunk_rows` rows at a time.

    h [..., d], weight [V, d], targets [...] int64 -> a scalar float32 (float64 for float64
    inputs). All targets ignored: nan, and zero gradients, as F.cross_entropy (so switching the
    fused path on changes nothing a caller sees).
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"h {tuple(h.shape)} and targets {tuple(targets.shape)}: allowed: "
                         "h [..., d] with targets of its leading shape")
    chunk_rows = default_chunk_rows(weight.shape[0]) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}; allowed: an integer >= 1")
    device = h.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                     compute_dtype, chunk_rows, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward scales the gradients."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype,
                chunk_rows: int, grad_enabled: bool) -> Tensor:
        # needs_input_grad says only whether the inputs require grad, true under no_grad too.
        wanted = (grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1])
        # What torch.amp.custom_fwd(cast_inputs=...) does, for the device at hand: the dtypes are
        # chosen here, so autocast must not cast again (it would re-cast the weight every matmul).
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_weight = chunked_loss_and_gradients(
                h, weight, targets, compute_dtype, chunk_rows, *wanted)
        ctx.save_for_backward(grad_h, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_weight = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_h, grad_weight, None, None, None, None


def chunked_loss_and_gradients(
    h: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype, chunk_rows: int,
    want_grad_h: bool, want_grad_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """h [N, d], weight [V, d], targets [N] -> (mean loss, its gradient for h in h's dtype,
    for the weight in float32 or wider), chunk_rows rows of logits at a time. The matmuls run in
    compute_dtype (their float32 accumulation is the matmul's own), the softmax in float32 or
    wider; the weight's gradient adds up the chunks' in float32."""
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    w = weight.to(compute_dtype)
    valid = targets != IGNORE_INDEX
    counted = valid.sum()
    # Gradients divide by at least 1: all-ignored gives zeros, as F.cross_entropy's backward.
    row_scale = valid.to(softmax_dtype) / counted.clamp(min=1)
    safe_targets = targets.masked_fill(~valid, 0)
    loss_sum = torch.zeros((), dtype=softmax_dtype, device=h.device)
    grad_h = torch.empty_like(h) if want_grad_h else None
    grad_weight = (torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                               device=weight.device) if want_grad_weight else None)
    for start in range(0, h.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h_chunk, target = h[rows].to(compute_dtype), safe_targets[rows, None]
        logits = (h_chunk @ w.T).to(softmax_dtype)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        loss_sum += ((lse - logits.gather(1, target)).squeeze(1) * valid[rows]).sum()
        if not (want_grad_h or want_grad_weight):
            continue
        grad_logits = logits.sub_(lse).exp_()  # the softmax, in the logits' memory
        grad_logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=softmax_dtype))
        grad_logits = grad_logits.mul_(row_scale[rows, None]).to(compute_dtype)
        if grad_h is not None:
            grad_h[rows] = grad_logits @ w
        if grad_weight is not None:
            grad_weight += grad_logits.T @ h_chunk
    return loss_sum / counted, grad_h, grad_weight  # nan when all are ignored, as F.cross_entropy
