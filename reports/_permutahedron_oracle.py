"""Reference projections onto the permutahedron that cannot stall, each with a certificate.

The permutahedron ``P(w)`` is the convex hull of the permutations of ``w``. The references
compute the operators of Blondel, Teboul, Berthet, Djolonga (ICML 2020, section 2) with
``rho = (n, ..., 1)`` and strength ``eps``:

* ``project_l2(z, w)``: ``argmin_{mu in P(w)} |mu - z|^2 / 2``;
* ``project_kl(z, w)``: ``argmin_{mu in P(w)} KL(mu, e^z)`` for ``w > 0``, with
  ``KL(mu, e^z) = sum_i mu_i (log mu_i - z_i) - mu_i + e^{z_i}``;
* ``oracle(op, x, reg, eps, direction)``: soft rank = ``project_l2(+-x/eps, rho)`` (L2) and
  ``project_kl(+-x/eps, rho)`` = ``exp(P_E(+-x/eps, log rho))`` (KL, in ``[1, n]``, summing to
  ``n(n+1)/2``); descending soft sort = ``project_l2(rho/eps, x)`` (L2) and
  ``log project_kl(rho/eps, e^x)`` (KL); ascending soft sort = ``-sort_desc(-x)``.

How, and what is guaranteed:

1. Candidates. Sort ``z`` descending and ``w`` descending. For each of the ``2^(n-1)``
   compositions of the sorted order into contiguous blocks, minimise the objective on the
   affine set where every block ``B`` carries the mass of the same positions of ``w``
   (L2: ``mu_i = z_i - (sum_B z - sum_B w)/|B|``; KL: ``mu_i = e^{z_i} sum_B w / sum_B e^z``).
   No iteration, no stopping rule: a finite list.
2. Certificate, which assumes nothing about step 1. A candidate is accepted only if it is
   feasible (its sorted prefix sums are at most those of ``w``, with equal totals: Rado's
   description of ``P(w)``) and its Frank-Wolfe gap
   ``gap = max_{nu in P(w)} <g, nu - mu>`` with ``g = -grad f(mu)`` vanishes; the maximum
   over ``P(w)`` is the rearrangement sum ``<sort_desc(g), sort_desc(w)>``. For convex
   ``f``, ``f(mu) - min f <= gap``, and with strong convexity modulus ``m`` on ``P(w)``,
   ``|mu - mu*|_2 <= sqrt(2 gap / m)`` (L2: ``m = 1``; KL: ``m = 1 / max w``).
3. Arithmetic. L2 runs in exact rational arithmetic on the float inputs' exact values
   (``fractions.Fraction``): the accepted candidate has gap exactly 0 and is *the*
   projection, rounded once to float64. KL runs in ``mpmath`` at ``DIGITS`` significant
   digits (exp/log are not rational); the returned :class:`Certified` states the bound
   on ``|mu - mu*|_2`` (about 1e-40 relative), far below float64 resolution.
4. Failure is loud: if no candidate is certified, :class:`OracleError` is raised; an
   uncertified number is never returned. The cost is ``O(2^n n)``, so ``n <= MAX_N``.

Nothing here shares code or assumptions with the solver (no PAV, no float64 pooling).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import mpmath
import numpy as np

__all__ = ["Certified", "OracleError", "fw_gap", "oracle", "project_kl", "project_l2",
           "project_kl_certified", "project_l2_certified", "MAX_N", "DIGITS"]

MAX_N = 14
DIGITS = 60


class OracleError(RuntimeError):
    """No candidate passed the certificate (a bug in the oracle, never a tolerance)."""


@dataclasses.dataclass(frozen=True)
class Certified:
    """A projection with its certificate.

    ``value``: float64 array (the projection ``mu``). ``gap``: its Frank-Wolfe gap
    (0 exactly for L2). ``bound``: a proven upper bound on ``|mu_exact - mu*|_2`` for the
    high-precision solution before rounding to float64 (0 for L2). ``exact``: the
    high-precision entries (``Fraction`` or ``mpmath.mpf``).
    """

    value: np.ndarray
    gap: float
    bound: float
    exact: tuple


def _check(z, w):
    z, w = list(z), list(w)
    n = len(z)
    if n != len(w) or n == 0:
        raise ValueError(f"z and w must be non-empty and of equal length, got {len(z)}, {len(w)}")
    if n > MAX_N:
        raise ValueError(f"the enumeration oracle handles n <= {MAX_N}, got n = {n}")
    return z, w, n


def _compositions(n):
    """Block boundaries [(start, end), ...] of every composition of range(n)."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                bounds.append((start, i))
                start = i
        bounds.append((start, n))
        yield bounds


def _feasible(mu, w_desc, tol):
    """Rado: mu in P(w) iff sorted prefix sums of mu <= those of w, totals equal."""
    top_mu = top_w = 0
    for a, b in zip(sorted(mu, reverse=True), w_desc):
        top_mu += a
        top_w += b
        if top_mu > top_w + tol:
            return False
    return abs(top_mu - top_w) <= tol


