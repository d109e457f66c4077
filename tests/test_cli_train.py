"""`isoflop train`: the YAML config file (values, defaults, every error) and the command end to end."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from isoflop.cli import main
from isoflop.models.sizes import resolve_size
from isoflop.orchestrator.rundir import RunDir
from isoflop.train.config_file import ConfigError, load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = "if x then y else z return def class for in while not and or".split()
    for i in range(8):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return folder


def tiny_config(corpus_dir, **sections) -> dict:
    config = {
        "arch": "transformer",
        "size": "d64-l1",
        "data": {"corpus": str(corpus_dir), "val_fraction": 0.2},
        "train": {"total_tokens": 6 * 4 * 32, "batch_size": 4, "seq_len": 32,
                  "eval_every_tokens": 3 * 4 * 32, "eval_tokens": 128, "device": "cpu"},
        "optim": {"lr": 1e-2},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


def write_config(tmp_path, config, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if not isinstance(config, str) else config)
    return path


# -- the config file -----------------------------------------------------------------------------


def test_config_file_builds_the_run_spec(tmp_path, corpus_dir):
    config = tiny_config(
        corpus_dir, arch="dynamic-qkv", model={"conv": {"rank": 4, "width": 3}, "qk_norm": True},
        schedule={"kind": "wsd", "decay_fraction": 0.3}, seed=7,
    )
    spec = load_train_config(write_config(tmp_path, config))
    shape = resolve_size("d64-l1")
    assert spec.arch == "dynamic-qkv" and spec.size == "d64-l1" and spec.seed == 7
    model = spec.model
    assert (model.d_model, model.n_layers, model.d_ff) == (shape.d_model, shape.n_layers, shape.d_ff)
    assert spec.model.vocab_size == 256 and spec.model.max_seq_len == 32
    assert spec.model.conv.kind == "dynamic-lowrank" and spec.model.conv.rank == 4
    assert spec.model.conv.width == 3 and spec.model.qk_norm
    assert spec.train.batch_size == 4 and spec.train.device == "cpu" and spec.train.compile is False
    assert spec.optim.lr == 1e-2 and spec.optim.weight_decay == 0.1  # a default
    assert spec.schedule.kind == "wsd" and spec.schedule.decay_fraction == 0.3
    assert spec.data.val_fraction == 0.2


@pytest.mark.parametrize("setting", [True, "graphs"])
def test_compile_settings(tmp_path, corpus_dir, setting):
    spec = load_train_config(write_config(tmp_path, tiny_config(corpus_dir, train={"compile": setting})))
    assert spec.train.compile == setting and type(spec.train.compile) is type(setting)


def test_numbers_written_as_yaml_strings(tmp_path, corpus_dir):
    # YAML 1.1 reads 3e-4 and 1e5 (no dot) as strings.
    text = yaml.safe_dump(tiny_config(corpus_dir)).replace("lr: 0.01", "lr: 3e-4")
    text = text.replace("total_tokens: 768", "total_tokens: 1e5")
    assert "3e-4" in text and "1e5" in text
    spec = load_train_config(write_config(tmp_path, text))
    assert spec.optim.lr == 3e-4 and spec.train.total_tokens == 100_000
    assert isinstance(spec.train.total_tokens, int)


def test_vocab_size_from_tokenizer_and_from_shards(tmp_path, corpus_dir):
    config = tiny_config(corpus_dir, data={"tokenizer": "bpe-512"})
    bpe = load_train_config(write_config(tmp_path, config))
    assert bpe.model.vocab_size == 512
    shards = tmp_path / "shards"
    shards.mkdir()
    np.arange(2000, dtype=np.uint16).tofile(shards / "train_000.bin")
    (shards / "meta.json").write_text(json.dumps({"vocab_size": 3000}))
    config = tiny_config(corpus_dir, data={"corpus": str(shards)})
    spec = load_train_config(write_config(tmp_path, config))
    assert spec.model.vocab_size == 3000


def test_the_example_config_loads():
    spec = load_train_config(REPO / "examples" / "train-tiny.yaml")
    assert spec.arch == "dynamic-qkv" and spec.data.corpus == "python-stdlib"
    assert spec.model.max_seq_len == spec.train.seq_len


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trainer": {}}, "unknown key trainer (did you mean 'train'?); allowed: arch, size, model, data, train"),
        ({"train": {"batchsize": 4}},
         "unknown key train.batchsize (did you mean 'batch_size'?); allowed: total_tokens, batch_size"),
        ({"train": {"batch_size": "eight"}},
         "train.batch_size='eight' (wrong type); allowed: an integer"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size=2.5 (wrong type); allowed: an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size=0; allowed: an integer >= 1"),
        ({"train": {"compile": "yes"}}, "train.compile='yes'; allowed: true, false or graphs"),
        ({"train": {"compile": 2}}, "train.compile=2 (wrong type); allowed: true or false or a string"),
        ({"train": {"device": "tpu"}}, "train.device='tpu'; allowed: auto, cpu, cuda"),
        ({"train": {"total_tokens": 10}},
         "train.total_tokens=10; allowed: >= one step of train.batch_size x train.seq_len = 128"),
        ({"train": [1, 2]}, "train=[1, 2] (wrong type); allowed: a mapping"),
        ({"optim": {"lr": -1.0}}, "optim.lr=-1.0; allowed: a number > 0"),
        ({"optim": {"beta2": 1.0}}, "optim.beta2=1.0; allowed: a number in [0, 1)"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction=0.0; allowed: a number in (0, 1)"),
        ({"data": {"tokenizer": "words"}}, "data.tokenizer='words'; allowed: 'bytes' or 'bpe-<vocab>'"),
        ({"data": {"corpus": "tiny-shakespeare"}},
         "data.corpus='tiny-shakespeare' is neither a built-in corpus nor an existing path; allowed: "
         "python-stdlib, python-site, a text file"),
        ({"schedule": {"kind": "linear"}}, "schedule.kind='linear'; allowed: cosine, wsd"),
        ({"arch": "gpt5"}, "arch='gpt5'; allowed: transformer, static-qkv, dynamic-qkv"),
        ({"size": "huge"}, "size='huge': size='huge'; allowed: a named size (tiny"),
        ({"size": "d63-l2"}, "size='d63-l2': d_model=63 must be a multiple of the head dim 64"),
        ({"size": 1.5}, "size=1.5 (wrong type); allowed: a size name or parameter count"),
        ({"model": {"d_model": 128}}, "model.d_model=128 (set by `size`"),
        ({"model": {"qk_nrm": True}}, "unknown key model.qk_nrm (did you mean 'qk_norm'?); allowed: conv, qk_norm"),
        ({"model": {"conv": {"rnk": 4}}},
         "unknown key model.conv.rnk (did you mean 'rank'?); allowed: kind, placement, width, rank"),
        ({"model": {"conv": {"kind": "fancy"}}}, "model: conv.kind='fancy'; allowed: none, static"),
        ({"model": {"conv": {"width": 99}}}, "model: conv.width=99; allowed: 1..8"),
        ({"seed": -1}, "seed=-1; allowed: an integer >= 0"),
    ],
)
def test_config_errors_name_file_key_value_and_allowed(tmp_path, corpus_dir, change, message):
    path = write_config(tmp_path, tiny_config(corpus_dir, **change))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_train_config(path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "text, message",
    [
        ("arch: [unclosed", "not valid YAML"),
        ("- a list\n", "the file must be a mapping"),
        ("size: tiny\ntrain: {total_tokens: 1000}\n", "missing key arch; it is required"),
        ("arch: transformer\nsize: tiny\ntrain: {batch_size: 2}\n", "missing key train.total_tokens"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_empty_optional_sections_mean_defaults(tmp_path):
    text = "arch: transformer\nsize: tiny\ntrain: {total_tokens: 1e9}\noptim:\n"
    path = write_config(tmp_path, text)
    assert load_train_config(path).optim.lr == 3e-4


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml: cannot read the file"):
        load_train_config(tmp_path / "absent.yaml")


# -- the command ---------------------------------------------------------------------------------


def test_cli_train_end_to_end(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, tiny_config(corpus_dir))
    run_id = load_train_config(path).run_id
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    rundir = RunDir(tmp_path / "runs" / "train" / run_id)
    result = rundir.read_result()
    assert f"run {run_id} -> runs/train/{run_id}" in out
    assert "params" in out and "tokens in 6 steps" in out and "FLOPs" in out
    assert "step 3/6" in out and "step 6/6" in out
    assert f"val loss {result['final_val_loss']:.4f}" in out
    assert [m["step"] for m in rundir.read_metrics()] == [3, 6]

    # The same command again finds the finished run: nothing is trained or appended.
    assert main(["train", str(path)]) == 0
    assert "step 3/6" not in capsys.readouterr().out
    assert len(rundir.read_metrics()) == 2


def test_cli_config_error_exits_2_without_traceback(tmp_path, corpus_dir, capsys):
    path = write_config(tmp_path, tiny_config(corpus_dir, train={"seq_len": "long"}))
    assert main(["train", str(path), "--rundir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: train.seq_len='long' (wrong type); allowed: an integer")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, option", [
    ("train", "--rundir"), ("collect", "--out"), ("throughput", "--out"), ("status", "--runs-dir"),
])
def test_a_folder_option_given_a_file_is_a_usage_error(tmp_path, capsys, command, option):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "config.yaml"), option, str(a_file)])
    assert exit_.value.code == 2
    assert f"argument {option}: {a_file}: is a file; allowed: a folder, existing or not" in capsys.readouterr().err


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "isoflop 0.1.0"
    with pytest.raises(SystemExit):
        main([])  # a command is required
    assert "train" in capsys.readouterr().err


def test_python_dash_m_isoflop_trains(tmp_path, corpus_dir):
    path = write_config(tmp_path, tiny_config(corpus_dir, train={"total_tokens": 3 * 4 * 32}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "isoflop", "train", str(path), "--rundir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "final train loss" in done.stdout
    assert RunDir(tmp_path / "run").read_result()["steps"] == 3


def test_config_and_cli_imports_stay_torch_free():
    """Planning-side code (the CLI front, the config file, run directories) must not import torch."""
    code = (
        "import sys, isoflop.cli, isoflop.train, isoflop.train.config_file, isoflop.train.schedules\n"
        "import isoflop.orchestrator.rundir\n"
        "isoflop.train.config_file.load_train_config(sys.argv[1])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "examples" / "train-tiny.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
