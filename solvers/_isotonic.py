"""Isotonic regression by Pool-Adjacent-Violators (PAV), the O(n) core of soft sort/rank.

Two problems, both solved row by row for a *non-increasing* fit ``v_1 >= ... >= v_n``:

* ``kind="l2"``: ``argmin_v sum_i w_i (v_i - y_i)^2``. A block ``B`` takes the weighted
  mean ``sum_B w_i y_i / sum_B w_i``.
* ``kind="kl"``: ``argmin_v sum_i exp(y_i - v_i) + exp(w_i) v_i``. A block takes
  ``logsumexp(y_B) - logsumexp(w_B)``, computed in the log domain, so ``y ~ 1e3`` or
  ``1e-300`` gaps never overflow or underflow.

:func:`pav_rows` returns, next to the fit ``v``, the integer array ``block`` with
``block[r, i]`` = index of the first element of the block containing ``i``. The
boundaries come from the forward pass itself, never from comparing float outputs, so a
backward pass never mistakes two blocks that merely have close values for one.

The solution is piecewise constant, so its Jacobian is block diagonal (a generalized
Jacobian at ties, where PAV pools equal neighbours). For a block ``B``:

* L2, with respect to ``y``: every row of the block is ``(w_j / sum_B w)_{j in B}``;
  unweighted that is ``(1/|B|) 1 1^T``. ``jvp: dv_B = sum_B w dy / sum_B w``;
  ``vjp: dy_j = w_j / sum_B w * sum_B g``.
* KL, with respect to ``y_B``: ``1 softmax(y_B)^T``; with respect to ``w_B``:
  ``-1 softmax(w_B)^T``. ``jvp: dv_B = <softmax(y_B), dy_B> - <softmax(w_B), dw_B>``;
  ``vjp: dy_j = softmax(y_B)_j sum_B g``, ``dw_j = -softmax(w_B)_j sum_B g``.

The work is done by the C extension ``nonsmooth.solvers._pav`` (buffer protocol, no
NumPy headers, GIL released) when it is built, and by a pure-Python/NumPy fallback
otherwise; :func:`pav_backend` says which one is in use. Both run exactly the same
floating-point operations in float64, so they agree on ``block`` exactly.
"""
from __future__ import annotations

import math

import numpy as np

try:  # The compiled kernel; a missing build falls back to NumPy (``nonsmooth doctor`` says so).
    from nonsmooth.solvers import _pav as _ext
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _ext = None

__all__ = ["isotonic_regression", "pav_backend", "pav_rows"]

_KINDS = ("l2", "kl")
# dtype objects, not scalar types: comparing dtype to dtype is the cheap path, and a
# byte-swapped float64 ('>f8') is rejected instead of handed to the C kernel.
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def pav_backend() -> str:
    """Which PAV kernel is in use: ``"c"`` (compiled extension) or ``"numpy"`` (fallback).

    Example:
        >>> from nonsmooth.solvers import pav_backend
        >>> pav_backend() in ("c", "numpy")
        True
    """
    return "numpy" if _ext is None else "c"


# --------------------------------------------------------------------------- validation


def _check_rows(name: str, a, *, dtype=None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"`{name}` must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(
            f"`{name}` must have native dtype float32 or float64, got {a.dtype}"
        )
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"`{name}` must have the dtype of `y` ({dtype}), got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (rows, n), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"`{name}` must be C-contiguous; pass np.ascontiguousarray({name})"
        )
    return a


