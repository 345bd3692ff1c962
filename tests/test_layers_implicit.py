"""The audit engine through implicit layers (nonsmooth implicit function theorem).

Oracles: scalar closed forms derived by hand (the pieces of the solution map of
``z = relu(z/2 + x)``, of ``z - |z|/2 = a/4``); for equilibrium cells
``z = relu(W z + U x + b)`` the vertex formula of ``implicit_jacobian_set``
(``(I - diag(s) W)^-1 diag(s) U`` over the kink box, a separate implementation) and the
Jacobians of the pieces around x by float64 central differences of the fixed point
solved to 1e-13 (``_fixed_point_np``, plain iteration in NumPy).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from _layer_oracles import same_sets, sampled_pieces

os.environ.setdefault("NONSMOOTH_ENGINE_DEBUG", "1")

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from nonsmooth.conservative import Verdict, audit  # noqa: E402
from nonsmooth.implicit import (DEQ, EquilibriumCell, ImplicitModel, deq, implicit_fixed_point,  # noqa: E402
                                implicit_jacobian_set, implicit_model, implicit_root)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _j(x):
    with jax.enable_x64(True):
        return jnp.asarray(np.asarray(x, dtype=np.float64))


def _audit_jax(f, x):
    with jax.enable_x64(True):
        return audit(f, _j(x))


@pytest.mark.parametrize("x0,expected", [(0.0, [0.0, 2.0]), (1.0, [2.0]), (-1.0, [0.0])])
def test_issue_closed_form_torch(x0, expected):
    """z = relu(z/2 + x): z = 2x for x > 0 (slope 2), z = 0 for x < 0: [0, 2] at x = 0."""
    g = lambda v: implicit_fixed_point(lambda z, x: torch.relu(z / 2 + x), _t([0.0]), v, tol=1e-12)[0]  # noqa: E731
    a = audit(g, _t([x0]))
    assert a.verdict is (Verdict.CLARKE if len(expected) > 1 else Verdict.SMOOTH), a.explain()
    assert sorted(a.b_subdifferential.ravel().tolist()) == pytest.approx(expected, abs=1e-12)
    if x0 == 0.0:
        assert a.exact and a.ad_jacobian.item() == 0.0  # torch's relu'(0) = 0: the piece x < 0


@pytest.mark.parametrize("x0,expected", [(0.0, [0.0, 2.0]), (1.0, [2.0])])
def test_issue_closed_form_jax_deq(x0, expected):
    layer = deq(lambda p, z, x: jax.nn.relu(z / 2 + x), tol=1e-12)
    a = _audit_jax(lambda v: layer({}, v), [[x0]])
    assert a.verdict is (Verdict.CLARKE if len(expected) > 1 else Verdict.SMOOTH), a.explain()
    assert sorted(a.b_subdifferential.ravel().tolist()) == pytest.approx(expected, abs=1e-12)


def test_implicit_root_of_an_abs_cell():
    """z - |z|/2 = a/4: z = a/2 for a > 0 and a/6 for a < 0."""
    g = lambda v: implicit_root(lambda z, a: z - 0.25 * a - 0.5 * torch.abs(z), _t([0.0]), v, tol=1e-12)[0]  # noqa: E731
    a = audit(g, _t([0.0]))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert sorted(a.b_subdifferential.ravel().tolist()) == pytest.approx([1 / 6, 1 / 2], abs=1e-12)


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_singular_cell_jacobian_is_undecided_with_the_theorem(fw):
    """z = z/2 + |z|/2 + a: d_z F = 1 - (1 + s)/2 with s in [-1, 1] contains 0."""
    if fw == "torch":
        g = lambda v: implicit_fixed_point(lambda z, a: 0.5 * z + 0.5 * torch.abs(z) + a, _t([-1.0]), v,  # noqa: E731
                                           tol=1e-12)[0]
        a = audit(g, _t([0.0]))
    else:
        layer = deq(lambda p, z, x: 0.5 * z + 0.5 * jnp.abs(z) + x, tol=1e-12)
        a = _audit_jax(lambda v: layer({}, v, -jnp.ones((1, 1))), [[0.0]])
    assert a.verdict is Verdict.UNDECIDED
    assert "implicit function theorem does not apply" in a.reason and "singular" in a.reason


def _kinked_cell(seed=0, n=3, p=2, kinks=(0,)):
    """An EquilibriumCell and an input x whose fixed point has preactivation 0 at ``kinks``
    (built backwards from a chosen z*)."""
    torch.manual_seed(seed)
    cell = EquilibriumCell(p, n, init_scale=0.5, dtype=torch.float64)
    x = torch.randn(1, p, dtype=torch.float64)
    z = torch.rand(1, n, dtype=torch.float64) + 0.5
    z[0, list(kinks)] = 0.0
    with torch.no_grad():
        pre = z @ cell.W.T + x @ cell.U.T
        cell.b.copy_((z - pre)[0])  # z = relu(pre + b) with pre + b = z (0 at the kinks)
    return cell, x, z


def _fixed_point_np(W, U, b, x, iters=100):  # |W|_2 = 0.5: 2^-100 accuracy
    z = np.zeros(W.shape[0])
    for _ in range(iters):
        z = np.maximum(W @ z + U @ x + b, 0.0)
    return z


@pytest.mark.parametrize("kinks", [(0,), (0, 2)])
def test_deq_against_implicit_jacobian_set_and_central_differences(kinks):
    cell, x, z = _kinked_cell(kinks=kinks)
    layer = DEQ(cell, state_shape=(3,), tol=1e-12, max_iter=500)
    a = audit(lambda v: layer(v), x)
    assert a.verdict is Verdict.CLARKE and a.exact, a.explain()
    S = implicit_jacobian_set(cell, z[0], x[0])
    assert S.exact and len(S.matrices) == 2 ** len(kinks)
    W, U, b = (t.detach().numpy() for t in (cell.W, cell.U, cell.b))
    pieces = sampled_pieces(lambda v: _fixed_point_np(W, U, b, v), x[0].numpy(), n_samples=150, t=1e-5, h=1e-8,
                            tol=1e-5)
    assert same_sets(a.b_subdifferential, pieces, 1e-5)
    # the B-set is contained in the vertex set (some vertex selections may not be pieces)
    assert all(any(np.abs(B - M).max() < 1e-8 for M in S.matrices) for B in a.b_subdifferential)


def test_implicit_model_and_generic_deq_are_smooth_with_the_ad_jacobian():
    torch.manual_seed(1)
    m = ImplicitModel(2, 3, 1, dtype=torch.float64, tol=1e-12, max_iter=500)
    x = torch.randn(2, 2, dtype=torch.float64)
    a = audit(lambda v: m(v), x)
    assert a.verdict is Verdict.SMOOTH
    J = np.stack([torch.autograd.functional.jacobian(lambda v: m(v).reshape(-1), x).reshape(2, 4).numpy()])[0]
    np.testing.assert_allclose(a.b_subdifferential[0], J, atol=1e-8)


def test_jax_implicit_model_at_a_kink():
    """x = relu(0.3 x + u) (one unit each): slope 1/0.7 for u > 0, 0 for u < 0."""
    p = {"A": 0.3 * np.eye(2), "B": np.ones((2, 1)), "C": np.ones((1, 2)), "D": np.zeros((1, 1))}
    with jax.enable_x64(True):
        pj = {k: jnp.asarray(v) for k, v in p.items()}
        a = audit(lambda u: implicit_model(pj, u, tol=1e-12), _j([[0.0]]))
    assert a.verdict is Verdict.CLARKE
    assert sorted(a.b_subdifferential.ravel().tolist()) == pytest.approx([0.0, 2 / 0.7], abs=1e-10)


def test_relu_after_an_implicit_layer():
    """relu(z*(x) - 1) with z* = 2x near x = 1/2: a kink of the outer relu through the layer."""
    g = lambda v: torch.relu(implicit_fixed_point(lambda z, x: torch.relu(z / 2 + x), _t([0.0]), v,  # noqa: E731
                                                  tol=1e-12)[0] - 1.0)
    a = audit(g, _t([0.5]))
    assert a.verdict is Verdict.CLARKE
    assert sorted(a.b_subdifferential.ravel().tolist()) == pytest.approx([0.0, 2.0], abs=1e-9)


def test_solver_tolerance_bounds_what_is_asked_of_ad():
    """With the default tol=1e-6 AD is accurate to about the solver's tolerance, not to
    float64 rounding: the audit compares at that accuracy and still decides."""
    g = lambda v: implicit_fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, _t([0.0]), v)[0]  # noqa: E731
    a = audit(g, _t([0.3]))
    assert a.verdict is Verdict.SMOOTH


def test_jax_cell_closing_over_the_audited_input():
    """z = relu(w z + 1): z* = 1 / (1 - w) for w < 1, dz*/dw = 1 / (1 - w)^2 = 4 at w = 1/2
    (w reaches the cell by closure: hoisted into the layer's inputs)."""
    def g(w):
        layer = deq(lambda p, z, x: jax.nn.relu(w * z + x), tol=1e-12)
        return layer({}, jnp.ones((1, 1)))

    a = _audit_jax(g, [0.5])
    assert a.verdict is Verdict.SMOOTH
    assert a.b_subdifferential.ravel().tolist() == pytest.approx([4.0], abs=1e-9)


@pytest.mark.parametrize("backward", ["jfb", "phantom"])
def test_approximate_backward_modes_are_named_as_surrogates(backward):
    """jfb/phantom differentiate a few steps of f, not the fixed point: the audit reports the
    solution map's Jacobian (2 for z = relu(z/2 + x) at x = 1) and names the surrogate."""
    g = lambda v: implicit_fixed_point(lambda z, x: torch.relu(z / 2 + x), _t([0.0]), v, tol=1e-12,  # noqa: E731
                                       backward=backward)[0]
    a = audit(g, _t([1.0]))
    assert a.verdict is Verdict.UNDECIDED and backward in a.reason and "surrogate" in a.reason
    assert a.b_subdifferential.ravel().tolist() == pytest.approx([2.0], abs=1e-10)
    assert abs(a.ad_jacobian.item() - 2.0) > 0.01  # jfb: 1 (one step); phantom: a partial sum
