"""Fused projections (q/k/v, gate/up and the dynamic convs' generator inputs in one matmul),
regional compilation, and the training-throughput benchmark at a CPU size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from isoflop import kernels
from isoflop.models.attention import apply_rope, rope_angles
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.lm import LanguageModel, build_model, compile_regions
from isoflop.models.registry import architecture_names, get_architecture, make_model_config
from model_checks import trained_like

REPO = Path(__file__).resolve().parent.parent
VOCAB, D, LAYERS, HEADS, D_FF, MAX_LEN = 96, 32, 2, 2, 64, 32
TRANSFORMER_ARCHS = [name for name in architecture_names()
                     if (get_architecture(name).mixer, get_architecture(name).ffn) == ("attention", "swiglu")]


def tiny_config(arch: str, **overrides):
    return make_model_config(arch, D, LAYERS, HEADS, D_FF, VOCAB, MAX_LEN, **overrides)


def unfused(owner, name: str, inp: torch.Tensor) -> torch.Tensor:
    """The computation before fusion: the linear on its own, then its conv, whose generator reads
    the linear's input."""
    return owner.convs.run(name, getattr(owner, name)(inp), inp)


def unfused_logits(model: LanguageModel, idx: torch.Tensor) -> torch.Tensor:
    """The model's forward written out with every linear and every generator map separate."""
    cfg = model.config
    B, T = idx.shape
    rope = rope_angles(torch.arange(T), cfg.head_dim, cfg.rope_theta)
    x = model.tok_emb(idx)
    for block in model.blocks:
        attention, mlp = block.mixer, block.ffn
        h = block.mixer_norm(x)
        q, k, v = (unfused(attention, name, h).view(B, T, HEADS, -1) for name in "qkv")
        if attention.q_norm is not None:
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (apply_rope(q, rope), apply_rope(k, rope), v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + unfused(attention, "o", out.transpose(1, 2).reshape(B, T, -1))
        h = block.ffn_norm(x)
        x = x + unfused(mlp, "down", F.silu(unfused(mlp, "gate", h)) * unfused(mlp, "up", h))
    return model.lm_head(model.norm(x)).float()


@pytest.mark.parametrize("arch", TRANSFORMER_ARCHS)
def test_fused_model_equals_the_unfused_computation(arch, float64):
    """Logits and every parameter's gradient, in float64 so that only rounding may differ."""
    model = trained_like(tiny_config(arch))
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    fused_logits, fused_loss = model(idx, targets)
    fused_grads = torch.autograd.grad(fused_loss, list(model.parameters()))
    logits = unfused_logits(model, idx)
    loss = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(fused_logits, logits)
    for (name, _), fused_grad, grad in zip(model.named_parameters(), fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, msg=lambda m, name=name: f"{name}: {m}")


def record_calls(monkeypatch, name: str, describe) -> list:
    """Patch isoflop.kernels.<name> so that each call appends describe(*positional args) to the
    returned list, then runs the original."""
    from isoflop import kernels

    seen, original = [], getattr(kernels, name)

    def recording(*args, **kwargs):
        seen.append(describe(*args))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, name, recording)
    return seen


def test_static_convs_of_one_projection_run_as_one_call(monkeypatch):
    """static-qkv: the static convs of q, k and v filter the fused projection's output in one call
    per block (the model still equals its unfused computation: the test above)."""
    widths = record_calls(monkeypatch, "static_conv", lambda x, *_: x.shape[-1])
    build_model(tiny_config("static-qkv"))(torch.randint(0, VOCAB, (2, 12)))
    assert widths == [3 * D] * LAYERS


