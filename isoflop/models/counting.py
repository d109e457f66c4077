"""Parameters and FLOPs of a ModelConfig, counted analytically (pure Python, no torch).

Parameters (the structure of `isoflop.models.lm`):
- embedding: the token embedding [vocab, d], plus the LM head [vocab, d] when it is not tied;
- non-embedding: everything else (attention and MLP matrices, RMSNorm gains, QK-norm gains, short
  convs and their filter generators, the final norm). Kaplan et al. and the scaling-law literature
  exclude the embedding (and an untied head) from N; `total` keeps both.

FLOPs per token, forward pass (what `flops_per_token` returns in `FlopCount.breakdown`):
- a matmul [m, k] x [k, n] costs 2*m*k*n, so a linear in -> out costs 2*in*out per token;
- attention scores: Q K^T and attn @ V each cost 2*seq_len*d per token and layer, the full square
  (not halved for causality). This is the Chinchilla convention and what
  torch.utils.flop_counter.FlopCounterMode counts for scaled_dot_product_attention: in torch 2.13
  its formulas for the flash / efficient / cuDNN kernels ignore the causal mask, and the math
  backend computes the full masked square;
- LM head: 2*d*vocab (counted whether or not it is tied to the embedding);
- short convs (every conv in `isoflop.models.conv` is residual, X <- X + conv(X)):
  apply 2*W*channels (a multiply and an add per tap and channel) + channels for the residual add;
  low-rank generator 2*in*R + 2*R*W*out; head-wise generator 2*in*W*out/hs; static: none.
- Not counted: the embedding lookup, RMSNorm, RoPE, SiLU and the SwiGLU product, softmax, the
  blocks' residual adds, adding a conv's static bias to its generated filter. They are O(d) per
  token, a few per mille of the total at any size we train, and no matmul-based counter sees them.
Training = forward + backward with backward = 2x forward (a gradient for the input and one for the
weight of every matmul), so train = 3x forward. `six_n` (6 x non-embedding params) and
`six_n_total` (6 x total params) are kept alongside, as the usual 6N approximations.
"""

from __future__ import annotations

from dataclasses import dataclass

from isoflop.models.config import ConvSpec, ModelConfig

ATTENTION_LINEARS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_LINEARS: tuple[str, ...] = ("gate", "up", "down")
BREAKDOWN_KEYS: tuple[str, ...] = (
    "attention_projections",
    "attention_scores",
    "mlp",
    "conv_generators",
    "conv_apply",
    "lm_head",
)


@dataclass(frozen=True)
class ParamCount:
    """total = non_embedding + embedding (embedding: token embedding, plus the head if untied)."""

    total: int
    non_embedding: int
    embedding: int


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token. breakdown: forward FLOPs per token by part (keys: BREAKDOWN_KEYS)."""

    forward: int
    train: int
    six_n: int
    six_n_total: int
    breakdown: dict[str, int]


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a block, named as in ConvSpec.linears."""
    d, f = cfg.d_model, cfg.d_ff
    return {
        "q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
        "gate": (d, f), "up": (d, f), "down": (f, d),
    }


def conv_params(conv: ConvSpec, in_features: int, channels: int) -> int:
    """Parameters of the short conv after one linear (in_features -> channels).

    Head-wise: ModelConfig has already checked that head_size divides every convolved width."""
    W = conv.width
    if conv.kind == "none":
        return 0
    if conv.kind == "static":
        return W * channels
    if conv.kind == "dynamic-lowrank":
        return in_features * conv.rank + conv.rank * W * channels + W * channels
    if conv.kind == "dynamic-headwise":
        return in_features * W * (channels // conv.head_size) + W * channels
    raise ValueError(f"conv.kind={conv.kind!r} has no parameter count")


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total, non-embedding and embedding parameters (convention: module docstring)."""
    d = cfg.d_model
    shapes = linear_shapes(cfg)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * d  # linears + attn/mlp norms
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    for name in cfg.conv.linears:
        in_features, channels = shapes[name]
        per_layer += conv_params(cfg.conv, in_features, channels)
    non_embedding = cfg.n_layers * per_layer + d  # + final norm
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return ParamCount(
        total=non_embedding + embedding, non_embedding=non_embedding, embedding=embedding
    )


def _conv_forward_flops(conv: ConvSpec, in_features: int, channels: int) -> tuple[int, int]:
    """(generator, apply) forward FLOPs per token of the conv after one linear."""
    W = conv.width
    apply = 2 * W * channels + channels  # taps, then the residual add
    if conv.kind == "static":
        return 0, apply
    if conv.kind == "dynamic-lowrank":
        return 2 * in_features * conv.rank + 2 * conv.rank * W * channels, apply
    if conv.kind == "dynamic-headwise":
        return 2 * in_features * W * (channels // conv.head_size), apply
    raise ValueError(f"conv.kind={conv.kind!r} has no FLOP count")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
    """Analytic FLOPs per token at context length seq_len (convention: module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; allowed: >= 1")
    d, L = cfg.d_model, cfg.n_layers
    shapes = linear_shapes(cfg)
    generators = apply = 0
    for name in cfg.conv.linears:
        in_features, channels = shapes[name]
        g, a = _conv_forward_flops(cfg.conv, in_features, channels)
        generators, apply = generators + g, apply + a
    attention = [shapes[name] for name in ATTENTION_LINEARS]
    mlp = [shapes[name] for name in MLP_LINEARS]
    breakdown = {
        "attention_projections": L * sum(2 * i * o for i, o in attention),
        "attention_scores": L * 2 * (2 * seq_len * d),
        "mlp": L * sum(2 * i * o for i, o in mlp),
        "conv_generators": L * generators,
        "conv_apply": L * apply,
        "lm_head": 2 * d * cfg.vocab_size,
    }
    forward = sum(breakdown.values())
    params = count_params(cfg)
    return FlopCount(
        forward=forward,
        train=3 * forward,
        six_n=6 * params.non_embedding,
        six_n_total=6 * params.total,
        breakdown=breakdown,
    )


def training_flops(cfg: ModelConfig, seq_len: int, tokens: float) -> float:
    """Forward + backward FLOPs of training on `tokens` tokens at context length seq_len."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens}; allowed: >= 0")
    return float(flops_per_token(cfg, seq_len).train) * float(tokens)
