"""The PyTorch reference of the dynamic short convolution against a direct loop over the formula."""

import pytest
import torch

from isoflop.kernels import reference as ref


def loop_formula(x, filters, static, residual, starts=None):
    """y[b,t,d] = residual*x[b,t,d] + sum_k (f[b,t,k,d] + s[k,d]) * x[b,t-k,d], zero before a sequence start."""
    B, T, D = x.shape
    W = filters.shape[2] if filters is not None else static.shape[0]
    starts = starts or [0]
    y = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            start = max(s for s in starts if s <= t)
            acc = x[b, t].double() * (1.0 if residual else 0.0)
            for k in range(W):
                if t - k < start:
                    continue
                tap = torch.zeros(D, dtype=torch.float64)
                if filters is not None:
                    tap = tap + filters[b, t, k].double()
                if static is not None:
                    tap = tap + static[k].double()
                acc = acc + tap * x[b, t - k].double()
            y[b, t] = acc
    return y


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("with_static", [True, False])
@pytest.mark.parametrize("W", [1, 3, 4])
def test_lowrank_matches_loop(gen, residual, with_static, W):
    B, T, D, R = 2, 7, 5, 3
    x, z, U = rand(B, T, D, gen=gen), rand(B, T, R, gen=gen), rand(R, W * D, gen=gen)
    s = rand(W, D, gen=gen) if with_static else None
    y = ref.dynamic_conv_lowrank(x, z, U, s, residual=residual)
    filters = (z.double() @ U.double()).view(B, T, W, D)
    torch.testing.assert_close(y.double(), loop_formula(x, filters, s, residual), rtol=1e-5, atol=1e-5)


def test_lowrank_channel_groups_are_separate_convs(gen):
    """z [B, T, G*R]: each run of D/G channels is its own low-rank conv with its own R columns of z
    (the q, k, v convs of one fused projection in one call)."""
    B, T, G, Dg, R, W = 2, 6, 3, 4, 2, 3
    x, z = rand(B, T, G * Dg, gen=gen), rand(B, T, G * R, gen=gen)
    U, s = rand(R, W * G * Dg, gen=gen), rand(W, G * Dg, gen=gen)
    y = ref.dynamic_conv_lowrank(x, z, U, s)
    per_group = U.view(R, W, G, Dg)
    for g in range(G):
        channels, columns = slice(g * Dg, (g + 1) * Dg), slice(g * R, (g + 1) * R)
        alone = ref.dynamic_conv_lowrank(x[..., channels], z[..., columns], per_group[:, :, g].reshape(R, W * Dg),
                                         s[:, channels])
        torch.testing.assert_close(y[..., channels], alone)
    with pytest.raises(ValueError, match="G\\*R"):
        ref.dynamic_conv_lowrank(x, rand(B, T, 5, gen=gen), U)  # 5 columns: not a multiple of R=2


@pytest.mark.parametrize("head_size", [1, 2, 6])
def test_headwise_matches_loop(gen, head_size):
    B, T, D, W = 2, 6, 6, 4
    H = D // head_size
    x, w, s = rand(B, T, D, gen=gen), rand(B, T, W, H, gen=gen), rand(W, D, gen=gen)
    y = ref.dynamic_conv_headwise(x, w, s)
    filters = w.repeat_interleave(head_size, dim=-1)
    torch.testing.assert_close(y.double(), loop_formula(x, filters, s, True), rtol=1e-5, atol=1e-5)


