"""The compute-optimal allocation: N_opt(C) = kN C^aN parameters and D_opt(C) = kD C^aD tokens.

Approach 2 fits these two power laws to per-budget minima; Approach 3 derives them in closed form
from its loss surface. Either way they are carried with their bootstrap replicates, so a band comes
with every prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isoflop.analysis.bootstrap import PERCENTILES, percentiles_of

LAW_NAMES: tuple[str, ...] = ("kN", "aN", "kD", "aD")


@dataclass(frozen=True)
class AllocationLaw:
    """N_opt(C) = kN C^aN and D_opt(C) = kD C^aD. samples [n_boot, 4]: replicates of (kN, aN,
    kD, aD), NaN rows where a replicate could not be fitted."""

    kN: float
    aN: float
    kD: float
    aD: float
    samples: np.ndarray

    def params(self, C: np.ndarray | float) -> np.ndarray:
        return self.kN * np.asarray(C, dtype=float) ** self.aN

    def tokens(self, C: np.ndarray | float) -> np.ndarray:
        return self.kD * np.asarray(C, dtype=float) ** self.aD

    def band(self, C: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
        """The outer PERCENTILES of N_opt ('params') or D_opt ('tokens') over the replicates at
        each C; NaN where no replicate is valid."""
        k, a = (0, 1) if which == "params" else (2, 3)
        C = np.asarray(C, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            values = self.samples[:, k, None] * C[None, :] ** self.samples[:, a, None]
        valid = np.all(np.isfinite(self.samples), axis=1)
        if not valid.any():
            nan = np.full(len(C), np.nan)
            return nan, nan
        lo, hi = np.percentile(values[valid], [PERCENTILES[0], PERCENTILES[-1]], axis=0)
        return lo, hi

    @property
    def n_valid(self) -> int:
        return int(np.all(np.isfinite(self.samples), axis=1).sum())

    def to_dict(self) -> dict[str, object]:
        return {
            "kN": self.kN, "aN": self.aN, "kD": self.kD, "aD": self.aD,
            "bootstrap": {name: percentiles_of(self.samples[:, i]) for i, name in enumerate(LAW_NAMES)},
            "n_boot_valid": self.n_valid,
        }
