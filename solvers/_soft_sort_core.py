"""Soft sort and soft rank on NumPy rows: the forward pass and its Jacobian structure.

Blondel, Teboul, Berthet, Djolonga (ICML 2020). With ``rho = (n, n-1, ..., 1)`` and
strength ``eps``, both operators are projections onto a permutahedron, and each projection
is one sort plus one non-increasing isotonic regression (PAV) in sorted coordinates:

* rank (ascending, rank 1 = smallest), with ``z = x / eps``:
  L2: ``argmin_{mu in P(rho)} |mu - z|^2``; KL: ``argmin_{mu in P(rho)} KL(mu, e^z)``
  ``= exp(P_E(z, log rho))``, the paper's and the reference implementations' KL soft rank
  (entries in ``[1, n]``, sum ``n(n+1)/2``). ``s = z`` sorted descending; ``w = rho`` (L2)
  or ``log rho`` (KL).
* sort (descending): L2 projects ``rho / eps`` onto ``P(x)``; KL is
  ``log argmin_{mu in P(e^x)} KL(mu, e^{rho/eps})``. ``s = rho / eps``, ``w = x`` sorted
  descending. Ascending sort is ``-sort_desc(-x)``; descending rank uses ``z = -x / eps``.

L2: ``v = iso(s - w)``; KL: ``v = iso_kl(s, w)`` (block value
``logsumexp(s_B) - logsumexp(w_B)``). The output in sorted coordinates is ``s - v``
(KL rank: ``exp(s - v)``). It is never formed that way: every block is anchored at its
first key and the arithmetic side (``rho``, ``log rho``, ``rho / eps``) enters in closed
form, so ties stay exactly tied and singletons return ``w`` exactly at any ``|x| / eps``
(the block formulas are in ``_pav.c``, :func:`_soft_pav_row` mirrors them).

Every case is described by one coefficient ``alpha`` with ``u = alpha * x[perm]`` the
descending-sorted keys (``u = s`` for rank, ``u = w`` for sort). Inside a block ``B``
let ``p_B`` be ``1/|B|`` (L2) or ``softmax(u_B)`` (KL), and ``S_B = sum_B rho``. Then,
in sorted coordinates,

* L2 rank: ``d out = alpha (I - 1 p_B^T) dx[perm]`` per block,
* KL rank: ``d out = alpha S_B (diag(p_B) - p_B p_B^T) dx[perm]`` (the derivative of
  ``exp(s - v)``: ``diag(out) (I - 1 p_B^T)`` with ``out_B = S_B p_B``; symmetric),
* sort: ``d out = 1 p_B^T dx[perm]`` per block (the signs of ascending sort cancel).

For KL soft sort the weights are the softmax over the block of the *sorted values*
``w``; the widely copied reference implementation gets this wrong for blocks of more
than one element. The integer ``perm`` and ``block`` come from the forward pass and are
all a backward pass needs besides ``x``.
"""
from __future__ import annotations

import difflib
import math
import numbers
import sys

import numpy as np

from ._isotonic import _ext

REGULARIZATIONS = ("l2", "kl")
DIRECTIONS = ("ascending", "descending")
OPS = ("sort", "rank")
# ~5.6e-309: 1 / strength stays finite. A Python float, which torch.compile can guard on.
_MIN_STRENGTH = 1.0 / sys.float_info.max


# --------------------------------------------------------------------------- validation


def _choice(name: str, value, accepted) -> str:
    """``value`` lower-cased if it is one of ``accepted`` in any case (fast-soft-sort
    writes ``"DESCENDING"``), else a ValueError quoting it, with the closest spelling."""
    if isinstance(value, str):
        low = value.lower()
        if low in accepted:
            return low
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), accepted, n=1, cutoff=0.5)
        if close:
            hint = f"; did you mean {name}={close[0]!r}?"
    raise ValueError(f"{name} must be " + " or ".join(repr(a) for a in accepted)
                     + f" (any case), got {value!r}{hint}")


