"""Short-conv modules: init, parameter layout, wiring to the operator, decode, packing."""

from __future__ import annotations

import pytest
import torch

from isoflop.models.config import ConvSpec
from isoflop.models.conv import (
    DynamicShortConv,
    LinearConvs,
    StaticShortConv,
    make_short_conv,
)

IN, C, W = 24, 32, 4


@pytest.fixture(autouse=True)
def float64():
    """float64 so that comparisons against the naive loops are exact up to rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def naive_conv(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] + sum_k filters[t, k] * x[t-k], written out position by position.
    x [B, T, C], filters [B, T, W, C]."""
    y = x.clone()
    for t in range(x.shape[1]):
        for k in range(filters.shape[2]):
            if t - k >= 0:
                y[:, t] += filters[:, t, k] * x[:, t - k]
    return y


def randomise_generator(conv: DynamicShortConv) -> None:
    """Give the zero-initialised part of the generator real values (as training would)."""
    with torch.no_grad():
        if conv.kind == "lowrank":
            conv.up.normal_(0.0, 0.5)
        else:
            conv.proj.weight.normal_(0.0, 0.5)


def make_dynamic(kind: str, **kwargs) -> DynamicShortConv:
    torch.manual_seed(0)
    return DynamicShortConv(IN, C, W, kind=kind, rank=8, head_size=8, **kwargs)


@pytest.mark.parametrize("kind", ["lowrank", "headwise"])
def test_dynamic_conv_at_init_is_the_residual_static_conv_with_its_bias(kind):
    dynamic = make_dynamic(kind)
    static = StaticShortConv(C, W)
    with torch.no_grad():
        static.weight.copy_(dynamic.bias)
    x, h = torch.randn(2, 9, C), torch.randn(2, 9, IN)
    expected = naive_conv(x, dynamic.bias.expand(2, 9, W, C))
    torch.testing.assert_close(dynamic(x, h), static(x), rtol=0, atol=0)
    torch.testing.assert_close(static(x), expected)


def test_init_distributions():
    torch.manual_seed(0)
    conv = DynamicShortConv(256, 256, W, kind="lowrank", rank=64, init_std=0.02)
    bound = 1 / W**0.5
    assert conv.up.abs().max() == 0
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0.9 * bound
    assert conv.down.weight.std().item() == pytest.approx(0.02, rel=0.05)
    headwise = DynamicShortConv(IN, C, W, kind="headwise", head_size=8)
    assert headwise.proj.weight.abs().max() == 0
    static = StaticShortConv(512, W)
    assert static.weight.abs().max() <= bound and static.weight.abs().max() > 0.9 * bound


def test_lowrank_module_computes_the_papers_filter():
    """w_t = reshape(down(h_t) @ U, [W, C]) + B, tap-major: U[:, k*C + c] is tap k of channel c."""
    conv = make_dynamic("lowrank")
    randomise_generator(conv)
    x, h = torch.randn(2, 7, C), torch.randn(2, 7, IN)
    z = h @ conv.down.weight.T
    filters = torch.einsum("btr,rkc->btkc", z, conv.up.view(8, W, C)) + conv.bias
    torch.testing.assert_close(conv(x, h), naive_conv(x, filters))


