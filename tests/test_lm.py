"""The language model: shapes, loss, init, gradients, packing, causality, decode, param groups."""

from __future__ import annotations

import math

import pytest
import torch

from isoflop.models.attention import RopeFromZero, rope_angles
from isoflop.models.config import ModelConfig
from isoflop.models.conv import DynamicShortConv, StaticShortConv
from isoflop.models.lm import build_model
from isoflop.models.registry import (
    architecture_names,
    get_architecture,
    make_model_config,
)
from model_checks import parameters_without_gradient, trained_like

VOCAB, D, LAYERS, HEADS, D_FF, MAX_LEN = 96, 32, 2, 2, 64, 32
ARCHS = architecture_names()
# The Transformer family (attention + SwiGLU); the Mamba-2, Gated DeltaNet and MoE families have
# their own counting tests in test_mixers.py and test_moe.py.
TRANSFORMER_ARCHS = [name for name in ARCHS
                     if (get_architecture(name).mixer, get_architecture(name).ffn) == ("attention", "swiglu")]


def tiny_config(arch: str, **overrides) -> ModelConfig:
    return make_model_config(arch, D, LAYERS, HEADS, D_FF, VOCAB, MAX_LEN, **overrides)


def expected_parameter_count(cfg: ModelConfig) -> int:
    """The contract shared with counting.py, written out independently."""
    d, f, conv = cfg.d_model, cfg.d_ff, cfg.conv
    widths = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}

    def conv_params(in_features: int, channels: int) -> int:
        W = conv.width
        if conv.kind == "static":
            return W * channels
        if conv.kind == "dynamic-lowrank":
            return in_features * conv.rank + conv.rank * W * channels + W * channels
        return in_features * W * channels // conv.head_size + W * channels

    per_layer = 4 * d * d + 3 * d * f + 2 * d + (2 * cfg.head_dim if cfg.qk_norm else 0)
    per_layer += sum(conv_params(*widths[name]) for name in conv.linears)
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer + d


@pytest.mark.parametrize("arch", TRANSFORMER_ARCHS)
def test_parameter_count_matches_the_contract(arch):
    for cfg in (tiny_config(arch), tiny_config(arch, tie_embeddings=False)):
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)


@pytest.mark.parametrize(
    "arch, overrides, millions",
    [
        ("transformer", {}, 305.17),
        ("dynamic-qkv", {}, 309.3),
        ("dynamic-qkv", {"conv": {"rank": 128}}, 336.8),
        ("dynamic-qkv", {"conv": {"width": 1}}, 306.8),
        ("dynamic-headwise-qkv", {"conv": {"head_size": 8}}, 330.5),
        ("dynamic-headwise-qkv", {"conv": {"head_size": 128}}, 306.9),
    ],
)
def test_the_papers_300m_parameter_counts(arch, overrides, millions):
    cfg = make_model_config(arch, 1024, 16, 16, 2752, 100_352, 4096, **overrides)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


def test_forward_shapes_and_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    model = build_model(tiny_config("dynamic-all-linear-qknorm"))
    idx, targets = torch.randint(0, VOCAB, (3, 20)), torch.randint(0, VOCAB, (3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, VOCAB) and logits.dtype == torch.float32
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.05)
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, manual)
    assert model(idx)[1] is None


