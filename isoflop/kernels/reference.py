"""The dynamic short convolution, in plain PyTorch. This file is the specification.

    y[t] = residual * x[t] + sum_{k=0}^{W-1} (w_t[k] + s[k]) * x[t-k]

Tap k is lag k (tap 0 is the current token; the reverse of nn.Conv1d's weight order). w_t are the
per-position dynamic filters, s the optional static filter, both depthwise (one value per channel
and tap). Inputs before a sequence start are zero. Everything is batch-first [B, T, D] and
accumulates in float32 (float64 for float64 inputs) whatever the input dtype; the output has x's
dtype.

Filters come in two parameterisations, matching the paper:
- low-rank: w_t = reshape(z_t @ U, [W, D]) with z [B, T, R], U [R, W*D] (tap-major: U[:, k*D + d]);
  with z [B, T, G*R], G groups of D/G consecutive channels are separate low-rank convs, each with
  its own R columns of z (several convs of one fused projection, e.g. q, k and v, as one call);
- head-wise: one generated tap per group of `head_size` consecutive channels,
  w [B, T, W, H] with H = D / head_size, broadcast to the group's channels.

Packed variable-length batches: B == 1 and cu_seqlens [N+1] (int, starting at 0, ending at T) marks
document boundaries; no filter reaches across one.

Rotary position embedding (RoPE) fused into the low-rank conv: with rope = (cos, sin) [T, hd/2]
(float32, the angles of each row), the first `rope_channels` output channels (all by default), in
heads of hd channels, are rotated as attention rotates q and k: pairs (i, i + hd/2) (Llama's
layout), in float32 from the output rounded to x's dtype. On Hopper the conv's forward kernel then
rotates each tile before it stores it, instead of a separate kernel reading and writing q and k
again (benchmarks/KERNELS.md, v31). Without cu_seqlens the rows must be positions 0 to T-1
(check_rope_from_zero): that kernel forms a time's angles as the sum of two rows' (v32), so its
cos and sin differ from the tables' by the rounding of float32 angles (~t * 2^-24 radians).

Decode: `*_step` functions take one token x_t [B, D] and a rolling state [B, W-1, D] holding the
previous W-1 inputs, oldest first (state[:, -1] is x[t-1]); they return (y_t, new_state).
"""

from __future__ import annotations

import torch
from torch import Tensor


def positions_in_sequence(T: int, cu_seqlens: Tensor | None, device: torch.device) -> Tensor:
    """Index of each of T positions within its own sequence ([T], int64)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    # The checks read values back to the host: compiled code and CUDA-graph capture skip them
    # rather than break.
    if not (torch.compiler.is_compiling() or _capturing(cu)):
        check_cu_seqlens(cu, T)
    seq_of_t = torch.searchsorted(cu, t, right=True) - 1
    return t - cu[seq_of_t]


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens(cu_seqlens: Tensor, T: int) -> None:
    cu = cu_seqlens
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu.tolist()}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64 (gradcheck needs it)."""
    return torch.promote_types(dtype, torch.float32)


def _lagged(x: Tensor, k: int, pos: Tensor) -> Tensor:
    """x[t-k] with zeros where t-k falls before the start of t's sequence."""
    if k == 0:
        return x
    shifted = torch.nn.functional.pad(x, (0, 0, k, 0))[:, : x.shape[1]]
    return shifted * (pos >= k).to(x.dtype)[None, :, None]


