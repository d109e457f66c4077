"""The Triton kernels as torch.library custom ops, with autograd, fake (meta) implementations and
argument checks, so eager code, autograd and torch.compile(fullgraph=True) all see one opaque op.

Ops (namespace `isoflop`):
- lowrank_conv(x, z, U, static?, residual, cu_seqlens?, cos?, sin?, rope_channels, rope_backward) and
  lowrank_conv_backward -> (dx, dz, dU, ds); with cos and sin, the output's first rope_channels
  channels come out rotated (reference.rotate_channels; dynamic_conv_lowrank passes them only
  where the forward kernel rotates, triton_lowrank.rope_fuses). The rotation's gradient goes to the
  backward op with cos and sin where rope_backward says its kernels turn dy back as they read it
  (side by side on Hopper: triton_lowrank.backward_rotates, v33), else it is PyTorch ops in the
  autograd formula, before the backward op, which torch.compile fuses into one kernel. The choice is
  an argument of the forward op, so a compiled graph (and its caches' keys) records it
- lowrank_projected(projection, ups, statics, width, residual, cu_seqlens?, cos?, sin?, rotated) -> the
  outputs of G convs whose x and z are columns of one fused projection, and lowrank_projected_backward
  -> (the projection's gradient, dUs, dstatics): each conv's dx and dz written into their columns, so
  no kernel concatenates them (what split views' gradients cost a compiled model: ~1.7 ms of a 300M
  dynamic-qkv step). The first `rotated` outputs come out rotated by cos and sin
- headwise_projected(projection, statics, channels, heads, width, residual, cu_seqlens?, cos?, sin?,
  rotated) and headwise_projected_backward -> (the projection's gradient, dstatics): the same for
  head-wise convs; the tables go to the op only where the Gluon walks rotate inside both passes
  (triton_headwise.rope_fuses), else PyTorch ops rotate the outputs after it
- headwise_conv(x, w?, static?, residual, cu_seqlens?) and headwise_conv_backward -> (dx, dw, ds);
  w [B, T, W, H] with H | D (H = D is reference.short_conv's explicit filters; no w is the static conv)
- conv_step(x_t, state, z_t?, U?, w_t?, static?, residual) -> (y_t, new_state); no autograd.
Gradients of absent inputs come back as empty tensors (custom ops cannot return None) and are mapped
to None for autograd.

Eager calls bypass the custom ops: an autograd.Function runs the same implementations directly.
The custom-op path (dispatcher, its Python autograd wrapper, the backward op's own dispatch) cost
~0.6-0.8 ms of host time per conv forward + backward on the H200 machine, against ~0.14-0.33 ms
for the kernels' launches, and small models' training steps are bound by host time. Under
torch.compile the custom ops are what Dynamo sees (`_dispatch`).

Positions inside packed sequences are computed from cu_seqlens inside the ops (no host sync). Its
shape is always checked; its values only where that costs no device sync (CPU tensors), and bad
values on the GPU give wrong results, never out-of-bounds accesses (kernels mask every lag).
"""

from typing import Callable, Optional

import torch
from torch import Tensor

# Low-rank channel groups: a channel tile (>= 16 for the matrix units) fits in one; defined beside
# the dispatch, which must not import Triton.
from isoflop.kernels import GROUP_MULTIPLE, CONV_OPS_TAKE_ANY_LAYOUT
from isoflop.kernels.reference import (
    check_cu_seqlens,
    check_lowrank_projected,
    check_projected,
    check_rotated,
    checked_rope_channels,
    lowrank_groups,
    rotate_channels,
    rotated_channels,
    swiglu,
)
from isoflop.kernels.triton_common import interpreting
from isoflop.kernels.triton_decode import conv_step as _conv_step
from isoflop.kernels.triton_headwise import headwise_backward, headwise_forward
from isoflop.kernels.triton_headwise import rope_fuses as headwise_rope_fuses
from isoflop.kernels.triton_lowrank import backward_rotates, lowrank_backward, lowrank_forward, rope_fuses

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 8  # taps are unrolled at compile time, with one accumulator each in the backward
MAX_HEAD_SIZE = 256  # a channel tile holds at least one whole head
_INTERPRETING = interpreting()  # read once: argument checks must stay traceable by torch.compile


