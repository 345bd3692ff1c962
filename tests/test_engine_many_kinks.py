"""Thousands of active kinks: the engine against closed forms of one-layer programs.

For ``relu(W x + b)`` at a point where the units in ``K`` sit at 0 and ``W`` has full row
rank, the Clarke Jacobian is exactly ``{diag(s) W : s_i in [0, 1] on K, 1 on positive
units, 0 on negative ones}`` (every sign pattern of the active units occurs).  Membership
of a matrix M is decided by hand: ``s = diag(M W^-1)`` must reproduce M and lie in the box.
For ``sum(relu(x) - relu(-x))`` (= sum(x)) at 0 the set is ``{ones}`` whatever the size.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from nonsmooth.conservative import Verdict, audit, clarke_jacobian  # noqa: E402


def _layer(n, k, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    b = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.0, n)
    b[:k] = 0.0
    return W, b


def _closed_form_contains(M, W, b, tol=1e-8):
    """M in {diag(s) W : s in [0,1] on the zero units, fixed elsewhere}, by hand."""
    s_full = np.einsum("ij,ij->i", M, W) / np.einsum("ij,ij->i", W, W)
    if np.abs(M - s_full[:, None] * W).max() > tol:
        return False
    fixed = b != 0
    if np.abs(s_full[fixed] - (b[fixed] > 0)).max(initial=0.0) > tol:
        return False
    return bool(np.all(s_full[~fixed] >= -tol) and np.all(s_full[~fixed] <= 1 + tol))


@pytest.mark.parametrize("n,k", [(40, 40), (60, 25), (300, 300)])
def test_relu_layer_clarke_set_is_the_box(n, k):
    W, b = _layer(n, k)
    Wt, bt = torch.tensor(W), torch.tensor(b)
    f = lambda v: torch.relu(Wt @ v + bt)  # noqa: E731
    x = torch.zeros(n, dtype=torch.float64)
    a = audit(f, x)
    assert a.verdict is Verdict.CLARKE and a.exact, a.explain()
    assert "Minkowski" in a.exact_basis
    C = clarke_jacobian(f, x)
    rng = np.random.default_rng(1)
    fixed = (b > 0).astype(float)
    for _ in range(4):
        s = np.where(b == 0, rng.uniform(0, 1, n), fixed)
        M = s[:, None] * W
        assert _closed_form_contains(M, W, b) and C.contains(M)
        s_bad = s.copy()
        s_bad[rng.integers(0, k)] = 1.5  # outside [0, 1] on an active unit
        Mb = s_bad[:, None] * W
        assert not _closed_form_contains(Mb, W, b) and not C.contains(Mb)
        if k < n:
            s_fix = s.copy()
            s_fix[k] = 0.5  # an inactive unit must keep its fixed slope
            assert not C.contains(s_fix[:, None] * W)
        assert not C.contains(M + 1e-3 * rng.standard_normal(M.shape))  # off the set's span


def test_relu_layer_in_jax_matches_the_closed_form():
    n = 30
    W, b = _layer(n, n, seed=3)
    f = lambda v: jax.nn.relu(jnp.asarray(W) @ v + jnp.asarray(b))  # noqa: E731
    with jax.enable_x64(True):
        x = jnp.zeros(n, dtype=jnp.float64)
    a = audit(f, x)
    assert a.verdict is Verdict.CLARKE and a.exact, a.explain()
    assert _closed_form_contains(a.ad_jacobian, W, b)  # jax's relu'(0) = 0: s = 0


@pytest.mark.parametrize("n", [50, 1000])
def test_sum_of_relu_differences_is_certified_spurious(n):
    f = lambda v: (torch.relu(v) - torch.relu(-v)).sum().reshape(1)  # noqa: E731
    a = audit(f, torch.zeros(n, dtype=torch.float64))
    assert a.verdict is Verdict.SPURIOUS and a.exact, a.explain()
    assert np.allclose(a.b_subdifferential, np.ones((1, 1, n)))
    assert a.hull_distance == pytest.approx(1.0)


def test_fori_free_many_ties_of_maximum():
    """maximum(W x, V x) at 0 with W - V invertible: a box of ties, AD's 1/2 split inside."""
    n = 20
    rng = np.random.default_rng(2)
    W, V = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    Wt, Vt = torch.tensor(W), torch.tensor(V)
    a = audit(lambda v: torch.maximum(Wt @ v, Vt @ v), torch.zeros(n, dtype=torch.float64))
    assert a.verdict is Verdict.CLARKE and a.exact, a.explain()
    np.testing.assert_allclose(a.ad_jacobian, 0.5 * (W + V), atol=1e-12)  # torch splits ties evenly


def test_dependent_small_groups_are_enumerated():
    """relu(x_i) and relu(x_i + x_{i+1}) - relu(x_i) pairs: each pair's rows are independent;
    a triple relu(x_i), relu(-x_i), relu(2 x_i) is dependent but affine: enumerated."""
    n = 12
    def f(v):
        return (torch.relu(v) + torch.relu(-v) - 0.5 * torch.relu(2 * v)).sum().reshape(1)
    a = audit(f, torch.zeros(n, dtype=torch.float64))
    # per coordinate: t>0 gives 1 - 1 = 0, t<0 gives -1: Clarke set prod [-1, 0]
    assert a.exact and a.verdict in (Verdict.CLARKE, Verdict.SPURIOUS)
    C = clarke_jacobian(f, torch.zeros(n, dtype=torch.float64))
    assert C.contains(-0.3 * np.ones((1, n)))
    assert not C.contains(0.3 * np.ones((1, n)))
    assert a.ad_jacobian.tolist() == [[0.0] * n]  # torch relu'(0) = 0: in the set
    assert a.verdict is Verdict.CLARKE
