"""Second-order decisions for sign patterns that first order cannot settle.

A pattern's region is ``S = {x' : g_c(x') > 0 for every condition c}`` with ``g_c(x) = 0``,
rows ``r_c = grad g_c(x)`` and Hessians ``H_c``.  When the open cone ``{d : r_c.d > 0}``
is empty but the arguments are not affine, S may still have interior near x (the thin
region ``x**2 < y < 2 x**2``).  Two certificates, both rigorous for C^2 arguments:

* **witness** (S has interior arbitrarily close to x): a direction ``d`` in the closed
  cone ``K = {d : r_c.d >= 0}`` and a second-order term ``e`` with ``r_c.e + d'H_c d > 0``
  for every ``c`` with ``r_c.d = 0``.  Then ``x + t d + t^2 e / 2`` lies in the open set S
  for all small ``t > 0``.
* **emptiness**: Farkas multipliers ``lam >= 0``, ``sum lam_c r_c = 0``, whose combined
  Hessian ``sum lam_c H_c`` is negative definite on ``L = {d : r_c.d = 0 for c in
  supp(lam)}`` (a subspace containing K).  Points of S approach x only along directions of
  K, where ``sum lam_c g_c`` is negative while it must be positive on S: S is empty near x.

Contract: :func:`decide` answers "active", "empty" or "undecided" (higher order needed,
e.g. ``x**4 < y < 2 x**4``); it never guesses.  Margins are relative to the data's scale.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

MARGIN = 1e-9
N_DIRECTIONS = 24


def _scale(rows, hessians):
    s = max(float(np.max(np.abs(rows))) if rows.size else 0.0, float(np.max(np.abs(hessians))) if hessians.size else 0.0)
    return s or 1.0


def _first_order(rows) -> bool:
    m, n = rows.shape
    R = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    res = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.hstack([-R, np.ones((m, 1))]), b_ub=np.zeros(m),
                  bounds=[(-1, 1)] * n + [(0, 1)], method="highs")
    return res.status == 0 and -res.fun > MARGIN


def _implicit_equalities(rows) -> np.ndarray:
    """Rows that vanish on all of K = {d : rows d >= 0} (|d| <= 1)."""
    m, n = rows.shape
    eq = np.zeros(m, dtype=bool)
    for c in range(m):
        res = linprog(-rows[c], A_ub=-rows, b_ub=np.zeros(m), bounds=[(-1, 1)] * n, method="highs")
        if res.status != 0 or -res.fun <= MARGIN * (np.linalg.norm(rows[c]) + 1.0):
            eq[c] = True
    return eq


def _relint_direction(rows, eq, rng):
    """A direction in the relative interior of K, and a basis of K's span."""
    m, n = rows.shape
    free = ~eq
    A_eq = rows[eq] if eq.any() else None
    b_eq = np.zeros(int(eq.sum())) if eq.any() else None
    if free.any():
        Rf = rows[free]
        res = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.hstack([-Rf, np.ones((int(free.sum()), 1))]),
                      b_ub=np.zeros(int(free.sum())),
                      A_eq=None if A_eq is None else np.hstack([A_eq, np.zeros((len(A_eq), 1))]), b_eq=b_eq,
                      bounds=[(-1, 1)] * n + [(0, 1)], method="highs")
        if res.status != 0:
            return None, None
        d0 = res.x[:n]
    else:
        d0 = np.zeros(n)
    # the span of K: the null space of the implicit equalities
    if eq.any():
        _, s, vt = np.linalg.svd(rows[eq])
        r = int(np.sum(s > 1e-12 * (s[0] if len(s) else 1.0)))
        Z = vt[r:].T
    else:
        Z = np.eye(n)
    return d0, Z


