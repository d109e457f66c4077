"""Model configuration: small frozen dataclasses, pure Python (no torch), JSON round-trippable.

A block is `x + mixer(norm(x))` then `x + ffn(norm(x))`. The mixer is causal self-attention,
Mamba-2 or Gated DeltaNet; the feed-forward is a SwiGLU MLP or a mixture of SwiGLU experts.

Run ids hash a model's `to_dict()`. Fields added after the first runs were planned (mixer, ffn, ssm,
moe) are left out of it while they hold their defaults, so a plain Transformer's dict, and with it
every existing run id, is what it was before they existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ConvKind = Literal["none", "static", "dynamic-lowrank", "dynamic-headwise"]
ConvPlacement = Literal["qkv", "all-linear"]

CONV_KINDS: tuple[str, ...] = ("none", "static", "dynamic-lowrank", "dynamic-headwise")
CONV_PLACEMENTS: tuple[str, ...] = ("qkv", "all-linear")
MIXERS: tuple[str, ...] = ("attention", "mamba2", "gated-deltanet")
FFNS: tuple[str, ...] = ("swiglu", "moe")

# Chunk length of the chunked (parallel) forms of the Mamba-2 and Gated DeltaNet recurrences: the
# reference uses it and the FLOP count follows it; fla-core's kernels use 64 too.
RECURRENCE_CHUNK_SIZE = 64

# ModelConfig fields that to_dict() leaves out while they hold their default (module docstring).
_OMIT_IF_DEFAULT = {"omit_if_default": True}

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
    placement: qkv (after the Q, K, V projections, before RoPE) or all-linear. In Mamba-2 and
      Gated DeltaNet, qkv names the mixer's own short-conv branches, whose conv this replaces:
      Mamba-2's C, B and x (the query, key and value of its attention dual) and Gated DeltaNet's
      q, k and v; all-linear is for the Transformer only.
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
class SSMSpec:
    """Hyper-parameters of the recurrent mixers (Mamba-2, Gated DeltaNet); attention ignores them.

    expand: Mamba-2's inner width is expand * d_model, cut into heads of model.head_dim channels
      (so expand * n_heads heads); Gated DeltaNet has n_heads heads with keys of head_dim and
      values of expand * head_dim channels (fla-core's expand_v).
    state_size: Mamba-2's N, the width of B and C per group (Gated DeltaNet's state is
      head_dim x expand * head_dim per head and has no separate size).
    n_groups: Mamba-2's B/C groups; the heads of a group share B and C.
    """

    expand: int = 2
    state_size: int = 64
    n_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("expand", "state_size", "n_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"ssm.{name}={getattr(self, name)}; allowed: >= 1")


@dataclass(frozen=True)
class MoESpec:
    """The mixture-of-experts feed-forward (ffn='moe'); each expert is a SwiGLU of width d_ff.

    Token-choice top-k over a softmax router. aux_loss_coef weighs the load-balancing loss
    (Switch/GShard form, 1 at perfect balance) and z_loss_coef the router z-loss (ST-MoE); both
    enter the training loss only (see isoflop.models.moe). shared_expert adds one always-on expert.
    """

    n_experts: int = 8
    top_k: int = 2
    shared_expert: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"moe.n_experts={self.n_experts}; allowed: >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"moe.top_k={self.top_k}; allowed: 1..{self.n_experts} (moe.n_experts)"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name}={getattr(self, name)}; allowed: >= 0")


# Nested spec fields of ModelConfig and their classes: from_dict and replace() take plain dicts.
SPEC_FIELDS: dict[str, type] = {"conv": ConvSpec, "ssm": SSMSpec, "moe": MoESpec}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style pre-norm decoder: RMSNorm, RoPE, SwiGLU, no biases, tied embeddings.

    mixer: attention | mamba2 | gated-deltanet (hyper-parameters of the last two in `ssm`).
    ffn: swiglu | moe (`moe`); d_ff is the SwiGLU hidden width, of every expert for moe.
    """

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
    mixer: str = field(default="attention", metadata=_OMIT_IF_DEFAULT)
    ffn: str = field(default="swiglu", metadata=_OMIT_IF_DEFAULT)
    ssm: SSMSpec = field(default_factory=SSMSpec, metadata=_OMIT_IF_DEFAULT)
    moe: MoESpec = field(default_factory=MoESpec, metadata=_OMIT_IF_DEFAULT)

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
        if self.mixer not in MIXERS:
            raise ValueError(f"model.mixer={self.mixer!r}; allowed: {', '.join(MIXERS)}")
        if self.ffn not in FFNS:
            raise ValueError(f"model.ffn={self.ffn!r}; allowed: {', '.join(FFNS)}")
        if self.conv.placement == "all-linear" and (self.mixer, self.ffn) != ("attention", "swiglu"):
            raise ValueError(
                f"conv.placement='all-linear' with model.mixer={self.mixer!r} and "
                f"model.ffn={self.ffn!r}; allowed: all-linear with mixer 'attention' and ffn "
                "'swiglu' only (use placement 'qkv')"
            )
        if self.qk_norm and self.mixer != "attention":
            raise ValueError(
                f"model.qk_norm=True with model.mixer={self.mixer!r}; allowed: qk_norm with mixer "
                "'attention' only (Gated DeltaNet normalises its q and k itself)"
            )
        if self.mixer == "mamba2" and self.ssm_heads % self.ssm.n_groups:
            raise ValueError(
                f"ssm.n_groups={self.ssm.n_groups} must divide Mamba-2's heads (ssm.expand * "
                f"model.n_heads = {self.ssm_heads})"
            )
        if self.conv.kind == "dynamic-headwise":
            for name, width in self.convolved_widths().items():
                if width % self.conv.head_size:
                    raise ValueError(
                        f"conv.head_size={self.conv.head_size} must divide every convolved width "
                        f"({name}={width})"
                    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ssm_heads(self) -> int:
        """Heads of the recurrent mixer: expand * n_heads for Mamba-2, n_heads for Gated DeltaNet."""
        return self.ssm.expand * self.n_heads if self.mixer == "mamba2" else self.n_heads

    def convolved_widths(self) -> dict[str, int]:
        """Channels of each short-conv stream, named by what decides the width."""
        if not self.conv.enabled:
            return {}
        if self.mixer == "mamba2":  # x is expand * d_model wide, B and C n_groups * state_size
            return {"ssm.expand * model.d_model": self.ssm.expand * self.d_model,
                    "ssm.n_groups * ssm.state_size": self.ssm.n_groups * self.ssm.state_size}
        if self.mixer == "gated-deltanet":  # keys are d_model wide, values expand * d_model
            return {"model.d_model": self.d_model,
                    "ssm.expand * model.d_model": self.ssm.expand * self.d_model}
        # Convs after gate/up filter d_ff channels; all others filter d_model channels.
        widths = {"model.d_model": self.d_model}
        if {"gate", "up"} & set(self.conv.linears):
            widths["model.d_ff"] = self.d_ff
        return widths

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed; `conv`, `ssm` and `moe` may be given as dicts of
        their fields (the others keep their values)."""
        for name in SPEC_FIELDS:
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the later additions that hold their default (module docstring)."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("omit_if_default") and getattr(self, f.name) == _default_of(f):
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        for name, spec in SPEC_FIELDS.items():
            d[name] = spec(**d.get(name, {}))
        return cls(**d)


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
