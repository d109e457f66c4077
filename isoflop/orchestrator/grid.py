"""Expansion: a Sweep -> one PlannedRun (a RunSpec plus its table labels) per grid cell and seed.

Compute matching. An isoflop cell (budget C, size, architecture) trains on
    tokens = C / flops_per_token(cfg).train
rounded to whole optimiser steps, so each architecture is charged its own FLOPs (a dynamic conv's
generator and filter application cost tokens). The FLOPs actually spent (`flops`) are recorded;
rounding moves them off C by at most half a step.

Sizes around the optimum (isoflop grids with n_sizes). A simple Chinchilla-style rule centres them:
with C = 6 N D and D = 20 N tokens per parameter (Hoffmann et al. 2022), the compute-optimal size is
    N_opt = sqrt(C / 120)    (N: non-embedding parameters)
and the n sizes are spread log-uniformly from N_opt / spread to N_opt * spread, each rounded to a
shape by `sizes.shape_for_params` (duplicates dropped). The rule only centres the curve; the fits
find the real optimum. Where it lies elsewhere (the report's grid check names budgets whose best run
is an edge size), `optimum_tokens_per_param: k` centres on sqrt(C / (6 k)) instead of 20's.

Ladder grids train every size on tokens_per_param x the baseline's total parameters at that size
(the paper: about 50 tokens per parameter), the same tokens for every architecture.

Cooldown branches (isoflop grids with `cooldowns: true`, WSD schedule). The cells of one architecture,
size and seed differ only in their tokens, and a WSD run's stable phase is shared by all of them. So
they become one run, trained to the largest budget's tokens, with a cooldown branch ending at each
smaller budget's tokens (TrainConfig.cooldown_tokens; the trainer checkpoints before each). Each
branch endpoint is a run of its own for the tables (PlannedRun.branches pairs its tokens with its
budget), and the compute spent is the largest run plus the decay part of the others: see
docs/analysis.md. Rules that depend on tokens would give the cells different hyper-parameters, and
are refused for such grids.

Recall grids (a synthetic task in data.task) train every architecture at every size, difficulty and
learning rate for the grid's steps; the model's vocabulary is the task's. Their hyper-parameter rules
see no token count (tokens is NaN), and `lrs` replaces train.lr. Run order: difficulty, size,
architecture, learning rate, seed. Budget is NaN, as for ladders.

Hyper-parameter rules are evaluated with the baseline's numbers at the cell's shape (and budget), so
all architectures of a cell share learning rate, batch size and schedule; only tokens differ.
Run order: budget, then size, then architecture, then seed (small runs first; each finished budget
is a usable isoflop slice).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from isoflop.data.tokenizers import nominal_vocab_size
from isoflop.models import registry
from isoflop.models.config import ModelConfig
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.sizes import Shape, resolve_size, shape_for_params
from isoflop.orchestrator.rules import RuleError, evaluate_rule
from isoflop.orchestrator.spec import (
    DEFAULT_OPTIMUM_TOKENS_PER_PARAM,
    TRAIN_FIELD_NAMES,
    TRAIN_KEYS,
    ArchitectureEntry,
    IsoflopGrid,
    LadderGrid,
    RecallGrid,
    Sweep,
    SweepError,
    difficulty_label,
)
from isoflop.runspec import (
    DataConfig,
    OptimConfig,
    RunSpec,
    ScheduleConfig,
    TrainConfig,
)



@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its RunSpec and the labels and counts the tables need."""

    spec: RunSpec
    arch: str  # the sweep's architecture label (also spec.arch)
    registry_arch: str
    is_baseline: bool
    size: str
    budget: float  # nominal FLOPs of the grid cell; NaN for ladder grids
    params: int
    params_non_embedding: int
    flops_per_token: int  # training FLOPs per token (forward + backward)
    branches: tuple[tuple[int, float], ...] = ()  # (tokens, budget) of each cooldown branch
    difficulty: str = ""  # recall grids: difficulty_label of the task setting
    difficulty_rank: int = 0  # recall grids: its place in grid.difficulties (the plots' order)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def spent_flops(self) -> float:
        """What training costs: the trunk plus the decay steps of each cooldown branch."""
        decay = self.spec.schedule.decay_fraction
        return self.flops + sum(decay * self.flops_per_token * tokens for tokens, _ in self.branches)

    @property
    def tokens(self) -> int:
        return self.spec.train.total_tokens

    @property
    def steps(self) -> int:
        return self.spec.train.total_steps

    @property
    def flops(self) -> float:
        return float(self.flops_per_token) * self.tokens

    def labels(self) -> dict[str, Any]:
        """The flat description used by the manifest, `plan --json` and the tidy table."""
        model = self.spec.model
        return {
            "run_id": self.run_id,
            "arch": self.arch,
            "registry_arch": self.registry_arch,
            "is_baseline": self.is_baseline,
            "size": self.size,
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "n_heads": model.n_heads,
            "d_ff": model.d_ff,
            "params": self.params,
            "params_non_embedding": self.params_non_embedding,
            "seq_len": self.spec.train.seq_len,
            "batch_size": self.spec.train.batch_size,
            "tokens": self.tokens,
            "steps": self.steps,
            "budget": self.budget,
            "flops": self.flops,
            "flops_6n": 6.0 * self.params_non_embedding * self.tokens,
            "flops_6n_total": 6.0 * self.params * self.tokens,
            "lr": self.spec.optim.lr,
            "seed": self.spec.seed,
        } | ({"branches": [{"tokens": t, "budget": b} for t, b in self.branches]}
             if self.branches else {}) | self.task_labels()

    def task_labels(self) -> dict[str, Any]:
        """Recall runs only: the task kind and difficulty (language-modelling labels stay as they were)."""
        task = self.spec.data.task
        if task is None:
            return {}
        return {"task": task.kind, "difficulty": self.difficulty, "difficulty_rank": self.difficulty_rank}