def _gap(g, mu, w_desc):
    """Frank-Wolfe gap max_{nu in P(w)} <g, nu> - <g, mu> (rearrangement inequality)."""
    best = sum(a * b for a, b in zip(sorted(g, reverse=True), w_desc))
    return best - sum(a * b for a, b in zip(g, mu))


def _solve(z, w, candidate, gradient, tol, zero):
    """Enumerate compositions of z's descending order; return (mu, gap) of the certified one."""
    n = len(z)
    order = sorted(range(n), key=lambda i: z[i], reverse=True)
    zs = [z[i] for i in order]
    w_desc = sorted(w, reverse=True)
    best = None
    for bounds in _compositions(n):
        mu_s = candidate(zs, w_desc, bounds)
        if mu_s is None:
            continue
        mu = [zero] * n
        for pos, i in enumerate(order):
            mu[i] = mu_s[pos]
        if not _feasible(mu, w_desc, tol):
            continue
        gap = _gap(gradient(mu), mu, w_desc)
        if best is None or gap < best[1]:
            best = (mu, gap)
            if gap == 0:
                break
    return best


# --------------------------------------------------------------------------- L2


def _rational(v) -> Fraction:
    """The exact value of an int, Fraction or float (NumPy scalars included)."""
    return Fraction(v) if isinstance(v, (int, Fraction)) else Fraction(float(v))


def _l2_candidate(zs, w_desc, bounds):
    out = []
    for a, b in bounds:
        shift = (sum(zs[a:b]) - sum(w_desc[a:b])) / (b - a)
        out.extend(v - shift for v in zs[a:b])
    return out


def project_l2_certified(z, w) -> Certified:
    """Euclidean projection of ``z`` onto ``P(w)``, exact in rational arithmetic.

    Example:
        >>> project_l2_certified([0.0, 0.0], [2.0, 1.0]).value
        array([1.5, 1.5])
    """
    z, w, n = _check(z, w)
    zq, wq = [_rational(v) for v in z], [_rational(v) for v in w]
    found = _solve(zq, wq, _l2_candidate, lambda mu: [a - b for a, b in zip(zq, mu)],
                   tol=0, zero=Fraction(0))
    if found is None or found[1] != 0:
        raise OracleError(f"L2 oracle: no candidate is feasible with zero Frank-Wolfe gap "
                          f"(z = {z}, w = {w}; best gap {None if found is None else found[1]})")
    mu, _ = found
    return Certified(np.array([float(v) for v in mu]), 0.0, 0.0, tuple(mu))


def project_l2(z, w) -> np.ndarray:
    """Euclidean projection of ``z`` onto the permutahedron of ``w`` (exact, then rounded).

    Example:
        >>> project_l2([3.0, 0.0, 0.1], [3.0, 2.0, 1.0])
        array([3.  , 1.45, 1.55])
    """
    return project_l2_certified(z, w).value


# --------------------------------------------------------------------------- KL


def _kl_candidate(ezs, w_desc, bounds):
    # ezs: exp(z) in descending order (the search runs on exp(z), which orders like z)
    out = []
    for a, b in bounds:
        scale = mpmath.fsum(w_desc[a:b]) / mpmath.fsum(ezs[a:b])
        out.extend(v * scale for v in ezs[a:b])
    return out


def _digits(*magnitudes) -> int:
    """``DIGITS`` significant digits below the largest magnitude involved: ``z - log mu``
    must keep 60 digits *after* the cancellation of terms of size ``|z|``."""
    top = max((abs(float(mpmath.log10(abs(mpmath.mpf(m)) + 1))) for m in magnitudes),
              default=0.0)
    return DIGITS + int(top) + 2


