"""Mixture-of-experts feed-forward: token-choice top-k routing over SwiGLU experts.

    p = softmax(router(h))                      (per token, over n_experts; float32)
    chosen = top_k(p)                           (each token picks its k experts)
    out = sum_{e in chosen} p_e * expert_e(h)   (+ shared_expert(h) if configured)

The gate weights are the chosen experts' router probabilities, not renormalised over the k (OLMoE's
choice; with top_k = n_experts the layer is a dense soft mixture). No token is dropped: every expert
takes all the tokens routed to it.

Batched expert compute: the (token, expert) assignments are sorted by expert and scattered into one
zero-padded [n_experts, capacity, d] buffer, capacity being the busiest expert's load this batch,
and the experts run as three batched matmuls (torch.bmm) over that buffer; the outputs are gathered
back, weighted and summed per token with index_add. No Python loop over tokens or experts. Reading
the capacity back is one host sync per layer and forward; the padding costs
n_experts * capacity - tokens * top_k rows of wasted compute, which FLOP counts leave out (they
count the active experts only; see counting.py).

Auxiliary losses, recorded on `aux_losses` by every forward (float32 scalars):
- load_balance (Switch Transformer / GShard form): n_experts * sum_e f_e * P_e, with f_e the share
  of the batch's token-to-expert assignments that went to e and P_e the mean router probability of
  e; 1 at perfect balance. Its gradient reaches the router through P only.
- router_z (ST-MoE): mean over tokens of logsumexp(router logits)^2; keeps the logits small.
`router_loss` weighs them with the config's coefficients and averages over layers; the language model
adds that to the training loss only (see lm.py), so evaluations see pure cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.models.config import ModelConfig
from isoflop.models.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.moe
        d, f, E = cfg.d_model, cfg.d_ff, spec.n_experts
        self.n_experts, self.top_k = E, spec.top_k
        self.aux_loss_coef, self.z_loss_coef = spec.aux_loss_coef, spec.z_loss_coef
        self.router = nn.Linear(d, E, bias=False)
        # The experts' SwiGLU weights, stacked: expert e computes
        # (silu(h @ gate[e]) * (h @ up[e])) @ down[e].
        self.gate = nn.Parameter(torch.empty(E, d, f))
        self.up = nn.Parameter(torch.empty(E, d, f))
        self.down = nn.Parameter(torch.empty(E, f, d))
        self.shared = SwiGLU(cfg) if spec.shared_expert else None
        self.aux_losses: dict[str, Tensor] = {}
        # The language model's init rule (lm.py): normal(0, init_std), and the residual branch's
        # output projection init_std / sqrt(2 * n_layers).
        with torch.no_grad():
            self.gate.normal_(0.0, cfg.init_std)
            self.up.normal_(0.0, cfg.init_std)
            self.down.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """h [b, T, d] -> [b, T, d]. cu_seqlens is not needed (each token is routed on its own);
        it is accepted so that a block calls either feed-forward the same way."""
        x = h.reshape(-1, h.shape[-1])
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [tokens, k]
        out = self._experts(x, experts.flatten(), weights.flatten())
        if self.shared is not None:
            out = out + self.shared(x)
        self.aux_losses = {
            "load_balance": load_balance_loss(probs, experts, self.n_experts),
            "router_z": torch.logsumexp(logits, dim=-1).square().mean(),
        }
        return out.view(h.shape)

    def _experts(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """sum over each token's assignments of weight * expert(x), batched (module docstring).
        x [tokens, d]; experts and weights [tokens * k], token-major."""
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        order = experts.argsort(stable=True)
        expert, token, weight = experts[order], token[order], weights[order]
        load = torch.bincount(expert, minlength=self.n_experts)
        first = load.cumsum(0) - load  # where each expert's run starts in the sorted list
        slot = torch.arange(expert.numel(), device=x.device) - first[expert]
        capacity = int(load.max())
        buffer = x.new_zeros(self.n_experts, capacity, x.shape[-1])
        buffer = buffer.index_put((expert, slot), x[token])
        hidden = F.silu(torch.bmm(buffer, self.gate)) * torch.bmm(buffer, self.up)
        outputs = torch.bmm(hidden, self.down)[expert, slot]
        weighted = outputs * weight[:, None].to(outputs.dtype)
        return weighted.new_zeros(x.shape).index_add(0, token, weighted)

    def step(self, h_t: Tensor, conv_states: dict[str, Tensor]) -> Tensor:
        """One decode token h_t [b, d]; routing is per token, so this is the forward on it.
        (conv_states: unused, the MoE has no short convs; the block passes them to any FFN.)"""
        return self(h_t[:, None])[:, 0]


def load_balance_loss(probs: Tensor, experts: Tensor, n_experts: int) -> Tensor:
    """n_experts * sum_e (share of assignments to e) * (mean router probability of e)."""
    load = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype)
    return n_experts * (load / experts.numel() * probs.mean(dim=0)).sum()


def router_loss(layers: list[MoE]) -> tuple[Tensor, dict[str, Tensor]]:
    """(the weighted auxiliary loss, its parts averaged over layers) from the layers' last forward.
    Averaging over layers keeps a coefficient's meaning independent of depth."""
    parts = {
        name: torch.stack([layer.aux_losses[name] for layer in layers]).mean()
        for name in ("load_balance", "router_z")
    }
    first = layers[0]  # every layer of a model shares one MoESpec
    weighted = first.aux_loss_coef * parts["load_balance"] + first.z_loss_coef * parts["router_z"]
    return weighted, parts
