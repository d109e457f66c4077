"""The compute-optimal frontier of one architecture and its power law L(C) = E + A * C^-alpha.

Residuals are taken on log-loss, so every budget weighs the same whatever its loss level. Compute
is rescaled by its geometric mean before fitting, which keeps A of order one for the optimiser;
A is reported in the table's units (C in FLOPs). With fewer than MIN_POINTS_FOR_E distinct budgets
the irreducible loss E cannot be told apart from A and alpha, so E is fixed to 0 and the law
becomes a straight line in log-log, fitted in closed form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

MIN_POINTS_FOR_E = 4
ALPHA_MIN, ALPHA_MAX = 1e-6, 2.0
# Nominal budgets and the compute a run actually spent differ by rounding to whole steps, so a
# budget within this relative margin of a fit's compute range counts as inside it.
RANGE_TOLERANCE = 0.02
# Starting points for E as fractions of the smallest loss, and for alpha; A follows from each.
_E_STARTS = (0.0, 0.3, 0.6, 0.8, 0.9, 0.97)
_ALPHA_STARTS = (0.03, 0.07, 0.15, 0.3, 0.6, 1.2)
_N_POLISHED_STARTS = 3


def power_law(C: np.ndarray | float, E, A, alpha) -> np.ndarray:
    """E + A * C^-alpha, broadcasting over all arguments (computed in logs: A may be huge)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return E + np.exp(np.log(A) - alpha * np.log(C))


def inverse_power_law(L: np.ndarray | float, E, A, alpha) -> np.ndarray:
    """The compute C at which E + A * C^-alpha equals L: inf where L <= E (never reached), NaN
    where L or the parameters are NaN."""
    L, E, A, alpha = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (L, E, A, alpha)))
    gap = L - E
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        C = np.exp((np.log(A) - np.log(gap)) / alpha)
    return np.where(gap > 0, C, np.where(np.isnan(gap + A + alpha), np.nan, np.inf))


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A * C^-alpha fitted to n_points frontier points spanning [c_min, c_max].

    rms: root mean square of the log-loss residuals. with_E false means E was fixed to 0.
    """

    E: float
    A: float
    alpha: float
    n_points: int
    with_E: bool
    c_min: float
    c_max: float
    rms: float

    def predict(self, C: np.ndarray | float) -> np.ndarray:
        return power_law(np.asarray(C, dtype=float), self.E, self.A, self.alpha)

    def inverse(self, L: np.ndarray | float) -> np.ndarray:
        return inverse_power_law(L, self.E, self.A, self.alpha)

    def covers(self, C: np.ndarray | float) -> np.ndarray:
        """Whether C lies inside the fitted compute range (within RANGE_TOLERANCE)."""
        C = np.asarray(C, dtype=float)
        return (C >= self.c_min * (1 - RANGE_TOLERANCE)) & (C <= self.c_max * (1 + RANGE_TOLERANCE))

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def frontier_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs on the compute-optimal frontier of one architecture's usable runs.

    Isoflop rows (finite budget): the lowest-loss run of each budget. Ladder rows (budget NaN):
    every run, since each ladder size is its own compute point.
    """
    isoflop = runs[np.isfinite(runs["budget"])]
    best = isoflop.loc[isoflop.groupby("budget")["final_val_loss"].idxmin()]
    return pd.concat([best, runs[~np.isfinite(runs["budget"])]])


GRID_CHECK_MIN_SIZES = 3  # with two sizes, one is always at an edge


