"""Fused linear + cross-entropy (models/fused_ce.py): loss and gradients equal the plain path's,
chunk by chunk; ignored targets; autocast dtypes; torch.compile; the language model's switch."""

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

from isoflop.models import fused_ce
from isoflop.models.fused_ce import linear_cross_entropy, set_fused_ce
from isoflop.models.lm import compile_regions
from isoflop.models.registry import make_model_config
from model_checks import trained_like

REPO = Path(__file__).resolve().parent.parent
VOCAB, D = 50, 16


@pytest.fixture(autouse=True)
def restore_switch():
    before = fused_ce.get_fused_ce()
    yield
    set_fused_ce(before)


def plain_loss(h, weight, targets):
    return F.cross_entropy((h @ weight.T).reshape(-1, weight.shape[0]), targets.reshape(-1))


def inputs(shape=(3, 7), seed=0, ignored=((0, 3), (2, 0), (2, 6))):
    """h [*shape, D] and weight [VOCAB, D] that require grad, targets with a few ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).requires_grad_()
    weight = torch.randn(VOCAB, D, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, shape, generator=g)
    for index in ignored:
        targets[index[-len(shape):]] = -100
    return h, weight, targets


def loss_and_grads(loss_fn, h, weight, targets, **kwargs):
    loss = loss_fn(h, weight, targets, **kwargs)
    return (loss, *torch.autograd.grad(loss, [h, weight]))


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 21, 1000])  # 21 rows: 4 and 1000 do not divide them
@pytest.mark.parametrize("shape", [(3, 7), (21,)])
def test_loss_and_gradients_equal_the_plain_path_in_float64(float64, chunk_rows, shape):
    h, weight, targets = inputs(shape)
    fused = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=chunk_rows)
    plain = loss_and_grads(plain_loss, h, weight, targets)
    assert fused[0].dtype == torch.float64
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_rows", [5, None])
def test_loss_and_gradients_equal_the_plain_path_in_float32(chunk_rows):
    h, weight, targets = inputs((4, 9))
    fused = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=chunk_rows)
    plain = loss_and_grads(plain_loss, h, weight, targets)
    assert fused[0].dtype == torch.float32
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


def test_the_incoming_gradient_scales_both_gradients(float64):
    h, weight, targets = inputs()
    fused = linear_cross_entropy(h, weight, targets, chunk_rows=4)
    plain = plain_loss(h, weight, targets)
    for a, b in zip(torch.autograd.grad(-2.5 * fused, [h, weight]),
                    torch.autograd.grad(-2.5 * plain, [h, weight])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_all_targets_ignored_gives_nan_and_zero_gradients_as_cross_entropy():
    h, weight, targets = inputs()
    targets.fill_(-100)
    fused = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=4)
    plain = loss_and_grads(plain_loss, h, weight, targets)
    assert fused[0].isnan() and plain[0].isnan()
    for a, b in zip(fused[1:], plain[1:]):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


def test_an_ignored_chunk_counts_for_nothing(float64):
    """Every target of the first chunk ignored: the mean is over the others only."""
    h, weight, targets = inputs((12,), ignored=())
    targets[:4] = -100
    fused = linear_cross_entropy(h, weight, targets, chunk_rows=4)
    torch.testing.assert_close(fused, plain_loss(h[4:], weight, targets[4:]), rtol=1e-12, atol=0)


class LargestTensor(TorchDispatchMode):
    """The most elements any op run under it returned, and the dtype of each matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.matmul_dtypes = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.matmul_dtypes.append(out.dtype)
        return out


def test_only_one_chunk_of_logits_exists_at_a_time():
    """64 rows in chunks of 32: the largest tensor is one chunk's logits (h and the weight are
    smaller), where the plain path's is the logits of all rows."""
    h, weight, targets = inputs((64,))
    with LargestTensor() as seen:
        linear_cross_entropy(h, weight, targets, chunk_rows=32).backward()
    assert seen.largest == 32 * VOCAB
    with LargestTensor() as seen:
        plain_loss(h, weight, targets).backward()
    assert seen.largest == 64 * VOCAB


def test_under_autocast_the_matmuls_run_in_its_dtype_like_the_plain_path():
    """The three matmuls in bf16, the softmax in float32; loss and gradients within bf16 rounding
    of the plain path under the same autocast."""
    h, weight, targets = inputs((4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16), LargestTensor() as seen:
        fused = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=8)
    assert set(seen.matmul_dtypes) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(
            lambda h, w, t: F.cross_entropy(F.linear(h, w).float().view(-1, VOCAB), t.view(-1)),
            h, weight, targets)
    assert [t.dtype for t in fused] == [torch.float32] * 3  # the inputs' dtypes, not bf16
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-3, atol=0)
    for a, b in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_no_gradients_are_computed_without_grad_mode():
    """One matmul per chunk (the logits) under no_grad; three with gradients."""
    h, weight, targets = inputs((32,))
    with torch.no_grad(), LargestTensor() as without_grads:
        loss = linear_cross_entropy(h, weight, targets, chunk_rows=8)
    torch.testing.assert_close(loss, plain_loss(h, weight, targets).detach())
    with LargestTensor() as with_grads:
        linear_cross_entropy(h, weight, targets, chunk_rows=8)
    assert (len(without_grads.matmul_dtypes), len(with_grads.matmul_dtypes)) == (4, 12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    h, weight, targets = inputs((3, 10))
    torch._dynamo.reset()
    compiled = torch.compile(linear_cross_entropy, backend=backend, fullgraph=True)
    fused = loss_and_grads(compiled, h, weight, targets, chunk_rows=8)
    plain = loss_and_grads(plain_loss, h, weight, targets)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_under_torch_compile_and_autocast():
    h, weight, targets = inputs((3, 10))
    torch._dynamo.reset()
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(compiled, h, weight, targets, chunk_rows=8)
        eager = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=8)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_default_chunks_keep_a_chunk_of_float32_logits_under_a_gibibyte():
    assert fused_ce.default_chunk_rows(100_352) == 2560
    assert fused_ce.default_chunk_rows(96) % 256 == 0
    assert fused_ce.default_chunk_rows(2**30) == 256  # never fewer rows than a GEMM tile


