"""Small convex programs the engine needs, in float64 with SciPy.

* :func:`strictly_feasible`: does ``{d : r . d > 0 for every row r}`` have interior? (LP)
* :func:`hull_residual`: distance (max-norm) from a point to the convex hull of points (LP)
* :func:`min_norm_point`: the min-norm element of a convex hull (QP on the simplex)
"""
from __future__ import annotations

import numpy as np

MARGIN = 1e-9


def strictly_feasible(rows, witness=None) -> tuple[bool, np.ndarray | None]:
    """Whether the open cone ``{d : r . d > 0}`` is nonempty, and a point inside it.

    Rows are normalized; the LP maximizes the smallest margin ``t`` over the box
    ``|d| <= 1``.  A previous interior point (``witness``) short-circuits the LP.

    >>> strictly_feasible([np.array([1.0, 0.0]), np.array([-1.0, 0.0])])[0]
    False
    """
    if not rows:
        return True, witness
    R = np.asarray(rows, dtype=np.float64)
    R = R / np.linalg.norm(R, axis=1, keepdims=True)
    if witness is not None and np.all(R @ witness > MARGIN):
        return True, witness
    from scipy.optimize import linprog

    m, k = R.shape
    c = np.zeros(k + 1)
    c[-1] = -1.0
    A = np.hstack([-R, np.ones((m, 1))])
    res = linprog(c, A_ub=A, b_ub=np.zeros(m), bounds=[(-1.0, 1.0)] * k + [(0.0, 1.0)], method="highs")
    if res.status != 0 or -res.fun <= MARGIN:
        return False, None
    return True, res.x[:k]


def hull_residual(points: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """``min_{w in simplex} max |P^T w - target|`` and the weights (an LP).

    >>> hull_residual(np.array([[0.0], [2.0]]), np.array([1.0]))[0] < 1e-12
    True
    """
    from scipy.optimize import linprog

    P = np.asarray(points, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    m, d = P.shape
    if m == 0:
        return float("inf"), np.zeros(0)
    # Coordinates where every point agrees add a constant term whatever the weights: only
    # the others enter the LP (a 1000 x 1000 Jacobian with one active kink differs in one row).
    vary = np.any(P != P[:1], axis=0)
    const = float(np.max(np.abs(P[0, ~vary] - y[~vary]), initial=0.0))
    if not np.all(np.isfinite(P[0, ~vary])) or not np.all(np.isfinite(y)):
        return float("inf"), np.zeros(m)
    if not vary.any():
        w = np.zeros(m)
        w[0] = 1.0
        return const, w
    if not vary.all():
        r, w = hull_residual(P[:, vary], y[vary])
        return max(const, r), w
    # variables: w (m), s; minimize s; -s <= P^T w - y <= s; sum w = 1
    c = np.zeros(m + 1)
    c[-1] = 1.0
    A_ub = np.vstack([np.hstack([P.T, -np.ones((d, 1))]), np.hstack([-P.T, -np.ones((d, 1))])])
    b_ub = np.concatenate([y, -y])
    A_eq = np.hstack([np.ones((1, m)), np.zeros((1, 1))])
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1.0], bounds=[(0, None)] * m + [(0, None)], method="highs")
    if res.status != 0:
        return float("inf"), np.zeros(m)
    return float(res.x[-1]), res.x[:m]


def min_norm_point(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-Euclidean-norm element of conv(points) and its weights.

    Solved as nonnegative least squares with the simplex constraint as a heavily
    weighted extra row, then polished by projected-gradient steps.

    >>> z, w = min_norm_point(np.array([[-1.0, 1.0], [1.0, 1.0]]))
    >>> np.allclose(z, [0.0, 1.0])
    True
    """
    from scipy.optimize import nnls

    P = np.asarray(points, dtype=np.float64)
    m = P.shape[0]
    if m == 1:
        return P[0].copy(), np.ones(1)
    scale = float(np.max(np.abs(P))) or 1.0
    Q = P / scale
    A = np.vstack([Q.T, 1e3 * np.ones((1, m))])
    b = np.concatenate([np.zeros(Q.shape[1]), [1e3]])
    w, _ = nnls(A, b, maxiter=50 * m)
    w = np.maximum(w, 0.0)
    w = w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)
    # Frank-Wolfe polish: exact line search towards the best vertex
    G = Q @ Q.T
    for _ in range(200):
        g = G @ w
        j = int(np.argmin(g))
        dvec = -w.copy()
        dvec[j] += 1.0
        gap = -(g @ dvec)
        if gap <= 1e-15:
            break
        curv = dvec @ G @ dvec
        step = 1.0 if curv <= 0 else min(1.0, gap / curv)
        w = w + step * dvec
    return scale * (Q.T @ w), w
