"""The Triton kernels of the short convolution against the float64 PyTorch reference.

Three groups:
- dispatch tests, run in the suite's own process (no kernel is launched);
- interpreter tests (tiny ragged shapes, float32 and float16, every feature, gradients included): they
  need TRITON_INTERPRET=1 before Triton is imported, so `test_interpreter_suite` re-runs this file in
  a subprocess with it set, and they are skipped in the suite's own process;
- GPU tests (marked gpu): real shapes in bf16 and fp32, poisoned memory, determinism, torch.compile.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from isoflop import kernels
from isoflop.kernels import reference as ref

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in test_interpreter_suite's subprocess (TRITON_INTERPRET=1)"
)
# Relative error ||out - ref|| / ||ref|| against float64: float32 kernels use exact float32 products;
# half types accumulate in float32 but round inputs, outputs and (backward) the filter gradient's
# matrix-product operands to their own precision.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


@contextlib.contextmanager
def lowrank_backward_variant(variant: str):
    """The low-rank backward's variant (as ISOFLOP_LOWRANK_BWD would set it) inside the block."""
    from isoflop.kernels import triton_lowrank

    before = triton_lowrank.BACKWARD_VARIANT.get()
    triton_lowrank.BACKWARD_VARIANT.set(variant)
    try:
        yield
    finally:
        triton_lowrank.BACKWARD_VARIANT.set(before)


@pytest.fixture
def split_backward():
    """The low-rank backward's split variant (ISOFLOP_LOWRANK_BWD=split) for one test."""
    with lowrank_backward_variant("split"):
        yield


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values (unwritten output?)"
    return ((out.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def packed_offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def check_against_float64(fn, inputs: dict, dtype: torch.dtype, grads: bool = True, tol_scale: float = 1.0):
    """Run fn(**inputs) through the dispatch (Triton) and fn on float64 copies through the reference;
    compare outputs and, with grads, every input gradient for a random output gradient."""
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    fast = {k: (v.detach().requires_grad_(grads) if k in tensors else v) for k, v in inputs.items()}
    exact = {k: (v.detach().double().requires_grad_(grads) if k in tensors else v) for k, v in inputs.items()}
    y = fn(**fast)
    kernels.set_backend("reference")
    try:
        y_exact = fn(**exact)
    finally:
        kernels.set_backend("triton")
    tol = TOLERANCE[dtype] * tol_scale
    assert y.dtype == inputs["x"].dtype
    errors = {"y": relative_error(y, y_exact.detach())}
    if grads:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
        y.backward(dy)
        y_exact.backward(dy.double())
        for name in tensors:
            assert fast[name].grad.dtype == inputs[name].dtype, name
            errors[f"d{name}"] = relative_error(fast[name].grad, exact[name].grad)
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad} (all: {errors})"


# ---------------------------------------------------------------------------------------------
# Dispatch (suite process, no kernels launched)


def test_backend_names_are_checked():
    if INTERPRETING:
        pytest.skip("checks the non-interpreted process")
    with pytest.raises(ValueError, match="allowed: auto, reference, triton"):
        kernels.set_backend("cuda")
    assert kernels.get_backend() == "auto"


def test_auto_uses_the_reference_on_cpu_and_forced_triton_explains_itself(gen):
    if INTERPRETING:
        pytest.skip("checks the non-interpreted process")
    x, z, U = rand(1, 6, 8, gen=gen), rand(1, 6, 2, gen=gen), rand(2, 3 * 8, gen=gen)
    assert torch.equal(kernels.dynamic_conv_lowrank(x, z, U), ref.dynamic_conv_lowrank(x, z, U))
    kernels.set_backend("triton")
    try:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.dynamic_conv_lowrank(x, z, U)
    finally:
        kernels.set_backend("auto")


def test_environment_variable_sets_the_backend():
    if INTERPRETING:
        pytest.skip("checks the non-interpreted process")
    code = """
import importlib, os
os.environ["ISOFLOP_KERNELS"] = "reference"
from isoflop import kernels
print(kernels.get_backend())
os.environ["ISOFLOP_KERNELS"] = "fast"
try:
    importlib.reload(kernels)
except ValueError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first == "reference"
    assert "ISOFLOP_KERNELS='fast'" in second and "allowed: auto, reference, triton" in second


def test_backward_chunks_fill_the_last_wave(monkeypatch):
    """Time chunks per sequence for the filter-gradient programs on a 132-multiprocessor GPU with
    2 programs each: enough programs, and no mostly idle last wave."""
    from isoflop.kernels import triton_common

    monkeypatch.setattr(triton_common, "processor_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert triton_common.time_chunks(4096, 8, 16, 64, cpu, 2) == (2048, 2)  # 256 programs, 264 slots
    assert triton_common.time_chunks(4096, 8, 48, 64, cpu, 2) == (2048, 2)  # not 384 in 1.45 waves
    assert triton_common.time_chunks(4096, 8, 192, 64, cpu, 2) == (4096, 1)  # 1536 fill 6 waves to 97%
    assert triton_common.time_chunks(100, 1, 1, 64, cpu, 2) == (64, 2)  # never more chunks than tiles


def test_overlapped_backward_plans_one_program_of_each_kernel_per_multiprocessor():
    """The overlapped backward's (channel tiles, chunk_t, chunks) on a 132-multiprocessor GPU: at
    most one filter-gradient program (and one dx program) per multiprocessor; only grids that fit
    are overlapped."""
    from isoflop.kernels import triton_lowrank

    plan = triton_lowrank._overlap_plan
    assert plan(4, 4096, 2048, 132) == (32, 4096, 1)  # the paper's: 128 programs, whole sequences
    assert plan(8, 512, 384, 132) == (6, 256, 2)  # a small model's: 48 tiles across, 96 programs
    assert plan(1, 4096, 1024, 132) == (16, 512, 8)  # 128 programs
    assert plan(1, 100, 512, 132) == (8, 64, 2)  # never more chunks than tiles
    for B, T, D in ((4, 4096, 2048), (8, 512, 384), (1, 4096, 1024), (2, 1000, 4000)):
        d_tiles, _, chunks = plan(B, T, D, 132)
        assert B * d_tiles * chunks <= 132 or chunks == 1
    assert triton_lowrank.OVERLAP.allowed == ("auto", "off")


def test_gluon_conv_chunks_keep_the_multiprocessors_busy():
    """Tiles per program of the Gluon low-rank forward and dx on a 132-multiprocessor GPU: where the
    H200 timed each best (KERNELS.md, point 39), and never more than a sequence has."""
    from isoflop.kernels.gluon_lowrank_conv import _chunk

    def forward(tiles, across):
        return _chunk(tiles, across, 132, three_fit=True, extra_step=False)

    def dx(tiles, across):
        return _chunk(tiles, across, 132, three_fit=False, extra_step=True)

    assert forward(64, 128) == dx(64, 128) == 32  # the paper's shape: 256 programs, two per multiprocessor
    assert forward(64, 96) == 16 and dx(64, 96) == 13  # [8, 4096, 768]: not 192 programs over 132
    assert forward(64, 256) == 22 and dx(64, 256) == 32  # [8, 4096, 2048]: three fit for the forward only
    assert forward(64, 344) == 32 and dx(64, 344) == 22  # [8, 4096, 2752]
    assert forward(64, 32) == dx(64, 32) == 8  # [1, 4096, 2048]
    assert forward(8, 384) == dx(8, 384) == 8  # a d384 model's [64, 512, 384]: short chunks only cost
    assert forward(1, 12) == dx(1, 12) == 1 and forward(3, 1) == dx(3, 1) == 2


def test_auto_backward_splits_the_filter_gradients_only_for_the_widest_filters():
    from isoflop.kernels.triton_lowrank import _auto_variant

    assert _auto_variant(16, 4, has_static=True) == "fused"  # the paper's shape
    assert _auto_variant(64, 4, has_static=True) == "fused"  # R_P * W = 512 (ones column: 65 -> 128)
    assert _auto_variant(64, 8, has_static=True) == "split"
    assert _auto_variant(128, 4, has_static=True) == "split"
    assert _auto_variant(128, 4, has_static=False) == "fused"  # no ones column: 128 * 4


def test_lowrank_backward_variant_comes_from_the_environment_and_is_checked():
    if INTERPRETING:
        pytest.skip("checks the non-interpreted process")
    code = """
import os, torch
os.environ["ISOFLOP_LOWRANK_BWD"] = "split"
from isoflop.kernels import triton_lowrank
print(triton_lowrank.BACKWARD_VARIANT.get())
x = torch.zeros(1, 4, 16)
try:
    triton_lowrank.lowrank_backward(x, x, x[..., :2], torch.zeros(2, 16), None, True, None, variant="fast")
except ValueError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines() == ["split",
                                               "lowrank_backward: variant='fast'; allowed: auto, fused, gluon, split"]
    bad = subprocess.run([sys.executable, "-c", "from isoflop.kernels import triton_lowrank"], capture_output=True,
                         text=True, env=os.environ | {"ISOFLOP_LOWRANK_BWD": "fast"})
    assert bad.returncode != 0 and "ISOFLOP_LOWRANK_BWD='fast'" in bad.stderr
    assert "allowed: auto, fused, gluon, split" in bad.stderr


@pytest.mark.skipif(INTERPRETING, reason="already interpreting")
def test_interpreter_suite(interpreter_suite):
    """This file's interpreter tests, run under TRITON_INTERPRET=1 in a process of their own (conftest
    starts it right after collection, so it runs beside the rest of the suite): they all pass."""
    process, log = interpreter_suite
    try:
        process.wait(timeout=1800)  # (~14 minutes alone on a slow 2-core machine)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    out = log.read_text()
    assert process.returncode == 0, out[-9000:]
    assert " passed" in out and " failed" not in out, out[-3000:]


# ---------------------------------------------------------------------------------------------
# Interpreter: tiny ragged shapes, every feature, float32 and float16

DTYPES = [torch.float32, torch.float16]


@interpreted
@pytest.mark.parametrize("shape, groups", [((70, 9), 1), ((8, 3, 17), 2), ((6, 4, 5), 3)])
def test_partial_sums_reduce_each_group_in_a_fixed_order_and_cast(shape, groups):
    """The backward's float32 partials: each group of leading slices summed (70 rows take five
    16-row steps), cast in the same pass, and bit-identical when repeated."""
    from isoflop.kernels.triton_common import sum_partials

    part = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = part.double().view(groups, shape[0] // groups, -1).sum(1)
    out = sum_partials(part, torch.float32, groups)
    assert out.shape == expected.shape and torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.equal(sum_partials(part, torch.float32, groups), out)
    half = sum_partials(part, torch.float16, groups)
    assert half.dtype == torch.float16 and torch.equal(half, out.half())


@interpreted
def test_partial_sums_in_one_launch_equal_them_one_by_one():
    """A backward's dz, dU and ds sums share one launch: each result is bit-identical to its own
    sum_partials, whatever its shape, groups and dtype, for one to three jobs."""
    from isoflop.kernels.triton_common import sum_partials, sum_partials_together

    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randn(6, 5, 7, generator=g), torch.float16, 3), (torch.randn(70, 9, generator=g), torch.float32, 1),
            (torch.randn(4, 33, generator=g), torch.float16, 2)]
    for count in (1, 2, 3):
        together = sum_partials_together(jobs[:count])
        assert len(together) == count
        for out, (part, dtype, groups) in zip(together, jobs):
            assert out.dtype == dtype and torch.equal(out, sum_partials(part, dtype, groups))
    with pytest.raises(ValueError, match="allowed: 1 to 3"):
        sum_partials_together(jobs + jobs[:1])


@interpreted
def test_partial_sums_write_into_columns_of_a_bigger_gradient():
    """dz's sums go straight into a view (the z columns of a fused projection's gradient): group g's
    values of row i land in columns g * R to (g + 1) * R of that row, equal to the permuted
    contiguous result, nothing else written; an out that cannot take them is refused by name."""
    from isoflop.kernels.triton_common import sum_partials, sum_partials_together

    B, T, R, groups, tiles = 2, 5, 3, 2, 3
    part = torch.randn(groups * tiles, B * T, R, generator=torch.Generator().manual_seed(2))
    grad = torch.full((B, T, 11), -7.0, dtype=torch.float16)
    view = grad[..., 4:4 + groups * R]
    (got,) = sum_partials_together([(part, torch.float16, groups, view)])
    expected = sum_partials(part, torch.float16, groups).view(groups, B * T, R).permute(1, 0, 2).reshape(B, T, -1)
    assert got is view and torch.equal(view, expected)
    assert (grad[..., :4] == -7).all() and (grad[..., 4 + groups * R:] == -7).all()
    for bad in (grad[..., 4:4 + groups * R].float(), grad[..., 3:4 + groups * R], grad[:, ::2, 4:4 + groups * R]):
        with pytest.raises(ValueError, match="cannot take"):
            sum_partials_together([(part, torch.float16, groups, bad)])


