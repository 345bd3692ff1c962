"""The C kernel's own contract: buffer validation before any memory is touched,
plain buffer-protocol inputs (no NumPy needed), in-place use, threads, NaN safety."""
import array
import threading

import numpy as np
import pytest

from nonsmooth.solvers import _isotonic
from nonsmooth.solvers._isotonic import _pav_rows_numpy

ext = _isotonic._ext
pytestmark = pytest.mark.skipif(ext is None, reason="C extension not built")


def _outs(y):
    return np.empty_like(y), np.empty(y.shape, dtype=np.int64)


@pytest.mark.parametrize("fn", ["l2", "kl"])
def test_validation_messages_name_the_argument(fn):
    f = getattr(ext, fn)
    y = np.ones((2, 3))
    w = np.ones((2, 3))
    v, b = _outs(y)
    with pytest.raises(ValueError, match="y must be 2-D"):
        f(np.ones(3), w, v, b)
    with pytest.raises(ValueError, match="y must be C-contiguous"):
        f(np.ones((2, 6))[:, ::2], w, v, b)
    with pytest.raises(ValueError, match="w must be C-contiguous"):
        f(y, np.ones((3, 2)).T, v, b)
    with pytest.raises(TypeError, match="y must be float32 or float64, got int64"):
        f(np.ones((2, 3), dtype=np.int64), w, v, b)
    with pytest.raises(TypeError, match="y must hold native.*'i'"):
        f(np.ones((2, 3), dtype=np.int32), w, v, b)
    with pytest.raises(TypeError, match="y must hold native"):
        f(np.ones((2, 3), dtype=">f8"), w, v, b)
    with pytest.raises(TypeError, match="y must support the buffer protocol.*list"):
        f([[1.0, 2.0]], w, v, b)
    with pytest.raises(TypeError, match="w must have y's dtype float64, got float32"):
        f(y, w.astype(np.float32), v, b)
    with pytest.raises(ValueError, match=r"w must have y's shape \(2, 3\), got \(3, 2\)"):
        f(y, np.ones((3, 2)), v, b)
    with pytest.raises(TypeError, match="out_v must have y's dtype"):
        f(y, w, np.zeros((2, 3), dtype=np.float32), b)
    with pytest.raises(ValueError, match="out_v must have y's shape"):
        f(y, w, np.empty((2, 4)), b)
    ro = np.empty_like(y)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out_v must be writable"):
        f(y, w, ro, b)
    with pytest.raises(TypeError, match="out_block must be int64, got float64"):
        f(y, w, v, np.empty((2, 3)))
    with pytest.raises(ValueError, match="out_block must have y's shape"):
        f(y, w, v, np.empty((1, 3), dtype=np.int64))
    with pytest.raises(TypeError):
        f(y, w, v)  # wrong arity


def test_kl_requires_w_and_l2_accepts_none():
    y = np.array([[1.0, 2.0]])
    v, b = _outs(y)
    with pytest.raises(TypeError, match="w is required"):
        ext.kl(y, None, v, b)
    ext.l2(y, None, v, b)
    np.testing.assert_array_equal(v, [[1.5, 1.5]])
    np.testing.assert_array_equal(b, [[0, 0]])


def test_failed_validation_leaves_outputs_untouched():
    y = np.array([[1.0, 2.0]])
    v = np.full((1, 2), -7.0)
    b = np.full((1, 2), -7, dtype=np.int64)
    with pytest.raises(TypeError):
        ext.l2(y, None, v, np.empty((1, 2), dtype=np.int32))
    np.testing.assert_array_equal(v, -7.0)
    np.testing.assert_array_equal(b, -7)


def test_plain_buffer_protocol_objects_work():
    """array.array + memoryview.cast: the kernel needs no NumPy at all."""
    y = memoryview(array.array("d", [3.0, 1.0, 2.0, 0.0, 5.0, 4.0])).cast("B").cast("d", (2, 3))
    v = memoryview(array.array("d", [0.0] * 6)).cast("B").cast("d", (2, 3))
    b = memoryview(array.array("q", [0] * 6)).cast("B").cast("q", (2, 3))
    ext.l2(y, None, v, b)
    assert v.tolist() == [[3.0, 1.5, 1.5], [3.0, 3.0, 3.0]]
    assert b.tolist() == [[0, 1, 1], [0, 0, 0]]


def test_in_place_output_is_allowed():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 50))
    expect, expect_b = _pav_rows_numpy(y, None, kind="l2")
    buf = y.copy()
    b = np.empty(y.shape, dtype=np.int64)
    ext.l2(buf, None, buf, b)
    np.testing.assert_array_equal(b, expect_b)
    np.testing.assert_allclose(buf, expect, rtol=1e-12, atol=1e-12)


def test_nan_and_inf_that_slip_through_terminate():
    """Validation lives in Python; the kernel itself must still finish, in bounds."""
    y = np.array([[1.0, np.nan, 3.0, 2.0, np.inf, -np.inf, 0.0]])
    v, b = _outs(y)
    ext.l2(y, None, v, b)
    assert np.all((b >= 0) & (b <= np.arange(y.shape[1])))
    ext.kl(y, np.zeros_like(y), v, b)
    assert np.all((b >= 0) & (b <= np.arange(y.shape[1])))
    ext.l2(np.ones((1, 3)), np.array([[np.nan, 0.0, -1.0]]), *_outs(np.ones((1, 3))))


def test_threads_get_independent_correct_results():
    """The loops run without the GIL; concurrent calls must not share state."""
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(64, 2000)) for _ in range(4)]
    expected = [_isotonic._pav_rows_c(y, None, kind="l2") for y in inputs]
    results = [None] * 4

    def work(k):
        for _ in range(5):
            results[k] = _isotonic._pav_rows_c(inputs[k], None, kind="l2")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (v, b), (ve, be) in zip(results, expected):
        np.testing.assert_array_equal(v, ve)
        np.testing.assert_array_equal(b, be)


def test_long_rows_worst_case_linear():
    """Increasing input merges every element into one block: the O(n) stack path."""
    n = 200_000
    y = np.arange(n, dtype=np.float64)[None]
    v, b = _isotonic._pav_rows_c(y, None, kind="l2")
    assert np.all(b == 0)
    np.testing.assert_allclose(v, (n - 1) / 2, rtol=1e-12)
    w = np.zeros_like(y)
    v, b = _isotonic._pav_rows_c(y, w, kind="kl")
    assert np.all(b == 0)
    # logsumexp(0..n-1) - log(n) in closed form
    lse = (n - 1) + np.log1p(-np.exp(-n)) - np.log1p(-np.exp(-1.0))
    np.testing.assert_allclose(v, lse - np.log(n), rtol=1e-12)
