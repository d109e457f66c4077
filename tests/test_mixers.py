"""Mamba-2 and Gated DeltaNet: the recurrences (chunked vs naive, gradients, delta-rule semantics),
the mixers (decode, causality, where the short conv sits, gradients), exact counting, the config
fields they add (run ids unchanged) and the fla-core bridge (GPU tests skip where it is missing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from isoflop.models.config import RECURRENCE_CHUNK_SIZE, ConvSpec, ModelConfig, SSMSpec
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.lm import build_model
from isoflop.models.mixers import GatedDeltaNet, Mamba2, fla, scan
from isoflop.models.mixers.delta_rule import (
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
)
from isoflop.models.mixers.ssd import ssd_chunked, ssd_recurrent
from isoflop.models.registry import make_model_config
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.spec import load_sweep
from isoflop.runspec import DataConfig, RunSpec, TrainConfig
from model_checks import parameters_without_gradient, randomise_generators

REPO = Path(__file__).resolve().parents[1]

MIXER_ARCHS = ["mamba2", "mamba2-noconv", "mamba2-dynamic", "gdn", "gdn-noconv", "gdn-dynamic"]
CONVS = [
    ConvSpec(),
    ConvSpec(kind="static", width=3),
    ConvSpec(kind="dynamic-lowrank", rank=4),
    ConvSpec(kind="dynamic-headwise", head_size=8, width=2),
]
SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "vocab_size": 96, "max_seq_len": 160}


def small_config(arch: str, **overrides) -> ModelConfig:
    overrides.setdefault("ssm", {"state_size": 8, "n_groups": 2})
    return make_model_config(arch, **SMALL, **overrides)


def mixer_config(mixer: str, conv: ConvSpec) -> ModelConfig:
    return ModelConfig(**SMALL, mixer=mixer, conv=conv, ssm=SSMSpec(state_size=8, n_groups=2))


# -- the recurrences ----------------------------------------------------------------------------


def ssd_inputs(b=2, T=23, H=3, P=5, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, B, C = (torch.randn(b, T, H, n, generator=g) for n in (P, N, N))
    a = -torch.rand(b, T, H, generator=g)
    return x, a, B, C, torch.randn(b, H, N, P, generator=g)


def delta_inputs(b=2, T=23, H=3, K=4, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, H, K, generator=g)
    k = F.normalize(torch.randn(b, T, H, K, generator=g), dim=-1)
    v = torch.randn(b, T, H, V, generator=g)
    decay, beta = -torch.rand(b, T, H, generator=g), torch.rand(b, T, H, generator=g)
    return q, k, v, decay, beta, torch.randn(b, H, K, V, generator=g)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_ssd_equals_the_recurrence(float64, chunk):
    x, a, B, C, state = ssd_inputs()
    y, final = ssd_chunked(x, a, B, C, state, chunk_size=chunk)
    y_ref, final_ref = ssd_recurrent(x, a, B, C, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_gated_delta_rule_equals_the_recurrence(float64, chunk):
    q, k, v, decay, beta, state = delta_inputs()
    o, final = gated_delta_rule_chunked(q, k, v, decay, beta, 0.5, state, chunk_size=chunk)
    o_ref, final_ref = gated_delta_rule_recurrent(q, k, v, decay, beta, 0.5, state)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_ssd_is_decayed_linear_attention(float64):
    """An independent statement of the recurrence: y_t = sum_{j<=t} exp(G_t - G_j) (C_t.B_j) x_j."""
    x, a, B, C, _ = ssd_inputs(b=1, T=9)
    G = a.cumsum(1)
    y = torch.zeros_like(x)
    for t in range(9):
        for j in range(t + 1):
            weight = torch.exp(G[:, t] - G[:, j]) * (C[:, t] * B[:, j]).sum(-1)
            y[:, t] += weight[..., None] * x[:, j]
    torch.testing.assert_close(ssd_chunked(x, a, B, C, chunk_size=4)[0], y)


def test_the_delta_rule_overwrites_what_a_key_holds(float64):
    """beta = 1 and no decay: writing v1 then v2 at the same key leaves v2 there (linear
    attention would return v1 + v2); a key orthogonal to it reads nothing."""
    k = torch.tensor([1.0, 0.0, 0.0])
    keys = torch.stack([k, k, k]).view(1, 3, 1, 3)
    values = torch.tensor([[1.0, 2.0], [5.0, -1.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    queries = torch.stack([k, k, torch.tensor([0.0, 1.0, 0.0])]).view(1, 3, 1, 3)
    beta = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1)
    o, _ = gated_delta_rule_chunked(queries, keys, values, torch.zeros(1, 3, 1), beta, 1.0)
    torch.testing.assert_close(o[0, :, 0], torch.tensor([[1.0, 2.0], [5.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("op", ["ssd", "gated_delta_rule"])
def test_chunked_gradients_equal_the_recurrences(float64, op):
    inputs = ssd_inputs(T=11) if op == "ssd" else delta_inputs(T=11)
    inputs = [t.clone().requires_grad_() for t in inputs]

    def chunked(*t):
        if op == "ssd":
            return ssd_chunked(*t, chunk_size=4)
        return gated_delta_rule_chunked(*t[:5], 0.7, t[5], chunk_size=4)

    def recurrent(*t):
        return ssd_recurrent(*t) if op == "ssd" else gated_delta_rule_recurrent(*t[:5], 0.7, t[5])

    grads = []
    for run in (chunked, recurrent):
        out, final = run(*inputs)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads.append(torch.autograd.grad((out * weights).sum() + final.square().sum(), inputs))
    for chunked_grad, recurrent_grad in zip(*grads):
        torch.testing.assert_close(chunked_grad, recurrent_grad, rtol=1e-9, atol=1e-9)


def test_packed_documents_restart_the_state(float64):
    x, a, B, C, _ = ssd_inputs(b=1, T=20)
    cu = torch.tensor([0, 7, 7, 20])  # an empty document too
    packed = scan.ssd(x, a, B, C, cu)
    separate = torch.cat([ssd_chunked(x[:, :7], a[:, :7], B[:, :7], C[:, :7])[0],
                          ssd_chunked(x[:, 7:], a[:, 7:], B[:, 7:], C[:, 7:])[0]], dim=1)
    torch.testing.assert_close(packed, separate)
    assert not torch.allclose(packed, ssd_chunked(x, a, B, C)[0])


# -- the mixers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["mamba2", "gated-deltanet"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c.kind)
def test_decode_steps_equal_the_full_forward_across_chunks(float64, mixer, conv):
    """T = 70 spans two chunks of the reference scan; stepping must agree with it everywhere."""
    torch.manual_seed(0)
    module = (Mamba2 if mixer == "mamba2" else GatedDeltaNet)(mixer_config(mixer, conv))
    randomise_generators(module)
    h = torch.randn(2, RECURRENCE_CHUNK_SIZE + 6, SMALL["d_model"])
    with torch.no_grad():
        full = module(h)
        conv_states = module.convs.empty_states(2, h.device, h.dtype)
        state = module.empty_state(2, h.device, h.dtype)
        stepped = []
        for t in range(h.shape[1]):
            out, state = module.step(h[:, t], conv_states, state)
            stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixer", ["mamba2", "gated-deltanet"])
def test_no_position_sees_the_future(float64, mixer):
    torch.manual_seed(0)
    module = (Mamba2 if mixer == "mamba2" else GatedDeltaNet)(
        mixer_config(mixer, ConvSpec(kind="dynamic-lowrank", rank=4)))
    randomise_generators(module)
    h = torch.randn(1, RECURRENCE_CHUNK_SIZE + 6, SMALL["d_model"])
    changed = h.clone()
    changed[:, 40:] += 1.0
    with torch.no_grad():
        before, after = module(h), module(changed)
    torch.testing.assert_close(before[:, :40], after[:, :40], rtol=0, atol=0)
    assert not torch.allclose(before[:, 40:], after[:, 40:])


# Which linear's output each conv filters (the branches the paper's dynamic conv replaces).
BRANCHES = {"mamba2": {"q": "c_proj", "k": "b_proj", "v": "x_proj"},
            "gated-deltanet": {"q": "q", "k": "k", "v": "v"}}


@pytest.mark.parametrize("mixer", ["mamba2", "gated-deltanet"])
def test_each_branch_conv_filters_its_projection_with_filters_from_the_normed_input(mixer):
    cfg = mixer_config(mixer, ConvSpec(kind="dynamic-lowrank", rank=4))
    torch.manual_seed(0)
    model = build_model(cfg)
    randomise_generators(model)
    block = model.blocks[1]
    seen = {}
    block.mixer.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    for name, linear in BRANCHES[mixer].items():
        getattr(block.mixer, linear).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(f"{name}.linear", out))
        block.mixer.convs[name].register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(f"{name}.conv", args[:2]))
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 8)))
    assert sorted(block.mixer.convs) == ["k", "q", "v"]
    for name in BRANCHES[mixer]:
        filtered, generator_input = seen[f"{name}.conv"]
        assert filtered is seen[f"{name}.linear"] and generator_input is seen["h"], name


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_a_dynamic_conv_at_init_is_the_static_conv_it_replaces(arch):
    """With the generators at their zero init, the -dynamic model is the static one whose filters
    are the dynamic convs' static biases: the dynamic conv sits exactly where the static one was."""
    torch.manual_seed(0)
    dynamic = build_model(small_config(f"{arch}-dynamic"))
    static = build_model(small_config(arch))
    dynamic_params = dict(dynamic.named_parameters())
    with torch.no_grad():
        for name, p in static.named_parameters():
            source = name.replace(".weight", ".bias") if ".convs." in name else name
            p.copy_(dynamic_params[source])
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(idx)[0], static(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, conv", [("mamba2-dynamic", {}), ("gdn-dynamic", {}),
                                        ("gdn", {"kind": "dynamic-headwise", "head_size": 8})])