@interpreted
@pytest.mark.parametrize("with_static", [True, False])
def test_filter_grad_sums_into_buffers_made_before_equal_the_sums_that_make_their_own(with_static):
    """The side-by-side backward runs the sums on the side stream into dz, dU and ds allocated before
    its fork (_filter_grad_outputs): the same bits as the sums that allocate their own results, and
    those very buffers come back."""
    from isoflop.kernels.triton_lowrank import _filter_grad_outputs, sum_filter_grads

    g = torch.Generator().manual_seed(3)
    B, T, R, W, D, tiles, chunks = 2, 5, 3, 4, 8, 2, 3
    z, U = torch.empty(B, T, R, dtype=torch.float16), torch.empty(R, W * D)
    static = torch.empty(W, D, dtype=torch.float16) if with_static else None
    dz_part, du_part = torch.randn(tiles, B * T, R, generator=g), torch.randn(B * chunks, R, W * D, generator=g)
    ds_part = torch.randn(B * chunks, W * D, generator=g) if with_static else du_part
    outs = _filter_grad_outputs(z, U, static, None)
    got = sum_filter_grads(dz_part, du_part, ds_part, z, U, static, 1, outs=outs)
    expected = sum_filter_grads(dz_part, du_part, ds_part, z, U, static, 1)
    for a, b, out in zip(got, expected, outs):
        assert (a is None and b is None and out is None) or (a.data_ptr() == out.data_ptr() and torch.equal(a, b))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, T, D, R, W, with_static, residual",
    [(2, 13, 24, 3, 4, True, True), (2, 7, 17, 1, 1, False, False), (1, 20, 32, 17, 8, True, False), (3, 5, 16, 16, 3, True, True),
     # whole tiles: the forward masks only lags before the sequence's start (EVEN); chunk loop or one tile
     (2, 64, 32, 3, 4, True, True), (1, 48, 16, 17, 8, True, False)],
)
def test_lowrank_matches_reference(gen, triton_backend, dtype, B, T, D, R, W, with_static, residual):
    inputs = dict(
        x=rand(B, T, D, dtype=dtype, gen=gen), z=rand(B, T, R, dtype=dtype, gen=gen),
        U=rand(R, W * D, dtype=dtype, gen=gen) / R**0.5,
        static=rand(W, D, dtype=dtype, gen=gen) if with_static else None, residual=residual,
    )
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, T, D, R, W, with_static, residual, lengths",
    [(2, 13, 24, 3, 4, True, True, None), (2, 7, 17, 1, 1, False, False, None), (1, 20, 32, 17, 8, True, False, None),
     (3, 5, 16, 16, 3, True, True, None), (1, 19, 24, 5, 4, True, True, [3, 1, 7, 2, 6])],
)
def test_lowrank_split_backward_matches_reference(gen, triton_backend, split_backward, dtype, B, T, D, R, W,
                                                 with_static, residual, lengths):
    """The split filter-gradient kernels (dz, dU/ds apart) on ragged shapes and packed sequences."""
    inputs = dict(
        x=rand(B, T, D, dtype=dtype, gen=gen), z=rand(B, T, R, dtype=dtype, gen=gen),
        U=rand(R, W * D, dtype=dtype, gen=gen) / R**0.5,
        static=rand(W, D, dtype=dtype, gen=gen) if with_static else None, residual=residual,
        cu_seqlens=packed_offsets(lengths) if lengths else None,
    )
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


def fused_output_views(B: int, T: int, G: int, Dg: int, R: int, dtype, device="cpu", gen=None):
    """x [B, T, G*Dg] and z [B, T, G*R] as views into one [B, T, G*(Dg+R) + 8] tensor, the way
    LinearConvs.project_and_run slices a fused projection's output (rows strided, not contiguous)."""
    out = rand(B, T, G * (Dg + R) + 8, dtype=dtype, gen=gen).to(device)
    return out[..., : G * Dg], out[..., G * Dg: G * (Dg + R)]


def lowrank_x_and_z(B: int, T: int, G: int, Dg: int, R: int, dtype, view: bool, gen) -> tuple:
    """x [B, T, G*Dg] and z [B, T, G*R] on the GPU: views into one fused output, or tensors of their own."""
    if view:
        return fused_output_views(B, T, G, Dg, R, dtype, device="cuda", gen=gen)
    on = dict(dtype=dtype, device="cuda", gen=gen)
    return rand(B, T, G * Dg, **on), rand(B, T, G * R, **on)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["fused", "split"])
@pytest.mark.parametrize("B, T, G, Dg, R, W, lengths", [(2, 13, 3, 16, 3, 4, None), (1, 19, 2, 32, 5, 3, [3, 1, 9, 6]),
                                                   (1, 32, 2, 16, 5, 4, None)])  # whole tiles
def test_lowrank_channel_groups_on_views_of_a_fused_output(gen, triton_backend, dtype, variant, B, T, G, Dg, R, W,
                                                          lengths):
    """z [B, T, G*R] (one R-column slice per group of Dg channels) with x and z read in place from
    one fused output: forward and every gradient against float64, for both backward variants."""
    from isoflop.kernels import ops

    x, z = fused_output_views(B, T, G, Dg, R, dtype, gen=gen)
    assert ops._rows(x) is x and ops._rows(z) is z  # the kernels take the views as they are, no copy
    inputs = dict(x=x, z=z, U=rand(R, W * G * Dg, dtype=dtype, gen=gen) / R**0.5,
                  static=rand(W, G * Dg, dtype=dtype, gen=gen), cu_seqlens=packed_offsets(lengths) if lengths else None)
    with lowrank_backward_variant(variant):
        check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


