"""PAV isotonic regression: L2 against SciPy, KL against a brute-force convex solve,
block structure, both backends, edge cases and bad input."""
import os

import numpy as np
import pytest
import scipy.optimize as so
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nonsmooth.solvers import _isotonic
from nonsmooth.solvers import isotonic_regression, pav_backend
from nonsmooth.solvers._isotonic import _pav_rows_numpy, pav_rows

HAS_C = _isotonic._ext is not None
BACKENDS = ["numpy"] + (["c"] if HAS_C else [])


def _run(backend, y, w=None, kind="l2"):
    if backend == "numpy":
        return _pav_rows_numpy(y, w, kind=kind)
    return _isotonic._pav_rows_c(y, w, kind=kind)


def _scipy_rows(y, w=None, increasing=False):
    return np.stack([
        so.isotonic_regression(y[r], weights=None if w is None else w[r],
                               increasing=increasing).x
        for r in range(y.shape[0])
    ])


def _lse(a):
    m = np.max(a)
    return m + np.log(np.sum(np.exp(a - m)))


def _blocks_from_starts(block_row):
    """Groups of indices sharing a block start."""
    groups = {}
    for i, s in enumerate(block_row):
        groups.setdefault(int(s), []).append(i)
    return [groups[s] for s in sorted(groups)]


def _assert_block_structure(v, block, y, w, kind):
    """Blocks are contiguous, start at their own index, hold the closed-form value,
    and values decrease strictly from block to block."""
    for r in range(y.shape[0]):
        groups = _blocks_from_starts(block[r])
        prev = np.inf
        for g in groups:
            assert g == list(range(g[0], g[-1] + 1)), "block is not contiguous"
            assert block[r, g[0]] == g[0]
            vals = v[r, g]
            assert np.all(vals == vals[0]), "value not constant within a block"
            if kind == "l2":
                ww = np.ones(len(g)) if w is None else w[r, g].astype(np.float64)
                expect = np.sum(ww * y[r, g].astype(np.float64)) / np.sum(ww)
            else:
                expect = _lse(y[r, g].astype(np.float64)) - _lse(w[r, g].astype(np.float64))
            tol = 1e-12 if v.dtype == np.float64 else 1e-6
            assert abs(vals[0] - expect) <= tol * max(1.0, abs(expect))
            assert vals[0] < prev, "block values must decrease strictly"
            prev = vals[0]


# --------------------------------------------------------------------------- L2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_l2_rows_match_scipy(backend, dtype, weighted):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(40, 57)).astype(dtype)
    w = rng.uniform(0.05, 4.0, size=y.shape).astype(dtype) if weighted else None
    v, block = _run(backend, y, w)
    assert v.dtype == dtype and v.shape == y.shape
    assert block.dtype == np.int64 and block.shape == y.shape
    ref = _scipy_rows(y.astype(np.float64), None if w is None else w.astype(np.float64))
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(v, ref, rtol=tol, atol=tol)
    _assert_block_structure(v, block, y, w, "l2")


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 3, 13)])
def test_isotonic_regression_batched_weighted_matches_scipy(increasing, shape):
    rng = np.random.default_rng(2)
    y = rng.normal(size=shape)
    w = rng.uniform(0.1, 3.0, size=shape)
    out = isotonic_regression(y, weights=w, increasing=increasing)
    assert out.shape == shape and out.dtype == np.float64
    ref = _scipy_rows(y.reshape(-1, shape[-1]), w.reshape(-1, shape[-1]), increasing)
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12)


def test_isotonic_regression_lists_ints_and_dtypes():
    assert isotonic_regression([3, 1, 2]).dtype == np.float64
    # byte-swapped input is converted, not rejected, by the public function
    np.testing.assert_array_equal(isotonic_regression(np.array([3.0, 1.0, 2.0], dtype=">f8")),
                                  [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(isotonic_regression([3, 1, 2]), [2.0, 2.0, 2.0])
    y32 = np.array([[0.5, 0.25, 1.0]], dtype=np.float32)
    out = isotonic_regression(y32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.375, 0.375, 1.0]], rtol=0, atol=0)
    out16 = isotonic_regression(y32.astype(np.float16), increasing=False)
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16, np.full((1, 3), np.float16(np.float32(1.75) / 3)))