def _positions(cu_seqlens: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """int32 [T]: each position's index inside its own sequence (None when not packed)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    t = torch.arange(T, device=device)
    seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, cu.numel() - 1)
    return (t - cu[seq]).to(torch.int32)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _rows(t: Tensor | None) -> Tensor | None:
    """t [B, T, ...] itself when each row t[b, i] is contiguous and rows are evenly strided, as
    views into one fused projection's output are (x and z [B, T, C]; head-wise taps [B, T, W, H],
    the generator's output unflattened): the kernels take a row stride, so such a view costs no
    copy. Otherwise a contiguous copy; None stays None."""
    if t is None:
        return None
    inner = 1  # each row's own strides must be a contiguous [...]'s
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if stride != inner:
            return t.contiguous()
        inner *= size
    B, T = t.shape[:2]
    return t if B == 1 or t.stride(0) == T * t.stride(1) else t.contiguous()


# --------------------------------------------------------------------------------------------
# Low-rank


def _rope(cos: Optional[Tensor], sin: Optional[Tensor], channels: int) -> tuple | None:
    """(cos, sin, channels) as the kernels take them (float32 tables), or None without rotation."""
    if cos is None or channels == 0:
        return None
    return cos.float().contiguous(), sin.float().contiguous(), channels


def _tables(cos: Optional[Tensor], sin: Optional[Tensor], channels: int) -> tuple | None:
    """(cos, sin) as the head-wise walks take them (_rope without the channel count), or None."""
    rope = _rope(cos, sin, channels)
    return rope[:2] if rope is not None else None


def _lowrank_conv(
    x: Tensor, z: Tensor, U: Tensor, static: Optional[Tensor], residual: bool, cu_seqlens: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], rope_channels: int, rope_backward: bool,
) -> Tensor:
    static = static.contiguous() if static is not None else None
    pos = _positions(cu_seqlens, x.shape[1], x.device)
    return lowrank_forward(_rows(x), _rows(z), U.contiguous(), static, residual, pos, rope=_rope(cos, sin, rope_channels))


def _takes_any_layout(name: str, fn: Callable):
    """A conv custom op that Inductor may hand its inputs in any layout, views with padded rows
    included.

    By default Inductor gives a custom op its inputs with the strides eager mode had. On CUDA it
    pads the rows of wide buffers to 128 bytes (comprehensive padding: the fused projection's
    3120 columns at 300M become 3136), and torch 2.11 then copied every x and z sliced from that
    output, and the backward's saved x, back to eager's strides: 1.6 ms of a 300M dynamic-qkv
    step, 5.4 ms of all-linear's (KERNELS.md, training points 13 and 14). The kernels take row
    strides and the ops copy other layouts themselves (`_rows`), so they accept any layout
    (torch.Tag.flexible_layout, where torch >= 2.8 lets custom_op take tags). Their fake
    implementations return contiguous tensors, as the kernels do."""
    if CONV_OPS_TAKE_ANY_LAYOUT:
        return torch.library.custom_op(name, fn, mutates_args=(), tags=(torch.Tag.flexible_layout,))
    return torch.library.custom_op(name, fn, mutates_args=())  # no tags before torch 2.8


lowrank_conv = _takes_any_layout("isoflop::lowrank_conv", _lowrank_conv)


@lowrank_conv.register_fake
def _(x, z, U, static, residual, cu_seqlens, cos, sin, rope_channels, rope_backward):
    return x.new_empty(x.shape)  # contiguous, like the kernel's output, whatever x's strides


def _lowrank_conv_backward(
    dy: Tensor, x: Tensor, z: Tensor, U: Tensor, static: Optional[Tensor], residual: bool,
    cu_seqlens: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], rope_channels: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    static = static.contiguous() if static is not None else None
    pos = _positions(cu_seqlens, x.shape[1], x.device)
    dx, dz, dU, ds = lowrank_backward(dy.contiguous(), _rows(x), _rows(z), U.contiguous(), static, residual, pos,
                                      rope=_rope(cos, sin, rope_channels))
    return dx, dz, dU, ds if ds is not None else _empty(x)


lowrank_conv_backward = _takes_any_layout("isoflop::lowrank_conv_backward", _lowrank_conv_backward)


@lowrank_conv_backward.register_fake
def _(dy, x, z, U, static, residual, cu_seqlens, cos, sin, rope_channels):
    ds = static.new_empty(static.shape) if static is not None else _empty(x)
    return x.new_empty(x.shape), z.new_empty(z.shape), U.new_empty(U.shape), ds


def _lowrank_setup(ctx, inputs, output):
    x, z, U, static, residual, cu_seqlens, cos, sin, rope_channels, rope_backward = inputs
    ctx.save_for_backward(x, z, U, static, cu_seqlens, cos, sin)
    ctx.residual, ctx.rope_channels, ctx.rope_backward = residual, rope_channels, rope_backward


def _lowrank_grad(ctx, dy, backward=lowrank_conv_backward):
    x, z, U, static, cu_seqlens, cos, sin = ctx.saved_tensors
    # The rotation's gradient (the inverse rotation) is the backward op's where its kernels take it
    # (lowrank_backward), else ops here, which torch.compile fuses into one kernel.
    inside = cos is not None and ctx.rope_backward
    if cos is not None and not inside:
        dy = rotate_channels(dy, (cos, sin), ctx.rope_channels, inverse=True)
    dx, dz, dU, ds = backward(dy, x, z, U, static, ctx.residual, cu_seqlens,
                              *((cos, sin, ctx.rope_channels) if inside else (None, None, 0)))
    return dx, dz, dU, ds if static is not None else None, None, None, None, None, None, None


lowrank_conv.register_autograd(_lowrank_grad, setup_context=_lowrank_setup)


# --------------------------------------------------------------------------------------------
# Convs of one fused projection (the low-rank ones here, the head-wise ones after headwise_conv)


def _column_views(projection: Tensor, channels: list[int], generated: list[int]) -> list[tuple[Tensor, Tensor]]:
    """(x, generator output) of each conv as views of a fused projection [B, T, sum(channels) +
    sum(generated)]: conv g's x is its channels[g] columns (in order), its generator's output the
    generated[g] columns after all the convs' channels (reference.check_projected)."""
    views, x_start, g_start = [], 0, sum(channels)
    for n_x, n_g in zip(channels, generated):
        views.append((projection[..., x_start:x_start + n_x], projection[..., g_start:g_start + n_g]))
        x_start, g_start = x_start + n_x, g_start + n_g
    return views


def _projected(projection: Tensor, ups: list[Tensor], width: int) -> list[tuple[Tensor, Tensor]]:
    """(x, z) of each low-rank conv (U [R, W*C_g]) reading the projection."""
    return _column_views(projection, [U.shape[1] // width for U in ups], [U.shape[0] for U in ups])


def _projected_rope(cos: Optional[Tensor], sin: Optional[Tensor], g: int, rotated: int, channels: int):
    return _rope(cos, sin, channels) if g < rotated else None


def _lowrank_projected(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor], width: int, residual: bool,
    cu_seqlens: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], rotated: int,
) -> list[Tensor]:
    pos = _positions(cu_seqlens, projection.shape[1], projection.device)
    return [lowrank_forward(_rows(x), _rows(z), U.contiguous(), statics[g].contiguous() if statics else None,
                            residual, pos, rope=_projected_rope(cos, sin, g, rotated, x.shape[-1]))
            for g, ((x, z), U) in enumerate(zip(_projected(projection, ups, width), ups))]


lowrank_projected = _takes_any_layout("isoflop::lowrank_projected", _lowrank_projected)


@lowrank_projected.register_fake
def _(projection, ups, statics, width, residual, cu_seqlens, cos, sin, rotated):
    return [projection.new_empty(*projection.shape[:2], U.shape[1] // width) for U in ups]


def _lowrank_projected_backward(
    dys: list[Tensor], projection: Tensor, ups: list[Tensor], statics: list[Tensor], width: int, residual: bool,
    cu_seqlens: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], rotated: int,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(the projection's gradient, dU of each conv, dstatic of each conv or none). Each conv's dx and
    dz are written into their columns of the gradient (the Gluon dx stores dx there in place; the
    rest is copied in), so no kernel concatenates the pieces afterwards."""
    pos = _positions(cu_seqlens, projection.shape[1], projection.device)
    grad = torch.empty(projection.shape, dtype=projection.dtype, device=projection.device)
    dUs, dss = [], []
    views = zip(_projected(projection, ups, width), _projected(grad, ups, width))
    for g, (((x, z), out), dy, U) in enumerate(zip(views, dys, ups)):
        _, _, dU, ds = lowrank_backward(dy.contiguous(), _rows(x), _rows(z), U.contiguous(),
                                        statics[g].contiguous() if statics else None, residual, pos,
                                        rope=_projected_rope(cos, sin, g, rotated, x.shape[-1]), out=out)
        dUs.append(dU)
        dss.extend([ds] if statics else [])
    return grad, dUs, dss


lowrank_projected_backward = _takes_any_layout("isoflop::lowrank_projected_backward", _lowrank_projected_backward)


@lowrank_projected_backward.register_fake
def _(dys, projection, ups, statics, width, residual, cu_seqlens, cos, sin, rotated):
    return projection.new_empty(projection.shape), [U.new_empty(U.shape) for U in ups], [s.new_empty(s.shape) for s in statics]


def _projected_setup(ctx, inputs, output):
    projection, ups, statics, width, residual, cu_seqlens, cos, sin, rotated = inputs
    ctx.save_for_backward(projection, cu_seqlens, cos, sin, *ups, *statics)
    ctx.groups, ctx.width, ctx.residual, ctx.rotated = len(ups), width, residual, rotated


def _projected_grad(ctx, dys):
    projection, cu_seqlens, cos, sin, *params = ctx.saved_tensors
    ups, statics = params[:ctx.groups], params[ctx.groups:]
    grad, dUs, dss = lowrank_projected_backward(list(dys), projection, ups, statics, ctx.width, ctx.residual,
                                                cu_seqlens, cos, sin, ctx.rotated)
    return grad, dUs, dss, None, None, None, None, None, None


lowrank_projected.register_autograd(_projected_grad, setup_context=_projected_setup)


# --------------------------------------------------------------------------------------------
# The MLP's gate and up convs with their SwiGLU (gluon_lowrank_swiglu)


def _swiglu_operands(projection: Tensor, ups: list[Tensor], statics: list[Tensor], width: int) -> list:
    """(gate x, up x, gate z, up z, gate U, up U, gate static, up static) of the two convs reading the
    projection, as gluon_lowrank_swiglu takes them."""
    (gate_x, gate_z), (up_x, up_z) = _projected(projection, ups, width)
    gate_s, up_s = (s.contiguous() for s in statics) if statics else (None, None)
    return [gate_x, up_x, gate_z, up_z, ups[0].contiguous(), ups[1].contiguous(), gate_s, up_s]


def _lowrank_projected_swiglu(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor], width: int, residual: bool,
) -> list[Tensor]:
    """[h, gate', up']: the SwiGLU of the two convs and the convs' outputs (saved for its gradient)."""
    from isoflop.kernels import gluon_lowrank_swiglu

    operands = _swiglu_operands(projection, ups, statics, width)
    if gluon_lowrank_swiglu.cannot_run(*operands[:6]) is None:
        return list(gluon_lowrank_swiglu.forward(*operands, residual))
    gate, up = _lowrank_projected(projection, ups, statics, width, residual, None, None, None, 0)
    return [swiglu(gate, up), gate, up]


lowrank_projected_swiglu = _takes_any_layout("isoflop::lowrank_projected_swiglu", _lowrank_projected_swiglu)


@lowrank_projected_swiglu.register_fake
def _(projection, ups, statics, width, residual):
    return [projection.new_empty(*projection.shape[:2], ups[0].shape[1] // width) for _ in range(3)]


def _swiglu_setup(ctx, inputs, output):
    projection, ups, statics, width, residual = inputs
    ctx.save_for_backward(projection, output[1], output[2], *ups, *statics)
    ctx.width, ctx.residual = width, residual


def _swiglu_grad(ctx, grads):
    """The SwiGLU's gradient from the saved gate' and up' (ops here, which torch.compile fuses into
    one kernel), then the convs' backward op on it. gate' and up' are the op's outputs only to be
    saved: no gradient flows into them from elsewhere."""
    projection, gate, up, *params = ctx.saved_tensors
    ups, statics = params[:2], params[2:]
    g, u, dh = gate.float(), up.float(), grads[0].float()
    sig = torch.sigmoid(g)
    dys = [(dh * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (dh * g * sig).to(gate.dtype)]
    grad, dUs, dss = lowrank_projected_backward(dys, projection, ups, statics, ctx.width, ctx.residual, None, None,
                                                None, 0)
    return grad, dUs, dss, None, None


lowrank_projected_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# --------------------------------------------------------------------------------------------
# Head-wise, explicit per-channel filters, static


def _headwise_conv(
    x: Tensor, w: Optional[Tensor], static: Optional[Tensor], residual: bool, cu_seqlens: Optional[Tensor],
    cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, rope_channels: int = 0,
) -> Tensor:
    static = static.contiguous() if static is not None else None
    pos = _positions(cu_seqlens, x.shape[1], x.device)
    return headwise_forward(_rows(x), _rows(w), static, residual, pos, rope=_tables(cos, sin, rope_channels),
                            rope_channels=rope_channels)


headwise_conv = _takes_any_layout("isoflop::headwise_conv", _headwise_conv)


@headwise_conv.register_fake
def _(x, w, static, residual, cu_seqlens, cos=None, sin=None, rope_channels=0):
    return x.new_empty(x.shape)


def _headwise_conv_backward(
    dy: Tensor, x: Tensor, w: Optional[Tensor], static: Optional[Tensor], residual: bool,
    cu_seqlens: Optional[Tensor], cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, rope_channels: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    static = static.contiguous() if static is not None else None
    pos = _positions(cu_seqlens, x.shape[1], x.device)
    dx, dw, ds = headwise_backward(dy.contiguous(), _rows(x), _rows(w), static, residual, pos,
                                   rope=_tables(cos, sin, rope_channels), rope_channels=rope_channels)
    return dx, dw if dw is not None else _empty(x), ds if ds is not None else _empty(x)


headwise_conv_backward = _takes_any_layout("isoflop::headwise_conv_backward", _headwise_conv_backward)


@headwise_conv_backward.register_fake
def _(dy, x, w, static, residual, cu_seqlens, cos=None, sin=None, rope_channels=0):
    dw = w.new_empty(w.shape) if w is not None else _empty(x)
    ds = static.new_empty(static.shape) if static is not None else _empty(x)
    return x.new_empty(x.shape), dw, ds


def _headwise_setup(ctx, inputs, output):
    x, w, static, residual, cu_seqlens, cos, sin, rope_channels = (*inputs, None, None, 0)[:8]  # (defaults)
    ctx.save_for_backward(x, w, static, cu_seqlens, cos, sin)
    ctx.residual, ctx.rope_channels, ctx.inputs = residual, rope_channels, len(inputs)


def _headwise_grad(ctx, dy, backward=headwise_conv_backward):
    x, w, static, cu_seqlens, cos, sin = ctx.saved_tensors
    dx, dw, ds = backward(dy, x, w, static, ctx.residual, cu_seqlens, cos, sin, ctx.rope_channels)
    grads = (dx, dw if w is not None else None, ds if static is not None else None)
    return grads + (None,) * (ctx.inputs - len(grads))  # one per input the call gave


headwise_conv.register_autograd(_headwise_grad, setup_context=_headwise_setup)


def _headwise_views(projection: Tensor, channels: list[int], heads: list[int], width: int):
    """(x, w [B, T, W, H_g]) of each head-wise conv reading the projection (its generator's output is
    tap-major, W*H_g columns)."""
    return [(x, w.unflatten(-1, (width, h)))
            for (x, w), h in zip(_column_views(projection, channels, [width * h for h in heads]), heads)]


def _headwise_rope(cos: Optional[Tensor], sin: Optional[Tensor], g: int, rotated: int) -> tuple | None:
    """(cos, sin) as the head-wise kernels take them (float32 tables) for conv g of a projection whose
    first `rotated` convs rotate, or None."""
    return (cos.float().contiguous(), sin.float().contiguous()) if cos is not None and g < rotated else None


def _headwise_projected(
    projection: Tensor, statics: list[Tensor], channels: list[int], heads: list[int], width: int, residual: bool,
    cu_seqlens: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], rotated: int,
) -> list[Tensor]:
    pos = _positions(cu_seqlens, projection.shape[1], projection.device)
    return [headwise_forward(_rows(x), _rows(w), statics[g].contiguous() if statics else None, residual, pos,
                             rope=_headwise_rope(cos, sin, g, rotated))
            for g, (x, w) in enumerate(_headwise_views(projection, channels, heads, width))]


headwise_projected = _takes_any_layout("isoflop::headwise_projected", _headwise_projected)


@headwise_projected.register_fake
def _(projection, statics, channels, heads, width, residual, cu_seqlens, cos, sin, rotated):
    return [projection.new_empty(*projection.shape[:2], c) for c in channels]


def _headwise_projected_backward(
    dys: list[Tensor], projection: Tensor, statics: list[Tensor], channels: list[int], heads: list[int], width: int,
    residual: bool, cu_seqlens: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], rotated: int,
) -> tuple[Tensor, list[Tensor]]:
    """(the projection's gradient, dstatic of each conv or none): each conv's dx and dw written into
    their columns of the gradient (the Gluon walk stores them there in place); the first `rotated`
    convs' dy are gradients of rotated outputs."""
    pos = _positions(cu_seqlens, projection.shape[1], projection.device)
    grad = torch.empty(projection.shape, dtype=projection.dtype, device=projection.device)
    views = zip(_headwise_views(projection, channels, heads, width), _headwise_views(grad, channels, heads, width))
    dss = []
    for g, (((x, w), out), dy) in enumerate(zip(views, dys)):
        _, _, ds = headwise_backward(dy.contiguous(), _rows(x), _rows(w), statics[g].contiguous() if statics else None,
                                     residual, pos, out=out, rope=_headwise_rope(cos, sin, g, rotated))
        dss.extend([ds] if statics else [])
    return grad, dss


headwise_projected_backward = _takes_any_layout("isoflop::headwise_projected_backward", _headwise_projected_backward)


@headwise_projected_backward.register_fake
def _(dys, projection, statics, channels, heads, width, residual, cu_seqlens, cos, sin, rotated):
    return projection.new_empty(projection.shape), [s.new_empty(s.shape) for s in statics]


def _headwise_projected_setup(ctx, inputs, output):
    projection, statics, channels, heads, width, residual, cu_seqlens, cos, sin, rotated = inputs
    ctx.save_for_backward(projection, cu_seqlens, cos, sin, *statics)
    ctx.channels, ctx.heads, ctx.width, ctx.residual, ctx.rotated = channels, heads, width, residual, rotated


def _headwise_projected_grad(ctx, dys):
    projection, cu_seqlens, cos, sin, *statics = ctx.saved_tensors
    grad, dss = headwise_projected_backward(list(dys), projection, statics, ctx.channels, ctx.heads, ctx.width,
                                            ctx.residual, cu_seqlens, cos, sin, ctx.rotated)
    return grad, dss, None, None, None, None, None, None, None, None


headwise_projected.register_autograd(_headwise_projected_grad, setup_context=_headwise_projected_setup)


# --------------------------------------------------------------------------------------------
# Eager path: the same implementations and autograd formulas, without the dispatcher


def _eager_function(forward: Callable, backward: Callable, setup_context: Callable, grad: Callable):
    """`apply` of an autograd.Function that runs `forward` and, for the gradient, `grad` with the
    undispatched `backward` (what the custom op's registered autograd does through two ops)."""

    class EagerConv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, dy):
            return grad(ctx, dy, backward)

    return EagerConv.apply


_eager_lowrank_conv = _eager_function(_lowrank_conv, _lowrank_conv_backward, _lowrank_setup, _lowrank_grad)
_eager_headwise_conv = _eager_function(_headwise_conv, _headwise_conv_backward, _headwise_setup, _headwise_grad)


def _dispatch(op: Callable, eager: Callable, *args):
    """The custom op while torch.compile traces (one opaque node), the direct path otherwise."""
    return op(*args) if torch.compiler.is_compiling() else eager(*args)


# --------------------------------------------------------------------------------------------
# Decode


def _conv_step_contiguous(
    x_t: Tensor, state: Tensor, z_t: Optional[Tensor], U: Optional[Tensor], w_t: Optional[Tensor],
    static: Optional[Tensor], residual: bool,
) -> tuple[Tensor, Tensor]:
    def c(t: Tensor | None) -> Tensor | None:
        return t.contiguous() if t is not None else None

    return _conv_step(c(x_t), c(state), c(z_t), c(U), c(w_t), c(static), residual)


conv_step = torch.library.custom_op("isoflop::conv_step", _conv_step_contiguous, mutates_args=())


@conv_step.register_fake
def _(x_t, state, z_t, U, w_t, static, residual):
    return torch.empty_like(x_t), torch.empty_like(state)


# --------------------------------------------------------------------------------------------
# Checked entry points (same signatures and errors as the reference)


def _check_x(x: Tensor) -> tuple[int, int, int]:
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D]; got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _check(x: Tensor, width: int, static: Tensor | None, cu_seqlens: Tensor | None, **inputs: Tensor | None) -> None:
    B, T, D = x.shape
    if not x.is_cuda and not _INTERPRETING:
        raise ValueError(f"the Triton kernels need CUDA tensors (x is on {x.device}); on CPU set "
                         "TRITON_INTERPRET=1 before importing them, or use kernels.set_backend('reference')")
    named = {"x": x, "static": static, **inputs}
    for name, t in named.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take {SUPPORTED_DTYPES} "
                             "(use kernels.set_backend('reference') for others)")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"filter width W={width} is outside the Triton kernels' range 1..{MAX_WIDTH}")
    if static is not None and static.shape != (width, D):
        raise ValueError(f"static filter must be [W, D]=({width}, {D}); got {tuple(static.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need B == 1; got B={B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor of N+1 >= 2 offsets; got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        if not cu_seqlens.is_cuda:  # values on the GPU would cost a host sync: checked only here
            check_cu_seqlens(cu_seqlens, T)


def dynamic_conv_lowrank(
    x: Tensor, z: Tensor, U: Tensor, static: Tensor | None = None, *,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """Low-rank dynamic conv (see reference.dynamic_conv_lowrank) on the Triton kernels."""
    B, T, D = _check_x(x)
    if z.ndim != 3 or z.shape[:2] != (B, T):
        raise ValueError(f"z must be [B, T, R] or [B, T, G*R] with B={B}, T={T}; got {tuple(z.shape)}")
    if U.ndim != 2 or U.shape[0] == 0 or U.shape[1] % D or U.shape[1] == 0:
        raise ValueError(f"U must be [R, W*D] with D={D}; got {tuple(U.shape)}")
    groups = lowrank_groups(z, U, D)
    if groups > 1 and (D // groups) % GROUP_MULTIPLE:
        raise ValueError(f"{groups} channel groups of {D // groups} channels: the Triton kernels need groups of a "
                         f"multiple of {GROUP_MULTIPLE} channels (use kernels.set_backend('reference') for others)")
    cos, sin = rope if rope is not None else (None, None)
    _check(x, U.shape[1] // D, static, cu_seqlens, z=z, U=U, cos=cos, sin=sin)
    if rope is not None:  # (the tables' positions are checked only on the CPU, where it is free)
        rope_channels = checked_rope_channels(x.shape, rope, rope_channels, packed=cu_seqlens is not None)
    # The tables go to the op where its forward kernel rotates; elsewhere ops of their own rotate after it.
    inside = rope is not None and rope_fuses(x, z, U, 2 * cos.shape[-1], cu_seqlens is not None)
    back_inside = inside and backward_rotates(x, rope)
    y = _dispatch(lowrank_conv, _eager_lowrank_conv, x, z, U, static, residual, cu_seqlens,
                  *((cos, sin, rope_channels, back_inside) if inside else (None, None, 0, False)))
    return y if inside or rope is None else rotate_channels(y, rope, rope_channels)


def dynamic_convs_lowrank(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None = None, *, width: int,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rotated: int = 0,
) -> list[Tensor]:
    """Low-rank dynamic convs of one fused projection (see kernels.dynamic_convs_lowrank) on the
    Triton kernels: one op, whose backward writes the projection's gradient in place."""
    check_lowrank_projected(projection, ups, statics, width, rope, rotated)
    statics = list(statics or [])
    cos, sin = rope if rope is not None else (None, None)
    for g, ((x, z), U) in enumerate(zip(_projected(projection, ups, width), ups)):
        _check(x, width, statics[g] if statics else None, cu_seqlens, z=z, U=U, cos=cos, sin=sin)
        if g < rotated and rope is not None:
            checked_rope_channels(x.shape, rope, None, packed=cu_seqlens is not None)
    return lowrank_projected(projection, list(ups), statics, width, residual, cu_seqlens, cos, sin,
                             rotated if rope is not None else 0)


def dynamic_convs_lowrank_swiglu(
    projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None = None, *, width: int,
    residual: bool = True,
) -> Tensor:
    """silu(gate) * up of two low-rank dynamic convs of one fused projection (see
    kernels.dynamic_convs_lowrank_swiglu): one op, which also returns the convs' outputs to save them
    for its backward."""
    check_lowrank_projected(projection, ups, statics, width, None, 0)
    if len(ups) != 2:
        raise ValueError(f"the SwiGLU takes two convs (gate, up); got {len(ups)}")
    statics = list(statics or [])
    for g, ((x, z), U) in enumerate(zip(_projected(projection, ups, width), ups)):
        _check(x, width, statics[g] if statics else None, None, z=z, U=U)
    return lowrank_projected_swiglu(projection, list(ups), statics, width, residual)[0]


def dynamic_conv_headwise(
    x: Tensor, w: Tensor, static: Tensor | None = None, *,
    residual: bool = True, cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Head-wise dynamic conv (see reference.dynamic_conv_headwise) on the Triton kernels."""
    B, T, D = _check_x(x)
    if w.ndim != 4 or w.shape[:2] != (B, T):
        raise ValueError(f"w must be [B, T, W, H]=({B}, {T}, W, H); got {tuple(w.shape)}")
    H = w.shape[-1]
    if D % H:
        raise ValueError(f"number of heads H={H} must divide D={D}")
    if D // H > MAX_HEAD_SIZE:
        raise ValueError(f"head size {D // H} exceeds the Triton kernels' maximum {MAX_HEAD_SIZE}")
    _check(x, w.shape[2], static, cu_seqlens, w=w)
    return _dispatch(headwise_conv, _eager_headwise_conv, x, w, static, residual, cu_seqlens)


def dynamic_convs_headwise(
    projection: Tensor, statics: list[Tensor] | None, *, channels: list[int], heads: list[int], width: int,
    residual: bool = True, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rotated: int = 0,
) -> list[Tensor]:
    """Head-wise dynamic convs of one fused projection (see kernels.dynamic_convs_headwise) on the
    Triton kernels: one op, whose backward writes the projection's gradient in place. The first
    `rotated` outputs come out rotated by rope, inside the op where the Gluon walks rotate in both
    passes (triton_headwise.rope_fuses), else by ops after it."""
    if len(heads) != len(channels) or any(h < 1 or c % h or c // h > MAX_HEAD_SIZE for c, h in zip(channels, heads)):
        raise ValueError(f"heads {heads} must divide channels {channels}, one count per conv, into heads of at "
                         f"most {MAX_HEAD_SIZE} channels")
    check_projected(projection, channels, [width * h for h in heads], statics, width)
    check_rotated(rope, rotated, len(channels))
    statics = list(statics or [])
    cos, sin = rope if rope is not None else (None, None)
    packed = cu_seqlens is not None
    inside = rope is not None
    for g, (x, w) in enumerate(_headwise_views(projection, channels, heads, width)):
        _check(x, width, statics[g] if statics else None, cu_seqlens, w=w, cos=cos, sin=sin)
        if g < rotated and rope is not None:
            checked_rope_channels(x.shape, rope, None, packed=packed)
            inside = inside and headwise_rope_fuses(x, w, rope, packed, width)
    ys = headwise_projected(projection, statics, list(channels), list(heads), width, residual, cu_seqlens,
                            *((cos, sin, rotated) if inside else (None, None, 0)))
    if inside or rope is None:
        return ys
    return [rotate_channels(y, rope) if g < rotated else y for g, y in enumerate(ys)]


def short_conv(
    x: Tensor, filters: Tensor | None, static: Tensor | None = None, *,
    residual: bool = False, cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Explicit per-position filters [B, T, W, D] and/or a static filter (see reference.short_conv)."""
    if filters is None:
        if static is None:
            raise ValueError("short_conv needs dynamic filters, a static filter, or both")
        return static_conv(x, static, residual=residual, cu_seqlens=cu_seqlens)
    if filters.shape[-1] != _check_x(x)[2]:
        raise ValueError(f"filters must be [B, T, W, D] with D={x.shape[-1]}; got {tuple(filters.shape)}")
    return dynamic_conv_headwise(x, filters, static, residual=residual, cu_seqlens=cu_seqlens)


def static_conv(
    x: Tensor, static: Tensor, *, residual: bool = False, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """Static depthwise causal conv with a [W, D] filter (see reference.static_conv). With rope =
    (cos, sin), the output's first rope_channels channels (default: all) come out rotated as
    attention rotates q and k (reference.rotate_channels): inside the Gluon walks where they rotate
    in both passes (triton_headwise.rope_fuses; training point 29), else by ops after the op."""
    _check_x(x)
    if static.ndim != 2:
        raise ValueError(f"static filter must be [W, D]; got {tuple(static.shape)}")
    _check(x, static.shape[0], static, cu_seqlens, **(dict(cos=rope[0], sin=rope[1]) if rope is not None else {}))
    if rope is None:
        return _dispatch(headwise_conv, _eager_headwise_conv, x, None, static, residual, cu_seqlens)
    channels = checked_rope_channels(x.shape, rope, rope_channels, packed=cu_seqlens is not None)
    if static_conv_rotates(x, static, rope, rope_channels=channels, cu_seqlens=cu_seqlens):
        return _dispatch(headwise_conv, _eager_headwise_conv, x, None, static, residual, cu_seqlens, *rope, channels)
    return rotate_channels(static_conv(x, static, residual=residual, cu_seqlens=cu_seqlens), rope, channels)


def static_conv_rotates(x: Tensor, static: Tensor, rope: tuple[Tensor, Tensor], *, rope_channels: int | None = None,
                        cu_seqlens: Tensor | None = None) -> bool:
    """Whether static_conv rotates by rope inside the Gluon walks (triton_headwise.rope_fuses)."""
    channels = rotated_channels(x.shape, rope, rope_channels)
    return headwise_rope_fuses(x, None, rope, cu_seqlens is not None, static.shape[0], channels)


def _check_step(x_t: Tensor, state: Tensor, static: Tensor | None, **inputs: Tensor | None) -> int:
    if x_t.ndim != 2 or state.ndim != 3 or state.shape[0] != x_t.shape[0] or state.shape[2] != x_t.shape[1]:
        raise ValueError(f"x_t must be [B, D] and state [B, W-1, D]; got {tuple(x_t.shape)} and {tuple(state.shape)}")
    width = state.shape[1] + 1
    _check(x_t[:, None], width, static, None, state=state, **inputs)
    return width


def dynamic_conv_lowrank_step(
    x_t: Tensor, state: Tensor, z_t: Tensor, U: Tensor, static: Tensor | None = None, *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step (see reference.dynamic_conv_lowrank_step); no autograd."""
    width = _check_step(x_t, state, static, z_t=z_t, U=U)
    B, D = x_t.shape
    if z_t.shape[0] != B or z_t.ndim != 2 or U.shape != (z_t.shape[1], width * D):
        raise ValueError(f"z_t must be [B={B}, R] and U [R, W*D={width * D}]; got {tuple(z_t.shape)} and {tuple(U.shape)}")
    return _dispatch(conv_step, _conv_step_contiguous, x_t, state, z_t, U, None, static, residual)


def dynamic_conv_headwise_step(
    x_t: Tensor, state: Tensor, w_t: Tensor, static: Tensor | None = None, *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step (see reference.dynamic_conv_headwise_step); no autograd."""
    width = _check_step(x_t, state, static, w_t=w_t)
    B, D = x_t.shape
    if w_t.ndim != 3 or w_t.shape[:2] != (B, width) or D % w_t.shape[2]:
        raise ValueError(f"w_t must be [B={B}, W={width}, H] with H dividing D={D}; got {tuple(w_t.shape)}")
    return _dispatch(conv_step, _conv_step_contiguous, x_t, state, None, None, w_t, static, residual)


def static_conv_step(
    x_t: Tensor, state: Tensor, static: Tensor, *, residual: bool = False
) -> tuple[Tensor, Tensor]:
    """One decode step of the static conv (see reference.static_conv_step); no autograd."""
    _check_step(x_t, state, static)
    return _dispatch(conv_step, _conv_step_contiguous, x_t, state, None, None, None, static, residual)
