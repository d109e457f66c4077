"""Mixture-of-experts feed-forward: routing against a per-token loop, batched expert compute,
auxiliary losses and how they reach the training loss, decode, and exact total/active counts."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from isoflop.models.config import ConvSpec, ModelConfig, MoESpec
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.lm import build_model
from isoflop.models.moe import MoE, load_balance_loss
from isoflop.models.registry import make_model_config
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.spec import load_sweep
from model_checks import parameters_without_gradient

D, D_FF = 16, 24
REPO = Path(__file__).resolve().parents[1]


def moe_config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, d_ff=D_FF, max_seq_len=32,
                       ffn="moe", moe=MoESpec(**moe))


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's definition, token by token: the chosen experts' outputs weighted by their
    router probabilities, plus the shared expert."""
    out = torch.zeros_like(x)
    for i, token in enumerate(x):
        probs = torch.softmax(layer.router(token), dim=-1)
        weights, experts = probs.topk(layer.top_k)
        for weight, e in zip(weights, experts):
            hidden = F.silu(token @ layer.gate[e]) * (token @ layer.up[e])
            out[i] += weight * (hidden @ layer.down[e])
        if layer.shared is not None:
            out[i] += layer.shared(token[None])[0]
    return out


@pytest.mark.parametrize("moe", [
    {"n_experts": 4, "top_k": 2},
    {"n_experts": 4, "top_k": 1},
    {"n_experts": 3, "top_k": 3},
    {"n_experts": 5, "top_k": 2, "shared_expert": True},
])
def test_the_batched_layer_equals_its_per_token_definition(float64, moe):
    torch.manual_seed(0)
    layer = MoE(moe_config(**moe))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # a router that actually prefers some experts
        layer.down.normal_(0.0, 0.2)
    h = torch.randn(2, 9, D)
    out = layer(h)
    assert out.shape == h.shape
    torch.testing.assert_close(out.view(-1, D), naive_moe(layer, h.view(-1, D)))


class CountBmm(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten.bmm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_experts", [2, 16])
def test_experts_run_as_three_batched_matmuls_whatever_their_number(n_experts):
    torch.manual_seed(0)
    layer = MoE(moe_config(n_experts=n_experts, top_k=2))
    with CountBmm() as counter:
        layer(torch.randn(3, 20, D))
    assert counter.calls == 3


def test_auxiliary_losses_by_hand():
    torch.manual_seed(0)
    layer = MoE(moe_config(n_experts=4, top_k=2))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    h = torch.randn(2, 10, D)
    layer(h)
    logits = layer.router(h.view(-1, D))
    probs = logits.softmax(-1)
    chosen = probs.topk(2).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]) / chosen.numel()
    expected = 4 * (share * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_losses["load_balance"], expected)
    torch.testing.assert_close(layer.aux_losses["router_z"], logits.logsumexp(-1).square().mean())


def test_load_balance_loss_is_one_when_balanced_and_n_experts_when_collapsed():
    n, E = 12, 4
    uniform = torch.full((n, E), 1 / E)
    round_robin = torch.arange(n)[:, None] % E
    assert load_balance_loss(uniform, round_robin, E).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, E)
    collapsed[:, 0] = 1.0
    assert load_balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), E).item() == pytest.approx(E)


def test_zero_router_gives_the_uniform_values():
    torch.manual_seed(0)
    layer = MoE(moe_config(n_experts=8, top_k=2))
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(1, 5, D))
    assert layer.aux_losses["load_balance"].item() == pytest.approx(1.0)
    assert layer.aux_losses["router_z"].item() == pytest.approx(math.log(8) ** 2)


def test_aux_losses_enter_the_training_loss_only():
    torch.manual_seed(0)
    cfg = moe_config(n_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    model = build_model(cfg)
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model.train()
    logits, loss = model(idx, targets)
    parts = model.last_losses
    assert set(parts) == {"cross_entropy", "load_balance", "router_z"}
    cross_entropy = F.cross_entropy(logits.view(-1, 64), targets.view(-1))
    torch.testing.assert_close(parts["cross_entropy"], cross_entropy)
    layers = [block.ffn for block in model.blocks]
    balance = torch.stack([layer.aux_losses["load_balance"] for layer in layers]).mean()
    z = torch.stack([layer.aux_losses["router_z"] for layer in layers]).mean()
    torch.testing.assert_close(loss, cross_entropy + 0.1 * balance + 0.01 * z)
    assert loss.item() > cross_entropy.item() + 0.09  # the balance loss is >= 1
    model.eval()
    eval_loss = model(idx, targets)[1]
    torch.testing.assert_close(eval_loss, model.last_losses["cross_entropy"])
    torch.testing.assert_close(eval_loss, cross_entropy)


def test_the_aux_losses_train_the_router():
    """Their gradient reaches the router: training-mode and evaluation-mode gradients differ
    there, and nowhere that the router does not feed."""
    torch.manual_seed(0)
    model = build_model(moe_config(n_experts=4, top_k=2))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.zero_grad()
        model(idx, targets)[1].backward()
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
    router = "blocks.1.ffn.router.weight"
    assert not torch.allclose(grads["train"][router], grads["eval"][router])
    torch.testing.assert_close(grads["train"]["blocks.1.ffn.down"], grads["eval"]["blocks.1.ffn.down"])


@pytest.mark.parametrize("arch", ["moe", "moe-dynamic-qkv"])
def test_gradients_reach_every_parameter(arch):
    torch.manual_seed(0)
    model = build_model(make_model_config(arch, D, 2, 2, D_FF, 64, 32,
                                          moe={"n_experts": 3, "shared_expert": True}))
    assert parameters_without_gradient(model, 64, batch=4) == []


def test_decoding_token_by_token_equals_the_full_forward():
    torch.manual_seed(0)
    model = build_model(make_model_config("moe-dynamic-qkv", D, 2, 2, D_FF, 64, 32,
                                          moe={"shared_expert": True}))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2, max_len=12)
        model.prefill(idx[:, :5], cache)
        stepped = [model.forward_step(idx[:, t], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_expert_initialisation_follows_the_models_rule():
    torch.manual_seed(0)
    cfg = make_model_config("moe", 64, 8, 1, 128, 64, 32, moe={"shared_expert": True})
    layer = build_model(cfg).blocks[0].ffn
    assert layer.gate.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.down.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.shared.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)


# -- counting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("conv", [ConvSpec(), ConvSpec(kind="dynamic-lowrank", rank=4)],
                         ids=lambda c: c.kind)
