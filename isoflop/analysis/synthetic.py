"""Synthetic sweeps with a known truth, to check the analysis end to end without training anything.

Loss follows a surface L(N, D) = E + A / N^a + B / D^b (N non-embedding parameters, D tokens), a
run at budget C with N parameters trains D = C / (6N) tokens, and an architecture with compute
factor k is k times as data-efficient: L_k(N, D) = L(N, k*D). Its sizes are spread around its own
compute-optimal size, so its whole isoflop slice at budget C is the baseline's slice at budget k*C
relabelled with compute C: the variant at compute C behaves like the baseline at k*C, and the true
multiplier is k at every budget.

A grid can be centred on the optimum (grid_centre 1) or off it (grid_centre 3: sizes spread around
3x the compute-optimal size), which is how the bias table of docs/analysis.md is made.

Everything in the table that the surface does not determine is a placeholder marked as synthetic:
shapes (d_model from N = 12 * n_layers * d_model^2 with 8 layers, 8 heads, d_ff = 4 * d_model),
a 256-token vocabulary, seq_len 256, batch 8, lr 3e-4, final_train_loss = final_val_loss,
wall_s = flops / 1e12 times the architecture's slowdown (1 unless given), and the strings device,
corpus_fingerprint and git_sha = 'synthetic'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from isoflop import __version__
from isoflop.analysis.table import EVAL_COLUMNS, RUN_COLUMNS

_N_LAYERS, _N_HEADS, _VOCAB, _SEQ_LEN, _BATCH = 8, 8, 256, 256, 8


@dataclass(frozen=True)
class LossSurface:
    """L(N, D) = E + A / N^a + B / D^b. Defaults: Chinchilla's fit (Hoffmann et al. 2022,
    approach 3)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    a: float = 0.34
    b: float = 0.28

    def loss(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.a + self.B / D**self.b

    def optimal_params(self, C: np.ndarray | float) -> np.ndarray:
        """The N minimising loss(N, C / (6N)) (setting the derivative in N to zero)."""
        G = (self.a * self.A / (self.b * self.B)) ** (1 / (self.a + self.b))
        return G * (np.asarray(C, dtype=float) / 6) ** (self.b / (self.a + self.b))


def simulate_runs(
    budgets: Sequence[float],
    compute_factors: Mapping[str, float],
    baseline: str,
    surface: LossSurface = LossSurface(),
    sizes_per_budget: int = 4,
    size_step: float = 2.0,
    noise: float = 0.0,
    seed: int = 0,
    sweep: str = "synthetic",
    grid_centre: float = 1.0,
    slowdowns: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """A runs table (every column of the contract) for an isoflop grid.

    compute_factors: arch -> k (the baseline's must be 1). At each budget, each arch runs
    sizes_per_budget sizes spaced by size_step around grid_centre times its compute-optimal N.
    noise: standard deviation of a multiplicative log-normal factor on each final loss, drawn with
    `seed`. slowdowns: arch -> seconds per FLOP relative to 1e-12 (the measured throughput).
    """
    if compute_factors.get(baseline) != 1:
        raise ValueError(
            f"compute_factors[{baseline!r}] must be 1 (the baseline); got {compute_factors.get(baseline)}"
        )
    rng = np.random.default_rng(seed)
    offsets = size_step ** (np.arange(sizes_per_budget) - (sizes_per_budget - 1) / 2)
    rows = []
    for arch, k in compute_factors.items():
        for budget in budgets:
            for j, N in enumerate(surface.optimal_params(k * budget) * grid_centre * offsets):
                tokens = budget / (6 * N)
                loss = float(surface.loss(N, k * tokens) * np.exp(noise * rng.standard_normal()))
                slowdown = (slowdowns or {}).get(arch, 1.0)
                rows.append(_row(sweep, arch, arch == baseline, f"s{j}", float(N), float(tokens),
                                 budget, loss, slowdown))
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def simulate_evals(
    runs: pd.DataFrame,
    compute_factors: Mapping[str, float],
    surface: LossSurface = LossSurface(),
    points_per_run: int = 8,
) -> pd.DataFrame:
    """An evals table for `runs` (from simulate_runs): validation loss after each eighth (by
    default) of the tokens, from the same surface, scaled so the last point is the run's final loss.
    Placeholders: train_loss = val_loss, lr constant, elapsed_s and tokens/s from wall_s."""
    rows = []
    for run in runs.itertuples():
        k = compute_factors[run.arch]
        fractions = np.arange(1, points_per_run + 1) / points_per_run
        N = run.params_non_embedding
        curve = surface.loss(N, k * run.tokens * fractions)
        curve = curve * run.final_val_loss / curve[-1]
        for fraction, loss in zip(fractions, curve):
            rows.append({
                "run_id": run.run_id, "arch": run.arch, "size": run.size,
                "step": max(1, int(fraction * run.steps)), "tokens": fraction * run.tokens,
                "flops": fraction * run.flops, "train_loss": loss, "val_loss": loss, "lr": run.lr,
                "tokens_per_s": run.tokens_per_s, "elapsed_s": fraction * run.wall_s,
            })
    return pd.DataFrame(rows, columns=list(EVAL_COLUMNS))


def _row(sweep: str, arch: str, is_baseline: bool, size: str, N: float, tokens: float, budget: float,
         loss: float, slowdown: float) -> dict[str, object]:
    d_model = max(1, round(float(np.sqrt(N / (12 * _N_LAYERS)))))
    params = N + _VOCAB * d_model
    flops = 6 * N * tokens
    wall_s = slowdown * flops / 1e12
    run_id = hashlib.sha256(f"{sweep}/{arch}/{budget:.6g}/{N:.6g}".encode()).hexdigest()[:12]
    return {
        "run_id": run_id, "sweep": sweep, "arch": arch, "is_baseline": is_baseline, "size": size,
        "d_model": d_model, "n_layers": _N_LAYERS, "n_heads": _N_HEADS, "d_ff": 4 * d_model,
        "params": params, "params_non_embedding": N, "seq_len": _SEQ_LEN, "batch_size": _BATCH,
        "tokens": tokens, "steps": max(1, int(tokens // (_SEQ_LEN * _BATCH))), "budget": budget,
        "flops": flops, "flops_6n": flops, "flops_6n_total": 6 * params * tokens,
        "final_val_loss": loss, "final_train_loss": loss, "lr": 3e-4, "seed": 0, "state": "done",
        "wall_s": wall_s, "tokens_per_s": tokens / wall_s, "device": "synthetic",
        "corpus_fingerprint": "synthetic", "git_sha": "synthetic", "isoflop_version": __version__,
    }
