"""Malformed sweep files, fuzzed: every one gives a SweepError naming what is wrong, never a traceback.

Three kinds of input: a valid sweep with one value replaced, deleted or joined by an unknown key
(errors deep inside valid structure); arbitrary YAML documents of mappings, lists and scalars
(errors of shape); and arbitrary text and bytes (errors of syntax and encoding). Each must load
and expand into runs, or raise SweepError; through the command line, exit 0 or 2 with one line.

Reading a file can fail outside YAML syntax too: bytes that are not UTF-8, a folder given as the
sweep, values PyYAML parses but cannot build (the date 2001-13-45, `!!float abc`, lists nested
thousands deep). test_load_sweep_reports_unreadable_files_as_sweep_errors pins each of those.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isoflop.cli import main
from isoflop.orchestrator.grid import expand
from isoflop.orchestrator.spec import SweepError, load_sweep

VALID: dict[str, Any] = {
    "name": "fuzz",
    "description": "a valid sweep, mutated by the tests",
    "data": {"corpus": "python-stdlib", "tokenizer": "bytes", "val_fraction": 0.02},
    "architectures": {
        "transformer": {"arch": "transformer", "baseline": True},
        "dynamic-qkv": {"arch": "dynamic-qkv", "overrides": {"conv": {"rank": 4}}},
    },
    "grid": {"kind": "isoflop", "budgets": [1.0e9, 3.0e9], "sizes": ["tiny", "d32-l1-h1"], "min_steps": 5},
    "train": {"batch_size": 2, "seq_len": 32, "lr": "0.003 * (params / 1e5) ** -0.25",
              "warmup_fraction": 0.1, "schedule": "cosine", "device": "cpu"},
    "seeds": [0, 1],
    "executor": {"kind": "slurm", "workers": 2, "partition": "gpu", "time": "1:00:00", "mem": "4G",
                 "array_parallelism": 8, "setup": ["module load cuda"]},
}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def key_paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in the document: ('grid', 'budgets', 1), ('train',), ..."""
    paths = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            paths += key_paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += key_paths(value, prefix + (index,))
    return paths


PATHS = key_paths(VALID)
KNOWN_WORDS = sorted({str(part) for path in PATHS for part in path if isinstance(part, str)}
                     | {"kind", "ladder", "n_sizes", "spread", "tokens_per_param", "wsd", "cuda", "max_params",
                        "value", "gpus_per_run", "max_array_size", "nan", "inf", "1e12", "tiny", "2.5M"})

scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(KNOWN_WORDS)
    | st.text(max_size=12) | st.sampled_from(["1:00", "0:00:00", "-1", "1e400", "d0-l0", "12Q", ""])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_WORDS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)



def loads_or_says_why(path: Path) -> None:
    """The contract under test: a Sweep and its runs, or a SweepError naming the file."""
    try:
        sweep = load_sweep(path)
        runs = expand(sweep)
    except SweepError as error:
        assert str(error).startswith(str(path)), error
        return
    assert runs and all(run.tokens > 0 and math.isfinite(run.flops) for run in runs)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(key_paths(document) or [()]))
        if not path:
            break
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KNOWN_WORDS) | st.text(max_size=6))] = draw(values)
    return document


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return path


def test_the_unmutated_sweep_is_valid(tmp_path):
    assert len(expand(load_sweep(write(tmp_path, VALID)))) == 16  # 2 archs x 2 budgets x 2 sizes x 2 seeds


@SETTINGS
@given(document=mutated())
def test_a_valid_sweep_with_a_value_changed_deleted_or_added_loads_or_says_why(tmp_path, document):
    loads_or_says_why(write(tmp_path, document))


@SETTINGS
@given(document=values | st.dictionaries(st.sampled_from(KNOWN_WORDS), values, max_size=8))
def test_any_yaml_document_loads_or_says_why(tmp_path, document):
    loads_or_says_why(write(tmp_path, document))


@SETTINGS
@given(text=st.text(max_size=200) | st.sampled_from([
    "name: [unclosed", "{a: 1, a: 2}", "name: fuzz\n\tdata: {}", "&a [*a]", "!!python/object:os.system x",
    "name: x\ndata: {corpus: 2001-02-30}", "- - - -", "? [a]\n: b", "name: ''", "\ufeffname: x",
]))
def test_any_text_loads_or_says_why(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text, encoding="utf-8")
    loads_or_says_why(path)


@SETTINGS
# ASCII with every control character, and UTF-8 of any text (arbitrary bytes are seldom UTF-8;
# the non-UTF-8 cases are pinned below).
@given(data=st.lists(st.integers(0, 127), max_size=64).map(bytes)
       | st.text(max_size=32).map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_any_bytes_load_or_say_why(tmp_path, data):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(data)
    loads_or_says_why(path)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=mutated())
def test_the_command_line_answers_a_malformed_sweep_with_one_line(tmp_path, capsys, document):
    path = write(tmp_path, document)
    code = main(["plan", str(path), "--no-data-check", "--json"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.startswith(f"error: {path}") and err.count("\n") == 1


@pytest.mark.parametrize("content", [
    pytest.param(b"name: fuzz\nseeds: [0]\n", id="valid"),
    pytest.param(b"[a, b", id="yaml-syntax"),
    pytest.param(b"name: caf\xe9\n", id="latin-1"),
    pytest.param(b"name: fuzz\nseeds: 2001-13-45\n", id="impossible-date"),
    pytest.param(b"0: {0: 0000-00-00}", id="year-0"),
    pytest.param(b"x: !!float abc", id="bad-float-tag"),
    pytest.param(b"x: !!timestamp abc", id="bad-timestamp-tag"),
    pytest.param(b"[" * 3000 + b"]" * 3000, id="nested-3000-deep"),
    pytest.param(None, id="a-folder"),
])
def test_load_sweep_reports_unreadable_files_as_sweep_errors(tmp_path, content):
    path = tmp_path / "sweep.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SweepError, match=f"^{path}"):
        load_sweep(path)