def test_gradients_reach_every_parameter(arch, conv):
    torch.manual_seed(0)
    model = build_model(small_config(arch, conv=conv, tie_embeddings=False))
    assert parameters_without_gradient(model, 96) == []


def test_initialisation_of_the_recurrent_parameters():
    torch.manual_seed(0)
    model = build_model(make_model_config("mamba2", **{**SMALL, "n_layers": 4}))
    mixer = model.blocks[0].mixer
    A = -mixer.A_log.exp()
    assert bool(((A <= -1) & (A >= -16)).all())
    dt = F.softplus(mixer.dt_bias)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all())
    assert bool((mixer.D == 1).all()) and bool((mixer.norm_weight == 1).all())
    residual_std = 0.02 / (2 * 4) ** 0.5
    assert mixer.o.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert mixer.x_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


# -- counting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["mamba2", "gated-deltanet"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c.kind)
@pytest.mark.parametrize("tied", [True, False])
def test_count_params_matches_the_built_model(mixer, conv, tied):
    cfg = mixer_config(mixer, conv).replace(tie_embeddings=tied)
    counted = count_params(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == counted.total
    assert counted.active == counted.total and counted.active_non_embedding == counted.non_embedding


def test_mixer_param_counts_by_hand():
    d, L, H, P, N, G = 32, 2, 2, 16, 8, 2
    plain = count_params(small_config("transformer", ssm={}))
    swiglu_and_norms = L * (3 * d * 64 + 2 * d) + d
    assert plain.non_embedding == L * 4 * d * d + swiglu_and_norms
    mamba = count_params(small_config("mamba2-noconv"))
    inner, heads = 2 * d, 2 * H  # expand 2: heads of head_dim 16
    mixer = d * (2 * inner + 2 * G * N + heads) + inner * d + 3 * heads + inner
    assert mamba.non_embedding == L * mixer + swiglu_and_norms
    gdn = count_params(small_config("gdn-noconv"))
    values = 2 * d
    mixer = d * (2 * d + 2 * values + 2 * H) + values * d + 2 * H + 2 * P
    assert gdn.non_embedding == L * mixer + swiglu_and_norms


@pytest.mark.parametrize("mixer", ["mamba2", "gated-deltanet"])
@pytest.mark.parametrize("conv", CONVS[1:], ids=lambda c: c.kind)
@pytest.mark.parametrize("seq_len", [RECURRENCE_CHUNK_SIZE, 2 * RECURRENCE_CHUNK_SIZE])
def test_flops_match_torch_flop_counter(mixer, conv, seq_len):
    """The counter sees matmuls only: not the convs' elementwise application, nor Gated
    DeltaNet's triangular solve, which counting.py adds analytically (c(c-1) per head and token)."""
    torch.manual_seed(0)
    cfg = mixer_config(mixer, conv)
    model = build_model(cfg)
    batch = 2
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    flops = flops_per_token(cfg, seq_len)
    unseen = flops.breakdown["conv_apply"]
    if mixer == "gated-deltanet":
        c = RECURRENCE_CHUNK_SIZE
        unseen += cfg.n_layers * cfg.ssm_heads * c * (c - 1)
    with FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == (flops.forward - unseen) * batch * seq_len
    assert flops.breakdown["attention_scores"] == 0 and flops.breakdown["recurrence"] > 0


def test_recurrence_flops_by_hand():
    cfg = small_config("mamba2-noconv")
    H, N, P, c = 4, 8, 16, 32
    assert flops_per_token(cfg, 32).breakdown["recurrence"] == 2 * H * (2 * c * (N + P) + 4 * N * P)
    cfg = small_config("gdn-noconv")
    H, K, V, c = 2, 16, 32, 64
    per_token = H * (2 * c * (3 * K + 2 * V) + 6 * K * V + c * (c - 1))
    assert flops_per_token(cfg, 128).breakdown["recurrence"] == 2 * per_token


# -- config fields and run ids ------------------------------------------------------------------


def test_a_plain_transformers_canonical_json_and_run_id_are_unchanged():
    """The ids below were computed before mixer, ffn, ssm and moe existed."""
    model = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=128)
    spec = RunSpec(arch="transformer", model=model, data=DataConfig(),
                   train=TrainConfig(total_tokens=100_000))
    assert spec.run_id == "e597a3912817"
    dynamic = model.replace(conv={"kind": "dynamic-lowrank"}, qk_norm=True)
    spec = RunSpec(arch="dynamic-qkv-qknorm", model=dynamic, data=DataConfig(),
                   train=TrainConfig(total_tokens=100_000), seed=3)
    assert spec.run_id == "3a7e8ce4d591"
    assert not {"mixer", "ffn", "ssm", "moe"} & set(spec.to_dict()["model"])