def test_initialisation():
    cfg = make_model_config("dynamic-qkv", 128, 4, 4, 256, 512, 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    std = cfg.init_std
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    block = model.blocks[0]
    assert block.mixer.q.weight.std().item() == pytest.approx(std, rel=0.05)
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    for projection in (block.mixer.o, block.ffn.down):
        assert projection.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    for conv in block.mixer.convs.values():
        assert conv.up.abs().max() == 0
        assert conv.down.weight.std().item() == pytest.approx(std, rel=0.1)
        assert 0 < conv.bias.abs().max() <= 1 / math.sqrt(cfg.conv.width)
    assert all(bool((norm.weight == 1).all()) for norm in (block.mixer_norm, block.ffn_norm, model.norm))
    torch.manual_seed(0)
    again = build_model(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("arch", ["dynamic-headwise-qkv", "dynamic-all-linear"])
def test_every_dynamic_conv_starts_as_a_static_conv(arch):
    """The model-wide normal init must not leak into the generators' zero-initialised maps."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch))
    convs = [m for m in model.modules() if isinstance(m, DynamicShortConv)]
    assert len(convs) == LAYERS * len(model.config.conv.linears)
    for conv in convs:
        generator = conv.up if conv.kind == "lowrank" else conv.proj.weight
        assert generator.abs().max() == 0


def test_attention_depends_on_relative_positions_only():
    """RoPE rotates both queries and keys: shifting every position changes nothing, stretching
    the positions does."""
    torch.manual_seed(0)
    attention = build_model(tiny_config("transformer-qknorm")).blocks[0].mixer
    h = torch.randn(2, 10, D)
    positions = torch.arange(10)

    def run(pos):
        with torch.no_grad():
            return attention(h, rope_angles(pos, D // HEADS, 10000.0))

    torch.testing.assert_close(run(positions + 17), run(positions), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(positions * 3), run(positions), atol=1e-4)


def test_rope_tables_are_rope_angles_kept_float32_wherever_the_model_goes():
    """The model reads RoPE's angles from tables of rope_angles(arange(max_len)): the same values as
    computing them per step, float32 after the model is cast, computed again where a move (here
    from the meta device) puts them, and not part of the saved state."""
    with torch.device("meta"):
        model = build_model(tiny_config("transformer"))
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    head_dim = D // HEADS
    assert model.rope.cos.dtype == torch.float32 and model.rope.cos.shape == (MAX_LEN, head_dim // 2)
    from_zero = model.rope.first(10)
    assert isinstance(from_zero, RopeFromZero)
    for got, want in zip(from_zero, rope_angles(torch.arange(10), head_dim, 10000.0)):
        assert torch.equal(got, want)
    packed = torch.tensor([0, 1, 2, 0, 1, 5, 31])
    for got, want in zip(model.rope(packed), rope_angles(packed, head_dim, 10000.0)):
        assert torch.equal(got, want)
    for got, want in zip(model.rope.at(31), rope_angles(torch.tensor([31]), head_dim, 10000.0)):  # (decode's)
        assert torch.equal(got, want)
    with pytest.raises(IndexError, match="position 32 is outside the RoPE tables"):
        model.rope.at(MAX_LEN)
    assert not any("rope" in key for key in model.state_dict())


def test_compiled_model_reads_its_rope_angles_instead_of_computing_them():
    """A whole-model torch.compile once inlined the angles' cos and sin into every kernel that rotates
    q or k (17% of a 300M transformer's step on the H200); from tables, no compiled kernel computes a
    cosine."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = build_model(tiny_config("transformer"))
    idx = torch.randint(0, VOCAB, (2, 16))
    compiled = torch.compile(model)
    (_, loss), code = run_and_get_code(lambda: compiled(idx, targets=idx))
    torch.testing.assert_close(loss, model(idx, targets=idx)[1])
    assert code and not any("cos(" in source for source in code)


def test_untied_head_is_its_own_matrix():
    torch.manual_seed(0)
    model = build_model(tiny_config("transformer", tie_embeddings=False))
    assert model.lm_head.weight is not model.tok_emb.weight
    assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)


@pytest.mark.parametrize("arch", ["dynamic-all-linear-qknorm", "dynamic-headwise-qkv-qknorm",
                                  "static-all-linear"])
def test_gradients_reach_every_parameter(arch):
    """At init U = 0 blocks the gradient of the low-rank `down` map; once an optimiser step has
    moved U, every parameter must receive a finite, nonzero gradient."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, tie_embeddings=False))
    assert parameters_without_gradient(model, VOCAB) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_separate_forwards(arch):
    model = trained_like(tiny_config(arch))
    lengths = [7, 3, 12]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    cu = torch.tensor([0, 7, 10, 22])
    with torch.no_grad():
        packed, _ = model(torch.cat(docs, 1), cu_seqlens=cu)
        separate = torch.cat([model(doc)[0] for doc in docs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["dynamic-all-linear", "dynamic-headwise-qkv", "static-qkv"])
def test_no_position_sees_the_future(arch):
    model = trained_like(tiny_config(arch))
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


DECODE_CASES = [(arch, {}) for arch in ARCHS] + [
    ("dynamic-qkv", {"tie_embeddings": False}),
    ("dynamic-qkv", {"conv": {"width": 1}}),
    ("dynamic-headwise-qkv", {"conv": {"width": 2, "placement": "all-linear"}}),
]


@pytest.mark.parametrize("arch, overrides", DECODE_CASES)
def test_decoding_token_by_token_equals_the_full_forward(arch, overrides):
    model = trained_like(tiny_config(arch, **overrides))
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2, max_len=12)
        prompt_logits = model.prefill(idx[:, :5], cache)
        stepped = [model.forward_step(idx[:, t], cache) for t in range(5, 12)]
    torch.testing.assert_close(prompt_logits, full[:, 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 5:], rtol=1e-5, atol=1e-5)
    assert cache.pos == 12
    with pytest.raises(ValueError, match="decode cache is full"):
        model.forward_step(idx[:, 0], cache)


def test_greedy_generation_follows_the_full_forward_argmax():
    model = trained_like(tiny_config("dynamic-all-linear-qknorm"))
    prompt = torch.randint(0, VOCAB, (2, 4))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        logits, _ = model(out)
    torch.testing.assert_close(out[:, 4:], logits[:, 3:-1].argmax(-1), rtol=0, atol=0)


def test_sampling_is_reproducible_with_a_generator():
    model = trained_like(tiny_config("dynamic-qkv"))
    prompt = torch.randint(0, VOCAB, (2, 3))
    samples = [model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
               for _ in range(2)]
    assert torch.equal(samples[0], samples[1])
    with pytest.raises(ValueError, match="temperature=-1"):
        model.generate(prompt, 2, temperature=-1)


@pytest.mark.parametrize("arch", ["dynamic-all-linear-qknorm", "dynamic-headwise-qkv"])
def test_param_groups_cover_every_parameter_once(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch))
    decay, no_decay = model.param_groups(0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for module in model.modules():
        if isinstance(module, DynamicShortConv):
            assert id(module.bias) in no_decay_ids
            generator = module.up if module.kind == "lowrank" else module.proj.weight
            assert id(generator) not in no_decay_ids
        if isinstance(module, StaticShortConv):
            assert id(module.weight) in no_decay_ids
    assert all(p.ndim == 1 or getattr(p, "_no_weight_decay", False) for p in no_decay["params"])
    assert id(model.tok_emb.weight) not in no_decay_ids


def test_bad_inputs_are_named():
    torch.manual_seed(0)
    model = build_model(tiny_config("transformer"))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="need batch size 1"):
        model(torch.zeros(2, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must"):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="max_len=64; allowed: 1..32"):
        model.new_cache(1, 64)
