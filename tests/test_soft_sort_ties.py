"""Ties and extreme scales: ranks stay in [1, n] and tied values stay exactly tied, for
|x| / eps up to 1e300 and in float32, L2 and KL, sort and rank, both directions, on every
backend (NumPy through the C kernel and through the NumPy fallback, torch, jax).

Oracles: exact fractions (tie groups separated by gaps far above eps pool by group, so
both L2 and KL give the average rank (first + last) / 2), the exact rational L2
projection, and the certified KL projection (``_permutahedron_oracle``)."""
import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonsmooth.reports._permutahedron_oracle import oracle
from nonsmooth.solvers import soft_rank, soft_sort
from nonsmooth.solvers import _soft_sort_core as core

REGS = ["l2", "kl"]
DIRS = ["ascending", "descending"]


def average_ranks(values, direction):
    """Exact average ranks (ties share (first + last) / 2) as Fractions."""
    key = [v if direction == "ascending" else -v for v in values]
    return [(Fraction(sum(k < v for k in key) + 1) + sum(k <= v for k in key)) / 2 for v in key]


# (values, eps, dtype): tie groups whose gaps / eps dwarf n, so every group pools alone
GROUPED = [
    ([3.0, 3.0, 1.0], 1e-16, np.float64),          # the issue's [[-1, 2, 1]]
    ([1e16, 1e16, 1e16], 1.0, np.float64),          # the issue's [1, 2, 3]
    ([1e300, -1e300, 1e300, 5.0, 5.0], 1.0, np.float64),
    ([2.0, 2.0, -2.0, 2.0, 0.0], 1e-300, np.float64),
    ([-7.5] * 6, 1e-200, np.float64),
    ([2.0 ** 24, 2.0 ** 24, 1.0], 1.0, np.float32),  # float32 failed from 2^24
    ([2.0 ** 24 + 2, 2.0 ** 24, 2.0 ** 24, 2.0 ** 24 + 2], 1e-3, np.float32),
    ([3e38, -3e38, 3e38, 0.0], 1e-30, np.float32),
    ([1.0, 1.0, 1.0, 1.0], 1e-40, np.float32),
]


def _backends():
    yield "numpy", lambda f, x, **kw: f(x, **kw)

    def fallback(f, x, **kw):
        x2 = np.ascontiguousarray(x, dtype=x.dtype)
        _, strength, _ = core.check_options(kw["regularization"],
                                            kw["regularization_strength"], kw["direction"])
        return core._forward_rows_numpy(
            x2, op="rank" if f is soft_rank else "sort", regularization=kw["regularization"],
            strength=strength, descending=kw["direction"] == "descending")[0]
    yield "numpy-fallback", fallback
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        yield "torch", lambda f, x, **kw: f(torch.from_numpy(x), **kw).numpy()

        def torch_grad_path(f, x, **kw):
            t = torch.from_numpy(x).requires_grad_()
            return f(t, **kw).detach().numpy()
        yield "torch-autograd", torch_grad_path
    try:
        import jax
    except ImportError:
        jax = None
    if jax is not None:
        def via_jax(f, x, **kw):
            with jax.enable_x64(x.dtype == np.float64):
                return np.asarray(jax.jit(lambda v: f(v, **kw))(jax.numpy.asarray(x)))
        yield "jax", via_jax


BACKENDS = list(_backends())


@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("values,eps,dtype", GROUPED)
def test_tied_groups_get_exactly_the_average_rank(backend, values, eps, dtype):
    run = dict(BACKENDS)[backend]
    x = np.array([values], dtype=dtype)
    n = len(values)
    for direction, reg in itertools.product(DIRS, REGS):
        kw = dict(regularization=reg, regularization_strength=eps, direction=direction)
        r = run(soft_rank, x, **kw)
        assert r.dtype == dtype
        assert [Fraction(float(v)) for v in r[0]] == average_ranks(values, direction), \
            (backend, reg, direction, r)
        assert r.min() >= 1 and r.max() <= n
        s = run(soft_sort, x, **kw)
        assert s.dtype == dtype
        assert s.min() >= x.min() and s.max() <= x.max()
        step = np.diff(s[0].astype(float))
        assert np.all(step >= 0) if direction == "ascending" else np.all(step <= 0)
        ref = oracle("sort", x[0].astype(float), reg, eps, direction)
        np.testing.assert_allclose(s[0].astype(float), ref,
                                   rtol=1e-12 if dtype == np.float64 else 1e-6, atol=0)