def project_kl_certified(z, w, *, digits: int | None = None) -> Certified:
    """``argmin_{mu in P(w)} KL(mu, e^z)`` for positive ``w``, in high precision.

    ``z`` and ``w`` may be floats or ``mpmath.mpf`` (pass ``w = exp(x)`` as mpf to keep
    its precision). The working precision is ``DIGITS`` digits below the largest of
    ``|z|``, ``|log w|`` (unless ``digits`` is given), so the gradient ``z - log mu`` keeps
    ``DIGITS`` digits after cancellation. The result's ``bound`` is proven:
    ``|mu - mu*|_2 <= sqrt(2 max(w) gap)`` plus the feasibility slack at this precision.

    Example:
        >>> project_kl_certified([0.0, 0.0], [2.0, 1.0]).value
        array([1.5, 1.5])
    """
    z, w, n = _check(z, w)
    if min(mpmath.mpf(v) for v in w) <= 0:
        raise ValueError(f"KL projection needs positive w, got {w}")
    if digits is None:
        digits = _digits(*z, *(mpmath.log(mpmath.mpf(v)) for v in w))
    with mpmath.workdps(digits):
        zm = [mpmath.mpf(v) for v in z]
        wm = [mpmath.mpf(v) for v in w]
        ez = [mpmath.exp(v) for v in zm]
        tol = mpmath.mpf(10) ** (-(digits - 12)) * mpmath.fsum(wm)
        cut = mpmath.mpf(10) ** (-(DIGITS // 3)) * (1 + max(wm))
        found = _solve(ez, wm, _kl_candidate,
                       lambda mu: [a - mpmath.log(b) for a, b in zip(zm, mu)],
                       tol=tol, zero=mpmath.mpf(0))
        if found is None:
            raise OracleError(f"KL oracle: no feasible candidate (z = {z}, w = {w})")
        mu, gap = found
        gap = max(gap, mpmath.mpf(0))
        # Strong convexity of KL on P(w) (entries <= max w), plus the rounding slack of
        # the feasibility test, which moves mu by at most n * tol.
        bound = mpmath.sqrt(2 * max(wm) * gap) + n * tol
        if not bound <= cut:
            raise OracleError(f"KL oracle: best candidate's Frank-Wolfe gap {gap} is not "
                              f"certified small (z = {z}, w = {w})")
        return Certified(np.array([float(v) for v in mu]), float(gap), float(bound), tuple(mu))


def project_kl(z, w) -> np.ndarray:
    """``argmin_{mu in P(w)} KL(mu, e^z)`` (certified; float64 result).

    Example:
        >>> project_kl([5.0, -5.0], [2.0, 1.0])
        array([2., 1.])
    """
    return project_kl_certified(z, w).value


# --------------------------------------------------------------------------- certificates


def fw_gap(mu, z, w, kind: str) -> float:
    """Frank-Wolfe gap of any feasible ``mu`` (e.g. a solver's output) for the projection of
    ``z`` onto ``P(w)``, evaluated at ``DIGITS`` digits; ``inf`` if ``mu`` is infeasible
    beyond 1e-9 relative. ``|mu - mu*|_2 <= sqrt(2 gap)`` (L2) or ``sqrt(2 max(w) gap)`` (KL).

    Example:
        >>> fw_gap([1.5, 1.5], [0.0, 0.0], [2.0, 1.0], "l2")
        0.0
    """
    with mpmath.workdps(DIGITS):
        mu = [mpmath.mpf(float(v)) for v in mu]
        z = [mpmath.mpf(float(v)) for v in z]
        w_desc = sorted((mpmath.mpf(float(v)) for v in w), reverse=True)
        scale = 1e-9 * float(sum(abs(v) for v in w_desc))
        if not _feasible(mu, w_desc, scale):
            return math.inf
        if kind == "l2":
            g = [a - b for a, b in zip(z, mu)]
        else:
            if min(mu) <= 0:
                return math.inf
            g = [a - mpmath.log(b) for a, b in zip(z, mu)]
        return max(float(_gap(g, mu, w_desc)), 0.0)


# --------------------------------------------------------------------------- the operators


def oracle(op: str, x, reg: str, eps: float, direction: str = "ascending") -> np.ndarray:
    """Soft sort (``op="sort"``) or soft rank (``"rank"``) by the paper's definitions.

    Example:
        >>> oracle("rank", [0.0, 10.0, 5.0], "kl", 1.0)
        array([1., 3., 2.])
    """
    x = [float(v) for v in np.asarray(x, dtype=float).ravel()]
    n = len(x)
    rho = list(range(n, 0, -1))
    sign = 1 if direction == "ascending" else -1  # an int: Fraction * float is a float
    # x / eps and rho / eps are formed exactly (rationals) or at a precision that keeps
    # DIGITS digits below their magnitude: the projection's sensitivity to z is O(n).
    top = max([abs(v) for v in x] + [float(n)])
    digits = _digits(mpmath.mpf(top) / mpmath.mpf(eps), top)
    if op == "rank":
        if reg == "l2":
            zq = [sign * Fraction(v) / Fraction(eps) for v in x]
            return project_l2_certified(zq, rho).value
        with mpmath.workdps(digits):
            return project_kl_certified([sign * mpmath.mpf(v) / mpmath.mpf(eps) for v in x],
                                        rho).value
    # sort: descending = P(rho / eps, x); ascending = -P(rho / eps, -x)
    flip = 1 if direction == "descending" else -1
    xs = [flip * v for v in x]
    if reg == "l2":
        s = [Fraction(r) / Fraction(eps) for r in rho]
        return flip * project_l2_certified(s, xs).value
    with mpmath.workdps(digits):
        s = [mpmath.mpf(r) / mpmath.mpf(eps) for r in rho]
        mu = project_kl_certified(s, [mpmath.exp(v) for v in xs]).exact
        return flip * np.array([float(mpmath.log(v)) for v in mu])
