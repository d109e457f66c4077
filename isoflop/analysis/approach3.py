"""Chinchilla Approach 3: the loss surface L(N, D) = E + A / N^alpha + B / D^beta.

The fit follows Hoffmann et al. (2022) as replicated by Epoch AI (Besiroglu et al. 2024): a Huber
loss (delta 1e-3) on the residuals of log L, the model written as a log-sum-exp,

    log L = LSE(e, a - alpha log N, b - beta log D),   E = exp(e), A = exp(a), B = exp(b),

minimised with L-BFGS-B from a grid of initialisations. Two ways to pick the starts:

- 'lbfgs': the Chinchilla/Epoch grid (e in -1..1.5, a and b in 0..25, alpha and beta in 0..2),
  evaluated at once, the most promising few polished;
- 'varpro' (variable projection): for each (alpha, beta) on a fine grid, E, A and B follow from a
  non-negative least-squares solve (the model is linear in them), weighted by 1/L so the residuals
  approximate log-loss residuals; the best few grid cells are then refined on the Huber objective.

Inside the optimiser log N and log D are centred (a_c = a - alpha * mean log N), which decouples
a from alpha and conditions the problem far better; parameters are reported uncentred.

Bounds: E >= exp(LOG_E_MIN) and E <= the largest loss, alpha and beta in EXPONENT_BOUNDS; a
parameter that ends on a bound is listed in `at_bounds` and raises a FitWarning (the surface is then
not identified by the data: no irreducible loss visible, or no dependence on N or D).

With compute C = kappa N D (kappa = 6 in the 6ND convention; measured from the table otherwise),
the compute-optimal allocation has a closed form (see SurfaceFit.optimal_params), and the optimal
loss is itself a power law in compute: L*(C) = E + A* C^-gamma with gamma = alpha beta / (alpha +
beta), which is how this method feeds the compute multipliers.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize, nnls

from isoflop.analysis.blas import single_blas_thread
from isoflop.analysis.fits import PowerLawFit
from isoflop.analysis.huber import huber, huber_slope, irls_weights

PARAM_NAMES: tuple[str, ...] = ("E", "A", "B", "alpha", "beta")
METHODS: tuple[str, ...] = ("lbfgs", "varpro")
LOG_E_MIN = -10.0  # E >= 4.5e-5 nats: "no irreducible loss visible"
EXPONENT_BOUNDS = (0.0, 3.0)
BOUND_TOLERANCE = 1e-4
# Chinchilla/Epoch start grid, in (e, a, b, alpha, beta).
START_GRID: tuple[tuple[float, ...], ...] = (
    (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    (0.0, 0.5, 1.0, 1.5, 2.0),
    (0.0, 0.5, 1.0, 1.5, 2.0),
)
N_POLISHED = 4  # grid starts polished with L-BFGS-B, best first
VARPRO_EXPONENTS = np.linspace(0.02, 2.0, 50)
N_VARPRO_POLISHED = 3


class FitWarning(UserWarning):
    """A fit that converged to a bound, or on too little data to trust."""


@dataclass(frozen=True)
class Centring:
    """Data in the optimiser's coordinates: centred log N and log D, log L and weights."""

    lN: np.ndarray
    lD: np.ndarray
    y: np.ndarray
    mN: float
    mD: float

    @classmethod
    def of(cls, N: np.ndarray, D: np.ndarray, L: np.ndarray) -> Centring:
        lN, lD = np.log(N), np.log(D)
        mN, mD = float(lN.mean()), float(lD.mean())
        return cls(lN - mN, lD - mD, np.log(L), mN, mD)

    def centre(self, theta: np.ndarray) -> np.ndarray:
        """(e, a, b, alpha, beta) -> (e, a_c, b_c, alpha, beta); works on [..., 5]."""
        theta = np.array(theta, dtype=float)
        theta[..., 1] -= theta[..., 3] * self.mN
        theta[..., 2] -= theta[..., 4] * self.mD
        return theta

    def uncentre(self, theta: np.ndarray) -> np.ndarray:
        theta = np.array(theta, dtype=float)
        theta[..., 1] += theta[..., 3] * self.mN
        theta[..., 2] += theta[..., 4] * self.mD
        return theta


def _terms(theta: np.ndarray, lN: np.ndarray, lD: np.ndarray):
    """log L of the model and the softmax shares of its three terms; theta [..., 5] against
    points [..., n] (broadcast)."""
    e, a, b, alpha, beta = (theta[..., i : i + 1] for i in range(5))
    t1, t2 = a - alpha * lN, b - beta * lD
    t0 = np.broadcast_to(e, t1.shape)
    top = np.maximum(np.maximum(t0, t1), t2)
    w0, w1, w2 = np.exp(t0 - top), np.exp(t1 - top), np.exp(t2 - top)
    total = w0 + w1 + w2
    return top + np.log(total), w0 / total, w1 / total, w2 / total