def grid_edges(runs: pd.DataFrame, min_sizes: int = GRID_CHECK_MIN_SIZES) -> pd.DataFrame:
    """Budgets whose lowest-loss run is the smallest or the largest size run there, per
    architecture: columns arch, budget, size, edge ("smallest" | "largest"), n_sizes. Only isoflop
    budgets with at least `min_sizes` distinct sizes count (with two, one is always at an edge).

    There the compute-optimal size may lie outside the grid, so the frontier run overstates the
    loss reachable with that budget."""
    rows = []
    isoflop = runs[np.isfinite(runs["budget"])]
    for (arch, budget), group in isoflop.groupby(["arch", "budget"], sort=True):
        sizes = np.unique(group["params"].to_numpy(float))  # sorted
        if len(sizes) < min_sizes:
            continue
        best = group.loc[group["final_val_loss"].idxmin()]
        edge = ("smallest" if best["params"] == sizes[0]
                else "largest" if best["params"] == sizes[-1] else None)
        if edge is not None:
            rows.append({"arch": arch, "budget": float(budget), "size": best["size"], "edge": edge,
                         "n_sizes": len(sizes)})
    return pd.DataFrame(rows, columns=["arch", "budget", "size", "edge", "n_sizes"])


def frontier_points(runs: pd.DataFrame) -> pd.DataFrame:
    """The frontier (frontier_rows) as columns C (the compute the run spent) and L, sorted by C."""
    points = frontier_rows(runs)
    frontier = pd.DataFrame({
        "C": points["flops"].to_numpy(float), "L": points["final_val_loss"].to_numpy(float),
    })
    return frontier.sort_values("C", ignore_index=True)


def n_distinct(C: np.ndarray) -> int:
    return len(np.unique(np.asarray(C, dtype=float)))


def fit_power_law(C: np.ndarray, L: np.ndarray, with_E: bool | None = None) -> PowerLawFit:
    """Fit L = E + A * C^-alpha on log-loss residuals (bounds E in [0, min L], alpha in (0, 2]).

    with_E None picks: with E from MIN_POINTS_FOR_E distinct compute values on, else E = 0.
    """
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    if C.shape != L.shape or C.ndim != 1:
        raise ValueError(f"C and L must be 1-D arrays of one length; got {C.shape} and {L.shape}")
    if not (np.all(np.isfinite(C)) and np.all(C > 0) and np.all(np.isfinite(L)) and np.all(L > 0)):
        raise ValueError("C and L must be finite and positive")
    distinct = n_distinct(C)
    if with_E is None:
        with_E = distinct >= MIN_POINTS_FOR_E
    needed = MIN_POINTS_FOR_E if with_E else 2
    if distinct < needed:
        law = "with" if with_E else "without"
        raise ValueError(f"{distinct} distinct compute value(s); a fit {law} E needs >= {needed}")
    log_ref = float(np.mean(np.log(C)))
    lx, y = np.log(C) - log_ref, np.log(L)
    if with_E:
        E, u, alpha = _fit_with_E(lx, y)
    else:
        u, alpha = (float(v[0]) for v in line_fit(lx[None], y[None]))
        E = 0.0
    residuals = np.log(power_law(np.exp(lx), E, np.exp(u), alpha)) - y
    return PowerLawFit(
        E=float(E),
        A=float(np.exp(u + alpha * log_ref)),
        alpha=float(alpha),
        n_points=len(C),
        with_E=with_E,
        c_min=float(C.min()),
        c_max=float(C.max()),
        rms=float(np.sqrt(np.mean(residuals**2))),
    )


