"""Soft sort and soft rank on NumPy rows: the forward pass and its Jacobian structure.

Blondel, Teboul, Berthet, Djolonga (ICML 2020). With ``rho = (n, n-1, ..., 1)`` and
strength ``eps``, both operators are projections onto a permutahedron, and each projection
is one sort plus one non-increasing isotonic regression (PAV) in sorted coordinates:

* rank (ascending, rank 1 = smallest): project ``z = x / eps`` onto ``P(rho)``;
  ``s = z`` sorted descending, ``w = rho``.
* sort (descending): project ``rho / eps`` onto ``P(x)``; ``s = rho / eps``,
  ``w = x`` sorted descending. Ascending sort is ``-sort_desc(-x)``; descending rank
  uses ``z = -x / eps``.

L2: ``v = iso(s - w)``; KL: ``v = iso_kl(s, w)`` (block value
``logsumexp(s_B) - logsumexp(w_B)``). The output in sorted coordinates is ``s - v``,
computed as ``w + ((s - w) - v)`` so that every singleton block returns its ``w``
*exactly*: hard ranks once ``eps`` is below the smallest gap of ``x``, the hard sort
once ``eps`` times the largest gap is below 1.

Every case is described by one coefficient ``alpha`` with ``u = alpha * x[perm]`` the
descending-sorted "logits" (``u = s`` for rank, ``u = w`` for sort). Inside a block
``B`` let ``p_B`` be ``1/|B|`` (L2) or ``softmax(u_B)`` (KL). Then, in sorted coordinates,

* rank: ``d out = alpha * (I - 1 p_B^T) dx[perm]`` per block,
* sort: ``d out = 1 p_B^T dx[perm]`` per block (the signs of ascending sort cancel).

For KL soft sort the weights are the softmax over the block of the *sorted values*
``w``; the widely copied reference implementation gets this wrong for blocks of more
than one element. The integer ``perm`` and ``block`` come from the forward pass and are
all a backward pass needs besides ``x``.
"""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np

from ._isotonic import _ext, pav_rows

REGULARIZATIONS = ("l2", "kl")
DIRECTIONS = ("ascending", "descending")
OPS = ("sort", "rank")


# --------------------------------------------------------------------------- validation


def check_options(regularization, regularization_strength, direction) -> float:
    """Validate the keyword options shared by every backend; return the strength as float."""
    if not isinstance(regularization, str) or regularization not in REGULARIZATIONS:
        raise ValueError(
            f"regularization must be 'l2' or 'kl', got {regularization!r}"
        )
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be 'ascending' or 'descending', got {direction!r}"
        )
    strength = regularization_strength
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, numbers.Real):
        raise TypeError(
            "regularization_strength must be a positive Python float, got "
            f"{strength!r} of type {type(strength).__name__}"
        )
    strength = float(strength)
    if not (math.isfinite(strength) and strength > 0.0):
        raise ValueError(
            "regularization_strength must be a finite number > 0 (it divides the "
            f"input; use a small value such as 1e-3 for nearly hard output), got {strength!r}"
        )
    return strength


def check_finite_rows(x2: np.ndarray, name: str = "values") -> float:
    """Reject NaN/inf, quoting the first bad value; return ``max |x2|`` (0 when empty)."""
    if x2.size == 0:
        return 0.0
    # min/max propagate NaN and need no temporary array, unlike isfinite().all().
    lo, hi = float(x2.min()), float(x2.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(x2))[0])
        raise ValueError(
            f"{name} must be finite (soft sort/rank of NaN or inf is undefined); "
            f"found {float(x2[idx])!r} at row {idx[0]}, position {idx[1]} of the flattened "
            "(batch, n) input"
        )
    return max(-lo, hi)


def check_scale(max_abs: float, n: int, dtype, *, op: str, strength: float) -> None:
    """Refuse inputs whose scaled keys would overflow to inf (and then NaN) in ``dtype``."""
    limit = float(np.finfo(dtype).max) / 8.0  # room for s - w and the block sums
    if op == "rank":
        scaled, what = max_abs / strength, "max |values| / regularization_strength"
    else:
        scaled, what = max(n / strength, max_abs), "n / regularization_strength"
    if not scaled < limit:
        raise ValueError(
            f"{what} = {scaled!r} overflows {np.dtype(dtype).name}; rescale values or use "
            f"a larger regularization_strength (got {strength!r})"
        )