def _jacobian(shares, lN: np.ndarray, lD: np.ndarray) -> np.ndarray:
    """d log L / d (e, a, b, alpha, beta): [..., n, 5]."""
    s0, s1, s2 = shares
    return np.stack([s0, s1, s2, -s1 * lN, -s2 * lD], axis=-1)


def objective(theta: np.ndarray, data: Centring, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted Huber sum of log-loss residuals for one theta [5] or many [K, 5]."""
    pred = _terms(np.asarray(theta, dtype=float), data.lN, data.lD)[0]
    h = huber(pred - data.y)
    return (h if weights is None else h * weights).sum(axis=-1)


def _value_and_grad(theta: np.ndarray, data: Centring, weights: np.ndarray) -> tuple[float, np.ndarray]:
    pred, *shares = _terms(theta, data.lN, data.lD)
    r = pred - data.y
    value = float((weights * huber(r)).sum())
    grad = (weights * huber_slope(r)) @ _jacobian(shares, data.lN, data.lD)
    return value, grad


def _bounds(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of (e, a, b, alpha, beta); a and b are free."""
    lower = np.array([LOG_E_MIN, -np.inf, -np.inf, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]])
    upper = np.array([np.log(L.max()), np.inf, np.inf, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]])
    return lower, upper


def _polish(start: np.ndarray, data: Centring, weights: np.ndarray, lower: np.ndarray,
            upper: np.ndarray):
    bounds = [(None if np.isinf(lo) else lo, None if np.isinf(hi) else hi)
              for lo, hi in zip(lower, upper)]
    return minimize(
        _value_and_grad, np.clip(start, lower, upper), args=(data, weights), jac=True,
        method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
    )


