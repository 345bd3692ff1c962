"""The audit engine through soft sort and soft rank (L2 and KL, both directions, every path).

Oracles: a textbook soft sort/rank (``_layer_oracles.soft_reference``, plain PAV, no shared
code with the solver) differentiated by float64 central differences at random points
around x, where no kink is active: at a kink the set of those piece Jacobians must equal
the engine's B-subdifferential, and away from kinks its single Jacobian must equal the
reported one.  Closed forms for n = 2: the pieces of L2 soft rank are ``I - 11^T/2`` over
eps (pooled) and 0 (hard ranks); of L2 soft sort ``11^T/2`` and the permutation.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from _layer_oracles import LOG2, fd_jacobian, same_sets, sampled_pieces, soft_reference

os.environ.setdefault("NONSMOOTH_ENGINE_DEBUG", "1")

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from nonsmooth.conservative import Verdict, audit, clarke_jacobian  # noqa: E402
from nonsmooth.conservative._result import ClarkeSet  # noqa: E402
from nonsmooth.solvers import soft_rank, soft_sort  # noqa: E402

FNS = {"rank": soft_rank, "sort": soft_sort}


def _arr(fw, x):
    if fw == "torch":
        return torch.tensor(x, dtype=torch.float64)
    with jax.enable_x64(True):
        return jnp.asarray(np.asarray(x, dtype=np.float64))


def _audit(fw, f, x):
    if fw == "jax":
        with jax.enable_x64(True):
            return audit(f, _arr(fw, x))
    return audit(f, _arr(fw, x))


def _ref(op, reg, eps, direction):
    return lambda v: soft_reference(v, op=op, reg=reg, eps=eps, direction=direction)


@pytest.mark.parametrize("fw", ["torch", "jax"])
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_issue_kink_n2_eps1_gap1(fw, op):
    """The issue's case: n = 2, eps = 1, |x1 - x2| = 1 is where the partition changes."""
    x = [0.0, 1.0]
    a = _audit(fw, lambda v: FNS[op](v, regularization_strength=1.0), x)
    assert a.verdict is Verdict.CLARKE and a.exact
    half = np.full((2, 2), 0.5)
    pooled = np.eye(2) - half if op == "rank" else half
    hard = np.zeros((2, 2)) if op == "rank" else np.eye(2)
    assert same_sets(a.b_subdifferential, [pooled, hard], 1e-12)
    assert same_sets(a.b_subdifferential, sampled_pieces(_ref(op, "l2", 1.0, "ascending"), np.array(x)), 1e-5)


@pytest.mark.parametrize("fw", ["torch", "jax"])
@pytest.mark.parametrize("op", ["rank", "sort"])
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("direction", ["ascending", "descending"])
def test_generic_point_is_smooth_with_the_central_difference_jacobian(fw, op, reg, direction):
    x = np.array([0.31, 1.23, -0.47, 0.82])
    eps = 0.7
    a = _audit(fw, lambda v: FNS[op](v, regularization=reg, regularization_strength=eps, direction=direction), x)
    assert a.verdict is Verdict.SMOOTH, a.explain()
    J = fd_jacobian(_ref(op, reg, eps, direction), x, 1e-6)
    np.testing.assert_allclose(a.b_subdifferential[0], J, atol=1e-7)
    np.testing.assert_allclose(a.ad_jacobian, J, atol=1e-7)


# kinks for each case: (op, reg, eps, x) with a partition change at x
KINKS = [
    ("rank", "l2", 1.0, [0.0, 1.0, 2.0]),       # both cuts tight: four candidate partitions
    ("rank", "l2", 0.5, [0.3, -0.2, 1.5]),      # gap 0.5 = eps between the two smallest
    ("sort", "l2", 1.0, [2.0, 0.0, 1.0]),       # both cuts tight
    ("rank", "kl", 1.0, [0.0, LOG2]),           # KL rank pools at gap eps * log 2
    ("sort", "kl", 1.0, [1.0, 0.0]),            # KL sort pools at gap eps
    ("rank", "kl", 1.0, [0.5, 0.5 + LOG2, 3.0]),
]


@pytest.mark.parametrize("fw", ["torch", "jax"])
@pytest.mark.parametrize("direction", ["ascending", "descending"])
@pytest.mark.parametrize("op,reg,eps,x", KINKS)
def test_partition_change_against_one_sided_pieces(fw, direction, op, reg, eps, x):
    """At a partition change the B-set is exactly the set of Jacobians of the pieces
    around x (central differences of the textbook operator at nearby points), and AD lies
    in its hull."""
    x = np.array(x) if direction == "ascending" else -np.array(x)
    a = _audit(fw, lambda v: FNS[op](v, regularization=reg, regularization_strength=eps, direction=direction), x)
    assert a.verdict is Verdict.CLARKE, a.explain()
    assert any(k.primitive == f"soft_{op}" for k in a.active_kinks)
    tol = 1e-5 if reg == "l2" else 2e-3  # KL pieces curve: their Jacobians move O(t) near x
    pieces = sampled_pieces(_ref(op, reg, eps, direction), x, n_samples=400, t=1e-4 if reg == "l2" else 1e-6,
                            h=1e-7 if reg == "l2" else 1e-9, tol=tol)
    assert same_sets(a.b_subdifferential, pieces, tol), (a.b_subdifferential, pieces)
    if reg == "l2":
        assert a.exact


