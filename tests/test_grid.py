"""Expansion: sweep -> RunSpecs; run ids; compute matching; size rules; plan without torch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from isoflop.models.counting import count_params, flops_per_token
from isoflop.orchestrator.estimate import PROFILES
from isoflop.orchestrator.grid import chinchilla_sizes, expand
from isoflop.orchestrator.plan import make_plan
from isoflop.orchestrator.spec import DEFAULT_OPTIMUM_TOKENS_PER_PARAM, SweepError, load_sweep
from isoflop.runspec import RunSpec

REPO = Path(__file__).resolve().parent.parent

SWEEP = """
name: grid-test
data: {corpus: python-stdlib, tokenizer: bytes}
architectures:
  transformer: {baseline: true}
  dynamic-qkv: {}
grid: {kind: isoflop, budgets: [1.0e+11, 3.0e+11], sizes: [tiny, d64-l2]}
train: {batch_size: 4, seq_len: 32, lr: "0.003 * (params / 1e6) ** -0.25"}
seeds: [0, 1]
"""


def load(tmp_path: Path, text: str = SWEEP, name: str = "sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_sweep(path)


def reordered(text: str) -> str:
    """The same sweep with every mapping's keys in reverse order."""
    def reverse(node):
        if isinstance(node, dict):
            return {k: reverse(node[k]) for k in reversed(list(node))}
        return [reverse(v) for v in node] if isinstance(node, list) else node

    return yaml.safe_dump(reverse(yaml.safe_load(text)), sort_keys=False)


def test_expansion_has_one_run_per_cell_and_seed_in_run_order(tmp_path):
    runs = expand(load(tmp_path))
    assert len(runs) == 2 * 2 * 2 * 2  # budgets x sizes x architectures x seeds
    cells = [(r.budget, r.size, r.arch, r.spec.seed) for r in runs]
    assert cells[:4] == [(1e11, "tiny", "transformer", 0), (1e11, "tiny", "transformer", 1),
                         (1e11, "tiny", "dynamic-qkv", 0), (1e11, "tiny", "dynamic-qkv", 1)]
    assert len({r.run_id for r in runs}) == len(runs)
    assert all(r.spec.arch == r.arch and r.spec.size == r.size for r in runs)


def test_expansion_is_deterministic_and_ignores_key_order(tmp_path):
    first = [r.run_id for r in expand(load(tmp_path))]
    again = [r.run_id for r in expand(load(tmp_path))]
    shuffled = [r.run_id for r in expand(load(tmp_path, reordered(SWEEP), "reordered.yaml"))]
    assert first == again
    assert sorted(first) == sorted(shuffled)


def test_run_id_is_pinned_across_machines(tmp_path):
    """The id is a hash of canonical JSON: no paths, hosts or dict order. If this value changes,
    every finished run of every sweep would be trained again: only change it on purpose."""
    run = expand(load(tmp_path))[0]
    assert run.run_id == RunSpec.from_dict(json.loads(json.dumps(run.spec.to_dict()))).run_id
    code = ("import json, sys; from isoflop.runspec import RunSpec; "
            "print(RunSpec.from_dict(json.loads(sys.stdin.read())).run_id)")
    other_process = subprocess.run([sys.executable, "-c", code], input=json.dumps(run.spec.to_dict()),
                                   capture_output=True, text=True, check=True,
                                   env=os.environ | {"PYTHONHASHSEED": "123"})
    assert other_process.stdout.strip() == run.run_id


@pytest.mark.parametrize(
    "old, new",
    [
        ('lr: "0.003 *', 'lr: "0.004 *'),
        ("seeds: [0, 1]", "seeds: [0, 2]"),
        ("batch_size: 4", "batch_size: 2"),
        ("seq_len: 32", "seq_len: 16"),
        ("tokenizer: bytes", "tokenizer: bpe-512"),
        ("corpus: python-stdlib", "corpus: python-site"),
        ("dynamic-qkv: {}", "dynamic-qkv: {overrides: {conv: {rank: 8}}}"),
        ("train: {", "train: {weight_decay: 0.05, "),
        ("train: {", "train: {schedule: wsd, "),
    ],
)
def test_run_id_changes_with_anything_that_affects_training(tmp_path, old, new):
    assert old in SWEEP
    before = {(r.budget, r.size, r.arch): r.run_id for r in expand(load(tmp_path)) if r.spec.seed == 0}
    after = {(r.budget, r.size, r.arch): r.run_id
             for r in expand(load(tmp_path, SWEEP.replace(old, new), "changed.yaml")) if r.spec.seed in (0,)}
    changed = [cell for cell in before if cell in after and before[cell] != after[cell]]
    if "seeds" in old:  # seed 0 is kept: only seed-1 runs (now seed 2) change
        assert not changed
        return
    if "rank" in new:  # only the dynamic architecture's runs change
        assert changed and all(arch == "dynamic-qkv" for _, _, arch in changed)
        return
    assert sorted(changed) == sorted(before)