def alpha(op: str, strength: float, descending: bool) -> float:
    """The coefficient with ``u = alpha * x[perm]`` sorted descending (see module doc)."""
    sign = -1.0 if descending else 1.0
    if op == "rank":
        return sign / strength
    return -sign  # sort: descending -> +1, ascending -> -1


# --------------------------------------------------------------------------- forward


def _rho(n: int, dtype) -> np.ndarray:
    return np.arange(n, 0, -1, dtype=dtype)


# Scratch arrays reused across calls (per thread). Large temporaries freed on every
# call make glibc return the memory to the OS and page-fault it back the next time,
# which measured here at up to half the cost of a forward pass. Results handed to the
# caller are always fresh arrays; only internal temporaries live here.
_SCRATCH_MAX_BYTES = 64 << 20
_tls = threading.local()


def _scratch(name: str, shape, dtype) -> np.ndarray:
    if shape[0] * shape[-1] < 1 << 15:  # small: malloc is cheap and never page-faults
        return np.empty(shape, dtype)
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    buf = cache.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        cache.pop(name, None)
        held = sum(b.nbytes for b in cache.values())
        buf = np.empty(size, dtype)
        if held + buf.nbytes <= _SCRATCH_MAX_BYTES:
            cache[name] = buf
    return buf[:size].reshape(shape)


def _order_rows(x2: np.ndarray, *, descending: bool) -> np.ndarray:
    """Row-wise argsort of a finite float32/float64 array, as a fresh int64 array.

    Sorting 64-bit integers is about twice as fast as ``argsort`` here, so each value's
    order-preserving integer key is packed with its index into one uint64 and the keys
    are sorted: exact for float32 (32 + 32 bits); float64 keeps the top
    ``64 - ceil(log2 n)`` bits of the key, which the caller verifies.
    """
    rows, n = x2.shape
    ibits = max(1, (n - 1).bit_length())
    # Small inputs: the packing's extra passes cost more than they save.
    if x2.size < 4096 or n >= 1 << 31 or x2.dtype not in (np.float32, np.float64):
        key = x2 if not descending else np.negative(x2)
        return np.argsort(key, axis=-1)
    if x2.dtype == np.float64:
        # IEEE order as unsigned order: flip every bit of negatives, the sign bit of the rest.
        packed = (x2.view(np.int64) >> 63).view(np.uint64)
        packed |= np.uint64(1 << 63)
        packed ^= x2.view(np.uint64)
        if descending:
            np.invert(packed, out=packed)
        packed &= np.uint64((1 << 64) - (1 << ibits))
    else:
        k32 = (x2.view(np.int32) >> 31).view(np.uint32)
        k32 |= np.uint32(1 << 31)
        k32 ^= x2.view(np.uint32)
        if descending:
            np.invert(k32, out=k32)
        packed = k32.astype(np.uint64)
        packed <<= np.uint64(32)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort(axis=-1)
    packed &= np.uint64((1 << ibits) - 1)
    return packed.view(np.int64)


def _rows_of(a: np.ndarray, shape, name: str) -> np.ndarray:
    """``a`` as a C-contiguous (rows, n) array: a 1-D row is tiled into scratch."""
    if a.ndim == 2:
        return a
    buf = _scratch(name, shape, a.dtype)
    buf[...] = a
    return buf


