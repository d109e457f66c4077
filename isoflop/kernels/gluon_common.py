"""What the Gluon kernels (gluon_lowrank, gluon_headwise) share: Gluon's Hopper ops where this Triton
has them (`gluon` is None otherwise), the names that moved between Triton 3.6 and 3.9, and the checks
that say why a kernel cannot take its inputs here."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from isoflop.backends import BackendChoice
from isoflop.kernels.triton_common import interpreting

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # async_copy_global_to_shared up to Triton 3.6, async_load since (the old name raises)
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global  # (the same move)
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # thread_barrier up to 3.6, barrier since
    if not hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.6 calls it _reinterpret
        gl.shared_memory_descriptor.reinterpret = gl.shared_memory_descriptor._reinterpret
except (ImportError, AttributeError):  # a Triton without Gluon's Hopper ops
    gluon = None

__all__ = ["TensorDescriptor", "angle_sum", "cta_barrier", "fence_async_shared", "gl", "gl_dtype", "gluon",
           "hopper_missing",
           "lowrank_limits_missing", "mbarrier", "takes_gluon", "tma", "tma_load", "tma_misaligned", "tma_store",
           "warpgroup_mma", "warpgroup_mma_wait"]


def takes_gluon(variant: BackendChoice, why_not: Callable[[], str | None]) -> bool:
    """Whether a call whose kernel has a Gluon twin runs the twin, by `variant` ("triton", "gluon" or
    "auto"): never with "triton"; with "auto" where it can run; with "gluon" where it can run, and
    elsewhere a ValueError naming the variable and `why_not()`, the reason it cannot."""
    chosen = variant.get()
    if chosen == "triton":
        return False
    reason = why_not()
    if reason and chosen == "gluon":
        raise ValueError(f"{variant.env}=gluon cannot run here: {reason}")
    return reason is None


def hopper_missing(t: Tensor) -> str | None:
    """Why a Gluon Hopper kernel cannot run on t's device with this Triton, or None if it can."""
    if gluon is None:
        return "this Triton has no Gluon Hopper ops"
    if interpreting() or not t.is_cuda or _major(t.device.index) != 9:
        return "it needs a Hopper GPU (sm_90)"
    return None


@torch.compiler.assume_constant_result  # (asked while torch.compile traces the dispatch)
def gluon_hopper(index: int | None) -> bool:
    """Whether device `index` is a Hopper GPU that this Triton's Gluon kernels can run on."""
    return gluon is not None and not interpreting() and _major(index) == 9


@functools.cache
def _major(index: int | None) -> int:
    """The GPU's compute capability major, asked once per device (the question costs host time on
    every conv call otherwise)."""
    return torch.cuda.get_device_capability(index)[0]


def lowrank_limits_missing(x: Tensor, U: Tensor, d_group: int, max_rank: int, max_width: int,
                           tile: int) -> str | None:
    """What the Gluon low-rank kernels (gluon_lowrank, gluon_lowrank_conv) cannot take of these
    shapes: empty inputs, rank or taps beyond their bounds, channel groups that split a tile of
    `tile` channels; None if none of these."""
    D = x.shape[-1]
    R, W = U.shape[0], U.shape[1] // D
    if x.numel() == 0:
        return "the inputs are empty (a TMA descriptor needs every dimension > 0)"
    if R > max_rank or W > max_width:
        return f"it takes R <= {max_rank} and W <= {max_width} (got R={R}, W={W})"
    if d_group < D and d_group % tile:
        return f"channel groups must be multiples of {tile} channels (got {d_group})"
    return None


def tma_misaligned(name: str, t: Tensor) -> str | None:
    """Why TMA cannot read t (16-byte aligned base and strides, unit innermost stride), or None."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
        return f"{name}'s rows must be 16-byte aligned with contiguous channels (strides {tuple(t.stride())})"
    return None


def gl_dtype(t: Tensor):
    """Gluon's type for a half-precision tensor."""
    return gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16


if gluon is not None:

    @gluon.jit
    def angle_sum(cos0, sin0, cos_i, sin_i):
        """cos and sin of a + b from those of a (a tile's first time: a rope table's row) and b (the
        offset within the tile: rows 0-63), so one table row serves a tile (KERNELS.md v32). Every
        kernel that rotates by RoPE forms its angles here, so all round them alike."""
        return cos0 * cos_i - sin0 * sin_i, sin0 * cos_i + cos0 * sin_i
