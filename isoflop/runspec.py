"""RunSpec: everything one training run needs, as a frozen, serialisable value.

Pure Python (no torch): the orchestrator builds, hashes and stores these without importing torch.
The run id is a short hash of the canonical JSON (sorted keys, normalised floats, no paths that
depend on the machine), so the same run has the same id everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from isoflop.models.config import ModelConfig

TASK_KINDS: tuple[str, ...] = ("mqar", "mqar-varkey", "fuzzy")
QUERY_PLACEMENTS: tuple[str, ...] = ("uniform", "end")


@dataclass(frozen=True)
class TaskConfig:
    """A synthetic associative-recall task (isoflop/data/synthetic.py), trained on instead of a corpus.

    kind: 'mqar' (one-token keys and values), 'mqar-varkey' (keys of 1..key_len tokens, one-token
    values) or 'fuzzy' (keys of key_len tokens, values of value_len tokens).
    vocab_size: every token id, the filler 0 included (it is also the model's vocabulary).
    n_pairs: key-value pairs per sequence; every pair is queried once.
    query_placement: 'uniform' (random filler gaps before the queries) or 'end' (right after the pairs).
    n_test: sequences in the fixed test set.
    """

    kind: str = "mqar"
    vocab_size: int = 64
    n_pairs: int = 8
    key_len: int = 1
    value_len: int = 1
    query_placement: str = "uniform"
    n_test: int = 512


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from.

    corpus: 'python-stdlib' | 'python-site' | a text file or folder | a folder or glob of .bin shards.
    tokenizer: 'bytes' (vocab 256) or 'bpe-<vocab>' (trained on the corpus with `tokenizers`).
    val_fraction: share of documents (by a stable hash of their path) held out for validation.
    bin_dtype: element type of .bin shards (uint16 or uint32).
    task: a synthetic recall task instead of the corpus (None: language modelling on the corpus).
    """

    corpus: str = "python-stdlib"
    tokenizer: str = "bytes"
    val_fraction: float = 0.02
    bin_dtype: str = "uint16"
    task: TaskConfig | None = None

    def __post_init__(self) -> None:
        # From JSON the task arrives as a mapping.
        if isinstance(self.task, dict):
            object.__setattr__(self, "task", TaskConfig(**self.task))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; weight decay applies to matrices only (not norms, biases or static filters)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    """LR schedule: linear warm-up, then cosine to min_lr_ratio*lr, or WSD (warm-up, stable,
    linear decay over the last decay_fraction of training)."""

    kind: str = "cosine"
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.0


COMPILE_ALLOWED = "true, false or graphs (torch.compile with CUDA graphs)"


def compile_setting_ok(value: Any) -> bool:
    """train.compile: a boolean, or "graphs" (not 0 or 1, which compare equal to the booleans)."""
    return isinstance(value, bool) or value == "graphs"


@dataclass(frozen=True)
class TrainConfig:
    """Token budget and batch shape. Every count is in tokens so runs of any size compare."""

    total_tokens: int
    batch_size: int = 8
    seq_len: int = 256
    eval_every_tokens: int = 0  # 0: eval ~10 times over the run, and at the end
    eval_tokens: int = 65536
    checkpoint_every_tokens: int = 0  # 0: checkpoint at every eval
    # False: eager; True: torch.compile; "graphs": torch.compile with CUDA graphs (its
    # "reduce-overhead" mode) on a CUDA device, plain torch.compile elsewhere. Graphs replay a
    # step's kernels without launching each from Python, the cost that bounds small models' steps
    # on a GPU; each run compiles first, so packed runs gain little or lose (measured figures:
    # README, "Sweep files").
    compile: bool | str = False
    device: str = "auto"  # auto | cpu | cuda
    # WSD runs only: token counts (each < total_tokens) at which a cooldown branches off the stable
    # phase and is trained to that count, giving one extra endpoint per entry (see train/trainer.py).
    cooldown_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # From JSON the counts arrive as a list; a tuple keeps the config hashable.
        object.__setattr__(self, "cooldown_tokens", tuple(int(t) for t in self.cooldown_tokens))
        if not compile_setting_ok(self.compile):
            raise ValueError(f"train.compile={self.compile!r}; allowed: {COMPILE_ALLOWED}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.tokens_per_step)


@dataclass(frozen=True)
class RunSpec:
    arch: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    size: str = ""  # a label for tables (e.g. '300M' or 'd256-l4'); not part of the identity

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the model through ModelConfig.to_dict, which leaves out later-added fields
        at their defaults, so existing run ids do not change when a field is added."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        if d["data"]["task"] is None:
            d["data"].pop("task")  # added later: language-modelling runs keep their ids
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        return cls(
            arch=d["arch"],
            model=ModelConfig.from_dict(d["model"]),
            data=DataConfig(**d["data"]),
            train=TrainConfig(**d["train"]),
            optim=OptimConfig(**d.get("optim", {})),
            schedule=ScheduleConfig(**d.get("schedule", {})),
            seed=d.get("seed", 0),
            size=d.get("size", ""),
        )

    def identity(self) -> dict[str, Any]:
        """What determines the training outcome (labels and device choice excluded)."""
        d = self.to_dict()
        d.pop("size")
        d["train"].pop("device")
        if not d["train"]["cooldown_tokens"]:
            d["train"].pop("cooldown_tokens")  # added later: runs without branches keep their ids
        return d

    @property
    def run_id(self) -> str:
        return run_id_of(self.identity())


def _normalise(value: Any) -> Any:
    # Floats go through repr of a rounded value so 3e-4 and 0.0003 (or 1e9 and 1000000000.0) agree.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else float(f"{value:.12g}")
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    raise TypeError(f"cannot canonicalise {type(value).__name__}: {value!r}")


def canonical_json(value: Any) -> str:
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"))


def run_id_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:12]