def test_run_id_ignores_labels_and_device_choice(tmp_path):
    run = expand(load(tmp_path))[0]
    relabelled = dataclasses.replace(run.spec, size="another label",
                                     train=dataclasses.replace(run.spec.train, device="cuda"))
    assert relabelled.run_id == run.run_id


def test_compute_matching_charges_each_architecture_its_own_flops(tmp_path):
    runs = expand(load(tmp_path))
    for run in runs:
        per_token = flops_per_token(run.spec.model, run.spec.train.seq_len).train
        half_step = per_token * run.spec.train.tokens_per_step / 2
        assert run.flops == per_token * run.tokens
        assert abs(run.flops - run.budget) <= half_step  # rounding to whole steps only
        assert run.tokens % run.spec.train.tokens_per_step == 0
    by_cell = {(r.budget, r.size, r.arch): r for r in runs if r.spec.seed == 0}
    for budget, size, arch in by_cell:
        if arch == "dynamic-qkv":
            dynamic, baseline = by_cell[budget, size, arch], by_cell[budget, size, "transformer"]
            assert dynamic.flops_per_token > baseline.flops_per_token
            assert dynamic.tokens < baseline.tokens  # the conv's FLOPs are paid for in tokens


def test_hyper_parameters_are_shared_by_the_architectures_of_a_cell(tmp_path):
    runs = expand(load(tmp_path))
    for run in runs:
        baseline = next(r for r in runs if r.is_baseline and r.size == run.size and r.budget == run.budget)
        assert run.spec.optim.lr == baseline.spec.optim.lr
        expected = 0.003 * (count_params(baseline.spec.model).non_embedding / 1e6) ** -0.25
        assert run.spec.optim.lr == pytest.approx(expected)


def test_n_sizes_centre_on_the_chinchilla_optimum(tmp_path):
    budget = 1e15
    shapes = chinchilla_sizes(budget, n_sizes=5, spread=4.0)
    params = [s.non_embedding_params for s in shapes]
    assert params == sorted(params) and len(set(params)) == len(params)
    n_opt = math.sqrt(budget / (6 * DEFAULT_OPTIMUM_TOKENS_PER_PARAM))
    assert params[0] < n_opt < params[-1]
    assert math.sqrt(params[0] * params[-1]) == pytest.approx(n_opt, rel=0.5)
    assert params[-1] / params[0] == pytest.approx(16, rel=0.6)
    text = SWEEP.replace("sizes: [tiny, d64-l2]", "n_sizes: 3, spread: 2")
    text = text.replace("1.0e+11, 3.0e+11", "3.0e+11")
    runs = expand(load(tmp_path, text))
    assert {r.size for r in runs} == {s.name for s in chinchilla_sizes(3e11, 3, 2.0)}


def test_optimum_tokens_per_param_moves_the_centre_of_n_sizes(tmp_path):
    """More tokens per parameter at the optimum: smaller models for the same budget (sqrt scaling)."""
    default = chinchilla_sizes(1e15, n_sizes=1, spread=2.0)[0].non_embedding_params
    shifted = chinchilla_sizes(1e15, n_sizes=1, spread=2.0, tokens_per_param=80)[0].non_embedding_params
    assert shifted / default == pytest.approx(0.5, rel=0.25)
    base = SWEEP.replace("sizes: [tiny, d64-l2]", "n_sizes: 3, spread: 2").replace("1.0e+11, 3.0e+11", "3.0e+11")
    text = base.replace("spread: 2", "spread: 2, optimum_tokens_per_param: 80")
    runs = expand(load(tmp_path, text))
    assert {r.size for r in runs} == {s.name for s in chinchilla_sizes(3e11, 3, 2.0, tokens_per_param=80)}
    with pytest.raises(SweepError, match=r"optimum_tokens_per_param.*only applies to n_sizes"):
        load(tmp_path, SWEEP.replace("sizes: [tiny, d64-l2]", "sizes: [tiny], optimum_tokens_per_param: 40"))
    with pytest.raises(SweepError, match="optimum_tokens_per_param"):
        load(tmp_path, base.replace("spread: 2", "spread: 2, optimum_tokens_per_param: -1"))


