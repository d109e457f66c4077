"""Short causal convolutions as modules: static, and dynamic (low-rank or head-wise filters).

The arithmetic lives in `isoflop.kernels` (reference spec + fast kernels picked by device); these
modules only own the parameters and call the ops through `kernels.<op>` at call time, so a backend
registered later is used without touching this file.

Every conv here is residual, `X <- X + conv(X)`, including the static one: static and dynamic then
differ only by the input-dependent part of the filter, and a dynamic conv at initialisation
(generator output exactly zero) is exactly a residual static conv with filter `bias`.

Filters are [W, channels] with tap k = lag k (tap 0 is the current token), the reverse of
nn.Conv1d's weight order. Static filters and the dynamic convs' static bias are marked
`_no_weight_decay`: decaying them would pull the conv towards the identity, not towards "no
feature", which is what weight decay on a matrix means.

Fused projections: a dynamic conv's generator starts with a map of the linear's input h (`down`
or `proj`, `generator_input`), and linears of one block often read the same h (q, k, v; gate, up).
`LinearConvs.project` computes those linears and their convs' generator inputs in one matmul over
the concatenated weights; the convs then take the result as `z` instead of h. The parameters stay
separate modules (same init, counts, weight-decay marks and state-dict keys), so the fused model is
the unfused one computed in fewer, larger matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isoflop import kernels
from isoflop.backends import BackendChoice
from isoflop.models.config import ConvSpec

# Whether compiled blocks run the dynamic convs of one fused projection as one op that writes the
# projection's gradient in place ("auto", LinearConvs._run_projected) or one op per conv on the
# projection's split views ("off"), whose gradients a compiled kernel then concatenates.
PROJECTED = BackendChoice("ISOFLOP_PROJECTED_CONVS", ("auto", "off"), "fused projection's dynamic conv setting")
# Whether compiled SwiGLU MLPs with low-rank convs on gate and up run both convs and the SwiGLU as
# one op whose kernel forms the SwiGLU from the convs' outputs in registers ("auto", where
# kernels.swiglu_fuses: the Hopper kernel takes them) or the convs' op and then the compiled SwiGLU
# ("off"). KERNELS.md, training point 33.
SWIGLU = BackendChoice("ISOFLOP_SWIGLU_CONVS", ("auto", "off"), "gate/up convs with their SwiGLU setting")


def _uniform_filter(width: int, channels: int) -> nn.Parameter:
    """A [W, channels] filter, uniform in +-1/sqrt(W) (the fan-in of one output channel is W)."""
    bound = 1.0 / math.sqrt(width)
    weight = nn.Parameter(torch.empty(width, channels).uniform_(-bound, bound))
    weight._no_weight_decay = True
    return weight


def _as_kernels_take(*inputs: Tensor) -> tuple[Tensor, ...]:
    """The conv's inputs as the kernels should get them. They are often views into a fused
    projection's output (LinearConvs.project), which the kernels read in place, eager or compiled:
    the ops take any layout, so Inductor need not copy its padded buffers (ops._takes_any_layout;
    KERNELS.md, training points 13 and 14). Where torch cannot say so, Inductor would copy each
    view and the backward's saved x once more: one copy here costs less."""
    if torch.compiler.is_compiling() and not kernels.CONV_OPS_TAKE_ANY_LAYOUT:
        return tuple(t.contiguous() for t in inputs)
    return inputs