def _resolve_pooled_sort(y, w, block, *, regularization: str, strength: float) -> None:
    """Recompute soft sort on pooled blocks without forming ``rho / eps - w``.

    When ``n / eps`` dwarfs the values, ``s - w`` keeps only the top bits of ``w``. On a
    block ``B = [a, a + L)`` the exact output is ``mean_B(w) + (a + (L - 1)/2 - i)/eps``
    (L2) or ``lse_B(w) - (i - a)/eps - log(1 - e^(-L/eps)) + log(1 - e^(-1/eps))`` (KL):
    ``s`` is an arithmetic sequence, so its block mean / logsumexp has a closed form.
    Written into ``y`` in place, in float64, for the pooled elements only.
    """
    rows, n = y.shape
    start = block == np.arange(n, dtype=block.dtype)
    last = np.empty_like(start)
    last[:, :-1] = start[:, 1:]
    last[:, -1] = True
    members = np.flatnonzero(~(start & last))
    if len(members) == 0:
        return
    starts, counts = _segments(start.reshape(-1)[members])
    length = np.repeat(counts, counts).astype(np.float64)
    offset = (members % n - block.reshape(-1)[members]).astype(np.float64)  # i - a
    wm = w.reshape(-1)[members].astype(np.float64)
    if regularization == "l2":
        base = np.repeat(np.add.reduceat(wm, starts) / counts, counts)
        out = base + ((length - 1.0) / 2.0 - offset) / strength
    else:
        top = np.repeat(wm[starts], counts)  # w sorted descending: the block maximum
        lse = top + np.log(np.repeat(np.add.reduceat(np.exp(wm - top), starts), counts))
        out = (lse - offset / strength - np.log(-np.expm1(-length / strength))
               + math.log(-math.expm1(-1.0 / strength)))
    y.reshape(-1)[members] = out


# The fused C kernels (one call per forward, one per backward); None without the build.
_FUSED = getattr(_ext, "soft_forward", None) is not None


def _fusable(a: np.ndarray) -> bool:
    return (_FUSED and a.dtype in (np.float32, np.float64) and a.dtype.isnative
            and a.ndim == 2 and a.flags.c_contiguous)


def forward_checked(x2: np.ndarray, *, op: str, regularization: str, strength: float,
                    descending: bool, out=None, perm=None, block=None):
    """Validate (NaN/inf, overflow) and run the forward on a C-contiguous float32/64 array.

    With the C kernel the scan for bad values happens in the same call, before anything
    is written; ``out``/``perm``/``block`` may be given as preallocated outputs (x2's
    dtype, int64, int64, x2's shape). Raises what :func:`check_finite_rows` and
    :func:`check_scale` raise.
    """
    rows, n = x2.shape
    if not _fusable(x2):
        check_scale(check_finite_rows(x2), n, x2.dtype, op=op, strength=strength)
        return _forward_rows_numpy(x2, op=op, regularization=regularization,
                                   strength=strength, descending=descending)
    if out is None:
        out = np.empty_like(x2)
    if perm is None:
        perm = np.empty(x2.shape, dtype=np.int64)
    if block is None:
        block = np.empty(x2.shape, dtype=np.int64)
    status = _ext.soft_forward(x2, out, perm, block, op == "rank", regularization == "kl",
                               strength, descending)
    if status:
        # The kernel wrote nothing; the NumPy checks say exactly what is wrong.
        check_scale(check_finite_rows(x2), n, x2.dtype, op=op, strength=strength)
        raise ValueError(f"values could not be processed (kernel status {status}); they "
                         "must be finite and small enough for regularization_strength "
                         f"{strength!r}")
    return out, perm, block


def forward_rows(x2: np.ndarray, *, op: str, regularization: str, strength: float,
                 descending: bool):
    """Soft sort/rank of every row of a finite, C-contiguous float32/float64 (R, n) array.

    Returns ``(out, perm, block)``: ``out`` like ``x2``; int64 ``perm`` (row-wise order
    that sorts ``alpha * x`` descending) and int64 ``block`` (PAV block starts in sorted
    coordinates). Runs the fused C kernel when it is built, else the NumPy pipeline.
    """
    if _fusable(x2):
        return forward_checked(x2, op=op, regularization=regularization, strength=strength,
                               descending=descending)
    return _forward_rows_numpy(x2, op=op, regularization=regularization, strength=strength,
                               descending=descending)