def test_ladder_trains_every_architecture_on_the_baselines_tokens(tmp_path):
    text = SWEEP.replace("{kind: isoflop, budgets: [1.0e+11, 3.0e+11], sizes: [tiny, d64-l2]}",
                         "{kind: ladder, sizes: [tiny, d64-l2], tokens_per_param: 20}")
    runs = expand(load(tmp_path, text))
    for run in runs:
        baseline = next(r for r in runs if r.is_baseline and r.size == run.size)
        assert math.isnan(run.budget)
        assert run.tokens == baseline.tokens
        tokens_per_step = run.spec.train.tokens_per_step
        assert abs(run.tokens - 20 * baseline.params) <= tokens_per_step / 2


def test_plan_estimates_time_and_warns_when_data_would_repeat(tmp_path):
    sweep = load(tmp_path)
    runs = expand(sweep)
    plan = make_plan(sweep, runs, PROFILES["cpu"], train_tokens=30_000)
    assert all(seconds > 0 for seconds in plan.seconds)
    assert plan.total_seconds == pytest.approx(sum(plan.seconds))
    bigger = [s for r, s in zip(runs, plan.seconds) if r.budget == 3e11]
    smaller = [s for r, s in zip(runs, plan.seconds) if r.budget == 1e11]
    assert sum(bigger) > sum(smaller)
    repeating = [r for r in runs if r.tokens > 30_000]
    assert repeating and len(plan.warnings) == len(repeating)
    assert "epochs" in plan.warnings[0]
    assert make_plan(sweep, runs, PROFILES["cpu"], train_tokens=10**9).warnings == []
    graphs = load(tmp_path, SWEEP.replace("train: {", "train: {compile: graphs, "), "graphs.yaml")
    assert "train: {compile: graphs, " in graphs.path.read_text()
    warnings = make_plan(graphs, expand(graphs), PROFILES["h200"], train_tokens=10**9).warnings
    assert len(warnings) == 1 and "train.compile=graphs: the time estimates assume eager steps" in warnings[0]
    document = plan.to_json()
    assert document["n_runs"] == len(runs) and len(document["runs"]) == len(runs)
    assert {"run_id", "arch", "size", "params", "tokens", "flops", "est_seconds"} <= set(document["runs"][0])


def test_plan_command_does_not_import_torch(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    code = (
        "import sys, json, io, contextlib\n"
        "from isoflop.cli import main\n"
        "out = io.StringIO()\n"
        f"with contextlib.redirect_stdout(out): code = main(['plan', {str(sweep_file)!r}, '--json'])\n"
        "plan = json.loads(out.getvalue())\n"
        "print(json.dumps({'code': code, 'n_runs': plan['n_runs'], 'torch': 'torch' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "n_runs": 16, "torch": False}


@pytest.mark.parametrize("seconds, text", [
    (5, "5s"), (90, "1m30s"), (5 * 3600 + 120, "5h02m"), (2.9 * 86400, "69h36m"), (40 * 86400, "40.0 d"),
    (400 * 86400, "1.1 y"), (3_472_233_592 * 3600, "396,102 y"), (1e20, "3.17e+12 y"),
])
def test_plan_durations_stay_readable(seconds, text):
    from isoflop.orchestrator.formats import duration

    assert duration(seconds) == text


def test_plan_names_the_sweep_file_of_a_missing_corpus(tmp_path, capsys):
    from isoflop.cli import main

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP.replace("corpus: python-stdlib", "corpus: tiny-shakespeare"))
    assert main(["plan", str(sweep_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweep_file}: data.corpus='tiny-shakespeare' is neither a built-in "
                          "corpus nor an existing path; allowed: python-stdlib")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["plan", str(sweep_file), "--no-data-check"]) == 0  # the check is the data check's


def test_shipped_paper_small_fits_the_gpu_budget():
    """The GPU sweep of issue 3: four architectures, < ~25 H200-minutes by the plan's estimate."""
    sweep = load_sweep(REPO / "sweeps" / "paper-small.yaml")
    runs = expand(sweep)
    assert {r.arch for r in runs} == {"transformer", "static-qkv", "dynamic-qkv", "dynamic-all-linear"}
    plan = make_plan(sweep, runs, PROFILES["h200"])
    assert plan.total_seconds < 25 * 60
