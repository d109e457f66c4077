"""The sweep file: its schema, and validation that names the file, key path, bad value and what is allowed.

A sweep file (YAML) says what to train; `grid.expand` turns it into RunSpecs. Layout:

    name: quickstart                       # runs go to <runs root>/<name>/<run id>/
    description: optional free text
    data: {corpus: python-stdlib, tokenizer: bytes, val_fraction: 0.02}
    architectures:                         # sweep name -> registry architecture (+ model overrides)
      transformer: {arch: transformer, baseline: true}     # exactly one baseline
      dynamic-qkv: {arch: dynamic-qkv, overrides: {conv: {rank: 8}}}
    grid:                                  # either an isoflop grid ...
      kind: isoflop
      budgets: [1.0e+12, 3.0e+12]          # training FLOPs per run (each architecture its own FLOPs)
      sizes: [d64-l2, 2.5M]                # explicit sizes, or:  n_sizes: 4, spread: 3
                                           # (+ optimum_tokens_per_param: 20, the sizes' centre)
      min_steps: 10                        # optional: a cell with fewer optimiser steps is an error
      cooldowns: false                     # optional, needs `schedule: wsd`: one run per size,
                                           # a cooldown branch at each smaller budget (grid.py)
    # grid: {kind: ladder, sizes: [150M, 300M], tokens_per_param: 50}   # ... or a size ladder
    # ... or, with data: {task: {kind: mqar, vocab_size: 64, n_pairs: 8}}, an associative-recall grid:
    # grid: {kind: recall, sizes: [d64-l2-h4], difficulties: [{n_pairs: 4}, {n_pairs: 8}],
    #        lrs: [1e-3, 3e-3], steps: 2000}
    train:                                 # one flat section; numbers may be size rules (rules.py)
      batch_size: 16
      seq_len: 128
      lr: "0.003 * (params / 1e6) ** -0.25"
    seeds: [0]
    executor: {kind: local, workers: 2}   # or, for `isoflop submit`:
    # executor: {kind: slurm, partition: gpu, gpus_per_run: 1, time: "2:00:00", array_parallelism: 16}
    # Runs larger than one GPU: gpus_per_run: 8, nodes_per_run: 2, parallel: fsdp (train/distributed.py)

`train` keys map onto TrainConfig, OptimConfig and ScheduleConfig fields (TRAIN_KEYS below; defaults are
those dataclasses' defaults). Every numeric `train` key except seq_len may be a rule: a number, a formula
string over the model's size, or a table (see rules.py).

A recall grid trains every architecture at every size on every difficulty (TaskConfig fields that
replace those of data.task) with every learning rate of `lrs` (which replaces train.lr) for `steps`
optimiser steps; the analysis keeps, per (architecture, size, difficulty), the LR with the best mean
test accuracy over seeds (isoflop/analysis/recall.py). A task needs a recall grid and vice versa.

Validation here is structural (keys, types, ranges, names that resolve). `grid.expand` completes it with
what needs the model counts: budgets too small for a size, model overrides the registry rejects.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from isoflop.data.synthetic import check_task
from isoflop.data.tokenizers import TOKENIZER_NAMES_HELP, nominal_vocab_size
from isoflop.models import registry, sizes
from isoflop.orchestrator.rules import Formula, Rule, RuleError, Table, TableRow
from isoflop.runspec import (
    COMPILE_ALLOWED,
    QUERY_PLACEMENTS,
    TASK_KINDS,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TaskConfig,
    TrainConfig,
    compile_setting_ok,
)

SCHEDULE_KINDS: tuple[str, ...] = ("cosine", "wsd")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
EXECUTOR_KINDS: tuple[str, ...] = ("local", "slurm")
# How a run of several processes splits the work (isoflop/train/distributed.py): replicas (ddp),
# shards (fsdp), or fsdp only when a replica would not fit (auto). Not part of any run's identity.
PARALLEL_MODES: tuple[str, ...] = ("auto", "ddp", "fsdp")
GRID_KINDS: tuple[str, ...] = ("isoflop", "ladder", "recall")
DEFAULT_MIN_STEPS = 10  # fewer optimiser steps than this cannot say anything about a size
DEFAULT_SPREAD = 3.0  # n_sizes grids: sizes from N_opt/3 to 3*N_opt unless the file says otherwise
# n_sizes grids centre on N_opt = sqrt(C / (6 * this)): Chinchilla's 20 tokens per parameter
DEFAULT_OPTIMUM_TOKENS_PER_PARAM = 20.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # safe as a directory name


NO_VALUE = object()  # SweepError's value where the file gives none (a missing key, an unreadable file)


class SweepError(ValueError):
    """A sweep file that cannot be run. The message names file, key path, bad value and what is allowed."""

    def __init__(self, file: Path | str, path: str, value: Any, problem: str, allowed: str = "") -> None:
        self.file, self.path, self.value = str(file), path, None if value is NO_VALUE else value
        self.problem, self.allowed = problem, allowed
        if value is NO_VALUE:  # "sweep.yaml: grid: is missing", "sweep.yaml: the sweep file does not exist"
            message = f"{file}: {path + ': ' if path else ''}{problem}"
        else:
            message = f"{file}: {path or '<top level>'} = {value!r}: {problem}"
        super().__init__(f"{message}; allowed: {allowed}" if allowed else message)


class _Invalid(Exception):
    """Raised by value parsers; the section reading the key turns it into a SweepError."""

    def __init__(self, problem: str, allowed: str = "") -> None:
        super().__init__(problem)
        self.problem, self.allowed = problem, allowed


# -- the parsed sweep -------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchitectureEntry:
    name: str  # the sweep's label, used in tables and as RunSpec.arch
    arch: str  # registry architecture
    baseline: bool
    overrides: dict[str, Any]  # ModelConfig overrides passed to registry.make_model_config


@dataclass(frozen=True)
class IsoflopGrid:
    """Every architecture at every size for every budget. sizes None: n_sizes shapes per budget,
    spread log-uniformly from N_opt/spread to N_opt*spread around the Chinchilla-style optimum."""

    budgets: tuple[float, ...]
    sizes: tuple[str, ...] | None
    n_sizes: int | None
    spread: float | None
    min_steps: int
    kind: str = "isoflop"
    cooldowns: bool = False  # one WSD run per (architecture, size), branching at smaller budgets
    optimum_tokens_per_param: float = DEFAULT_OPTIMUM_TOKENS_PER_PARAM  # n_sizes grids' centre


@dataclass(frozen=True)
class LadderGrid:
    """Every architecture at every size, each trained on tokens_per_param tokens per baseline parameter."""

    sizes: tuple[str, ...]
    tokens_per_param: float
    min_steps: int
    kind: str = "ladder"


@dataclass(frozen=True)
class RecallGrid:
    """Every architecture at every size, difficulty (data.task overrides) and learning rate, for
    `steps` optimiser steps each."""

    sizes: tuple[str, ...]
    difficulties: tuple[dict[str, Any], ...]  # TaskConfig fields replacing those of data.task
    lrs: tuple[float, ...]
    steps: int
    kind: str = "recall"


def difficulty_label(difficulty: dict[str, Any]) -> str:
    """'n_pairs=8,key_len=2' (in the file's key order); 'base' for the task as it is."""
    return ",".join(f"{key}={value}" for key, value in difficulty.items()) or "base"


Grid = Union[IsoflopGrid, LadderGrid, RecallGrid]


@dataclass(frozen=True)
class SlurmSettings:
    """What `isoflop submit` asks SLURM for. Every run is one element of a job array: one task, or
    with gpus_per_run > 1 or nodes_per_run > 1 one task per GPU on each of its nodes, training the
    run together (isoflop/train/distributed.py). gpus_per_run and parallel also hold for `isoflop
    run` (the local executor), which trains on one node."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    gpus_per_run: int = 0  # per node; a run of more than one trains on all of them at once
    nodes_per_run: int = 1
    parallel: str = "auto"  # how several GPUs split a run: ddp, fsdp, or auto (fsdp if it must)
    cpus_per_run: int = 1
    mem_gb: float | None = None  # None: the partition's default
    time_min: int = 60  # limit of one attempt; a run that hits it is requeued and resumes
    array_parallelism: int = 64  # tasks of one array running at once
    max_array_size: int = 1000  # tasks per array; SLURM's default MaxArraySize (1001) allows 1001
    max_requeues: int = 3  # time-limit requeues per run before it counts as failed
    setup: tuple[str, ...] = ()  # shell lines run first in every job, e.g. "module load cuda"


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"  # what `isoflop run` (local) or `isoflop submit` (slurm) uses by default
    workers: int = 1  # local: runs at once; on GPUs they are spread round-robin and may share a GPU
    slurm: SlurmSettings = SlurmSettings()

    # The settings that size one run hold for both executors; they live with the SLURM ones because
    # the sweep file's executor section (and `isoflop submit`'s options) list them together.
    @property
    def gpus_per_run(self) -> int:
        return self.slurm.gpus_per_run

    @property
    def nodes_per_run(self) -> int:
        return self.slurm.nodes_per_run

    @property
    def parallel(self) -> str:
        return self.slurm.parallel


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    description: str
    data: DataConfig
    architectures: tuple[ArchitectureEntry, ...]
    grid: Grid
    train: dict[str, Any]  # TRAIN_KEYS name -> value or Rule, defaults filled in
    seeds: tuple[int, ...]
    executor: ExecutorConfig

    @property
    def baseline(self) -> ArchitectureEntry:
        return next(a for a in self.architectures if a.baseline)

    def architecture(self, name: str) -> ArchitectureEntry:
        for entry in self.architectures:
            if entry.name == name:
                return entry
        raise KeyError(f"architecture {name!r} is not in sweep {self.name!r}")


# -- value parsers: each returns the parsed value or raises _Invalid -------------------------


def _number(value: Any) -> float:
    # YAML 1.1 reads 1e12 (no dot) as a string, so numeric strings are accepted too.
    if isinstance(value, bool):
        raise _Invalid("is a boolean, not a number", "a number")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _Invalid(f"is a {type(value).__name__}, not a number", "a number")


def _positive(value: Any) -> float:
    number = _number(value)
    if not number > 0 or number == float("inf"):
        raise _Invalid("must be positive and finite", "a number > 0")
    return number


def _non_negative(value: Any) -> float:
    number = _number(value)
    if not 0 <= number < float("inf"):
        raise _Invalid("must be >= 0 and finite", "a number >= 0")
    return number


def _factor(value: Any) -> float:
    number = _number(value)
    if not 1 <= number < float("inf"):
        raise _Invalid("must be a finite factor >= 1", "a number >= 1")
    return number


def _open_fraction(value: Any) -> float:
    number = _number(value)
    if not 0 < number < 1:
        raise _Invalid("is outside (0, 1)", "a number strictly between 0 and 1")
    return number


def _fraction(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise _Invalid("is outside [0, 1]", "a number in [0, 1]")
    return number


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = _number(value)
        except _Invalid as exc:
            raise _Invalid(exc.problem, f"an integer >= {minimum}") from None
        if number != int(number) or number < minimum:
            raise _Invalid(f"must be a whole number >= {minimum}", f"an integer >= {minimum}")
        return int(number)

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"is a {type(value).__name__}, not a boolean", "true or false")
    return value


def _compile(value: Any) -> bool | str:
    if not compile_setting_ok(value):
        raise _Invalid("is not a known setting", COMPILE_ALLOWED)
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"is a {type(value).__name__}, not a non-empty string", "a non-empty string")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _Invalid("is not a known choice", ", ".join(choices))
        return value

    return parse


def _pattern(pattern: re.Pattern[str], allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise _Invalid("has the wrong form", allowed)
        return value

    return parse


def _tokenizer(value: Any) -> str:
    try:
        nominal_vocab_size(value)
    except (TypeError, ValueError):
        raise _Invalid("is not a known tokenizer", TOKENIZER_NAMES_HELP) from None
    return value


def _size(value: Any) -> str:
    """A size label or parameter target that sizes.resolve_size accepts; kept as written."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Invalid(f"is a {type(value).__name__}",
                       "a named size, a parameter count or 'd<width>-l<layers>'")
    try:
        sizes.resolve_size(value)
    except ValueError as exc:
        problem, _, allowed = str(exc).partition("; allowed: ")
        raise _Invalid(problem, allowed) from None
    return str(value)


