"""The size ladder: the paper's shapes, named sizes, the search rule and resolve_size's inputs."""

import math
import subprocess
import sys

import pytest

from isoflop.models import sizes
from isoflop.models.counting import count_params
from isoflop.models.sizes import (
    NAMED_SIZES,
    PAPER_VOCAB_SIZE,
    Shape,
    ladder,
    resolve_size,
    shape_for_params,
    swiglu_hidden,
)

# Log-spaced targets over the range the rule must cover (50K to 2B non-embedding params).
TARGETS = [5e4 * (2e9 / 5e4) ** (i / 299) for i in range(300)]


def test_swiglu_hidden_matches_the_paper_and_the_rounding_rule():
    assert swiglu_hidden(1024) == 2752
    assert swiglu_hidden(2048) == 5504
    for d in range(64, 4097, 64):
        hidden = swiglu_hidden(d)
        assert hidden % 64 == 0
        assert 8 * d / 3 <= hidden < 8 * d / 3 + 64


def test_paper_shapes_are_exact():
    assert NAMED_SIZES["300M"] == Shape(d_model=1024, n_layers=16, n_heads=16, d_ff=2752)
    assert NAMED_SIZES["2B"] == Shape(d_model=2048, n_layers=32, n_heads=32, d_ff=5504)


@pytest.mark.parametrize("name, nominal", [
    ("150M", 150e6), ("300M", 300e6), ("600M", 600e6), ("1B", 1e9), ("2B", 2e9),
])
def test_paper_sizes_total_params_are_near_their_names(name, nominal):
    total = count_params(NAMED_SIZES[name].to_config(PAPER_VOCAB_SIZE)).total
    assert 0.9 <= total / nominal <= 1.1, (name, total)


def test_named_sizes_follow_the_rule_and_grow():
    params = [shape.non_embedding_params for shape in NAMED_SIZES.values()]
    assert params == sorted(params) and len(set(params)) == len(params)
    for name, shape in NAMED_SIZES.items():
        assert shape.d_model % 64 == 0 and shape.n_heads == shape.d_model // 64, name
        assert shape.d_ff == swiglu_hidden(shape.d_model), name
        assert shape.d_model == 64 * shape.n_layers, name  # the paper's aspect ratio, exactly
        # Each named shape is the rule's own answer for its size: the ladder agrees with the names.
        assert shape_for_params(shape.non_embedding_params) == shape, name


def test_cpu_sizes_span_50k_to_about_10m():
    assert 40e3 <= NAMED_SIZES["tiny"].non_embedding_params <= 60e3
    cpu = ["tiny", "xs", "s", "m", "l", "xl"]
    assert all(NAMED_SIZES[n].non_embedding_params <= 12e6 for n in cpu)
    assert NAMED_SIZES["xl"].non_embedding_params >= 8e6


def test_shape_non_embedding_params_agree_with_count_params():
    for shape in [*NAMED_SIZES.values(), Shape(96, 3, 3, 200), Shape(128, 1, 4, 64)]:
        cfg = shape.to_config(vocab_size=1000, tie_embeddings=False)
        assert count_params(cfg).non_embedding == shape.non_embedding_params
        assert shape.n_layers * (4 * shape.d_model**2 + 3 * shape.d_model * shape.d_ff
                                 + 2 * shape.d_model) + shape.d_model == shape.non_embedding_params


def test_shape_for_params_recovers_the_paper_models():
    assert shape_for_params(NAMED_SIZES["300M"].non_embedding_params) == NAMED_SIZES["300M"]
    assert shape_for_params(NAMED_SIZES["2B"].non_embedding_params) == NAMED_SIZES["2B"]


def test_shape_for_params_hits_the_target_across_the_range():
    misses = {t: shape_for_params(t).non_embedding_params / t for t in TARGETS}
    # The candidates are sparse at the very small end (53K, 107K, 160K, 213K, ...).
    assert all(1 / 1.6 <= miss <= 1.6 for miss in misses.values())
    assert all(1 / 1.25 <= miss <= 1.25 for t, miss in misses.items() if t >= 1e6)


def test_shape_for_params_shapes_obey_the_rule():
    for target in TARGETS[::10]:
        shape = shape_for_params(target)
        assert shape.d_model % 64 == 0 and shape.n_heads == shape.d_model // 64
        assert shape.d_ff == swiglu_hidden(shape.d_model)
        assert 16 <= shape.d_model / shape.n_layers <= 256
    assert shape_for_params(5e4) == Shape(64, 1, 1, 192)  # the small end: d_model 64, one layer


