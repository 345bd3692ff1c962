"""Independent oracles for soft sort/rank, shared by the NumPy, torch and jax tests.

* ``project_l2``: Euclidean projection onto the permutahedron, solved as a QP by SciPy's
  SLSQP over the subset inequalities ``sum_S mu <= sum of the |S| largest w``.
* ``project_kl``: the entropic projection ``log argmin_{mu in P(e^w)} KL(mu, e^z)``,
  the same constraints, a convex solve over ``mu > 0``.
* ``soft_*_oracle``: the paper's definitions written on top of those projections.
* ``fd_jacobian``: float64 central finite differences.

None of this touches PAV; the tests in this file check the oracles themselves.
"""
import itertools

import numpy as np
import pytest
import scipy.optimize as so
from scipy.stats import rankdata


def _subset_constraints(w):
    n = len(w)
    top = np.cumsum(np.sort(w)[::-1])
    rows, bounds = [], []
    for mask in range(1, 2 ** n - 1):
        row = np.array([(mask >> i) & 1 for i in range(n)], dtype=float)
        rows.append(row)
        bounds.append(top[int(row.sum()) - 1])
    return np.array(rows).reshape(-1, n), np.array(bounds)


def _solve(objective, grad, hess_diag, w_target, x0, bounds=None):
    """SLSQP to find the active face, then Newton on the KKT system of that face.

    SLSQP alone stops around 1e-8; the polish makes the oracle exact to rounding and
    then verifies the KKT conditions (feasible, stationary, multipliers >= 0).
    """
    a, b = _subset_constraints(w_target)
    total = float(np.sum(w_target))
    cons = [{"type": "eq", "fun": lambda m: np.array([m.sum() - total]),
             "jac": lambda m: np.ones((1, len(m)))}]
    if len(a):
        cons.append({"type": "ineq", "fun": lambda m: b - a @ m, "jac": lambda m: -a})
    res = so.minimize(objective, x0, jac=grad, constraints=cons, method="SLSQP",
                      bounds=bounds, options={"ftol": 1e-12, "maxiter": 2000})
    assert res.status in (0, 8), res.message  # 8: converged to SLSQP's own precision
    mu = res.x
    scale = 1.0 + np.abs(b).max(initial=abs(total))
    act = np.abs(b - a @ mu) <= 1e-6 * scale
    A = np.vstack([np.ones((1, len(mu))), a[act]])
    rhs = np.concatenate([[total], b[act]])
    n, k = len(mu), len(rhs)
    for _ in range(50):
        kkt = np.block([[np.diag(hess_diag(mu)), A.T], [A, np.zeros((k, k))]])
        step = np.linalg.lstsq(kkt, np.concatenate([-grad(mu), rhs - A @ mu]), rcond=None)[0]
        mu = mu + step[:n]
        if np.max(np.abs(step[:n])) <= 1e-15 * (1 + np.abs(mu).max()):
            break
    lam = step[n:]
    assert np.all(b - a @ mu >= -1e-9 * scale), "oracle: polished point infeasible"
    assert np.all(lam[1:] >= -1e-7 * (1 + np.abs(lam).max())), "oracle: negative multiplier"
    assert np.allclose(grad(mu) + A.T @ lam, 0, atol=1e-8 * (1 + np.abs(grad(mu)).max()))
    return mu


def project_l2(z, w):
    """argmin_{mu in P(w)} 0.5 ||mu - z||^2 (P(w): convex hull of the permutations of w)."""
    z, w = np.asarray(z, float), np.asarray(w, float)
    return _solve(lambda m: 0.5 * np.sum((m - z) ** 2), lambda m: m - z,
                  lambda m: np.ones_like(m), w, np.full(len(z), w.mean()))


def project_kl(z, w):
    """log argmin_{mu in P(e^w)} KL(mu, e^z) (generalized KL)."""
    z, w = np.asarray(z, float), np.asarray(w, float)
    ew = np.exp(w)
    mu = _solve(lambda m: np.sum(m * (np.log(m) - z) - m + np.exp(z)),
                lambda m: np.log(m) - z, lambda m: 1.0 / m, ew, np.full(len(z), ew.mean()),
                bounds=[(1e-300, None)] * len(z))
    return np.log(mu)


def _project(reg, z, w):
    return project_l2(z, w) if reg == "l2" else project_kl(z, w)


def soft_rank_oracle(x, reg, eps, direction="ascending"):
    x = np.asarray(x, float)
    n = len(x)
    sign = 1.0 if direction == "ascending" else -1.0
    return _project(reg, sign * x / eps, np.arange(n, 0, -1.0))


def soft_sort_oracle(x, reg, eps, direction="ascending"):
    x = np.asarray(x, float)
    rho = np.arange(len(x), 0, -1.0)
    if direction == "descending":
        return _project(reg, rho / eps, x)
    return -_project(reg, rho / eps, -x)


def fd_jacobian(f, x, h=1e-6):
    """Central differences of a vector function of a 1-D float64 vector."""
    x = np.asarray(x, float)
    cols = []
    for j in range(len(x)):
        e = np.zeros_like(x)
        e[j] = h
        cols.append((np.asarray(f(x + e), float) - np.asarray(f(x - e), float)) / (2 * h))
    return np.stack(cols, axis=-1)


# --------------------------------------------------------------------------- oracle checks


@pytest.mark.parametrize("n", [2, 3, 4])
def test_l2_oracle_far_point_lands_on_the_vertex(n):
    # z far apart in the order of w: the projection is the permutation of w sorted like z.
    z = np.array([10.0 * k for k in np.random.default_rng(n).permutation(n)]) * 5
    w = np.arange(n, 0, -1.0)
    np.testing.assert_allclose(project_l2(z, w), rankdata(z), atol=1e-8)


def test_l2_oracle_inside_point_is_itself():
    w = np.array([3.0, 2.0, 1.0])
    z = np.array([2.2, 1.9, 1.9])  # sums to 6, every partial sum below the bounds
    np.testing.assert_allclose(project_l2(z, w), z, atol=1e-9)


def test_kl_oracle_matches_vertex_enumeration_for_two_points():
    # n = 2: P(e^w) is a segment; minimize KL along it by brute force.
    z, w = np.array([0.3, -0.4]), np.array([1.0, 0.2])
    ew = np.exp(w)
    t = np.linspace(0, 1, 200001)
    mu = np.outer(t, ew) + np.outer(1 - t, ew[::-1])
    kl = np.sum(mu * (np.log(mu) - z) - mu + np.exp(z), axis=1)
    best = np.log(mu[np.argmin(kl)])
    np.testing.assert_allclose(project_kl(z, w), best, atol=1e-4)


def test_subset_constraints_describe_the_permutahedron():
    w = np.array([3.0, 1.0, 2.0])
    a, b = _subset_constraints(w)
    for perm in itertools.permutations(w):
        assert np.all(a @ np.array(perm) <= b + 1e-12)
    assert not np.all(a @ np.array([3.5, 1.0, 1.5]) <= b)