def test_new_fields_enter_the_identity_once_they_differ_from_their_defaults():
    base = small_config("transformer", ssm={})
    runs = [RunSpec(arch="x", model=m, data=DataConfig(), train=TrainConfig(total_tokens=1000))
            for m in (base, base.replace(mixer="mamba2"), base.replace(mixer="mamba2", ssm={"state_size": 16}),
                      base.replace(ffn="moe"), base.replace(ffn="moe", moe={"top_k": 1}))]
    assert len({run.run_id for run in runs}) == len(runs)
    assert runs[2].to_dict()["model"]["ssm"] == {"expand": 2, "state_size": 16, "n_groups": 1}
    for run in runs:
        assert RunSpec.from_dict(run.to_dict()) == run


# -- the sweep ----------------------------------------------------------------------------------


def test_the_linear_rnn_sweep_plans():
    path = REPO / "sweeps" / "linear-rnn-small.yaml"
    runs = expand(load_sweep(path))
    assert len(runs) == 3 * 4 * 5
    mixers = {run.arch: (run.spec.model.mixer, run.spec.model.conv.kind) for run in runs}
    assert mixers == {"transformer": ("attention", "none"), "mamba2": ("mamba2", "static"),
                      "mamba2-dynamic": ("mamba2", "dynamic-lowrank"),
                      "gdn": ("gated-deltanet", "static"),
                      "gdn-dynamic": ("gated-deltanet", "dynamic-lowrank")}
    assert all(run.params == count_params(run.spec.model).total for run in runs)
    plan = subprocess.run([sys.executable, "-m", "isoflop", "plan", str(path), "--no-data-check"],
                          capture_output=True, text=True, check=False)
    assert plan.returncode == 0 and "60 runs" in plan.stdout, plan.stderr


