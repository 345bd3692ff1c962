"""Gradient sampling (Burke, Lewis & Overton 2005): the Clarke Jacobian seen from nearby points.

A locally Lipschitz ``f`` is differentiable almost everywhere, so Jacobians taken at random
points of a small ball around ``x`` are (with probability one) Jacobians of the pieces that
are active on sets of positive measure near ``x``: elements of, or approximations to, the
B-subdifferential.  The convex hull of the samples approximates the Clarke Jacobian and its
min-norm element (a small QP) is the steepest-descent certificate BLO use.

This is the engine's last resort and a standalone tool.  It is *approximate*: a piece active
on a thin region can be missed, so nothing built on it alone may claim a certificate.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

import numpy as np

__all__ = ["GradientSample", "gradient_sampling", "min_norm_in_hull", "hull_distance"]


# --------------------------------------------------------------------------- convex hull QP / LP


def min_norm_in_hull(points: np.ndarray, *, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray, float]:
    """Min-norm element of conv(points): ``(element, weights, kkt_gap)``.

    ``points`` is (k, d).  Solves ``min ||P^T w||^2`` over the simplex with SciPy's SLSQP,
    then polishes on the support by the exact KKT linear system.  ``kkt_gap`` is
    ``||z||^2 - min_i <p_i, z>`` (zero at the optimum; >= 0 up to rounding).

    Example:
        >>> z, w, gap = min_norm_in_hull(np.array([[-1.0, 1.0], [1.0, 1.0]]))
        >>> np.allclose(z, [0.0, 1.0])
        True
    """
    from scipy.optimize import minimize

    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (k, d) array, got shape {P.shape!r}")
    if not np.all(np.isfinite(P)):
        raise ValueError("points must be finite; got NaN or inf entries")
    k = P.shape[0]
    if k == 1:
        return P[0].copy(), np.ones(1), 0.0
    # Scale so the QP is well conditioned whatever the units of f.
    scale = float(np.max(np.abs(P))) or 1.0
    Q = P / scale
    G = Q @ Q.T
    w0 = np.full(k, 1.0 / k)
    res = minimize(
        lambda w: float(w @ G @ w),
        w0,
        jac=lambda w: 2.0 * (G @ w),
        method="SLSQP",
        bounds=[(0.0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: float(np.sum(w) - 1.0), "jac": lambda w: np.ones(k)}],
        options={"ftol": 1e-16, "maxiter": 500},
    )
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum()
    w = _polish(G, w, tol=tol)
    z = Q.T @ w
    gap = float(z @ z - np.min(Q @ z))
    return z * scale, w, gap * scale * scale


def _polish(G: np.ndarray, w: np.ndarray, *, tol: float) -> np.ndarray:
    """Exact min-norm weights on the support SLSQP found, kept only if feasible and better."""
    support = np.flatnonzero(w > 1e-10)
    if support.size == 0:
        return w
    Gs = G[np.ix_(support, support)]
    n = support.size
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = 2.0 * Gs
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    try:
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    except np.linalg.LinAlgError:
        return w
    ws = sol[:n]
    if np.any(ws < -tol) or abs(ws.sum() - 1.0) > 1e-9:
        return w
    cand = np.zeros_like(w)
    cand[support] = np.clip(ws, 0.0, None)
    cand /= cand.sum()
    return cand if cand @ G @ cand <= w @ G @ w + 1e-15 else w


def hull_distance(points: np.ndarray, target: np.ndarray) -> float:
    """Smallest max-abs distance from ``target`` to conv(points), by an LP (HiGHS).

    Example:
        >>> hull_distance(np.array([[0.0], [1.0]]), np.array([0.5]))
        0.0
    """
    from scipy.optimize import linprog

    P = np.asarray(points, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if P.ndim != 2 or P.shape[0] == 0 or P.shape[1] != t.size:
        raise ValueError(f"points must be (k, {t.size}), got shape {P.shape!r}")
    k, d = P.shape
    # variables: weights (k), slack s; minimize s with |P^T w - t| <= s, w in simplex.
    c = np.zeros(k + 1)
    c[-1] = 1.0
    A_ub = np.block([[P.T, -np.ones((d, 1))], [-P.T, -np.ones((d, 1))]])
    b_ub = np.concatenate([t, -t])
    A_eq = np.concatenate([np.ones(k), [0.0]])[None, :]
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1.0],
                  bounds=[(0, None)] * k + [(0, None)], method="highs")
    if res.status != 0:
        raise RuntimeError(f"hull membership LP failed: {res.message}")
    return float(max(res.x[-1], 0.0))


# --------------------------------------------------------------------------- framework adapters


def _framework_of(x: Any) -> str:
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return "jax"
    if isinstance(x, np.ndarray) or np.isscalar(x):
        raise TypeError(
            f"x is a NumPy value of type {type(x).__name__}; pass framework='torch' or "
            "framework='jax' to say which autodiff to differentiate f with"
        )
    raise TypeError(f"x must be a torch tensor or a jax array, got {type(x).__name__}")


def _versions(framework: str) -> dict:
    import scipy

    out = {"numpy": np.__version__, "scipy": scipy.__version__}
    if framework == "torch":
        import torch

        out["torch"] = torch.__version__
    else:
        import jax

        out["jax"] = jax.__version__
    return out


def _split(v, shapes: list) -> list:
    """One flat vector back into the argument arrays f takes (f(*xs) for a tuple x)."""
    parts, o = [], 0
    for shp in shapes:
        size = int(np.prod(shp)) if len(shp) else 1
        parts.append(v[o:o + size].reshape(shp))
        o += size
    return parts


def _torch_jacobians(f: Callable, points: np.ndarray, shapes: list, dtype) -> tuple[np.ndarray, tuple]:
    import torch

    pts = torch.as_tensor(points, dtype=dtype)

    def flat(v):
        out = f(*_split(v, shapes))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch tensor, got {type(out).__name__}")
        return out.reshape(-1)

    out_shape = tuple(f(*_split(pts[0], shapes)).shape)
    try:
        jac = torch.func.vmap(torch.func.jacrev(flat))(pts)
    except Exception:  # not vmappable (data-dependent control flow, .item(), ...): go point by point
        rows = []
        for p in pts:
            rows.append(torch.autograd.functional.jacobian(flat, p.clone()))
        jac = torch.stack(rows)
    return jac.detach().to(torch.float64).cpu().numpy(), out_shape


def _jax_jacobians(f: Callable, points: np.ndarray, shapes: list, dtype) -> tuple[np.ndarray, tuple]:
    import jax
    import jax.numpy as jnp

    def flat(v):
        return jnp.reshape(f(*_split(v, shapes)), (-1,))

    with jax.enable_x64(True):
        pts = jnp.asarray(points, dtype=dtype)
        out_shape = tuple(jnp.shape(f(*_split(pts[0], shapes))))
        try:
            jac = jax.vmap(jax.jacrev(flat))(pts)
        except Exception:  # not traceable under vmap: go point by point
            jac = jnp.stack([jax.jacrev(flat)(p) for p in pts])
        return np.asarray(jac, dtype=np.float64), out_shape


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class GradientSample:
    """What gradient sampling saw around ``x``.

    ``samples`` are the distinct finite Jacobians (k, out, in) found at random points within
    ``radius`` of ``x``; ``counts`` how many sample points gave each; ``min_norm`` the min-norm
    element of their convex hull (out, in) with hull ``weights``.  ``n_nonfinite`` counts
    sample points where f's Jacobian had NaN/inf entries (f not Lipschitz or undefined there).
    """

    samples: np.ndarray
    counts: tuple
    min_norm: np.ndarray | None
    weights: np.ndarray | None
    kkt_gap: float
    radius: float
    n_samples: int
    n_nonfinite: int
    seed: int
    framework: str
    dtype: str
    out_shape: tuple
    in_shape: tuple
    versions: dict

    @property
    def n_distinct(self) -> int:
        return int(self.samples.shape[0])

    def contains(self, J: Any, *, tol: float = 1e-7) -> bool:
        """Whether ``J`` (out x in) lies within ``tol`` (max-abs) of the hull of the samples."""
        if self.n_distinct == 0:
            return False
        J = np.asarray(J, dtype=np.float64).reshape(-1)
        return hull_distance(self.samples.reshape(self.n_distinct, -1), J) <= tol

    def explain(self) -> str:
        lines = [
            f"Gradient sampling ({self.framework}, {self.dtype}) drew {self.n_samples} points within "
            f"radius {self.radius:g} of x and found {self.n_distinct} distinct Jacobian(s) of shape "
            f"{self.samples.shape[1:] if self.n_distinct else '?'}."
        ]
        if self.n_nonfinite:
            lines.append(
                f"At {self.n_nonfinite} of {self.n_samples} points the Jacobian had NaN/inf entries: f is "
                "not locally Lipschitz (or not defined) near x, so no Clarke Jacobian exists there."
            )
        if self.min_norm is not None:
            norm = float(np.linalg.norm(self.min_norm))
            lines.append(
                f"The min-norm element of their convex hull has norm {norm:.3g} (QP optimality gap "
                f"{self.kkt_gap:.1e}); " + (
                    "a norm near 0 means x looks Clarke-stationary." if norm < 1e-8 else
                    "its negative is the steepest-descent direction of the sampled Clarke Jacobian."
                )
            )
        lines.append(
            "The hull approximates the Clarke Jacobian from inside: a piece active only on a thin "
            "region near x can be missed, so this is evidence, not a certificate."
        )
        return " ".join(lines)

    def to_json(self) -> dict:
        return {
            "kind": "gradient_sampling",
            "framework": self.framework,
            "dtype": self.dtype,
            "radius": self.radius,
            "n_samples": self.n_samples,
            "n_distinct": self.n_distinct,
            "n_nonfinite": self.n_nonfinite,
            "seed": self.seed,
            "counts": list(self.counts),
            "samples": self.samples.tolist(),
            "min_norm": None if self.min_norm is None else self.min_norm.tolist(),
            "weights": None if self.weights is None else self.weights.tolist(),
            "kkt_gap": self.kkt_gap,
            "out_shape": list(self.out_shape),
            "in_shape": list(self.in_shape),
            "versions": dict(self.versions),
            "explanation": self.explain(),
        }


def _dedupe(jacs: np.ndarray, tol: float) -> tuple[np.ndarray, list[int]]:
    """Greedy clustering under max-abs distance ``tol``; keeps the first member of each cluster."""
    reps: list[np.ndarray] = []
    counts: list[int] = []
    for J in jacs:
        for i, R in enumerate(reps):
            if np.max(np.abs(J - R)) <= tol:
                counts[i] += 1
                break
        else:
            reps.append(J)
            counts.append(1)
    return (np.stack(reps) if reps else np.zeros((0,) + jacs.shape[1:])), counts


def _ball(rng: np.random.Generator, n_points: int, dim: int, radius: float) -> np.ndarray:
    """Uniform points in the Euclidean ball: Gaussian direction, radius ~ U^(1/dim)."""
    d = rng.standard_normal((n_points, dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = radius * rng.uniform(size=(n_points, 1)) ** (1.0 / dim)
    return d * r


def gradient_sampling(f: Callable, x: Any, *, radius: float = 1e-6, n_samples: int | None = None,
                      seed: int = 0, dedupe_tol: float | None = None,
                      framework: str | None = None) -> GradientSample:
    """Jacobians of ``f`` at random points near ``x``, deduplicated, and their min-norm hull element.

    ``f`` maps a torch tensor (or jax array) shaped like ``x`` to a tensor (scalar or any shape);
    for a tuple ``x`` it is called as ``f(*x)`` and the Jacobian's columns are the inputs'
    elements in order, as in ``audit``.  Jacobians are taken by that framework's reverse
    mode in float64 and flattened to (out, in).  ``n_samples`` defaults to ``2 * x.size + 20`` (BLO need more than ``x.size + 1``).
    ``dedupe_tol`` (max-abs) defaults to ``1e-9 * (1 + max |J|)`` plus ``100 * radius``
    times the same scale, so the Jacobians of a smooth f that differ by O(radius) merge.

    Example:
        >>> import torch
        >>> gs = gradient_sampling(torch.abs, torch.tensor([0.0]), n_samples=20)
        >>> sorted(gs.samples.reshape(-1).tolist()), float(gs.min_norm[0, 0])
        ([-1.0, 1.0], 0.0)
    """
    leaves = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not leaves:
        raise ValueError("x must be an array or a non-empty tuple of arrays, got an empty tuple")
    if framework is None:
        kinds = {_framework_of(leaf) for leaf in leaves}
        if len(kinds) > 1:
            raise TypeError(f"x mixes frameworks {sorted(kinds)}; pass arrays of one framework")
        framework = kinds.pop()
    elif framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite positive number, got {radius!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if dedupe_tol is not None and (not math.isfinite(dedupe_tol) or dedupe_tol < 0):
        raise ValueError(f"dedupe_tol must be a finite non-negative number, got {dedupe_tol!r}")

    arrays = [np.asarray(leaf.detach().cpu() if hasattr(leaf, "detach") else leaf) for leaf in leaves]
    for i, a in enumerate(arrays):
        name = "x" if len(arrays) == 1 else f"x[{i}]"
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
        if a.size == 0:
            raise ValueError(f"{name} must not be empty, got shape {a.shape!r}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {a.reshape(-1)[~np.isfinite(a.reshape(-1))][:3]!r}")
    x_np = np.concatenate([a.reshape(-1) for a in arrays])
    shapes = [tuple(a.shape) for a in arrays]
    dim = int(x_np.size)
    if n_samples is None:
        n_samples = 2 * dim + 20
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    n_samples = int(n_samples)

    rng = np.random.default_rng(seed)
    x64 = x_np.astype(np.float64).reshape(-1)
    points = x64[None, :] + _ball(rng, n_samples, dim, float(radius))
    jac_fn = _torch_jacobians if framework == "torch" else _jax_jacobians
    used_dtype = "float64"
    try:
        jacs, out_shape = jac_fn(f, points, shapes, _dtype(framework, "float64"))
    except (RuntimeError, TypeError) as err:
        # f may hold float32 parameters that refuse float64 inputs: sample in x's own dtype.
        if "dtype" not in str(err).lower() and "double" not in str(err).lower() and "float" not in str(err).lower():
            raise
        used_dtype = str(x_np.dtype)
        jacs, out_shape = jac_fn(f, points.astype(x_np.dtype), shapes, _dtype(framework, used_dtype))
    jacs = jacs.reshape(n_samples, -1, dim)

    finite = np.all(np.isfinite(jacs.reshape(n_samples, -1)), axis=1)
    good = jacs[finite]
    n_nonfinite = int(n_samples - finite.sum())
    if good.shape[0]:
        scale = 1.0 + float(np.max(np.abs(good)))
        tol = dedupe_tol if dedupe_tol is not None else scale * (1e-9 + 100.0 * float(radius))
        samples, counts = _dedupe(good, tol)
        z, w, gap = min_norm_in_hull(samples.reshape(samples.shape[0], -1))
        min_norm = z.reshape(samples.shape[1:])
    else:
        samples, counts = np.zeros((0,) + jacs.shape[1:]), []
        min_norm, w, gap = None, None, float("nan")

    return GradientSample(
        samples=samples, counts=tuple(int(c) for c in counts), min_norm=min_norm, weights=w,
        kkt_gap=float(gap), radius=float(radius), n_samples=n_samples, n_nonfinite=n_nonfinite,
        seed=int(seed), framework=framework, dtype=used_dtype, out_shape=tuple(out_shape),
        in_shape=shapes[0] if len(shapes) == 1 else tuple(shapes), versions=_versions(framework),
    )


def _dtype(framework: str, name: str):
    if framework == "torch":
        import torch

        return getattr(torch, name)
    return np.dtype(name)