def test_l2_rank_four_pieces_at_two_tight_cuts():
    a = _audit("torch", lambda v: soft_rank(v, regularization_strength=1.0), [0.0, 1.0, 2.0])
    assert len(a.b_subdifferential) == 4 and a.exact


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_relu_of_soft_sort_is_decided(fw):
    relu = torch.relu if fw == "torch" else jax.nn.relu
    x = [-0.5, 0.5]  # a partition change, and the pooled output (0, 0) sits at relu's kink
    a = _audit(fw, lambda v: relu(soft_sort(v, regularization_strength=1.0)), x)
    assert a.verdict is Verdict.CLARKE and a.exact
    ref = lambda v: np.maximum(soft_reference(v, op="sort", eps=1.0), 0.0)  # noqa: E731
    assert same_sets(a.b_subdifferential, sampled_pieces(ref, np.array(x), n_samples=600), 1e-5)
    b = _audit(fw, lambda v: relu(soft_sort(v, regularization_strength=1.0)), [0.3, 2.0])
    assert b.verdict is Verdict.SMOOTH


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_ties_in_hard_sort_regime_are_kinks_of_sort_not_of_rank(fw):
    x = [1.0, 1.0, -2.0]
    a = _audit(fw, lambda v: soft_sort(v, regularization_strength=0.1), x)
    assert a.verdict is Verdict.CLARKE
    assert same_sets(a.b_subdifferential, sampled_pieces(_ref("sort", "l2", 0.1, "ascending"), np.array(x)), 1e-5)
    assert len(a.b_subdifferential) == 2
    b = _audit(fw, lambda v: soft_rank(v, regularization_strength=0.1), x)  # tied values pool: smooth
    assert b.verdict is Verdict.SMOOTH


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_rows_are_independent(fw):
    x = np.array([[0.0, 1.0], [0.2, 1.7]])  # row 0 at its kink, row 1 generic
    a = _audit(fw, lambda v: soft_rank(v, regularization_strength=1.0), x)
    assert a.verdict is Verdict.CLARKE
    assert [k.detail.split(":")[0] for k in a.active_kinks] == ["soft_rank row 0"]
    assert same_sets(a.b_subdifferential, sampled_pieces(_ref("rank", "l2", 1.0, "ascending"), x), 1e-5)


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_every_torch_path_gives_an_element_of_the_clarke_jacobian(reg):
    """The lean CPU fast path, the eager autograd.Function and the custom op (what
    torch.compile runs) each return a gradient in the hull the engine reports; the custom
    op called directly is traced to the same node."""
    x = np.array([0.0, 1.0] if reg == "l2" else [0.0, LOG2])
    f = lambda v: soft_rank(v, regularization=reg, regularization_strength=1.0)  # noqa: E731
    C = clarke_jacobian(f, _arr("torch", x))
    op = lambda v: torch.ops.nonsmooth.soft_sort_rank(v, 1.0, reg, True, False)[0]  # noqa: E731
    C_op = clarke_jacobian(op, _arr("torch", x))
    assert same_sets(C.vertices, C_op.vertices, 1e-12) and len(C.vertices) == 2

    def jac(fn, t):
        return np.stack([torch.autograd.grad(fn(t)[i], t, retain_graph=True)[0].numpy() for i in range(2)])

    fast = jac(f, torch.tensor(x, requires_grad=True))                          # _SoftSortRankCPU
    strided = torch.tensor(np.stack([x, x], 1), requires_grad=True)
    eager = jac(lambda t: f(t[:, 0]), strided)[:, :, 0]                          # non-contiguous: _SoftSortRankEager
    custom = jac(op, torch.tensor(x, requires_grad=True))                        # nonsmooth::soft_sort_rank
    for J in (fast, eager, custom):
        assert ClarkeSet(C.vertices, True).contains(J, tol=1e-9), J


def test_jax_custom_jvp_gradient_is_in_the_hull():
    x = np.array([0.0, 1.0])
    with jax.enable_x64(True):
        C = clarke_jacobian(lambda v: soft_sort(v, regularization_strength=1.0), jnp.asarray(x))
        J = np.asarray(jax.jacrev(lambda v: soft_sort(v, regularization_strength=1.0))(jnp.asarray(x)))
        Jf = np.asarray(jax.jacfwd(jax.jit(lambda v: soft_sort(v, regularization_strength=1.0)))(jnp.asarray(x)))
    assert ClarkeSet(C.vertices, True).contains(J, tol=1e-9) and ClarkeSet(C.vertices, True).contains(Jf, tol=1e-9)


def test_user_ad_is_untouched_by_the_engine():
    """After an audit, soft sort still runs its own code path (no engine node)."""
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    audit(lambda v: soft_rank(v, regularization_strength=1.0), x.detach())
    y = soft_rank(x, regularization_strength=1.0)
    assert "SoftSortRank" in type(y.grad_fn).__name__


def test_float32_input_audits_in_float64():
    a = audit(lambda v: soft_rank(v, regularization_strength=1.0), torch.tensor([0.0, 1.0]))
    assert a.verdict is Verdict.CLARKE


def test_jax_vmap_inside_f_is_one_more_batch_axis():
    f = lambda v: jax.vmap(lambda r: soft_rank(r, regularization_strength=1.0))(v)  # noqa: E731
    a = _audit("jax", f, [[0.0, 1.0], [0.2, 1.7]])
    b = _audit("jax", lambda v: soft_rank(v, regularization_strength=1.0), [[0.0, 1.0], [0.2, 1.7]])
    assert a.verdict is b.verdict is Verdict.CLARKE
    assert same_sets(a.b_subdifferential, b.b_subdifferential, 1e-12)