def test_static_matches_loop_and_conv1d(gen):
    B, T, D, W = 2, 9, 4, 4
    x, s = rand(B, T, D, gen=gen), rand(W, D, gen=gen)
    y = ref.static_conv(x, s)
    torch.testing.assert_close(y.double(), loop_formula(x, None, s, False), rtol=1e-5, atol=1e-5)
    # Tap k = lag k is the reverse of nn.Conv1d's weight order (which is a cross-correlation).
    conv = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.transpose(1, 2), (W - 1, 0)), s.flip(0).T[:, None, :], groups=D
    ).transpose(1, 2)
    torch.testing.assert_close(y, conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in_and_out(gen, dtype):
    B, T, D, R, W = 2, 8, 8, 4, 4
    x, z, U, s = (rand(*sh, gen=gen) for sh in [(B, T, D), (B, T, R), (R, W * D), (W, D)])
    y = ref.dynamic_conv_lowrank(x.to(dtype), z.to(dtype), U.to(dtype), s.to(dtype))
    assert y.dtype == dtype
    exact = ref.dynamic_conv_lowrank(*(t.to(dtype).double() for t in (x, z, U, s)))
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    err = (y.double() - exact).norm() / exact.norm()
    assert err < tol, f"relative error {err:.2e} for {dtype}"


def test_gradcheck_lowrank_float64(gen):
    B, T, D, R, W = 1, 5, 3, 2, 3
    args = [rand(*sh, dtype=torch.float64, gen=gen).requires_grad_() for sh in [(B, T, D), (B, T, R), (R, W * D), (W, D)]]
    assert torch.autograd.gradcheck(lambda x, z, U, s: ref.dynamic_conv_lowrank(x, z, U, s), args)


def test_gradcheck_headwise_packed_float64(gen):
    T, D, W, H = 6, 4, 3, 2
    cu = torch.tensor([0, 2, 6])
    args = [rand(*sh, dtype=torch.float64, gen=gen).requires_grad_() for sh in [(1, T, D), (1, T, W, H), (W, D)]]
    f = lambda x, w, s: ref.dynamic_conv_headwise(x, w, s, cu_seqlens=cu)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


def test_packed_equals_separate_sequences(gen):
    D, R, W = 4, 3, 4
    lengths = [3, 1, 6, 2]  # a length-1 document and documents shorter than W
    U, s = rand(R, W * D, gen=gen), rand(W, D, gen=gen)
    xs = [rand(1, n, D, gen=gen) for n in lengths]
    zs = [rand(1, n, R, gen=gen) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    packed = ref.dynamic_conv_lowrank(torch.cat(xs, 1), torch.cat(zs, 1), U, s, cu_seqlens=cu)
    separate = torch.cat([ref.dynamic_conv_lowrank(x, z, U, s) for x, z in zip(xs, zs)], 1)
    torch.testing.assert_close(packed, separate)
    # Without boundaries the result differs: the filters really would reach across documents.
    assert not torch.allclose(ref.dynamic_conv_lowrank(torch.cat(xs, 1), torch.cat(zs, 1), U, s), separate)


@pytest.mark.gpu
def test_packed_reference_runs_inside_a_cuda_graph():
    """The cu_seqlens checks read values back to the host, which CUDA-graph capture forbids: under
    capture they are skipped (benchmarks/kernels.py times the reference by graph replay)."""
    x, z = torch.randn(1, 12, 8, device="cuda"), torch.randn(1, 12, 2, device="cuda")
    U, cu = torch.randn(2, 3 * 8, device="cuda"), torch.tensor([0, 5, 12], device="cuda")
    eager = ref.dynamic_conv_lowrank(x, z, U, cu_seqlens=cu)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ref.dynamic_conv_lowrank(x, z, U, cu_seqlens=cu)
    graph.replay()
    torch.testing.assert_close(captured, eager)


@pytest.mark.parametrize("kind", ["lowrank", "headwise", "static"])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_decode_equals_full_sequence(gen, kind, W):
    B, T, D, R, H = 2, 7, 6, 3, 3
    x, s = rand(B, T, D, gen=gen), rand(W, D, gen=gen)
    z, U = rand(B, T, R, gen=gen), rand(R, W * D, gen=gen)
    w = rand(B, T, W, H, gen=gen)
    full = {
        "lowrank": lambda: ref.dynamic_conv_lowrank(x, z, U, s),
        "headwise": lambda: ref.dynamic_conv_headwise(x, w, s),
        "static": lambda: ref.static_conv(x, s),
    }[kind]()
    state = torch.zeros(B, W - 1, D)
    for t in range(T):
        if kind == "lowrank":
            y_t, state = ref.dynamic_conv_lowrank_step(x[:, t], state, z[:, t], U, s)
        elif kind == "headwise":
            y_t, state = ref.dynamic_conv_headwise_step(x[:, t], state, w[:, t], s)
        else:
            y_t, state = ref.static_conv_step(x[:, t], state, s)
        torch.testing.assert_close(y_t, full[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref.initial_state(x, W))


def test_prefill_state_then_decode_continues_the_sequence(gen):
    B, T, D, R, W = 1, 9, 4, 2, 4
    x, z, U = rand(B, T, D, gen=gen), rand(B, T, R, gen=gen), rand(R, W * D, gen=gen)
    full = ref.dynamic_conv_lowrank(x, z, U)
    for prompt_len in (2, 5):  # shorter and longer than W-1
        state = ref.initial_state(x[:, :prompt_len], W)
        for t in range(prompt_len, T):
            y_t, state = ref.dynamic_conv_lowrank_step(x[:, t], state, z[:, t], U)
            torch.testing.assert_close(y_t, full[:, t], rtol=1e-5, atol=1e-5)


def test_clear_errors(gen):
    x = rand(2, 5, 4, gen=gen)
    with pytest.raises(ValueError, match="B == 1"):
        ref.static_conv(x, rand(3, 4, gen=gen), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="end at T=5"):
        ref.static_conv(x[:1], rand(3, 4, gen=gen), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="static filter"):
        ref.static_conv(x, rand(3, 5, gen=gen))
    with pytest.raises(ValueError, match="must divide D"):
        ref.dynamic_conv_headwise(x, rand(2, 5, 3, 3, gen=gen))


def test_rope_rotates_whole_heads_of_the_first_channels_and_back(gen):
    """rotate_channels turns each pair (i, i + hd/2) of the first channels' heads by its row's angle
    (norms kept, other channels untouched); inverse=True undoes it; bad tables say what they need."""
    from isoflop.models.attention import rope_angles

    B, T, D, hd = 2, 6, 48, 16
    y = rand(B, T, D, dtype=torch.float64, gen=gen)
    rope = rope_angles(torch.arange(T), hd, 10000.0)
    rotated = ref.rotate_channels(y, rope, 32)
    assert torch.equal(rotated[..., 32:], y[..., 32:])
    pairs = lambda t: t[..., :32].unflatten(-1, (2, 2, hd // 2))  # [B, T, head, half, i]
    torch.testing.assert_close(pairs(rotated).norm(dim=-2), pairs(y).norm(dim=-2))
    angle = torch.atan2(pairs(y)[..., 1, :], pairs(y)[..., 0, :])
    turned = torch.atan2(pairs(rotated)[..., 1, :], pairs(rotated)[..., 0, :])
    expected = rope_angles(torch.arange(T), hd, 10000.0)[1].double().asin()  # small angles: asin(sin) is the angle
    delta = torch.remainder(turned - angle + torch.pi, 2 * torch.pi) - torch.pi
    torch.testing.assert_close(delta[:, :, :, -1], expected[:, -1].expand(B, 2, T).transpose(1, 2))
    torch.testing.assert_close(ref.rotate_channels(rotated, rope, 32, inverse=True), y)
    with pytest.raises(ValueError, match="whole heads"):
        ref.rotate_channels(y, rope, 40)
    with pytest.raises(ValueError, match=r"\[T=6, head_dim/2\]"):
        ref.rotate_channels(y, (rope[0][:5], rope[1][:5]))
