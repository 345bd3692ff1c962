"""Independent oracles for the layer tests: a textbook soft sort/rank and piece sampling.

``soft_reference`` re-derives soft sort and rank from the paper (Blondel et al. 2020):
sort, then pool-adjacent-violators for a non-increasing fit with the L2 or KL block value,
written plainly (no anchoring, no C kernel), so it shares no code with the solver.
``sampled_pieces`` finds the Jacobians of the pieces around x by float64 central
differences at random points near x, where no kink is active.
"""
from __future__ import annotations

import math

import numpy as np


def _pav_noninc(s, w, reg):
    """Blocks [(start, end)] and values of the non-increasing isotonic fit of s - w."""

    def value(a, b):
        if reg == "l2":
            return float(np.mean(s[a:b + 1]) - np.mean(w[a:b + 1]))
        lse = lambda u: float(np.max(u) + np.log(np.sum(np.exp(u - np.max(u)))))  # noqa: E731
        return lse(s[a:b + 1]) - lse(w[a:b + 1])

    blocks = []
    for i in range(len(s)):
        blocks.append((i, i))
        while len(blocks) > 1 and value(*blocks[-2]) <= value(*blocks[-1]):
            (a, _), (_, b) = blocks[-2], blocks[-1]
            blocks[-2:] = [(a, b)]
    v = np.empty(len(s))
    for a, b in blocks:
        v[a:b + 1] = value(a, b)
    return v


def soft_reference(x, *, op, reg="l2", eps=1.0, direction="ascending"):
    """Soft sort/rank of the last axis of a float64 array, from the definitions."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim > 1:
        return np.stack([soft_reference(r, op=op, reg=reg, eps=eps, direction=direction) for r in x])
    n = len(x)
    rho = np.arange(n, 0, -1, dtype=np.float64)
    if op == "rank":
        z = (x if direction == "ascending" else -x) / eps
        order = np.argsort(-z, kind="stable")
        s = z[order]
        w = rho if reg == "l2" else np.log(rho)
        v = _pav_noninc(s, w, reg)
        out_sorted = s - v if reg == "l2" else np.exp(s - v)
        out = np.empty(n)
        out[order] = out_sorted
        return out
    xs = x if direction == "descending" else -x
    w = np.sort(xs)[::-1]
    s = rho / eps
    v = _pav_noninc(s, w, reg)
    out = s - v
    return out if direction == "descending" else -out


def fd_jacobian(f, x, h=1e-7):
    x = np.asarray(x, dtype=np.float64)
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = h
        cols.append((np.ravel(f((x.ravel() + e).reshape(x.shape))) - np.ravel(f((x.ravel() - e).reshape(x.shape))))
                    / (2 * h))
    return np.stack(cols, axis=1)


def sampled_pieces(f, x, *, n_samples=300, t=1e-4, h=1e-7, tol=1e-5, seed=0):
    """Distinct Jacobians of f at random points x + t d (|d| = 1), each checked by two steps."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    found = []
    for _ in range(n_samples):
        d = rng.standard_normal(x.size)
        d /= np.linalg.norm(d)
        p = x.ravel() + t * (1.0 + np.abs(x).max()) * d
        J1 = fd_jacobian(f, p.reshape(x.shape), h)
        J2 = fd_jacobian(f, p.reshape(x.shape), h / 10)
        if np.max(np.abs(J1 - J2)) > tol:  # a kink within the step: skip this point
            continue
        if not any(np.max(np.abs(J1 - F)) <= tol for F in found):
            found.append(J1)
    return found


def same_sets(A, B, tol):
    """Every matrix of A is within tol of one of B and vice versa."""
    A, B = list(A), list(B)
    return (all(any(np.max(np.abs(a - b)) <= tol for b in B) for a in A)
            and all(any(np.max(np.abs(a - b)) <= tol for a in A) for b in B))


def gumbel_argmax_jacobian(theta, sigma):
    p = np.exp((theta - theta.max()) / sigma)
    p /= p.sum()
    return (np.diag(p) - np.outer(p, p)) / sigma


LOG2 = math.log(2.0)