def without_nan(row: dict[str, Any]) -> dict[str, Any]:
    """NaN values (a ladder grid's budget, a loss not yet measured) as None, for JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def chinchilla_sizes(budget: float, n_sizes: int, spread: float,
                     tokens_per_param: float = DEFAULT_OPTIMUM_TOKENS_PER_PARAM) -> list[Shape]:
    """n shapes log-uniform in [N_opt/spread, N_opt*spread], N_opt = sqrt(C / (6 tokens_per_param)),
    sqrt(C/120) by default (module docstring)."""
    n_opt = math.sqrt(budget / (6 * tokens_per_param))
    exponents = [0.0] if n_sizes == 1 else [-1 + 2 * i / (n_sizes - 1) for i in range(n_sizes)]
    return list(dict.fromkeys(shape_for_params(n_opt * spread**e) for e in exponents))


def expand(sweep: Sweep) -> list[PlannedRun]:
    """Every run of the sweep, in run order. Raises SweepError for cells that cannot be trained."""
    expansion = _Expansion(sweep)
    if isinstance(sweep.grid, IsoflopGrid):
        runs = expansion.isoflop(sweep.grid)
    elif isinstance(sweep.grid, RecallGrid):
        runs = expansion.recall(sweep.grid)
    else:
        runs = expansion.ladder(sweep.grid)
    _check_unique(runs, sweep)
    return runs


class _Expansion:
    """Builds the runs of one sweep; keeps the file name and vocabulary at hand for errors."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.file = str(sweep.path)
        self.vocab_size = nominal_vocab_size(sweep.data.tokenizer)  # validated by the spec
        self.seq_len: int = sweep.train["seq_len"]

    def isoflop(self, grid: IsoflopGrid) -> list[PlannedRun]:
        runs = []
        for index, budget in enumerate(grid.budgets):
            if grid.sizes is not None:
                cells = [(label, resolve_size(label)) for label in grid.sizes]
            else:
                assert grid.n_sizes is not None and grid.spread is not None  # spec guarantees both
                cells = [(s.name, s) for s in chinchilla_sizes(budget, grid.n_sizes, grid.spread,
                                                                 grid.optimum_tokens_per_param)]
            for label, shape in cells:
                baseline_cfg = self.model_config(self.sweep.baseline, shape)
                baseline_tokens = budget / flops_per_token(baseline_cfg, self.seq_len).train
                hparams = self.hyper_parameters(baseline_cfg, shape, baseline_tokens)
                for entry in self.sweep.architectures:
                    cfg = self.model_config(entry, shape)
                    per_token = flops_per_token(cfg, self.seq_len).train
                    steps = self.steps(budget / per_token, hparams, grid.min_steps, f"grid.budgets[{index}]",
                                       budget, f"{entry.name} at size {label}", per_token=per_token)
                    runs += self.runs(entry, label, cfg, budget, steps, hparams)
        return self.with_cooldown_branches(runs) if grid.cooldowns else runs

    def with_cooldown_branches(self, runs: list[PlannedRun]) -> list[PlannedRun]:
        """One run per (architecture, size, seed), branching at each smaller budget (module
        docstring); it takes the place of the group's first cell in run order."""
        groups: dict[tuple[str, str, int], list[PlannedRun]] = {}
        for run in runs:
            groups.setdefault((run.arch, run.size, run.spec.seed), []).append(run)
        merged = []
        for members in groups.values():
            trunk = max(members, key=lambda r: r.tokens)
            others = sorted((r for r in members if r is not trunk), key=lambda r: r.tokens)
            for other in others:
                self.check_shares_trunk(other, trunk)
            train = dataclasses.replace(trunk.spec.train,
                                        cooldown_tokens=tuple(r.tokens for r in others))
            merged.append(dataclasses.replace(
                trunk, spec=dataclasses.replace(trunk.spec, train=train),
                branches=tuple((r.tokens, r.budget) for r in others),
            ))
        return merged

    def check_shares_trunk(self, branch: PlannedRun, trunk: PlannedRun) -> None:
        """A branch must differ from its trunk in tokens only, and its cooldown must start after the
        trunk's warm-up (the trainer's rule, checked here before anything trains)."""
        a, b = branch.spec, trunk.spec
        differing = [
            f"{section}.{key}" for section in ("train", "optim", "schedule")
            for key, value in dataclasses.asdict(getattr(a, section)).items()
            if key != "total_tokens" and value != dataclasses.asdict(getattr(b, section))[key]
        ]
        if differing:
            raise SweepError(
                self.file, "grid.cooldowns", True,
                f"{branch.arch} at size {branch.size}: {', '.join(differing)} differ between budgets "
                f"{branch.budget:g} and {trunk.budget:g} (a rule over tokens?), but cooldown branches "
                "share one run", "hyper-parameters that do not depend on the budget",
            )
        schedule, steps = b.schedule, branch.steps
        if steps == trunk.steps:
            raise SweepError(self.file, "grid.budgets", [branch.budget, trunk.budget],
                             f"give {branch.arch} at size {branch.size} the same {steps} steps",
                             "budgets that differ after rounding to whole steps")
        if round(schedule.decay_fraction * steps) < 1:
            raise SweepError(self.file, "train.decay_fraction", schedule.decay_fraction,
                             f"leaves the cooldown branch of {branch.arch} at size {branch.size} "
                             f"({steps} steps) no decay step", "a larger decay fraction")
        if steps - round(schedule.decay_fraction * steps) < round(schedule.warmup_fraction * trunk.steps):
            raise SweepError(
                self.file, "grid.budgets", branch.budget,
                f"{branch.arch} at size {branch.size}: the cooldown branch of {steps} steps would "
                f"start its decay inside the warm-up of the {trunk.steps}-step run",
                "a larger smallest budget, or a smaller train.warmup_fraction",
            )

    def ladder(self, grid: LadderGrid) -> list[PlannedRun]:
        runs = []
        for index, label in enumerate(grid.sizes):
            shape = resolve_size(label)
            baseline_cfg = self.model_config(self.sweep.baseline, shape)
            tokens = grid.tokens_per_param * count_params(baseline_cfg).total
            hparams = self.hyper_parameters(baseline_cfg, shape, tokens)
            steps = self.steps(tokens, hparams, grid.min_steps, f"grid.sizes[{index}]", label,
                               f"size {label} at {grid.tokens_per_param:g} tokens per parameter")
            for entry in self.sweep.architectures:
                cfg = self.model_config(entry, shape)
                runs += self.runs(entry, label, cfg, math.nan, steps, hparams)
        return runs

    def recall(self, grid: RecallGrid) -> list[PlannedRun]:
        runs = []
        base_task = self.sweep.data.task
        assert base_task is not None  # the spec pairs recall grids with a task
        for rank, difficulty in enumerate(grid.difficulties):
            task = dataclasses.replace(base_task, **difficulty)
            data = dataclasses.replace(self.sweep.data, task=task)
            for label in grid.sizes:
                shape = resolve_size(label)
                baseline_cfg = self.model_config(self.sweep.baseline, shape, task.vocab_size)
                hparams = self.hyper_parameters(baseline_cfg, shape, math.nan)
                for entry in self.sweep.architectures:
                    cfg = self.model_config(entry, shape, task.vocab_size)
                    for lr in grid.lrs:
                        runs += [
                            dataclasses.replace(run, difficulty=difficulty_label(difficulty),
                                                difficulty_rank=rank)
                            for run in self.runs(entry, label, cfg, math.nan, grid.steps,
                                                 hparams | {"lr": float(lr)}, data)
                        ]
        return runs

    def model_config(self, entry: ArchitectureEntry, shape: Shape, vocab_size: int | None = None) -> ModelConfig:
        """vocab_size: the task's for recall grids (None: the tokenizer's)."""
        try:
            cfg = registry.make_model_config(
                entry.arch, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
                vocab_size=vocab_size or self.vocab_size, max_seq_len=self.seq_len, **entry.overrides,
            )
            count_params(cfg)  # checks what only the counts see (a head size that must divide d_ff)
        except (TypeError, ValueError) as exc:
            raise SweepError(self.file, f"architectures.{entry.name}.overrides", entry.overrides,
                             f"gives no valid model at size {shape.name}: {exc}") from None
        return cfg

    def hyper_parameters(self, cfg: ModelConfig, shape: Shape, tokens: float) -> dict[str, Any]:
        """Every `train` key's value for this cell: rules evaluated, integers rounded."""
        context = {
            "params": float(count_params(cfg).non_embedding),
            "params_total": float(count_params(cfg).total),
            "d_model": shape.d_model,
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "d_ff": shape.d_ff,
            "tokens": tokens,
        }
        values = {}
        for key, value in self.sweep.train.items():
            try:
                values[key] = evaluate_rule(value, context)
            except RuleError as exc:
                raise SweepError(self.file, f"train.{key}", str(value), str(exc)) from None
            field_type = _field_type(key)
            if field_type == "int":
                values[key] = int(round(values[key]))
            elif field_type == "float":
                values[key] = float(values[key])
            if field_type in ("int", "float") and not values[key] >= 0:
                raise SweepError(self.file, f"train.{key}", str(value),
                                 f"gives {values[key]} at size {shape.name}", "values >= 0")
        if values["batch_size"] < 1:
            raise SweepError(self.file, "train.batch_size", str(self.sweep.train["batch_size"]),
                             f"gives {values['batch_size']} at size {shape.name}", "a batch size >= 1")
        return values

    def steps(self, tokens: float, hparams: dict[str, Any], min_steps: int, path: str, value: Any,
              what: str, per_token: float = 1.0) -> int:
        """Whole optimiser steps for `tokens`; a SweepError naming the cell when below min_steps.
        per_token converts tokens back to the unit of `value` (FLOPs per token for budgets)."""
        tokens_per_step = hparams["batch_size"] * self.seq_len
        steps = round(tokens / tokens_per_step)
        if steps < min_steps:
            needed = min_steps * tokens_per_step * per_token
            raise SweepError(
                self.file, path, value,
                f"{what} gets {tokens:.3g} tokens = {steps} steps of {tokens_per_step} tokens "
                f"(batch {hparams['batch_size']} x seq {self.seq_len}); the grid needs "
                f">= {min_steps} steps (grid.min_steps)",
                f"a value >= {needed:.3g} for this size, a smaller batch, or a smaller size",
            )
        return steps

    def runs(self, entry: ArchitectureEntry, label: str, cfg: ModelConfig, budget: float, steps: int,
             hparams: dict[str, Any], data: DataConfig | None = None) -> list[PlannedRun]:
        configs = {TrainConfig: {}, OptimConfig: {}, ScheduleConfig: {}}
        for key, value in hparams.items():
            configs[TRAIN_KEYS[key][0]][TRAIN_FIELD_NAMES[key]] = value
        train = TrainConfig(total_tokens=steps * hparams["batch_size"] * self.seq_len, **configs[TrainConfig])
        counts = count_params(cfg)
        per_token = flops_per_token(cfg, self.seq_len).train
        return [
            PlannedRun(
                spec=RunSpec(
                    arch=entry.name, model=cfg, data=data or self.sweep.data, train=train,
                    optim=OptimConfig(**configs[OptimConfig]),
                    schedule=ScheduleConfig(**configs[ScheduleConfig]), seed=seed, size=label,
                ),
                arch=entry.name, registry_arch=entry.arch, is_baseline=entry.baseline, size=label,
                budget=budget, params=counts.total, params_non_embedding=counts.non_embedding,
                flops_per_token=per_token,
            )
            for seed in self.sweep.seeds
        ]


def _field_type(key: str) -> str:
    """'int', 'float' or 'other' for a `train` key, from its dataclass default."""
    config_class, _ = TRAIN_KEYS[key]
    default = config_class.__dataclass_fields__[TRAIN_FIELD_NAMES[key]].default
    if isinstance(default, bool):
        return "other"
    return {int: "int", float: "float"}.get(type(default), "other")


def _check_unique(runs: list[PlannedRun], sweep: Sweep) -> None:
    """Two cells giving one identical run (e.g. budgets so close they round to the same steps)."""
    seen: dict[str, PlannedRun] = {}
    for run in runs:
        other = seen.setdefault(run.run_id, run)
        if other is not run:
            raise SweepError(
                sweep.path, "grid", {"budgets": [other.budget, run.budget], "size": run.size},
                f"two cells give the same run {run.run_id} ({run.arch}, size {run.size}, "
                f"{run.tokens} tokens)", "grid cells that differ after rounding to whole steps",
            )
