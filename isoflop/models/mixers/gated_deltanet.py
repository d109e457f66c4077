"""The Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh, 2024) with a pluggable short convolution,
laid out as fla-core's GatedDeltaNet layer.

    q, k, v = silu(conv(q(h))), silu(conv(k(h))), silu(conv(v(h)))      (h: the block's normed input)
    q, k = l2norm(q), l2norm(k)                                          (per head)
    beta = sigmoid(b_proj(h)),  g = -exp(A_log) * softplus(a_proj(h) + dt_bias)   (per head)
    o = gated delta rule(q, k, v, g, beta, scale = head_dim^-0.5)
    out = o(rmsnorm(o) * silu(gate(h)))                                  (the norm per head)

Widths: n_heads heads with keys of head_dim and values of ssm.expand * head_dim channels (fla-core's
expand_v), so q and k are d_model wide and v, gate and the output projection's input
ssm.expand * d_model.

The short convolution. Gated DeltaNet filters q, k and v with a causal depthwise conv (width 4)
before their SiLU; that conv is the slot here (cfg.conv.kind: none | static | dynamic-lowrank |
dynamic-headwise), one module per branch keyed "q", "k", "v", the dynamic ones generating their
filters from h (the paper: the dynamic conv replaces the built-in static ones). They are the
residual, bias-free modules of conv.py, as in the Transformer study.

Packed documents: the convs take cu_seqlens; the scan runs each document from a zero state.
Decode: step() carries the convs' last inputs and the state [b, heads, head_dim, value width].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.kernels.reference import accumulation_dtype
from isoflop.models.config import ModelConfig
from isoflop.models.conv import LinearConvs
from isoflop.models.mixers import scan
from isoflop.models.mixers.delta_rule import gated_delta_rule_step
from isoflop.models.mixers.mamba2 import decay_rate_init, dt_bias_init

L2_NORM_EPS = 1e-6


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.key_dim = cfg.ssm_heads, cfg.head_dim
        self.value_dim = cfg.ssm.expand * cfg.head_dim
        self.scale = self.key_dim**-0.5
        self.norm_eps = cfg.norm_eps
        keys, values = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.q = nn.Linear(d, keys, bias=False)
        self.k = nn.Linear(d, keys, bias=False)
        self.v = nn.Linear(d, values, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)  # -> the decay g
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)  # -> the write strength beta
        self.gate = nn.Linear(d, values, bias=False)  # the output gate
        self.o = nn.Linear(values, d, bias=False)
        shapes = {"q": (d, keys), "k": (d, keys), "v": (d, values)}
        self.convs = LinearConvs(cfg.conv, shapes, cfg.init_std)
        self.A_log = decay_rate_init(self.n_heads)
        self.dt_bias = dt_bias_init(self.n_heads)
        self.norm_weight = nn.Parameter(torch.ones(self.value_dim))  # shared by the heads

    def _heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[..., width] -> [..., heads, head width]; q and k to unit norm per head."""
        acc = accumulation_dtype(q.dtype)
        q, k = (F.normalize(t.unflatten(-1, (self.n_heads, self.key_dim)).to(acc), dim=-1,
                            eps=L2_NORM_EPS).to(t.dtype) for t in (q, k))
        return q, k, v.unflatten(-1, (self.n_heads, self.value_dim))

    def _gates(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(g, beta) [..., heads] in float32 (float64 for float64 inputs): the log decay and the
        write strength."""
        acc = accumulation_dtype(h.dtype)
        g = -self.A_log.to(acc).exp() * F.softplus(self.a_proj(h).to(acc) + self.dt_bias.to(acc))
        return g, torch.sigmoid(self.b_proj(h).to(acc))

    def _output(self, o: Tensor, h: Tensor) -> Tensor:
        """o(rmsnorm(o) * silu(gate(h))) with o [..., heads, value_dim]."""
        acc = accumulation_dtype(h.dtype)
        normed = F.rms_norm(o.to(acc), (self.value_dim,), self.norm_weight.to(acc), self.norm_eps)
        gate = F.silu(self.gate(h).to(acc)).unflatten(-1, (self.n_heads, self.value_dim))
        return self.o((normed * gate).flatten(-2).to(h.dtype))

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """h [b, T, d] is the block's normed input -> [b, T, d]."""
        q = F.silu(self.convs.run("q", self.q(h), h, cu_seqlens))
        k = F.silu(self.convs.run("k", self.k(h), h, cu_seqlens))
        v = F.silu(self.convs.run("v", self.v(h), h, cu_seqlens))
        g, beta = self._gates(h)
        o = scan.gated_delta_rule(*self._heads(q, k, v), g, beta, self.scale, cu_seqlens)
        return self._output(o, h)

    def step(
        self, h_t: Tensor, conv_states: dict[str, Tensor], state: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One decode token h_t [b, d]; updates conv_states; returns (out [b, d], new state)."""
        q = F.silu(self.convs.step("q", self.q(h_t), h_t, conv_states))
        k = F.silu(self.convs.step("k", self.k(h_t), h_t, conv_states))
        v = F.silu(self.convs.step("v", self.v(h_t), h_t, conv_states))
        g, beta = self._gates(h_t)
        o, state = gated_delta_rule_step(*self._heads(q, k, v), g, beta, self.scale, state)
        return self._output(o, h_t), state

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The state before the first token, kept in the accumulation dtype."""
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return torch.zeros(shape, device=device, dtype=accumulation_dtype(dtype))