def rope_tables(T: int, head_dim: int = 64, device="cpu") -> tuple[Tensor, Tensor]:
    """cos and sin [T, head_dim/2] as the model makes them (angles up to ~T radians)."""
    from isoflop.models.attention import rope_angles

    return rope_angles(torch.arange(T, device=device), head_dim, 10000.0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_op", [False, True])
@pytest.mark.parametrize("B, T, G, Dg, R, W, rotated_groups, lengths", [
    (2, 13, 1, 128, 3, 4, 1, None),  # two heads, all rotated
    (1, 19, 3, 64, 5, 3, 2, [3, 1, 9, 6]),  # q, k, v groups on views, q and k rotated; packed
])
def test_lowrank_rope_matches_reference(monkeypatch, gen, triton_backend, dtype, in_op, B, T, G, Dg, R, W,
                                        rotated_groups, lengths):
    """With rope, the output's first channels come out rotated (attention's RoPE) and the gradients
    are those of the rotation after the conv, against float64: rotated after the op (where the
    forward kernel cannot rotate, as here), or with the tables handed to the op as where it can
    (its forward rotates after the Triton kernel, its autograd formula un-rotates dy)."""
    from isoflop.kernels import ops

    monkeypatch.setattr(ops, "rope_fuses", lambda *args: in_op)
    x, z = fused_output_views(B, T, G, Dg, R, dtype, gen=gen)
    inputs = dict(x=x, z=z, U=rand(R, W * G * Dg, dtype=dtype, gen=gen) / R**0.5,
                  static=rand(W, G * Dg, dtype=dtype, gen=gen), cu_seqlens=packed_offsets(lengths) if lengths else None,
                  rope=rope_tables(T), rope_channels=rotated_groups * Dg)
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


def projected_convs(B: int, T: int, channels: list[int], R: int, W: int, static: bool, rotated: int, dtype,
                    device="cpu", gen=None, heads: list[int] | None = None, lengths: list[int] | None = None,
                    head_dim: int = 64) -> dict:
    """dynamic_convs_lowrank's inputs (or with `heads`, dynamic_convs_headwise's): a fused projection
    [B, T, sum(channels) + G*R (or W * sum(heads))] with rows padded (a matmul output Inductor
    padded), each conv's U and static filter, rope of RoPE heads of `head_dim` for `rotated`, packed
    sequences of `lengths`."""
    on = dict(dtype=dtype, device=device, gen=gen)
    width = sum(channels) + (W * sum(heads) if heads else len(channels) * R)
    projection = rand(B, T, width + 8, **on)[..., :width]
    statics = [rand(W, c, **on) for c in channels] if static else None
    cu_seqlens = packed_offsets(lengths).to(device) if lengths else None
    tables = rope_angles_from(lengths, device, head_dim) if lengths else rope_tables(T, head_dim, device)
    rope = tables if rotated else None
    if heads:
        return dict(projection=projection, statics=statics, channels=channels, heads=heads, width=W,
                    cu_seqlens=cu_seqlens, rope=rope, rotated=rotated)
    return dict(projection=projection, ups=[rand(R, W * c, **on) / R**0.5 for c in channels],
                statics=statics, width=W, rope=rope, rotated=rotated, cu_seqlens=cu_seqlens)


def rope_angles_from(lengths: list[int], device="cpu", head_dim: int = 64) -> tuple[Tensor, Tensor]:
    """cos and sin of each packed sequence's own positions (0 to its length - 1)."""
    from isoflop.models.attention import rope_angles

    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return rope_angles(positions, head_dim, 10000.0)


def convs_one_by_one(projection: Tensor, inputs: dict) -> list[Tensor]:
    """The convs of `inputs` (projected_convs) as one dynamic_conv_lowrank or _headwise per conv on
    the projection's split views."""
    statics, W, cu = inputs["statics"], inputs["width"], inputs["cu_seqlens"]
    if "heads" in inputs:
        channels, heads = inputs["channels"], inputs["heads"]
        xs = projection[..., :sum(channels)].split(channels, dim=-1)
        ws = projection[..., sum(channels):].split([W * h for h in heads], dim=-1)
        ys = [kernels.dynamic_conv_headwise(x, w.unflatten(-1, (W, h)), statics[i] if statics else None, cu_seqlens=cu)
              for i, (x, w, h) in enumerate(zip(xs, ws, heads))]
        return [ref.rotate_channels(y, inputs["rope"]) if i < inputs["rotated"] else y for i, y in enumerate(ys)]
    channels, R = [U.shape[1] // W for U in inputs["ups"]], inputs["ups"][0].shape[0]
    xs = projection[..., :sum(channels)].split(channels, dim=-1)
    zs = projection[..., sum(channels):].split(R, dim=-1)
    return [kernels.dynamic_conv_lowrank(x, z, U, statics[i] if statics else None, cu_seqlens=cu,
                                         rope=inputs["rope"] if i < inputs["rotated"] else None)
            for i, (x, z, U) in enumerate(zip(xs, zs, inputs["ups"]))]


def projected_and_one_by_one(inputs: dict, seed: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    """Outputs and input gradients (projection, ups, statics) of dynamic_convs_lowrank (or _headwise),
    and of the convs one by one (the same cotangents)."""
    leaves = {k: ([t.detach().requires_grad_() for t in v] if k in ("ups", "statics") and v else
                  v.detach().requires_grad_() if k == "projection" else v) for k, v in inputs.items()}
    flat = [leaves["projection"], *leaves.get("ups", []), *(leaves["statics"] or [])]
    projected = kernels.dynamic_convs_headwise if "heads" in inputs else kernels.dynamic_convs_lowrank
    outputs = [projected(**leaves), convs_one_by_one(leaves["projection"], leaves)]
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(y.shape, generator=g).to(y) for y in outputs[0]]
    results = [[*ys, *torch.autograd.grad(sum((y * c).sum() for y, c in zip(ys, cotangents)), flat)] for ys in outputs]
    return results[0], results[1]


def in_double(inputs: dict) -> dict:
    return {k: ([t.double() for t in v] if isinstance(v, list) and v and isinstance(v[0], Tensor) else
                v.double() if k == "projection" else v) for k, v in inputs.items()}


@interpreted
@pytest.mark.parametrize("channels, R, W, static, rotated, heads, lengths, dtype", [
    ([64, 64, 64], 3, 4, True, 2, None, None, torch.float16),  # q, k, v, q and k rotated
    ([32, 48], 5, 3, False, 0, None, None, torch.float32),  # gate and up of other widths, no static filter
    ([40], 4, 2, True, 0, None, None, torch.float32),  # one conv (o, down)
    ([64, 64], 3, 3, True, 1, None, [4, 9], torch.float32),  # packed sequences, q rotated by their own positions
    ([16, 16, 16], 0, 4, True, 0, [1, 1, 1], None, torch.float16),  # head-wise q, k, v, heads of 16
    ([8, 6], 0, 3, False, 0, [1, 2], [5, 8], torch.float32),  # head-wise, heads of 8 and 3, packed, no static
    ([16, 16, 16], 0, 4, True, 2, [1, 1, 1], None, torch.float16),  # head-wise q, k, v, q and k rotated
    ([8, 16], 0, 3, False, 1, [1, 2], [6, 7], torch.float32),  # head-wise, packed, q rotated
])
def test_convs_of_a_projection_equal_the_convs_one_by_one(gen, triton_backend, channels, R, W, static, rotated,
                                                          heads, lengths, dtype):
    """kernels.dynamic_convs_lowrank and _headwise (one op; its backward writes the projection's
    gradient in place) give the results of one conv per linear on the projection's split views, bit
    for bit (the same kernels on the same views), and the reference's."""
    B = 1 if lengths else 2
    inputs = projected_convs(B, 13, channels, R, W, static, rotated, dtype, gen=gen, heads=heads, lengths=lengths,
                             head_dim=min(64, channels[0]))
    projected, one_by_one = projected_and_one_by_one(inputs)
    assert all(torch.equal(a, b) for a, b in zip(projected, one_by_one))
    fn = kernels.dynamic_convs_headwise if heads else kernels.dynamic_convs_lowrank
    ys = fn(**inputs)
    kernels.set_backend("reference")
    for y, y_exact in zip(ys, fn(**in_double(inputs))):
        assert relative_error(y, y_exact) < TOLERANCE[dtype]


def projected_with_grads(inputs: dict, cotangents: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs of dynamic_convs_headwise and the gradients of its projection and static filters
    for `cotangents` (fixed random ones, in the outputs' type, if None), and the cotangents."""
    leaves = {k: ([t.detach().requires_grad_() for t in v] if k == "statics" and v else
                  v.detach().requires_grad_() if k == "projection" else v) for k, v in inputs.items()}
    ys = kernels.dynamic_convs_headwise(**leaves)
    g = torch.Generator().manual_seed(1)
    cotangents = cotangents or [torch.randn(y.shape, generator=g).to(y) for y in ys]
    flat = [leaves["projection"], *(leaves["statics"] or [])]
    grads = torch.autograd.grad(sum((y * c.to(y)).sum() for y, c in zip(ys, cotangents)), flat)
    return [*ys, *grads], cotangents


@interpreted
def test_headwise_rope_inside_the_op_falls_back_to_the_rotation_by_ops(monkeypatch, gen, triton_backend):
    """Where the Gluon walks would rotate (triton_headwise.rope_fuses) the tables go into the op;
    a walk that then cannot take the inputs (here: no Hopper GPU) leaves the rotation to ops inside
    the op, y rotated after its kernel and dy turned back before the backward's: the values and
    gradients of the rotation after the op."""
    from isoflop.kernels import ops

    inputs = projected_convs(2, 13, [16, 16, 8], 0, 4, True, 2, torch.float32, gen=gen, heads=[2, 4, 1], head_dim=8)
    after, cotangents = projected_with_grads(inputs)
    tables = []
    forward = ops.headwise_forward
    monkeypatch.setattr(ops, "headwise_rope_fuses", lambda *_: True)
    monkeypatch.setattr(ops, "headwise_forward", lambda *args, rope=None: tables.append(rope) or forward(*args, rope=rope))
    inside, _ = projected_with_grads(inputs, cotangents)
    assert [rope is not None for rope in tables] == [True, True, False]
    for a, b in zip(inside, after):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_headwise_walks_say_which_rope_heads_they_rotate():
    """A thread of the rotating walk holds 4 channels of each half of a RoPE head, so a half holds
    whole conv heads (hs <= half) and at most 128 channels; the tables must be [T, half]. Shapes
    only: what torch.compile sees while it traces (triton_headwise.rope_fuses)."""
    from isoflop.kernels import gluon_headwise

    x, w = torch.empty(2, 64, 1024), torch.empty(2, 64, 4, 64)  # heads of 16

    def why(half: int, T: int = 64):
        return gluon_headwise.cannot_rotate(x, w, (torch.empty(T, half), torch.empty(T, half)))

    assert why(8) == "RoPE heads of 2 x 8 channels: the walks rotate halves of 16 to 128 channels, a power of two"
    assert "2 x 256" in why(256) and "2 x 48" in why(48)
    assert why(16) is None and why(32) is None and why(128) is None
    assert why(32, T=63) == "cos and sin must be [T=64, 32] (got (63, 32), (63, 32))"
    # The static conv's walk lays rows out as heads of 16 (STATIC_HEAD); a program's 512 channels
    # rotate all or none, so the rotated channels come in multiples of 512, or are all of them.
    tables = (torch.empty(64, 32), torch.empty(64, 32))
    assert gluon_headwise.cannot_rotate(x, None, tables, 512) is None
    assert gluon_headwise.cannot_rotate(x, None, tables) is None
    assert gluon_headwise.cannot_rotate(x, None, tables, 640) == (
        "it rotates whole programs' channels, a multiple of 512 or all (got 640)")
    # D an odd multiple of 256 (the 150M model's 768): the last program's upper half is masked.
    x768 = torch.empty(2, 64, 768, dtype=torch.bfloat16)
    assert gluon_headwise.shapes_missing(x768, None, False, width=4) is None
    assert gluon_headwise.cannot_rotate(x768, None, tables, 768) is None
    assert gluon_headwise.shapes_missing(x768[..., :640], None, False, width=4) == (
        "D must be a multiple of 256 (got 640)")
    assert "halves of 16" in gluon_headwise.cannot_rotate(x, None, (torch.empty(64, 8), torch.empty(64, 8)))
    assert gluon_headwise.shapes_missing(x.bfloat16(), None, False, width=4) is None
    assert gluon_headwise.shapes_missing(x.bfloat16(), None, False, width=5) == "it takes up to 4 taps (got 5)"


@interpreted
@pytest.mark.parametrize("rotated", [None, 32])
def test_static_conv_rotates_its_first_channels(rotated):
    """kernels.static_conv with rope equals the conv, then rotate_channels of its first `rotated`
    channels (all if None): on the CPU the kernels cannot rotate inside (no Gluon), so the op rotates
    after them; forward and gradients against the reference's."""
    from isoflop.kernels import reference as ref

    g = torch.Generator().manual_seed(3)
    x, s = rand(2, 11, 48, gen=g).requires_grad_(), (rand(3, 48, gen=g) / 2).requires_grad_()
    rope = rope_tables(11, head_dim=16)
    kernels.set_backend("triton")
    try:
        assert not kernels.static_conv_rotates(x, s, rope, rope_channels=rotated)  # (no Gluon walks here)
        y = kernels.static_conv(x, s, residual=True, rope=rope, rope_channels=rotated)
    finally:
        kernels.set_backend("reference")
    expected = ref.rotate_channels(ref.static_conv(x, s, residual=True), rope, rotated)
    torch.testing.assert_close(y, expected)
    dy = rand(2, 11, 48, gen=g)
    got, want = (torch.autograd.grad(t, (x, s), dy) for t in (y, expected))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if rotated is not None:
        torch.testing.assert_close(y[..., rotated:], ref.static_conv(x, s, residual=True)[..., rotated:])


@interpreted
def test_convs_of_a_projection_name_bad_inputs(gen):
    """Wrong widths name what the projection's columns must hold."""
    inputs = projected_convs(1, 8, [32, 32], 4, 3, True, 0, torch.float32, gen=gen)
    with pytest.raises(ValueError, match="take 72 .*their inputs, then each one's generator output"):
        kernels.dynamic_convs_lowrank(**inputs | {"projection": inputs["projection"][..., :-1]})
    with pytest.raises(ValueError, match="one .W, C_g. filter per conv"):
        kernels.dynamic_convs_lowrank(**inputs | {"statics": inputs["statics"][:1]})
    with pytest.raises(ValueError, match="rotated=3"):
        kernels.dynamic_convs_lowrank(**inputs | {"rope": rope_tables(8, head_dim=32), "rotated": 3})
    headwise = projected_convs(1, 8, [32, 32], 0, 3, True, 0, torch.float32, gen=gen, heads=[3, 2])
    kernels.set_backend("triton")
    try:
        with pytest.raises(ValueError, match=r"heads \[3, 2\] must divide channels \[32, 32\]"):
            kernels.dynamic_convs_headwise(**headwise)
    finally:
        kernels.set_backend("auto")


def swiglu_of_reference_convs(projection: Tensor, ups: list[Tensor], statics: list[Tensor] | None, width: int,
                              residual: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(silu(g') * u', g', u') in float64, g' and u' the reference convs of the gate's and up's columns."""
    C, R = ups[0].shape[1] // width, ups[0].shape[0]
    p = projection.double()
    gate, up = (ref.dynamic_conv_lowrank(p[..., g * C:(g + 1) * C], p[..., 2 * C + g * R:2 * C + (g + 1) * R],
                                         ups[g].double(), statics[g].double() if statics else None, residual=residual)
                for g in range(2))
    return torch.nn.functional.silu(gate) * up, gate, up


@interpreted
@pytest.mark.parametrize("static", [True, False])
def test_swiglu_of_two_convs_equals_the_convs_then_the_swiglu(gen, triton_backend, static):
    """The gate's and up's convs with their SwiGLU as one op (kernels.dynamic_convs_lowrank_swiglu;
    here the op's path where no Hopper kernel runs: the convs' op, then the SwiGLU): values and
    gradients of every input are the float64 reference's."""
    inputs = projected_convs(2, 11, [24, 24], 4, 3, static, 0, torch.float32, gen=gen)
    leaves = [inputs["projection"].detach().requires_grad_(), *(U.requires_grad_() for U in inputs["ups"]),
              *(s.requires_grad_() for s in inputs["statics"] or [])]
    ups, statics = leaves[1:3], leaves[3:] or None
    h = kernels.dynamic_convs_lowrank_swiglu(leaves[0], ups, statics, width=3)
    dh = rand(*h.shape, gen=gen)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64 = swiglu_of_reference_convs(leaves64[0], leaves64[1:3], leaves64[3:] or None, 3)[0]
    assert h.shape == (2, 11, 24) and relative_error(h, h64) < TOLERANCE[torch.float32]
    for got, want in zip(torch.autograd.grad(h, leaves, dh), torch.autograd.grad(h64, leaves64, dh.double())):
        assert relative_error(got, want) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="two of one shape"):
        kernels.dynamic_convs_lowrank_swiglu(leaves[0], ups[:1], width=3)


@interpreted
def test_lowrank_split_and_fused_backward_agree(gen):
    """Same gradients from both variants (dx is shared; the filter gradients only differ by the
    order of float32 sums), with packed sequences and a width that leaves taps unused."""
    from isoflop.kernels import ops, triton_lowrank

    T, D, R, W = 21, 40, 6, 5
    x, z, dy = rand(1, T, D, gen=gen), rand(1, T, R, gen=gen), rand(1, T, D, gen=gen)
    U, s = rand(R, W * D, gen=gen), rand(W, D, gen=gen)
    pos = ops._positions(packed_offsets([2, 9, 1, 9]), T, x.device)
    fused = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, pos, variant="fused")
    split = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, pos, variant="split")
    assert torch.equal(fused[0], split[0])
    for name, a, b in zip(["dz", "dU", "ds"], fused[1:], split[1:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


@interpreted
def test_lowrank_backward_writes_dz_into_views_it_can_and_copies_into_others(gen):
    """out's dz view takes the sums in place where its rows are evenly strided (the fused
    projection's gradient); any other view gets a copy: the same values either way."""
    from isoflop.kernels import triton_lowrank

    B, T, D, R, W = 2, 9, 32, 4, 3
    x, z, dy = rand(B, T, D, gen=gen), rand(B, T, R, gen=gen), rand(B, T, D, gen=gen)
    U, s = rand(R, W * D, gen=gen), rand(W, D, gen=gen)
    alone = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None, variant="fused")
    grad = torch.zeros(B, T, D + R + 3)
    rows = (grad[..., :D], grad[..., D:D + R])  # columns of one gradient: dz summed in place
    across = (torch.zeros(B, T, D), torch.zeros(T, B, R).transpose(0, 1))  # rows not evenly strided
    assert triton_lowrank._sums_target(rows[1], z) is rows[1] and triton_lowrank._sums_target(across[1], z) is None
    for out in (rows, across):
        got = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None, variant="fused", out=out)
        assert got[1] is out[1] and all(torch.equal(a, b) for a, b in zip(got, alone))
    assert (grad[..., D + R:] == 0).all()


@interpreted
def test_lowrank_gluon_backward_says_why_it_cannot_run_here(gen):
    """The Gluon filter gradients need a Hopper GPU; "auto" falls back to the Triton kernel, and a
    forced "gluon" names what is missing instead of failing inside the compiler."""
    from isoflop.kernels import triton_lowrank

    x, z, dy = rand(1, 20, 32, gen=gen), rand(1, 20, 4, gen=gen), rand(1, 20, 32, gen=gen)
    U = rand(4, 3 * 32, gen=gen)
    auto = triton_lowrank.lowrank_backward(dy, x, z, U, None, True, None, variant="auto")
    fused = triton_lowrank.lowrank_backward(dy, x, z, U, None, True, None, variant="fused")
    assert all(torch.equal(a, b) for a, b in zip(auto[:3], fused[:3]))
    with pytest.raises(ValueError, match="variant='gluon' cannot run here: .*(Gluon|Hopper)"):
        triton_lowrank.lowrank_backward(dy, x, z, U, None, True, None, variant="gluon")


@interpreted
def test_lowrank_gluon_forward_says_why_it_cannot_run_here(gen, monkeypatch):
    """The Gluon forward needs a Hopper GPU: elsewhere "auto" runs the Triton kernel, a forced "gluon"
    (ISOFLOP_LOWRANK_FWD) names what is missing, and on a Hopper GPU it would name the inputs it
    does not take."""
    from isoflop.kernels import gluon_lowrank_conv as fw
    from isoflop.kernels import triton_lowrank

    x, z, U, s = rand(2, 64, 32, gen=gen), rand(2, 64, 4, gen=gen), rand(4, 3 * 32, gen=gen), rand(3, 32, gen=gen)
    auto = triton_lowrank.lowrank_forward(x, z, U, s, True, None)
    monkeypatch.setattr(triton_lowrank.FORWARD_VARIANT, "name", "triton")
    assert torch.equal(auto, triton_lowrank.lowrank_forward(x, z, U, s, True, None))
    triton_lowrank.FORWARD_VARIANT.set("gluon")
    with pytest.raises(ValueError, match="ISOFLOP_LOWRANK_FWD=gluon cannot run here: .*(Gluon|Hopper)"):
        triton_lowrank.lowrank_forward(x, z, U, s, True, None)
    with pytest.raises(ValueError, match="allowed: auto, triton, gluon"):
        triton_lowrank.FORWARD_VARIANT.set("fast")
    monkeypatch.setattr(fw, "hopper_missing", lambda t: None)  # as on a Hopper GPU: the inputs' reasons
    half = dict(dtype=torch.bfloat16, gen=gen)
    xh, zh, Uh = rand(2, 128, 128, **half), rand(2, 128, 16, **half), rand(16, 4 * 128, **half)
    assert fw.cannot_run(xh, zh, Uh, None, 128) is None
    assert "float16 or bfloat16" in fw.cannot_run(xh.float(), zh.float(), Uh, None, 128)
    assert "multiple of 64" in fw.cannot_run(xh[:, :100], zh[:, :100], Uh, None, 128)
    assert "R <= 16" in fw.cannot_run(xh, rand(2, 128, 17, **half), rand(17, 4 * 128, **half), None, 128)
    assert "packed" in fw.cannot_run(xh, zh, Uh, torch.zeros(128, dtype=torch.int32), 128)
    assert "multiples of 64" in fw.cannot_run(xh, zh.repeat(1, 1, 4)[..., :64], rand(16, 4 * 128, **half), None, 32)
    longer = rand(2, 256, 128, **half)[:, :128]  # a batch's rows do not end where the next one's start
    assert "batches must follow" in fw.cannot_run(longer, zh, Uh, None, 128)


@interpreted
def test_lowrank_gluon_dx_says_why_it_cannot_run_here(gen, monkeypatch):
    """dx's Gluon pass needs a Hopper GPU too: elsewhere "auto" runs the Triton conv with leads, and a
    forced "gluon" (ISOFLOP_LOWRANK_DX) names what is missing."""
    from isoflop.kernels import triton_lowrank

    x, z, dy = rand(2, 64, 32, gen=gen), rand(2, 64, 4, gen=gen), rand(2, 64, 32, gen=gen)
    U, s = rand(4, 3 * 32, gen=gen), rand(3, 32, gen=gen)
    auto = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None)
    assert torch.equal(auto[0], triton_lowrank._conv(dy, z, U, s, True, None, lead=True, blocks=None))
    monkeypatch.setattr(triton_lowrank.DX_VARIANT, "name", "gluon")
    with pytest.raises(ValueError, match="ISOFLOP_LOWRANK_DX=gluon cannot run here: .*(Gluon|Hopper)"):
        triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None)


@interpreted
def test_headwise_gluon_walks_say_why_they_cannot_run_here(gen, monkeypatch):
    """The Gluon head-wise walks need a Hopper GPU; "auto" falls back to the Triton walks, and a
    forced "gluon" names what is missing, for the static conv too; the variants come checked from
    ISOFLOP_HEADWISE_FWD and ISOFLOP_HEADWISE_BWD."""
    from isoflop.kernels import triton_headwise

    x, dy, w = rand(1, 20, 32, gen=gen), rand(1, 20, 32, gen=gen), rand(1, 20, 4, 2, gen=gen)

    def both():
        return (triton_headwise.headwise_forward(x, w, None, True, None),
                triton_headwise.headwise_backward(dy, x, w, None, True, None))

    auto = both()
    monkeypatch.setattr(triton_headwise.FORWARD_VARIANT, "name", "triton")
    monkeypatch.setattr(triton_headwise.BACKWARD_VARIANT, "name", "triton")
    walk = both()
    assert torch.equal(auto[0], walk[0]) and all(torch.equal(a, b) for a, b in zip(auto[1][:2], walk[1][:2]))
    triton_headwise.FORWARD_VARIANT.set("gluon")
    with pytest.raises(ValueError, match="ISOFLOP_HEADWISE_FWD=gluon cannot run here: .*(Gluon|Hopper)"):
        triton_headwise.headwise_forward(x, w, None, True, None)
    triton_headwise.BACKWARD_VARIANT.set("gluon")
    with pytest.raises(ValueError, match="ISOFLOP_HEADWISE_BWD=gluon cannot run here: .*(Gluon|Hopper)"):
        triton_headwise.headwise_backward(dy, x, w, None, True, None)
    # The static conv takes the Gluon walk too when forced (under "auto" only where it rotates)
    with pytest.raises(ValueError, match="ISOFLOP_HEADWISE_BWD=gluon cannot run here"):
        triton_headwise.headwise_backward(dy, x, None, rand(4, 32, gen=gen), True, None)
    triton_headwise.BACKWARD_VARIANT.set("auto")
    static = triton_headwise.headwise_backward(dy, x, None, rand(4, 32, gen=gen), True, None)  # the Triton walk
    assert static[1] is None and static[2].shape == (4, 32)
    with pytest.raises(ValueError, match="allowed: auto, triton, gluon"):
        triton_headwise.BACKWARD_VARIANT.set("fast")


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, W", [("lowrank", 4), ("headwise", 4), ("static", 4),
                                     ("headwise", 6), ("static", 6)])  # W=6: the tiled head-wise kernels