@dataclass(frozen=True)
class SurfaceFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted by `method` to n_points runs spanning
    [n_min, n_max] parameters and [d_min, d_max] tokens, compute [c_min, c_max]. kappa: compute per
    parameter-token (C = kappa N D). objective: the Huber sum at the optimum; rms: root mean square of
    the log-loss residuals. at_bounds: parameters that ended on a bound."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    method: str
    n_points: int
    objective: float
    rms: float
    kappa: float
    n_min: float
    n_max: float
    d_min: float
    d_max: float
    c_min: float
    c_max: float
    at_bounds: tuple[str, ...] = ()

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N**-self.alpha + self.B * D**-self.beta

    @property
    def params_exponent(self) -> float:
        """a in N_opt ~ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ~ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def optimal_params(self, C: np.ndarray | float) -> np.ndarray:
        """N_opt(C) = G (C/kappa)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)):
        where d/dN of L(N, C/(kappa N)) is zero."""
        kN, aN, _, _ = allocation_params(self.as_array(), self.kappa)
        return kN * np.asarray(C, dtype=float) ** aN

    def optimal_tokens(self, C: np.ndarray | float) -> np.ndarray:
        """D_opt(C) = C / (kappa N_opt(C)) = G^-1 (C/kappa)^(alpha/(alpha+beta))."""
        _, _, kD, aD = allocation_params(self.as_array(), self.kappa)
        return kD * np.asarray(C, dtype=float) ** aD

    def optimal_loss(self, C: np.ndarray | float) -> np.ndarray:
        return self.compute_law().predict(C)

    def as_array(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    def compute_law(self) -> PowerLawFit:
        """L*(C) = E + A* C^-gamma along the compute-optimal allocation, as a PowerLawFit (its rms
        is the surface's)."""
        E, A_star, gamma = compute_law_params(self.as_array(), self.kappa)
        return PowerLawFit(E=float(E), A=float(A_star), alpha=float(gamma), n_points=self.n_points,
                           with_E=True, c_min=self.c_min, c_max=self.c_max, rms=self.rms)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["at_bounds"] = list(self.at_bounds)
        d["params_exponent"], d["tokens_exponent"] = self.params_exponent, self.tokens_exponent
        return d


def compute_law_params(params: np.ndarray, kappa: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, A*, gamma) of L*(C) = E + A* C^-gamma for params [..., 5] (each result [...]).

    Along N_opt = G X^(beta/s), D_opt = X / N_opt (X = C / kappa, s = alpha + beta), both reducible
    terms scale as X^-gamma with gamma = alpha beta / s: A* = (A G^-alpha + B G^beta) kappa^gamma.
    """
    params = np.asarray(params, dtype=float)
    E, A, B, alpha, beta = (params[..., i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = alpha + beta
        log_G = (np.log(alpha * A) - np.log(beta * B)) / s
        gamma = alpha * beta / s
        A_star = (A * np.exp(-alpha * log_G) + B * np.exp(beta * log_G)) * kappa**gamma
    return E, A_star, gamma


def _grid_starts(data: Centring) -> np.ndarray:
    return data.centre(np.array(list(itertools.product(*START_GRID))))


def _varpro_starts(data: Centring, N: np.ndarray, D: np.ndarray, L: np.ndarray,
                   weights: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """For each (alpha, beta) on the grid: E, A, B >= 0 by NNLS on relative residuals; returns the
    best N_VARPRO_POLISHED as (e, a_c, b_c, alpha, beta) starts."""
    row_scale = np.sqrt(weights) / L
    ones = np.ones_like(N)
    scored = []
    for alpha in VARPRO_EXPONENTS:
        n_term = N**-alpha
        for beta in VARPRO_EXPONENTS:
            design = np.stack([ones, n_term, D**-beta], axis=1) * row_scale[:, None]
            coef, residual = nnls(design, L * row_scale)
            scored.append((residual, alpha, beta, coef))
    scored.sort(key=lambda item: item[0])
    starts = []
    tiny = np.exp(LOG_E_MIN)
    for _, alpha, beta, (E, A, B) in scored[:N_VARPRO_POLISHED]:
        # A coefficient NNLS set to zero starts at a negligible value instead (logs need > 0).
        e, a, b = np.log(max(E, tiny)), np.log(max(A, tiny)), np.log(max(B, tiny))
        starts.append(data.centre(np.array([max(e, lower[0]), a, b, alpha, beta])))
    return np.array(starts)


@single_blas_thread()
def fit_surface(
    N: np.ndarray,
    D: np.ndarray,
    L: np.ndarray,
    *,
    method: str = "lbfgs",
    weights: np.ndarray | None = None,
    kappa: float = 6.0,
    C: np.ndarray | None = None,
    warn: bool = True,
) -> SurfaceFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss residuals, delta 1e-3).

    N parameters, D tokens, L losses (1-D, positive); weights: a multiplicity per point (default 1).
    kappa: compute per parameter-token, for the closed-form optimum; C: the points' compute, for
    the fitted compute range (default kappa N D). warn: emit a FitWarning for parameters on a bound.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if not (N.shape == D.shape == L.shape and N.ndim == 1):
        raise ValueError(f"N, D and L must be 1-D arrays of one length; got {N.shape}, {D.shape}, "
                         f"{L.shape}")
    if not all(np.all(np.isfinite(v) & (v > 0)) for v in (N, D, L)):
        raise ValueError("N, D and L must be finite and positive")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2 or len(N) < len(PARAM_NAMES):
        raise ValueError(
            f"{len(N)} points with {len(np.unique(N))} distinct N and {len(np.unique(D))} distinct "
            f"D; the surface needs >= {len(PARAM_NAMES)} points and >= 2 distinct values of each"
        )
    weights = np.ones_like(L) if weights is None else np.asarray(weights, dtype=float)
    data = Centring.of(N, D, L)
    lower, upper = _bounds(L)
    if method == "lbfgs":
        starts = np.clip(_grid_starts(data), lower, upper)
        values = objective(starts, data, weights)
        starts = starts[np.argsort(values)[:N_POLISHED]]
    else:
        starts = _varpro_starts(data, N, D, L, weights, lower)
    best = min((_polish(s, data, weights, lower, upper) for s in starts), key=lambda r: r.fun)
    theta = best.x
    at_bounds = tuple(
        name for name, value, lo, hi in zip(("E", "A", "B", "alpha", "beta"), theta, lower, upper)
        if abs(value - lo) < BOUND_TOLERANCE or abs(value - hi) < BOUND_TOLERANCE
    )
    e, a, b, alpha, beta = data.uncentre(theta)
    params = np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])
    residuals = _terms(theta, data.lN, data.lD)[0] - data.y
    C = kappa * N * D if C is None else np.asarray(C, dtype=float)
    fit = SurfaceFit(
        *(float(p) for p in params), method=method, n_points=len(L), objective=float(best.fun),
        rms=float(np.sqrt(np.mean(residuals**2))), kappa=float(kappa), n_min=float(N.min()),
        n_max=float(N.max()), d_min=float(D.min()), d_max=float(D.max()), c_min=float(C.min()),
        c_max=float(C.max()), at_bounds=at_bounds,
    )
    if warn and at_bounds:
        warnings.warn(bound_message(fit), FitWarning, stacklevel=2)
    return fit


def bound_message(fit: SurfaceFit) -> str:
    values = ", ".join(f"{name}={getattr(fit, name):.4g}" for name in fit.at_bounds)
    return (f"Approach 3 ({fit.method}): {values} on its bound (E >= {np.exp(LOG_E_MIN):.2g}, "
            f"exponents in {list(EXPONENT_BOUNDS)}): the data do not pin this parameter down")


@single_blas_thread()
def refit_batch(
    data: Centring,
    weights: np.ndarray,
    start: np.ndarray,
    iterations: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """The Huber fit for many weightings of one point set at once (the bootstrap's refits).

    weights [B, n] (multiplicities of each point in each replicate); start: the full-data fit in
    the optimiser's coordinates [5]. Levenberg-Marquardt on IRLS curvature, bounds held by clipping
    and freezing parameters pushed against them, a step kept only where it lowers the objective.
    Returns (theta [B, 5] in the optimiser's coordinates, objective [B]).
    """
    B = weights.shape[0]
    lower, upper = _bounds(np.exp(data.y))
    lower, upper = np.broadcast_to(lower, (B, 5)), np.broadcast_to(upper, (B, 5))
    theta = np.clip(np.broadcast_to(start, (B, 5)).copy(), lower, upper)

    def evaluate(theta: np.ndarray):
        pred, *shares = _terms(theta, data.lN, data.lD)
        r = pred - data.y
        value = (weights * huber(r)).sum(axis=1)
        return np.where(np.isfinite(value), value, np.inf), r, shares

    value, r, shares = evaluate(theta)
    damping = np.full(B, 1e-3)
    eye = np.eye(5)
    for _ in range(iterations):
        J = _jacobian(shares, data.lN, data.lD)  # [B, n, 5]
        grad = np.einsum("bni,bn->bi", J, weights * huber_slope(r))
        curvature = weights * irls_weights(r)
        hess = np.einsum("bni,bn,bnj->bij", J, curvature, J)
        pinned = ((theta <= lower) & (grad > 0)) | ((theta >= upper) & (grad < 0))
        grad = np.where(pinned, 0.0, grad)
        free = ~pinned
        hess = hess * free[:, :, None] * free[:, None, :] + eye * pinned[:, :, None]
        diag = np.einsum("bii->bi", hess)
        system = hess + damping[:, None, None] * eye * (diag[:, :, None] + 1e-12)
        with np.errstate(invalid="ignore", over="ignore"):
            step = -np.linalg.solve(system, grad[:, :, None])[:, :, 0]
        step = np.where(np.isfinite(step), step, 0.0)
        trial = np.clip(theta + step, lower, upper)
        t_value, t_r, t_shares = evaluate(trial)
        better = t_value < value
        theta = np.where(better[:, None], trial, theta)
        value = np.where(better, t_value, value)
        r = np.where(better[:, None], t_r, r)
        shares = [np.where(better[:, None], t, s) for t, s in zip(t_shares, shares)]
        damping = np.clip(np.where(better, damping / 3, damping * 4), 1e-9, 1e9)
    return theta, value


def params_of(theta: np.ndarray, data: Centring) -> np.ndarray:
    """Optimiser coordinates [..., 5] -> (E, A, B, alpha, beta) [..., 5]."""
    e, a, b, alpha, beta = np.moveaxis(data.uncentre(theta), -1, 0)
    with np.errstate(over="ignore"):
        return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=-1)


def theta_of(fit: SurfaceFit, data: Centring) -> np.ndarray:
    """A fit's parameters in the optimiser's coordinates of `data`."""
    return data.centre(np.array([np.log(fit.E), np.log(fit.A), np.log(fit.B), fit.alpha, fit.beta]))



def allocation_params(params: np.ndarray, kappa: float) -> np.ndarray:
    """(kN, aN, kD, aD) [..., 4] of N_opt = kN C^aN and D_opt = kD C^aD for params [..., 5]."""
    params = np.asarray(params, dtype=float)
    _, A, B, alpha, beta = (params[..., i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = alpha + beta
        log_G = (np.log(alpha * A) - np.log(beta * B)) / s
        aN, aD = beta / s, alpha / s
        kN = np.exp(log_G - aN * np.log(kappa))
        kD = np.exp(-log_G - aD * np.log(kappa))
    return np.stack([kN, aN, kD, aD], axis=-1)