def _rule(parse_constant: Callable[[Any], float]) -> Callable[[Any], Rule]:
    """A constant (checked by parse_constant), a formula string, or a table of {max_params, value}."""
    allowed = "a number, a formula string over params/tokens/d_model/..., or a list of {max_params, value}"

    def parse(value: Any) -> Rule:
        if isinstance(value, str):
            try:
                return parse_constant(float(value))
            except ValueError:
                pass
            try:
                return Formula(value)
            except RuleError as exc:
                raise _Invalid(str(exc), allowed) from None
        if isinstance(value, list):
            return _table(value, parse_constant)
        return parse_constant(value)

    return parse


def _table(rows: list[Any], parse_constant: Callable[[Any], float]) -> Table:
    parsed = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "value" not in row or set(row) - {"value", "max_params"}:
            raise _Invalid(f"row {index} is {row!r}", "rows like {max_params: 1e6, value: 0.003}")
        try:
            value = parse_constant(row["value"])
            max_params = _positive(row["max_params"]) if "max_params" in row else None
        except _Invalid as exc:
            raise _Invalid(f"row {index}: {exc.problem}", exc.allowed) from None
        parsed.append(TableRow(value=value, max_params=max_params))
    try:
        return Table(tuple(parsed))
    except RuleError as exc:
        raise _Invalid(str(exc), "rows sorted by max_params; only the last may omit it") from None


