"""The YAML file of `isoflop train`: one run, written by hand, turned into a RunSpec.

    arch: dynamic-qkv            # a registry name (isoflop.models.registry)
    size: d64-l2                 # a size name or parameter count (isoflop.models.sizes)
    model: {conv: {rank: 8}, qk_norm: true}   # optional ModelConfig overrides
    data: {corpus: python-stdlib, tokenizer: bytes, val_fraction: 0.02}
    train: {total_tokens: 300000, batch_size: 16, seq_len: 64}
    optim: {lr: 3.0e-3}
    schedule: {kind: cosine, warmup_fraction: 0.1}
    seed: 0

Only arch, size and train.total_tokens are required; everything else has the RunSpec defaults.
model.vocab_size comes from the tokenizer (or, for a corpus of token shards, from the corpus) and
model.max_seq_len is train.seq_len. Numbers may be written as YAML strings ("3e-4": YAML 1.1 reads
an exponent without a dot as text) as long as they parse.

Torch-free. Every error is a ConfigError naming the file, the key path, the bad value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from isoflop.data.tokenizers import nominal_vocab_size
from isoflop.models.config import ConvSpec, ModelConfig
from isoflop.models.registry import architecture_names, make_model_config
from isoflop.models.sizes import resolve_size
from isoflop.runspec import (
    COMPILE_ALLOWED,
    DataConfig,
    OptimConfig,
    RunSpec,
    ScheduleConfig,
    TrainConfig,
    compile_setting_ok,
)
from isoflop.train.schedules import validate_schedule

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "arch", "size", "model", "data", "train", "optim", "schedule", "seed"
)
REQUIRED_KEYS: tuple[str, ...] = ("arch", "size", "train")
SIZE_FIELDS: tuple[str, ...] = (
    "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"
)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
BIN_DTYPES: tuple[str, ...] = ("uint16", "uint32")

# Range checks beyond the type: key path -> (test, what is allowed).
VALUE_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "train.total_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.seq_len": (lambda v: v >= 1, "an integer >= 1"),
    "train.eval_every_tokens": (lambda v: v >= 0, "an integer >= 0 (0: about 10 evals per run)"),
    "train.eval_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "train.checkpoint_every_tokens": (lambda v: v >= 0, "an integer >= 0 (0: at every eval)"),
    "train.compile": (compile_setting_ok, COMPILE_ALLOWED),
    "train.device": (lambda v: v in DEVICES, ", ".join(DEVICES)),
    "optim.lr": (lambda v: v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "a number > 0"),
    "optim.grad_clip": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "data.val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "data.bin_dtype": (lambda v: v in BIN_DTYPES, ", ".join(BIN_DTYPES)),
    "seed": (lambda v: v >= 0, "an integer >= 0"),
}

TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """A config file is wrong; the message names the file, the key path, the value and the fix."""


class _Reader:
    """Checks values of one file, so every error can name it."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, key: str, value: Any, allowed: str, problem: str = "") -> ConfigError:
        problem = f" ({problem})" if problem else ""
        return ConfigError(f"{self.file}: {key}={value!r}{problem}; allowed: {allowed}")

    def typed(self, key: str, value: Any, kind: type) -> Any:
        """value as `kind`, accepting what YAML makes of a number written as text; for a union
        (`bool | str`), as the first of its types that takes it."""
        if isinstance(kind, types.UnionType):
            for member in typing.get_args(kind):
                try:
                    return self.typed(key, value, member)
                except ConfigError:
                    pass
            raise self.error(key, value, " or ".join(TYPE_NAMES[m] for m in typing.get_args(kind)), "wrong type")
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is str:
            if isinstance(value, str):
                return value
        elif not isinstance(value, bool):
            number = value
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    number = None
            if kind is float and isinstance(number, (int, float)):
                return float(number)
            if kind is int and isinstance(number, int):
                return number
            if kind is int and isinstance(number, float) and number.is_integer():
                return int(number)
        raise self.error(key, value, TYPE_NAMES[kind], "wrong type")

    def checked(self, key: str, value: Any) -> Any:
        if key in VALUE_RULES:
            test, allowed = VALUE_RULES[key]
            if not test(value):
                raise self.error(key, value, allowed)
        return value

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, value, "a mapping of keys to values", "wrong type")
        return value

    def unknown_keys(
        self, prefix: str, given: dict[str, Any], allowed: typing.Iterable[str]
    ) -> None:
        allowed = list(allowed)
        for name in given:
            if name not in allowed:
                near = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(
                    f"{self.file}: unknown key {prefix}{name}{hint}; allowed: {', '.join(allowed)}"
                )

    def dataclass_fields(self, section: str, raw: dict[str, Any], cls: type) -> dict[str, Any]:
        """The keyword arguments of `cls` given in `raw`, each type- and range-checked."""
        hints = typing.get_type_hints(cls)
        self.unknown_keys(f"{section}.", raw, [f.name for f in dataclasses.fields(cls)])
        kwargs = {}
        for name, value in raw.items():
            key = f"{section}.{name}"
            kwargs[name] = self.checked(key, self.typed(key, value, hints[name]))
        return kwargs