def test_weights_broadcast_and_overflowing_totals():
    y = np.array([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    w = np.array([1.0, 2.0, 1.0])
    out = isotonic_regression(y, weights=w)
    ref = _scipy_rows(y, np.broadcast_to(w, y.shape), increasing=True)
    np.testing.assert_allclose(out, ref, rtol=1e-14)
    # float32 data with weights beyond float32's range: computed in float64, cast back.
    y32 = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    w_wide = np.array([1e-50, 1.0, 1e-60])
    out = isotonic_regression(y32, weights=w_wide)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, so.isotonic_regression(y32.astype(float), weights=w_wide).x,
                               rtol=1e-7)
    # Totals overflow float64 but the ratios are fine: the answer is scale-invariant.
    big = np.array([1e308, 1e308, 1e308])
    np.testing.assert_allclose(isotonic_regression(y, weights=big),
                               isotonic_regression(y), rtol=1e-14)


def test_huge_l2_values_float64():
    y = np.array([[1e300, -1e300, 1e300, -1e300], [-1.7e308, 1.7e308, 0.0, 1.0]])
    for backend in BACKENDS:
        v, block = _run(backend, y)
        assert np.all(np.isfinite(v))
        np.testing.assert_allclose(v[0], [1e300, 0.0, 0.0, -1e300], rtol=1e-15, atol=1e285)
        # Mean of -1.7e308 and 1.7e308 is 0 (their sum would be fine, their difference overflows).
        assert v[1, 0] == v[1, 1] == v[1, 2] and abs(v[1, 0]) < 1e-300 + 1.0
        np.testing.assert_array_equal(block[1], [0, 0, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_rows(backend, dtype):
    # n = 1
    v, block = _run(backend, np.array([[2.5], [-1.0]], dtype=dtype))
    np.testing.assert_array_equal(v, [[2.5], [-1.0]])
    np.testing.assert_array_equal(block, [[0], [0]])
    # all-equal rows pool into one block and keep the value exactly
    y = np.full((3, 9), 0.1, dtype=dtype)
    v, block = _run(backend, y)
    np.testing.assert_array_equal(v, y)
    np.testing.assert_array_equal(block, np.zeros_like(block))
    # ties between blocks are pooled: values decrease strictly across blocks
    y = np.array([[3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0]], dtype=dtype)
    v, block = _run(backend, y)
    np.testing.assert_array_equal(v, y)
    np.testing.assert_array_equal(block, [[0, 1, 1, 3, 3, 3, 6]])
    # already strictly decreasing: every element is its own block
    y = np.arange(10, 0, -1, dtype=dtype)[None]
    v, block = _run(backend, y)
    np.testing.assert_array_equal(v, y)
    np.testing.assert_array_equal(block[0], np.arange(10))
    # strictly increasing: one block, the mean
    y = np.arange(10, dtype=dtype)[None]
    v, block = _run(backend, y)
    np.testing.assert_allclose(v, np.full_like(y, 4.5))
    np.testing.assert_array_equal(block, np.zeros_like(block))


# --------------------------------------------------------------------------- KL


def _kl_objective(v, y, w):
    return np.sum(np.exp(y - v)) + np.sum(np.exp(w) * v)


def _kl_brute_force(y, w):
    """Solve the KL isotonic problem directly in float64 with L-BFGS-B.

    Parametrize v_i = c + sum_{j >= i} d_j with gaps d_j >= 0 (j < n), which turns the
    monotonicity constraints into simple bounds.
    """
    n = len(y)
    T = np.triu(np.ones((n, n)))  # v = T @ [d_0, ..., d_{n-2}, c]

    def f(z):
        v = T @ z
        g_v = -np.exp(y - v) + np.exp(w)
        return _kl_objective(v, y, w), T.T @ g_v

    bounds = [(0.0, None)] * (n - 1) + [(None, None)]
    z0 = np.zeros(n)
    z0[-1] = np.log(np.exp(y).sum() / np.exp(w).sum())
    res = so.minimize(f, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
    assert res.success, res.message
    return T @ res.x


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_matches_brute_force_convex_solve(backend):
    rng = np.random.default_rng(3)
    for _ in range(12):
        n = int(rng.integers(2, 8))
        y = rng.normal(size=(1, n))
        w = rng.normal(size=(1, n))
        v, block = _run(backend, y, w, kind="kl")
        ref = _kl_brute_force(y[0], w[0])
        f_pav, f_ref = _kl_objective(v[0], y[0], w[0]), _kl_objective(ref, y[0], w[0])
        assert f_pav <= f_ref + 1e-9 * max(1.0, abs(f_ref))
        np.testing.assert_allclose(v[0], ref, atol=1e-5)
        _assert_block_structure(v, block, y, w, "kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kl_large_exponents_no_overflow(backend, dtype):
    # exp(1e3) overflows float64; the log-domain pooling must not.
    y = np.array([[1000.0, 1001.0, 999.0, -1000.0, 2000.0]], dtype=dtype)
    w = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=dtype)
    v, block = _run(backend, y, w, kind="kl")
    assert np.all(np.isfinite(v))
    assert np.all(np.diff(v[0]) <= 0)
    _assert_block_structure(v, block, y, w, "kl")
    # Shift equivariance v(y - c) = v(y) - c (the shift is exact in both dtypes).
    v2, block2 = _run(backend, y - dtype(1000.0), w, kind="kl")
    np.testing.assert_array_equal(block2, block)
    np.testing.assert_allclose(v2.astype(np.float64) + 1000.0, v, rtol=1e-6)


def test_kl_shift_equivariance_on_huge_values():
    """v(y + c) = v(y) + c; checked far beyond exp's range."""
    rng = np.random.default_rng(4)
    y = rng.normal(size=(5, 30))
    w = rng.normal(size=(5, 30))
    v, block = pav_rows(y, w, kind="kl")
    v_big, block_big = pav_rows(y + 1e6, w, kind="kl")
    np.testing.assert_array_equal(block, block_big)
    np.testing.assert_allclose(v_big - 1e6, v, atol=1e-9)


# --------------------------------------------------------------------------- backends


@pytest.mark.skipif(not HAS_C, reason="C extension not built")
@pytest.mark.parametrize("kind", ["l2", "kl"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_c_and_numpy_backends_agree(kind, dtype):
    rng = np.random.default_rng(5)
    # Rounded values force many exact ties, where the two paths could diverge.
    y = np.round(rng.normal(size=(30, 200)) * 4) / 4
    y = y.astype(dtype)
    w = (rng.uniform(0.5, 2.0, size=y.shape) if kind == "l2" else rng.normal(size=y.shape))
    w = np.round(w * 4).astype(dtype) / 4 if kind == "kl" else w.astype(dtype)
    for ww in ([None, w] if kind == "l2" else [w]):
        vc, bc = _isotonic._pav_rows_c(y, ww, kind=kind)
        vn, bn = _pav_rows_numpy(y, ww, kind=kind)
        np.testing.assert_array_equal(bc, bn)
        np.testing.assert_allclose(vc, vn, rtol=1e-12, atol=1e-12)


def test_c_backend_in_use():
    """CI must fail when the C extension did not build (unless explicitly allowed)."""
    if os.environ.get("NONSMOOTH_ALLOW_NO_EXT") == "1":
        pytest.skip("NONSMOOTH_ALLOW_NO_EXT=1")
    assert pav_backend() == "c"


# --------------------------------------------------------------------------- bad input


def test_pav_rows_rejects_bad_input():
    y = np.ones((2, 3))
    with pytest.raises(ValueError, match="kind"):
        pav_rows(y, kind="l1")
    with pytest.raises(TypeError, match="`y`.*NumPy"):
        pav_rows([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        pav_rows(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="native dtype float32 or float64.*>f8"):
        pav_rows(np.ones((2, 3), dtype=">f8"))
    with pytest.raises(ValueError, match="2-D.*\\(3,\\)"):
        pav_rows(np.ones(3))
    with pytest.raises(ValueError, match="empty"):
        pav_rows(np.ones((2, 0)))
    with pytest.raises(ValueError, match="C-contiguous"):
        pav_rows(np.ones((3, 4))[:, ::2])
    with pytest.raises(ValueError, match="`y` must be finite.*nan"):
        pav_rows(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="`w` must be finite.*inf"):
        pav_rows(y, np.full((2, 3), np.inf), kind="kl")
    with pytest.raises(ValueError, match="`w` is required"):
        pav_rows(y, kind="kl")
    with pytest.raises(ValueError, match="shape"):
        pav_rows(y, np.ones((3, 2)))
    with pytest.raises(TypeError, match="dtype of `y`"):
        pav_rows(y, np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="positive.*-1"):
        pav_rows(y, -np.ones((2, 3)))


def test_isotonic_regression_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        isotonic_regression([])
    with pytest.raises(ValueError, match="empty"):
        isotonic_regression(np.ones((0, 4)))
    with pytest.raises(ValueError, match="scalar"):
        isotonic_regression(3.0)
    with pytest.raises(ValueError, match="`y` must be finite.*nan"):
        isotonic_regression([1.0, float("nan")])
    with pytest.raises(ValueError, match="`y` must be finite.*inf"):
        isotonic_regression([[1.0, 2.0], [float("-inf"), 0.0]])
    with pytest.raises(ValueError, match="`weights` must be finite"):
        isotonic_regression([1.0, 2.0], weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="`weights` must be positive.*0"):
        isotonic_regression([1.0, 2.0], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="`weights` must have the shape"):
        isotonic_regression([1.0, 2.0], weights=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="`y`.*complex"):
        isotonic_regression(np.ones(3, dtype=complex))
    with pytest.raises(TypeError, match="`y`.*bool"):
        isotonic_regression(np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="`y`"):
        isotonic_regression(["a", "b"])


def test_numpy_fallback_does_not_hang_on_nan():
    """If NaN slips past validation, PAV still terminates (NaN compares false)."""
    y = np.array([[1.0, np.nan, 3.0, 2.0]])
    for backend in BACKENDS:
        v, block = _run(backend, y)
        assert v.shape == y.shape
        v, block = _run(backend, y, np.zeros_like(y), kind="kl")
        assert v.shape == y.shape


# --------------------------------------------------------------------------- properties


rows_strategy = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=25),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(y=rows_strategy, data=st.data())
def test_l2_properties_kkt_and_scipy(y, data):
    w = data.draw(hnp.arrays(np.float64, y.shape,
                             elements=st.floats(1e-3, 1e3, allow_nan=False)))
    v, block = pav_rows(y, w)
    assert np.all(np.diff(v, axis=1) <= 0)
    # KKT for weighted isotonic L2: within a block the weighted residual sums to 0 and
    # every prefix of the block has a non-positive weighted residual sum (else it would
    # split off) -- checked via the block-mean formula and monotonicity.
    scale = max(1.0, float(np.max(np.abs(y))))
    for r in range(y.shape[0]):
        for g in _blocks_from_starts(block[r]):
            res = w[r, g] * (y[r, g] - v[r, g])
            assert abs(res.sum()) <= 1e-9 * scale * w[r, g].sum()
            prefix = np.cumsum(res)[:-1]
            assert np.all(prefix <= 1e-9 * scale * w[r, g].sum())
    np.testing.assert_allclose(v, _scipy_rows(y, w), rtol=1e-9, atol=1e-9 * scale)


@settings(max_examples=40, deadline=None)
@given(y=rows_strategy, data=st.data())
def test_kl_properties(y, data):
    w = data.draw(hnp.arrays(np.float64, y.shape,
                             elements=st.floats(-50, 50, allow_nan=False)))
    y = np.clip(y, -700, 700)
    v, block = pav_rows(y, w, kind="kl")
    assert np.all(np.isfinite(v))
    assert np.all(np.diff(v, axis=1) <= 0)
    _assert_block_structure(v, block, y, w, "kl")
    np.testing.assert_array_equal(block, _pav_rows_numpy(y, w, kind="kl")[1])


# --------------------------------------------------------------------------- Jacobians


def _jacobian_from_blocks(y, w, block, kind):
    """The block-diagonal Jacobians the module docstring promises, built from `block`."""
    n = y.size
    J_y, J_w = np.zeros((n, n)), np.zeros((n, n))
    for g in _blocks_from_starts(block):
        g = np.array(g)
        if kind == "l2":
            J_y[np.ix_(g, g)] = w[g] / w[g].sum()
        else:
            sy = np.exp(y[g] - y[g].max())
            sw = np.exp(w[g] - w[g].max())
            J_y[np.ix_(g, g)] = sy / sy.sum()
            J_w[np.ix_(g, g)] = -sw / sw.sum()
    return J_y, J_w


@pytest.mark.parametrize("kind", ["l2", "kl"])
def test_documented_jacobians_match_finite_differences(kind):
    """dv/dy and dv/dw from the block indices vs float64 central differences."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(20):
        n = 12
        y = rng.normal(size=n) * 2
        w = rng.uniform(0.5, 2.0, size=n) if kind == "l2" else rng.normal(size=n)
        v, block = pav_rows(y[None], w[None], kind=kind)
        vals = np.unique(v)
        if len(vals) > 1 and np.min(np.diff(vals)) < 1e-3:
            continue  # too close to a tie for finite differences to see one piece
        J_y, J_w = _jacobian_from_blocks(y, w, block[0], kind)
        h = 1e-6
        for i in range(n):
            e = np.zeros(n)
            e[i] = h
            fd_y = (pav_rows((y + e)[None], w[None], kind=kind)[0][0]
                    - pav_rows((y - e)[None], w[None], kind=kind)[0][0]) / (2 * h)
            np.testing.assert_allclose(fd_y, J_y[:, i], atol=1e-7)
            if kind == "kl":
                fd_w = (pav_rows(y[None], (w + e)[None], kind=kind)[0][0]
                        - pav_rows(y[None], (w - e)[None], kind=kind)[0][0]) / (2 * h)
                np.testing.assert_allclose(fd_w, J_w[:, i], atol=1e-7)
        checked += 1
    assert checked >= 10


def test_importing_solvers_loads_neither_torch_nor_jax():
    import subprocess
    import sys

    code = ("import sys; from nonsmooth.solvers import isotonic_regression, pav_backend; "
            "isotonic_regression([2.0, 1.0]); pav_backend(); "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples_hold():
    import doctest

    result = doctest.testmod(_isotonic, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0