def _witness(rows, hessians, eq, rng) -> bool:
    m, n = rows.shape
    d0, Z = _relint_direction(rows, eq, rng)
    if d0 is None or Z.shape[1] == 0:
        return False
    scale = _scale(rows, hessians)
    free = ~eq
    cands = []
    if np.linalg.norm(d0) > 0:
        cands.append(d0)
    for _ in range(N_DIRECTIONS):
        v = Z @ rng.standard_normal(Z.shape[1])
        for d in (v, -v, d0 + 0.5 * v / max(np.linalg.norm(v), 1e-300) * max(np.linalg.norm(d0), 1e-3)):
            if free.any() and np.min(rows[free] @ d) <= MARGIN * scale * np.linalg.norm(d):
                continue
            if np.linalg.norm(d) > 0:
                cands.append(d)
    idx = np.nonzero(eq)[0]
    if len(idx) == 0:
        return bool(cands)
    for d in cands:
        d = d / np.linalg.norm(d)
        q = np.array([d @ hessians[c] @ d for c in idx])
        # maximize t: rows[c] . e + q_c >= t for c in E, |e| <= 1e3
        A = np.hstack([-rows[idx], np.ones((len(idx), 1))])
        res = linprog(np.r_[np.zeros(n), -1.0], A_ub=A, b_ub=q, bounds=[(-1e3, 1e3)] * n + [(None, 1.0)],
                      method="highs")
        if res.status == 0 and -res.fun > 1e-7 * scale:
            return True
    return False


def _farkas(rows, eq):
    """Multipliers lam >= 0 (sum 1) with sum lam_c r_c = 0: one per support element plus
    their average (in the relative interior)."""
    m, n = rows.shape
    A_eq = np.vstack([rows.T, np.ones((1, m))])
    b_eq = np.r_[np.zeros(n), 1.0]
    out = []
    for c in range(m):
        if not eq[c]:
            continue
        cost = np.zeros(m)
        cost[c] = -1.0
        res = linprog(cost, A_eq=A_eq, b_eq=b_eq, bounds=[(0, None)] * m, method="highs")
        if res.status == 0 and res.x[c] > 1e-12:
            out.append(res.x)
    if out:
        out.insert(0, np.mean(out, axis=0))
    return out


def _empty(rows, hessians, eq) -> bool:
    scale = _scale(rows, hessians)
    for lam in _farkas(rows, eq):
        supp = lam > 1e-12
        _, s, vt = np.linalg.svd(rows[supp])
        r = int(np.sum(s > 1e-12 * (s[0] if len(s) else 1.0)))
        Z = vt[r:].T
        if Z.shape[1] == 0:
            return True  # no direction of approach at all
        Hs = np.tensordot(lam, hessians, axes=1)
        top = float(np.max(np.linalg.eigvalsh(Z.T @ (0.5 * (Hs + Hs.T)) @ Z)))
        if top < -1e-7 * scale:
            return True
    return False


def decide(rows: np.ndarray, hessians: np.ndarray, *, seed: int = 0) -> str:
    """"active", "empty" or "undecided" for the region ``{g_c > 0}`` near x.

    >>> rows = np.array([[0.0, 1.0], [0.0, -1.0]])        # y - x^2 > 0 and -(y - 2 x^2) > 0
    >>> H = np.array([[[-2.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]])
    >>> decide(rows, H)
    'active'
    >>> decide(-rows, -H)                                   # -(y - x^2) > 0 and y - 2 x^2 > 0
    'empty'
    """
    rows = np.asarray(rows, dtype=np.float64)
    hessians = np.asarray(hessians, dtype=np.float64)
    if not (np.all(np.isfinite(rows)) and np.all(np.isfinite(hessians))):
        return "undecided"
    nz = np.linalg.norm(rows, axis=1) > 0
    if nz.all() and _first_order(rows):
        return "active"
    rng = np.random.default_rng(seed)
    eq = _implicit_equalities(rows)
    if _witness(rows, hessians, eq, rng):
        return "active"
    if _empty(rows, hessians, eq):
        return "empty"
    return "undecided"