# -- the fla-core bridge --------------------------------------------------------------------------


def test_the_reference_runs_where_fla_cannot():
    x = torch.randn(1, 4, 2, 3)
    assert fla.get_backend() == "auto"
    assert not fla.use_fla(x)  # CPU: the reference, whether or not fla-core is installed
    with pytest.raises(ValueError, match="allowed: auto, reference, fla"):
        fla.set_backend("triton")
    fla.set_backend("fla")
    try:
        with pytest.raises((RuntimeError, ValueError), match="mixer backend 'fla'"):
            fla.use_fla(x)
    finally:
        fla.set_backend("auto")


def test_the_backend_rule(recwarn):
    """fla.decide, the rule use_fla applies once it knows the machine (runs on CPU)."""
    refused = "fla-core refuses its gated backward here"
    assert not fla.decide("reference", True, "", "", "cuda bf16")
    assert fla.decide("auto", True, "", "", "cuda bf16")
    assert not fla.decide("auto", False, "", "", "cpu float32")
    assert not recwarn.list  # unsuitable tensors take the reference silently
    fla._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="training steps run the PyTorch reference"):
        assert not fla.decide("auto", True, "", refused, "cuda bf16")
    with pytest.warns(UserWarning, match="recurrent mixers run the PyTorch reference"):
        assert not fla.decide("auto", True, "fla-core cannot be imported", "", "cuda bf16")
    assert fla.decide("fla", True, "", "", "cuda bf16")
    with pytest.raises(RuntimeError, match="asked for a training step, but " + refused):
        fla.decide("fla", True, "", refused, "cuda bf16")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        fla.decide("fla", True, "fla-core cannot be imported", "", "cuda bf16")
    with pytest.raises(ValueError, match="needs CUDA tensors .* got cpu float32"):
        fla.decide("fla", False, "", "", "cpu float32")
    fla._warn_once.cache_clear()