class StaticShortConv(nn.Module):
    """y = x + sum_k weight[k] * x[t-k]: a depthwise causal conv with one learned filter."""

    def __init__(self, channels: int, width: int, residual: bool = True) -> None:
        super().__init__()
        self.channels, self.width, self.residual = channels, width, residual
        self.weight = _uniform_filter(width, channels)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.width)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """x [B, T, channels] -> [B, T, channels]."""
        (x,) = _as_kernels_take(x)
        return kernels.static_conv(x, self.weight, residual=self.residual, cu_seqlens=cu_seqlens)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One decode token x_t [B, channels]; state [B, W-1, channels] holds the previous inputs."""
        return kernels.static_conv_step(x_t, state, self.weight, residual=self.residual)

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device, dtype=dtype)


class DynamicShortConv(nn.Module):
    """A causal depthwise conv whose filter at position t is generated from h_t (affine in h_t).

    kind='lowrank': w_t = reshape(down(h_t) @ up, [W, channels]) + bias, with `down` a
      Linear(in_features -> rank), `up` [rank, W*channels] (tap-major) starting at zero.
    kind='headwise': w_t = reshape(proj(h_t), [W, H]) broadcast over each head's `head_size`
      consecutive channels, + bias; `proj` is Linear(in_features -> W*H) starting at zero,
      its output tap-major (index k*H + h).

    `bias` [W, channels] is the static part of the filter. The generator's last map starts at zero
    so the layer starts as exactly a residual static conv (the paper's choice); `down` gets the
    model's usual normal(0, init_std) init so that gradients reach `up` from the first step.
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        width: int,
        kind: str = "lowrank",
        rank: int = 16,
        head_size: int = 16,
        residual: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if kind not in ("lowrank", "headwise"):
            raise ValueError(f"DynamicShortConv kind={kind!r}; allowed: lowrank, headwise")
        if kind == "headwise" and channels % head_size:
            raise ValueError(
                f"head_size={head_size} must divide the convolved channels ({channels})"
            )
        self.in_features, self.channels, self.width = in_features, channels, width
        self.kind, self.residual, self.init_std = kind, residual, init_std
        if kind == "lowrank":
            self.rank = rank
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Parameter(torch.empty(rank, width * channels))
        else:
            self.head_size = head_size
            self.n_heads = channels // head_size
            self.proj = nn.Linear(in_features, width * self.n_heads, bias=False)
        self.bias = _uniform_filter(width, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.width)
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)
            if self.kind == "lowrank":
                self.down.weight.normal_(0.0, self.init_std)
                self.up.zero_()
            else:
                self.proj.weight.zero_()

    @property
    def generator_input(self) -> nn.Linear:
        """The generator's map of h: `down` (in_features -> rank) or `proj` (in_features -> W*H)."""
        return self.down if self.kind == "lowrank" else self.proj

    def forward(
        self, x: Tensor, h: Tensor | None, cu_seqlens: Tensor | None = None, *,
        z: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x [B, T, channels] is filtered; h [B, T, in_features] generates the filters, or
        z = generator_input(h) [B, T, rank or W*H] when the caller has computed it already. With
        rope = (cos, sin), the output comes out rotated as attention rotates q and k (low-rank: by
        kernels.dynamic_conv_lowrank's kernel where it can; head-wise: by ops after the conv, as
        eager calls run it; compiled calls take _run_projected's fused op)."""
        z = self.generator_input(h) if z is None else z
        x, z = _as_kernels_take(x, z)
        if self.kind == "lowrank":
            return kernels.dynamic_conv_lowrank(
                x, z, self.up, self.bias, residual=self.residual, cu_seqlens=cu_seqlens, rope=rope
            )
        y = kernels.dynamic_conv_headwise(
            x, self._taps(z), self.bias, residual=self.residual, cu_seqlens=cu_seqlens
        )
        return y if rope is None else kernels.reference.rotate_channels(y, rope)

    def step(
        self, x_t: Tensor, h_t: Tensor | None, state: Tensor, *, z_t: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One decode token: x_t [B, channels], h_t [B, in_features] (or its projection z_t),
        state [B, W-1, channels]."""
        z_t = self.generator_input(h_t) if z_t is None else z_t
        if self.kind == "lowrank":
            return kernels.dynamic_conv_lowrank_step(
                x_t, state, z_t, self.up, self.bias, residual=self.residual
            )
        return kernels.dynamic_conv_headwise_step(
            x_t, state, self._taps(z_t), self.bias, residual=self.residual
        )

    def _taps(self, z: Tensor) -> Tensor:
        """The head-wise generator's output [..., W*H] -> [..., W, H] (tap-major)."""
        return z.unflatten(-1, (self.width, self.n_heads))

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device, dtype=dtype)


ShortConv = StaticShortConv | DynamicShortConv


def make_short_conv(
    spec: ConvSpec, in_features: int, channels: int, init_std: float = 0.02
) -> ShortConv | None:
    """The conv that `spec` asks for after a linear (in_features -> channels), or None."""
    if spec.kind == "none":
        return None
    if spec.kind == "static":
        return StaticShortConv(channels, spec.width)
    kind = {"dynamic-lowrank": "lowrank", "dynamic-headwise": "headwise"}[spec.kind]
    return DynamicShortConv(
        in_features, channels, spec.width, kind=kind, rank=spec.rank,
        head_size=spec.head_size, init_std=init_std,
    )


class LinearConvs(nn.ModuleDict):
    """The short convs that follow some of a block's linears, keyed by the linear's name.

    `run(name, y, h)` filters the linear's output y with its conv (generator input h, the linear's
    input) or returns y unchanged when that linear has no conv, so blocks read the same whatever
    the placement. `project(h, linears)` runs linears that read the same h, and the generator
    input maps of their dynamic convs, as one matmul; `run(name, y, h, z=z)` then uses its z.
    """

    def __init__(
        self, spec: ConvSpec, shapes: dict[str, tuple[int, int]], init_std: float = 0.02
    ) -> None:
        """shapes: linear name -> (in_features, out_features) for every linear of the block."""
        convs = {
            name: make_short_conv(spec, in_features, out_features, init_std)
            for name, (in_features, out_features) in shapes.items()
            if name in spec.linears
        }
        super().__init__(convs)

    def project(
        self, h: Tensor, linears: dict[str, nn.Linear]
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """name -> (linears[name](h), its dynamic conv's generator_input(h) or None), all from
        one matmul of h with the weights concatenated (one read of h, one larger GEMM instead of
        several small ones), then split. Works on any leading shape (training or one decode
        token). The weights are concatenated on every call: a copy of a few MB, against a matmul
        over every token of the batch."""
        names = list(linears)
        generated = self._generated(names)
        weights = self._stacked_weights(linears)
        if len(weights) == 1:
            return {names[0]: (linears[names[0]](h), None)}
        parts = F.linear(h, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
        z = dict(zip(generated, parts[len(names):]))
        return {n: (y, z.get(n)) for n, y in zip(names, parts)}

    def _generated(self, names: list[str]) -> list[str]:
        """Those of `names` whose conv is dynamic (generates its filters from h)."""
        return [n for n in names if n in self and isinstance(self[n], DynamicShortConv)]

    def _stacked_weights(self, linears: dict[str, nn.Linear]) -> list[Tensor]:
        """The weights of `linears`, then their dynamic convs' generator maps: the order in which
        one fused matmul's output is split (`project`, and the grouped convs of `project_and_run`)."""
        return ([linear.weight for linear in linears.values()]
                + [self[n].generator_input.weight for n in self._generated(list(linears))])

    def run(
        self, name: str, y: Tensor, h: Tensor | None, cu_seqlens: Tensor | None = None, *,
        z: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The conv of linear `name` on its output y; a dynamic conv's filters come from z when
        given (see `project`), otherwise from h. With `rope`, the output comes out rotated (only
        for the dynamic convs of `rotates`)."""
        if name not in self:
            return y
        conv = self[name]
        if isinstance(conv, DynamicShortConv):
            return conv(y, h, cu_seqlens, z=z, rope=rope)
        return conv(y, cu_seqlens)

    def rotates(self, names: tuple[str, ...]) -> bool:
        """Whether the convs of `names` can rotate their outputs (RoPE) in the conv's kernels instead
        of a separate pass over them: every linear has a dynamic conv (low-rank: KERNELS.md v31, v33;
        head-wise: v34), or every one a static conv, which rotate in their group's one call
        (project_and_run; training point 29)."""
        kinds = {type(self[n]) if n in self else None for n in names}
        return len(kinds) == 1 and kinds <= {DynamicShortConv, StaticShortConv}

    def step(
        self, name: str, y_t: Tensor, h_t: Tensor | None, states: dict[str, Tensor], *,
        z_t: Tensor | None = None,
    ) -> Tensor:
        """One decode token; replaces states[name] with the conv's new state."""
        if name not in self:
            return y_t
        conv = self[name]
        if isinstance(conv, DynamicShortConv):
            y_t, states[name] = conv.step(y_t, h_t, states[name], z_t=z_t)
        else:
            y_t, states[name] = conv.step(y_t, states[name])
        return y_t

    def project_and_run(
        self, h: Tensor, linears: dict[str, nn.Linear], cu_seqlens: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None, rotated: tuple[str, ...] = (),
    ) -> list[Tensor]:
        """The outputs of `linears` (all reading h), each through its conv, from one matmul; those
        named in `rotated` (the first of `linears`, whose convs `rotates`) come out rotated by `rope`.

        When every one of them has a static conv (one width, one residual), the convs run as one
        conv over the matmul's whole output: a depthwise conv over concatenated channels with
        concatenated filters is the separate convs, without copying each split view for its own
        call (see StaticShortConv.forward) and with one call instead of several; the rotated ones'
        channels (the first) come out rotated by that call where its kernels can
        (kernels.static_conv_rotates), else each output on its own after it. Low-rank dynamic
        convs of one shape run as one call the same way in eager code: z then holds one R-column
        slice per linear (kernels.dynamic_conv_lowrank's channel groups)."""
        if rotated and (list(linears)[:len(rotated)] != list(rotated) or not self.rotates(rotated)):
            raise ValueError(f"rotated={rotated}: must be the first of {list(linears)}, each with a dynamic conv "
                             "or all with static convs")
        static = self._static_group(list(linears))
        if static is not None:
            y = F.linear(h, torch.cat(self._stacked_weights(linears)))
            weight = torch.cat([conv.weight for conv in static], dim=1)
            channels = sum(conv.channels for conv in static[:len(rotated)])
            inside = bool(rotated) and kernels.static_conv_rotates(y, weight, rope, rope_channels=channels,
                                                                   cu_seqlens=cu_seqlens)
            y = kernels.static_conv(y, weight, residual=static[0].residual, cu_seqlens=cu_seqlens,
                                    rope=rope if inside else None, rope_channels=channels)
            outs = list(y.split([conv.channels for conv in static], dim=-1))
            if rotated and not inside:  # each rotated output on its own: no copy of the others
                outs[:len(rotated)] = [kernels.reference.rotate_channels(out, rope) for out in outs[:len(rotated)]]
            return outs
        if rotated and not isinstance(self[rotated[0]], DynamicShortConv):
            raise ValueError(f"rotated={rotated}: static convs rotate only as one group of one width and residual")
        # Eager small models are bound by host time per call: q/k/v as one call took a d128-l3
        # step from x1.60 to x1.36 the transformer's. Compiled, one launch per low-rank conv was
        # faster at 300M (+10.3% vs +10.9% for one launch, on copies) and keeps 2 GiB less (attention
        # keeps v, a view of the one launch's whole output); the launches, low-rank or head-wise,
        # run inside one op that reads its views in place and writes the projection's gradient.
        if torch.compiler.is_compiling():
            group = self._projected_group(list(linears))
            if group is not None:
                return self._run_projected(h, linears, group, cu_seqlens, rope, len(rotated))
        else:
            lowrank = self._lowrank_group(list(linears))
            if lowrank is not None:
                return self._run_lowrank_group(h, linears, lowrank, cu_seqlens, rope, len(rotated))
        projected = self.project(h, linears)
        return [self.run(name, y, h, cu_seqlens, z=z, rope=rope if name in rotated else None)
                for name, (y, z) in projected.items()]

    def project_and_swiglu(
        self, h: Tensor, gate: nn.Linear, up: nn.Linear, cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """silu(gate(h)) * up(h), each linear through its conv, from one matmul. Compiled, with low-rank
        convs on both that the Hopper kernel takes (SWIGLU "auto"), one op forms the convs and the
        SwiGLU, which never reads the convs' outputs back (kernels.dynamic_convs_lowrank_swiglu);
        elsewhere the convs run as project_and_run runs them and the SwiGLU after them."""
        linears = {"gate": gate, "up": up}
        if torch.compiler.is_compiling() and SWIGLU.get() == "auto" and cu_seqlens is None:
            convs = self._projected_group(list(linears))
            if convs is not None and convs[0].kind == "lowrank":  # (swiglu_fuses checks their shapes)
                projection = F.linear(h, torch.cat(self._stacked_weights(linears)))
                ups = [conv.up for conv in convs]
                if kernels.swiglu_fuses(projection, ups, convs[0].width):
                    return kernels.dynamic_convs_lowrank_swiglu(projection, ups, [conv.bias for conv in convs],
                                                                width=convs[0].width, residual=convs[0].residual)
        gate_out, up_out = self.project_and_run(h, linears, cu_seqlens)
        return F.silu(gate_out) * up_out

    def _run_lowrank_group(
        self, h: Tensor, linears: dict[str, nn.Linear], convs: list[DynamicShortConv],
        cu_seqlens: Tensor | None, rope: tuple[Tensor, Tensor] | None, n_rotated: int,
    ) -> list[Tensor]:
        """One matmul for the linears and their generators' D->R maps, then one conv whose channel
        group g (linear g's outputs) takes its filters from z's g-th R columns; x and z are read
        in place from the matmul's output. The first `n_rotated` groups come out rotated by rope."""
        rank, width = convs[0].rank, convs[0].width
        channels = sum(conv.channels for conv in convs)
        x, z = F.linear(h, torch.cat(self._stacked_weights(linears))).split([channels, len(convs) * rank], dim=-1)
        # U[:, k*D + d] over the concatenated channels: each conv's [R, W, C] taps side by side.
        up = torch.cat([conv.up.view(rank, width, conv.channels) for conv in convs], dim=2).flatten(1)
        bias = torch.cat([conv.bias for conv in convs], dim=1)
        y = kernels.dynamic_conv_lowrank(x, z, up, bias, residual=convs[0].residual, cu_seqlens=cu_seqlens,
                                         rope=rope if n_rotated else None,
                                         rope_channels=sum(conv.channels for conv in convs[:n_rotated]))
        return list(y.split([conv.channels for conv in convs], dim=-1))

    def _run_projected(
        self, h: Tensor, linears: dict[str, nn.Linear], convs: list[DynamicShortConv],
        cu_seqlens: Tensor | None, rope: tuple[Tensor, Tensor] | None, n_rotated: int,
    ) -> list[Tensor]:
        """One matmul for the linears and their generators' input maps, then one op for their convs
        (kernels.dynamic_convs_lowrank or dynamic_convs_headwise), which reads each conv's x and
        generator output in place and whose backward writes the matmul output's gradient in place.
        Compiled, one op per conv on the split views left a kernel concatenating their gradients
        (each conv's dx, then its generator's): 1.74 ms of a 300M dynamic-qkv step on the H200
        (torch.profiler), 1% of it; the transformer's q, k and v pay 1.48 ms for theirs, which come
        from attention's backward. The first `n_rotated` outputs come out rotated by rope."""
        projection = F.linear(h, torch.cat(self._stacked_weights(linears)))
        first = convs[0]
        if first.kind == "headwise":
            return kernels.dynamic_convs_headwise(
                projection, [conv.bias for conv in convs], channels=[conv.channels for conv in convs],
                heads=[conv.n_heads for conv in convs], width=first.width, residual=first.residual,
                cu_seqlens=cu_seqlens, rope=rope if n_rotated else None, rotated=n_rotated,
            )
        return kernels.dynamic_convs_lowrank(
            projection, [conv.up for conv in convs], [conv.bias for conv in convs], width=first.width,
            residual=first.residual, cu_seqlens=cu_seqlens, rope=rope if n_rotated else None, rotated=n_rotated,
        )

    def _group(
        self, names: list[str], accepts: Callable[[ShortConv], bool], shape: Callable[[ShortConv], tuple],
        least: int = 2,
    ) -> list[ShortConv] | None:
        """The convs of `least` or more linears `names` when each has one, `accepts` each, and they
        all have one `shape`; None otherwise."""
        convs = [self[name] for name in names if name in self]
        if len(names) < least or len(convs) < len(names) or not all(accepts(conv) for conv in convs):
            return None
        return convs if len({shape(conv) for conv in convs}) == 1 else None

    def _static_group(self, names: list[str]) -> list[StaticShortConv] | None:
        """The static convs of `names` (see _group) when they share width and residual."""
        return self._group(names, lambda conv: isinstance(conv, StaticShortConv),
                           lambda conv: (conv.width, conv.residual))

    def _lowrank_group(self, names: list[str]) -> list[DynamicShortConv] | None:
        """The low-rank dynamic convs of `names` (see _group) when they share width, rank, residual
        and a channel count the kernels can tile as one group."""
        convs = self._group(names, lambda conv: isinstance(conv, DynamicShortConv) and conv.kind == "lowrank",
                            lambda conv: (conv.width, conv.rank, conv.residual, conv.channels))
        return convs if convs and convs[0].channels % kernels.GROUP_MULTIPLE == 0 else None

    def _projected_group(self, names: list[str]) -> list[DynamicShortConv] | None:
        """The dynamic convs of one or more linears `names` (see _group) when they share kind, width,
        residual and (low-rank) rank, for _run_projected (PROJECTED "auto")."""
        if PROJECTED.get() == "off":
            return None
        return self._group(names, lambda conv: isinstance(conv, DynamicShortConv),
                           lambda conv: (conv.kind, conv.width, conv.residual, getattr(conv, "rank", None)), least=1)

    def project_and_step(
        self, h_t: Tensor, linears: dict[str, nn.Linear], states: dict[str, Tensor]
    ) -> list[Tensor]:
        """The same for one decode token h_t [B, in_features]; updates states."""
        projected = self.project(h_t, linears)
        return [self.step(name, y, h_t, states, z_t=z) for name, (y, z) in projected.items()]

    def empty_states(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return {name: conv.empty_state(batch_size, device, dtype) for name, conv in self.items()}
