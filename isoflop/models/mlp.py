"""SwiGLU feed-forward: down(silu(gate(h)) * up(h)), bias-free, hidden width d_ff.

With convs after every linear, gate and up are filtered with the MLP's normed input as generator
input, and down with the SwiGLU hidden (each conv reads its linear's input).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.models.config import ModelConfig
from isoflop.models.conv import LinearConvs


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, d_ff = cfg.d_model, cfg.d_ff
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)
        shapes = {"gate": (d, d_ff), "up": (d, d_ff), "down": (d_ff, d)}
        self.convs = LinearConvs(cfg.conv, shapes, cfg.init_std)

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        gate = self.convs.run("gate", self.gate(h), h, cu_seqlens)
        up = self.convs.run("up", self.up(h), h, cu_seqlens)
        hidden = F.silu(gate) * up
        return self.convs.run("down", self.down(hidden), hidden, cu_seqlens)

    def step(self, h_t: Tensor, conv_states: dict[str, Tensor]) -> Tensor:
        """One decode token h_t [B, d]; updates conv_states."""
        gate = self.convs.step("gate", self.gate(h_t), h_t, conv_states)
        up = self.convs.step("up", self.up(h_t), h_t, conv_states)
        hidden = F.silu(gate) * up
        return self.convs.step("down", self.down(hidden), hidden, conv_states)
