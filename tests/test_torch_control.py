"""torch.cond in audited programs, against the same program spelled with torch.where.

Oracle: ``torch.cond(p, t, f, ops)`` computes exactly ``torch.where(p, t(ops), f(ops))``
where both branches are finite, so the audit must give the same verdict and the same
B-subdifferential for both spellings; the sets themselves are checked by hand-derived
closed forms (one-sided slopes of each branch).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nonsmooth.conservative import Verdict, audit  # noqa: E402


def t64(*v):
    return torch.tensor(v, dtype=torch.float64)


def as_set(B):
    return {tuple(np.round(J.ravel(), 12)) for J in B}


def both(true_fn, false_fn):
    def with_cond(x):
        return torch.cond(x.sum() > 0, true_fn, false_fn, (x,))

    def with_where(x):
        return torch.where(x.sum() > 0, true_fn(x), false_fn(x))

    return with_cond, with_where


CASES = [
    # (true branch, false branch, x, verdict, B-subdifferential by hand)
    (lambda v: 2 * v, lambda v: -v, 0.0, Verdict.CLARKE, {(2.0,), (-1.0,)}),  # a kink at the boundary
    (lambda v: torch.relu(v - 1), lambda v: torch.abs(v + 1), 1.0, Verdict.CLARKE, {(0.0,), (1.0,)}),
    (lambda v: torch.relu(v - 1), lambda v: torch.abs(v + 1), -1.0, Verdict.CLARKE, {(-1.0,), (1.0,)}),
    (lambda v: torch.relu(v - 1), lambda v: torch.abs(v + 1), 0.5, Verdict.SMOOTH, {(0.0,)}),
    (lambda v: v * v, lambda v: v * 0, 0.0, None, {(0.0,)}),  # C^1 across the boundary
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cond_matches_its_where_spelling_and_the_closed_form(case):
    tf, ff, x, verdict, B = CASES[case]
    f_cond, f_where = both(tf, ff)
    a, b = audit(f_cond, t64(x)), audit(f_where, t64(x))
    assert a.verdict is b.verdict
    if verdict is not None:
        assert a.verdict is verdict
    assert a.exact and b.exact
    assert as_set(a.b_subdifferential) == as_set(b.b_subdifferential) == B


def test_cond_with_jumping_branches_is_not_lipschitz():
    f_cond, f_where = both(lambda v: v + 1.0, lambda v: v * 1.0)
    a, b = audit(f_cond, t64(0.0)), audit(f_where, t64(0.0))
    assert a.verdict is b.verdict is Verdict.NOT_LIPSCHITZ


def test_cond_untaken_branch_nan_does_not_leak():
    # sqrt of a negative number in the untaken branch: NaN there, never in f
    f_cond, _ = both(lambda v: torch.sqrt(v), lambda v: v * 0)
    a = audit(f_cond, t64(-1.0))
    assert a.verdict is Verdict.SMOOTH and as_set(a.b_subdifferential) == {(0.0,)}


def test_nested_cond_and_a_spurious_zero_inside_the_taken_branch():
    # x > 0 false at 0, so the inner cond runs: relu(v) - relu(-v) = v there, AD says 0
    def f(x):
        inner = lambda v: torch.cond(v.sum() > -1, lambda u: torch.relu(u) - torch.relu(-u),  # noqa: E731
                                     lambda u: u * 1, (v,))
        return torch.cond(x.sum() > 0, lambda v: v * 1, inner, (x,))

    a = audit(f, t64(0.0))
    assert a.verdict is Verdict.SPURIOUS and a.exact
    assert as_set(a.b_subdifferential) == {(1.0,)} and a.ad_jacobian.ravel().tolist() == [0.0]


def test_torch_while_loop_is_undecided_with_a_reason():
    from torch._higher_order_ops import while_loop

    def f(x):
        return while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 2), (torch.tensor(0), x))[1]

    a = audit(f, t64(1.0))
    assert a.verdict is Verdict.UNDECIDED and "while_loop" in a.reason and "jax" in a.reason