def _first_bad(a: np.ndarray, bad: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{a[idx]!r} at index {idx}"


def _check_finite(name: str, a: np.ndarray) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(
            f"`{name}` must be finite; found {_first_bad(a, ~finite)}"
        )


def _check_positive(name: str, a: np.ndarray) -> None:
    bad = ~(a > 0)
    if bad.any():
        raise ValueError(
            f"`{name}` must be positive weights; found {_first_bad(a, bad)}"
        )


# --------------------------------------------------------------------------- kernels


def pav_rows(y, w=None, *, kind: str = "l2", check_finite: bool = True):
    """Non-increasing isotonic fit of every row of a 2-D C-contiguous float array.

    ``kind="l2"``: ``argmin_v sum_i w_i (v_i - y_i)^2`` s.t. ``v_1 >= ... >= v_n``;
    ``w`` positive weights of ``y``'s shape and dtype, or ``None`` for all ones.
    ``kind="kl"``: ``argmin_v sum_i exp(y_i - v_i) + exp(w_i) v_i`` s.t. ``v``
    non-increasing; ``w`` is required. Block values: weighted mean (L2) and
    ``logsumexp(y_B) - logsumexp(w_B)`` (KL).

    Returns ``(v, block)``: ``v`` with ``y``'s shape and dtype, and int64 ``block``
    with ``block[r, i]`` = index of the first element of ``i``'s block. Float32 is
    accumulated in float64. ``check_finite=False`` skips the NaN/inf scan for callers
    that already validated ``y`` and ``w`` (the kernel never crashes or hangs on NaN,
    but the rows that hold one come out NaN).

    Example:
        >>> import numpy as np
        >>> v, block = pav_rows(np.array([[1.0, 3.0, 2.0]]))
        >>> v
        array([[2., 2., 2.]])
        >>> block
        array([[0, 0, 0]])
    """
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}")
    y = _check_rows("y", y)
    if w is None:
        if kind == "kl":
            raise ValueError("`w` is required for kind='kl' (the log-weights of the target)")
    else:
        w = _check_rows("w", w, dtype=y.dtype)
        if w.shape != y.shape:
            raise ValueError(f"`w` must have the shape of `y` {y.shape}, got {w.shape}")
    if check_finite:
        _check_finite("y", y)
        if w is not None:
            _check_finite("w", w)
    if kind == "l2" and w is not None:
        _check_positive("w", w)
    if _ext is None:
        return _pav_rows_numpy(y, w, kind=kind)
    return _pav_rows_c(y, w, kind=kind)


def _pav_rows_c(y: np.ndarray, w, *, kind: str):
    """The compiled kernel (inputs already validated by :func:`pav_rows`)."""
    if _ext is None:
        raise RuntimeError(
            "the C extension nonsmooth.solvers._pav is not built; reinstall with "
            "`pip install --no-build-isolation -e .` and a working gcc"
        )
    v = np.empty_like(y)
    block = np.empty(y.shape, dtype=np.int64)
    (_ext.l2 if kind == "l2" else _ext.kl)(y, w, v, block)
    return v, block


def _pav_rows_numpy(y: np.ndarray, w, *, kind: str):
    """The fallback: the same stack-based PAV as ``_pav.c``, one Python loop per row.

    Runs the kernel's float64 operations in the same order (Python floats are IEEE
    doubles and ``math`` calls the same libm), so blocks agree exactly with the C path.
    """
    rows, n = y.shape
    v = np.empty((rows, n), dtype=np.float64)
    block = np.empty((rows, n), dtype=np.int64)
    y64 = y.astype(np.float64, copy=False)
    w64 = None if w is None else w.astype(np.float64, copy=False)
    solve = _row_l2 if kind == "l2" else _row_kl
    for r in range(rows):
        starts, values = solve(y64[r].tolist(), None if w64 is None else w64[r].tolist())
        lengths = np.diff(np.append(starts, n))
        v[r] = np.repeat(values, lengths)
        block[r] = np.repeat(np.asarray(starts, dtype=np.int64), lengths)
    return v.astype(y.dtype, copy=False), block


def _row_l2(y: list, w):
    # Blocks are kept as (start, mean, weight).  Merging updates the mean as
    # m_a + (m_b - m_a) * w_b / W: exact on equal values and no overflow of a sum
    # at |y| ~ 1e300; the convex form is the fallback when the difference overflows.
    starts, means, weights = [], [], []
    for i, m in enumerate(y):
        wt = 1.0 if w is None else w[i]
        s = i
        while means and means[-1] <= m:
            ma, wa = means.pop(), weights.pop()
            s = starts.pop()
            total = wa + wt
            d = m - ma
            if math.isinf(d):
                m = ma * (wa / total) + m * (wt / total)
            else:
                m = ma + d * (wt / total)
            wt = total
        starts.append(s)
        means.append(m)
        weights.append(wt)
    return starts, means