def test_shape_for_params_is_monotone():
    params = [shape_for_params(t).non_embedding_params for t in TARGETS]
    assert all(a <= b for a, b in zip(params, params[1:]))
    assert len(set(params)) > 50  # and it is a real ladder, not a few plateaus


def test_shape_for_params_is_deterministic():
    first = [shape_for_params(t) for t in TARGETS[::7]]
    sizes._candidates.cache_clear()
    assert [shape_for_params(t) for t in TARGETS[::7]] == first


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True])
def test_shape_for_params_rejects_bad_targets(bad):
    with pytest.raises(ValueError, match="allowed"):
        shape_for_params(bad)


@pytest.mark.parametrize("size, expected", [
    ("300M", Shape(1024, 16, 16, 2752)),
    ("300m", Shape(1024, 16, 16, 2752)),
    (" tiny ", NAMED_SIZES["tiny"]),
    ("2B", Shape(2048, 32, 32, 5504)),
    ("d256-l4", Shape(256, 4, 4, 704)),
    ("d96-l2-h3", Shape(96, 2, 3, 256)),
    ("d256-l4-f512", Shape(256, 4, 4, 512)),
    ("d256-l4-h8-f512", Shape(256, 4, 8, 512)),
])
def test_resolve_named_and_explicit_sizes(size, expected):
    assert resolve_size(size) == expected


@pytest.mark.parametrize("size, target", [
    ("50K", 5e4), ("2.5M", 2.5e6), ("1.2B", 1.2e9), ("3m", 3e6), ("5e4", 5e4),
    ("125000", 125000), (125000, 125000), (2.5e6, 2.5e6),
])
def test_resolve_param_targets(size, target):
    assert resolve_size(size) == shape_for_params(target)


def test_resolve_size_round_trips_shape_names():
    odd = [Shape(96, 2, 3, 256), Shape(256, 4, 8, 512), Shape(64, 3, 1, 100)]
    shapes = [*NAMED_SIZES.values(), *odd]
    for shape in shapes:
        assert resolve_size(shape.name) == shape
    assert NAMED_SIZES["m"].name == "d256-l4"
    assert Shape(256, 4, 8, 512).name == "d256-l4-h8-f512"


@pytest.mark.parametrize("bad", [
    "huge", "", "d96-l2", "d0-l4", "d256", "l4-d256", "-5", "0", "nan", "inf", "2.5X",
    None, True, [1],
])
def test_resolve_size_errors_name_the_value_and_what_is_allowed(bad):
    with pytest.raises(ValueError) as error:
        resolve_size(bad)
    message = str(error.value)
    assert "allowed" in message or "multiple of the head dim" in message
    if bad in ("huge", "2.5X"):
        assert repr(bad) in message and "tiny" in message and "d256-l4" in message


def test_shape_validation():
    with pytest.raises(ValueError, match="n_heads"):
        Shape(100, 2, 3, 256)
    with pytest.raises(ValueError, match="d_ff"):
        Shape(128, 2, 2, 0)
    with pytest.raises(ValueError, match="n_layers"):
        Shape(128, 2.0, 2, 256)


def test_ladder_is_log_spaced_distinct_and_increasing():
    shapes = ladder(1e6, 1e9, 7)
    assert len(shapes) == 7 and len(set(shapes)) == 7
    params = [s.non_embedding_params for s in shapes]
    assert params == sorted(params)
    for i, p in enumerate(params):
        target = 1e6 * 10 ** (i / 2)
        assert 1 / 1.25 <= p / target <= 1.25, (i, p, target)
    assert ladder(3e6, 3e6, 1) == [shape_for_params(3e6)]


def test_ladder_errors():
    with pytest.raises(ValueError, match="distinct"):
        ladder(5e4, 6e4, 3)  # only d64-l1 lives there
    with pytest.raises(ValueError, match="min_params"):
        ladder(1e6, 1e5, 3)
    with pytest.raises(ValueError, match="allowed"):
        ladder(1e5, 1e6, 0)


def test_sizes_and_counting_do_not_import_torch():
    code = (
        "import sys, isoflop.models.sizes, isoflop.models.counting;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
