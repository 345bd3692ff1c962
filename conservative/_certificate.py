"""Stage 4, certificate: where AD's output lies relative to the elements found.

* :func:`hull_distance`: max-norm distance from AD's Jacobian to the convex hull of the
  B-subdifferential elements (an LP), relative to their scale;
* :func:`fd_gap`: the gap between a Jacobian and float64 central differences of f at a
  point where no kink is active (the check behind ``SMOOTH``);
* :func:`smooth_jacobian`: f's Jacobian where no kink is active, by the framework;
* :func:`sampling_hint`: gradient sampling near x, which informs and never certifies.

Contract: these compute numbers; the verdict stage decides what they allow to be claimed.
"""
from __future__ import annotations

import math

import numpy as np

from . import _forward as F
from ._lp import hull_residual, min_norm_point


def hull_distance(B: np.ndarray, J: np.ndarray) -> float:
    """max-norm distance of ``J`` (out x in) to conv(B) (m, out, in); inf when J is not finite."""
    if not np.all(np.isfinite(J)) or len(B) == 0:
        return math.inf
    res, _ = hull_residual(B.reshape(len(B), -1), J.reshape(-1))
    return float(res)


def min_norm_element(B: np.ndarray) -> np.ndarray:
    return min_norm_point(B.reshape(len(B), -1))[0].reshape(B.shape[1:])


def smooth_jacobian(P) -> np.ndarray:
    """f's float64 Jacobian at a point where no kink is active: every primitive is
    differentiable there, so the framework's own derivative of the traced program is it.
    Reverse mode when outputs are fewer; if it hits 0 * inf (where-guarded singularities)
    use the per-primitive forward pass, which does not."""
    J = None
    try:
        J = P.be.jacobian(P.interp.graph_function(), P.xs64, reverse=P.n_out < P.n_in)
    except Exception:
        J = None
    if J is None or not np.all(np.isfinite(J)):
        J = P.run(F.LexPolicy())[0].jac
    return J


def fd_gap(P, J: np.ndarray, rng) -> float:
    """Relative gap between J v and float64 central differences along a random v.  Steps
    shrink (1e-6 .. 1e-10) until one does not straddle a nearby kink; the best is returned
    with its step's round-off allowance subtracted."""
    x = P.x_flat()
    v = rng.standard_normal(x.size)
    v /= np.linalg.norm(v)
    jv = J @ v
    best = math.inf
    for h_rel, allowance in ((1e-6, 0.0), (1e-8, 1e-7), (1e-10, 1e-5)):
        h = h_rel * (1.0 + float(np.max(np.abs(x))))
        with np.errstate(all="ignore"):
            fd = (P.values_at(x + h * v) - P.values_at(x - h * v)) / (2 * h)
        if not np.all(np.isfinite(fd)):  # f is not finite on both sides: not differentiable here
            return math.inf
        gap = float(np.max(np.abs(fd - jv))) / (1.0 + float(np.max(np.abs(jv)))) if jv.size else 0.0
        best = min(best, max(0.0, gap - allowance))
        if best <= 1e-6:
            break
    return best


def reproduces(out: np.ndarray, y_user: np.ndarray, tol: float) -> bool:
    """Whether the traced program's f(x) is the user's (else the trace is not about f)."""
    if out.shape != y_user.shape:
        return False
    both = np.isfinite(out) & np.isfinite(y_user)
    if not np.array_equal(np.isfinite(out), np.isfinite(y_user)):
        return False
    scale = 1.0 + np.abs(out[both])
    return bool(np.all(np.abs(out[both] - y_user[both]) <= 10 * tol * scale))


def sampling_hint(P, B: np.ndarray, ad: np.ndarray, tol: float, seed: int) -> str:
    """Last resort (Burke-Lewis-Overton): Jacobians at random points very close to x.  They
    approximate B-subdifferential elements but certify nothing, so they only inform."""
    try:
        from ._sampling import gradient_sampling
    except ImportError:
        return ""
    if not np.all(np.isfinite(ad)):
        return ""
    try:
        gs = gradient_sampling(P.f, P.xs[0] if len(P.xs) == 1 else tuple(P.xs),
                               radius=1e-7 * (1.0 + float(np.max(np.abs(P.x_flat())))),
                               n_samples=min(400, 4 * P.n_in + 40), seed=seed)
        S = np.asarray(gs.samples, dtype=np.float64).reshape(-1, P.n_out * P.n_in)
    except Exception:
        return ""
    pts = np.concatenate([B.reshape(len(B), -1), S]) if len(B) else S
    res, _ = hull_residual(pts, ad.reshape(-1))
    inside = res <= tol * (1.0 + float(np.max(np.abs(pts))))
    return (f"Gradient sampling ({len(S)} distinct nearby Jacobians, not a certificate) finds AD "
            + ("inside their hull with the elements above." if inside else f"at distance {res:.3g} from their hull."))