def test_bad_inputs_raise():
    h, weight, targets = inputs()
    with pytest.raises(ValueError, match="chunk_rows=0; allowed: an integer >= 1"):
        linear_cross_entropy(h, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="targets of its leading shape"):
        linear_cross_entropy(h, weight, targets[:, :-1])


# -- the language model's switch ---------------------------------------------------------------

def tiny_config(arch: str, **overrides):
    return make_model_config(arch, 32, 2, 2, 64, 96, 32, **overrides)


def model_loss_and_grads(model, idx, targets, switch: str):
    """(loss, logged cross-entropy, gradients by parameter name) of one training forward."""
    set_fused_ce(switch)
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, return_logits=False)
    assert logits is None
    loss.backward()
    return ((loss.detach(), model.last_losses["cross_entropy"]),
            {name: p.grad for name, p in model.named_parameters()})


@pytest.mark.parametrize("arch, tied", [("dynamic-qkv", True), ("transformer", False), ("moe", True)])
def test_the_model_switched_on_gives_the_loss_and_gradients_of_off(arch, tied):
    """Including the tied embedding's gradient (lm_head.weight is tok_emb.weight) and, for MoE
    in training mode, the router losses added after the cross-entropy."""
    model = trained_like(tiny_config(arch, tie_embeddings=tied))
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    idx, targets = torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (2, 12))
    targets[0, :5] = -100
    off_loss, off_grads = model_loss_and_grads(model, idx, targets, "off")
    on_loss, on_grads = model_loss_and_grads(model, idx, targets, "on")
    torch.testing.assert_close(on_loss, off_loss)
    assert off_grads.keys() == on_grads.keys()
    for name, grad in off_grads.items():
        torch.testing.assert_close(on_grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    if arch == "moe":  # the router losses were added: the logged cross-entropy is less
        assert off_loss[1] < off_loss[0]


def test_the_switch_picks_the_path_and_logits_are_kept_where_asked_for():
    model = trained_like(tiny_config("transformer"))
    idx, targets = torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8))
    set_fused_ce("on")
    assert "LinearCrossEntropy" in model(idx, targets, return_logits=False)[1].grad_fn.name()
    logits, loss = model(idx, targets)  # the default keeps the logits: the plain path
    assert logits.shape == (2, 8, 96) and "LinearCrossEntropy" not in loss.grad_fn.name()
    for setting in ("off", "auto"):  # auto is off until a GPU measurement says otherwise
        set_fused_ce(setting)
        logits, loss = model(idx, targets, return_logits=False)
        assert logits is None and "LinearCrossEntropy" not in loss.grad_fn.name()
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(idx, return_logits=False)


def test_the_model_switched_on_under_regional_compilation():
    """The same loss and gradients as eager without it; flipping the switch retraces the head
    (the compiled code guards on it) rather than running the other path's graph."""
    from torch._dynamo.utils import counters

    cfg = tiny_config("dynamic-qkv")
    eager, compiled = trained_like(cfg), trained_like(cfg)
    idx, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    torch._dynamo.reset()
    counters.clear()
    compile_regions(compiled, backend="aot_eager", dynamic=False)
    compiled_loss, compiled_grads = model_loss_and_grads(compiled, idx, targets, "on")
    eager_loss, eager_grads = model_loss_and_grads(eager, idx, targets, "off")
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    assert counters["stats"]["unique_graphs"] == 2  # one block for every layer, one head
    model_loss_and_grads(compiled, idx, targets, "off")
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


def test_a_bad_setting_names_the_variable_and_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: auto, off, on"):
        set_fused_ce("yes")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISOFLOP_FUSED_CE": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import isoflop.models.lm"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ISOFLOP_FUSED_CE='true' is not a fused cross-entropy setting; allowed: auto, off, on" \
        in done.stderr


def test_throughput_benchmark_runs_each_variant_without_and_with_it(tmp_path):
    out = tmp_path / "throughput.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--config", "tiny",
         "--device", "cpu", "--no-compile", "--steps", "2", "--rounds", "2", "--warmup", "1",
         "--variants", "transformer,dynamic-qkv", "--fused-ce", "both", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["fused_ce"]) for r in results] == [
        ("transformer", "off"), ("transformer", "on"), ("dynamic-qkv", "off"), ("dynamic-qkv", "on")]
    seconds = {(r["variant"], r["fused_ce"]): sum(r["round_s"]) for r in results}
    for r in results:  # slowdowns against the transformer at the same setting
        baseline = seconds[("transformer", r["fused_ce"])]
        assert r["slowdown"] == pytest.approx(sum(r["round_s"]) / baseline - 1)
        if r["fused_ce"] == "on":
            assert r["fused_gain"] == pytest.approx(seconds[(r["variant"], "off")] / sum(r["round_s"]) - 1)
        else:
            assert r["fused_gain"] is None
    assert "dynamic-qkv +fused-ce" in done.stdout and "fused gain" in done.stdout
