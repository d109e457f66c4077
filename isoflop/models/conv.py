"""Short causal convolutions as modules: static, and dynamic (low-rank or head-wise filters).

The arithmetic lives in `isoflop.kernels` (reference spec + fast kernels picked by device); these
modules only own the parameters and call the ops through `kernels.<op>` at call time, so a backend
registered later is used without touching this file.

Every conv here is residual, `X <- X + conv(X)`, including the static one: static and dynamic then
differ only by the input-dependent part of the filter, and a dynamic conv at initialisation
(generator output exactly zero) is exactly a residual static conv with filter `bias`.

Filters are [W, channels] with tap k = lag k (tap 0 is the current token), the reverse of
nn.Conv1d's weight order. Static filters and the dynamic convs' static bias are marked
`_no_weight_decay`: decaying them would pull the conv towards the identity, not towards "no
feature", which is what weight decay on a matrix means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from isoflop import kernels
from isoflop.models.config import ConvSpec


def _uniform_filter(width: int, channels: int) -> nn.Parameter:
    """A [W, channels] filter, uniform in +-1/sqrt(W) (the fan-in of one output channel is W)."""
    bound = 1.0 / math.sqrt(width)
    weight = nn.Parameter(torch.empty(width, channels).uniform_(-bound, bound))
    weight._no_weight_decay = True
    return weight


class StaticShortConv(nn.Module):
    """y = x + sum_k weight[k] * x[t-k]: a depthwise causal conv with one learned filter."""

    def __init__(self, channels: int, width: int, residual: bool = True) -> None:
        super().__init__()
        self.channels, self.width, self.residual = channels, width, residual
        self.weight = _uniform_filter(width, channels)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.width)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """x [B, T, channels] -> [B, T, channels]."""
        return kernels.static_conv(x, self.weight, residual=self.residual, cu_seqlens=cu_seqlens)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One decode token x_t [B, channels]; state [B, W-1, channels] holds the previous inputs."""
        return kernels.static_conv_step(x_t, state, self.weight, residual=self.residual)

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device, dtype=dtype)


class DynamicShortConv(nn.Module):
    """A causal depthwise conv whose filter at position t is generated from h_t (affine in h_t).

    kind='lowrank': w_t = reshape(down(h_t) @ up, [W, channels]) + bias, with `down` a
      Linear(in_features -> rank), `up` [rank, W*channels] (tap-major) starting at zero.
    kind='headwise': w_t = reshape(proj(h_t), [W, H]) broadcast over each head's `head_size`
      consecutive channels, + bias; `proj` is Linear(in_features -> W*H) starting at zero,
      its output tap-major (index k*H + h).

    `bias` [W, channels] is the static part of the filter. The generator's last map starts at zero
    so the layer starts as exactly a residual static conv (the paper's choice); `down` gets the
    model's usual normal(0, init_std) init so that gradients reach `up` from the first step.
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        width: int,
        kind: str = "lowrank",
        rank: int = 16,
        head_size: int = 16,
        residual: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if kind not in ("lowrank", "headwise"):
            raise ValueError(f"DynamicShortConv kind={kind!r}; allowed: lowrank, headwise")
        if kind == "headwise" and channels % head_size:
            raise ValueError(
                f"head_size={head_size} must divide the convolved channels ({channels})"
            )
        self.in_features, self.channels, self.width = in_features, channels, width
        self.kind, self.residual, self.init_std = kind, residual, init_std
        if kind == "lowrank":
            self.rank = rank
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Parameter(torch.empty(rank, width * channels))
        else:
            self.head_size = head_size
            self.n_heads = channels // head_size
            self.proj = nn.Linear(in_features, width * self.n_heads, bias=False)
        self.bias = _uniform_filter(width, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.width)
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)
            if self.kind == "lowrank":
                self.down.weight.normal_(0.0, self.init_std)
                self.up.zero_()
            else:
                self.proj.weight.zero_()

    def _headwise_taps(self, h: Tensor) -> Tensor:
        """proj(h) [..., W*H] -> [..., W, H] (tap-major)."""
        return self.proj(h).unflatten(-1, (self.width, self.n_heads))

    def forward(self, x: Tensor, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """x [B, T, channels] is filtered; h [B, T, in_features] generates the filters."""
        if self.kind == "lowrank":
            return kernels.dynamic_conv_lowrank(
                x, self.down(h), self.up, self.bias, residual=self.residual, cu_seqlens=cu_seqlens
            )
        return kernels.dynamic_conv_headwise(
            x, self._headwise_taps(h), self.bias, residual=self.residual, cu_seqlens=cu_seqlens
        )

    def step(self, x_t: Tensor, h_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One decode token: x_t [B, channels], h_t [B, in_features], state [B, W-1, channels]."""
        if self.kind == "lowrank":
            return kernels.dynamic_conv_lowrank_step(
                x_t, state, self.down(h_t), self.up, self.bias, residual=self.residual
            )
        return kernels.dynamic_conv_headwise_step(
            x_t, state, self._headwise_taps(h_t), self.bias, residual=self.residual
        )

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device, dtype=dtype)


ShortConv = StaticShortConv | DynamicShortConv


def make_short_conv(
    spec: ConvSpec, in_features: int, channels: int, init_std: float = 0.02
) -> ShortConv | None:
    """The conv that `spec` asks for after a linear (in_features -> channels), or None."""
    if spec.kind == "none":
        return None
    if spec.kind == "static":
        return StaticShortConv(channels, spec.width)
    kind = {"dynamic-lowrank": "lowrank", "dynamic-headwise": "headwise"}[spec.kind]
    return DynamicShortConv(
        in_features, channels, spec.width, kind=kind, rank=spec.rank,
        head_size=spec.head_size, init_std=init_std,
    )


class LinearConvs(nn.ModuleDict):
    """The short convs that follow some of a block's linears, keyed by the linear's name.

    `run(name, y, h)` filters the linear's output y with its conv (generator input h, the linear's
    input) or returns y unchanged when that linear has no conv, so blocks read the same whatever
    the placement.
    """

    def __init__(
        self, spec: ConvSpec, shapes: dict[str, tuple[int, int]], init_std: float = 0.02
    ) -> None:
        """shapes: linear name -> (in_features, out_features) for every linear of the block."""
        convs = {
            name: make_short_conv(spec, in_features, out_features, init_std)
            for name, (in_features, out_features) in shapes.items()
            if name in spec.linears
        }
        super().__init__(convs)

    def run(self, name: str, y: Tensor, h: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        if name not in self:
            return y
        conv = self[name]
        if isinstance(conv, DynamicShortConv):
            return conv(y, h, cu_seqlens)
        return conv(y, cu_seqlens)

    def step(self, name: str, y_t: Tensor, h_t: Tensor, states: dict[str, Tensor]) -> Tensor:
        """One decode token; replaces states[name] with the conv's new state."""
        if name not in self:
            return y_t
        conv = self[name]
        if isinstance(conv, DynamicShortConv):
            y_t, states[name] = conv.step(y_t, h_t, states[name])
        else:
            y_t, states[name] = conv.step(y_t, states[name])
        return y_t

    def empty_states(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return {name: conv.empty_state(batch_size, device, dtype) for name, conv in self.items()}
