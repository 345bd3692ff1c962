"""Independent oracles for soft sort/rank, shared by the NumPy, torch and jax tests.

They live in ``nonsmooth.reports._suite_sort`` (the report runs the same checks) and share
no code with the solver:

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
from scipy.stats import rankdata

from nonsmooth.reports._suite_sort import (  # noqa: F401  (re-exported for the other tests)
    _subset_constraints,
    fd_jacobian,
    oracle,
    project_kl,
    project_l2,
)


def soft_rank_oracle(x, reg, eps, direction="ascending"):
    return oracle("rank", x, reg, eps, direction)


def soft_sort_oracle(x, reg, eps, direction="ascending"):
    return oracle("sort", x, reg, eps, direction)


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


def test_the_report_suite_passes_and_plots_the_rank_paths():
    from nonsmooth.reports._suite_sort import run

    result = run(quick=True, frameworks=())
    assert result.passed, [c for c in result.checks if not c.passed]
    names = " ".join(c.name for c in result.checks)
    assert "finite differences" in names and "projection" in names
    for check in result.checks:
        assert check.numbers, check.name
    fig = result.figures[0]
    assert fig.logx and len(fig.series) == 5
    # Along the strength axis the L2 ranks go from the hard ranks to (n + 1) / 2.
    first = [s[0] for s in fig.series.values()]
    last = [s[-1] for s in fig.series.values()]
    np.testing.assert_allclose(first, rankdata(np.array([0.3, -1.2, 2.0, 0.35, 1.1])),
                               atol=1e-9)
    np.testing.assert_allclose(last, 3.0, atol=0.1)
    result.to_json()
