"""The Mamba-2 mixer (Dao & Gu, 2024) with a pluggable short convolution.

    z, x, B, C, dt = projections of h           (h: the block's normed input)
    x, B, C = silu(conv(x)), silu(conv(B)), silu(conv(C))
    y = SSD(dt * x, dt * A, B, C) + D * x       (per head; A < 0, dt = softplus(. + dt_bias))
    out = o(rmsnorm(y * silu(z)))               (the norm per group of heads, as in Mamba-2)

Widths: x and z are expand * d_model wide, in heads of model.head_dim channels; B and C are
n_groups * state_size wide and shared by the heads of a group.

The short convolution. Mamba-2 filters x, B and C with one causal depthwise conv (width 4) before
its SiLU. That conv is the slot here (cfg.conv.kind: none | static | dynamic-lowrank |
dynamic-headwise): each of the three branches gets its own conv module, the dynamic ones generating
their filters from h, the block's normed input (the paper: "the dynamic conv replaces the built-in
static short convs"). The modules are those of the Transformer study (conv.py), so they are residual
(X <- X + conv(X)) and bias-free; a residual conv is a plain one with tap 0 moved by one, so
"static" spans Mamba-2's own conv up to its bias. The convs are keyed by the attention names of
their branches' roles in SSD's attention dual: "q" filters C, "k" filters B, "v" filters x.

Packed documents: the convs take cu_seqlens; the scan runs each document from a zero state.
Decode: step() carries the convs' last inputs and the SSM state [b, heads, state_size, head_dim].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.kernels.reference import accumulation_dtype
from isoflop.models.config import ModelConfig
from isoflop.models.conv import LinearConvs
from isoflop.models.mixers import scan
from isoflop.models.mixers.ssd import ssd_step

# Mamba-2's initial ranges: A = -uniform(1, 16) per head; dt log-uniform in [0.001, 0.1].
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4


def decay_rate_init(n_heads: int) -> nn.Parameter:
    """log(-A) per head, A = -uniform(A_INIT_RANGE); learned in log space so A stays negative."""
    return nn.Parameter(torch.empty(n_heads).uniform_(*A_INIT_RANGE).log())


def dt_bias_init(n_heads: int) -> nn.Parameter:
    """The bias whose softplus is a log-uniform step size in DT_INIT_RANGE (inverse softplus)."""
    low, high = (math.log(v) for v in DT_INIT_RANGE)
    dt = torch.empty(n_heads).uniform_(low, high).exp().clamp(min=DT_INIT_FLOOR)
    return nn.Parameter(dt + torch.log(-torch.expm1(-dt)))


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, ssm = cfg.d_model, cfg.ssm
        self.n_heads, self.head_dim = cfg.ssm_heads, cfg.head_dim
        self.n_groups, self.state_size = ssm.n_groups, ssm.state_size
        self.norm_eps = cfg.norm_eps
        inner, bc = ssm.expand * d, ssm.n_groups * ssm.state_size
        self.z_proj = nn.Linear(d, inner, bias=False)
        self.x_proj = nn.Linear(d, inner, bias=False)
        self.b_proj = nn.Linear(d, bc, bias=False)
        self.c_proj = nn.Linear(d, bc, bias=False)
        self.dt_proj = nn.Linear(d, self.n_heads, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        self.convs = LinearConvs(cfg.conv, {"q": (d, bc), "k": (d, bc), "v": (d, inner)}, cfg.init_std)
        self.A_log = decay_rate_init(self.n_heads)
        self.dt_bias = dt_bias_init(self.n_heads)
        self.D = nn.Parameter(torch.ones(self.n_heads))  # the skip connection y += D * x
        self.norm_weight = nn.Parameter(torch.ones(inner))

    def _discretise(self, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(dt * x [..., H, P], dt * A [..., H]) in float32 (float64 for float64 inputs), from
        h [..., d] and x [..., inner]."""
        acc = accumulation_dtype(h.dtype)
        dt = F.softplus(self.dt_proj(h).to(acc) + self.dt_bias.to(acc))
        A = -self.A_log.to(acc).exp()
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        return x * dt[..., None], dt * A

    def _heads(self, t: Tensor) -> Tensor:
        """B or C [..., n_groups * N] -> [..., n_heads, N], each group's repeated for its heads."""
        groups = t.unflatten(-1, (self.n_groups, self.state_size))
        return groups.repeat_interleave(self.n_heads // self.n_groups, dim=-2)

    def _output(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """o(rmsnorm(y + D x) * silu(z))) with y [..., H, P] and x, z [..., inner]."""
        acc = accumulation_dtype(x.dtype)
        y = y.to(acc) + self.D.to(acc)[:, None] * x.unflatten(-1, (self.n_heads, self.head_dim))
        gated = (y.flatten(-2) * F.silu(z.to(acc))).unflatten(-1, (self.n_groups, -1))
        normed = F.rms_norm(gated, (gated.shape[-1],), eps=self.norm_eps).flatten(-2)
        return self.o((normed * self.norm_weight.to(acc)).to(z.dtype))

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """h [b, T, d] is the block's normed input -> [b, T, d]."""
        x = F.silu(self.convs.run("v", self.x_proj(h), h, cu_seqlens))
        B = F.silu(self.convs.run("k", self.b_proj(h), h, cu_seqlens))
        C = F.silu(self.convs.run("q", self.c_proj(h), h, cu_seqlens))
        x_dt, a = self._discretise(h, x)
        y = scan.ssd(x_dt, a, self._heads(B), self._heads(C), cu_seqlens)
        return self._output(y, x, self.z_proj(h))

    def step(
        self, h_t: Tensor, conv_states: dict[str, Tensor], state: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One decode token h_t [b, d]; updates conv_states; returns (out [b, d], new state)."""
        x = F.silu(self.convs.step("v", self.x_proj(h_t), h_t, conv_states))
        B = F.silu(self.convs.step("k", self.b_proj(h_t), h_t, conv_states))
        C = F.silu(self.convs.step("q", self.c_proj(h_t), h_t, conv_states))
        x_dt, a = self._discretise(h_t, x)
        y, state = ssd_step(x_dt, a, self._heads(B), self._heads(C), state)
        return self._output(y, x, self.z_proj(h_t)), state

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The SSM state before the first token, kept in the accumulation dtype."""
        shape = (batch_size, self.n_heads, self.state_size, self.head_dim)
        return torch.zeros(shape, device=device, dtype=accumulation_dtype(dtype))
