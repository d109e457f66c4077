"""The trainer end to end on CPU with tiny models: records, resume equality, divergence, failure."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.registry import make_model_config
from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import DataConfig, OptimConfig, RunSpec, ScheduleConfig, TrainConfig
from isoflop.train import run
from isoflop.train.checkpoint import load_checkpoint, save_checkpoint
from word_corpus import write_word_corpus

BATCH, SEQ = 8, 32
TOKENS_PER_STEP = BATCH * SEQ
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), n_files=12, sentences=300)


def make_spec(corpus_dir, steps=12, eval_every=4, arch="transformer", **changes) -> RunSpec:
    spec = RunSpec(
        arch=arch,
        model=make_model_config(arch, d_model=32, n_layers=1, n_heads=2, d_ff=96, vocab_size=256,
                                max_seq_len=SEQ),
        data=DataConfig(corpus=str(corpus_dir), val_fraction=0.2),
        train=TrainConfig(
            total_tokens=steps * TOKENS_PER_STEP, batch_size=BATCH, seq_len=SEQ,
            eval_every_tokens=eval_every * TOKENS_PER_STEP, eval_tokens=4 * SEQ, device="cpu",
        ),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(warmup_fraction=0.25),
        seed=3,
    )
    for section, fields in changes.items():
        changed = dataclasses.replace(getattr(spec, section), **fields)
        spec = dataclasses.replace(spec, **{section: changed})
    return spec


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_run_records_metrics_result_status_and_spec(corpus_dir, tmp_path):
    spec = make_spec(corpus_dir)
    result = run(spec, tmp_path / "run")
    rd = RunDir(tmp_path / "run")

    metrics = rd.read_metrics()
    assert [m["step"] for m in metrics] == [4, 8, 12]
    fpt = flops_per_token(spec.model, SEQ)
    for m in metrics:
        assert m["tokens"] == m["step"] * TOKENS_PER_STEP
        assert m["flops"] == fpt.train * m["tokens"]
        assert m["tokens_per_s"] > 0 and m["elapsed_s"] > 0 and m["lr"] > 0
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"])
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] < math.log(256)

    params = count_params(spec.model)
    assert result["state"] == "done" and result["run_id"] == spec.run_id
    assert result["steps"] == 12 and result["tokens"] == 12 * TOKENS_PER_STEP
    assert result["final_val_loss"] == metrics[-1]["val_loss"]
    assert result["final_train_loss"] == metrics[-1]["train_loss"]
    assert result["params"] == {"total": params.total, "non_embedding": params.non_embedding}
    assert result["flops_per_token"] == {
        "forward": fpt.forward, "train": fpt.train, "six_n": fpt.six_n, "six_n_total": fpt.six_n_total
    }
    assert result["total_flops"] == fpt.train * result["tokens"]
    assert result["wall_time_s"] >= result["train_time_s"] > 0 and result["tokens_per_s"] > 0
    provenance = result["provenance"]
    for key in ("isoflop_version", "git_sha", "torch_version", "triton_version", "python_version",
                "device_name", "hostname", "corpus_fingerprint", "run_id", "timestamp"):
        assert key in provenance
    assert provenance["device"] == "cpu" and provenance["device_name"]
    assert provenance["run_id"] == spec.run_id and len(provenance["corpus_fingerprint"]) >= 8

    assert rd.read_result() == result
    assert RunSpec.from_dict(rd.read_spec()) == spec
    status = rd.read_status()
    assert status["state"] == "done" and status["attempts"] == 1 and status["error"] is None
    assert rd.log_path.read_text().count("step ") == 3
    assert (rd.checkpoint_dir / "latest.pt").is_file()

    # A finished run is not trained again: the result comes back as recorded.
    calls = []
    assert run(spec, tmp_path / "run", on_step=calls.append) == result and calls == []


def test_eval_every_zero_gives_about_ten_evals(corpus_dir, tmp_path):
    spec = make_spec(corpus_dir, steps=20, eval_every=0)
    run(spec, tmp_path / "run")
    assert [m["step"] for m in RunDir(tmp_path / "run").read_metrics()] == list(range(2, 21, 2))


class Interrupt(Exception):
    pass


def interrupt_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            raise Interrupt(f"stopped at step {step}")

    return on_step


@pytest.mark.parametrize(
    "arch, checkpoint_every, stop_at",
    [
        ("transformer", 0, 10),  # checkpoint at each eval (step 8); steps 9-10 are replayed
        # checkpoint mid-interval (step 6, evals every 4): the loss accumulator resumes too, and
        # the eval line of step 8 written after it is dropped and recomputed
        ("dynamic-qkv", 6, 10),
    ],
)
def test_resumed_run_equals_uninterrupted(corpus_dir, tmp_path, arch, checkpoint_every, stop_at):
    spec = make_spec(corpus_dir, steps=16, arch=arch,
                     train={"checkpoint_every_tokens": checkpoint_every * TOKENS_PER_STEP})
    straight = run(spec, tmp_path / "straight")

    with pytest.raises(Interrupt):
        run(spec, tmp_path / "resumed", on_step=interrupt_at(stop_at))
    rd = RunDir(tmp_path / "resumed")
    status = rd.read_status()
    assert status["state"] == "failed" and "Interrupt: stopped at step" in status["error"]
    assert "Traceback" in status["traceback"] and not rd.has_result()
    assert [m["step"] for m in rd.read_metrics()] == [4, 8]
    resumed = run(spec, tmp_path / "resumed")

    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    straight_metrics = RunDir(tmp_path / "straight").read_metrics()
    assert without_timing(rd.read_metrics()) == without_timing(straight_metrics)
    status = rd.read_status()
    assert status["state"] == "done" and status["attempts"] == 2 and status["error"] is None
    assert "resumed from step" in rd.log_path.read_text()


def test_divergence_stops_the_run(corpus_dir, tmp_path):
    spec = make_spec(
        corpus_dir, optim={"lr": 1e10, "grad_clip": 0.0}, schedule={"warmup_fraction": 0.0}
    )
    outcome = run(spec, tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    assert outcome["state"] == "diverged" and outcome["run_id"] == spec.run_id
    assert 1 <= outcome["step"] < 12 and "loss is nan" in outcome["reason"]
    status = rd.read_status()
    assert status["state"] == "diverged" and status["step"] == outcome["step"]
    assert status["reason"] == outcome["reason"] and status["value"] == "nan"
    assert not rd.has_result()
    # Diverging is deterministic, so a rerun does not train again.
    calls = []
    assert run(spec, tmp_path / "run", on_step=calls.append) == outcome and calls == []


def test_failure_is_recorded_then_raised(tmp_path):
    spec = make_spec(tmp_path / "no-such-corpus")
    with pytest.raises(ValueError, match="data.corpus="):
        run(spec, tmp_path / "run")
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and status["error"].startswith("ValueError: data.corpus=")


def test_a_rundir_belongs_to_one_spec(corpus_dir, tmp_path):
    run(make_spec(corpus_dir, steps=2, eval_every=2), tmp_path / "run")
    other = make_spec(corpus_dir, steps=2, eval_every=2, optim={"lr": 2e-2})
    with pytest.raises(ValueError, match="holds run .*use a fresh run directory"):
        run(other, tmp_path / "run")


def test_same_seed_same_run_other_seed_other_run(corpus_dir, tmp_path):
    spec = make_spec(corpus_dir, steps=4, eval_every=4)
    a = run(spec, tmp_path / "a")
    b = run(spec, tmp_path / "b")
    c = run(dataclasses.replace(spec, seed=4), tmp_path / "c")
    assert a["final_val_loss"] == b["final_val_loss"] != c["final_val_loss"]


def test_checkpoint_round_trip_restores_every_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt" / "latest.pt"
    save_checkpoint(path, model, optimizer, {"step": 7, "seed": 1}, {"step": 7})

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    expected = draws()
    weights = model.weight.detach().clone()
    optimizer_state = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        model.weight.zero_()
    optimizer.step()
    sampler_state, trainer_state = load_checkpoint(path, model, optimizer, torch.device("cpu"))
    assert draws() == expected
    assert torch.equal(model.weight, weights)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], optimizer_state)
    assert sampler_state == {"step": 7, "seed": 1} and trainer_state == {"step": 7}


@pytest.mark.gpu
def test_gpu_cuda_graphs_train_the_run_eager_trains(corpus_dir, tmp_path):
    """train.compile=graphs (torch.compile with CUDA graphs) on CUDA: the same losses as eager up
    to rounding, at every eval. The interval train loss averages per-step losses read back in
    groups, which would fail or repeat the last step's if a replay reused their memory."""
    cuda = {"device": "cuda", "eval_every_tokens": 4 * TOKENS_PER_STEP}
    eager = make_spec(corpus_dir, steps=16, arch="dynamic-qkv", train=cuda)
    graphs = make_spec(corpus_dir, steps=16, arch="dynamic-qkv", train=cuda | {"compile": "graphs"})
    run(eager, tmp_path / "eager")
    run(graphs, tmp_path / "graphs")
    eager_metrics, graph_metrics = (RunDir(tmp_path / name).read_metrics() for name in ("eager", "graphs"))
    assert [m["step"] for m in graph_metrics] == [4, 8, 12, 16]
    for e, g in zip(eager_metrics, graph_metrics):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-2)
        assert g["val_loss"] == pytest.approx(e["val_loss"], rel=1e-2)
    assert graph_metrics[-1]["val_loss"] < graph_metrics[0]["val_loss"]


@pytest.mark.gpu
def test_gpu_cuda_graphs_refuse_several_processes(corpus_dir, tmp_path):
    from isoflop.train.distributed import World
    from isoflop.train.trainer import Trainer

    spec = make_spec(corpus_dir, train={"device": "cuda", "compile": "graphs"})
    with pytest.raises(ValueError, match="compile=graphs trains in one process; this run has 2"):
        Trainer(spec, RunDir(tmp_path / "run"), echo=False, on_step=None, world=World(size=2, joined=True))
