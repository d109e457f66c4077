"""The language model: a Llama-style pre-norm decoder, readable top to bottom.

    idx -> tok_emb -> n_layers x Block -> norm -> lm_head (tied to tok_emb by default) -> logits
    Block: x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))

RMSNorm, RoPE, SwiGLU, no biases anywhere (the convs' static filters are the only bias-like
tensors). Short convolutions, when the config asks for them, follow the linears named by
`cfg.conv.linears` inside Attention and SwiGLU (see conv.py, attention.py, mlp.py).

Packed documents: forward(idx [1, T], cu_seqlens=[0, ..., T]) keeps attention, RoPE positions and
convs inside each document, so a packed row computes exactly what separate rows would.

Decode: new_cache() -> prefill(prompt) -> forward_step(token) ...; the cache holds every layer's
rotated keys/values and every conv's last W-1 inputs. generate() wraps that loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.kernels.reference import positions_in_sequence
from isoflop.models.attention import (
    Attention,
    KVCache,
    Rope,
    causal_document_mask,
    rope_angles,
)
from isoflop.models.config import ModelConfig
from isoflop.models.conv import DynamicShortConv, StaticShortConv
from isoflop.models.mlp import SwiGLU
from isoflop.models.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: Tensor, rope: Rope, cu_seqlens: Tensor | None = None,
        document_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cu_seqlens, document_mask)
        return x + self.mlp(self.mlp_norm(x), cu_seqlens)

    def step(
        self, x_t: Tensor, rope: Rope, kv: KVCache, conv_states: dict[str, Tensor], pos: int
    ) -> Tensor:
        x_t = x_t + self.attn.step(self.attn_norm(x_t), rope, kv, conv_states, pos)
        return x_t + self.mlp.step(self.mlp_norm(x_t), conv_states)


@dataclass
class DecodeCache:
    """Per layer: the KV cache and the conv states keyed by linear name; pos = tokens seen."""

    kv: list[KVCache]
    conv_states: list[dict[str, Tensor]]
    max_len: int
    pos: int = 0


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """normal(0, init_std) for every matrix; the residual branches' output projections (o,
        down) get init_std / sqrt(2 * n_layers) (GPT-2): 2 * n_layers branches add into the
        residual stream, and this keeps its variance at init independent of depth. The convs
        re-initialise last, because the first pass also hit their generators' Linears."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
        for block in self.blocks:
            for projection in (block.attn.o, block.mlp.down):
                nn.init.normal_(projection.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))
        for module in self.modules():
            if isinstance(module, (StaticShortConv, DynamicShortConv)):
                module.reset_parameters()

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx [B, T] int64 -> (logits [B, T, V] float32, mean cross-entropy in fp32 or None).

        cu_seqlens [N+1] (with B == 1) marks packed documents: [0, end_1, ..., T]. Targets equal to
        -100 are ignored by the loss (F.cross_entropy's default ignore_index).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
        positions = positions_in_sequence(T, cu_seqlens, idx.device)  # also validates cu_seqlens
        document_mask = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed sequences (cu_seqlens) need batch size 1; got B={B}")
            document_mask = causal_document_mask(cu_seqlens, T, idx.device)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope_theta)

        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, rope, cu_seqlens, document_mask)
        logits = self.lm_head(self.norm(x)).float()

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: matrices decay; vectors, norm gains and conv filters (marked
        `_no_weight_decay`) do not. Tied weights appear once."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False):
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------------------------------
    # Incremental decoding.

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecodeCache:
        """An empty cache for up to max_len tokens (default: max_seq_len) on the model's device
        and dtype unless told otherwise."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={max_len}; allowed: 1..{cfg.max_seq_len} (model.max_seq_len)")
        weight = self.tok_emb.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        kv = [
            KVCache.empty(batch_size, cfg.n_heads, max_len, cfg.head_dim, device, dtype)
            for _ in self.blocks
        ]
        conv_states = [
            {**block.attn.convs.empty_states(batch_size, device, dtype),
             **block.mlp.convs.empty_states(batch_size, device, dtype)}
            for block in self.blocks
        ]
        return DecodeCache(kv, conv_states, max_len)

    def forward_step(self, idx_t: Tensor, cache: DecodeCache) -> Tensor:
        """The next token of every row, idx_t [B] int64 -> its logits [B, V] float32."""
        pos = cache.pos
        if pos >= cache.max_len:
            raise ValueError(f"decode cache is full ({cache.max_len} tokens)")
        positions = torch.tensor([pos], device=idx_t.device)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        x = self.tok_emb(idx_t)
        for block, kv, conv_states in zip(self.blocks, cache.kv, cache.conv_states):
            x = block.step(x, rope, kv, conv_states, pos)
        cache.pos = pos + 1
        return self.lm_head(self.norm(x)).float()

    def prefill(self, idx: Tensor, cache: DecodeCache) -> Tensor:
        """Feed a prompt idx [B, T] token by token; returns the last position's logits [B, V].
        Stepping reuses the decode path (so prefill and decode cannot disagree); prompts here are
        short, so its cost does not matter."""
        if idx.shape[1] < 1:
            raise ValueError("prefill needs a prompt of at least one token")
        for t in range(idx.shape[1]):
            logits = self.forward_step(idx[:, t], cache)
        return logits

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue prompts idx [B, T] by max_new_tokens; temperature 0 is greedy, otherwise
        sample from softmax(logits / temperature). Returns [B, T + max_new_tokens]."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature}; allowed: >= 0")
        cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        tokens = [idx]
        logits = self.prefill(idx, cache)
        for i in range(max_new_tokens):
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tokens.append(next_token[:, None])
            if i + 1 < max_new_tokens:
                logits = self.forward_step(next_token, cache)
        return torch.cat(tokens, dim=1)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """The model for cfg, initialised from torch's current RNG (seed it before calling)."""
    return LanguageModel(cfg)
