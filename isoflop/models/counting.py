"""Parameters and FLOPs of a ModelConfig, counted analytically (pure Python, no torch).

Parameters (the structure of `isoflop.models.lm`):
- embedding: the token embedding [vocab, d], plus the LM head [vocab, d] when it is not tied;
- non-embedding: everything else (the mixers' matrices and vectors, MLP or expert matrices and the
  router, RMSNorm gains, QK-norm gains, short convs and their filter generators, the final norm).
  Kaplan et al. and the scaling-law literature exclude the embedding (and an untied head) from N;
  `total` keeps both.
- active: what one token uses. For MoE, the router, its top_k experts and the shared expert, not
  the other n_experts - top_k experts; for dense models active == total.

FLOPs per token, forward pass (what `flops_per_token` returns in `FlopCount.breakdown`):
- a matmul [m, k] x [k, n] costs 2*m*k*n, so a linear in -> out costs 2*in*out per token
  (mixer_projections: the mixer's linears; mlp: the SwiGLU, or for MoE the top_k active experts
  plus the shared expert; router: 2*d*n_experts);
- attention scores: Q K^T and attn @ V each cost 2*seq_len*d per token and layer, the full square
  (not halved for causality). This is the Chinchilla convention and what
  torch.utils.flop_counter.FlopCounterMode counts for scaled_dot_product_attention: in torch 2.13
  its formulas for the flash / efficient / cuDNN kernels ignore the causal mask, and the math
  backend computes the full masked square;
- recurrence (Mamba-2, Gated DeltaNet): the matmuls of the chunked algorithm both the reference
  and fla-core run, chunks of c = min(RECURRENCE_CHUNK_SIZE, seq_len) tokens (seq_len a multiple of
  c), per head and token, with the c x c products counted in full like attention scores:
  Mamba-2 (N state, P head channels): C B^T and its product with x, 2c(N + P); the state's
  contribution and the chunk's state, 4NP.
  Gated DeltaNet (K key, V value channels): K K^T, Q K^T and T (beta exp(G) K), 3 x 2cK;
  T (beta V) and the scores times the writes, 2 x 2cV; W S0, Q S0 and the state update, 6KV; and
  the unit-triangular solve T = (I + A)^-1 against c right-hand sides, c(c - 1) (torch's FLOP
  counter does not see this one);
- LM head: 2*d*vocab (counted whether or not it is tied to the embedding);
- short convs (every conv in `isoflop.models.conv` is residual, X <- X + conv(X)):
  apply 2*W*channels (a multiply and an add per tap and channel) + channels for the residual add;
  low-rank generator 2*in*R + 2*R*W*out; head-wise generator 2*in*W*out/hs; static: none.
- Not counted: the embedding lookup, RMSNorm, RoPE, SiLU and the SwiGLU product, softmax, the
  blocks' residual adds, adding a conv's static bias to its generated filter, the recurrences'
  gates and decays, MoE top-k, gathers and weighting. They are O(d) per token, a few per mille of
  the total at any size we train, and no matmul-based counter sees them. Neither are the rows an MoE
  pads its batched expert matmuls with: the count is of active experts, what a grouped kernel runs.
Training = forward + backward with backward = 2x forward (a gradient for the input and one for the
weight of every matmul), so train = 3x forward. `six_n` (6 x active non-embedding params, the
non-embedding params for dense models) and `six_n_total` (6 x total params) are kept alongside, as
the usual 6N approximations.
"""

from __future__ import annotations

from dataclasses import dataclass

from isoflop.models.config import RECURRENCE_CHUNK_SIZE, ConvSpec, ModelConfig

BREAKDOWN_KEYS: tuple[str, ...] = (
    "mixer_projections",
    "attention_scores",
    "recurrence",
    "mlp",
    "router",
    "conv_generators",
    "conv_apply",
    "lm_head",
)


@dataclass(frozen=True)
class ParamCount:
    """total = non_embedding + embedding (embedding: token embedding, plus the head if untied).
    active_non_embedding: the non-embedding params one token uses (MoE: not the unchosen experts)."""

    total: int
    non_embedding: int
    embedding: int
    active_non_embedding: int

    @property
    def active(self) -> int:
        return self.active_non_embedding + self.embedding


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token. breakdown: forward FLOPs per token by part (keys: BREAKDOWN_KEYS)."""

    forward: int
    train: int
    six_n: int
    six_n_total: int
    breakdown: dict[str, int]


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a Transformer block (attention and SwiGLU),
    named as in ConvSpec.linears."""
    d, f = cfg.d_model, cfg.d_ff
    return {
        "q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
        "gate": (d, f), "up": (d, f), "down": (f, d),
    }


def mixer_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of each linear of the block's mixer."""
    d, H = cfg.d_model, cfg.ssm_heads
    if cfg.mixer == "mamba2":  # z, x, B, C, dt, o
        inner, bc = cfg.ssm.expand * d, cfg.ssm.n_groups * cfg.ssm.state_size
        return [(d, inner), (d, inner), (d, bc), (d, bc), (d, H), (inner, d)]
    if cfg.mixer == "gated-deltanet":  # q, k, v, a (decay), b (beta), gate, o
        values = cfg.ssm.expand * d
        return [(d, d), (d, d), (d, values), (d, H), (d, H), (d, values), (values, d)]
    shapes = linear_shapes(cfg)
    return [shapes[name] for name in ("q", "k", "v", "o")]


