"""The audit engine through the hard combinatorial solvers (piecewise constant, ties).

Oracles: the solver's NumPy path at random points x + t d near x (t small): the distinct
outputs found there are the solutions that tie at x (a linear objective picks each vertex
of the optimal face from some direction), so their number must equal the number of
options the engine enumerates, and two different ones mean f jumps at x (NOT_LIPSCHITZ).
Off ties the solver is locally constant: SMOOTH with a zero Jacobian (float64 central
differences of the NumPy path are zero).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("NONSMOOTH_ENGINE_DEBUG", "1")

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from nonsmooth.conservative import Verdict, audit  # noqa: E402
from nonsmooth.conservative import _forward as F  # noqa: E402
from nonsmooth.conservative._elements import analyse  # noqa: E402
from nonsmooth.conservative._problem import Problem  # noqa: E402
from nonsmooth.solvers import (argmax_onehot, hard_rank, linear_assignment, shortest_path_edges,  # noqa: E402
                               shortest_path_grid, sort_permutation, topk_mask)

CASES = [  # (name, solver, tie point, generic point)
    ("argmax_onehot", argmax_onehot, [1.0, 3.0, 3.0], [1.0, 3.0, 2.0]),
    ("topk_mask", topk_mask(2), [1.0, 3.0, 1.0, 0.0], [1.0, 3.0, 2.0, 0.0]),
    ("hard_rank", hard_rank, [1.0, 3.0, 1.0], [1.0, 3.0, 2.0]),
    ("sort_permutation", sort_permutation, [1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 2.0, 0.0]),
    ("shortest_path_edges", shortest_path_edges((2, 2)), [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]),
    ("shortest_path_grid", shortest_path_grid, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]),
    ("linear_assignment", linear_assignment, [[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 1.0]]),
]


def _arr(fw, x):
    if fw == "torch":
        return torch.tensor(x, dtype=torch.float64)
    return jnp.asarray(np.asarray(x, dtype=np.float64))


def _nearby_outputs(solver, x, n=200, t=1e-6, seed=0):
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    outs = []
    for _ in range(n):
        y = np.asarray(solver(x + t * rng.standard_normal(x.shape)))
        if not any(np.array_equal(y, o) for o in outs):
            outs.append(y)
    return outs


def _engine_options(solver, x):
    with jax.enable_x64(True):
        P = Problem(solver, _arr("torch", x), kink_tol=0.0)
        P.run(F.LexPolicy())
        return P, list(P.interp.sites_seen.values())


@pytest.mark.parametrize("name,solver,tie,generic", CASES, ids=[c[0] for c in CASES])
def test_ties_are_the_optimal_set(name, solver, tie, generic):
    P, sites = _engine_options(solver, tie)
    near = _nearby_outputs(solver, tie)
    assert len(near) >= 2
    if name in ("hard_rank", "sort_permutation"):  # one site per tied group, options = its orders
        assert int(np.prod([len(s.options) for s in sites])) == len(near)
    else:
        assert len(sites) == 1 and len(sites[0].options) == len(near)
        values = [o.data[2].reshape(np.shape(near[0])) for o in sites[0].options]
        assert all(any(np.array_equal(v, o) for o in near) for v in values)
    A = analyse(P, exact_budget=16, n_directions=8, seed=0)
    assert A.discontinuous, "the output jumps between the tied solutions"
    P, sites = _engine_options(solver, generic)
    assert not sites and len(_nearby_outputs(solver, generic)) == 1


@pytest.mark.parametrize("fw", ["torch", "jax"])
@pytest.mark.parametrize("name,solver,tie,generic", [c for c in CASES if c[0] != "linear_assignment"],
                         ids=[c[0] for c in CASES if c[0] != "linear_assignment"])
def test_audit_at_a_tie_is_not_lipschitz_and_off_ties_smooth_with_zero_jacobian(fw, name, solver, tie, generic):
    with jax.enable_x64(True):
        a = audit(solver, _arr(fw, tie))
        b = audit(solver, _arr(fw, generic))
    assert a.verdict is Verdict.NOT_LIPSCHITZ, a.explain()
    assert b.verdict is Verdict.SMOOTH, b.explain()
    assert np.all(b.b_subdifferential == 0.0) and np.all(b.ad_jacobian == 0.0)


def test_linear_assignment_ad_failure_is_reported_not_hidden():
    """torch.func and jax cannot differentiate the SciPy call: the audit says so."""
    a = audit(linear_assignment, _arr("torch", [[1.0, 2.0], [3.0, 1.0]]))
    assert a.verdict is Verdict.UNDECIDED and "reverse mode failed" in a.reason


def test_solver_inside_a_model_keeps_its_jump():
    """A tie of the solver's input is found through the model around it."""
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    f = lambda t: argmax_onehot(W @ t) * 2.0  # noqa: E731
    assert audit(f, torch.tensor([2.0, -1.0], dtype=torch.float64)).verdict is Verdict.SMOOTH
    assert audit(f, torch.tensor([1.0, 0.0], dtype=torch.float64)).verdict is Verdict.NOT_LIPSCHITZ
    # relu clamps every entry to 0 around this point: the tie persists and the output
    # does not jump, which first order cannot see; the audit must not claim a jump
    g = lambda t: argmax_onehot(torch.relu(t)) * 2.0  # noqa: E731
    assert audit(g, torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)).verdict is not Verdict.NOT_LIPSCHITZ


def test_grid_costs_at_zero_are_named():
    a = audit(shortest_path_grid, _arr("torch", [[1.0, 0.0], [1.0, 1.0]]))
    assert a.verdict is Verdict.UNDECIDED and "clipped" in a.reason


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_spo_plus_at_a_tie_of_its_solver(fw):
    """SPO+ with the 2x2 edge shortest path (arcs 0->1, 0->2, 1->3, 2->3; paths {0,2} and
    {1,3}) and true costs c = (1, 2, 1, 2), so w*(c) = (1, 0, 1, 0).  At c_hat = (1, 1.5, 1,
    1.5), q = 2 c_hat - c = (1, 1, 1, 1) ties the two paths: the loss is continuous, with
    gradient 2 (w*(c) - w_q) on each side: 0 and (2, -2, 2, -2)."""
    from nonsmooth.solvers import spo_plus_loss

    loss = spo_plus_loss(shortest_path_edges((2, 2)))
    c = _arr(fw, [1.0, 2.0, 1.0, 2.0])
    with jax.enable_x64(True):
        a = audit(lambda p: loss(p, c), _arr(fw, [1.0, 1.5, 1.0, 1.5]))
        b = audit(lambda p: loss(p, c), _arr(fw, [1.0, 2.0, 3.0, 0.5]))
    assert a.verdict is Verdict.CLARKE and a.exact
    got = sorted(tuple(B.ravel()) for B in a.b_subdifferential)
    assert got == [(0.0, 0.0, 0.0, 0.0), (2.0, -2.0, 2.0, -2.0)]
    assert b.verdict is Verdict.SMOOTH