def short_conv(
    x: Tensor,
    filters: Tensor | None,
    static: Tensor | None = None,
    *,
    residual: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The operator with explicit per-position, per-channel filters [B, T, W, D] (or None)."""
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D]; got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if filters is None and static is None:
        raise ValueError("short_conv needs dynamic filters, a static filter, or both")
    W = filters.shape[2] if filters is not None else static.shape[0]
    if filters is not None and filters.shape != (B, T, W, D):
        raise ValueError(f"filters must be [B, T, W, D]=({B}, {T}, W, {D}); got {tuple(filters.shape)}")
    if static is not None and static.shape != (W, D):
        raise ValueError(f"static filter must be [W, D]=({W}, {D}); got {tuple(static.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need B == 1; got B={B}")
    pos = positions_in_sequence(T, cu_seqlens, x.device)
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    y = xf.clone() if residual else torch.zeros_like(xf)
    for k in range(W):
        tap = torch.zeros((), device=x.device, dtype=acc)
        if filters is not None:
            tap = filters[:, :, k].to(acc)
        if static is not None:
            tap = tap + static[k].to(acc)
        y = y + tap * _lagged(xf, k, pos)
    return y.to(x.dtype)


def lowrank_filters(z: Tensor, U: Tensor, width: int) -> Tensor:
    """[B, T, R] @ [R, W*D] -> [B, T, W, D], in the accumulation dtype."""
    B, T, R = z.shape
    if U.ndim != 2 or U.shape[0] != R or U.shape[1] % width:
        raise ValueError(f"U must be [R={R}, W*D] with W={width}; got {tuple(U.shape)}")
    acc = accumulation_dtype(z.dtype)
    return (z.to(acc) @ U.to(acc)).view(B, T, width, U.shape[1] // width)


def headwise_filters(w: Tensor, head_size: int) -> Tensor:
    """[B, T, W, H] -> [B, T, W, H*head_size], each head's tap repeated over its channels."""
    return w.to(accumulation_dtype(w.dtype)).repeat_interleave(head_size, dim=-1)


def rotate_heads(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """x [..., T, H, hd] rotated by the angles of its rows, cos and sin [T, hd/2] (pairs (i, i +
    hd/2)), in float32 (float64 for float64 x), in x's dtype; `inverse` rotates back (what the
    rotation's gradient does)."""
    acc = accumulation_dtype(x.dtype)
    cos, sin = cos.to(acc)[:, None, :], (-sin if inverse else sin).to(acc)[:, None, :]  # the same for every head
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rotated_channels(shape: tuple[int, ...], rope: tuple[Tensor, Tensor], channels: int | None) -> int:
    """How many leading channels of a [B, T, D] output `rope` rotates (D if `channels` is None),
    after checking that its tables fit: a ValueError says what they must be."""
    cos, sin = rope
    T, D = shape[1], shape[2]
    channels = D if channels is None else channels
    ok = cos.ndim == 2 and cos.shape == sin.shape and cos.shape[0] == T and cos.shape[1] > 0
    if not ok or channels % (2 * cos.shape[-1]) or not 0 <= channels <= D:
        raise ValueError(f"rope (cos, sin) must be [T={T}, head_dim/2] each and rotate whole heads of the first "
                         f"{channels} of D={D} channels; got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return channels


def checked_rope_channels(shape: tuple[int, ...], rope: tuple[Tensor, Tensor], channels: int | None,
                          packed: bool) -> int:
    """rotated_channels for a conv's rope argument, whose tables must also be of positions 0 to T-1
    unless the sequences are packed (check_rope_from_zero): what both dynamic_conv_lowrank check."""
    channels = rotated_channels(shape, rope, channels)
    if not packed:
        check_rope_from_zero(*rope)
    return channels


def check_projected(projection: Tensor, channels: list[int], generated: list[int], statics: list[Tensor] | None,
                    width: int) -> None:
    """ValueError unless a fused projection fits the convs that read it (dynamic_convs_lowrank,
    dynamic_convs_headwise): [B, T, C] whose C columns are each conv's `channels`, then each one's
    `generated` columns (its generator's output), and one static filter [W, C_g] per conv or none."""
    if projection.ndim != 3:
        raise ValueError(f"the projection must be [B, T, C]; got shape {tuple(projection.shape)}")
    if width < 1 or not channels:
        raise ValueError(f"width={width}, {len(channels)} convs: at least one conv of at least one tap")
    if projection.shape[-1] != sum(channels) + sum(generated):
        raise ValueError(f"the projection has {projection.shape[-1]} columns; {len(channels)} convs of {channels} "
                         f"channels whose generators give {generated} columns take {sum(channels) + sum(generated)} "
                         "(their inputs, then each one's generator output)")
    if statics and [tuple(s.shape) for s in statics] != [(width, c) for c in channels]:
        raise ValueError(f"statics: one [W, C_g] filter per conv (W={width}, C_g in {channels}) or none; got "
                         f"{[tuple(s.shape) for s in statics]}")


def check_lowrank_projected(projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None, width: int,
                            rope: tuple[Tensor, Tensor] | None, rotated: int) -> None:
    """check_projected for dynamic_convs_lowrank: one R for all ups [R, W*C_g], and with rope 1 to G
    rotated convs."""
    if width < 1 or not ups or any(U.ndim != 2 or U.shape[0] != ups[0].shape[0] or U.shape[1] % width
                                   or U.shape[1] == 0 for U in ups):
        raise ValueError(f"ups must be one or more [R, W*C_g] with one R and W={width}; got "
                         f"{[tuple(U.shape) for U in ups]}")
    check_projected(projection, [U.shape[1] // width for U in ups], [U.shape[0] for U in ups], statics, width)
    check_rotated(rope, rotated, len(ups))


def check_rotated(rope: tuple[Tensor, Tensor] | None, rotated: int, convs: int) -> None:
    """ValueError unless, with rope, the first 1 to `convs` convs of a projection come out rotated."""
    if rope is not None and not 0 < rotated <= convs:
        raise ValueError(f"rotated={rotated}: with rope, the first 1 to {convs} convs come out rotated")


ROPE_BLOCK = 64  # what the Gluon forward composes a time's angles from: its block's first time and its offset


def check_rope_from_zero(cos: Tensor, sin: Tensor) -> None:
    """ValueError unless cos and sin [T, hd/2] are the angles of positions 0, 1, ..., T-1 (linear
    in t, as attention's rope_angles(arange(T)) makes them), what an unpacked conv's rope must be.
    The Gluon forward that rotates its output takes row t = 64n + i as the sum of rows 64n and i
    (256 bytes of tables read per 64 times instead of 16 KB), which only such tables allow. Checked
    where it is free (tables on the CPU, not while torch.compile traces); on a GPU it would cost a
    host sync, so there the caller's tables are trusted."""
    if cos.device.type != "cpu" or torch.compiler.is_compiling():
        return
    T = cos.shape[0]
    t = torch.arange(T, device=cos.device)
    base, offset = t - t % ROPE_BLOCK, t % ROPE_BLOCK
    c, s = cos.double(), sin.double()
    composed = (c[base] * c[offset] - s[base] * s[offset], s[base] * c[offset] + c[base] * s[offset])
    # The sum's angle differs from the table's by the rounding of float32 angles (up to ~t * 2^-24 each).
    tolerance = 4 * T * 2.0**-23 + 1e-6
    error = max((composed[0] - c).abs().max().item(), (composed[1] - s).abs().max().item()) if T else 0.0
    if error > tolerance:
        raise ValueError(f"rope (cos, sin) must be the angles of positions 0, 1, ..., T-1 (as rope_angles(arange(T)) "
                         f"makes them): row 64n + i must be rows 64n and i summed, but differs by {error:.3g}")


def rotate_channels(y: Tensor, rope: tuple[Tensor, Tensor], channels: int | None = None,
                    inverse: bool = False) -> Tensor:
    """y [B, T, D] with its first `channels` channels (all if None) rotated in heads of hd = 2 *
    cos.shape[-1] channels (rotate_heads); the others unchanged."""
    cos, sin = rope
    channels = rotated_channels(y.shape, rope, channels)
    head_dim = 2 * cos.shape[-1]
    if channels == 0:
        return y
    rotated = rotate_heads(y[..., :channels].unflatten(-1, (channels // head_dim, head_dim)), cos, sin, inverse)
    return torch.cat([rotated.flatten(-2), y[..., channels:]], dim=-1) if channels < y.shape[-1] else rotated.flatten(-2)


def lowrank_groups(z: Tensor, U: Tensor, D: int) -> int:
    """G for z [B, T, G*R] and U [R, W*D]: G groups of D/G channels, each with its own R columns of
    z. ValueError unless U has R >= 1 rows, z holds G >= 1 whole R-column slices and G divides D."""
    R = U.shape[0] if U.ndim == 2 else 0
    groups = z.shape[-1] // R if R else 0
    if groups == 0 or z.shape[-1] % R or D % groups:
        raise ValueError(f"z's last dimension ({z.shape[-1]}) must be G*R with R={R} (U's rows) and G dividing "
                         f"D={D}; U is {tuple(U.shape)}")
    return groups


def dynamic_conv_lowrank(
    x: Tensor,
    z: Tensor,
    U: Tensor,
    static: Tensor | None = None,
    *,
    residual: bool = True,
    cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_channels: int | None = None,
) -> Tensor:
    """Low-rank dynamic conv: x [B, T, D], z [B, T, R], U [R, W*D], static [W, D] or None; with
    `rope`, then rotated (rotate_channels; see the module's docstring).

    With z [B, T, G*R], the channels form G groups of D/G consecutive channels, and group g is the
    low-rank conv of its channels with z[..., g*R:(g+1)*R] and its slice of U and static (U's
    taps stay tap-major over all D channels: U[:, k*D + d])."""
    if rope is not None:
        channels = checked_rope_channels(x.shape, rope, rope_channels, packed=cu_seqlens is not None)
        y = dynamic_conv_lowrank(x, z, U, static, residual=residual, cu_seqlens=cu_seqlens)
        return rotate_channels(y, rope, channels)
    D = x.shape[-1]
    width = U.shape[1] // D
    groups, R = lowrank_groups(z, U, D), U.shape[0]
    if groups > 1:
        size = D // groups
        taps = U.view(R, width, groups, size)
        return torch.cat([
            dynamic_conv_lowrank(
                x[..., g * size:(g + 1) * size], z[..., g * R:(g + 1) * R], taps[:, :, g].reshape(R, width * size),
                static[:, g * size:(g + 1) * size] if static is not None else None,
                residual=residual, cu_seqlens=cu_seqlens,
            )
            for g in range(groups)
        ], dim=-1)
    return short_conv(
        x, lowrank_filters(z, U, width), static, residual=residual, cu_seqlens=cu_seqlens
    )


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up computed in float32 and rounded once to gate's type, as torch.compile computes
    it (and the fused SwiGLU kernel, gluon_lowrank_swiglu, matches)."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def dynamic_conv_headwise(
    x: Tensor,
    w: Tensor,
    static: Tensor | None = None,
    *,
    residual: bool = True,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Head-wise dynamic conv: x [B, T, D], w [B, T, W, H] with H dividing D."""
    D, H = x.shape[-1], w.shape[-1]
    if D % H:
        raise ValueError(f"number of heads H={H} must divide D={D}")
    return short_conv(
        x, headwise_filters(w, D // H), static, residual=residual, cu_seqlens=cu_seqlens
    )


def static_conv(
    x: Tensor, static: Tensor, *, residual: bool = False, cu_seqlens: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None, rope_channels: int | None = None,
) -> Tensor:
    """Static depthwise causal conv with a [W, D] filter (tap k = lag k); with `rope`, its output's
    first rope_channels channels (all if None) then rotated (as dynamic_conv_lowrank's rope)."""
    y = short_conv(x, None, static, residual=residual, cu_seqlens=cu_seqlens)
    if rope is None:
        return y
    return rotate_channels(y, rope, checked_rope_channels(x.shape, rope, rope_channels, packed=cu_seqlens is not None))


# ---------------------------------------------------------------------------------------------
# Single-token decode with a rolling state of the last W-1 inputs.


def _step(
    x_t: Tensor, state: Tensor, taps: Tensor, residual: bool
) -> tuple[Tensor, Tensor]:
    """taps [B, W, D] in the accumulation dtype (dynamic + static summed); state [B, W-1, D], oldest first."""
    W = taps.shape[1]
    if state.shape[1] != W - 1:
        raise ValueError(f"state must hold W-1={W - 1} inputs; got {tuple(state.shape)}")
    # history[:, k] = x[t-k]: the current token first, then the state newest first.
    acc = taps.dtype
    history = torch.cat([x_t[:, None], state.flip(1)], dim=1).to(acc)
    y = (taps * history).sum(1)
    if residual:
        y = y + x_t.to(acc)
    new_state = torch.cat([state, x_t[:, None].to(state.dtype)], dim=1)[:, 1:]
    return y.to(x_t.dtype), new_state


def _with_static(taps: Tensor, static: Tensor | None) -> Tensor:
    return taps if static is None else taps + static.to(taps.dtype)


def dynamic_conv_lowrank_step(
    x_t: Tensor, state: Tensor, z_t: Tensor, U: Tensor, static: Tensor | None = None,
    *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step: x_t [B, D], state [B, W-1, D], z_t [B, R]."""
    B, D = x_t.shape
    acc = accumulation_dtype(x_t.dtype)
    taps = (z_t.to(acc) @ U.to(acc)).view(B, -1, D)
    return _step(x_t, state, _with_static(taps, static), residual)


def dynamic_conv_headwise_step(
    x_t: Tensor, state: Tensor, w_t: Tensor, static: Tensor | None = None,
    *, residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step: x_t [B, D], state [B, W-1, D], w_t [B, W, H]."""
    D, H = x_t.shape[-1], w_t.shape[-1]
    taps = w_t.to(accumulation_dtype(x_t.dtype)).repeat_interleave(D // H, dim=-1)
    return _step(x_t, state, _with_static(taps, static), residual)


def static_conv_step(
    x_t: Tensor, state: Tensor, static: Tensor, *, residual: bool = False
) -> tuple[Tensor, Tensor]:
    taps = static.to(accumulation_dtype(x_t.dtype))[None].expand(x_t.shape[0], -1, -1)
    return _step(x_t, state, taps, residual)


def initial_state(x: Tensor, width: int) -> Tensor:
    """Decode state after a prompt x [B, T, D]: its last W-1 inputs, zero-padded on the left."""
    B, T, D = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, max(0, width - 1 - T), 0))
    return padded[:, padded.shape[1] - (width - 1):]