needs_fla = pytest.mark.skipif(not fla.available(), reason="fla-core is not installed")


def _on_both_backends(run):
    results = []
    for backend in ("fla", "reference"):
        fla.set_backend(backend)
        try:
            results.append(run())
        finally:
            fla.set_backend("auto")
    return results


def _fla_inputs(op, packed):
    """Inputs of one recurrence in the dtypes the mixers give fla-core, and cu_seqlens."""
    torch.manual_seed(0)
    b, T = (1, 300) if packed else (2, 200)
    cu = torch.tensor([0, 37, 160, 300], device="cuda") if packed else None
    bf16, fp32 = torch.bfloat16, torch.float32  # activations in bf16, log decays in fp32
    if op == "ssd":
        x, a, B, C, _ = ssd_inputs(b=b, T=T, H=4, P=32, N=16)
        inputs = [(x * 0.1, bf16), (a * 0.1, fp32), (B, bf16), (C, bf16)]
    else:
        q, k, v, decay, beta, _ = delta_inputs(b=b, T=T, H=4, K=32, V=64)
        inputs = [(q, bf16), (k, bf16), (v, bf16), (decay, fp32), (beta, bf16)]
    return [t.to("cuda", dtype).requires_grad_() for t, dtype in inputs], cu


def _recurrence(op, inputs, cu):
    return scan.ssd(*inputs, cu) if op == "ssd" else scan.gated_delta_rule(*inputs, 32**-0.5, cu)


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("op", ["ssd", "gated_delta_rule"])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_forward_agrees_with_the_reference(op, packed):
    inputs, cu = _fla_inputs(op, packed)

    def run():
        with torch.no_grad():
            return _recurrence(op, inputs, cu).float()

    out_fla, out_ref = _on_both_backends(run)
    assert (out_fla - out_ref).abs().max() <= 0.02 * out_ref.abs().max()


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("op", ["ssd", "gated_delta_rule"])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_gradients_agree_with_the_reference(op, packed):
    if fla.backward_problem():
        pytest.skip(fla.backward_problem())
    inputs, cu = _fla_inputs(op, packed)

    def run():
        grads = torch.autograd.grad(_recurrence(op, inputs, cu).float().square().sum(), inputs)
        return [g.float() for g in grads]

    grads_fla, grads_ref = _on_both_backends(run)
    for g_fla, g_ref in zip(grads_fla, grads_ref):
        assert (g_fla - g_ref).abs().max() <= 0.05 * g_ref.abs().max() + 1e-3


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("op", ["ssd", "gated_delta_rule"])
def test_training_steps_take_the_reference_where_fla_refuses_its_backward(op):
    """On Hopper with Triton 3.4-3.7.0 fla-core raises in the backward; "auto" must not get there."""
    if not fla.backward_problem():
        pytest.skip("fla-core's backward runs on this machine")
    inputs, cu = _fla_inputs(op, packed=False)
    with pytest.warns(UserWarning, match="training steps run the PyTorch reference"):
        fla._warn_once.cache_clear()
        out = _recurrence(op, inputs, cu)
    out.float().square().sum().backward()  # the reference's backward: no error
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)
    fla.set_backend("fla")
    try:
        with pytest.raises(RuntimeError, match="training step"):
            _recurrence(op, inputs, cu)
    finally:
        fla.set_backend("auto")


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("arch", ["mamba2-dynamic", "gdn-dynamic"])
def test_models_on_fla_agree_with_the_reference(arch):
    torch.manual_seed(0)
    model = build_model(small_config(arch)).cuda()
    randomise_generators(model)
    idx = torch.randint(0, 96, (2, 150), device="cuda")

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(idx, idx)[1].item()

    loss_fla, loss_ref = _on_both_backends(run)
    assert loss_fla == pytest.approx(loss_ref, rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba2-dynamic", "gdn-dynamic"])
def test_the_reference_on_cuda_in_bf16_agrees_with_cpu_fp32(arch):
    """The path a GPU without fla-core takes: bf16 autocast, the chunked reference, packed rows."""
    torch.manual_seed(0)
    model = build_model(small_config(arch))
    randomise_generators(model)
    idx = torch.randint(0, 96, (1, 150))
    cu = torch.tensor([0, 70, 150])
    with torch.no_grad():
        expected = model(idx, idx, cu_seqlens=cu)[1].item()
        model.cuda()
        fla.set_backend("reference")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx.cuda(), idx.cuda(), cu_seqlens=cu.cuda())[1].item()
        finally:
            fla.set_backend("auto")
    assert loss == pytest.approx(expected, rel=2e-2)