def test_headwise_module_computes_one_tap_per_head_of_consecutive_channels():
    """proj(h_t) is tap-major (index k*H + head) and head j covers channels j*hs .. (j+1)*hs - 1."""
    conv = make_dynamic("headwise")
    randomise_generator(conv)
    H = C // 8
    x, h = torch.randn(2, 7, C), torch.randn(2, 7, IN)
    generated = h @ conv.proj.weight.T  # [B, T, W*H]
    filters = torch.empty(2, 7, W, C)
    for k in range(W):
        for c in range(C):
            filters[:, :, k, c] = generated[:, :, k * H + c // 8] + conv.bias[k, c]
    torch.testing.assert_close(conv(x, h), naive_conv(x, filters))


def test_parameter_counts_follow_the_formulas():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    R, hs = 8, 8
    lowrank = DynamicShortConv(IN, C, W, kind="lowrank", rank=R)
    headwise = DynamicShortConv(IN, C, W, kind="headwise", head_size=hs)
    assert count(lowrank) == IN * R + R * W * C + W * C
    assert count(headwise) == IN * W * C // hs + W * C
    assert count(StaticShortConv(C, W)) == W * C
    assert tuple(lowrank.up.shape) == (R, W * C) and tuple(lowrank.bias.shape) == (W, C)
    assert tuple(headwise.proj.weight.shape) == (W * C // hs, IN)


@pytest.mark.parametrize("kind", ["static", "lowrank", "headwise"])
def test_stepping_token_by_token_equals_the_full_forward(kind):
    conv = StaticShortConv(C, W) if kind == "static" else make_dynamic(kind)
    if kind != "static":
        randomise_generator(conv)
    B, T = 3, 8
    x, h = torch.randn(B, T, C), torch.randn(B, T, IN)
    full = conv(x) if kind == "static" else conv(x, h)
    state = conv.empty_state(B, x.device, x.dtype)
    assert tuple(state.shape) == (B, W - 1, C)
    for t in range(T):
        if kind == "static":
            y_t, state = conv.step(x[:, t], state)
        else:
            y_t, state = conv.step(x[:, t], h[:, t], state)
        torch.testing.assert_close(y_t, full[:, t])


@pytest.mark.parametrize("kind", ["static", "lowrank", "headwise"])
def test_packed_documents_do_not_see_each_other(kind):
    conv = StaticShortConv(C, W) if kind == "static" else make_dynamic(kind)
    if kind != "static":
        randomise_generator(conv)
    lengths = [5, 2, 6]
    xs = [torch.randn(1, n, C) for n in lengths]
    hs = [torch.randn(1, n, IN) for n in lengths]
    cu = torch.tensor([0, 5, 7, 13])

    def run(x, h, cu_seqlens=None):
        return conv(x, cu_seqlens) if kind == "static" else conv(x, h, cu_seqlens)

    packed = run(torch.cat(xs, 1), torch.cat(hs, 1), cu)
    separate = torch.cat([run(x, h) for x, h in zip(xs, hs)], 1)
    torch.testing.assert_close(packed, separate)


def test_filters_and_static_biases_are_excluded_from_weight_decay():
    lowrank, headwise, static = make_dynamic("lowrank"), make_dynamic("headwise"), StaticShortConv(C, W)
    marked = {p for m in (lowrank, headwise, static) for p in m.parameters()
              if getattr(p, "_no_weight_decay", False)}
    assert marked == {lowrank.bias, headwise.bias, static.weight}


def test_make_short_conv_builds_what_the_spec_names():
    assert make_short_conv(ConvSpec(kind="none"), IN, C) is None
    static = make_short_conv(ConvSpec(kind="static", width=3), IN, C)
    assert isinstance(static, StaticShortConv) and tuple(static.weight.shape) == (3, C)
    lowrank = make_short_conv(ConvSpec(kind="dynamic-lowrank", rank=5, width=2), IN, C)
    assert isinstance(lowrank, DynamicShortConv) and lowrank.kind == "lowrank"
    assert tuple(lowrank.up.shape) == (5, 2 * C) and lowrank.down.in_features == IN
    headwise = make_short_conv(ConvSpec(kind="dynamic-headwise", head_size=4), IN, C)
    assert headwise.kind == "headwise" and headwise.n_heads == C // 4


def test_bad_arguments_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="kind='causal'; allowed: lowrank, headwise"):
        DynamicShortConv(IN, C, W, kind="causal")
    with pytest.raises(ValueError, match="head_size=5 must divide the convolved channels"):
        DynamicShortConv(IN, C, W, kind="headwise", head_size=5)


def test_linear_convs_follow_the_placement_and_pass_other_linears_through():
    shapes = {"gate": (IN, C), "up": (IN, C), "down": (C, IN)}
    qkv = LinearConvs(ConvSpec(kind="dynamic-lowrank", placement="qkv"), shapes)
    assert len(qkv) == 0
    y, h = torch.randn(1, 4, C), torch.randn(1, 4, IN)
    assert qkv.run("gate", y, h) is y
    every = LinearConvs(ConvSpec(kind="dynamic-lowrank", placement="all-linear"), shapes)
    assert sorted(every) == ["down", "gate", "up"]
    assert (every["down"].in_features, every["down"].channels) == (C, IN)
    states = every.empty_states(1, y.device, y.dtype)
    assert {k: tuple(v.shape) for k, v in states.items()} == {
        "gate": (1, W - 1, C), "up": (1, W - 1, C), "down": (1, W - 1, IN)
    }
