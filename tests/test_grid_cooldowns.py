"""Sweeps that ask for cooldown branches: one WSD run per size, a branch at each smaller budget."""

from __future__ import annotations

import pytest
from test_grid import SWEEP, load

from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.spec import SweepError

BRANCHED = SWEEP.replace(
    "grid: {kind: isoflop, budgets: [1.0e+11, 3.0e+11], sizes: [tiny, d64-l2]}",
    "grid: {kind: isoflop, budgets: [1.0e+11, 2.0e+11, 3.0e+11], sizes: [tiny, d64-l2], "
    "cooldowns: true}",
).replace('lr: "0.003 * (params / 1e6) ** -0.25"}',
          'lr: "0.003 * (params / 1e6) ** -0.25", schedule: wsd, warmup_fraction: 0.05}')


def test_one_run_per_size_branches_at_the_smaller_budgets(tmp_path):
    separate = expand(load(tmp_path, BRANCHED.replace(", cooldowns: true", ""), "separate.yaml"))
    runs = expand(load(tmp_path, BRANCHED))
    assert len(separate) == 3 * len(runs)  # three budgets -> one run each (arch, size, seed)
    for run in runs:
        cells = {r.budget: r for r in separate
                 if (r.arch, r.size, r.spec.seed) == (run.arch, run.size, run.spec.seed)}
        assert run.budget == 3e11 and run.tokens == cells[3e11].tokens
        assert run.branches == ((cells[1e11].tokens, 1e11), (cells[2e11].tokens, 2e11))
        assert run.spec.train.cooldown_tokens == (cells[1e11].tokens, cells[2e11].tokens)
        # The trunk is the largest cell's run, except for its branches.
        assert run.spec.optim == cells[3e11].spec.optim and run.spec.model == cells[3e11].spec.model
        assert run.labels()["branches"] == [{"tokens": cells[b].tokens, "budget": b}
                                            for b in (1e11, 2e11)]
        # Compute spent: the largest run plus the decay fifth of the two smaller ones, against all
        # three trained separately.
        decay = run.spec.schedule.decay_fraction
        assert run.spent_flops == pytest.approx(
            cells[3e11].flops + decay * (cells[1e11].flops + cells[2e11].flops))
        assert run.spent_flops < 0.7 * sum(cell.flops for cell in cells.values())
    assert "branches" not in separate[0].labels()


def test_cooldowns_need_a_wsd_schedule(tmp_path):
    text = BRANCHED.replace(", schedule: wsd", "")
    with pytest.raises(SweepError, match="grid.cooldowns = True: needs a stable phase to branch "
                                         "from, but train.schedule is 'cosine'"):
        load(tmp_path, text)


def test_rules_over_tokens_are_refused_with_branches(tmp_path):
    text = BRANCHED.replace('lr: "0.003 * (params / 1e6) ** -0.25"', 'lr: "1e-3 * (tokens / 1e6) ** 0.1"')
    with pytest.raises(SweepError, match=r"grid.cooldowns = True: transformer at size tiny: optim.lr "
                                         r"differ between budgets"):
        expand(load(tmp_path, text))


def test_a_branch_cannot_start_its_decay_in_the_warm_up(tmp_path):
    text = BRANCHED.replace("warmup_fraction: 0.05", "warmup_fraction: 0.5")
    with pytest.raises(SweepError, match="would start its decay inside the warm-up"):
        expand(load(tmp_path, text))


def test_a_branch_needs_a_decay_step(tmp_path):
    text = BRANCHED.replace("warmup_fraction: 0.05", "warmup_fraction: 0.05, decay_fraction: 0")
    with pytest.raises(SweepError, match="train.decay_fraction = 0.0: leaves the cooldown branch"):
        expand(load(tmp_path, text))