def check_options(regularization, regularization_strength, direction):
    """Validate the keyword options shared by every backend.

    Returns ``(regularization, strength, direction)``: the names lower-cased (``"KL"`` and
    ``"DESCENDING"`` are accepted) and the strength as a Python float.
    """
    regularization = _choice("regularization", regularization, REGULARIZATIONS)
    direction = _choice("direction", direction, DIRECTIONS)
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
    if strength < _MIN_STRENGTH:
        raise ValueError(
            f"regularization_strength must be at least {_MIN_STRENGTH!r} (its reciprocal, "
            f"the Jacobian's scale, must be a finite float64), got {strength!r}"
        )
    return regularization, strength, direction


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
    """Refuse inputs whose scaled keys would overflow float64 (the kernels form them in
    float64 whatever ``dtype``; ``dtype`` is kept for the signature)."""
    limit = float(np.finfo(np.float64).max) / 8.0  # room for key differences and sums
    if op == "rank":
        scaled, what = max_abs / strength, "max |values| / regularization_strength"
    else:
        scaled, what = max(n / strength, max_abs), "n / regularization_strength"
    if not scaled < limit:
        raise ValueError(
            f"{what} = {scaled!r} overflows float64; rescale values or use "
            f"a larger regularization_strength (got {strength!r})"
        )


def alpha(op: str, strength: float, descending: bool) -> float:
    """The coefficient with ``u = alpha * x[perm]`` sorted descending (see module doc)."""
    sign = -1.0 if descending else 1.0
    if op == "rank":
        return sign / strength
    return -sign  # sort: descending -> +1, ascending -> -1


# --------------------------------------------------------------------------- forward


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


def signed_sorted(x2: np.ndarray, perm: np.ndarray, *, op: str, strength: float,
                  descending: bool) -> np.ndarray:
    """``v = sign * x[perm]`` in float64 (descending along rows), with ``u = v / eps``
    (rank) or ``u = v`` (sort). The kernels never form ``u`` itself, only differences
    :func:`key_diff` of it, which stay accurate at any ``|x| / eps``."""
    v = np.take_along_axis(x2, perm, axis=-1).astype(np.float64)
    if alpha(op, strength, descending) < 0:
        np.negative(v, out=v)
    return v


def key_diff(va, vb, *, rank: bool, strength: float):
    """``u_a - u_b`` from signed inputs (arrays or floats), as ``kdiff`` in ``_pav.c``."""
    d = va - vb
    if not rank:
        return d
    with np.errstate(over="ignore", invalid="ignore"):
        q = d / strength
        if np.any(np.isinf(d)):  # |x| near the float64 maximum: rescale first
            q = np.where(np.isinf(d), va / strength - vb / strength, q)
    return q


def _rho_sum(n: int, a: int, length: int) -> float:
    """``sum_{j=a}^{a+length-1} (n - j)``, as ``rho_sum`` in ``_pav.c``."""
    return float(length) * float(n - a) - 0.5 * float(length) * float(length - 1)


def _soft_pav_row(v: list, *, rank: bool, kl: bool, strength: float, geo: list):
    """Blocks of one row, by the same decisions as ``soft_row`` in ``_pav.c``.

    ``v``: the signed inputs sorted descending (floats). Returns ``(starts, stats,
    shared)``: each block's start and statistic (L2: mean of ``u - u_start``; KL:
    ``sum exp(u - anchor)``, the anchor being the block's first key or, when ``shared``,
    the row's first key). Adjacent blocks are compared through key differences and closed
    forms of the arithmetic side (see the module docstring), never through ``s - w``.
    """
    n = len(v)
    eps = strength

    def kd(a, b):
        d = v[a] - v[b]
        if not rank:
            return d
        return v[a] / eps - v[b] / eps if math.isinf(d) else d / eps

    starts, ms = [], []
    shared = kl and kd(0, n - 1) < 600.0
    log, exp = math.log, math.exp
    for i in range(n):
        s = i
        if not kl:
            m = 0.0
            while starts:
                s1 = starts[-1]
                big_l = float(i + 1 - s1)
                d = kd(s1, s) + (ms[-1] - m)
                if not (d <= 0.5 * big_l if rank else 0.5 * big_l / eps <= d):
                    break
                starts.pop()
                m = ms.pop() - d * (float(i + 1 - s) / big_l)
                s = s1
            starts.append(s)
            ms.append(m)
            continue
        sd = exp(kd(i, 0)) if shared else 1.0
        while starts:
            s1 = starts[-1]
            l1, l2 = s - s1, i + 1 - s
            dm = 0.0 if shared else kd(s1, s)
            if rank:
                p, q, d = sd * _rho_sum(n, s1, l1), ms[-1] * _rho_sum(n, s, l2), dm
            else:
                p, q, d = geo[l2] * ms[-1], geo[l1] * sd, l1 / eps - dm
            if not (q <= p if shared and rank else d <= log(p / q)):
                break
            starts.pop()
            top = ms.pop()
            sd = top + sd if shared else top + sd * exp(-dm)
            s = s1
        starts.append(s)
        ms.append(sd)
    return starts, ms, shared