def mixer_vector_params(cfg: ModelConfig) -> int:
    """The mixer's parameters outside its linears (QK-norm gains; decays, step sizes, norm gains)."""
    H = cfg.ssm_heads
    if cfg.mixer == "mamba2":  # A_log, dt_bias, D per head; the gated norm's gain
        return 3 * H + cfg.ssm.expand * cfg.d_model
    if cfg.mixer == "gated-deltanet":  # A_log, dt_bias per head; the per-head norm's gain
        return 2 * H + cfg.ssm.expand * cfg.head_dim
    return 2 * cfg.head_dim if cfg.qk_norm else 0


def conv_streams(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(generator input width, channels) of each short conv of a block, keyed like the modules:
    in Mamba-2, q/k/v filter C/B/x; in Gated DeltaNet, q/k/v (all read the block's normed input)."""
    if not cfg.conv.enabled:
        return {}
    d = cfg.d_model
    if cfg.mixer == "mamba2":
        inner, bc = cfg.ssm.expand * d, cfg.ssm.n_groups * cfg.ssm.state_size
        return {"q": (d, bc), "k": (d, bc), "v": (d, inner)}
    if cfg.mixer == "gated-deltanet":
        return {"q": (d, d), "k": (d, d), "v": (d, cfg.ssm.expand * d)}
    shapes = linear_shapes(cfg)
    return {name: shapes[name] for name in cfg.conv.linears}


def ffn_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one block's feed-forward."""
    swiglu = 3 * cfg.d_model * cfg.d_ff
    if cfg.ffn != "moe":
        return swiglu, swiglu
    moe = cfg.moe
    always = cfg.d_model * moe.n_experts + (swiglu if moe.shared_expert else 0)  # router, shared
    return always + moe.n_experts * swiglu, always + moe.top_k * swiglu


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
    """Total, non-embedding, embedding and active parameters (convention: module docstring)."""
    d = cfg.d_model
    per_layer = sum(i * o for i, o in mixer_linears(cfg)) + mixer_vector_params(cfg)
    per_layer += 2 * d  # the mixer and feed-forward norms
    for in_features, channels in conv_streams(cfg).values():
        per_layer += conv_params(cfg.conv, in_features, channels)
    ffn_total, ffn_active = ffn_params(cfg)
    non_embedding = cfg.n_layers * (per_layer + ffn_total) + d  # + final norm
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return ParamCount(
        total=non_embedding + embedding, non_embedding=non_embedding, embedding=embedding,
        active_non_embedding=cfg.n_layers * (per_layer + ffn_active) + d,
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


def recurrence_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token and layer of the chunked recurrence (module docstring); 0 for
    attention."""
    c, H = min(RECURRENCE_CHUNK_SIZE, seq_len), cfg.ssm_heads
    if cfg.mixer == "mamba2":
        N, P = cfg.ssm.state_size, cfg.head_dim
        return H * (2 * c * (N + P) + 4 * N * P)
    if cfg.mixer == "gated-deltanet":
        K, V = cfg.head_dim, cfg.ssm.expand * cfg.head_dim
        return H * (2 * c * (3 * K + 2 * V) + 6 * K * V + c * (c - 1))
    return 0


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
    """Analytic FLOPs per token at context length seq_len (convention: module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; allowed: >= 1")
    d, L = cfg.d_model, cfg.n_layers
    generators = apply = 0
    for in_features, channels in conv_streams(cfg).values():
        g, a = _conv_forward_flops(cfg.conv, in_features, channels)
        generators, apply = generators + g, apply + a
    # SwiGLUs one token runs: the MLP, or its top_k experts and the shared one.
    swiglus = cfg.moe.top_k + int(cfg.moe.shared_expert) if cfg.ffn == "moe" else 1
    breakdown = {
        "mixer_projections": L * sum(2 * i * o for i, o in mixer_linears(cfg)),
        "attention_scores": L * 2 * (2 * seq_len * d) if cfg.mixer == "attention" else 0,
        "recurrence": L * recurrence_flops(cfg, seq_len),
        "mlp": L * swiglus * 3 * 2 * d * cfg.d_ff,
        "router": L * 2 * d * cfg.moe.n_experts if cfg.ffn == "moe" else 0,
        "conv_generators": L * generators,
        "conv_apply": L * apply,
        "lm_head": 2 * d * cfg.vocab_size,
    }
    forward = sum(breakdown.values())
    params = count_params(cfg)
    return FlopCount(
        forward=forward,
        train=3 * forward,
        six_n=6 * params.active_non_embedding,
        six_n_total=6 * params.total,
        breakdown=breakdown,
    )


def training_flops(cfg: ModelConfig, seq_len: int, tokens: float) -> float:
    """Forward + backward FLOPs of training on `tokens` tokens at context length seq_len."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens}; allowed: >= 0")
    return float(flops_per_token(cfg, seq_len).train) * float(tokens)
