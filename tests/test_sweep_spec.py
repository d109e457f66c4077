"""Sweep files: good ones parse, bad ones fail with file, key path, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.rules import Formula, RuleError, Table, TableRow, evaluate_rule
from isoflop.orchestrator.spec import IsoflopGrid, LadderGrid, SweepError, load_sweep, parse_sweep

REPO = Path(__file__).resolve().parent.parent

GOOD = {
    "name": "good",
    "data": {"corpus": "python-stdlib", "tokenizer": "bytes"},
    "architectures": {
        "transformer": {"baseline": True},
        "dyn": {"arch": "dynamic-qkv", "overrides": {"conv": {"rank": 4}}},
    },
    "grid": {"kind": "isoflop", "budgets": [1.0e11, "2e11"], "sizes": ["tiny", "d64-l2"]},
    "train": {"batch_size": 4, "seq_len": 32, "lr": "0.003 * (params / 1e6) ** -0.25"},
    "seeds": [0, 1],
    "executor": {"kind": "local", "workers": 2},
}


def write(tmp_path: Path, document: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def changed(path: str, value, base: dict = GOOD) -> dict:
    """A deep copy of `base` with the dotted key `path` set to value (None: deleted)."""
    document = yaml.safe_load(yaml.safe_dump(base, sort_keys=False))
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return document


def error_of(tmp_path: Path, document: dict) -> SweepError:
    path = write(tmp_path, document)
    with pytest.raises(SweepError) as caught:
        expand(load_sweep(path))
    error = caught.value
    assert error.file == str(path) and str(path) in str(error)
    return error


def test_good_file_parses_with_defaults(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    assert sweep.name == "good"
    assert [a.name for a in sweep.architectures] == ["transformer", "dyn"]
    assert sweep.baseline.name == "transformer" and sweep.baseline.arch == "transformer"
    assert sweep.architecture("dyn").overrides == {"conv": {"rank": 4}}
    assert isinstance(sweep.grid, IsoflopGrid)
    assert sweep.grid.budgets == (1e11, 2e11)  # "2e11" (a YAML 1.1 string) read as a number
    assert sweep.seeds == (0, 1)
    assert sweep.executor.workers == 2
    assert isinstance(sweep.train["lr"], Formula)
    assert sweep.train["weight_decay"] == 0.1  # OptimConfig's default
    assert sweep.train["schedule"] == "cosine"


@pytest.mark.parametrize(
    "name", ["quickstart.yaml", "paper-small.yaml", "paper-small-centred.yaml", "linear-rnn-small.yaml",
             "moe-small.yaml"]
)
def test_shipped_sweeps_validate_and_expand(name):
    sweep = load_sweep(REPO / "sweeps" / name)
    runs = expand(sweep)
    assert runs and sum(run.is_baseline for run in runs) * len(sweep.architectures) == len(runs)


@pytest.mark.parametrize("setting", [False, True, "graphs"])
def test_compile_setting_reaches_the_runs_and_their_ids(tmp_path, setting):
    """train.compile: graphs (CUDA graphs) is a setting of its own; false, the default, keeps the
    run ids that runs made before the setting existed have."""
    runs = expand(load_sweep(write(tmp_path, changed("train.compile", setting))))
    assert {run.spec.train.compile for run in runs} == {setting}
    default_ids = [run.run_id for run in expand(load_sweep(write(tmp_path, GOOD, "default.yaml")))]
    assert ([run.run_id for run in runs] == default_ids) == (setting is False)


def test_ladder_grid(tmp_path):
    document = changed("grid", {"kind": "ladder", "sizes": ["tiny", "xs"], "tokens_per_param": 50})
    sweep = load_sweep(write(tmp_path, document))
    assert isinstance(sweep.grid, LadderGrid) and sweep.grid.tokens_per_param == 50


@pytest.mark.parametrize(
    "key, value, path, allowed",
    [
        ("epochs", 3, "epochs", "name"),  # unknown top-level key: allowed lists the known keys
        ("train.learning_rate", 0.1, "train.learning_rate", "lr"),
        ("data.corpus_path", "x", "data.corpus_path", "corpus"),
        ("architectures.dyn.rank", 4, "architectures.dyn.rank", "overrides"),
        ("grid.budget", [1e12], "grid.budget", "budgets"),
        ("executor.gpus", 2, "executor.gpus", "workers"),
    ],
)
def test_unknown_keys_are_rejected(tmp_path, key, value, path, allowed):
    error = error_of(tmp_path, changed(key, value))
    assert error.path == path and error.value == value
    assert "not a known key" in str(error) and allowed in error.allowed


@pytest.mark.parametrize(
    "key, value, path, allowed",
    [
        ("train.batch_size", "sixteen", "train.batch_size", "formula"),
        ("train.batch_size", 0, "train.batch_size", ">= 1"),
        ("train.seq_len", "4 * 32", "train.seq_len", "integer"),  # seq_len may not be a rule
        ("train.compile", "yes", "train.compile", "true, false or graphs"),
        ("train.compile", 1, "train.compile", "true, false or graphs"),  # 1 == True, but not a boolean
        ("train.device", "tpu", "train.device", "cuda"),
        ("train.schedule", "linear", "train.schedule", "wsd"),
        ("train.warmup_fraction", 1.5, "train.warmup_fraction", "[0, 1]"),
        ("grid.budgets", [1e11, -5], "grid.budgets[1]", "> 0"),
        ("grid.budgets", [1e11, "lots"], "grid.budgets[1]", "a number"),
        ("grid.budgets", 1e11, "grid.budgets", "a list"),
        ("grid.sizes", ["tiny", "huge"], "grid.sizes[1]", "named size"),
        ("grid.kind", "random", "grid.kind", "isoflop, ladder"),
        ("data.tokenizer", "gpt2", "data.tokenizer", "bpe-<vocab>"),
        ("data.val_fraction", 0, "data.val_fraction", "strictly between 0 and 1"),
        ("seeds", [0, 0], "seeds", "distinct"),
        ("seeds", [-1], "seeds[0]", ">= 0"),
        ("name", "my sweep/1", "name", "directory name"),
        ("executor.kind", "pbs", "executor.kind", "local, slurm"),
        ("executor.workers", 0, "executor.workers", ">= 1"),
        ("architectures.dyn.arch", "dynamic-qvk", "architectures.dyn.arch", "dynamic-qkv"),
        ("architectures.dyn.baseline", "no", "architectures.dyn.baseline", "true or false"),
        ("name", None, "name", "a value"),  # missing required key
    ],
)
def test_bad_values_name_path_value_and_allowed(tmp_path, key, value, path, allowed):
    error = error_of(tmp_path, changed(key, value))
    assert error.path == path
    assert allowed in error.allowed, error.allowed
    assert path in str(error) and allowed in str(error)



def test_misspelt_keys_suggest_the_known_one(tmp_path):
    error = error_of(tmp_path, changed("train.seqlen", 32, changed("train.seq_len", None)))
    assert error.path == "train.seqlen" and "did you mean 'seq_len'?" in str(error)
    # A required key spelt wrong is reported missing first, naming what the file has instead.
    document = changed("grid", None)
    document["grids"] = GOOD["grid"]
    error = error_of(tmp_path, document)
    assert error.path == "grid" and "is missing (the file has 'grids': a misspelling?)" in str(error)
    assert "did you mean" not in str(error_of(tmp_path, changed("epochs", 3)))  # nothing close

def test_exactly_one_baseline(tmp_path):
    error = error_of(tmp_path, changed("architectures.dyn.baseline", True))
    assert error.path == "architectures" and "2 baselines" in error.problem
    assert sorted(error.value) == ["dyn", "transformer"]
    error = error_of(tmp_path, changed("architectures.transformer.baseline", None))
    assert "0 baselines" in error.problem and "exactly one" in error.allowed


def test_sizes_and_n_sizes_are_exclusive(tmp_path):
    error = error_of(tmp_path, changed("grid.n_sizes", 3))
    assert error.path == "grid" and "exactly one way" in error.problem
    error = error_of(tmp_path, changed("grid.sizes", None))
    assert error.path == "grid"


def test_budget_too_small_for_a_size_names_the_budget(tmp_path):
    # 1e9 FLOPs is a few hundred tokens for d64-l2: fewer than grid.min_steps batches of 4 x 32.
    error = error_of(tmp_path, changed("grid.budgets", [1e11, 1e9]))
    assert error.path == "grid.budgets[1]" and error.value == 1e9
    assert "steps" in error.problem and "min_steps" in error.problem
    assert "a value >=" in error.allowed


def test_bad_model_override_names_the_architecture(tmp_path):
    error = error_of(tmp_path, changed("architectures.dyn.overrides", {"conv": {"rnak": 4}}))
    assert error.path == "architectures.dyn.overrides" and "rnak" in error.problem
    error = error_of(tmp_path, changed("architectures.dyn.overrides", {"dropout": 0.1}))
    assert "dropout" in error.problem and "qk_norm" in error.problem


@pytest.mark.parametrize(
    "formula, fragment",
    [
        ("__import__('os').system('true')", "only these functions"),
        ("params.__class__", "Attribute is not allowed"),
        ("[1, 2][0]", "is not allowed"),
        ("lambda: 1", "is not allowed"),
        ("open('x')", "only these functions"),
        ("steps * 2", "unknown name 'steps'"),
        ("0.003 *", "not valid arithmetic"),
        ("'a' * 3", "only numbers"),
    ],
)
def test_formulas_outside_the_whitelist_are_rejected(tmp_path, formula, fragment):
    error = error_of(tmp_path, changed("train.lr", formula))
    assert error.path == "train.lr" and error.value == formula
    assert fragment in str(error)


def test_formula_evaluates_size_names_and_functions():
    rule = Formula("min(0.01, 0.003 * (params / 1e6) ** -0.25) + 0 * sqrt(tokens) * log(d_model)")
    context = {"params": 1e6, "tokens": 4e6, "d_model": 64}
    assert evaluate_rule(rule, context) == pytest.approx(0.003)
    context["params"] = 1e4
    assert evaluate_rule(rule, context) == pytest.approx(0.0094868, rel=1e-4)
    with pytest.raises(RuleError, match="finite real"):
        Formula("(0 - params) ** 0.5").evaluate({"params": 4.0})
    with pytest.raises(RuleError, match="failed"):
        Formula("1 / (params - params)").evaluate({"params": 4.0})


def test_table_rule_picks_the_first_row_covering_params(tmp_path):
    table = Table((TableRow(3e-3, 1e5), TableRow(2e-3, 1e6), TableRow(1e-3)))
    assert [evaluate_rule(table, {"params": p}) for p in (5e4, 1e5, 5e5, 1e9)] == [3e-3, 3e-3, 2e-3, 1e-3]
    with pytest.raises(RuleError, match="no table row covers"):
        Table((TableRow(3e-3, 1e5),)).evaluate({"params": 2e5})
    bad = [{"max_params": 1e6, "value": 3e-3}, {"max_params": 1e5, "value": 1e-3}]
    error = error_of(tmp_path, changed("train.lr", bad))
    assert error.path == "train.lr" and "increase" in error.problem


def test_table_in_a_sweep_file_sets_lr_per_size(tmp_path):
    document = changed("train.lr", [{"max_params": 6e4, "value": 0.004}, {"value": 0.002}])
    runs = expand(load_sweep(write(tmp_path, document)))
    lr_by_size = {run.size: run.spec.optim.lr for run in runs}
    assert lr_by_size == {"tiny": 0.004, "d64-l2": 0.002}  # non-embedding params 53K and 107K


def test_yaml_errors_and_missing_files_are_sweep_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(path)
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "absent.yaml")
    with pytest.raises(SweepError, match="not a mapping"):
        parse_sweep(["a", "list"], "inline.yaml")


def test_error_message_reads_as_one_line(tmp_path):
    error = error_of(tmp_path, changed("grid.budgets", [1e11, -5]))
    message = str(error)
    assert "\n" not in message
    expected = "grid.budgets[1] = -5: must be positive and finite; allowed: a number > 0"
    assert message == f"{error.file}: {expected}"
    # Where the file gives no value (a missing key, a missing file), the message shows none either.
    missing = error_of(tmp_path, changed("data", None))
    assert str(missing) == f"{missing.file}: data: is missing; allowed: a value" and missing.value is None
    with pytest.raises(SweepError) as absent:
        load_sweep(tmp_path / "absent.yaml")
    expected = f"{tmp_path / 'absent.yaml'}: the sweep file does not exist; allowed: a path to a YAML file"
    assert str(absent.value) == expected