def _geo_sums(n: int, strength: float) -> list:
    """``G(L) = sum_{k<L} e^{-k/eps}`` for L = 0..n, accumulated as ``geo_sum`` in ``_pav.c``."""
    q = math.exp(-1.0 / strength)
    out, power, total = [0.0, 1.0], 1.0, 1.0
    for _ in range(2, n + 1):
        power *= q
        total += power
        out.append(total)
    return out


def _forward_rows_numpy(x2: np.ndarray, *, op: str, regularization: str, strength: float,
                        descending: bool):
    """The NumPy forward (fallback without the C build, and a second implementation).

    Sorting and the output assembly are vectorized; the PAV pass is a Python loop per row
    (:func:`_soft_pav_row`), so this is the slow path. All arithmetic is float64.
    """
    rows, n = x2.shape
    dtype = x2.dtype
    if rows == 0:
        empty = np.empty((0, n), dtype=np.int64)
        return np.empty((0, n), dtype=dtype), empty, empty.copy()
    a = alpha(op, strength, descending)
    perm = _order_rows(x2, descending=a > 0)
    v = signed_sorted(x2, perm, op=op, strength=strength, descending=descending)
    # The packed sort orders float64 values that agree in their top 64 - log2(n) bits
    # by index; verify and redo the (rare) rows where that broke the order.
    if n > 1:
        for r in np.flatnonzero((v[:, :-1] < v[:, 1:]).any(axis=1)):
            perm[r] = np.argsort(-a * x2[r].astype(np.float64), kind="stable")
            v[r] = signed_sorted(x2[r:r + 1], perm[r:r + 1], op=op, strength=strength,
                                 descending=descending)[0]
    rank, kl = op == "rank", regularization == "kl"
    geo = _geo_sums(n, strength) if kl and not rank else None
    lq1 = math.log(-math.expm1(-1.0 / strength)) if kl and not rank else 0.0
    out_s = np.empty((rows, n))
    block = np.empty((rows, n), dtype=np.int64)
    j = np.arange(n)
    for r in range(rows):
        vr = v[r]
        starts, ms, shared = _soft_pav_row(vr.tolist(), rank=rank, kl=kl,
                                           strength=strength, geo=geo)
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.diff(np.append(starts, n))
        start = np.repeat(starts, lengths)
        length = np.repeat(lengths, lengths).astype(np.float64)
        stat = np.repeat(np.asarray(ms), lengths)
        offset = (j - start).astype(np.float64)
        half = 0.5 * (length - 1.0)
        anchor = start if not (kl and shared) else np.zeros_like(start)
        du = key_diff(vr, vr[anchor], rank=rank, strength=strength)  # u_j - u_anchor
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            if not kl:
                res = (((n - start) - half) + (du - stat) if rank
                       else (vr[start] + stat) + (half - offset) / strength)
            elif rank:
                res = np.exp(du) * (length * (n - start) - 0.5 * length
                                    * (length - 1.0)) / stat
            else:
                res = (vr[anchor] + np.log(stat)
                       - (np.log(-np.expm1(-length / strength)) - lq1) - offset / strength)
        single = length == 1.0
        res[single] = (n - j[single]) if rank else vr[single]
        lo, hi = (1.0, float(n)) if rank else (vr[-1], vr[0])
        out_s[r] = np.clip(res, lo, hi)
        block[r] = start
    out = np.empty((rows, n), dtype=dtype)
    if rank:
        np.put_along_axis(out, perm, out_s.astype(dtype), axis=-1)
    else:
        out[...] = out_s if a > 0 else -out_s
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
    v = signed_sorted(x2, perm, op=op, strength=strength, descending=descending)
    # u - u_first <= 0 (u is sorted descending): exp never overflows.
    e = np.exp(key_diff(v, np.take_along_axis(v, block, axis=-1), rank=op == "rank",
                        strength=strength))
    return e / _segsum_bcast(e, ids)


