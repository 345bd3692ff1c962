"""Side by side with the reference implementations users come from: torchsort and
fast-soft-sort (each test skips when its peer is not installed; torchsort needs
``pip install --no-build-isolation torchsort`` against the installed torch).

Both peers compute the same operators as ``nonsmooth.solvers`` for L2 and KL, soft sort
and soft rank: values agree to ~1e-13 in float64. Their only direction is ascending
(torchsort) or an upper-case ``direction`` (fast-soft-sort); descending is obtained from
the ascending call on ``-x``. Gradients agree too, except KL soft sort on pooled blocks,
where the peers weight the block by softmax(rho / eps) instead of the softmax of the
sorted values (see ``test_soft_sort.py``'s KL-sort Jacobian test against finite
differences)."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nonsmooth.solvers import soft_rank, soft_sort  # noqa: E402

REGS = ["l2", "kl"]
DIRS = ["ascending", "descending"]
STRENGTHS = [0.05, 0.3, 1.0, 5.0]


def _x(seed, shape=(4, 60)):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape) * 2)


def _torchsort():
    ts = pytest.importorskip("torchsort")
    return ts


def _torchsort_call(ts, op, x, reg, eps, direction):
    """torchsort has only ascending; descending rank = rank(-x), sort = -sort(-x)."""
    if op == "rank":
        return ts.soft_rank(x if direction == "ascending" else -x, reg, eps)
    return ts.soft_sort(x, reg, eps) if direction == "ascending" else -ts.soft_sort(-x, reg, eps)


@pytest.mark.parametrize("op,reg,direction", list(itertools.product(("rank", "sort"), REGS,
                                                                     DIRS)))
def test_values_match_torchsort_in_float64(op, reg, direction):
    ts = _torchsort()
    f = soft_rank if op == "rank" else soft_sort
    for k, eps in enumerate(STRENGTHS):
        x = _x(k)
        ours = f(x, regularization=reg, regularization_strength=eps, direction=direction)
        theirs = _torchsort_call(ts, op, x, reg, eps, direction)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    # ties: both give the average rank (L2) / the same pooled block (KL)
    x = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 7.0]], dtype=torch.float64)
    ours = f(x, regularization=reg, regularization_strength=0.3, direction=direction)
    torch.testing.assert_close(ours, _torchsort_call(ts, op, x, reg, 0.3, direction),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("op,reg", [("rank", "l2"), ("rank", "kl"), ("sort", "l2")])
def test_gradients_match_torchsort_where_the_operators_agree(op, reg):
    ts = _torchsort()
    f = soft_rank if op == "rank" else soft_sort
    g = _x(99)
    for k, eps in enumerate(STRENGTHS):
        xa = _x(k).requires_grad_()
        xb = _x(k).requires_grad_()
        (f(xa, regularization=reg, regularization_strength=eps) * g).sum().backward()
        (_torchsort_call(ts, op, xb, reg, eps, "ascending") * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-9)


def test_kl_rank_is_the_operator_torchsort_users_get():
    # The case the issue was filed on: n = 1000, eps = 0.1. The old operator spanned
    # about [942, 1000]; the paper's (and torchsort's) spans [1, 1000].
    ts = _torchsort()
    x = _x(7, (1, 1000))
    ours = soft_rank(x, regularization="kl", regularization_strength=0.1)
    torch.testing.assert_close(ours, ts.soft_rank(x, "kl", 0.1), rtol=0, atol=1e-10)
    assert ours.min() == 1.0 and ours.max() == 1000.0
    assert float(ours.sum()) == pytest.approx(1000 * 1001 / 2, rel=1e-14)


@pytest.mark.parametrize("op,reg,direction", list(itertools.product(("rank", "sort"), REGS,
                                                                     DIRS)))
def test_values_match_fast_soft_sort(op, reg, direction):
    fss = pytest.importorskip("fast_soft_sort.numpy_ops")
    f = soft_rank if op == "rank" else soft_sort
    peer = fss.soft_rank if op == "rank" else fss.soft_sort
    for k, eps in enumerate(STRENGTHS):
        x = _x(k).numpy()
        ours = f(x, regularization=reg, regularization_strength=eps, direction=direction)
        theirs = peer(x, direction=direction.upper(), regularization_strength=eps,
                      regularization=reg)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
