"""SwiGLU feed-forward: down(silu(gate(h)) * up(h)), bias-free, hidden width d_ff.

With convs after every linear, gate and up are filtered with the MLP's normed input as generator
input, and down with the SwiGLU hidden (each conv reads its linear's input). gate, up and their
dynamic convs' generator input maps run as one matmul (`LinearConvs.project`), down and its conv's
generator as another.
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
        hidden = self.convs.project_and_swiglu(h, self.gate, self.up, cu_seqlens)
        return self.convs.project_and_run(hidden, {"down": self.down}, cu_seqlens)[0]

    def step(self, h_t: Tensor, conv_states: dict[str, Tensor]) -> Tensor:
        """One decode token h_t [B, d]; updates conv_states."""
        gate, up = self.convs.project_and_step(h_t, {"gate": self.gate, "up": self.up}, conv_states)
        hidden = F.silu(gate) * up
        return self.convs.project_and_step(hidden, {"down": self.down}, conv_states)[0]
