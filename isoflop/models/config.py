"""Model configuration: small frozen dataclasses, pure Python (no torch), JSON round-trippable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ConvKind = Literal["none", "static", "dynamic-lowrank", "dynamic-headwise"]
ConvPlacement = Literal["qkv", "all-linear"]

CONV_KINDS: tuple[str, ...] = ("none", "static", "dynamic-lowrank", "dynamic-headwise")
CONV_PLACEMENTS: tuple[str, ...] = ("qkv", "all-linear")

# "all-linear" follows the best reconstruction of the paper (see paper-facts): every linear of a
# block is followed by its own short conv, whose filter generator reads that linear's input.
LINEARS_BY_PLACEMENT: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}


@dataclass(frozen=True)
class ConvSpec:
    """Which short convolution sits where.

    kind: none | static | dynamic-lowrank | dynamic-headwise.
    placement: qkv (after the Q, K, V projections, before RoPE) or all-linear.
    width: taps W (tap 0 = current token). rank: R of the low-rank generator.
    head_size: channels sharing one generated tap in the head-wise generator.
    """

    kind: str = "none"
    placement: str = "qkv"
    width: int = 4
    rank: int = 16
    head_size: int = 16

    def __post_init__(self) -> None:
        if self.kind not in CONV_KINDS:
            raise ValueError(f"conv.kind={self.kind!r}; allowed: {', '.join(CONV_KINDS)}")
        if self.placement not in CONV_PLACEMENTS:
            raise ValueError(
                f"conv.placement={self.placement!r}; allowed: {', '.join(CONV_PLACEMENTS)}"
            )
        if not 1 <= self.width <= 8:
            raise ValueError(f"conv.width={self.width}; allowed: 1..8")
        if self.rank < 1:
            raise ValueError(f"conv.rank={self.rank}; allowed: >= 1")
        if self.head_size < 1:
            raise ValueError(f"conv.head_size={self.head_size}; allowed: >= 1")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def linears(self) -> tuple[str, ...]:
        """Names of the linears followed by a conv ('q', 'k', 'v', 'o', 'gate', 'up', 'down')."""
        return LINEARS_BY_PLACEMENT[self.placement] if self.enabled else ()


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style pre-norm decoder: RMSNorm, RoPE, SwiGLU, no biases, tied embeddings."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int = 1024
    conv: ConvSpec = field(default_factory=ConvSpec)
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}; allowed: >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = model.d_model / model.n_heads = {self.head_dim} must be even (RoPE "
                "rotates pairs of channels)"
            )
        if self.conv.kind == "dynamic-headwise":
            # Convs after gate/up filter d_ff channels; all others filter d_model channels.
            widths = {"d_model": self.d_model}
            if {"gate", "up"} & set(self.conv.linears):
                widths["d_ff"] = self.d_ff
            for name, width in widths.items():
                if width % self.conv.head_size:
                    raise ValueError(
                        f"conv.head_size={self.conv.head_size} must divide every convolved width "
                        f"(model.{name}={width})"
                    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed; `conv` may be given as a dict of ConvSpec fields."""
        if isinstance(changes.get("conv"), dict):
            changes["conv"] = dataclasses.replace(self.conv, **changes["conv"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["conv"] = ConvSpec(**d.get("conv", {}))
        return cls(**d)