def test_total_and_active_params_match_the_built_model(shared, tied, conv):
    cfg = moe_config(n_experts=5, top_k=2, shared_expert=shared).replace(tie_embeddings=tied, conv=conv)
    counted = count_params(cfg)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == counted.total
    # Active: everything but the n_experts - top_k experts a token does not use.
    stacks = sum(block.ffn.gate.numel() + block.ffn.up.numel() + block.ffn.down.numel()
                 for block in model.blocks)
    assert counted.active == counted.total - stacks * 3 // 5
    assert counted.active_non_embedding == counted.non_embedding - stacks * 3 // 5
    # Against the dense model: + the router, a second expert and the shared one, per layer.
    dense = count_params(cfg.replace(ffn="swiglu"))
    extra = D * 5 + 3 * D * D_FF + (3 * D * D_FF if shared else 0)
    assert counted.active_non_embedding == dense.non_embedding + cfg.n_layers * extra


def test_an_olmoe_like_config_is_7b_total_1b_active():
    """OLMoE-1B-7B's shape (d 2048, 16 layers, 64 experts of 1024, top-8, vocab 50,304, untied):
    6.9B total and 1.3B active parameters, as published; the built model agrees."""
    cfg = ModelConfig(vocab_size=50_304, d_model=2048, n_layers=16, n_heads=16, d_ff=1024,
                      tie_embeddings=False, ffn="moe", moe=MoESpec(n_experts=64, top_k=8))
    counted = count_params(cfg)
    assert round(counted.total / 1e9, 1) == 6.9 and round(counted.active / 1e9, 1) == 1.3
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == counted.total
    assert flops_per_token(cfg, 4096).six_n == 6 * counted.active_non_embedding


def test_active_flops_by_hand():
    cfg = moe_config(n_experts=6, top_k=2, shared_expert=True)
    flops = flops_per_token(cfg, 32)
    assert flops.breakdown["mlp"] == 2 * (2 + 1) * 3 * 2 * D * D_FF
    assert flops.breakdown["router"] == 2 * 2 * D * 6
    dense = flops_per_token(cfg.replace(ffn="swiglu"), 32)
    assert flops.forward - dense.forward == 2 * (2 * 3 * 2 * D * D_FF + 2 * D * 6)


@pytest.mark.parametrize("shared", [False, True])
def test_flops_match_torch_flop_counter_when_every_expert_is_active(shared):
    """With top_k = n_experts no row is padded, so the batched matmuls are exactly the active
    experts' FLOPs; the counter also sees the router and the (dense) rest of the model."""
    torch.manual_seed(0)
    cfg = moe_config(n_experts=3, top_k=3, shared_expert=shared).replace(
        conv=ConvSpec(kind="dynamic-lowrank", rank=4))
    model = build_model(cfg)
    batch, seq_len = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    flops = flops_per_token(cfg, seq_len)
    expected = (flops.forward - flops.breakdown["conv_apply"]) * batch * seq_len
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == expected


def test_the_moe_sweep_plans_with_the_dense_learning_rate_of_each_shape():
    path = REPO / "sweeps" / "moe-small.yaml"
    runs = expand(load_sweep(path))
    assert len(runs) == 3 * 4 * 3 and all(run.spec.model.ffn == "moe" for run in runs)
    for run in runs:
        dense = count_params(run.spec.model.replace(ffn="swiglu", conv=ConvSpec()))
        assert run.spec.optim.lr == pytest.approx(0.002 * (dense.non_embedding / 1e7) ** -0.25)
        assert run.flops_per_token == flops_per_token(run.spec.model, 512).train
    plan = subprocess.run([sys.executable, "-m", "isoflop", "plan", str(path), "--no-data-check"],
                          capture_output=True, text=True, check=False)
    assert plan.returncode == 0 and "36 runs" in plan.stdout, plan.stderr