@pytest.mark.parametrize("arch, widths", [
    ("dynamic-qkv", [(3 * D, 3 * 16), (3 * D, 3 * 16)]),
    # all-linear: q/k/v and gate/up each as one call; o and down alone
    ("dynamic-all-linear", [(3 * D, 3 * 16), (D, 16), (2 * D_FF, 2 * 16), (D, 16)] * LAYERS),
])
def test_lowrank_convs_of_one_projection_run_as_one_call(monkeypatch, arch, widths):
    """The low-rank convs of q, k and v (and of gate and up) filter the fused projection's output
    in one call, z holding one R-column slice per linear (the model still equals its unfused
    computation: test_fused_model_equals_the_unfused_computation)."""
    seen = record_calls(monkeypatch, "dynamic_conv_lowrank", lambda x, z, *_: (x.shape[-1], z.shape[-1]))
    build_model(tiny_config(arch))(torch.randint(0, VOCAB, (2, 12)))
    assert seen == widths


@pytest.mark.parametrize("arch, rotate", [
    ("dynamic-qkv", True), ("dynamic-all-linear", True), ("moe-dynamic-qkv", True),
    ("dynamic-qkv-qknorm", False),  # QK-norm sits between the conv and RoPE
    ("transformer", False),
])
def test_lowrank_q_and_k_convs_rotate_their_own_outputs(monkeypatch, arch, rotate):
    """Where q and k have low-rank convs and nothing sits between conv and RoPE, the convs rotate
    their outputs (the kernels can do it in their own passes): one call per block rotates q's and
    k's 2D channels. The logits are those of RoPE as its own op after the convs."""
    from isoflop import kernels

    model = trained_like(tiny_config(arch))
    assert [block.mixer.convs_rotate for block in model.blocks] == [rotate] * LAYERS
    idx = torch.randint(0, VOCAB, (2, 12))
    rotated, original = [], kernels.dynamic_conv_lowrank

    def recording(*args, **kwargs):
        rotated.append(kwargs.get("rope_channels") if kwargs.get("rope") is not None else 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "dynamic_conv_lowrank", recording)
    logits, _ = model(idx)
    assert rotated.count(2 * D) == (LAYERS if rotate else 0) and set(rotated) <= {0, 2 * D}
    # Packed documents restart their positions, so RoPE runs after the convs (RopeFromZero).
    rotated.clear()
    model(idx[:1], cu_seqlens=torch.tensor([0, 5, 12]))
    assert set(rotated) <= {0} and (rotated or not rotate)
    for block in model.blocks:
        block.mixer.convs_rotate = False
    torch.testing.assert_close(logits, model(idx)[0])


