"""Named architectures: a name -> the ModelConfig fields that make it what it is. Torch-free.

A sweep names architectures ("dynamic-qkv"); sizes come from elsewhere (d_model, n_layers, ...).
`make_model_config(arch, <size fields>, **overrides)` joins the two. Each architecture says which
ModelConfig fields it sets through `config_fields()`: its short conv, QK-norm, mixer and
feed-forward.

Families: the Transformer (with and without QK-norm); Mamba-2 and Gated DeltaNet, whose built-in
static convs on x/B/C and q/k/v are the conv slot (their plain names keep that static conv, as the
published models do; -noconv drops it, -dynamic makes it the paper's dynamic low-rank conv); and the
MoE Transformer (attention + mixture-of-experts feed-forward, no conv unless named, and the paper's
dynamic conv on Q/K/V). Every size field comes from the sweep, so all of them sit on the same
size ladder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from isoflop.models.config import SPEC_FIELDS, ConvSpec, ModelConfig, MoESpec


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    conv: ConvSpec
    qk_norm: bool = False
    mixer: str = "attention"
    ffn: str = "swiglu"

    def config_fields(self) -> dict[str, Any]:
        """The ModelConfig fields this architecture fixes."""
        return {"conv": self.conv, "qk_norm": self.qk_norm, "mixer": self.mixer, "ffn": self.ffn}


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


def _spec_with(name: str, base: Any, override: Any) -> Any:
    """For a nested spec field (conv, ssm, moe): a spec object replaces the base; a dict changes
    only the fields it names."""
    spec_class = SPEC_FIELDS[name]
    if isinstance(override, spec_class):
        return override
    if not isinstance(override, dict):
        raise ValueError(
            f"{name} override must be a dict of {spec_class.__name__} fields or a "
            f"{spec_class.__name__}; got {override!r}"
        )
    allowed = [f.name for f in dataclasses.fields(spec_class)]
    unknown = sorted(set(override) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
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
    (qk_norm, tie_embeddings, init_std, ...); `conv`, `ssm` and `moe` may be partial dicts, e.g.
    conv={"rank": 32} or moe={"n_experts": 16}."""
    fields = get_architecture(arch).config_fields()
    size_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
    overridable = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in size_fields]
    unknown = sorted(set(overrides) - set(overridable))
    if unknown:
        raise ValueError(
            f"unknown model override(s) {', '.join(unknown)}; allowed: {', '.join(overridable)}"
        )
    for name, value in overrides.items():
        if name in SPEC_FIELDS:
            value = _spec_with(name, fields.get(name, SPEC_FIELDS[name]()), value)
        fields[name] = value
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


def _register_recurrent_families() -> None:
    """Mamba-2 and Gated DeltaNet with their built-in static conv, without it, and with the
    paper's dynamic low-rank conv in its place (R=16, W=4)."""
    for prefix, mixer, label, branches in [
        ("mamba2", "mamba2", "Mamba-2", "x, B, C"),
        ("gdn", "gated-deltanet", "Gated DeltaNet", "q, k, v"),
    ]:
        for suffix, conv, what in [
            ("", ConvSpec(kind="static"), f"with its static short conv (W=4) on {branches}"),
            ("-noconv", ConvSpec(), "without short convs"),
            ("-dynamic", ConvSpec(kind="dynamic-lowrank"),
             f"with a dynamic low-rank short conv (R=16, W=4) on {branches} in place of the static one"),
        ]:
            register(Architecture(f"{prefix}{suffix}", f"{label} + SwiGLU blocks, {what}", conv,
                                  mixer=mixer))


def _register_moe_family() -> None:
    """The MoE Transformer (attention + mixture of SwiGLU experts): plain, and with static or
    dynamic low-rank convs on Q/K/V (the paper's MoE comparison)."""
    for name, conv, what in [
        ("moe", ConvSpec(), "no short convolution"),
        ("moe-static-qkv", ConvSpec(kind="static"), "static residual short conv (W=4) on Q, K, V"),
        ("moe-dynamic-qkv", ConvSpec(kind="dynamic-lowrank"),
         "dynamic low-rank short conv (R=16, W=4) on Q, K, V"),
    ]:
        experts = f"top-{MoESpec().top_k} of {MoESpec().n_experts} SwiGLU experts"
        register(Architecture(name, f"MoE Transformer ({experts}), {what}", conv, ffn="moe"))


_register_transformer_family()
_register_recurrent_families()
_register_moe_family()