def _lse2(a: float, b: float) -> float:
    return (a if a > b else b) + math.log1p(math.exp(-abs(a - b)))


def _row_kl(y: list, w: list):
    starts, values, lys, lws = [], [], [], []
    for i, ly in enumerate(y):
        lw = w[i]
        val = ly - lw
        s = i
        while values and values[-1] <= val:
            values.pop()
            s = starts.pop()
            ly = _lse2(lys.pop(), ly)
            lw = _lse2(lws.pop(), lw)
            val = ly - lw
        starts.append(s)
        values.append(val)
        lys.append(ly)
        lws.append(lw)
    return starts, values


# --------------------------------------------------------------------------- public


def _as_float_array(name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise TypeError(
            f"`{name}` must hold real numbers (float or int), got dtype {arr.dtype}"
        )
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    return arr


def isotonic_regression(y, *, weights=None, increasing: bool = True) -> np.ndarray:
    """Weighted least-squares isotonic regression along the last axis.

    Solves ``argmin_v sum_i weights_i (v_i - y_i)^2`` subject to ``v`` increasing
    (``increasing=True``) or decreasing along the last axis, independently for every
    leading batch index. ``y`` is any array-like (NumPy array, nested lists); ints are
    converted to float64. Returns a NumPy array of ``y``'s shape: float32 for float32
    input, float16 for float16 input (computed in float32), float64 otherwise.
    ``weights`` must be positive and finite, broadcastable to ``y``'s shape; weighted
    fits are computed in float64 whatever ``y``'s dtype.

    Example:
        >>> from nonsmooth.solvers import isotonic_regression
        >>> isotonic_regression([1.0, 3.0, 2.0, 4.0])
        array([1. , 2.5, 2.5, 4. ])
        >>> isotonic_regression([[1, 3, 2]], weights=[[1, 1, 3]], increasing=False)
        array([[2., 2., 2.]])
    """
    y = _as_float_array("y", y)
    if y.ndim == 0:
        raise ValueError(f"`y` must have at least one axis, got a scalar {y!r}")
    if y.size == 0:
        raise ValueError(f"`y` must not be empty, got shape {y.shape}")
    out_dtype = y.dtype.newbyteorder("=")
    # float16/32 run in float32, unless weights are given: weights of float32 data may
    # still span more than float32's range (1e-50 vs 1), so weighted fits run in float64.
    low = y.dtype in (np.float16, np.float32) and weights is None
    work = np.float32 if low else np.float64
    y_w = np.ascontiguousarray(y, dtype=work).reshape(-1, y.shape[-1])
    _check_finite("y", y_w)
    w_w = None
    if weights is not None:
        w = _as_float_array("weights", weights)
        try:
            w = np.broadcast_to(w, y.shape)
        except ValueError:
            raise ValueError(
                f"`weights` must have the shape of `y` {y.shape} (or broadcast to it), "
                f"got {w.shape}"
            ) from None
        w_w = np.ascontiguousarray(w, dtype=work).reshape(y_w.shape)
        _check_finite("weights", w_w)
        bad = ~(w_w > 0)
        if bad.any():
            raise ValueError(
                f"`weights` must be positive; found {_first_bad(w_w, bad)} "
                "(drop zero-weight points instead)"
            )
        # Only the weights' ratios matter; rescale rows whose total would overflow.
        with np.errstate(over="ignore"):
            totals = w_w.sum(axis=-1, dtype=np.float64)
        if not np.isfinite(totals).all():
            w_w = np.ascontiguousarray(w_w / w_w.max(axis=-1, keepdims=True))
    # The kernel fits non-increasing rows; an increasing fit of y is minus the
    # non-increasing fit of -y (negation is exact, so nothing is lost).
    if increasing:
        v, _ = pav_rows(-y_w, w_w, kind="l2", check_finite=False)
        v = -v
    else:
        v, _ = pav_rows(y_w, w_w, kind="l2", check_finite=False)
    return v.reshape(y.shape).astype(out_dtype, copy=False)
