"""The language model: a Llama-style pre-norm decoder, readable top to bottom.

    idx -> tok_emb -> n_layers x Block -> norm -> lm_head (tied to tok_emb by default) -> logits
    Block: x = x + mixer(mixer_norm(x)); x = x + ffn(ffn_norm(x))

The mixer is causal self-attention with RoPE (cfg.mixer 'attention'), Mamba-2 or Gated DeltaNet
(mixers/); the feed-forward a SwiGLU MLP or a mixture of SwiGLU experts (cfg.ffn 'moe', moe.py).
RMSNorm, no biases anywhere (the convs' static filters are the only bias-like tensors). Short
convolutions, when the config asks for them, sit inside the mixer and the MLP (see conv.py).

Packed documents: forward(idx [1, T], cu_seqlens=[0, ..., T]) keeps attention, RoPE positions,
recurrent states and convs inside each document, so a packed row computes exactly what separate
rows would.

Loss: cross-entropy, plus for MoE models the routers' auxiliary losses while training
(`model.training`), so evaluations see pure cross-entropy. `last_losses` keeps the parts of the last
loss (cross_entropy, and load_balance and router_z for MoE), detached, for logging. A training
step that needs only the loss asks forward(..., return_logits=False); with the fused
cross-entropy switched on (fused_ce.py, ISOFLOP_FUSED_CE=on) the loss then comes from
linear_cross_entropy, chunk by chunk, and the whole batch's logits never exist.

Decode: new_cache() -> prefill(prompt) -> forward_step(token) ...; the cache holds every layer's
rotated keys/values (attention) or recurrent state (Mamba-2, Gated DeltaNet) and every conv's last
W-1 inputs. generate() wraps that loop.
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
    RopeTables,
    causal_document_mask,
)
from isoflop.models.config import ModelConfig
from isoflop.models.conv import DynamicShortConv, StaticShortConv
from isoflop.models.fused_ce import fused_ce_enabled, linear_cross_entropy
from isoflop.models.mixers import GatedDeltaNet, Mamba2
from isoflop.models.mlp import SwiGLU
from isoflop.models.moe import MoE, router_loss
from isoflop.models.norm import RMSNorm

MIXERS = {"attention": Attention, "mamba2": Mamba2, "gated-deltanet": GatedDeltaNet}
FFNS = {"swiglu": SwiGLU, "moe": MoE}


@dataclass
class LayerCache:
    """One layer's decode state: its convs' last inputs keyed by linear name, and the attention's
    KV cache or the recurrent mixer's state."""

    conv_states: dict[str, Tensor]
    kv: KVCache | None = None
    state: Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[cfg.mixer](cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFNS[cfg.ffn](cfg)

    def forward(
        self, x: Tensor, rope: Rope, cu_seqlens: Tensor | None = None,
        document_mask: Tensor | None = None,
    ) -> Tensor:
        h = self.mixer_norm(x)
        if isinstance(self.mixer, Attention):  # positions and documents as RoPE and a mask
            x = x + self.mixer(h, rope, cu_seqlens, document_mask)
        else:  # a recurrence knows order already; documents restart its state
            x = x + self.mixer(h, cu_seqlens)
        return x + self.ffn(self.ffn_norm(x), cu_seqlens)

    def step(self, x_t: Tensor, rope: Rope, cache: LayerCache, pos: int) -> Tensor:
        h_t = self.mixer_norm(x_t)
        if isinstance(self.mixer, Attention):
            x_t = x_t + self.mixer.step(h_t, rope, cache.kv, cache.conv_states, pos)
        else:
            out, cache.state = self.mixer.step(h_t, cache.conv_states, cache.state)
            x_t = x_t + out
        return x_t + self.ffn.step(self.ffn_norm(x_t), cache.conv_states)

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> LayerCache:
        conv_states = self.mixer.convs.empty_states(batch_size, device, dtype)
        if isinstance(self.ffn, SwiGLU):  # the MoE has no convs
            conv_states |= self.ffn.convs.empty_states(batch_size, device, dtype)
        if isinstance(self.mixer, Attention):
            kv = KVCache.empty(batch_size, self.mixer.n_heads, max_len, self.mixer.head_dim,
                               device, dtype)
            return LayerCache(conv_states, kv=kv)
        return LayerCache(conv_states, state=self.mixer.empty_state(batch_size, device, dtype))


@dataclass
class DecodeCache:
    """Every layer's LayerCache; pos = tokens seen."""

    layers: list[LayerCache]
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
        self.rope = RopeTables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.last_losses: dict[str, Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """normal(0, init_std) for every matrix; the residual branches' output projections (the
        mixers' o, the MLPs' down, the experts' down) get init_std / sqrt(2 * n_layers) (GPT-2):
        2 * n_layers branches add into the residual stream, and this keeps its variance at init
        independent of depth. The experts' stacked weights and the recurrent mixers' decay and
        step-size parameters are not Linears and keep the init their modules gave them. The convs
        re-initialise last, because the first pass also hit their generators' Linears."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
        for module in self.modules():
            if isinstance(module, tuple(MIXERS.values())):
                nn.init.normal_(module.o.weight, 0.0, residual_std)
            elif isinstance(module, SwiGLU):  # also an MoE's shared expert
                nn.init.normal_(module.down.weight, 0.0, residual_std)
        for module in self.modules():
            if isinstance(module, (StaticShortConv, DynamicShortConv)):
                module.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cu_seqlens: Tensor | None = None,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx [B, T] int64 -> (logits [B, T, V] float32, loss in fp32 or None).

        The loss is the mean cross-entropy; for MoE models in training mode, plus the routers'
        weighted auxiliary losses (module docstring). cu_seqlens [N+1] (with B == 1) marks packed
        documents: [0, end_1, ..., T]. Targets equal to -100 are ignored by the loss
        (F.cross_entropy's default ignore_index). return_logits=False (needs targets) gives
        (None, loss), and lets the fused cross-entropy compute the loss when it is switched on.
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them there is nothing to return")
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
        document_mask = None
        if cu_seqlens is None:
            rope = self.rope.first(T)
        else:
            positions = positions_in_sequence(T, cu_seqlens, idx.device)  # also validates cu_seqlens
            if B != 1:
                raise ValueError(f"packed sequences (cu_seqlens) need batch size 1; got B={B}")
            document_mask = causal_document_mask(cu_seqlens, T, idx.device)
            rope = self.rope(positions)

        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, rope, cu_seqlens, document_mask)
        logits, loss = self.logits_and_loss(x, targets, return_logits)

        if loss is not None:
            self.last_losses = {"cross_entropy": loss.detach()}
            if self.moe_layers:
                aux, parts = router_loss(self.moe_layers)
                self.last_losses |= {name: value.detach() for name, value in parts.items()}
                if self.training:
                    loss = loss + aux
        return logits, loss

    def logits_and_loss(
        self, x: Tensor, targets: Tensor | None, return_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """The last block's output x [B, T, d] -> (logits float32 or None if not asked for,
        mean cross-entropy or None). A method of its own so that `compile_regions` can compile it
        as one region."""
        h = self.norm(x)
        if targets is not None and not return_logits and fused_ce_enabled():
            return None, linear_cross_entropy(h, self.lm_head.weight, targets)
        logits = self.lm_head(h).float()
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return (logits if return_logits else None), loss

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
        layers = [block.new_cache(batch_size, max_len, device, dtype) for block in self.blocks]
        return DecodeCache(layers, max_len)

    def forward_step(self, idx_t: Tensor, cache: DecodeCache) -> Tensor:
        """The next token of every row, idx_t [B] int64 -> its logits [B, V] float32."""
        pos = cache.pos
        if pos >= cache.max_len:
            raise ValueError(f"decode cache is full ({cache.max_len} tokens)")
        rope = self.rope.at(pos)
        x = self.tok_emb(idx_t)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block.step(x, rope, layer_cache, pos)
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


def compile_regions(model: LanguageModel, **options) -> LanguageModel:
    """Compile each block and the output head in place, with torch.compile(**options).

    Regional compilation: the blocks run the same code on parameters of the same shapes, so
    torch.compile traces and optimises one block and reuses it for every layer, and its cold
    compile time no longer grows with depth (compiling the whole model unrolls every layer into
    one graph). What stays eager between the regions (the embedding lookup, RoPE's table slices)
    is a few small kernels per step."""
    for block in model.blocks:
        block.compile(**options)
    model.logits_and_loss = torch.compile(model.logits_and_loss, **options)
    return model
