"""Architecture registry: names, lookups, config assembly and overrides; torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from isoflop.models.config import ConvSpec, ModelConfig, MoESpec, SSMSpec
from isoflop.models.registry import (
    ARCHITECTURES,
    Architecture,
    architecture_names,
    get_architecture,
    make_model_config,
    register,
)

BASE = ["transformer", "static-qkv", "dynamic-qkv", "dynamic-headwise-qkv",
        "static-all-linear", "dynamic-all-linear"]
RECURRENT = ["mamba2", "mamba2-noconv", "mamba2-dynamic", "gdn", "gdn-noconv", "gdn-dynamic"]
MOE = ["moe", "moe-static-qkv", "moe-dynamic-qkv"]
SIZE = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=256, max_seq_len=128)


def test_every_family_in_order_and_the_transformer_with_and_without_qk_norm():
    assert architecture_names() == BASE + [f"{name}-qknorm" for name in BASE] + RECURRENT + MOE
    for name in BASE:
        plain, normed = get_architecture(name), get_architecture(f"{name}-qknorm")
        assert (plain.qk_norm, normed.qk_norm) == (False, True)
        assert plain.conv == normed.conv and plain.name == name and plain.description


@pytest.mark.parametrize(
    "name, kind, placement, mixer, ffn",
    [
        ("transformer", "none", "qkv", "attention", "swiglu"),
        ("static-qkv", "static", "qkv", "attention", "swiglu"),
        ("dynamic-qkv", "dynamic-lowrank", "qkv", "attention", "swiglu"),
        ("dynamic-headwise-qkv", "dynamic-headwise", "qkv", "attention", "swiglu"),
        ("static-all-linear", "static", "all-linear", "attention", "swiglu"),
        ("dynamic-all-linear", "dynamic-lowrank", "all-linear", "attention", "swiglu"),
        ("mamba2", "static", "qkv", "mamba2", "swiglu"),
        ("mamba2-noconv", "none", "qkv", "mamba2", "swiglu"),
        ("mamba2-dynamic", "dynamic-lowrank", "qkv", "mamba2", "swiglu"),
        ("gdn", "static", "qkv", "gated-deltanet", "swiglu"),
        ("gdn-noconv", "none", "qkv", "gated-deltanet", "swiglu"),
        ("gdn-dynamic", "dynamic-lowrank", "qkv", "gated-deltanet", "swiglu"),
        ("moe", "none", "qkv", "attention", "moe"),
        ("moe-static-qkv", "static", "qkv", "attention", "moe"),
        ("moe-dynamic-qkv", "dynamic-lowrank", "qkv", "attention", "moe"),
    ],
)
def test_conv_mixer_and_ffn_of_each_architecture(name, kind, placement, mixer, ffn):
    arch = get_architecture(name)
    assert (arch.conv.kind, arch.conv.placement, arch.mixer, arch.ffn) == (kind, placement, mixer, ffn)
    assert (arch.conv.width, arch.conv.rank, arch.conv.head_size) == (4, 16, 16)


def test_unknown_names_list_every_allowed_name():
    for error in (KeyError, ValueError):
        with pytest.raises(error) as raised:
            get_architecture("dynamic-qkvv")
        message = str(raised.value)
        assert message.startswith("unknown architecture 'dynamic-qkvv'; allowed: transformer, ")
        assert all(name in message for name in architecture_names())
    with pytest.raises(KeyError, match="allowed: transformer"):
        make_model_config("mamba", **SIZE)


@pytest.mark.parametrize("name", architecture_names())
def test_make_model_config_joins_architecture_and_size(name):
    cfg = make_model_config(name, **SIZE)
    arch = get_architecture(name)
    assert isinstance(cfg, ModelConfig)
    assert (cfg.conv, cfg.qk_norm, cfg.mixer, cfg.ffn) == (arch.conv, arch.qk_norm, arch.mixer, arch.ffn)
    assert {key: getattr(cfg, key) for key in SIZE} == SIZE
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_change_only_what_they_name():
    cfg = make_model_config("dynamic-qkv", **SIZE, conv={"rank": 32}, tie_embeddings=False)
    assert cfg.conv == ConvSpec(kind="dynamic-lowrank", placement="qkv", rank=32)
    assert cfg.tie_embeddings is False and cfg.qk_norm is False
    assert make_model_config("transformer", **SIZE, qk_norm=True).qk_norm is True
    whole = ConvSpec(kind="static", width=2)
    assert make_model_config("dynamic-qkv", **SIZE, conv=whole).conv == whole
    assert get_architecture("dynamic-qkv").conv.rank == 16  # the registry is not mutated


def test_ssm_and_moe_overrides_change_only_what_they_name():
    cfg = make_model_config("mamba2-dynamic", **SIZE, ssm={"state_size": 16}, conv={"rank": 4})
    assert cfg.ssm == SSMSpec(state_size=16) and cfg.conv.rank == 4 and cfg.mixer == "mamba2"
    cfg = make_model_config("moe-dynamic-qkv", **SIZE, moe={"n_experts": 4, "shared_expert": True})
    assert cfg.moe == MoESpec(n_experts=4, shared_expert=True) and cfg.ffn == "moe"
    assert make_model_config("transformer", **SIZE, ffn="moe").moe == MoESpec()


def test_bad_overrides_name_the_key_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown model override\(s\) dropout; allowed: conv, qk_norm"):
        make_model_config("transformer", **SIZE, dropout=0.1)
    with pytest.raises(ValueError, match=r"unknown conv field\(s\) ranks; allowed: kind, placement"):
        make_model_config("dynamic-qkv", **SIZE, conv={"ranks": 8})
    with pytest.raises(ValueError, match="conv.width=9; allowed: 1..8"):
        make_model_config("dynamic-qkv", **SIZE, conv={"width": 9})
    with pytest.raises(ValueError, match=r"conv.head_size=48 must divide every convolved width"):
        make_model_config("dynamic-headwise-qkv", **SIZE, conv={"head_size": 48})
    with pytest.raises(ValueError, match=r"unknown moe field\(s\) experts; allowed: n_experts, top_k"):
        make_model_config("moe", **SIZE, moe={"experts": 4})
    with pytest.raises(ValueError, match=r"moe.top_k=3; allowed: 1..2 \(moe.n_experts\)"):
        make_model_config("moe", **SIZE, moe={"n_experts": 2, "top_k": 3})
    with pytest.raises(ValueError, match=r"ssm override must be a dict of SSMSpec fields"):
        make_model_config("gdn", **SIZE, ssm=4)
    with pytest.raises(ValueError, match=r"model.mixer='rwkv'; allowed: attention, mamba2, gated-deltanet"):
        make_model_config("transformer", **SIZE, mixer="rwkv")
    with pytest.raises(ValueError, match=r"conv.placement='all-linear' with model.mixer='mamba2'"):
        make_model_config("mamba2", **SIZE, conv={"placement": "all-linear"})
    with pytest.raises(ValueError, match=r"qk_norm with mixer 'attention' only"):
        make_model_config("gdn", **SIZE, qk_norm=True)
    with pytest.raises(ValueError, match=r"ssm.n_groups=3 must divide Mamba-2's heads"):
        make_model_config("mamba2", **SIZE, ssm={"n_groups": 3})
    with pytest.raises(ValueError, match=r"conv.head_size=32 .*\(ssm.n_groups \* ssm.state_size=16\)"):
        make_model_config("mamba2", **SIZE, conv={"kind": "dynamic-headwise", "head_size": 32},
                          ssm={"state_size": 16})


def test_headwise_after_every_linear_needs_head_size_to_divide_d_ff():
    size = dict(SIZE, d_ff=120)
    assert make_model_config("dynamic-headwise-qkv", **size).d_ff == 120  # d_ff is not convolved
    with pytest.raises(ValueError, match=r"conv.head_size=16 must divide .*model.d_ff=120"):
        make_model_config("dynamic-headwise-qkv", **size, conv={"placement": "all-linear"})


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="'transformer' is already registered"):
        register(Architecture("transformer", "again", ConvSpec()))
    assert ARCHITECTURES["transformer"].description != "again"


def test_the_registry_does_not_import_torch():
    code = ("import sys, isoflop.models.registry, isoflop.models.config; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