def test_packed_sequences(gen, triton_backend, dtype, kind, W):
    lengths = [3, 1, 7, 2, 6]  # a length-1 document and documents shorter than W
    T, D, R, H = sum(lengths), 24, 5, 8
    inputs = dict(x=rand(1, T, D, dtype=dtype, gen=gen), static=rand(W, D, dtype=dtype, gen=gen),
                  cu_seqlens=packed_offsets(lengths))
    if kind == "lowrank":
        inputs.update(z=rand(1, T, R, dtype=dtype, gen=gen), U=rand(R, W * D, dtype=dtype, gen=gen))
    if kind == "headwise":
        inputs.update(w=rand(1, T, W, H, dtype=dtype, gen=gen))
    fn = {"lowrank": kernels.dynamic_conv_lowrank, "headwise": kernels.dynamic_conv_headwise,
          "static": kernels.static_conv}[kind]
    check_against_float64(fn, inputs, dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "D, head_size, W, with_static, residual",
    [(24, 1, 4, True, True), (24, 3, 3, False, True), (20, 4, 2, True, False), (24, 12, 1, True, True), (24, 24, 5, False, False)],
)
def test_headwise_matches_reference(gen, triton_backend, dtype, D, head_size, W, with_static, residual):
    B, T = 2, 11
    inputs = dict(
        x=rand(B, T, D, dtype=dtype, gen=gen), w=rand(B, T, W, D // head_size, dtype=dtype, gen=gen),
        static=rand(W, D, dtype=dtype, gen=gen) if with_static else None, residual=residual,
    )
    check_against_float64(kernels.dynamic_conv_headwise, inputs, dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [3, 6])  # the row-walking kernels (W <= 4) and the tiled ones
def test_static_and_explicit_filters(gen, triton_backend, dtype, W):
    B, T, D = 2, 9, 20
    x, s = rand(B, T, D, dtype=dtype, gen=gen), rand(W, D, dtype=dtype, gen=gen)
    check_against_float64(kernels.static_conv, dict(x=x, static=s), dtype)
    filters = rand(B, T, W, D, dtype=dtype, gen=gen)
    check_against_float64(kernels.short_conv, dict(x=x, filters=filters, static=s, residual=True), dtype)
    check_against_float64(kernels.short_conv, dict(x=x, filters=None, static=s), dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [1, 3, 4])
def test_decode_steps_match_reference(gen, triton_backend, dtype, W):
    B, T, D, R, H = 3, 5, 20, 5, 5
    x, s = rand(B, T, D, dtype=dtype, gen=gen), rand(W, D, dtype=dtype, gen=gen)
    z, U, w = rand(B, T, R, dtype=dtype, gen=gen), rand(R, W * D, dtype=dtype, gen=gen), rand(B, T, W, H, dtype=dtype, gen=gen)
    steps = {
        "lowrank": (kernels.dynamic_conv_lowrank_step, ref.dynamic_conv_lowrank_step, lambda t: (z[:, t], U, s)),
        "headwise": (kernels.dynamic_conv_headwise_step, ref.dynamic_conv_headwise_step, lambda t: (w[:, t], None)),
        "static": (kernels.static_conv_step, ref.static_conv_step, lambda t: (s,)),
    }
    for name, (fast, slow, args) in steps.items():
        state = ref.initial_state(x[:, :1], W)  # decoding continues a 1-token prompt
        for t in range(1, T):
            y, new_state = fast(x[:, t], state, *args(t))
            y_ref, state_ref = slow(*(a.double() if a is not None else None for a in (x[:, t], state, *args(t))))
            assert relative_error(y, y_ref) < TOLERANCE[dtype], (name, t)
            assert torch.equal(new_state, state_ref.to(dtype)), (name, t)
            state = new_state


@interpreted
def test_decode_with_gradients_falls_back_to_the_differentiable_reference(gen, triton_backend):
    x, state, s = rand(2, 8, gen=gen).requires_grad_(), rand(2, 3, 8, gen=gen), rand(4, 8, gen=gen)
    y, _ = kernels.static_conv_step(x, state, s)
    y.sum().backward()
    torch.testing.assert_close(x.grad, s[0].expand(2, 8))


@interpreted
def test_custom_ops_pass_opcheck(gen):
    """Schema, fake (meta) kernels, autograd registration and torch.compile's dispatch paths."""
    from isoflop.kernels import ops

    B, T, D, R, W = 1, 9, 16, 3, 3
    x, z, U, s = (rand(*sh, gen=gen).requires_grad_() for sh in [(B, T, D), (B, T, R), (R, W * D), (W, D)])
    cu = torch.tensor([0, 4, 9])
    cos, sin = rope_tables(T, head_dim=D)
    torch.library.opcheck(ops.lowrank_conv, (x, z, U, s, True, cu, None, None, 0, False))
    for rope_backward in (False, True):  # True: the backward op turns dy back (by ops where no kernel does)
        torch.library.opcheck(ops.lowrank_conv, (x, z, U, s, True, cu, cos, sin, D, rope_backward))
    projection = rand(B, T, 2 * D + 2 * R, gen=gen).requires_grad_()
    for statics, rope in (([s, s], (cos, sin)), ([], (None, None))):
        torch.library.opcheck(ops.lowrank_projected, (projection, [U, U], statics, W, True, None, *rope, 1))
        heads = rand(B, T, 2 * D + 2 * W * 4, gen=gen).requires_grad_()
        rotated = 1 if rope[0] is not None else 0  # packed sequences without rope
        torch.library.opcheck(ops.headwise_projected, (heads, statics, [D, D], [4, 4], W, True,
                                                       None if rotated else cu, *rope, rotated))
        torch.library.opcheck(ops.lowrank_projected_swiglu, (projection, [U, U], statics, W, True))
    torch.library.opcheck(ops.headwise_conv, (x, rand(B, T, W, 4, gen=gen).requires_grad_(), None, False, None))
    torch.library.opcheck(ops.conv_step, (x[:, 0].detach(), rand(B, W - 1, D, gen=gen), z[:, 0].detach(), U.detach(), None, s.detach(), True))


def odd_layouts(x: Tensor) -> list[Tensor]:
    """x [B, T, D]'s values in two layouts the conv ops take: padded rows (read in place, the
    kernels' row stride) and sequences apart (batch stride != T rows: copied)."""
    B, T, D = x.shape
    padded = torch.zeros(B, T, D + 5)[..., 3:3 + D].copy_(x)
    apart = torch.zeros(T, B, D + 5).permute(1, 0, 2)[..., 3:3 + D].copy_(x)
    return [padded, apart]


@interpreted
def test_lowrank_ops_take_inputs_in_any_layout(gen):
    """The low-rank ops let Inductor hand them any layout (torch.Tag.flexible_layout, so it need not
    copy its padded buffers to eager's strides; ops._takes_any_layout): rows padded, sequences
    apart, transposed storage must all give the results of contiguous inputs, bit for bit."""
    from isoflop.kernels import ops

    B, T, D, R, W = 2, 9, 32, 3, 3
    x, z, dy = rand(B, T, D, gen=gen), rand(B, T, R, gen=gen), rand(B, T, D, gen=gen)
    U, s = rand(R, W * D, gen=gen), rand(W, D, gen=gen)
    z_padded = torch.zeros(B, T, R + 13)[..., 2:2 + R].copy_(z)
    dy_transposed = torch.zeros(B, D, T).transpose(1, 2).copy_(dy)
    no_rope = (None, None, 0)
    plain = [ops.lowrank_conv(x, z, U, s, True, None, *no_rope, False),
             *ops.lowrank_conv_backward(dy, x, z, U, s, True, None, *no_rope)]
    for x_odd in odd_layouts(x):
        odd = [ops.lowrank_conv(x_odd, z_padded, U, s, True, None, *no_rope, False),
               *ops.lowrank_conv_backward(dy_transposed, x_odd, z_padded, U, s, True, None, *no_rope)]
        assert all(torch.equal(a, b) for a, b in zip(odd, plain))
    if "tags" in inspect.signature(torch.library.custom_op).parameters:  # torch >= 2.8
        for op in (torch.ops.isoflop.lowrank_conv, torch.ops.isoflop.lowrank_conv_backward):
            assert torch.Tag.flexible_layout in op.default.tags


@interpreted
@pytest.mark.parametrize("W", [3, 6])  # the row walks (up to 4 taps) and the tiled kernels
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_headwise_ops_take_inputs_in_any_layout(gen, W, dynamic, packed):
    """The head-wise and static ops, like the low-rank ones, take any layout: x with padded rows or
    sequences apart, taps w unflattened from a wider row, dy transposed must all give the results
    of contiguous inputs, bit for bit (views are read in place, other layouts copied). Heads of 3
    channels (padded to 4 lanes); packed: two documents in one row."""
    from isoflop.kernels import ops

    B, T, D, H = (1, 9, 12, 4) if packed else (2, 9, 12, 4)
    cu = torch.tensor([0, 4, 9]) if packed else None
    x, dy, s = rand(B, T, D, gen=gen), rand(B, T, D, gen=gen), rand(W, D, gen=gen)
    w = rand(B, T, W, H, gen=gen) if dynamic else None
    dy_transposed = torch.zeros(B, D, T).transpose(1, 2).copy_(dy)
    w_padded = torch.zeros(B, T, W * H + 7)[..., 5:5 + W * H].unflatten(-1, (W, H)).copy_(w) if dynamic else None
    plain = [ops.headwise_conv(x, w, s, True, cu), *ops.headwise_conv_backward(dy, x, w, s, True, cu)]
    for x_odd in odd_layouts(x):
        odd = [ops.headwise_conv(x_odd, w_padded, s, True, cu),
               *ops.headwise_conv_backward(dy_transposed, x_odd, w_padded, s, True, cu)]
        assert all(torch.equal(a, b) for a, b in zip(odd, plain))
    if "tags" in inspect.signature(torch.library.custom_op).parameters:  # torch >= 2.8
        for op in (torch.ops.isoflop.headwise_conv, torch.ops.isoflop.headwise_conv_backward):
            assert torch.Tag.flexible_layout in op.default.tags


@interpreted
@pytest.mark.parametrize("kind", ["lowrank", "headwise", "static"])
def test_compiled_code_calls_the_custom_ops_and_matches_eager(triton_backend, kind):
    """Eager calls skip the custom ops (an autograd.Function runs the kernels directly: far less
    host time per call); under torch.compile the conv must still be one opaque custom op
    (fullgraph: no break, no tracing into the launchers), whose registered autograd gives the same
    values and gradients."""
    inputs = conv_inputs(kind, 2, 9, 16, 3, torch.float32, R=3, head_size=4, device="cpu")
    leaves = [v.requires_grad_() for v in inputs.values()]
    traced = []

    def record(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def loss(**kw):
        return FUNCTIONS[kind](**kw).square().sum()

    eager_loss = loss(**inputs)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled_loss = torch.compile(loss, backend=record, fullgraph=True)(**inputs)
    op = "isoflop.lowrank_conv" if kind == "lowrank" else "isoflop.headwise_conv"
    assert any(target.startswith(op) for target in traced), traced
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled, eager in zip(torch.autograd.grad(compiled_loss, leaves), eager_grads):
        torch.testing.assert_close(compiled, eager)


def outputs_and_input_grads(fn, inputs: dict, names: tuple[str, ...]) -> list[Tensor]:
    """fn's output and the gradients of `names` for a fixed random cotangent."""
    leaves = {k: (v.detach().requires_grad_(k in names) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    y = fn(**leaves)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return [y, *torch.autograd.grad(y, [leaves[k] for k in names], cotangent)]


@interpreted
def test_lowrank_float32_parameters_give_the_half_type_products(triton_backend):
    """Autocast keeps U and the static filter in float32 while x and z are half: the kernels cast U
    to z's type before launching (it halves the pipeline's buffers for U), which must change
    nothing, since the products take U in that type anyway."""
    inputs = conv_inputs("lowrank", 2, 19, 32, 4, torch.float16, R=5, device="cpu")
    U = torch.randn(inputs["U"].shape, generator=torch.Generator().manual_seed(2)) / 5**0.5  # not fp16-exact
    inputs["static"] = inputs["static"].float()
    as_float32 = outputs_and_input_grads(kernels.dynamic_conv_lowrank, inputs | {"U": U}, ("x", "z"))
    as_half = outputs_and_input_grads(kernels.dynamic_conv_lowrank, inputs | {"U": U.half()}, ("x", "z"))
    for got, expected in zip(as_float32, as_half):
        assert torch.equal(got, expected)


@interpreted
@pytest.mark.parametrize("R", [3, 16])  # R_P stays 16 / grows to 32 for z's columns of ones
def test_lowrank_forward_keeps_a_float32_static_filter_exact(triton_backend, R):
    """The forward folds the static filter into the half-precision product as two rows of U (its
    head and the tail the rounding lost). A cancellation shows whether the tail is there:
    y = (1 + 2^-12) x[t] - x[t-1] with x = 1 is 2^-12, which the head alone (1.0 in float16) gives
    as 0."""
    B, T, D, W = 1, 6, 16, 2
    x = torch.ones(B, T, D, dtype=torch.float16)
    z, U = torch.zeros(B, T, R, dtype=torch.float16), torch.zeros(R, W * D, dtype=torch.float16)
    static = torch.stack([torch.full((D,), 1 + 2**-12), torch.full((D,), -1.0)])  # float32
    y = kernels.dynamic_conv_lowrank(x, z, U, static, residual=False)
    assert torch.equal(y[:, 1:], torch.full((B, T - 1, D), 2**-12, dtype=torch.float16))


@interpreted
def test_kernel_arguments_are_checked(gen, triton_backend):
    x = rand(2, 5, 8, gen=gen)
    with pytest.raises(ValueError, match="B == 1"):
        kernels.static_conv(x, rand(3, 8, gen=gen), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="end at T=5"):
        kernels.static_conv(x[:1], rand(3, 8, gen=gen), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        kernels.static_conv(x[:1], rand(3, 8, gen=gen), cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match="must divide D=8"):
        kernels.dynamic_conv_headwise(x, rand(2, 5, 3, 3, gen=gen))
    with pytest.raises(ValueError, match="U must be"):
        kernels.dynamic_conv_lowrank(x, rand(2, 5, 3, gen=gen), rand(3, 15, gen=gen))
    with pytest.raises(ValueError, match="G\\*R with R=3"):
        kernels.dynamic_conv_lowrank(x, rand(2, 5, 4, gen=gen), rand(3, 16, gen=gen))
    with pytest.raises(ValueError, match="multiple of 16 channels"):
        kernels.dynamic_conv_lowrank(x, rand(2, 5, 6, gen=gen), rand(3, 16, gen=gen))  # 2 groups of 4
    with pytest.raises(ValueError, match="float64"):
        kernels.static_conv(x.double(), rand(3, 8, gen=gen).double())
    with pytest.raises(ValueError, match="W=9"):
        kernels.static_conv(x, rand(9, 8, gen=gen))


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, poisoned memory, determinism, torch.compile

gpu = pytest.mark.gpu


def poison_cuda_memory():
    """Fill the caching allocator's free memory with NaN so that unwritten outputs show up."""
    blocks = [torch.full((64 << 20,), float("nan"), device="cuda") for _ in range(16)]
    del blocks


def conv_inputs(kind: str, B: int, T: int, D: int, W: int, dtype, R: int = 16, head_size: int = 16,
                packed: list[int] | None = None, seed: int = 0, device: str = "cuda") -> dict:
    g = torch.Generator().manual_seed(seed)
    on = dict(dtype=dtype, device=device, gen=g)
    inputs = dict(x=rand(B, T, D, **on), static=rand(W, D, **on) / W**0.5)
    if kind == "lowrank":
        inputs.update(z=rand(B, T, R, **on), U=rand(R, W * D, **on) / R**0.5)
    if kind == "headwise":
        inputs.update(w=rand(B, T, W, D // head_size, **on))
    if packed is not None:
        inputs["cu_seqlens"] = packed_offsets(packed).to(device)
    return inputs


FUNCTIONS = {"lowrank": kernels.dynamic_conv_lowrank, "headwise": kernels.dynamic_conv_headwise, "static": kernels.static_conv}


@gpu
@pytest.mark.parametrize(
    "kind, B, T, D, W, R, head_size, dtype",
    [
        ("lowrank", 2, 1031, 520, 4, 16, 1, torch.bfloat16),
        ("lowrank", 2, 1031, 520, 4, 16, 1, torch.float32),
        ("lowrank", 1, 777, 384, 3, 5, 1, torch.bfloat16),
        ("lowrank", 2, 300, 256, 8, 64, 1, torch.bfloat16),  # R_P * W = 512; split filter gradients
        ("lowrank", 1, 300, 256, 4, 128, 1, torch.bfloat16),  # the same at R = 128 (split kernels at 4 warps)
        ("lowrank", 2, 1031, 520, 8, 16, 1, torch.bfloat16),  # the conv's middle blocks (R_P * W = 128)
        ("lowrank", 2, 1031, 520, 4, 64, 1, torch.bfloat16),  # 256: pipelined, no longer the one-tile kernel
        # whole tiles: the forward masks only lags before the sequence's start (EVEN)
        ("lowrank", 2, 4096, 512, 4, 16, 1, torch.bfloat16),
        ("lowrank", 1, 2048, 512, 4, 16, 1, torch.float32),
        ("lowrank", 2, 2048, 512, 8, 16, 1, torch.bfloat16),
        ("lowrank", 1, 4096, 512, 4, 64, 1, torch.bfloat16),
        ("lowrank", 1, 1024, 256, 4, 128, 1, torch.bfloat16),
        ("headwise", 2, 1031, 512, 4, 1, 1, torch.bfloat16),
        ("headwise", 2, 1031, 528, 4, 1, 12, torch.bfloat16),
        ("headwise", 2, 1031, 528, 4, 1, 12, torch.float32),
        ("headwise", 2, 600, 512, 3, 1, 16, torch.bfloat16),
        ("headwise", 1, 900, 512, 4, 1, 128, torch.bfloat16),
        ("headwise", 2, 1031, 528, 6, 1, 12, torch.bfloat16),  # W > 4: the tiled kernels
        ("static", 3, 1000, 520, 4, 1, 1, torch.float32),
        ("static", 3, 1000, 520, 2, 1, 1, torch.bfloat16),
        ("static", 2, 1000, 520, 8, 1, 1, torch.bfloat16),
        ("static", 2, 2600, 520, 4, 1, 1, torch.bfloat16),  # the pipelined backward's 256-row programs
    ],
)
def test_gpu_matches_float64_reference(triton_backend, dtype, kind, B, T, D, W, R, head_size):
    poison_cuda_memory()
    inputs = conv_inputs(kind, B, T, D, W, dtype, R=R, head_size=head_size)
    check_against_float64(FUNCTIONS[kind], inputs, dtype)


@gpu
@pytest.mark.parametrize("Dg, R, dtype", [(512, 16, torch.bfloat16), (80, 5, torch.bfloat16), (192, 16, torch.float32)])
def test_gpu_lowrank_channel_groups_on_views_of_a_fused_output(triton_backend, Dg, R, dtype):
    """Three channel groups (q, k, v) read in place from one fused output; 80 channels per group
    takes narrower channel tiles than the kernels' default (tiles never straddle groups)."""
    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    B, T, G, W = 2, 1031, 3, 4
    x, z = fused_output_views(B, T, G, Dg, R, dtype, device="cuda", gen=g)
    inputs = dict(x=x, z=z, U=rand(R, W * G * Dg, dtype=dtype, device="cuda", gen=g) / R**0.5,
                  static=rand(W, G * Dg, dtype=dtype, device="cuda", gen=g) / W**0.5)
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


@gpu
@pytest.mark.parametrize("kind", ["lowrank", "headwise", "static"])
def test_gpu_packed_sequences(triton_backend, kind):
    lengths = [1, 700, 3, 1500, 2, 900]
    poison_cuda_memory()
    inputs = conv_inputs(kind, 1, sum(lengths), 512, 4, torch.bfloat16, packed=lengths)
    check_against_float64(FUNCTIONS[kind], inputs, torch.bfloat16)


@gpu
@pytest.mark.parametrize(
    "B, T, D, W, R, dtype, lengths",
    [(2, 1031, 520, 4, 16, torch.bfloat16, None), (2, 1031, 520, 4, 16, torch.float32, None),
     (1, 777, 384, 3, 5, torch.bfloat16, None), (2, 300, 256, 8, 64, torch.bfloat16, None),
     (1, 3106, 512, 4, 16, torch.bfloat16, [1, 700, 3, 1500, 2, 900])],
)
def test_gpu_split_backward_matches_float64_reference(triton_backend, split_backward, B, T, D, W, R, dtype, lengths):
    poison_cuda_memory()
    inputs = conv_inputs("lowrank", B, T, D, W, dtype, R=R, packed=lengths)
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


def lowrank_backward_inputs(B: int, T: int, G: int, Dg: int, R: int, W: int, dtype, static: bool, view: bool):
    """(dy, x, z, U, static or None) on the GPU for the low-rank backward, memory poisoned first."""
    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    on = dict(dtype=dtype, device="cuda", gen=g)
    D = G * Dg
    x, z = lowrank_x_and_z(B, T, G, Dg, R, dtype, view, g)
    dy, U = rand(B, T, D, **on), rand(R, W * D, **on) / R**0.5
    return dy, x, z, U, rand(W, D, **on) if static else None


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon filter gradients need a Hopper GPU")
@pytest.mark.parametrize(
    "B, T, G, Dg, R, W, dtype, static, lengths, view",
    [(4, 4096, 1, 2048, 16, 4, torch.bfloat16, True, None, False),  # the paper's shape
     (2, 1031, 1, 520, 16, 4, torch.bfloat16, True, None, False),  # ragged T and D (TMA's zero fill)
     (1, 777, 1, 384, 5, 3, torch.float16, True, None, False),  # R = 5
     (2, 300, 1, 256, 16, 1, torch.bfloat16, False, None, False),  # one tap, no static filter
     (2, 500, 1, 192, 8, 2, torch.float16, False, None, True),  # x a view with strided rows
     (1, 3106, 1, 512, 16, 4, torch.bfloat16, True, [1, 700, 3, 1500, 2, 900], False),  # packed
     (2, 1031, 3, 512, 16, 4, torch.bfloat16, True, None, True)],  # q, k, v groups on views
)
def test_gpu_gluon_filter_gradients_equal_the_triton_kernels(monkeypatch, B, T, G, Dg, R, W, dtype, static, lengths,
                                                             view):
    """The Gluon kernel ("auto" on Hopper, unless sequences are packed) computes what the Triton
    kernel does, bit for bit: the same df values, products and partial sums, so the Triton kernel's
    float64 tests cover both. (One after the other: side by side with dx, the kernel walks other
    time chunks; the next test.)"""
    from isoflop.kernels import ops, triton_lowrank

    monkeypatch.setattr(triton_lowrank.OVERLAP, "name", "off")
    dy, x, z, U, s = lowrank_backward_inputs(B, T, G, Dg, R, W, dtype, static, view)
    pos = ops._positions(packed_offsets(lengths).cuda(), T, x.device) if lengths else None
    assert triton_lowrank.gluon_lowrank.cannot_run(dy, x, z, U, Dg) is None
    gluon = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, pos, variant="gluon")
    fused = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, pos, variant="fused")
    auto = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, pos, variant="auto")
    for name, a, b, c in zip(["dx", "dz", "dU", "ds"], gluon, fused, auto):
        assert (a is None and b is None) or (torch.equal(a, b) and torch.equal(a, c)), name


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon kernels need a Hopper GPU")
@pytest.mark.parametrize("B, T, G, Dg, R, W, dtype, static, view", [
    (4, 4096, 1, 2048, 16, 4, torch.bfloat16, True, False),  # the paper's shape: one program per channel tile
    (8, 512, 1, 384, 16, 4, torch.bfloat16, True, True),  # a small model's: two per channel tile, on views
    (2, 1024, 3, 512, 8, 3, torch.float16, False, True),  # q, k, v groups, R = 8, no static filter
])
def test_gpu_overlapped_backward_is_the_same_launches_one_after_the_other(monkeypatch, B, T, G, Dg, R, W, dtype,
                                                                         static, view):
    """Where "auto" runs dx and the filter gradients side by side (OVERLAP), the results are those of
    the same launches one after the other, bit for bit (memory poisoned first: a buffer freed to the
    side stream too early would show); dx and dz are also the sequential backward's, and dU and ds
    differ from it only in the order their time chunks are summed."""
    from isoflop.kernels import triton_lowrank

    dy, x, z, U, s = lowrank_backward_inputs(B, T, G, Dg, R, W, dtype, static, view)
    assert triton_lowrank._overlaps(x)
    meta = triton_lowrank._meta(z, U, G * Dg, s, None)
    together = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None)
    apart = triton_lowrank._overlapped_backward(dy, x, z, U, s, True, meta, beside=False)
    monkeypatch.setattr(triton_lowrank.OVERLAP, "name", "off")
    sequential = triton_lowrank.lowrank_backward(dy, x, z, U, s, True, None)
    for name, a, b, c in zip(["dx", "dz", "dU", "ds"], together, apart, sequential):
        if a is None:
            assert b is None and c is None, name
            continue
        assert torch.equal(a, b), name
        if name in ("dx", "dz"):
            assert torch.equal(a, c), name
        else:
            assert relative_error(a, c) < TOLERANCE[dtype] / 4, name


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon kernels need a Hopper GPU")
@pytest.mark.parametrize("B, T, G, Dg, R, W, dtype, static, rotated_groups, overlap", [
    (2, 4096, 1, 1024, 16, 4, torch.bfloat16, True, 1, "auto"),  # the 300M model's q conv, side by side
    (2, 1024, 1, 1024, 16, 4, torch.bfloat16, True, 1, "off"),  # one after the other
    (8, 512, 3, 384, 16, 4, torch.bfloat16, True, 2, "auto"),  # q, k, v groups on views, q and k rotated
    (4, 512, 3, 384, 16, 4, torch.bfloat16, True, 2, "auto"),  # the same, side by side
    (2, 512, 3, 384, 8, 3, torch.float16, False, 2, "auto"),  # R = 8, 3 taps, no static filter, side by side
    (4, 512, 3, 384, 8, 3, torch.float16, False, 2, "off"),
])
def test_gpu_lowrank_rope_inside_the_kernel_equals_the_rotation_after_it(monkeypatch, triton_backend, B, T, G, Dg,
                                                                            R, W, dtype, static, rotated_groups,
                                                                            overlap):
    """The Gluon kernels' own rotation (ISOFLOP_LOWRANK_ROPE=auto: the forward's, and the backward's
    inverse rotation of dy where it runs side by side) against the forward's alone (forward: the
    same y bit for bit, dy turned back by ops) and against the rotation as separate ops (off). All
    round y, and dy turned back, to the inputs' type before going on, so they differ where the
    kernels' angles (sums of two table rows) round the last bit differently; and the fused one
    against float64."""
    from isoflop.kernels import triton_lowrank

    monkeypatch.setattr(triton_lowrank.OVERLAP, "name", overlap)
    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    x, z = lowrank_x_and_z(B, T, G, Dg, R, dtype, view=G > 1, gen=g)
    on = dict(dtype=dtype, device="cuda", gen=g)
    inputs = dict(x=x, z=z, U=rand(R, W * G * Dg, **on) / R**0.5, static=rand(W, G * Dg, **on) if static else None,
                  rope=rope_tables(T, device="cuda"), rope_channels=rotated_groups * Dg)
    assert triton_lowrank.rope_fuses(x, z, inputs["U"], head_dim=64, packed=False)
    assert triton_lowrank.backward_rotates(x, inputs["rope"]) == triton_lowrank._overlaps(x)
    results, grads = {}, ("x", "z", "U", "static") if static else ("x", "z", "U")
    for fusion in ("auto", "forward", "off"):
        monkeypatch.setattr(triton_lowrank.ROPE, "name", fusion)
        results[fusion] = outputs_and_input_grads(kernels.dynamic_conv_lowrank, inputs, grads)
    assert torch.equal(results["auto"][0], results["forward"][0])
    for other in ("forward", "off"):
        for name, fused, apart in zip(["y", "dx", "dz", "dU", "ds"], results["auto"], results[other]):
            assert relative_error(fused, apart.double()) < TOLERANCE[dtype] / 20, (other, name)
    monkeypatch.setattr(triton_lowrank.ROPE, "name", "auto")
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, dtype)


@gpu
@pytest.mark.parametrize("B, T, channels, R, W, dtype, static, rotated, heads", [
    (8, 4096, [1024] * 3, 16, 4, torch.bfloat16, True, 2, None),  # the 300M model's q, k, v (side by side on Hopper)
    (2, 4096, [2752] * 2, 16, 4, torch.bfloat16, True, 0, None),  # its gate and up (one after the other)
    (4, 512, [384], 8, 3, torch.float16, False, 0, None),  # one conv, R = 8, 3 taps, no static filter
    (8, 1024, [1024] * 3, 0, 4, torch.bfloat16, True, 0, [64] * 3),  # head-wise q, k, v, heads of 16 (Gluon walk)
    (2, 512, [768, 384], 0, 3, torch.float16, False, 0, [96, 12]),  # heads of 8 and 32, no static filter
    (2, 512, [256], 0, 6, torch.bfloat16, True, 0, [16]),  # 6 taps: the tiled Triton kernel, copied into place
])
def test_gpu_convs_of_a_projection_equal_the_convs_one_by_one(triton_backend, B, T, channels, R, W, dtype, static,
                                                              rotated, heads):
    """On the GPU too the one op repeats the convs one by one bit for bit, with dx (and dw) stored
    into the projection's gradient in place where the Gluon kernels run (poisoned memory: every
    column of the gradient must be written)."""
    poison_cuda_memory()
    inputs = projected_convs(B, T, channels, R, W, static, rotated, dtype, device="cuda",
                             gen=torch.Generator().manual_seed(0), heads=heads)
    projected, one_by_one = projected_and_one_by_one(inputs)
    for a, b in zip(projected, one_by_one):
        assert torch.equal(a, b)


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon walks need a Hopper GPU")
@pytest.mark.parametrize("B, T, channels, heads, W, head_dim, dtype, static, rotated", [
    (8, 4096, [1024] * 3, [64] * 3, 4, 128, torch.bfloat16, True, 2),  # the 300M model's q, k, v, heads of 16
    (2, 1000, [1024] * 3, [128] * 3, 4, 64, torch.bfloat16, True, 2),  # heads of 8 in RoPE heads of 64, ragged T
    (2, 777, [512, 512], [16, 8], 3, 128, torch.float16, False, 1),  # heads of 32 and 64, 3 taps, no static
    (1, 300, [2048], [128], 2, 256, torch.bfloat16, True, 1),  # RoPE heads of 256 (halves of 128)
    (2, 1000, [768] * 3, [48] * 3, 4, 64, torch.bfloat16, True, 2),  # the 150M model's: D an odd multiple of 256
])
def test_gpu_headwise_rope_inside_the_walks_equals_the_rotation_after_them(monkeypatch, triton_backend, B, T,
                                                                          channels, heads, W, head_dim, dtype,
                                                                          static, rotated):
    """The Gluon walks' own rotation (ISOFLOP_HEADWISE_ROPE=auto: the forward rotates y before it
    stores it, the backward turns each row of dy back as it reads it) against float64 and against
    the rotation by ops around the op (off). The walks round y once, after the rotation, where the
    ops round it before and after: the two differ by about a rounding."""
    from isoflop.kernels import triton_headwise

    poison_cuda_memory()
    inputs = projected_convs(B, T, channels, 0, W, static, rotated, dtype, device="cuda",
                             gen=torch.Generator().manual_seed(0), heads=heads, head_dim=head_dim)
    views = ops_views(inputs)
    assert all(triton_headwise.rope_fuses(x, w, inputs["rope"], packed=False, width=W) for x, w in views[:rotated])
    fused, cotangents = projected_with_grads(inputs)
    monkeypatch.setattr(triton_headwise.ROPE, "name", "off")
    apart, _ = projected_with_grads(inputs, cotangents)
    kernels.set_backend("reference")
    exact, _ = projected_with_grads(in_double(inputs), [c.double() for c in cotangents])
    for i, (a, b, c) in enumerate(zip(fused, apart, exact)):
        assert relative_error(a, c) < TOLERANCE[dtype] / 4, i
        assert relative_error(a, b.double()) < TOLERANCE[dtype] / 4, i


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon walks need a Hopper GPU")
@pytest.mark.parametrize("B, T, D, rotated, W, head_dim, dtype, residual", [
    (8, 4096, 3072, 2048, 4, 64, torch.bfloat16, True),  # the 300M model's q, k, v: q and k rotated
    (2, 1000, 1536, 1024, 3, 128, torch.float16, False),  # ragged T, 3 taps, RoPE heads of 128
    (1, 300, 512, 512, 2, 32, torch.bfloat16, True),  # all channels rotated, RoPE heads of 32
    (2, 1000, 2304, 1536, 4, 64, torch.bfloat16, True),  # the 150M model's: a half last program, not rotated
    (1, 300, 768, 768, 3, 32, torch.float16, False),  # all of an odd multiple of 256 rotated
])
def test_gpu_static_conv_rotates_inside_the_gluon_walks(monkeypatch, triton_backend, B, T, D, rotated, W,
                                                        head_dim, dtype, residual):
    """static-qkv's one conv over q, k and v rotates q's and k's channels inside the Gluon walks
    (ISOFLOP_HEADWISE_ROPE=auto, which the static conv takes only to rotate): y and the gradients
    of x and the filter against float64 and against the Triton walk with RoPE by ops after it (off)."""
    from isoflop.kernels import reference as ref
    from isoflop.kernels import triton_headwise

    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    x, dy = rand(B, T, D, dtype=dtype, device="cuda", gen=g), rand(B, T, D, dtype=dtype, device="cuda", gen=g)
    s = rand(W, D, device="cuda", gen=g) / W**0.5  # float32, as autocast keeps parameters
    rope = rope_tables(T, head_dim, "cuda")
    assert triton_headwise.rope_fuses(x, None, rope, packed=False, width=W, rope_channels=rotated)
    assert kernels.static_conv_rotates(x, s, rope, rope_channels=rotated)

    def run():
        xs, ss = x.detach().requires_grad_(), s.detach().requires_grad_()
        y = kernels.static_conv(xs, ss, residual=residual, rope=rope, rope_channels=rotated)
        y.backward(dy)
        return y, xs.grad, ss.grad

    fused = run()
    monkeypatch.setattr(triton_headwise.ROPE, "name", "off")
    apart = run()
    xe, se = x.double().requires_grad_(), s.double().requires_grad_()
    ye = ref.static_conv(xe, se, residual=residual, rope=tuple(t.double() for t in rope), rope_channels=rotated)
    ye.backward(dy.double())
    for name, a, b, e in zip(("y", "dx", "ds"), fused, apart, (ye, xe.grad, se.grad)):
        assert relative_error(a, e) < TOLERANCE[dtype] / 4, name
        assert relative_error(a, b.double()) < TOLERANCE[dtype] / 4, name


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon walks need a Hopper GPU")
@pytest.mark.parametrize("B, T, D, W, dtype, view", [
    (4, 4096, 2048, 4, torch.bfloat16, False),  # the paper's shape
    (2, 777, 1536, 3, torch.float16, True),  # ragged T, 3 taps, x a view of a wider projection
])
def test_gpu_static_gluon_walk_equals_the_triton_walk(monkeypatch, triton_backend, B, T, D, W, dtype, view):
    """The static conv through the Gluon walk (no dynamic taps: HAS_W off), forced with
    ISOFLOP_HEADWISE_FWD/BWD=gluon, against float64 and as close to it as the Triton walk."""
    from isoflop.kernels import reference as ref
    from isoflop.kernels import triton_headwise

    poison_cuda_memory()
    g = torch.Generator().manual_seed(1)
    x = rand(B, T, D + 8, dtype=dtype, device="cuda", gen=g)[..., :D] if view else rand(B, T, D, dtype=dtype,
                                                                                         device="cuda", gen=g)
    dy, s = rand(B, T, D, dtype=dtype, device="cuda", gen=g), rand(W, D, device="cuda", gen=g) / W**0.5

    def run(variant: str):
        for choice in (triton_headwise.FORWARD_VARIANT, triton_headwise.BACKWARD_VARIANT):
            monkeypatch.setattr(choice, "name", variant)
        xs, ss = x.detach().requires_grad_(), s.detach().requires_grad_()
        y = kernels.static_conv(xs, ss, residual=True)
        y.backward(dy)
        return y, xs.grad, ss.grad

    gluon, walk = run("gluon"), run("triton")
    xe, se = x.double().requires_grad_(), s.double().requires_grad_()
    ye = ref.static_conv(xe, se, residual=True)
    ye.backward(dy.double())
    for name, a, b, e in zip(("y", "dx", "ds"), gluon, walk, (ye, xe.grad, se.grad)):
        assert a.dtype == b.dtype, name
        assert relative_error(a, e) < max(2 * relative_error(b, e), TOLERANCE[dtype] / 4), name


def ops_views(inputs: dict) -> list[tuple[Tensor, Tensor]]:
    """(x, w) of each head-wise conv of projected_convs' inputs, as the op reads them."""
    from isoflop.kernels import ops

    return ops._headwise_views(inputs["projection"], inputs["channels"], inputs["heads"], inputs["width"])


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon forward needs a Hopper GPU")
@pytest.mark.parametrize("B, T, G, Dg, R, W, dtype, static, residual, view", [
    (4, 4096, 1, 2048, 16, 4, torch.bfloat16, True, True, False),  # the paper's shape
    (2, 1024, 1, 520, 16, 4, torch.bfloat16, True, True, False),  # ragged D: TMA's zero fill, clipped stores
    (1, 192, 1, 384, 8, 3, torch.float16, True, False, False),  # R = 8 (z's rows 16 bytes), 3 tiles, no residual
    (2, 64, 1, 256, 16, 1, torch.bfloat16, False, True, False),  # one tap, one tile
    (2, 1024, 3, 512, 16, 4, torch.bfloat16, True, True, True),  # q, k, v groups read in place from a projection
])
def test_gpu_gluon_lowrank_forward_matches_float64_and_the_triton_kernel(monkeypatch, B, T, G, Dg, R, W, dtype,
                                                                         static, residual, view):
    """The Gluon forward (ISOFLOP_LOWRANK_FWD; "auto" on Hopper) against float64 and the Triton
    kernel, whose results it repeats bit for bit without a static filter (with one, the Triton kernel
    folds it into its product, and the Gluon one adds it in registers); at any number of tiles per
    program."""
    from isoflop.kernels import gluon_lowrank_conv as fw
    from isoflop.kernels import triton_lowrank

    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    on = dict(dtype=dtype, device="cuda", gen=g)
    D = G * Dg
    x, z = lowrank_x_and_z(B, T, G, Dg, R, dtype, view, g)
    U, s = rand(R, W * D, **on) / R**0.5, rand(W, D, **on) / W**0.5 if static else None
    assert fw.cannot_run(x, z, U, None, Dg) is None
    got = fw.forward(x, z, U, s, residual, Dg)
    want = triton_lowrank._conv(x, z, U, s, residual, None, lead=False, blocks=None)
    y = ref.dynamic_conv_lowrank(x.double(), z.double(), U.double(), s.double() if static else None, residual=residual)
    assert got.is_contiguous() and got.dtype == dtype
    assert relative_error(got, y) < max(2 * relative_error(want, y), TOLERANCE[dtype] / 4)
    if not static:
        assert torch.equal(got, want)
    for chunk in (1, 2, 3):  # 3: a shorter last chunk where the tiles do not divide into chunks of 3
        assert torch.equal(fw.forward(x, z, U, s, residual, Dg, chunk=chunk), got), chunk
    for variant in ("gluon", "auto"):  # what both select
        monkeypatch.setattr(triton_lowrank.FORWARD_VARIANT, "name", variant)
        assert torch.equal(triton_lowrank.lowrank_forward(x, z, U, s, residual, None), got)


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon dx needs a Hopper GPU")
@pytest.mark.parametrize("B, T, G, Dg, R, W, dtype, static, residual, chunk", [
    (4, 4096, 1, 2048, 16, 4, torch.bfloat16, True, True, None),  # the paper's shape
    (2, 1024, 1, 520, 16, 4, torch.bfloat16, False, True, 4),  # ragged D; chunks that end before their sequence
    (1, 192, 1, 384, 8, 3, torch.float16, True, False, 1),  # R = 8, one tile per program, no residual
    (2, 64, 1, 256, 16, 1, torch.bfloat16, False, True, None),  # one tap, one tile
    (2, 1024, 3, 512, 16, 4, torch.bfloat16, True, True, 2),  # q, k, v groups, z read in place
])
def test_gpu_gluon_lowrank_dx_matches_float64_and_the_triton_kernel(monkeypatch, B, T, G, Dg, R, W, dtype,
                                                                    static, residual, chunk):
    """The Gluon dx (ISOFLOP_LOWRANK_DX; "auto" on Hopper) against float64 and the Triton dx, whose
    results it repeats bit for bit without a static filter (with one, the Triton dx adds s in float32
    and the Gluon one its half-precision head and tail); at any number of tiles per program."""
    from isoflop.kernels import gluon_lowrank_conv as gc
    from isoflop.kernels import triton_lowrank

    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    on = dict(dtype=dtype, device="cuda", gen=g)
    D = G * Dg
    x, z = lowrank_x_and_z(B, T, G, Dg, R, dtype, view=G > 1, gen=g)
    dy, U = rand(B, T, D, **on), rand(R, W * D, **on) / R**0.5
    s = rand(W, D, **on) / W**0.5 if static else None
    assert gc.cannot_run(dy, z, U, None, Dg) is None
    got = gc.dx(dy, z, U, s, residual, Dg, chunk=chunk)
    want = triton_lowrank._conv(dy, z, U, s, residual, None, lead=True, blocks=None)
    x64 = x.double().requires_grad_()
    ref.dynamic_conv_lowrank(x64, z.double(), U.double(), s.double() if static else None,
                             residual=residual).backward(dy.double())
    assert got.is_contiguous() and got.dtype == dtype
    assert relative_error(got, x64.grad) < max(2 * relative_error(want, x64.grad), TOLERANCE[dtype] / 4)
    if not static:
        assert torch.equal(got, want)
    for chunk in (1, 3):  # 3: a shorter last chunk where the tiles do not divide into chunks of 3
        assert torch.equal(gc.dx(dy, z, U, s, residual, Dg), gc.dx(dy, z, U, s, residual, Dg, chunk=chunk)), chunk
    monkeypatch.setattr(triton_lowrank.DX_VARIANT, "name", "auto")
    assert torch.equal(triton_lowrank.lowrank_backward(dy, x, z, U, s, residual, None)[0], got)  # what "auto" takes


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon SwiGLU kernel needs a Hopper GPU")
@pytest.mark.parametrize("B, T, C, R, W, dtype, static, residual", [
    (4, 4096, 2816, 16, 4, torch.bfloat16, True, True),  # the 300M model's MLP at 16k tokens
    (2, 1024, 520, 16, 4, torch.bfloat16, True, True),  # ragged C: TMA's zero fill, clipped stores
    (1, 192, 384, 8, 3, torch.float16, False, False),  # R = 8, no static filter, no residual
    (2, 64, 256, 16, 1, torch.bfloat16, True, True),  # one tap, one tile
])
def test_gpu_swiglu_kernel_matches_float64_and_the_convs_then_the_swiglu(B, T, C, R, W, dtype, static, residual):
    """gluon_lowrank_swiglu's h against float64, within twice the error of the convs' own kernels
    followed by the SwiGLU in float32; the convs' outputs it saves are the conv kernel's bit for bit;
    the same bits at any number of tiles per program and without saving; and the op's gradients are
    those of the convs' op followed by the SwiGLU."""
    from isoflop.kernels import gluon_lowrank_swiglu as gs
    from isoflop.kernels import ops

    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    inputs = projected_convs(B, T, [C, C], R, W, static, 0, dtype, device="cuda", gen=g)
    projection, ups, statics = inputs["projection"], inputs["ups"], inputs["statics"] or []
    operands = ops._swiglu_operands(projection, ups, statics, W)
    assert gs.cannot_run(*operands[:6]) is None
    h, gate, up = gs.forward(*operands, residual)
    h64 = swiglu_of_reference_convs(projection, ups, statics, W, residual)[0]
    apart = ops._lowrank_projected(projection, ups, statics, W, residual, None, None, None, 0)
    assert torch.equal(gate, apart[0]) and torch.equal(up, apart[1])
    swiglu_apart = (torch.nn.functional.silu(apart[0].float()) * apart[1].float()).to(dtype)
    assert h.dtype == dtype and h.is_contiguous()
    assert relative_error(h, h64) < max(2 * relative_error(swiglu_apart, h64), TOLERANCE[dtype] / 4)
    assert torch.equal(gs.forward(*operands, residual, save=False)[0], h)
    for chunk in (1, 3):  # 3: a shorter last chunk where the tiles do not divide into chunks of 3
        assert all(map(torch.equal, gs.forward(*operands, residual, chunk=chunk), (h, gate, up))), chunk
    leaves = [projection.detach().requires_grad_(), *(t.detach().requires_grad_() for t in (*ups, *statics))]
    dh = rand(B, T, C, dtype=dtype, device="cuda", gen=g)
    fused = torch.autograd.grad(kernels.dynamic_convs_lowrank_swiglu(
        leaves[0], leaves[1:3], leaves[3:] or None, width=W, residual=residual), leaves, dh)
    gate, up = kernels.dynamic_convs_lowrank(leaves[0], leaves[1:3], leaves[3:] or None, width=W, residual=residual)
    unfused = torch.autograd.grad((torch.nn.functional.silu(gate.float()) * up.float()).to(dtype), leaves, dh)
    for got, want in zip(fused, unfused):
        assert relative_error(got, want.double()) < TOLERANCE[dtype] / 4


@gpu
@pytest.mark.skipif(not hopper(), reason="the Gluon head-wise walks need a Hopper GPU")
@pytest.mark.parametrize("B, T, D, hs, W, static, residual, dtype, view", [
    (2, 1000, 1024, 16, 4, True, True, torch.bfloat16, False),  # ragged T: the last program's rows
    (1, 300, 512, 8, 3, False, True, torch.float16, False),
    (2, 517, 1536, 64, 2, True, False, torch.bfloat16, True),  # x and w read in place from a projection
    (3, 64, 512, 32, 1, True, True, torch.bfloat16, False),
    (2, 1000, 768, 16, 4, True, True, torch.bfloat16, True),  # D an odd multiple of 256: a half last program
])
def test_gpu_gluon_headwise_walks_match_float64_reference(B, T, D, hs, W, static, residual, dtype, view):
    """The Gluon head-wise forward and backward against float64 (and the Triton walks' own errors),
    including views whose rows lie apart, as the fused q/k/v projection gives them."""
    from isoflop.kernels import gluon_headwise, triton_headwise

    poison_cuda_memory()
    g = torch.Generator().manual_seed(0)
    on = dict(dtype=dtype, device="cuda", gen=g)
    H = D // hs
    if view:  # [B, T, D + W*H + 8] projection; x and w are slices of its rows
        proj = rand(B, T, D + W * H + 8, **on)
        x, w = proj[..., :D], proj[..., D:D + W * H].unflatten(-1, (W, H))
    else:
        x, w = rand(B, T, D, **on), rand(B, T, W, H, **on)
    dy, s = rand(B, T, D, **on), rand(W, D, **on) / W**0.5 if static else None
    assert gluon_headwise.cannot_run(dy, x, w, None, W) is None
    assert gluon_headwise.cannot_run(None, x, w, None, W) is None
    got = gluon_headwise.backward(dy, x, w, s, residual)
    meta = triton_headwise._meta(x, w, s, None, W) | {"RESIDUAL": residual}
    blocks = {way: triton_headwise._row_blocks(T, D, hs, backward=way, dense=meta["DENSE"]) for way in (False, True)}
    walk = triton_headwise.rows.rows_backward(dy, x, w, s, None, meta, blocks[True])
    exact = [t.detach().double().requires_grad_() for t in (x, w, s if static else x)]
    y = ref.short_conv(exact[0], ref.headwise_filters(exact[1], hs), exact[2] if static else None, residual=residual)
    y.backward(dy.double())
    y_got = gluon_headwise.forward(x, w, s, residual)
    y_walk = triton_headwise.rows.rows_forward(x, w, s, None, meta, blocks[False])
    assert y_got.is_contiguous() and y_got.dtype == dtype
    assert relative_error(y_got, y) < max(2 * relative_error(y_walk, y), TOLERANCE[dtype] / 4)
    for name, a, b, e in zip(["dx", "dw", "ds"], got, walk, exact):
        if name == "ds" and not static:
            assert a is None
            continue
        assert a.is_contiguous() and a.dtype == dtype, name
        assert relative_error(a, e.grad) < max(2 * relative_error(b, e.grad), TOLERANCE[dtype] / 4), name


@gpu
def test_gpu_mixed_dtypes_as_under_autocast(triton_backend):
    """Autocast gives bf16 activations and float32 parameters (U, static)."""
    inputs = conv_inputs("lowrank", 2, 512, 512, 4, torch.bfloat16)
    inputs["U"], inputs["static"] = inputs["U"].float() * 1.01, inputs["static"].float()  # U not bf16-exact
    check_against_float64(kernels.dynamic_conv_lowrank, inputs, torch.bfloat16)
    # ... and the same as with U rounded to bf16 first (the products' type; the kernels cast it)
    as_float32 = outputs_and_input_grads(kernels.dynamic_conv_lowrank, inputs, ("x", "z"))
    as_bf16 = outputs_and_input_grads(kernels.dynamic_conv_lowrank, inputs | {"U": inputs["U"].bfloat16()}, ("x", "z"))
    assert all(torch.equal(got, expected) for got, expected in zip(as_float32, as_bf16))


@gpu
@pytest.mark.parametrize("kind", ["lowrank", "lowrank split", "headwise", "static"])
def test_gpu_backward_is_bit_reproducible(request, triton_backend, kind):
    if kind == "lowrank split":
        request.getfixturevalue("split_backward")
        kind = "lowrank"
    inputs = conv_inputs(kind, 2, 2048, 1024, 4, torch.bfloat16)
    every_input = tuple(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
    first = outputs_and_input_grads(FUNCTIONS[kind], inputs, every_input)
    second = outputs_and_input_grads(FUNCTIONS[kind], inputs, every_input)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("kind", ["lowrank", "headwise"])
def test_gpu_torch_compile_traces_without_graph_breaks(kind):
    inputs = conv_inputs(kind, 2, 256, 256, 4, torch.bfloat16)
    leaves = [v.requires_grad_() for v in inputs.values() if isinstance(v, torch.Tensor)]

    def model(**kw):
        return (FUNCTIONS[kind](**kw).float() * 2.0).square().mean()

    compiled = torch.compile(model, fullgraph=True)
    eager_grads = torch.autograd.grad(model(**inputs), leaves)
    compiled_grads = torch.autograd.grad(compiled(**inputs), leaves)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


@gpu
@pytest.mark.parametrize("W", [1, 4])
def test_gpu_decode_matches_full_sequence(triton_backend, W):
    B, T, D, R = 4, 16, 520, 16
    inputs = conv_inputs("lowrank", B, T, D, W, torch.bfloat16, R=R)
    x, z, U, s = inputs["x"], inputs["z"], inputs["U"], inputs["static"]
    full = ref.dynamic_conv_lowrank(*(t.double() for t in (x, z, U, s)))
    state = torch.zeros(B, W - 1, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for t in range(T):
            y, state = kernels.dynamic_conv_lowrank_step(x[:, t], state, z[:, t], U, s)
            assert relative_error(y, full[:, t]) < TOLERANCE[torch.bfloat16]
    assert torch.equal(state, ref.initial_state(x, W))


def test_conv_blocks_fit_the_sequence_and_the_filter_width():
    """The pipelined conv walks no more tiles than the sequence has, and wide filters (whose
    pipeline buffers would overflow shared memory or spill) take the unpipelined kernel."""
    if INTERPRETING:
        pytest.skip("the interpreter has its own tiny blocks")
    from isoflop.kernels.triton_lowrank import _conv_blocks

    paper = _conv_blocks(4096, 16, 4, lead=False, fp32=False)
    assert paper["STAGES"] > 1 and paper["CHUNK"] > 1
    short = _conv_blocks(100, 16, 4, lead=False, fp32=False)
    tiles = -(-100 // short["BLOCK_T"])
    assert tiles <= short["CHUNK"] < 2 * tiles  # CHUNK is a power of two (one compile per value)
    assert _conv_blocks(4096, 64, 8, lead=True, fp32=False)["STAGES"] > 1
    widest = _conv_blocks(4096, 128, 8, lead=True, fp32=False)
    assert (widest["CHUNK"], widest["STAGES"]) == (1, 1)
    assert _conv_blocks(4096, 16, 4, lead=False, fp32=True)["BLOCK_D"] < paper["BLOCK_D"]


def test_row_blocks_pipeline_the_backward_and_cap_narrow_forwards():
    """The row walks' blocks as measured (KERNELS.md, v24): the static conv's and wide heads'
    backwards walk pipelined (fewer rows per program on short sequences), narrow heads' dense
    forwards are capped to keep 16 programs per multiprocessor, and views keep their own rule."""
    if INTERPRETING:
        pytest.skip("the interpreter has its own tiny blocks")
    from isoflop.kernels.triton_headwise import _row_blocks

    wide = _row_blocks(4096, 2048, 16, backward=True)
    assert wide["STAGES"] > 1 and wide["ROWS"] > _row_blocks(512, 2048, 16, backward=True)["ROWS"]
    assert _row_blocks(4096, 2048, 1, backward=False, dynamic=False, dense=True).get("maxnreg") is None
    assert _row_blocks(4096, 2048, 1, backward=True, dynamic=False)["STAGES"] > 1
    assert _row_blocks(4096, 2048, 4, backward=False)["maxnreg"] == 64
    assert "maxnreg" not in _row_blocks(4096, 2048, 4, backward=False, dense=False)
    assert _row_blocks(4096, 2048, 16, backward=False, dense=False)["maxnreg"] == 128
    assert _row_blocks(4096, 2048, 4, backward=True)["STAGES"] == 1


def test_conv_blocks_fit_the_grid():
    """The forward halves CHUNK while its grid has fewer programs than multiprocessors, and walks 4
    stages deep only with 64 x 64 tiles on grids of at most two programs per multiprocessor, where
    the fourth stage's shared memory costs no occupancy; dx (narrow filters) walks 4 stages deep and
    halves CHUNK while its programs take more than one wave and the last would be under 80% full
    (KERNELS.md, v19), or while they are fewer than the multiprocessors, as the forward (v23)."""
    from isoflop.kernels.triton_lowrank import _fill_processors

    fwd = {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 4, "CHUNK": 32, "STAGES": 3}
    dx = {"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4, "CHUNK": 16, "STAGES": 3}

    def fill(T, D, B, blocks=fwd, processors=132, width=64):
        return _fill_processors(dict(blocks), T, D, B, processors, lead=blocks is dx, width=width)

    assert fill(4096, 2048, 4) == fwd | {"STAGES": 4}  # 256 programs: CHUNK stays
    assert fill(4096, 2048, 8) == fwd  # 512 programs, 4 per multiprocessor: 3 stages
    assert fill(2048, 1024, 8) == fwd | {"CHUNK": 16, "STAGES": 4}  # 128 -> 256 programs
    assert fill(4096, 2048, 1) == fwd | {"CHUNK": 8}  # 64 -> 256 programs; short walks: 3 stages
    assert fill(64, 64, 1)["CHUNK"] == 2  # U stays loaded once per program
    assert fill(4096, 2048, 4, processors=64) == fwd  # a smaller chip: 4 programs per processor
    narrow = fwd | {"BLOCK_T": 32, "CHUNK": 16}
    assert fill(4096, 1024, 1, blocks=narrow) == narrow | {"CHUNK": 8}  # other tiles: stages as given
    assert fill(4096, 2048, 4, blocks=dx) == dx | {"STAGES": 4}  # 1024 programs in 396 slots: 86%
    assert fill(2048, 1024, 8, blocks=dx) == dx | {"CHUNK": 8, "STAGES": 4}  # 512 (65%) -> 1024
    assert fill(4096, 2048, 1, blocks=dx) == dx | {"STAGES": 4}  # 256 programs: one wave
    assert fill(4096, 2048, 1, blocks=dx, processors=40)["CHUNK"] == 8  # 256 in 120 slots (71%) -> 512
    assert fill(4096, 2048, 4, blocks=dx, width=128) == dx  # wider filters: as swept (v16)
    assert fill(3000, 256, 1, blocks=dx) == dx | {"CHUNK": 2, "STAGES": 4}  # 24 -> 188 programs
    assert fill(512, 384, 8, blocks=dx) == dx | {"CHUNK": 4, "STAGES": 4}  # a small model's: 48 -> 192


def test_kernels_compile_offline_for_hopper_and_report_their_resources(tmp_path):
    """benchmarks/kernel_resources.py: every kernel compiles for sm_90 without a GPU (Triton's own
    ptxas) and its resource usage is read back."""
    if INTERPRETING:
        pytest.skip("compiles for real; runs in the non-interpreted process")
    script = Path(__file__).parent.parent / "benchmarks" / "kernel_resources.py"
    out = subprocess.run([sys.executable, str(script), "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=300,
                         env=os.environ | {"TRITON_DEFAULT_FP_FUSION": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    lowrank = ["low-rank forward", "low-rank dx (lead)", "low-rank filter grads", "low-rank dz (split)",
               "low-rank dU (split)"]
    assert [row["kernel"] for row in rows][:5] == lowrank
    assert len(rows) == 32 and all(0 < row["registers"] <= 255 for row in rows)
    # The head-wise walks rotating y and turning dy back (RoPE) compile without spills, and so do
    # the static conv's (the same walks without dynamic taps), D an odd multiple of 256 included.
    walks = [row for row in rows if row["kernel"].startswith(("head-wise", "static")) and "rope" in row["kernel"]]
    assert len(walks) == 6 and all(row["stack_bytes"] == 0 for row in walks)
    # The Gluon filter gradients (Triton >= 3.6 has Gluon's Hopper ops) compile, without spills, and
    # fit two programs per multiprocessor (228 KB of shared memory; 80 registers per thread at launch,
    # which its warp-specialised partitions share out). Triton 3.9 keeps one value on the stack across
    # the partitions (8 bytes, a few loads per tile), 3.6 none.
    gluon = [row for row in rows if row["kernel"] == "low-rank filter grads (gluon)"]
    assert len(gluon) == 1 and gluon[0]["shared_bytes"] <= 113 * 1024 and gluon[0]["stack_bytes"] <= 8
    assert gluon[0]["registers"] * gluon[0]["num_warps"] * 3 * 2 <= 2048  # 12 warps, two programs
    # The Gluon forward fits three programs per multiprocessor: registers and shared memory (65 KB:
    # no static filter operands since v39, which adds s_k in registers).
    forward = [row for row in rows if row["kernel"] == "low-rank forward (gluon)"]
    assert len(forward) == 1 and forward[0]["stack_bytes"] == 0
    assert forward[0]["registers"] <= 168 and forward[0]["shared_bytes"] <= 65 * 1024
    # Rotating y (RoPE), two, without spills: the next tile's angles stay in registers through a tile.
    rotating = [row for row in rows if row["kernel"] == "low-rank forward (gluon, rope)"]
    assert len(rotating) == 1 and rotating[0]["stack_bytes"] == 0 and rotating[0]["registers"] <= 255
    assert rotating[0]["shared_bytes"] <= 113 * 1024
    # Its dx, two (its leads keep 15 more registers across tiles: 190 on Triton 3.6; capped at 168, it
    # spilled and lost, KERNELS.md v28).
    dx = [row for row in rows if row["kernel"] == "low-rank dx (gluon)"]
    assert len(dx) == 1 and dx[0]["stack_bytes"] == 0
    assert dx[0]["registers"] <= 255 and dx[0]["shared_bytes"] <= 113 * 1024
    # The gate's and up's convs with their SwiGLU (and its input gradients), two programs each,
    # without spills: both convs' rings in one program.
    swiglu = [row for row in rows if row["kernel"].startswith("low-rank SwiGLU")]
    assert len(swiglu) == 2 and all(row["stack_bytes"] == 0 for row in swiglu)
    assert all(row["registers"] <= 255 and row["shared_bytes"] <= 113 * 1024 for row in swiglu)
    # Side by side (the overlapped backward), one filter-gradient program with its longer ring and one
    # dx program share a multiprocessor: 65,536 registers, 228 KB less 1 KB per program.
    beside = [row for row in rows if row["kernel"] == "low-rank filter grads (gluon, beside dx)"]
    assert len(beside) == 1 and beside[0]["stack_bytes"] <= 8
    assert beside[0]["shared_bytes"] + dx[0]["shared_bytes"] <= 226 * 1024
    per_thread = 8 * -(-dx[0]["registers"] // 8)  # registers are allocated in steps of 8
    assert beside[0]["registers"] * beside[0]["num_warps"] * 3 * 32 + per_thread * dx[0]["num_warps"] * 32 <= 65536
    # So do the two when they turn dy back (RoPE's gradient, v33): dx capped at 224 registers, the
    # filter gradients at 96 per thread at launch (Triton 3.9 keeps 16 bytes on the stack, 3.6 8).
    by_name = {row["kernel"]: row for row in rows}
    dx_rope, beside_rope = by_name["low-rank dx (gluon, rope)"], by_name["low-rank filter grads (gluon, rope)"]
    assert dx_rope["stack_bytes"] == 0 and beside_rope["stack_bytes"] <= 16
    assert beside_rope["shared_bytes"] + dx_rope["shared_bytes"] <= 226 * 1024
    assert (beside_rope["registers"] * beside_rope["num_warps"] * 3 * 32
            + 8 * -(-dx_rope["registers"] // 8) * dx_rope["num_warps"] * 32) <= 65536
    # The Gluon head-wise backward too, in under 192 registers (5 programs of 2 warps per multiprocessor),
    # and its forward in under 128 (8 programs).
    walks = {row["kernel"]: row for row in rows if row["kernel"].endswith("(gluon)") and "head-wise" in row["kernel"]}
    assert sorted(walks) == ["head-wise hs=16 backward (gluon)", "head-wise hs=16 forward (gluon)"]
    assert all(row["stack_bytes"] == 0 for row in walks.values())
    assert walks["head-wise hs=16 backward (gluon)"]["registers"] <= 192
    assert walks["head-wise hs=16 forward (gluon)"]["registers"] <= 128
    assert all(row["dots"] != "none" for row in rows[:5])  # the low-rank filters use the matrix units
    # The split backward's block sizes were chosen so that it does not spill (Triton 3.9, sm_90).
    assert all(row["stack_bytes"] == 0 for row in rows if "split" in row["kernel"]), rows[3:5]
