"""Architecture registry: names, lookups, config assembly and overrides; torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from isoflop.models.config import ConvSpec, ModelConfig
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
SIZE = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=256, max_seq_len=128)


def test_the_transformer_family_with_and_without_qk_norm():
    assert architecture_names() == BASE + [f"{name}-qknorm" for name in BASE]
    for name in BASE:
        plain, normed = get_architecture(name), get_architecture(f"{name}-qknorm")
        assert (plain.qk_norm, normed.qk_norm) == (False, True)
        assert plain.conv == normed.conv and plain.name == name and plain.description


@pytest.mark.parametrize(
    "name, kind, placement",
    [
        ("transformer", "none", "qkv"),
        ("static-qkv", "static", "qkv"),
        ("dynamic-qkv", "dynamic-lowrank", "qkv"),
        ("dynamic-headwise-qkv", "dynamic-headwise", "qkv"),
        ("static-all-linear", "static", "all-linear"),
        ("dynamic-all-linear", "dynamic-lowrank", "all-linear"),
    ],
)
def test_conv_of_each_architecture(name, kind, placement):
    conv = get_architecture(name).conv
    assert (conv.kind, conv.placement) == (kind, placement)
    assert (conv.width, conv.rank, conv.head_size) == (4, 16, 16)


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
    assert (cfg.conv, cfg.qk_norm) == (arch.conv, arch.qk_norm)
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


def test_bad_overrides_name_the_key_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown model override\(s\) dropout; allowed: conv, qk_norm"):
        make_model_config("transformer", **SIZE, dropout=0.1)
    with pytest.raises(ValueError, match=r"unknown conv field\(s\) ranks; allowed: kind, placement"):
        make_model_config("dynamic-qkv", **SIZE, conv={"ranks": 8})
    with pytest.raises(ValueError, match="conv.width=9; allowed: 1..8"):
        make_model_config("dynamic-qkv", **SIZE, conv={"width": 9})
    with pytest.raises(ValueError, match=r"conv.head_size=48 must divide every convolved width"):
        make_model_config("dynamic-headwise-qkv", **SIZE, conv={"head_size": 48})


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
