"""The Huber loss: quadratic for small residuals, linear for large ones.

Chinchilla's Approach 3 (and Epoch AI's replication) sums it over log-loss residuals with
delta = 1e-3. Residuals of real sweeps are a few 1e-3 to 1e-2 in log-loss, so at that delta the fit
is close to a least-absolute-deviation fit: a run that is off by a lot pulls on the fit no harder
than one that is off by a little.
"""

from __future__ import annotations

import numpy as np

DELTA = 1e-3


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """0.5 r^2 where |r| <= delta, delta (|r| - delta/2) beyond (the two agree at the seam)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_slope(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """d huber / d r: r clipped to [-delta, delta]."""
    return np.clip(r, -delta, delta)


def irls_weights(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """huber'(r) / r: 1 in the quadratic zone, delta / |r| beyond. Used as the curvature of a
    Gauss-Newton step (the exact second derivative, 0 beyond delta, would give no curvature at all
    in a near-L1 fit)."""
    a = np.abs(r)
    return np.where(a <= delta, 1.0, delta / np.maximum(a, delta))