def _forward_rows_numpy(x2: np.ndarray, *, op: str, regularization: str, strength: float,
                        descending: bool):
    """The NumPy forward (fallback without the C build, and a second implementation)."""
    rows, n = x2.shape
    dtype = x2.dtype
    if rows == 0:
        empty = np.empty((0, n), dtype=np.int64)
        return np.empty((0, n), dtype=dtype), empty, empty.copy()
    a = alpha(op, strength, descending)
    perm = _order_rows(x2, descending=a > 0)
    flat = np.add(perm, np.arange(0, rows * n, n, dtype=np.int64)[:, None],
                  out=_scratch("flat", x2.shape, np.int64))
    u = np.take(x2.reshape(-1), flat, out=_scratch("u", x2.shape, dtype))
    if a != 1.0:
        u *= dtype.type(a)
    # The packed sort orders float64 values that agree in their top 64 - log2(n) bits
    # by index; verify and redo the (rare) rows where that broke the order.
    if dtype == np.float64 and n > 1:
        bad = np.less(u[:, :-1], u[:, 1:], out=_scratch("bad", (rows, n - 1), np.bool_))
        for r in np.flatnonzero(bad.any(axis=1)):
            perm[r] = np.argsort(-a * x2[r], kind="stable")
            flat[r] = perm[r] + r * n
            u[r] = a * x2[r, perm[r]]
    rho = _rho(n, dtype)
    # The result is built in place in y: fresh for sort (it is the output), scratch for
    # rank (it is scattered into a fresh output).
    y = np.empty_like(x2) if op == "sort" else _scratch("y", x2.shape, dtype)
    if op == "rank":
        s, w = u, rho
        np.subtract(u, rho, out=y)
    else:
        s, w = rho / dtype.type(strength), u
        np.subtract(s, u, out=y)
    if regularization == "l2":
        v, block = pav_rows(y, kind="l2", check_finite=False)
    else:
        v, block = pav_rows(_rows_of(s, x2.shape, "s"), _rows_of(w, x2.shape, "w"),
                            kind="kl", check_finite=False)
    # w + ((s - w) - v): a singleton block has v == s - w bit for bit, so it returns w.
    y -= v
    y += w
    if op == "sort" and n > 1 and n / strength > 16.0 * max(
            float(np.abs(u[:, 0]).max()), float(np.abs(u[:, -1]).max())):
        _resolve_pooled_sort(y, u, block, regularization=regularization, strength=strength)
    if op == "rank":
        out = np.empty_like(x2)
        out.reshape(-1)[flat.reshape(-1)] = y.reshape(-1)
    else:
        out = y if a > 0 else np.negative(y, out=y)
    return out, perm, block


# --------------------------------------------------------------------------- Jacobian


def _segment_ids(block: np.ndarray) -> np.ndarray:
    rows, n = block.shape
    return (block + np.arange(0, rows * n, n, dtype=np.int64)[:, None]).ravel()


