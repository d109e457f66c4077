"""Cooldown branches of a WSD run: each endpoint equals a separate run, the trunk is untouched."""

from __future__ import annotations

import dataclasses

import pytest
from test_trainer import TOKENS_PER_STEP, make_spec

from isoflop.orchestrator.rundir import RunDir
from isoflop.runspec import RunSpec
from isoflop.train import run
from isoflop.train.trainer import Trainer, plan_branches
from word_corpus import write_word_corpus

WSD = {"kind": "wsd", "warmup_fraction": 0.0, "decay_fraction": 0.25}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), n_files=12, sentences=300)


def wsd_spec(corpus_dir, steps, cooldown_steps=(), **schedule):
    return make_spec(
        corpus_dir, steps=steps, eval_every=steps, schedule=WSD | schedule,
        train={"cooldown_tokens": tuple(s * TOKENS_PER_STEP for s in cooldown_steps)},
    )


def test_branch_endpoints_equal_separate_runs_and_the_trunk_is_unchanged(corpus_dir, tmp_path):
    branched = run(wsd_spec(corpus_dir, 16, cooldown_steps=(8, 12)), tmp_path / "branched")
    plain = run(wsd_spec(corpus_dir, 16), tmp_path / "plain")
    # Restoring the trunk after each branch leaves it exactly as a run without branches.
    assert branched["final_val_loss"] == plain["final_val_loss"]
    assert branched["final_train_loss"] == plain["final_train_loss"]
    assert "branches" not in plain

    records = branched["branches"]
    assert [b["tokens"] for b in records] == [8 * TOKENS_PER_STEP, 12 * TOKENS_PER_STEP]
    for record in records:
        steps = record["steps"]
        separate = run(wsd_spec(corpus_dir, steps), tmp_path / f"separate-{steps}")
        # No warm-up: same weights, data order and LR at every step as a WSD run of that length.
        assert record["final_val_loss"] == separate["final_val_loss"]
        assert record["flops"] == separate["total_flops"]
        decay_steps = round(0.25 * steps)
        assert record["branch_flops"] == record["flops"] * decay_steps / steps
        assert record["tokens_per_s"] > 0 and record["lr"] < 1e-2
    checkpoints = RunDir(tmp_path / "branched").checkpoint_dir
    assert {p.name for p in checkpoints.glob("branch-*.pt")} == {
        f"branch-{8 * TOKENS_PER_STEP}.pt", f"branch-{12 * TOKENS_PER_STEP}.pt",
    }
    assert RunDir(tmp_path / "branched").log_path.read_text().count("cooldown branch to") == 2


class Interrupt(Exception):
    pass


def test_a_crash_inside_a_branch_redoes_it_and_one_after_does_not(corpus_dir, tmp_path, monkeypatch):
    spec = wsd_spec(corpus_dir, 16, cooldown_steps=(8,))
    straight = run(spec, tmp_path / "straight")
    original = Trainer.branch_lr
    crashes = []

    def crash_once_mid_branch(self, step, branch):
        if step == branch.start + 1 and not crashes:
            crashes.append(step)
            raise Interrupt("killed inside the branch")
        return original(self, step, branch)

    monkeypatch.setattr(Trainer, "branch_lr", crash_once_mid_branch)
    with pytest.raises(Interrupt):
        run(spec, tmp_path / "inside")
    resumed = run(spec, tmp_path / "inside")
    assert resumed["branches"] == [
        {**b, "train_time_s": resumed["branches"][0]["train_time_s"],
         "tokens_per_s": resumed["branches"][0]["tokens_per_s"]} for b in straight["branches"]
    ]
    assert resumed["final_val_loss"] == straight["final_val_loss"]

    def crash_after_branch(step: int) -> None:
        if step == 7:  # the branch left the trunk at step 6 and is recorded by now
            raise Interrupt("killed after the branch")

    with pytest.raises(Interrupt):
        run(spec, tmp_path / "after", on_step=crash_after_branch)
    after = run(spec, tmp_path / "after")
    assert after["branches"][0]["final_val_loss"] == straight["branches"][0]["final_val_loss"]
    assert RunDir(tmp_path / "after").log_path.read_text().count("cooldown branch to") == 1


def test_branch_plan_is_validated_against_the_schedule(corpus_dir):
    spec = wsd_spec(corpus_dir, 16, cooldown_steps=(12, 8, 8))
    assert [(b.start, b.end) for b in plan_branches(spec)] == [(6, 8), (9, 12)]
    cosine = dataclasses.replace(spec, schedule=dataclasses.replace(spec.schedule, kind="cosine"))
    with pytest.raises(ValueError, match="cooldown_tokens=.*needs schedule.kind='wsd'"):
        plan_branches(cosine)
    with pytest.raises(ValueError, match="allowed: 1 to 15 steps"):
        plan_branches(wsd_spec(corpus_dir, 16, cooldown_steps=(16,)))
    with pytest.raises(ValueError, match="leaves its branch no decay step"):
        plan_branches(wsd_spec(corpus_dir, 16, cooldown_steps=(8,), decay_fraction=0.0))
    with pytest.raises(ValueError, match="inside the warm-up"):
        plan_branches(wsd_spec(corpus_dir, 16, cooldown_steps=(4,), warmup_fraction=0.25))


def test_run_ids_without_branches_are_unchanged_and_branches_change_them(corpus_dir):
    plain = wsd_spec(corpus_dir, 16)
    assert "cooldown_tokens" not in plain.identity()["train"]
    branched = wsd_spec(corpus_dir, 16, cooldown_steps=(8,))
    assert branched.run_id != plain.run_id
    assert RunSpec.from_dict(branched.to_dict()) == branched  # the list from JSON becomes a tuple