# -- the flat `train` section ----------------------------------------------------------------

# key -> (dataclass it configures, parser). Rules are allowed where the parser is a _rule.
TRAIN_KEYS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "batch_size": (TrainConfig, _rule(_int_at_least(1))),
    "seq_len": (TrainConfig, _int_at_least(2)),
    "eval_every_tokens": (TrainConfig, _rule(_int_at_least(0))),
    "eval_tokens": (TrainConfig, _rule(_int_at_least(1))),
    "checkpoint_every_tokens": (TrainConfig, _rule(_int_at_least(0))),
    "compile": (TrainConfig, _compile),
    "device": (TrainConfig, _choice(DEVICES)),
    "lr": (OptimConfig, _rule(_positive)),
    "weight_decay": (OptimConfig, _rule(_fraction)),
    "beta1": (OptimConfig, _rule(_fraction)),
    "beta2": (OptimConfig, _rule(_fraction)),
    "eps": (OptimConfig, _rule(_positive)),
    "grad_clip": (OptimConfig, _rule(_non_negative)),  # 0: no clipping
    "schedule": (ScheduleConfig, _choice(SCHEDULE_KINDS)),
    "warmup_fraction": (ScheduleConfig, _rule(_fraction)),
    "decay_fraction": (ScheduleConfig, _rule(_fraction)),
    "min_lr_ratio": (ScheduleConfig, _rule(_fraction)),
}
# The sweep key `schedule` is ScheduleConfig.kind; every other key is the dataclass field of that name.
TRAIN_FIELD_NAMES: dict[str, str] = {key: key for key in TRAIN_KEYS} | {"schedule": "kind"}