def _segsum_bcast(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each block, broadcast back to every member."""
    sums = np.bincount(ids, weights=values.ravel(), minlength=values.size)
    return sums[ids].reshape(values.shape)


def block_weights(x2: np.ndarray, perm: np.ndarray, block: np.ndarray, *, op: str,
                  regularization: str, strength: float, descending: bool) -> np.ndarray:
    """``p`` in sorted coordinates: ``1/|B|`` (L2) or ``softmax(u_B)`` (KL), float64."""
    ids = _segment_ids(block)
    if regularization == "l2":
        counts = np.bincount(ids, minlength=block.size)[ids].reshape(block.shape)
        return 1.0 / counts
    a = alpha(op, strength, descending)
    u = a * np.take_along_axis(x2.astype(np.float64), perm, axis=-1)
    # u is sorted descending, so a block's first entry is its maximum: exp never overflows.
    e = np.exp(u - np.take_along_axis(u, block, axis=-1))
    return e / _segsum_bcast(e, ids)


def jvp_rows(x2, perm, block, t2, *, op, regularization, strength, descending):
    """Jacobian-vector product ``J(x) t`` for rows (float64 result)."""
    p = block_weights(x2, perm, block, op=op, regularization=regularization,
                      strength=strength, descending=descending)
    ids = _segment_ids(block)
    ts = np.take_along_axis(np.asarray(t2, dtype=np.float64), perm, axis=-1)
    if op == "sort":
        return _segsum_bcast(p * ts, ids)
    a = alpha(op, strength, descending)
    out_s = a * (ts - _segsum_bcast(p * ts, ids))
    out = np.empty_like(out_s)
    np.put_along_axis(out, perm, out_s, axis=-1)
    return out


def _segments(start_flags: np.ndarray):
    """Start index and length of each block from a flat bool array of block starts."""
    starts = np.flatnonzero(start_flags)
    counts = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1])
    counts[-1] = len(start_flags) - starts[-1]
    return starts, counts


def _pooled_vjp(gs, u, start_flags, *, op, regularization):
    """``J_s^T gs`` restricted to whole blocks (sorted coordinates), rank's alpha excluded.

    ``u`` (float64, sorted descending within blocks) is only read for KL.
    """
    starts, counts = _segments(start_flags)
    sums = np.add.reduceat(gs, starts, dtype=np.float64)
    if regularization == "l2":
        bc = np.repeat(sums / counts, counts)
        return gs - bc if op == "rank" else bc
    # u is sorted descending: each block's first entry is its max, so exp <= 1.
    e = np.exp(u - np.repeat(u[starts], counts))
    e /= np.repeat(np.add.reduceat(e, starts), counts)
    e *= np.repeat(sums, counts)
    return gs - e if op == "rank" else e


def vjp_rows(x2, perm, block, g2, *, op, regularization, strength, descending, out=None):
    """Vector-Jacobian product ``J(x)^T g`` for rows, in ``x2``'s dtype.

    One call of the C kernel when it is built and the arrays suit it (C-contiguous,
    ``g2`` in ``x2``'s dtype, int64 ``perm``/``block``); ``out`` may be a preallocated
    result. Otherwise the NumPy implementation below.
    """
    if (_fusable(x2) and isinstance(g2, np.ndarray) and g2.dtype == x2.dtype and perm.dtype == np.int64 and block.dtype == np.int64
            and g2.shape == x2.shape and perm.shape == x2.shape and block.shape == x2.shape
            and g2.flags.c_contiguous
            and perm.flags.c_contiguous and block.flags.c_contiguous):
        if out is None:
            out = np.empty_like(x2)
        _ext.soft_backward(x2, perm, block, g2, out, op == "rank", regularization == "kl",
                           strength, descending)
        return out
    return _vjp_rows_numpy(x2, perm, block, g2, op=op, regularization=regularization,
                           strength=strength, descending=descending)


def _vjp_rows_numpy(x2, perm, block, g2, *, op, regularization, strength, descending):
    """The NumPy vector-Jacobian product (fallback, and a second implementation).

    The backward of the torch op: O(n) per row with contiguous segment reductions
    (``add.reduceat``) over the sorted order, sums accumulated in float64. Singleton
    blocks (p = 1) are settled without any reduction: when they dominate (small
    strengths) only the pooled blocks are gathered and reduced.
    """
    rows, n = x2.shape
    size = rows * n
    start_mask = block == np.arange(n, dtype=block.dtype)
    flat = (perm + np.arange(0, size, n, dtype=np.int64)[:, None]).reshape(-1)
    g = np.asarray(g2).reshape(-1)
    gs = np.take(g, flat) if op == "rank" else g
    a = alpha(op, strength, descending)
    n_blocks = int(np.count_nonzero(start_mask))
    out = np.empty(size, dtype=x2.dtype)
    if n_blocks * 2 > size:
        # Mostly singletons: rank's J_s is 0 on them and sort's the identity.
        if op == "rank":
            out[:] = 0
        else:
            out[flat] = gs
        if n_blocks < size:
            last = np.empty_like(start_mask)
            last[:, :-1] = start_mask[:, 1:]
            last[:, -1] = True
            members = np.flatnonzero(~(start_mask & last))
            u = None
            if regularization == "kl":
                u = np.take(x2.reshape(-1), flat[members]).astype(np.float64) * a
            r = _pooled_vjp(np.take(gs, members), u, start_mask.reshape(-1)[members], op=op,
                            regularization=regularization)
            if op == "rank":
                r *= a
            out[flat[members]] = r
        return out.reshape(rows, n)
    u = None
    if regularization == "kl":
        u = np.take(x2.reshape(-1), flat).astype(np.float64)
        if a != 1.0:
            u *= a
    r = _pooled_vjp(gs, u, start_mask.reshape(-1), op=op, regularization=regularization)
    if op == "rank":
        r *= a
    out[flat] = r
    return out.reshape(rows, n)


def jacobian_rows(x2, perm, block, *, op, regularization, strength, descending):
    """Dense Jacobians, shape (R, n, n) (for tests and reports on small n)."""
    rows, n = x2.shape
    eye = np.eye(n)
    jac = np.empty((rows, n, n))
    for j in range(n):
        t = np.broadcast_to(eye[j], (rows, n))
        jac[:, :, j] = jvp_rows(x2, perm, block, t, op=op, regularization=regularization,
                                strength=strength, descending=descending)
    return jac
