"""The size ladder: which (width, depth) a model of a given size gets. Pure Python (no torch).

A Shape is the part of a ModelConfig that a size decides: d_model, n_layers, n_heads, d_ff. Every
shape the rule builds has
- d_model a multiple of 64 and heads of 64 channels (n_heads = d_model / 64), like the paper's;
- the SwiGLU hidden size 8/3 * d_model rounded up to a multiple of 64 (`swiglu_hidden`): 2752 for
  d_model 1024 and 5504 for 2048, the paper's values;
- an aspect ratio d_model / n_layers near 64: the paper's 300M (1024 / 16) and 2B (2048 / 32) both
  have exactly 64, so that is the target.

Sizes are counted in non-embedding parameters of the plain Transformer (no convs):
n_layers * (4 d^2 + 3 d d_ff + 2 d) + d, see `isoflop.models.counting`; the embedding is left out
because it depends on the tokenizer, which a sweep may change without changing the model.
Every family uses the same shapes: Mamba-2 and Gated DeltaNet blocks take the width, depth and
heads (of 64 channels) and keep the SwiGLU of d_ff; an MoE model's experts are each d_ff wide. Their
own parameter counts differ from the name (`counting.count_params` has them exactly), as they do
for the Transformer with convs; a sweep compares families at equal shapes and charges each its own
FLOPs.

`shape_for_params(target)` searches every candidate with d_model in 64..8192 (step 64), n_layers in
1..128 and an aspect ratio within 4x of 64 (16..256; at the small end this allows d_model 64 with
1 to 4 layers) and picks the one minimising

    |ln(params / target)| + ASPECT_WEIGHT * |ln(aspect / 64)|,

ties going to the aspect ratio nearer 64, then to the larger model. Closeness in log-params comes
first; the aspect term breaks near-ties (one e-fold of aspect is worth a 22% params mismatch), so
the ladder does not zig-zag between thin-deep and wide-shallow shapes of almost equal size. A score
of this form (distance in log-params plus a penalty that depends only on the candidate) makes the
choice monotone: a bigger target never gives a smaller model.

Named sizes (NAMED_SIZES):
- CPU sizes, exact aspect 64 (d_model = 64 * n_layers), non-embedding params: tiny d64-l1 53K,
  xs d128-l2 427K, s d192-l3 1.3M, m d256-l4 3.2M, l d320-l5 6.4M, xl d384-l6 10.6M.
- The paper's sizes, named by total params with its vocab (100,352) and tied embeddings:
  300M = d1024-l16 (305.17M) and 2B = d2048-l32 (1.82B) are the paper's configs. The paper does
  not give 150M, 600M and 1B; we keep its aspect ratio 64 and head size 64 and take the depth
  whose total is nearest the name: 150M = d768-l12 (162M), 600M = d1344-l21 (590M),
  1B = d1664-l26 (1.04B).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from isoflop.models.config import ModelConfig

HEAD_DIM = 64
WIDTH_MULTIPLE = 64
TARGET_ASPECT = 64  # d_model / n_layers of the paper's 300M and 2B models
ASPECT_WEIGHT = 0.2  # cost of one e-fold of aspect ratio, in units of |ln(params / target)|
MAX_ASPECT_FACTOR = 4  # candidates keep d_model / n_layers within TARGET_ASPECT */ 4
MAX_D_MODEL = 8192
MAX_LAYERS = 128
PAPER_VOCAB_SIZE = 100_352


def swiglu_hidden(d_model: int) -> int:
    """SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of 64."""
    return -(-8 * d_model // (3 * 64)) * 64


@dataclass(frozen=True)
class Shape:
    """Width, depth, heads and MLP hidden size of a plain Transformer."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Shape.{name}={value!r}; allowed: an int >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Shape.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )

    @classmethod
    def standard(cls, d_model: int, n_layers: int) -> "Shape":
        """The rule's shape for a width and depth: heads of 64, SwiGLU hidden by `swiglu_hidden`."""
        if d_model % HEAD_DIM:
            raise ValueError(
                f"d_model={d_model} must be a multiple of the head dim {HEAD_DIM} "
                f"(or give the heads explicitly, e.g. 'd{d_model}-l{n_layers}-h<heads>')"
            )
        return cls(d_model, n_layers, d_model // HEAD_DIM, swiglu_hidden(d_model))

    @property
    def name(self) -> str:
        """'d256-l4'; '-h<heads>' and '-f<d_ff>' are added only where they differ from the rule."""
        name = f"d{self.d_model}-l{self.n_layers}"
        if self.d_model != self.n_heads * HEAD_DIM:
            name += f"-h{self.n_heads}"
        if self.d_ff != swiglu_hidden(self.d_model):
            name += f"-f{self.d_ff}"
        return name

    @property
    def non_embedding_params(self) -> int:
        """Of the plain Transformer: layers (4 attention + 3 MLP matrices, 2 norms) + final norm."""
        d = self.d_model
        return self.n_layers * (4 * d * d + 3 * d * self.d_ff + 2 * d) + d

    def to_config(self, vocab_size: int, **fields: Any) -> ModelConfig:
        """A ModelConfig of this shape; `fields` sets the other ModelConfig fields (conv, ...)."""
        return ModelConfig(
            vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, d_ff=self.d_ff, **fields,
        )


NAMED_SIZES: dict[str, Shape] = {
    "tiny": Shape.standard(64, 1),
    "xs": Shape.standard(128, 2),
    "s": Shape.standard(192, 3),
    "m": Shape.standard(256, 4),
    "l": Shape.standard(320, 5),
    "xl": Shape.standard(384, 6),
    "150M": Shape.standard(768, 12),
    "300M": Shape.standard(1024, 16),
    "600M": Shape.standard(1344, 21),
    "1B": Shape.standard(1664, 26),
    "2B": Shape.standard(2048, 32),
}


@functools.cache
def _candidates() -> tuple[tuple[float, float, Shape], ...]:
    """(ln params, |ln(aspect / 64)|, shape) for every shape the search may return."""
    found = []
    for n_layers in range(1, MAX_LAYERS + 1):
        for d_model in range(WIDTH_MULTIPLE, MAX_D_MODEL + 1, WIDTH_MULTIPLE):
            aspect_error = abs(math.log(d_model / n_layers / TARGET_ASPECT))
            if aspect_error <= math.log(MAX_ASPECT_FACTOR) + 1e-12:
                shape = Shape.standard(d_model, n_layers)
                found.append((math.log(shape.non_embedding_params), aspect_error, shape))
    return tuple(found)


def shape_for_params(target_non_embedding: float) -> Shape:
    """The shape whose non-embedding params best match the target (rule: module docstring)."""
    if isinstance(target_non_embedding, bool) or not 0 < target_non_embedding < math.inf:
        raise ValueError(
            f"target non-embedding params={target_non_embedding!r}; allowed: a finite number > 0"
        )
    log_target = math.log(target_non_embedding)

    def rank(candidate: tuple[float, float, Shape]) -> tuple[float, float, float]:
        log_params, aspect_error, _ = candidate
        score = abs(log_params - log_target) + ASPECT_WEIGHT * aspect_error
        return score, aspect_error, -log_params

    return min(_candidates(), key=rank)[2]


_EXPLICIT = re.compile(r"d(\d+)-l(\d+)(?:-h(\d+))?(?:-f(\d+))?")
_COUNT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([kmb])", re.IGNORECASE)
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9}
_NAMES_FOLDED = {name.lower(): shape for name, shape in NAMED_SIZES.items()}
_ALLOWED = (
    f"allowed: a named size ({', '.join(NAMED_SIZES)}), a number of non-embedding params "
    "(e.g. 50000, '50K', '2.5M', '1.2B') or an explicit shape 'd<d_model>-l<n_layers>' "
    "(e.g. 'd256-l4', optionally followed by '-h<n_heads>' and '-f<d_ff>')"
)