@pytest.mark.parametrize("arch", ["static-qkv", "static-all-linear"])
@pytest.mark.parametrize("inside", [True, False])
def test_static_q_and_k_convs_rotate_their_own_outputs(monkeypatch, arch, inside):
    """Static convs on q, k and v run as one call per block (test above), which rotates q's and k's
    2D channels where its kernels can (kernels.static_conv_rotates: the Gluon walks on Hopper,
    training point 29; forced here); elsewhere the q and k outputs are rotated each on its own
    after the call. Logits and gradients are those of RoPE after the convs; packed documents
    rotate after them."""
    model = trained_like(tiny_config(arch))
    assert all(block.mixer.convs_rotate for block in model.blocks)
    seen, original = [], kernels.static_conv

    def recording(*args, **kwargs):
        seen.append(kwargs["rope_channels"] if kwargs.get("rope") is not None else 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "static_conv", recording)
    monkeypatch.setattr(kernels, "static_conv_rotates", lambda *args, **kwargs: inside)
    idx = torch.randint(0, VOCAB, (2, 12))

    def logits_and_grads():
        logits = model(idx)[0]
        return [logits, *torch.autograd.grad(logits.square().mean(), list(model.parameters()))]

    rotating = logits_and_grads()
    assert seen.count(2 * D) == (LAYERS if inside else 0) and set(seen) <= {0, 2 * D}
    seen.clear()
    model(idx[:1], cu_seqlens=torch.tensor([0, 5, 12]))
    assert set(seen) == {0}
    for block in model.blocks:
        block.mixer.convs_rotate = False
    for got, expected in zip(rotating, logits_and_grads()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiling", [False, True])
def test_headwise_q_and_k_convs_rotate_their_own_outputs(monkeypatch, compiling):
    """Head-wise convs on q and k rotate their outputs too: compiled, inside the one op of the
    projection's convs (kernels.dynamic_convs_headwise, whose Gluon walks rotate in both passes on
    Hopper), eager by ops after each conv. Logits and gradients are those of RoPE after the convs."""
    model = trained_like(tiny_config("dynamic-headwise-qkv"))
    assert all(block.mixer.convs_rotate for block in model.blocks)
    seen, original = [], kernels.dynamic_convs_headwise

    def recording(*args, **kwargs):
        seen.append(kwargs["rotated"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "dynamic_convs_headwise", recording)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    idx = torch.randint(0, VOCAB, (2, 12))

    def logits_and_grads():
        logits = model(idx)[0]
        return [logits, *torch.autograd.grad(logits.square().mean(), list(model.parameters()))]

    rotating = logits_and_grads()
    assert seen == ([2] * LAYERS if compiling else [])
    for block in model.blocks:
        block.mixer.convs_rotate = False
    for got, expected in zip(rotating, logits_and_grads()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_only_tables_of_positions_from_zero_rotate_inside_the_convs(monkeypatch):
    """Attention called with tables of other positions (a plain tuple) rotates after its convs: the
    conv's kernel forms a time's angles from two table rows, which positions 0 to T-1 allow; the
    conv itself refuses other tables where checking is free (CPU)."""
    from isoflop.models.attention import RopeFromZero

    attention = trained_like(tiny_config("dynamic-qkv")).blocks[0].mixer
    h = torch.randn(2, 12, D)
    calls, original = [], kernels.dynamic_conv_lowrank

    def recording(*args, **kwargs):
        calls.append(kwargs.get("rope") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "dynamic_conv_lowrank", recording)
    with torch.no_grad():
        shifted = attention(h, rope_angles(torch.arange(12) + 7, D // HEADS, 10000.0))
        assert calls == [False] and not isinstance(rope_angles(torch.arange(3), 8, 1e4), RopeFromZero)
        from_zero = attention(h, rope_angles(torch.arange(12), D // HEADS, 10000.0, from_zero=True))
        assert calls == [False, True]
        torch.testing.assert_close(from_zero, attention(h, rope_angles(torch.arange(12), D // HEADS, 10000.0)))
    torch.testing.assert_close(shifted, from_zero, rtol=1e-5, atol=1e-6)  # (relative positions only)
    x, z, U = torch.randn(1, 128, 64), torch.randn(1, 128, 4), torch.randn(4, 3 * 64)
    with pytest.raises(ValueError, match=r"positions 0, 1, \.\.\., T-1"):
        original(x, z, U, rope=rope_angles(torch.arange(128) + 100, 64, 10000.0))
    packed = original(x, z, U, rope=rope_angles(torch.arange(128) % 64, 64, 10000.0),
                                          cu_seqlens=torch.tensor([0, 64, 128]))
    assert packed.shape == x.shape


@pytest.mark.parametrize("any_layout", [True, False])
@pytest.mark.parametrize("arch, function, filters", [
    ("dynamic-qkv", "dynamic_conv_lowrank", (16,)),  # z [B, T, R]
    ("dynamic-headwise-qkv", "dynamic_conv_headwise", (4, D // 16)),  # w [B, T, W, H]
])
def test_compiled_code_runs_dynamic_convs_one_by_one_on_views(monkeypatch, any_layout, arch, function, filters):
    """Under torch.compile (measured faster at 300M, and less memory) each dynamic conv runs alone,
    reading its x and filter input as views of the fused projection, as eager code does (no
    copies: the ops take any layout, KERNELS.md training points 13 and 14); eager code groups the
    low-rank ones (the test above); with ISOFLOP_PROJECTED_CONVS=auto (the next test) the low-rank
    ones run inside one op. Where torch cannot tag the ops (before 2.8), the model copies each view
    once instead."""
    from isoflop.models import conv

    model = build_model(tiny_config(arch))
    seen = record_calls(monkeypatch, function,
                        lambda x, z, *_: (x.shape[-1], z.shape[2:], x.is_contiguous() and z.is_contiguous()))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "CONV_OPS_TAKE_ANY_LAYOUT", any_layout)
    monkeypatch.setattr(conv.PROJECTED, "name", "off")
    model(torch.randint(0, VOCAB, (2, 12)))
    assert seen == [(D, filters, not any_layout)] * 3 * LAYERS


def loss_and_grads(model: LanguageModel, idx: torch.Tensor) -> list[torch.Tensor]:
    """A loss of the model's logits and its gradients for every parameter."""
    loss = model(idx)[0].square().mean()
    return [loss, *torch.autograd.grad(loss, list(model.parameters()))]


@pytest.mark.parametrize("arch, function, groups", [
    ("dynamic-qkv", "dynamic_convs_lowrank", [(D, D, D)]),
    ("dynamic-all-linear", "dynamic_convs_lowrank", [(D, D, D), (D,), (D_FF, D_FF), (D,)]),
    ("dynamic-headwise-qkv", "dynamic_convs_headwise", [(D, D, D)]),
])
def test_compiled_code_runs_the_dynamic_convs_of_a_projection_as_one_op(monkeypatch, arch, function, groups):
    """Under torch.compile the dynamic convs of one fused projection run as one op
    (kernels.dynamic_convs_lowrank or _headwise) on the whole matmul output, whose backward writes
    that output's gradient in place instead of a compiled kernel concatenating each conv's dx and
    generator gradient; values and gradients equal the per-conv path's (ISOFLOP_PROJECTED_CONVS=off)."""
    from isoflop.models import conv

    torch.manual_seed(0)
    model = trained_like(tiny_config(arch))
    generated = 16 if function == "dynamic_convs_lowrank" else 4 * D // 16  # R, or W * H at heads of 16
    seen = record_calls(monkeypatch, function, lambda projection, *_: projection.shape[-1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    idx = torch.randint(0, VOCAB, (2, 12))

    projected = loss_and_grads(model, idx)
    widths = [sum(g) + generated * len(g) for g in groups]
    assert seen == widths * LAYERS
    monkeypatch.setattr(conv.PROJECTED, "name", "off")
    for got, expected in zip(projected, loss_and_grads(model, idx)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, fused_calls", [("dynamic-all-linear", LAYERS), ("dynamic-qkv", 0)])
def test_compiled_mlp_runs_its_gate_and_up_convs_with_the_swiglu_as_one_op(monkeypatch, arch, fused_calls):
    """Where the Hopper kernel takes them (kernels.swiglu_fuses, made to say so here), compiled
    all-linear MLPs run their gate and up convs and the SwiGLU as one op on the fused projection
    (kernels.dynamic_convs_lowrank_swiglu, ISOFLOP_SWIGLU_CONVS=auto); values and gradients equal the
    convs' op followed by the SwiGLU (=off). MLPs without convs on gate and up never take it."""
    from isoflop.models import conv

    torch.manual_seed(0)
    model = trained_like(tiny_config(arch))
    seen = record_calls(monkeypatch, "dynamic_convs_lowrank_swiglu", lambda projection, ups, *_: projection.shape[-1])
    monkeypatch.setattr(kernels, "swiglu_fuses", lambda *_: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    idx = torch.randint(0, VOCAB, (2, 12))

    fused = loss_and_grads(model, idx)
    assert seen == [2 * D_FF + 2 * 16] * fused_calls
    monkeypatch.setattr(conv.SWIGLU, "name", "off")
    for got, expected in zip(fused, loss_and_grads(model, idx)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(seen) == fused_calls


class MatmulShapes(TorchDispatchMode):
    """(inner, outer) dimensions of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            weight = args[-1]  # [in, out]
            self.shapes.append(tuple(weight.shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch, expected", [
    # q, k, v and their generators' D->R maps as one matmul; o (and its conv's map) as another.
    ("transformer", [(D, 3 * D), (D, D), (D, 2 * D_FF), (D_FF, D)]),
    ("dynamic-qkv", [(D, 3 * D + 3 * 16), (D, D), (D, 2 * D_FF), (D_FF, D)]),
    ("dynamic-headwise-qkv", [(D, 3 * D + 3 * 4 * D // 16), (D, D), (D, 2 * D_FF), (D_FF, D)]),
    ("dynamic-all-linear", [(D, 3 * D + 48), (D, D + 16), (D, 2 * D_FF + 32), (D_FF, D + 16)]),
])
def test_each_group_of_linears_reading_one_input_is_one_matmul(arch, expected):
    """A block's matmuls of its inputs (the low-rank convs' own z @ U products read R-wide inputs
    and are left out)."""
    torch.manual_seed(0)
    block = build_model(tiny_config(arch)).blocks[0]
    x = torch.randn(2, 8, D)
    with torch.no_grad(), MatmulShapes() as seen:
        block(x, rope_angles(torch.arange(8), D // HEADS, 10000.0))
    assert [s for s in seen.shapes if s[0] in (D, D_FF)] == expected


def test_the_state_dict_layout_is_unchanged():
    """Fusion concatenates weights at call time only: parameters, their keys (so checkpoints from
    before still load), counts and weight-decay groups are those of the separate layers."""
    torch.manual_seed(0)
    model = build_model(tiny_config("dynamic-all-linear"))
    keys = {k.removeprefix("blocks.0.") for k in model.state_dict() if k.startswith("blocks.0.")}
    linears = {f"mixer.{n}.weight" for n in "qkvo"} | {f"ffn.{n}.weight" for n in ("gate", "up", "down")}
    convs = {f"{owner}.convs.{n}.{p}" for owner, names in (("mixer", "qkvo"), ("ffn", ("gate", "up", "down")))
             for n in names for p in ("down.weight", "up", "bias")}
    assert keys == linears | convs | {"mixer_norm.weight", "ffn_norm.weight"}
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config).total


def test_decoding_equals_the_full_forward_with_fused_projections():
    """The decode step runs the same fused projections on one token at a time."""
    model = trained_like(tiny_config("dynamic-all-linear-qknorm", conv={"kind": "dynamic-headwise",
                                                                          "head_size": 8}))
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2, max_len=10)
        stepped = [model.forward_step(idx[:, t], cache) for t in range(10)]
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-5, atol=1e-5)


def test_regional_compilation_traces_one_block_for_every_layer():
    """compile_regions: one graph for all blocks and one for the head, and the same loss and
    gradients as eager. aot_eager traces forward and backward as inductor would, without
    generating code (no C++ compiler needed here)."""
    from torch._dynamo.utils import counters

    cfg = make_model_config("dynamic-qkv", D, 3, HEADS, D_FF, VOCAB, MAX_LEN)
    eager = trained_like(cfg)
    compiled = trained_like(cfg)
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    torch._dynamo.reset()
    counters.clear()
    compile_regions(compiled, backend="aot_eager", dynamic=False)
    compiled_loss = compiled(idx, targets)[1]
    compiled_loss.backward()
    assert counters["stats"]["unique_graphs"] == 2
    eager_loss = eager(idx, targets)[1]
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    torch._dynamo.reset()


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_throughput_benchmark_runs_every_variant_at_a_cpu_size(tmp_path):
    out = tmp_path / "throughput.json"
    done = run_benchmark("--config", "tiny", "--device", "cpu", "--no-compile", "--steps", "2",
                         "--rounds", "2", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    variants = [r["variant"] for r in results]
    assert variants == ["transformer", "static-qkv", "dynamic-qkv", "dynamic-headwise-qkv",
                        "dynamic-all-linear"]
    for r in results:
        cfg = make_model_config(r["variant"], 64, 1, 1, 192, 256, 64)
        assert r["params"] == count_params(cfg).total
        assert r["timed_steps"] == 2 and len(r["round_s"]) == 2
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["slowdown"] == pytest.approx(results[0]["tokens_per_s"] / r["tokens_per_s"] - 1)
        flops = flops_per_token(cfg, 64).train / flops_per_token(make_model_config(
            "transformer", 64, 1, 1, 192, 256, 64), 64).train
        assert r["extra_flops"] == pytest.approx(flops - 1)
    assert results[0]["slowdown"] == 0 and results[0]["extra_flops"] == 0
    by_variant = {r["variant"]: r["extra_flops"] for r in results}
    # the static taps add arithmetic; a dynamic conv adds its filter generator's on top
    assert 0 < by_variant["static-qkv"] < min(by_variant["dynamic-qkv"], by_variant["dynamic-headwise-qkv"])
    table = done.stdout.split("slowdown")[1]
    assert all(v in table for v in variants) and "+FLOPs" in done.stdout
    assert "targets: set for the 300M config, which this run did not measure" in done.stdout


def test_throughput_profile_files_every_conv_kernel_under_conv(monkeypatch):
    """The profile's conv group holds every Triton kernel of isoflop.kernels (the row-walking ones
    once landed in "other") and none of Inductor's kernels named after the custom ops they wrap."""
    import importlib
    import pkgutil

    import triton

    import isoflop.kernels

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    throughput = importlib.import_module("train_throughput")
    names = [name for info in pkgutil.iter_modules(isoflop.kernels.__path__)
             for name, value in vars(importlib.import_module(f"isoflop.kernels.{info.name}")).items()
             if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel")]
    assert len(names) >= 8
    assert {name: throughput.kernel_group(name) for name in names} == dict.fromkeys(names, throughput.CONV_GROUP)
    # Inductor's kernels fused around the custom ops carry the op's name, but are not conv time.
    assert throughput.kernel_group("triton_poi_fused_lowrank_conv_backward_transpose_view_5") == "compiled elementwise"


def test_throughput_benchmark_names_a_bad_variant():
    done = run_benchmark("--config", "tiny", "--variants", "transformer,nope")
    assert done.returncode == 2
    assert "--variants: unknown nope; allowed: transformer" in done.stderr


def test_paired_switch_benchmark_times_each_value_against_the_transformer():
    """benchmarks/paired_switch.py at a CPU size: one model per variant and value, a line each."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "paired_switch.py")
    done = subprocess.run([sys.executable, script, "ISOFLOP_PROJECTED_CONVS", "auto,off", "--device", "cpu",
                           "--compile", "none", "--variants", "dynamic-qkv", "--rounds", "2", "--steps", "1",
                           "--warmup", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tiny, ISOFLOP_PROJECTED_CONVS, 2 rounds x 1 steps")
    assert [line.split()[:2] for line in lines[1:]] == [["transformer", "auto"], ["dynamic-qkv", "auto"],
                                                        ["dynamic-qkv", "off"]]
    assert "faster than auto in" in lines[3] and "%" in lines[2]
    bad = subprocess.run([sys.executable, script, "ISOFLOP_NOPE", "auto,off"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown; allowed: ISOFLOP_FUSED_CE" in bad.stderr


@pytest.mark.gpu
def test_gpu_throughput_benchmark_compiles_and_runs(tmp_path):
    """The GPU path end to end at a tiny size: Triton kernels, bf16 autocast, whole-model compile."""
    out = tmp_path / "throughput.csv"
    done = run_benchmark("--config", "tiny", "--variants", "transformer,dynamic-all-linear",
                         "--steps", "2", "--rounds", "1", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(out.read_text().splitlines()) == 1 + 2