def test_the_issues_examples():
    np.testing.assert_array_equal(
        soft_rank(np.array([[3.0, 3.0, 1.0]]), regularization_strength=1e-16), [[2.5, 2.5, 1.0]])
    np.testing.assert_array_equal(soft_rank(np.array([[1e16] * 3])), [[2.0, 2.0, 2.0]])
    for scale in 2.0 ** np.arange(20, 30):
        x = np.array([[scale, scale, 1.0]], dtype=np.float32)
        for reg in REGS:
            np.testing.assert_array_equal(soft_rank(x, regularization=reg), [[2.5, 2.5, 1.0]])


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("direction", DIRS)
def test_pooled_blocks_near_huge_values_match_the_exact_projection(reg, direction):
    # Non-tied neighbours a few ulps apart at 1e16 (ulp 2): they pool and unpool exactly as
    # the projection says, which needs their differences, not x / eps - rho.
    base = 1e16
    for offsets, eps in (([0, 2, 4, 6, 8], 4.0), ([0, 2, 2, 10, 12], 3.0), ([0, 6, 2, 4], 8.0),
                         ([0, 0, 2, 4], 1.0)):
        x = base + np.array(offsets, dtype=float)
        assert np.array_equal(x - base, offsets)  # exactly representable
        want = oracle("rank", x, reg, eps, direction)
        got = soft_rank(x, regularization=reg, regularization_strength=eps, direction=direction)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        fb = core._forward_rows_numpy(x[None], op="rank", regularization=reg, strength=eps,
                                      descending=direction == "descending")[0][0]
        np.testing.assert_allclose(fb, want, rtol=0, atol=1e-12)
        want = oracle("sort", x, reg, 1 / eps, direction)
        got = soft_sort(x, regularization=reg, regularization_strength=1 / eps,
                        direction=direction)
        np.testing.assert_allclose(got - base, want - base, rtol=0, atol=4.0)  # ulp 2


_scales = st.sampled_from([1.0, 1e8, 1e16, 1e100, 1e300])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=9), _scales,
       st.sampled_from([1e-300, 1e-16, 1e-3, 1.0, 1e3]), st.sampled_from(REGS),
       st.sampled_from(DIRS), st.sampled_from([np.float64, np.float32]))
def test_ties_stay_tied_and_ranks_in_range_at_every_scale(ints, scale, eps, reg, direction,
                                                           dtype):
    if dtype == np.float32:
        scale = min(scale, 1e30)
    x = np.array([ints], dtype=float) * scale
    x = x.astype(dtype)
    if float(np.max(np.abs(x))) / eps >= np.finfo(np.float64).max / 8:
        return  # refused with a clear error (tested elsewhere)
    n = len(ints)
    kw = dict(regularization=reg, regularization_strength=eps, direction=direction)
    r = soft_rank(x, **kw)[0]
    s = soft_sort(x, **kw)[0]
    assert r.min() >= 1 and r.max() <= n
    assert abs(float(r.astype(float).sum()) - n * (n + 1) / 2) <= 1e-6 * n * n
    for v in set(ints):
        tied = r[np.array(ints) == v]
        assert np.all(tied == tied[0])  # exactly tied
    assert s.min() >= x.min() and s.max() <= x.max()
    # The fallback makes the same decisions.
    fb = core._forward_rows_numpy(np.ascontiguousarray(x), op="rank", regularization=reg,
                                  strength=eps, descending=direction == "descending")[0][0]
    np.testing.assert_allclose(fb, r, rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_gradients_at_ties_are_finite_and_symmetric(reg):
    # A tied block at |x| / eps = 1e16: the Jacobian is a (I - 1 p^T)-type block with
    # p uniform, so tied entries get the same gradient.
    torch = pytest.importorskip("torch")
    x = torch.tensor([[1e16, 1e16, 1e16 - 1e3]], dtype=torch.float64, requires_grad=True)
    r = soft_rank(x, regularization=reg, regularization_strength=1.0)
    (r * torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)).sum().backward()
    g = x.grad[0]
    assert torch.isfinite(g).all()
    # The tied pair holds ranks 2 and 3 (S_B = 5, p = (1/2, 1/2), alpha = 1): L2 gives
    # (I - 1 1^T / 2) [3, 1] = (1, -1); KL gives S_B (diag p - p p^T) [3, 1] = 2.5 (1, -1).
    assert g[0] == -g[1] and g[2] == 0
    assert g[0] == pytest.approx(-1.0 if reg == "l2" else -2.5, rel=1e-15)