def _parse_count(text: str) -> float | None:
    """'2.5M' -> 2.5e6, '50K', '1.2B', '50000', '5e4'; None if `text` is not a positive count."""
    match = _COUNT.fullmatch(text)
    if match:
        count = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    else:
        try:
            count = float(text)
        except ValueError:
            return None
    return count if count > 0 and math.isfinite(count) else None


def _parse_explicit(text: str) -> Shape | None:
    """'d256-l4' (heads of 64, hidden by the rule) or 'd256-l4-h8-f512'; None if not that form."""
    match = _EXPLICIT.fullmatch(text)
    if not match:
        return None
    d_model, n_layers = int(match.group(1)), int(match.group(2))
    if match.group(3) is None:
        shape = Shape.standard(d_model, n_layers)
    else:
        shape = Shape(d_model, n_layers, int(match.group(3)), swiglu_hidden(d_model))
    if match.group(4) is not None:
        shape = dataclasses.replace(shape, d_ff=int(match.group(4)))
    return shape


def resolve_size(size: str | int | float) -> Shape:
    """A Shape from a named size, a target of non-embedding params, or an explicit shape.

    Accepted: a key of NAMED_SIZES, any case (checked first, so '300M' is the paper's 300M model,
    not a 300M non-embedding target); a number or a string like '50K', '2.5M', '1.2B', '5e4' (target
    non-embedding params, through `shape_for_params`); 'd<d_model>-l<n_layers>' with heads of 64 and
    the SwiGLU rule's hidden size, optionally '-h<n_heads>' and '-f<d_ff>' (the form of Shape.name,
    so resolve_size(shape.name) == shape).
    """
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return shape_for_params(size)
    if not isinstance(size, str):
        raise ValueError(f"size={size!r} ({type(size).__name__}); {_ALLOWED}")
    text = size.strip()
    if text.lower() in _NAMES_FOLDED:
        return _NAMES_FOLDED[text.lower()]
    shape = _parse_explicit(text)
    if shape is not None:
        return shape
    count = _parse_count(text)
    if count is not None:
        return shape_for_params(count)
    raise ValueError(f"size={size!r}; {_ALLOWED}")


def ladder(min_params: float, max_params: float, n: int) -> list[Shape]:
    """n distinct shapes for log-spaced non-embedding targets from min_params to max_params."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ladder n={n!r}; allowed: an int >= 1")
    if not 0 < min_params <= max_params:
        raise ValueError(
            f"ladder min_params={min_params!r}, max_params={max_params!r}; "
            "allowed: 0 < min_params <= max_params"
        )
    if n == 1:
        targets = [min_params]
    else:
        step = (max_params / min_params) ** (1 / (n - 1))
        targets = [min_params * step**i for i in range(n)]
    shapes = [shape_for_params(t) for t in targets]
    distinct = list(dict.fromkeys(shapes))
    if len(distinct) < n:
        raise ValueError(
            f"ladder({min_params:g}, {max_params:g}, n={n}) gives only {len(distinct)} distinct "
            f"shapes ({', '.join(s.name for s in distinct)}); ask for fewer or widen the range"
        )
    return shapes