def line_fit(
    lx: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The E = 0 law for a batch of point sets [B, n]: y = u - alpha * lx by (weighted) least
    squares, alpha clipped to its bounds (the profiled objective is a parabola in alpha, so clipping
    it and refitting u is the bounded optimum). weights [B, n]: a point with weight 0 is ignored
    (its values may be NaN). Returns (u, alpha), each [B]; NaN where lx does not vary."""
    u, slope = weighted_line(lx, y, weights)
    alpha = np.clip(-slope, ALPHA_MIN, ALPHA_MAX)
    lx, y, w = _masked(lx, y, weights)
    u = (w * (y + alpha[:, None] * lx)).sum(axis=1) / w.sum(axis=1)
    return np.where(np.isfinite(slope), u, np.nan), np.where(np.isfinite(slope), alpha, np.nan)


def weighted_line(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares y = intercept + slope * x for each row of [B, n] (weights as in line_fit).
    Returns (intercept, slope), each [B]; NaN where the weighted x does not vary."""
    x, y, w = _masked(x, y, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = w.sum(axis=1, keepdims=True)
        x_mean, y_mean = (w * x).sum(axis=1, keepdims=True) / total, (w * y).sum(axis=1, keepdims=True) / total
        spread = (w * (x - x_mean) ** 2).sum(axis=1)
        slope = (w * (x - x_mean) * (y - y_mean)).sum(axis=1) / spread
        slope = np.where(spread > 1e-12 * np.maximum(total[:, 0], 1), slope, np.nan)
    return y_mean[:, 0] - slope * x_mean[:, 0], slope


def _masked(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (ones by default) and x, y with zero-weight entries set to 0 (they may be NaN)."""
    w = np.ones(np.broadcast_shapes(x.shape, y.shape)) if weights is None else np.asarray(weights, float)
    ignored = w == 0
    return np.where(ignored, 0.0, x), np.where(ignored, 0.0, y), w


def _start_grid(lx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Starting points (E, u, alpha) [K, 3]: for each E and alpha on the grid, the u that best
    fits log(L - E) = u - alpha * lx."""
    L_min = float(np.exp(y.min()))
    starts = []
    for e in _E_STARTS:
        E = e * L_min
        for alpha in _ALPHA_STARTS:
            u = float(np.mean(np.log(np.exp(y) - E) + alpha * lx))
            starts.append((E, u, alpha))
    return np.array(starts)


def _residuals(theta: np.ndarray, lx: np.ndarray, y: np.ndarray) -> np.ndarray:
    E, u, alpha = theta
    return np.log(E + np.exp(u - alpha * lx)) - y


def _jacobian(theta: np.ndarray, lx: np.ndarray, y: np.ndarray) -> np.ndarray:
    E, u, alpha = theta
    term = np.exp(u - alpha * lx)
    model = E + term
    return np.stack([1 / model, term / model, -term * lx / model], axis=1)


def _fit_with_E(lx: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares from the best few grid starts; returns the best (E, u, alpha)."""
    lower = np.array([0.0, -np.inf, ALPHA_MIN])
    upper = np.array([float(np.exp(y.min())), np.inf, ALPHA_MAX])
    starts = _start_grid(lx, y)
    costs = [float(np.sum(_residuals(s, lx, y) ** 2)) for s in starts]
    best = None
    for i in np.argsort(costs)[:_N_POLISHED_STARTS]:
        start = np.clip(starts[i], lower, upper)
        result = least_squares(
            _residuals, start, jac=_jacobian, bounds=(lower, upper), args=(lx, y), method="trf",
            x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
        )
        if best is None or result.cost < best.cost:
            best = result
    E, u, alpha = best.x
    return float(E), float(u), float(alpha)


def fit_with_E_batch(
    lx: np.ndarray,
    y: np.ndarray,
    start: np.ndarray,
    iterations: int = 80,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The law with E for a batch of point sets at once (the bootstrap's thousand refits).

    lx = log(C / C_ref) and y = log L, each [B, n]; start (E, u, alpha) [3] with u = log A at C_ref;
    weights [B, n] as in line_fit. Levenberg-Marquardt with the bounds of fit_power_law held by
    clipping each step and freezing parameters pushed against a bound. Runs from `start` (the
    full-data fit: replicates lie close to it) and from grid starts, keeping the best per replicate.
    Returns (E, u, alpha) [B, 3].
    """
    lx, y, w = _masked(lx, y, weights)
    B = lx.shape[0]
    L_min = np.exp(np.where(w > 0, y, np.inf).min(axis=1))
    lower = np.broadcast_to(np.array([0.0, -np.inf, ALPHA_MIN]), (B, 3))
    upper = np.stack([L_min, np.full(B, np.inf), np.full(B, ALPHA_MAX)], axis=1)
    candidates = [np.broadcast_to(start, (B, 3))]
    for e in (0.0, 0.5, 0.9):
        with np.errstate(invalid="ignore"):  # 0 * inf for a replicate without points
            E = e * L_min
            u, alpha = line_fit(lx, np.log(np.exp(y) - E[:, None]), w)
        candidates.append(np.stack([E, u, alpha], axis=1))
    best, best_cost = None, None
    for theta in candidates:
        theta = np.clip(np.where(np.isfinite(theta), theta, start), lower, upper)
        theta, cost = _levenberg_marquardt(lx, y, w, theta, lower, upper, iterations)
        if best is None:
            best, best_cost = theta, cost
        else:
            better = cost < best_cost
            best = np.where(better[:, None], theta, best)
            best_cost = np.where(better, cost, best_cost)
    return best


def _batch_model(lx: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        term = np.exp(theta[:, 1:2] - theta[:, 2:3] * lx)
        model = theta[:, 0:1] + term
        return model, term, np.log(model)


def _levenberg_marquardt(
    lx: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    theta: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    iterations: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Damped Gauss-Newton steps for every replicate at once; returns (theta, cost) [B, 3], [B]."""
    def cost_of(log_model: np.ndarray) -> np.ndarray:
        cost = (w * (log_model - y) ** 2).sum(axis=1)
        return np.where(np.isfinite(cost), cost, np.inf)

    model, term, log_model = _batch_model(lx, theta)
    cost = cost_of(log_model)
    damping = np.full(len(theta), 1e-3)
    eye = np.eye(3)
    for _ in range(iterations):
        r = log_model - y
        J = np.stack([1 / model, term / model, -term * lx / model], axis=2)
        grad = np.einsum("bni,bn->bi", J, w * r)
        hess = np.einsum("bni,bn,bnj->bij", J, w, J)
        pinned = ((theta <= lower) & (grad > 0)) | ((theta >= upper) & (grad < 0))
        free = ~pinned
        grad = np.where(free, grad, 0.0)
        hess = hess * free[:, :, None] * free[:, None, :] + eye * pinned[:, :, None]
        diag = np.einsum("bii->bi", hess)
        system = hess + damping[:, None, None] * eye * (diag[:, :, None] + 1e-12)
        with np.errstate(invalid="ignore"):
            step = -np.linalg.solve(system, grad[:, :, None])[:, :, 0]
        step = np.where(np.isfinite(step), step, 0.0)
        trial = np.clip(theta + step, lower, upper)
        t_model, t_term, t_log_model = _batch_model(lx, trial)
        t_cost = cost_of(t_log_model)
        better = t_cost < cost
        theta = np.where(better[:, None], trial, theta)
        model = np.where(better[:, None], t_model, model)
        term = np.where(better[:, None], t_term, term)
        log_model = np.where(better[:, None], t_log_model, log_model)
        cost = np.where(better, t_cost, cost)
        damping = np.clip(np.where(better, damping / 3, damping * 3), 1e-12, 1e12)
    return theta, cost


def fit_frontiers(runs: pd.DataFrame) -> tuple[dict[str, PowerLawFit], dict[str, str]]:
    """Fit every architecture of a usable-runs table. Returns (fits by arch, reasons by arch for
    those that could not be fitted, e.g. too few finished budgets in a sweep still running)."""
    fits: dict[str, PowerLawFit] = {}
    skipped: dict[str, str] = {}
    for arch, group in runs.groupby("arch", sort=True):
        points = frontier_points(group)
        try:
            fits[arch] = fit_power_law(points["C"].to_numpy(), points["L"].to_numpy())
        except ValueError as error:
            skipped[arch] = str(error)
    return fits, skipped
