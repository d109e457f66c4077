"""Causal multi-head self-attention with RoPE, optional QK-norm and short convs on its linears.

Layout: q, k, v, o are separate bias-free d->d Linears. A conv placed on q/k/v filters the full
d-wide projection before it is split into heads and rotated (the paper's placement), with the
attention block's normed input as generator input; a conv on o reads the attention output.

q, k, v and their dynamic convs' generator input maps all read the normed input, so they run as
one matmul over their concatenated weights (`LinearConvs.project`); o and its conv's generator
read the attention output and make a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop.kernels.reference import rotate_heads
from isoflop.models.config import ModelConfig
from isoflop.models.conv import LinearConvs
from isoflop.models.norm import RMSNorm

Rope = tuple[Tensor, Tensor]  # cos, sin [T, head_dim/2], float32


class RopeFromZero(NamedTuple):
    """cos and sin of positions 0, 1, ..., T-1 (an unpacked batch's; rope_angles(..., from_zero=True)).
    Only these may rotate q and k inside their low-rank convs: the forward kernel forms a time's
    angles from two rows of the tables (reference.check_rope_from_zero)."""

    cos: Tensor
    sin: Tensor


def rope_angles(positions: Tensor, head_dim: int, theta: float, from_zero: bool = False) -> Rope:
    """cos and sin of the rotary angles at `positions` [T], in float32 (the model reads them from
    RopeTables, which keeps them float32 whatever it is cast to); from_zero=True says that positions
    are 0 to T-1 and returns them as a RopeFromZero."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return RopeFromZero(cos, sin) if from_zero else (cos, sin)


class RopeTables(nn.Module):
    """rope_angles of positions 0 to max_len - 1, computed once and kept as float32 buffers (not
    saved with the model), from which the model reads a step's angles.

    Computed inside the forward instead, a whole-model torch.compile inlined rope_angles' arange,
    pow, cos and sin into every kernel that rotates q or k, forward and backward, in every layer:
    39 ms of a 300M transformer's ~200 ms step on the H200 (KERNELS.md, training point 34)."""

    def __init__(self, max_len: int, head_dim: int, theta: float) -> None:
        super().__init__()
        self.max_len, self.head_dim, self.theta = max_len, head_dim, theta
        cos, sin = self._angles(None)  # (on the default device, as the model's parameters)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _angles(self, device: torch.device | None) -> Rope:
        return rope_angles(torch.arange(self.max_len, device=device), self.head_dim, self.theta)

    def _apply(self, fn, recurse: bool = True):
        """Moves apply, casts do not: wherever a move (or to_empty) puts the tables, they are computed
        again there in float32, as rope_angles computes them there (cos and sin in bfloat16 would
        keep 3 digits)."""
        super()._apply(fn, recurse)
        self.cos, self.sin = self._angles(self.cos.device)
        return self

    def forward(self, positions: Tensor) -> Rope:
        """rope_angles(positions, head_dim, theta), gathered from the tables; positions lie in
        [0, max_len) (packed sequences: each position within its own sequence)."""
        return self.cos[positions], self.sin[positions]

    def first(self, T: int) -> RopeFromZero:
        """rope_angles of positions 0 to T-1 as a RopeFromZero: slices of the tables, with no
        positions tensor to build."""
        return RopeFromZero(self.cos[:T], self.sin[:T])

    def at(self, pos: int) -> Rope:
        """The angles of one position [1, head_dim/2], a slice of the tables (decode: no positions
        tensor to build and copy to the device for every token)."""
        if not 0 <= pos < self.max_len:
            raise IndexError(f"position {pos} is outside the RoPE tables (0..{self.max_len - 1})")
        return self.cos[pos:pos + 1], self.sin[pos:pos + 1]


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate x [B, T, H, head_dim] by position; pairs are (i, i + head_dim/2) (Llama's layout)."""
    return rotate_heads(x, *rope)


def causal_document_mask(cu_seqlens: Tensor, T: int, device: torch.device) -> Tensor:
    """[T, T] bool, True where query i may attend key j: j <= i within the same document."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    t = torch.arange(T, device=device)
    document = torch.searchsorted(cu, t, right=True) - 1
    return (document[:, None] == document[None, :]) & (t[None, :] <= t[:, None])


@dataclass
class KVCache:
    """Rotated keys and values of one layer, [B, H, max_len, head_dim], filled up to some pos."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(
        cls, batch_size: int, n_heads: int, max_len: int, head_dim: int,
        device: torch.device, dtype: torch.dtype,
    ) -> "KVCache":
        shape = (batch_size, n_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))

    def append(self, pos: int, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, Tensor]:
        """Store one token's k, v [B, H, 1, head_dim] at pos; return all keys/values up to pos."""
        self.k[:, :, pos : pos + 1] = k_t
        self.v[:, :, pos : pos + 1] = v_t
        return self.k[:, :, : pos + 1], self.v[:, :, : pos + 1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        # One RMSNorm over head_dim for q and one for k, shared across heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        shapes = {name: (d, d) for name in ("q", "k", "v", "o")}
        self.convs = LinearConvs(cfg.conv, shapes, cfg.init_std)
        # q and k with dynamic convs, or static ones, and nothing (QK-norm) between conv and
        # rotation: the convs rotate their own outputs, in the forward kernel where it can (one
        # read and write of q and k fewer; KERNELS.md, v31 low-rank, v34 head-wise, training point
        # 29 static), and their backward kernels turn the gradient back where they can (v33, v34),
        # when the tables are of positions 0 to T-1 (RopeFromZero).
        self.convs_rotate = self.q_norm is None and self.convs.rotates(("q", "k"))

    @property
    def qkv(self) -> dict[str, nn.Linear]:
        """The linears that read the normed input, in the order forward unpacks them."""
        return {"q": self.q, "k": self.k, "v": self.v}

    def _to_heads(self, q: Tensor, k: Tensor, v: Tensor, rope: Rope | None) -> tuple[Tensor, ...]:
        """[B, T, d] each -> [B, H, T, head_dim] (views of [B, T, H, head_dim] tensors); QK-norm (if
        any) before RoPE; rope None: q and k come rotated already.

        QK-norm and RoPE run before the heads are transposed, so their outputs, and the gradients
        the attention's backward hands back for them, keep the [B, T, d] order. Rotated after the
        transpose, q and k came out as [B, H, T, head_dim] tensors and their gradients reached the
        q and k convs' backward transposed, to be copied once more (a conv kernel takes rows; the
        plain QKV matmul's gradient folds the transpose into its concatenation). At 300M this
        order took 1.0 GiB off every variant's peak memory, and 0.7 ms of dynamic-qkv's compiled
        elementwise kernels per step (benchmarks/KERNELS.md, training point 12)."""
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def forward(
        self, h: Tensor, rope: Rope, cu_seqlens: Tensor | None = None,
        document_mask: Tensor | None = None,
    ) -> Tensor:
        """h [B, T, d] is the block's normed input. document_mask: see causal_document_mask;
        None means plain causal attention over the whole row."""
        B, T, d = h.shape
        rotated = ("q", "k") if self.convs_rotate and isinstance(rope, RopeFromZero) else ()
        q, k, v = self.convs.project_and_run(h, self.qkv, cu_seqlens, rope, rotated)
        q, k, v = self._to_heads(q, k, v, None if rotated else rope)
        if document_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask)
        out = out.transpose(1, 2).reshape(B, T, d)
        return self.convs.project_and_run(out, {"o": self.o}, cu_seqlens)[0]

    def step(
        self, h_t: Tensor, rope: Rope, kv: KVCache, conv_states: dict[str, Tensor], pos: int
    ) -> Tensor:
        """One decode token h_t [B, d] at position pos; updates kv and conv_states."""
        B, d = h_t.shape
        q, k, v = self.convs.project_and_step(h_t, self.qkv, conv_states)
        q, k, v = self._to_heads(q[:, None], k[:, None], v[:, None], rope)
        keys, values = kv.append(pos, k, v)
        out = F.scaled_dot_product_attention(q, keys, values)  # every cached key is in the past
        out = out.reshape(B, d)
        return self.convs.project_and_step(out, {"o": self.o}, conv_states)[0]
