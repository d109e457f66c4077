"""The dynamic short convolution operator (functions over tensors; no nn.Module here).

`reference.py` is the specification; `ops.py` holds the Triton kernels as torch custom ops (what
torch.compile sees; eager calls run them through a plain autograd.Function, which costs far less
host time per call). Every function below dispatches at call time:
- backend "auto" (default): Triton for CUDA tensors of float32/float16/bfloat16, the reference
  otherwise (CPU, float64, widths or head sizes the kernels do not take);
- "triton": always the kernels (on CPU tensors this needs TRITON_INTERPRET=1; unsupported inputs
  raise a ValueError saying why);
- "reference": always the PyTorch reference.
Pick it with `set_backend(...)` or the environment variable ISOFLOP_KERNELS. Decode steps that need
gradients always run on the reference (the step kernel is inference-only). The Triton modules are
imported on first use, so CPU-only code never pays for them.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch import Tensor

from isoflop.backends import BackendChoice
from isoflop.kernels import reference
from isoflop.kernels.reference import initial_state

BACKENDS = ("auto", "reference", "triton")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Mirror ops.MAX_WIDTH / ops.MAX_HEAD_SIZE without importing Triton (ops takes GROUP_MULTIPLE from here).
_MAX_WIDTH, _MAX_HEAD_SIZE = 8, 256
GROUP_MULTIPLE = 16  # channels per low-rank channel group that the Triton kernels can tile
# Whether the conv custom ops can tell Inductor they take any layout (custom_op's tags, torch
# >= 2.8): then compiled models hand them views in place; without it Inductor would copy each view
# to eager's strides, and the model copies once itself (ops._takes_any_layout, models/conv.py).
CONV_OPS_TAKE_ANY_LAYOUT = (
    hasattr(torch.Tag, "flexible_layout") and "tags" in inspect.signature(torch.library.custom_op).parameters
)


_choice = BackendChoice("ISOFLOP_KERNELS", BACKENDS, "kernel backend")


def set_backend(name: str) -> None:
    """Choose the kernels for every later call: "auto", "triton" or "reference"."""
    _choice.set(name)


def get_backend() -> str:
    return _choice.get()


def _use_triton(x: Tensor, *others: Tensor | None, width: int = 1, head_size: int = 1,
                channel_group: int = GROUP_MULTIPLE) -> bool:
    if _choice.name != "auto":
        return _choice.name == "triton"
    tensors = [x, *(t for t in others if t is not None)]
    return (
        _HAVE_TRITON
        and all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in tensors)
        and width <= _MAX_WIDTH
        and head_size <= _MAX_HEAD_SIZE
        and channel_group % GROUP_MULTIPLE == 0
    )


def _no_grad_needed(*tensors: Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _ops():
    from isoflop.kernels import ops

    return ops


def _heads(x: Tensor, w: Tensor) -> int:
    return x.shape[-1] // max(1, w.shape[-1])


def dynamic_conv_lowrank(
    x: Tensor, z: Tensor, U: Tensor, static: Tensor | None = None, *,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """Low-rank dynamic conv: x [B, T, D], z [B, T, R], U [R, W*D], static [W, D] or None. With z
    [B, T, G*R], each of G runs of D/G channels takes its own R columns of z (several convs of one
    fused projection as one call; see reference.dynamic_conv_lowrank). With rope = (cos, sin), the
    output's first `rope_channels` channels (all if None) come out rotated as attention rotates q
    and k (reference.rotate_channels), by the forward kernel itself where it can; without
    cu_seqlens, the tables must be those of positions 0 to T-1 (reference.check_rope_from_zero)."""
    groups = z.shape[-1] // max(1, U.shape[0])
    channel_group = x.shape[-1] // groups if groups > 1 else GROUP_MULTIPLE
    if _use_triton(x, z, U, static, width=U.shape[-1] // max(1, x.shape[-1]), channel_group=channel_group):
        return _ops().dynamic_conv_lowrank(x, z, U, static, residual=residual, cu_seqlens=cu_seqlens, rope=rope,
                                           rope_channels=rope_channels)
    return reference.dynamic_conv_lowrank(x, z, U, static, residual=residual, cu_seqlens=cu_seqlens, rope=rope,
                                          rope_channels=rope_channels)


def dynamic_convs_lowrank(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None = None, *, width: int,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rotated: int = 0,
) -> list[Tensor]:
    """G low-rank dynamic convs whose inputs are columns of one fused projection [B, T, C_1 + ... +
    C_G + G*R]: conv g filters its C_g columns (in order) with U_g = ups[g] [R, W*C_g], static filter
    statics[g] [W, C_g] (none if statics is None), and z = the projection's g-th R columns after all
    the convs' channels. With rope = (cos, sin), the first `rotated` outputs come out rotated (as
    dynamic_conv_lowrank's rope). The same values as dynamic_conv_lowrank on each conv's views; on the
    kernels one op, whose backward writes each conv's dx and dz into the projection's gradient, where
    split views' gradients would be concatenated by a kernel of their own."""
    reference.check_lowrank_projected(projection, ups, statics, width, rope, rotated)
    if _use_triton(projection, *ups, *(statics or []), width=width):
        return _ops().dynamic_convs_lowrank(projection, ups, statics, width=width, residual=residual,
                                            cu_seqlens=cu_seqlens, rope=rope, rotated=rotated)
    channels = [U.shape[-1] // width for U in ups]
    rank, total = ups[0].shape[0], sum(channels)
    xs = projection[..., :total].split(channels, dim=-1)
    zs = projection[..., total:].split(rank, dim=-1)
    return [reference.dynamic_conv_lowrank(x, z, U, statics[g] if statics else None, residual=residual,
                                           cu_seqlens=cu_seqlens, rope=rope if g < rotated else None)
            for g, (x, z, U) in enumerate(zip(xs, zs, ups))]


def dynamic_convs_lowrank_swiglu(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None = None, *, width: int,
    residual: bool = True,
) -> Tensor:
    """silu(gate) * up [B, T, C] for the MLP's gate and up convs, dynamic_convs_lowrank's two convs
    (ups = [U_gate, U_up], each [R, W*C]) on a projection [B, T, 2*C + 2*R]: the same values as
    F.silu(gate) * up on that function's outputs, computed in float32 and rounded once as
    torch.compile computes it. On the kernels one op: on Hopper one kernel forms both convs and the
    SwiGLU (gluon_lowrank_swiglu), so the SwiGLU does not read the convs' outputs back; they are
    written only for its gradient."""
    if len(ups) != 2 or ups[0].shape != ups[1].shape:
        raise ValueError(f"ups must be the gate's and up's U, two of one shape; got {[tuple(U.shape) for U in ups]}")
    reference.check_lowrank_projected(projection, ups, statics, width, None, 0)
    if _use_triton(projection, *ups, *(statics or []), width=width):
        return _ops().dynamic_convs_lowrank_swiglu(projection, ups, statics, width=width, residual=residual)
    gate, up = dynamic_convs_lowrank(projection, ups, statics, width=width, residual=residual)
    return reference.swiglu(gate, up)


def swiglu_fuses(projection: Tensor, ups: list[Tensor], width: int) -> bool:
    """Whether dynamic_convs_lowrank_swiglu would run its one Hopper kernel on a projection of this
    shape, type and device (what torch.compile can see while it traces; where strides or addresses
    then rule the kernel out, the op runs the convs and the SwiGLU apart, the same values)."""
    if not (_HAVE_TRITON and projection.is_cuda and _use_triton(projection, *ups, width=width)):
        return False
    from isoflop.kernels import gluon_common, gluon_lowrank_swiglu
    operands = _ops()._swiglu_operands(projection, ups, [], width)  # the op's own slicing
    missing = gluon_lowrank_swiglu.shapes_missing(*operands[:6], packed=False)
    return missing is None and gluon_common.gluon_hopper(projection.device.index)


def dynamic_conv_headwise(
    x: Tensor, w: Tensor, static: Tensor | None = None, *,
    residual: bool = True, cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Head-wise dynamic conv: x [B, T, D], w [B, T, W, H] with H dividing D."""
    if _use_triton(x, w, static, width=w.shape[2] if w.ndim == 4 else 1, head_size=_heads(x, w)):
        return _ops().dynamic_conv_headwise(x, w, static, residual=residual, cu_seqlens=cu_seqlens)
    return reference.dynamic_conv_headwise(x, w, static, residual=residual, cu_seqlens=cu_seqlens)


def dynamic_convs_headwise(
    projection: Tensor, statics: list[Tensor] | None = None, *, channels: list[int], heads: list[int], width: int,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rotated: int = 0,
) -> list[Tensor]:
    """G head-wise dynamic convs whose inputs are columns of one fused projection [B, T, C_1 + ... +
    C_G + W*(H_1 + ... + H_G)]: conv g filters its C_g = channels[g] columns (in order) in heads[g]
    heads, with taps w_g = its W*H_g columns after all the convs' channels (tap-major, as
    dynamic_conv_headwise's w [B, T, W, H_g] flattened) and static filter statics[g] [W, C_g]. With
    rope = (cos, sin), the first `rotated` outputs come out rotated (reference.rotate_channels; as
    dynamic_conv_lowrank's rope), inside the Gluon walks where they run. The same values as
    dynamic_conv_headwise on each conv's views; on the kernels one op, whose backward writes each
    conv's dx and dw into the projection's gradient."""
    reference.check_projected(projection, channels, [width * h for h in heads], statics, width)
    reference.check_rotated(rope, rotated, len(channels))
    head_size = max(c // max(1, h) for c, h in zip(channels, heads))
    if _use_triton(projection, *(statics or []), width=width, head_size=head_size):
        return _ops().dynamic_convs_headwise(projection, statics, channels=channels, heads=heads, width=width,
                                             residual=residual, cu_seqlens=cu_seqlens, rope=rope, rotated=rotated)
    xs = projection[..., :sum(channels)].split(channels, dim=-1)
    ws = projection[..., sum(channels):].split([width * h for h in heads], dim=-1)
    ys = [reference.dynamic_conv_headwise(x, w.unflatten(-1, (width, h)), statics[g] if statics else None,
                                          residual=residual, cu_seqlens=cu_seqlens)
          for g, (x, w, h) in enumerate(zip(xs, ws, heads))]
    if rope is not None:
        for g in range(rotated):
            reference.checked_rope_channels(ys[g].shape, rope, None, packed=cu_seqlens is not None)
            ys[g] = reference.rotate_channels(ys[g], rope)
    return ys


def short_conv(
    x: Tensor, filters: Tensor | None, static: Tensor | None = None, *,
    residual: bool = False, cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The operator with explicit per-position, per-channel filters [B, T, W, D] (or None)."""
    taps = filters if filters is not None else static
    if taps is not None and _use_triton(x, filters, static, width=taps.shape[-2]):
        return _ops().short_conv(x, filters, static, residual=residual, cu_seqlens=cu_seqlens)
    return reference.short_conv(x, filters, static, residual=residual, cu_seqlens=cu_seqlens)


def static_conv_rotates(
    x: Tensor, static: Tensor, rope: tuple[Tensor, Tensor], *, rope_channels: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> bool:
    """Whether static_conv with this rope rotates inside its kernels (on Hopper, the Gluon walks:
    shapes, types and the switches only, what torch.compile sees while it traces). Elsewhere it
    rotates after them, which for a part of the channels costs a copy of the rest (rotate_channels'
    concatenation): callers holding the parts apart (LinearConvs) rotate each part instead."""
    return _use_triton(x, static, width=static.shape[0]) and _ops().static_conv_rotates(
        x, static, rope, rope_channels=rope_channels, cu_seqlens=cu_seqlens)


def static_conv(
    x: Tensor, static: Tensor, *, residual: bool = False, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """Static depthwise causal conv with a [W, D] filter (tap k = lag k). With rope = (cos, sin), the
    output's first `rope_channels` channels (all if None) come out rotated as attention rotates q and
    k, inside the kernels where they can (as dynamic_conv_lowrank's rope)."""
    if _use_triton(x, static, width=static.shape[0]):
        return _ops().static_conv(x, static, residual=residual, cu_seqlens=cu_seqlens, rope=rope,
                                  rope_channels=rope_channels)
    return reference.static_conv(x, static, residual=residual, cu_seqlens=cu_seqlens, rope=rope,
                                 rope_channels=rope_channels)


def dynamic_conv_lowrank_step(
    x_t: Tensor, state: Tensor, z_t: Tensor, U: Tensor, static: Tensor | None = None,
    *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step: x_t [B, D], state [B, W-1, D], z_t [B, R]."""
    inputs = (x_t, state, z_t, U, static)
    if _use_triton(*inputs, width=state.shape[1] + 1) and _no_grad_needed(*inputs):
        return _ops().dynamic_conv_lowrank_step(x_t, state, z_t, U, static, residual=residual)
    return reference.dynamic_conv_lowrank_step(x_t, state, z_t, U, static, residual=residual)


def dynamic_conv_headwise_step(
    x_t: Tensor, state: Tensor, w_t: Tensor, static: Tensor | None = None,
    *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step: x_t [B, D], state [B, W-1, D], w_t [B, W, H]."""
    inputs = (x_t, state, w_t, static)
    if _use_triton(*inputs, width=state.shape[1] + 1, head_size=_heads(x_t, w_t)) and _no_grad_needed(*inputs):
        return _ops().dynamic_conv_headwise_step(x_t, state, w_t, static, residual=residual)
    return reference.dynamic_conv_headwise_step(x_t, state, w_t, static, residual=residual)


def static_conv_step(
    x_t: Tensor, state: Tensor, static: Tensor, *, residual: bool = False
) -> tuple[Tensor, Tensor]:
    """One decode step of the static conv: x_t [B, D], state [B, W-1, D], static [W, D]."""
    inputs = (x_t, state, static)
    if _use_triton(*inputs, width=state.shape[1] + 1) and _no_grad_needed(*inputs):
        return _ops().static_conv_step(x_t, state, static, residual=residual)
    return reference.static_conv_step(x_t, state, static, residual=residual)


__all__ = [
    "BACKENDS",
    "dynamic_conv_headwise",
    "dynamic_conv_headwise_step",
    "dynamic_conv_lowrank",
    "dynamic_conv_lowrank_step",
    "get_backend",
    "initial_state",
    "set_backend",
    "short_conv",
    "static_conv",
    "static_conv_rotates",
    "static_conv_step",
]
