"""Named architectures: a name -> the ModelConfig fields that make it what it is. Torch-free.

A sweep names architectures ("dynamic-qkv"); sizes come from elsewhere (d_model, n_layers, ...).
`make_model_config(arch, <size fields>, **overrides)` joins the two. Each architecture says which
ModelConfig fields it sets through `config_fields()`, so a later family (mamba2, gated deltanet,
MoE) registers with `register()` and sets its own fields without changing this module's API.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from isoflop.models.config import ConvSpec, ModelConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    conv: ConvSpec
    qk_norm: bool = False

    def config_fields(self) -> dict[str, Any]:
        """The ModelConfig fields this architecture fixes."""
        return {"conv": self.conv, "qk_norm": self.qk_norm}


class UnknownArchitectureError(KeyError, ValueError):
    """Both a KeyError (a failed lookup) and a ValueError (a bad config value), so callers can
    catch either; str() is the plain message (KeyError's would add quotes)."""

    def __str__(self) -> str:
        return str(self.args[0])


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture_names() -> list[str]:
    return list(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def _conv_with(base: ConvSpec, override: ConvSpec | dict[str, Any]) -> ConvSpec:
    """A ConvSpec replaces the architecture's; a dict changes only the fields it names."""
    if isinstance(override, ConvSpec):
        return override
    if not isinstance(override, dict):
        raise ValueError(f"conv override must be a dict of ConvSpec fields or a ConvSpec; got {override!r}")
    allowed = [f.name for f in dataclasses.fields(ConvSpec)]
    unknown = sorted(set(override) - set(allowed))
    if unknown:
        raise ValueError(f"unknown conv field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return dataclasses.replace(base, **override)


def make_model_config(
    arch: str,
    d_model: int,
    n_layers: int,
    n_heads: int,
    d_ff: int,
    vocab_size: int,
    max_seq_len: int,
    **overrides: Any,
) -> ModelConfig:
    """The ModelConfig of architecture `arch` at this size. overrides: any other ModelConfig field
    (qk_norm, tie_embeddings, init_std, ...); `conv` may be a partial dict, e.g. {"rank": 32}."""
    fields = get_architecture(arch).config_fields()
    size_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
    overridable = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in size_fields]
    unknown = sorted(set(overrides) - set(overridable))
    if unknown:
        raise ValueError(
            f"unknown model override(s) {', '.join(unknown)}; allowed: {', '.join(overridable)}"
        )
    for name, value in overrides.items():
        fields[name] = _conv_with(fields["conv"], value) if name == "conv" else value
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff,
        max_seq_len=max_seq_len, **fields,
    )


def _register_transformer_family() -> None:
    """The Transformer without conv, with static convs and with dynamic convs, each with and
    without QK-norm. Dynamic defaults follow the paper: low-rank R=16, W=4; head-wise hs=16."""
    base = [
        ("transformer", "Llama-style Transformer, no short convolution", ConvSpec()),
        ("static-qkv", "static residual short conv (W=4) on Q, K, V",
         ConvSpec(kind="static", placement="qkv")),
        ("dynamic-qkv", "dynamic low-rank short conv (R=16, W=4) on Q, K, V",
         ConvSpec(kind="dynamic-lowrank", placement="qkv")),
        ("dynamic-headwise-qkv", "dynamic head-wise short conv (head size 16, W=4) on Q, K, V",
         ConvSpec(kind="dynamic-headwise", placement="qkv")),
        ("static-all-linear", "static residual short conv (W=4) after every linear of a block",
         ConvSpec(kind="static", placement="all-linear")),
        ("dynamic-all-linear",
         "dynamic low-rank short conv (R=16, W=4) after every linear of a block "
         "(q, k, v, o, gate, up, down)",
         ConvSpec(kind="dynamic-lowrank", placement="all-linear")),
    ]
    for name, description, conv in base:
        register(Architecture(name, description, conv))
    for name, description, conv in base:
        register(Architecture(f"{name}-qknorm", f"{description}; QK-norm", conv, qk_norm=True))


_register_transformer_family()