def _vocab_size(data: DataConfig) -> int:
    """Known from the tokenizer name, except for token shards, whose ids come pre-made. A corpus
    that is not there fails here, not after the model is built (a synthetic task needs none)."""
    from isoflop.data.corpora import check_corpus_exists, is_pretokenized, load_corpus

    if data.task is None:
        check_corpus_exists(data.corpus)
    if is_pretokenized(data.corpus):
        return load_corpus(data).vocab_size
    return nominal_vocab_size(data.tokenizer)


def _model_overrides(reader: _Reader, raw: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in SIZE_FIELDS]
    for name in raw:
        if name in SIZE_FIELDS:
            raise reader.error(f"model.{name}", raw[name], f"one of {', '.join(names)}",
                               "set by `size`, train.seq_len or the tokenizer, not here")
    reader.unknown_keys("model.", raw, names)
    overrides = {}
    for name, value in raw.items():
        if name == "conv":
            overrides["conv"] = reader.dataclass_fields(
                "model.conv", reader.mapping("model.conv", value), ConvSpec
            )
        else:
            overrides[name] = reader.typed(f"model.{name}", value, hints[name])
    return overrides


def parse_train_config(raw: Any, file: Path | str) -> RunSpec:
    """A RunSpec from the parsed YAML of `file` (the file name is only used in errors)."""
    reader = _Reader(Path(file))
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{file}: the file must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)})"
        )
    reader.unknown_keys("", raw, TOP_LEVEL_KEYS)
    for name in REQUIRED_KEYS:
        if name not in raw:
            raise ConfigError(f"{file}: missing key {name}; it is required")

    arch = reader.typed("arch", raw["arch"], str)
    if arch not in architecture_names():
        raise reader.error("arch", arch, ", ".join(architecture_names()))
    size_label = raw["size"]
    if isinstance(size_label, bool) or not isinstance(size_label, (str, int)):
        raise reader.error("size", size_label, "a size name or parameter count", "wrong type")
    try:
        shape = resolve_size(size_label)
    except ValueError as e:
        raise ConfigError(f"{file}: size={size_label!r}: {e}") from None

    train_raw = reader.mapping("train", raw["train"])
    if "total_tokens" not in train_raw:
        raise ConfigError(f"{file}: missing key train.total_tokens; it is required")
    train = TrainConfig(**reader.dataclass_fields("train", train_raw, TrainConfig))
    if train.total_tokens < train.tokens_per_step:
        raise reader.error(
            "train.total_tokens", train.total_tokens,
            f">= one step of train.batch_size x train.seq_len = {train.tokens_per_step} tokens",
        )
    sections = {}
    for name, cls in (("data", DataConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig)):
        given = reader.mapping(name, raw.get(name) or {})  # `optim:` with nothing under it: {}
        sections[name] = cls(**reader.dataclass_fields(name, given, cls))
    try:
        validate_schedule(sections["schedule"])
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    try:
        vocab_size = _vocab_size(sections["data"])
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    seed = reader.checked("seed", reader.typed("seed", raw.get("seed", 0), int))

    overrides = _model_overrides(reader, reader.mapping("model", raw.get("model") or {}))
    try:
        model = make_model_config(
            arch, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
            vocab_size=vocab_size, max_seq_len=train.seq_len, **overrides,
        )
    except ValueError as e:
        raise ConfigError(f"{file}: model: {e}") from None
    return RunSpec(
        arch=arch, model=model, data=sections["data"], train=train, optim=sections["optim"],
        schedule=sections["schedule"], seed=seed, size=str(size_label),
    )


def load_train_config(path: Path | str) -> RunSpec:
    """Read a train YAML file into a RunSpec; raises ConfigError on anything wrong in it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_train_config(raw, path)