def _train_defaults() -> dict[str, Any]:
    defaults = {}
    for key, (config_class, _) in TRAIN_KEYS.items():
        field = {f.name: f for f in dataclasses.fields(config_class)}[TRAIN_FIELD_NAMES[key]]
        defaults[key] = field.default
    return defaults


# -- reading sections -----------------------------------------------------------------------


class _Section:
    """A mapping at a key path; takes keys one by one and rejects whatever is left over."""

    def __init__(self, mapping: Any, path: str, file: Path) -> None:
        if not isinstance(mapping, dict):
            raise SweepError(file, path, mapping, f"is a {type(mapping).__name__}, not a mapping",
                             "a mapping of keys")
        self.mapping, self.path, self.file = dict(mapping), path, file
        self.known: list[str] = []

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, parse: Callable[[Any], Any], default: Any = ...) -> Any:
        self.known.append(key)
        if key not in self.mapping:
            if default is ...:
                # A misspelt key ("grids:") is then the likely cause, so name it.
                near = difflib.get_close_matches(key, [str(k) for k in self.mapping], n=1)
                problem = f"is missing (the file has {near[0]!r}: a misspelling?)" if near else "is missing"
                raise SweepError(self.file, self.key_path(key), NO_VALUE, problem, "a value")
            return default
        return self.parse(self.key_path(key), self.mapping.pop(key), parse)

    def parse(self, path: str, value: Any, parse: Callable[[Any], Any]) -> Any:
        try:
            return parse(value)
        except _Invalid as exc:
            raise SweepError(self.file, path, value, exc.problem, exc.allowed) from None

    def section(self, key: str, default: Any = ...) -> "_Section":
        value = self.take(key, lambda v: v, default)
        return _Section(value, self.key_path(key), self.file)

    def list_of(self, key: str, parse: Callable[[Any], Any], default: Any = ...) -> tuple[Any, ...]:
        values = self.take(key, lambda v: v, default)
        if values is default:
            return values
        if not isinstance(values, list) or not values:
            raise SweepError(self.file, self.key_path(key), values, "is not a non-empty list", "a list")
        return tuple(self.parse(f"{self.key_path(key)}[{i}]", v, parse) for i, v in enumerate(values))

    def done(self) -> None:
        if self.mapping:
            key = next(iter(self.mapping))
            near = difflib.get_close_matches(str(key), self.known, n=1)
            problem = f"is not a known key (did you mean {near[0]!r}?)" if near else "is not a known key"
            raise SweepError(self.file, self.key_path(str(key)), self.mapping[key], problem, ", ".join(self.known))