def block_rho_sums(block: np.ndarray) -> np.ndarray:
    """``S_B = sum_B rho`` broadcast to every member (sorted coordinates), float64."""
    rows, n = block.shape
    rho = np.broadcast_to(np.arange(n, 0, -1, dtype=np.float64), block.shape)
    return _segsum_bcast(rho, _segment_ids(block))


def jvp_rows(x2, perm, block, t2, *, op, regularization, strength, descending):
    """Jacobian-vector product ``J(x) t`` for rows (float64 result)."""
    p = block_weights(x2, perm, block, op=op, regularization=regularization,
                      strength=strength, descending=descending)
    ids = _segment_ids(block)
    ts = np.take_along_axis(np.asarray(t2, dtype=np.float64), perm, axis=-1)
    if op == "sort":
        return _segsum_bcast(p * ts, ids)
    a = alpha(op, strength, descending)
    if regularization == "l2":
        out_s = a * (ts - _segsum_bcast(p * ts, ids))
    else:
        out_s = a * block_rho_sums(block) * p * (ts - _segsum_bcast(p * ts, ids))
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


def _pooled_vjp(gs, u, pos, start_flags, n, *, op, regularization):
    """``J_s^T gs`` restricted to whole blocks (sorted coordinates), rank's alpha excluded.

    ``u`` (float64 ``u - u_first`` per element, <= 0) is only read for KL; ``pos``
    holds each element's sorted position (KL rank's ``S_B``).
    """
    starts, counts = _segments(start_flags)
    if regularization == "l2":
        sums = np.add.reduceat(gs, starts, dtype=np.float64)
        bc = np.repeat(sums / counts, counts)
        return gs - bc if op == "rank" else bc
    e = np.exp(u)
    e /= np.repeat(np.add.reduceat(e, starts), counts)
    if op == "sort":
        return e * np.repeat(np.add.reduceat(gs, starts, dtype=np.float64), counts)
    first = pos[starts].astype(np.float64)
    rho_sum = counts * (n - first) - 0.5 * counts * (counts - 1.0)
    dot = np.repeat(np.add.reduceat(e * gs, starts), counts)
    return np.repeat(rho_sum, counts) * e * (gs - dot)


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
    pos = np.tile(np.arange(n), rows)
    if op == "rank":
        out[:] = 0  # rank's J_s is 0 on singletons
    else:
        out[flat] = gs  # and sort's the identity
    if n_blocks == size:
        return out.reshape(rows, n)
    members = np.arange(size)
    if n_blocks * 2 > size:  # mostly singletons: gather the pooled blocks only
        last = np.empty_like(start_mask)
        last[:, :-1] = start_mask[:, 1:]
        last[:, -1] = True
        members = np.flatnonzero(~(start_mask & last))
    u = None
    if regularization == "kl":  # u - u_first of each element, in float64
        v = signed_sorted(x2, perm, op=op, strength=strength, descending=descending)
        u = key_diff(v, np.take_along_axis(v, block, axis=-1), rank=op == "rank",
                     strength=strength).reshape(-1)[members]
    r = _pooled_vjp(np.take(gs, members).astype(np.float64), u, pos[members],
                    start_mask.reshape(-1)[members], n, op=op, regularization=regularization)
    if op == "rank":
        r *= a
    out[flat[members]] = r
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
