"""The plan of a sweep: what each run is and what it will cost, as a rich table or as JSON.

A run with cooldown branches (grid `cooldowns: true`) costs its own FLOPs plus the decay of each
branch (PlannedRun.spent_flops): totals and time estimates count that, and its table row shows both
parts. Torch-free: planning a 1000-run sweep takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table

from isoflop.orchestrator.estimate import DeviceProfile
from isoflop.orchestrator.formats import duration, human, sci
from isoflop.orchestrator.grid import PlannedRun, without_nan
from isoflop.orchestrator.spec import Sweep
from isoflop.runspec import DataConfig

# Corpora whose size `plan` may read by loading them: loading is quick when the tokens are
# cached and a few seconds to tokenize otherwise. BPE (trains a tokenizer first) and
# python-site (hundreds of MB to tokenize) are left to `isoflop run`, which loads them anyway.
CHEAP_CORPUS_TOKENIZERS = ("bytes",)
EXPENSIVE_CORPORA = ("python-site",)


@dataclass(frozen=True)
class Plan:
    sweep: Sweep
    runs: list[PlannedRun]
    profile: DeviceProfile
    seconds: list[float]  # estimated time of each run, in run order
    warnings: list[str]

    @property
    def total_seconds(self) -> float:
        """Estimated wall time of the sweep with its executor's workers."""
        return self.profile.sweep_seconds(self.seconds, self.sweep.executor.workers)

    @property
    def total_flops(self) -> float:
        """What the sweep spends, cooldown branches' decays included."""
        return sum(run.spent_flops for run in self.runs)

    @property
    def total_tokens(self) -> float:
        """Tokens the sweep trains on, cooldown branches' decays included."""
        return sum(run.tokens + (run.spent_flops - run.flops) / run.flops_per_token for run in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep.name,
            "file": str(self.sweep.path),
            "device_profile": self.profile.name,
            "n_runs": len(self.runs),
            "total_flops": self.total_flops,
            "n_branches": sum(len(run.branches) for run in self.runs),
            "workers": self.sweep.executor.workers,
            "total_est_seconds": self.total_seconds,
            "warnings": self.warnings,
            "runs": [
                without_nan(run.labels()) | {"spent_flops": run.spent_flops, "est_seconds": seconds}
                for run, seconds in zip(self.runs, self.seconds)
            ],
        }


def make_plan(sweep: Sweep, runs: list[PlannedRun], profile: DeviceProfile,
              train_tokens: int | None = None) -> Plan:
    """train_tokens: the corpus's training tokens when known; runs needing more get a warning."""
    warnings = []
    if train_tokens is not None:
        for run in runs:
            if run.tokens > train_tokens:
                warnings.append(
                    f"{run.arch} size {run.size} budget {run.budget:.3g}: {run.tokens:,} tokens > "
                    f"{train_tokens:,} training tokens in {sweep.data.corpus} "
                    f"({run.tokens / train_tokens:.2f} epochs: data repeats)"
                )
    if sweep.train.get("compile") == "graphs":
        warnings.append("train.compile=graphs: the time estimates assume eager steps (the profiles' "
                        "measurements); on one H200 small models' steps ran 1.7-4.7x faster under CUDA "
                        "graphs, after 6-25 s of compiling per run (README, Sweep files)")
    return Plan(sweep, runs, profile, [profile.run_seconds(run) for run in runs], warnings)


def corpus_train_tokens(data: DataConfig) -> int | None:
    """Training tokens of the corpus if they can be had cheaply (see CHEAP_CORPUS_TOKENIZERS), else None."""
    if data.task is not None:  # synthetic batches are generated afresh: no data to run out of
        return None
    if data.tokenizer not in CHEAP_CORPUS_TOKENIZERS or data.corpus in EXPENSIVE_CORPORA:
        return None
    from isoflop.data import load_corpus  # numpy only; imported here to keep `plan --json` lean

    return load_corpus(data).n_train_tokens


def plan_table(plan: Plan) -> Table:
    """One row per run; '*' marks the baseline architecture. A run with cooldown branches shows
    the budgets it covers and its FLOPs as its own + the branches' decays."""
    workers = plan.sweep.executor.workers
    n_branches = sum(len(run.branches) for run in plan.runs)
    branches = f" + {n_branches} cooldown branches" if n_branches else ""
    caption = "* baseline; params: total (non-embedding)"
    if n_branches:
        caption += "; branched runs: budgets low..high, FLOPs own + branch decays (in the totals too)"
    table = Table(title=f"sweep {plan.sweep.name}: {len(plan.runs)} runs{branches} "
                        f"({plan.profile.name} estimate)",
                  box=box.SIMPLE_HEAD,
                  caption=f"{caption}; total time with {workers} worker{'s' if workers > 1 else ''}")
    recall = any(run.difficulty for run in plan.runs)  # recall grids: a difficulty, not a budget
    seeds = len(plan.sweep.seeds) > 1  # otherwise a cell's rows would look alike
    headers = ("arch", "size", "difficulty" if recall else "budget", *(("seed",) if seeds else ()), "params",
               "tokens", "steps", "tok/param", "FLOPs", "lr", "est. time")
    for header in headers:
        table.add_column(header, justify="left" if header in ("arch", "size") else "right", no_wrap=True)
    for run, seconds in zip(plan.runs, plan.seconds):
        table.add_row(
            f"{run.arch}*" if run.is_baseline else run.arch, run.size,
            run.difficulty if recall else _budgets(run), *((str(run.spec.seed),) if seeds else ()),
            f"{human(run.params)} ({human(run.params_non_embedding)})", human(run.tokens), f"{run.steps:,}",
            f"{run.tokens / run.params:.1f}", _flops(run), sci(run.spec.optim.lr), duration(seconds),
        )
    table.add_section()
    table.add_row("total", "", "", *(("",) if seeds else ()), "", human(plan.total_tokens), "", "",
                  sci(plan.total_flops), "", duration(plan.total_seconds))
    return table


def _budgets(run: PlannedRun) -> str:
    """'3e11', or '1e11..3e11' for a run whose branches stand for the smaller budgets."""
    if not run.branches:
        return sci(run.budget)
    return f"{sci(min(budget for _, budget in run.branches))}..{sci(run.budget)}"


def _flops(run: PlannedRun) -> str:
    """'3e11', or '3e11 + 6e10' (own + cooldown decays) for a run with branches."""
    if not run.branches:
        return sci(run.flops)
    return f"{sci(run.flops)} + {sci(run.spent_flops - run.flops)}"