def load_sweep(path: Path | str) -> Sweep:
    """Read and validate a sweep file. Raises SweepError on the first problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(path, "", NO_VALUE, "the sweep file does not exist", "a path to a YAML file") from None
    except UnicodeDecodeError as exc:
        raise SweepError(path, "", NO_VALUE, f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         "a UTF-8 YAML file") from None
    except OSError as exc:
        raise SweepError(path, "", NO_VALUE, f"cannot be read: {exc.strerror}", "a readable YAML file") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SweepError(path, "", NO_VALUE, f"is not valid YAML: {exc}", "a YAML mapping") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        # PyYAML's constructors raise these for values it parses but cannot build (2001-13-45,
        # '!!float abc', very deep nesting): still the file's fault, not a crash of ours.
        raise SweepError(path, "", NO_VALUE, f"is not valid YAML: a value cannot be read "
                         f"({type(exc).__name__}: {exc})", "a YAML mapping") from None
    return parse_sweep(document, path)


def parse_sweep(document: Any, path: Path | str) -> Sweep:
    """Validate an already-loaded sweep document; `path` names it in errors."""
    path = Path(path)
    top = _Section(document, "", path)
    name = top.take("name", _pattern(NAME_PATTERN, "letters, digits, '.', '_' and '-' (a directory name)"))
    description = top.take("description", _string, "")
    data = _parse_data(top.section("data"))
    architectures = _parse_architectures(top.section("architectures"))
    grid = _parse_grid(top.section("grid"))
    train = _parse_train(top.section("train", {}))
    _check_task_and_grid(data, grid, train["seq_len"], path)
    if getattr(grid, "cooldowns", False) and train["schedule"] != "wsd":
        raise SweepError(path, "grid.cooldowns", True,
                         f"needs a stable phase to branch from, but train.schedule is "
                         f"{train['schedule']!r}", "train.schedule: wsd, or cooldowns: false")
    seeds = top.list_of("seeds", _int_at_least(0), (0,))
    if len(set(seeds)) != len(seeds):
        raise SweepError(path, "seeds", list(seeds), "has repeated seeds", "distinct integers")
    executor = _parse_executor(top.section("executor", {}))
    top.done()
    return Sweep(name, path, description, data, architectures, grid, train, seeds, executor)


def _parse_data(section: _Section) -> DataConfig:
    defaults = DataConfig()
    corpus = section.take("corpus", _string, defaults.corpus)
    tokenizer = section.take("tokenizer", _tokenizer, defaults.tokenizer)
    val_fraction = section.take("val_fraction", _open_fraction, defaults.val_fraction)
    bin_dtype = section.take("bin_dtype", _choice(("uint16", "uint32")), defaults.bin_dtype)
    task = section.take("task", lambda v: v, None)
    if task is not None:
        task = _parse_task(_Section(task, section.key_path("task"), section.file))
    section.done()
    return DataConfig(corpus=corpus, tokenizer=tokenizer, val_fraction=val_fraction, bin_dtype=bin_dtype,
                      task=task)


def _parse_task(section: _Section) -> TaskConfig:
    defaults = TaskConfig()
    fields = {"kind": section.take("kind", _choice(TASK_KINDS), defaults.kind)}
    for key in ("vocab_size", "n_pairs", "key_len", "value_len", "n_test"):
        fields[key] = section.take(key, _int_at_least(1), getattr(defaults, key))
    fields["query_placement"] = section.take("query_placement", _choice(QUERY_PLACEMENTS),
                                             defaults.query_placement)
    section.done()
    return TaskConfig(**fields)


def _check_task_and_grid(data: DataConfig, grid: Grid, seq_len: int, file: Path) -> None:
    """A task goes with a recall grid; the task at every difficulty must be one check_task accepts."""
    if (data.task is not None) != isinstance(grid, RecallGrid):
        if data.task is None:
            raise SweepError(file, "data.task", NO_VALUE, "is missing, but grid.kind is 'recall'",
                             "a task mapping, e.g. {kind: mqar, vocab_size: 64, n_pairs: 8}")
        raise SweepError(file, "grid.kind", grid.kind, "does not train on data.task",
                         "recall (with data.task), or no data.task")
    if data.task is None:
        return
    try:
        check_task(data.task, seq_len)
    except ValueError as exc:
        raise SweepError(file, "data.task", dataclasses.asdict(data.task), str(exc)) from None
    assert isinstance(grid, RecallGrid)
    for index, difficulty in enumerate(grid.difficulties):
        try:
            check_task(dataclasses.replace(data.task, **difficulty), seq_len)
        except ValueError as exc:
            raise SweepError(file, f"grid.difficulties[{index}]", difficulty, str(exc)) from None


def _parse_architectures(section: _Section) -> tuple[ArchitectureEntry, ...]:
    known = registry.architecture_names()
    entries = []
    for label in list(section.mapping):
        # Labels become table values, CSV cells and parts of file names: keep them plain.
        if not isinstance(label, str) or not NAME_PATTERN.match(label):
            raise SweepError(section.file, section.key_path(str(label)), label, "is not a plain name",
                             "letters, digits, '.', '_' and '-'")
        if section.mapping[label] is None:  # `transformer:` with nothing under it
            section.mapping[label] = {}
        entry = section.section(label)
        arch = entry.take("arch", _choice(tuple(known)), label if label in known else ...)
        baseline = entry.take("baseline", _bool, False)
        overrides = entry.take("overrides", _overrides, {})
        entry.done()
        entries.append(ArchitectureEntry(label, arch, baseline, overrides))
    if not entries:
        raise SweepError(section.file, section.path, {}, "names no architecture", "at least one architecture")
    baselines = [e.name for e in entries if e.baseline]
    if len(baselines) != 1:
        raise SweepError(section.file, section.path, baselines or None,
                         f"has {len(baselines)} baselines", "exactly one entry with baseline: true")
    return tuple(entries)


def _overrides(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"is a {type(value).__name__}",
                       "a mapping of ModelConfig fields, e.g. {conv: {rank: 8}}")
    return value


def _parse_grid(section: _Section) -> Grid:
    kind = section.take("kind", _choice(GRID_KINDS))
    min_steps = section.take("min_steps", _int_at_least(1), DEFAULT_MIN_STEPS)
    if kind == "recall":
        grid: Grid = RecallGrid(
            sizes=section.list_of("sizes", _size),
            difficulties=section.list_of("difficulties", _difficulty),
            lrs=section.list_of("lrs", _positive),
            steps=section.take("steps", _int_at_least(min_steps)),
        )
        labels = [difficulty_label(d) for d in grid.difficulties]
        if len(set(labels)) != len(labels):
            raise SweepError(section.file, section.key_path("difficulties"), labels,
                             "has repeated difficulties", "distinct task settings")
        if len(set(grid.lrs)) != len(grid.lrs):
            raise SweepError(section.file, section.key_path("lrs"), list(grid.lrs), "has repeated values",
                             "distinct learning rates")
    elif kind == "ladder":
        grid = LadderGrid(
            sizes=section.list_of("sizes", _size),
            tokens_per_param=section.take("tokens_per_param", _positive),
            min_steps=min_steps,
        )
    else:
        budgets = section.list_of("budgets", _positive)
        explicit = section.list_of("sizes", _size, None)
        n_sizes = section.take("n_sizes", _int_at_least(1), None)
        spread = section.take("spread", _factor, None)
        optimum = section.take("optimum_tokens_per_param", _positive, None)
        if (explicit is None) == (n_sizes is None):
            chosen = {"sizes": list(explicit) if explicit else None, "n_sizes": n_sizes}
            raise SweepError(section.file, section.path, chosen, "needs exactly one way to choose sizes",
                             "either sizes: [...] or n_sizes: N (with an optional spread)")
        for key, value in (("spread", spread), ("optimum_tokens_per_param", optimum)):
            if explicit is not None and value is not None:
                raise SweepError(section.file, section.key_path(key), value, "only applies to n_sizes",
                                 f"{key} with n_sizes, not with sizes")
        if n_sizes is not None and spread is None:
            spread = DEFAULT_SPREAD
        cooldowns = section.take("cooldowns", _bool, False)
        grid = IsoflopGrid(budgets, explicit, n_sizes, spread, min_steps, cooldowns=cooldowns,
                           optimum_tokens_per_param=optimum or DEFAULT_OPTIMUM_TOKENS_PER_PARAM)
    section.done()
    return grid


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))


def _difficulty(value: Any) -> dict[str, Any]:
    """A mapping of TaskConfig fields (checked against the task by _check_task_and_grid)."""
    allowed = f"a mapping of task fields ({', '.join(_TASK_FIELDS)}), e.g. {{n_pairs: 8}}"
    if not isinstance(value, dict):
        raise _Invalid(f"is a {type(value).__name__}", allowed)
    unknown = [key for key in value if key not in _TASK_FIELDS]
    if unknown:
        raise _Invalid(f"names {unknown[0]!r}, not a task field", allowed)
    for key, item in value.items():
        if key in ("kind", "query_placement"):
            if not isinstance(item, str):
                raise _Invalid(f"{key} is a {type(item).__name__}", allowed)
        elif isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise _Invalid(f"{key} is {item!r}, not an integer >= 1", allowed)
    return dict(value)


def _parse_train(section: _Section) -> dict[str, Any]:
    train = _train_defaults()
    for key, (_, parse) in TRAIN_KEYS.items():
        train[key] = section.take(key, parse, train[key])
    section.done()
    return train


def _parse_executor(section: _Section) -> ExecutorConfig:
    """kind and workers, then the SLURM settings as flat keys (SLURM_KEYS) of the same section."""
    defaults = ExecutorConfig()
    kind = section.take("kind", _choice(EXECUTOR_KINDS), defaults.kind)
    workers = section.take("workers", _int_at_least(1), defaults.workers)
    slurm = {field: section.take(key, parse, getattr(defaults.slurm, field))
             for key, (field, parse) in SLURM_KEYS.items()}
    section.done()
    return ExecutorConfig(kind, workers, SlurmSettings(**slurm))


def _slurm_name(value: Any) -> str:
    # Partition, account and QOS names go into sbatch options; a comma lists several partitions.
    return _pattern(re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,-]*$"), "a SLURM name, e.g. gpu or gpu,cpu")(value)


_TIME_PATTERN = re.compile(r"^(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>\d+)(?::(?P<seconds>\d+))?$")


def _minutes(value: Any) -> int:
    """A time limit: whole minutes, or '[D-]HH:MM[:SS]' (rounded up to minutes; submitit wants minutes)."""
    allowed = "minutes (an integer >= 1) or a time like \"2:00:00\" or \"1-12:00\""
    if isinstance(value, str) and ":" in value:
        match = _TIME_PATTERN.match(value.strip())
        if not match:
            raise _Invalid("is not a time", allowed)
        days, hours, minutes, seconds = (int(match[g] or 0) for g in ("days", "hours", "minutes", "seconds"))
        total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
        if total < 1:
            raise _Invalid("is shorter than a minute", allowed)
        return total
    try:
        return _int_at_least(1)(value)
    except _Invalid as exc:
        raise _Invalid(exc.problem, allowed) from None


_MEMORY_UNITS = {"M": 1 / 1024, "MB": 1 / 1024, "G": 1.0, "GB": 1.0, "T": 1024.0, "TB": 1024.0}


def _memory_gb(value: Any) -> float:
    """Memory per run: a number of GB, or a string with a unit (500M, 16G, 1T)."""
    allowed = "GB as a number, or a size like 500M, 16G or 1T"
    if isinstance(value, str):
        match = re.match(r"^\s*([0-9.]+)\s*([A-Za-z]*)\s*$", value)
        unit = match[2].upper() if match else ""
        if not match or unit not in _MEMORY_UNITS:
            raise _Invalid("is not a memory size", allowed)
        value, scale = match[1], _MEMORY_UNITS[unit]
    else:
        scale = 1.0
    try:
        return _positive(value) * scale
    except _Invalid as exc:
        raise _Invalid(exc.problem, allowed) from None


def _shell_lines(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(line, str) and "\n" not in line for line in value):
        raise _Invalid(f"is a {type(value).__name__}", "a list of one-line shell commands")
    return tuple(value)


# sweep key (also the `isoflop submit` option, with '-' for '_') -> (SlurmSettings field, parser)
SLURM_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "partition": ("partition", _slurm_name),
    "account": ("account", _slurm_name),
    "qos": ("qos", _slurm_name),
    "gpus_per_run": ("gpus_per_run", _int_at_least(0)),
    "nodes_per_run": ("nodes_per_run", _int_at_least(1)),
    "parallel": ("parallel", _choice(PARALLEL_MODES)),
    "cpus_per_run": ("cpus_per_run", _int_at_least(1)),
    "mem": ("mem_gb", _memory_gb),
    "time": ("time_min", _minutes),
    "array_parallelism": ("array_parallelism", _int_at_least(1)),
    "max_array_size": ("max_array_size", _int_at_least(1)),
    "max_requeues": ("max_requeues", _int_at_least(0)),
    "setup": ("setup", _shell_lines),
}


def slurm_settings_with(settings: SlurmSettings, overrides: dict[str, Any], origin: str) -> SlurmSettings:
    """`settings` with some keys of SLURM_KEYS replaced (command-line options); errors name `origin`."""
    changes = {}
    for key, value in overrides.items():
        if key not in SLURM_KEYS:
            raise SweepError(origin, key, value, "is not a SLURM setting", ", ".join(SLURM_KEYS))
        field, parse = SLURM_KEYS[key]
        try:
            changes[field] = parse(value)
        except _Invalid as exc:
            raise SweepError(origin, key, value, exc.problem, exc.allowed) from None
    return dataclasses.replace(settings, **changes)
