"""Soft sort and soft rank (L2 and KL, both directions) as engine primitives.

Both operators are, per row, one sort and one non-increasing isotonic regression (PAV)
in sorted coordinates (see ``solvers/_soft_sort_core.py``).  With ``v`` the signed inputs
sorted descending, the isotonic problem fits ``s - w`` (rank: ``s = v / eps``,
``w = rho`` or ``log rho``; sort: ``s = rho / eps``, ``w = v``).  A *piece* is a sort
order together with a partition of the sorted positions into consecutive blocks; on it
the output is the solver's block formula, whose Jacobian ``_soft_sort_core.jvp_rows``
computes from ``(perm, block)``.  With ``gamma(U)`` the block value of a set ``U``
(L2: ``mean(s_U) - mean(w_U)``; KL: ``logsumexp(s_U) - logsumexp(w_U)``), the KKT
conditions of PAV say the partition is the solution exactly when

* adjacent blocks decrease: ``gamma(L) - gamma(R) > 0`` at every cut, and
* no block wants to split: ``gamma(suffix) - gamma(prefix) > 0`` at every position
  inside a block (the multiplier of the chain constraint there is positive).

At x, the *tight* positions (where one of these is 0, within the kernel's rounding) are
the kinks: each may be cut or not, which gives the candidate partitions, and ties among
the inputs whose order matters (a cut between tied elements) give the candidate orders.
Each candidate's conditions are the tight ones, written on its own blocks; they are
linear in x for L2 (exact pieces) and first-order rows for KL (not piecewise affine).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from nonsmooth.solvers import _soft_sort_core as core

from . import _layers as L
from ._rule_impls import Option

MAX_OPTIONS = 4096  # candidate pieces of one row before they are sampled
ROUNDING = 64.0  # ulps of the block's magnitudes the kernel's arithmetic may be off by


def route_soft_sort(x, *, op, regularization, strength, descending):
    spec = SoftSortSpec(op, regularization, float(strength), bool(descending))
    return spec, [x], lambda outs: outs[0]


class SoftSortSpec(L.LayerSpec):
    kind = "piecewise"
    batchable = True  # acts on trailing axes: a vmapped axis is one more leading axis

    def __init__(self, op: str, regularization: str, strength: float, descending: bool, *, indices: bool = False):
        self.op, self.reg, self.eps, self.descending, self.indices = op, regularization, strength, descending, indices
        self.name = "soft_rank" if op == "rank" else "soft_sort"
        self.piecewise_affine = regularization == "l2"
        self.rule = L.layer_rule(f"layer:soft_sort:{regularization}", piecewise_affine=self.piecewise_affine,
                                 description="soft sort/rank: pieces are sort orders and PAV block partitions")
        self.alpha = core.alpha(op, strength, descending)
        self._cache: dict = {}

    def key(self):
        return ("soft_sort", self.op, self.reg, self.eps, self.descending, self.indices)

    def describe(self) -> str:
        return (f"{self.name}(regularization={self.reg!r}, regularization_strength={self.eps:g}, "
                f"direction={'descending' if self.descending else 'ascending'})")

    def out_meta(self, metas):
        shape, dt = metas[0]
        return [(shape, dt)] + ([(shape, "int64"), (shape, "int64")] if self.indices else [])

    # ------------------------------------------------------------------ forward

    def _solve(self, x):
        x = np.asarray(x, dtype=np.float64)
        key = (x.shape, x.tobytes())
        hit = self._cache.get(key)
        if hit is None:
            n = x.shape[-1]
            x2 = np.ascontiguousarray(x).reshape(-1, n)
            out, perm, block = core.forward_rows(x2, op=self.op, regularization=self.reg, strength=self.eps,
                                                 descending=self.descending)
            hit = (x2, np.asarray(out, dtype=np.float64), np.asarray(perm, dtype=np.int64),
                   np.asarray(block, dtype=np.int64))
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def forward(self, xs):
        x = xs[0]
        x2, out, perm, block = self._solve(x)
        res = [out.reshape(x.shape)]
        if self.indices:
            res += [perm.reshape(x.shape), block.reshape(x.shape)]
        return res

    # ------------------------------------------------------------------ pieces

    def sites(self, node_i, xs, tol, int_used):
        x = xs[0]
        x2, out, perm, block = self._solve(x)
        n = x2.shape[1]
        found = []
        for r in range(x2.shape[0]):
            cand = self._row(x2[r], perm[r], block[r], tol, r * n)
            if cand is None:
                continue
            options, default, text, weight, complete = cand
            if int_used and self.indices:
                text += " (its integer outputs perm/block change with the piece)"
            found.append(L.LayerSite(node_i, ("row", r), "layer", options, f"{self.name} row {r}: {text}",
                                     clarke=f"conv of the Jacobians of {len(options)} candidate piece(s)",
                                     discrete=bool(int_used and self.indices), complete=complete, weight=weight,
                                     members=None, default=default))
        return found, (x2, perm, block)

    def _arrays(self, v):
        """S, W (anchored at position 0) and the coefficient maker for the sorted keys ``v``."""
        n = len(v)
        rho = np.arange(n, 0, -1, dtype=np.float64)
        if self.op == "rank":
            S = core.key_diff(v, v[0], rank=True, strength=self.eps)
            W = rho if self.reg == "l2" else np.log(rho)
        else:
            S = -np.arange(n, dtype=np.float64) / self.eps
            W = v - v[0]
        return S, W

    def _gamma(self, S, W, a, b):
        """Block value of positions a..b (inclusive), up to a shift common to all sets."""
        if self.reg == "l2":
            return float(np.mean(S[a:b + 1]) - np.mean(W[a:b + 1]))
        return float(_lse(S[a:b + 1]) - _lse(W[a:b + 1]))

    def _dgamma(self, S, W, a, b):
        """Coefficients c (positions a..b) with d gamma = sum c_i dv_i."""
        m = b - a + 1
        if self.reg == "l2":
            c = np.full(m, 1.0 / m)
        else:
            c = _softmax(S[a:b + 1] if self.op == "rank" else W[a:b + 1])
        return c / self.eps if self.op == "rank" else -c

    def _row(self, x, perm0, block0, tol, base):
        n = len(x)
        if n < 2:
            return None
        sign = 1.0 if self.alpha > 0 else -1.0
        v0 = sign * x[perm0]
        S, W = self._arrays(v0)
        scale = 1.0 / self.eps if self.op == "rank" else 1.0
        starts0 = np.flatnonzero(block0 == np.arange(n))
        ends0 = np.r_[starts0[1:] - 1, n - 1]
        bounds0 = set(int(e) for e in ends0[:-1])  # cut after position j
        blk_of = np.repeat(np.arange(len(starts0)), np.diff(np.r_[starts0, n]))

        def rtol(a, b):
            mag = (np.ptp(S[a:b + 1]) + np.ptp(W[a:b + 1]) + np.max(np.abs(W[a:b + 1])) * (self.op == "rank")
                   + 1.0)
            return tol * scale + ROUNDING * np.finfo(np.float64).eps * mag * (b - a + 1)

        tight = []
        for j in range(n - 1):
            bi = blk_of[j]
            if j in bounds0:  # a cut of the solver's partition: do the blocks' values tie?
                a, b = starts0[bi], ends0[bi + 1]
                g = self._gamma(S, W, a, j) - self._gamma(S, W, j + 1, b)
            else:  # inside one of its blocks: does the block want to split here?
                a, b = starts0[bi], ends0[bi]
                g = self._gamma(S, W, a, j) - self._gamma(S, W, j + 1, b)
            if abs(g) <= rtol(a, b):
                tight.append(j)
        # ties among the inputs whose order matters: a cut (tight or not) inside the group
        groups = []
        j = 0
        while j < n - 1:
            if abs(v0[j] - v0[j + 1]) <= tol:
                g0 = j
                while j < n - 1 and abs(v0[j] - v0[j + 1]) <= tol:
                    j += 1
                cuts = [q for q in range(g0, j) if q in bounds0 or q in tight]
                if cuts:
                    groups.append((g0, j))
            j += 1
        if not tight and not groups:
            return None
        T = tight
        orders = [list(itertools.permutations(range(g0, g1 + 1))) for g0, g1 in groups]
        n_opts = (2 ** len(T)) * int(np.prod([len(o) for o in orders])) if orders else 2 ** len(T)
        complete = n_opts <= MAX_OPTIONS
        cut_sets = list(itertools.product((False, True), repeat=len(T))) if complete else None
        default_cuts = tuple(j in bounds0 for j in T)
        if not complete:
            rng = np.random.default_rng(base)
            cut_sets = [default_cuts, tuple([False] * len(T)), tuple([True] * len(T))]
            cut_sets += [tuple(bool(b) for b in rng.integers(0, 2, len(T))) for _ in range(61)]
            orders = [[o[0], o[-1]] for o in orders]
        options, default = [], 0
        for order_combo in (itertools.product(*orders) if orders else [()]):
            perm = perm0.copy()
            order_conds = []
            for (g0, g1), order in zip(groups, order_combo):
                perm[g0:g1 + 1] = perm0[list(order)]
                for q in range(g0, g1):  # v_q > v_{q+1} along the order: sign (dx_p - dx_p') > 0
                    order_conds.append([(0, base + int(perm[q]), sign), (0, base + int(perm[q + 1]), -sign)])
            v = sign * x[perm]
            S, W = self._arrays(v)
            for cuts in dict.fromkeys(cut_sets):
                cutset = (bounds0 - set(T)) | {j for j, c in zip(T, cuts) if c}
                starts = np.array([0] + sorted(j + 1 for j in cutset), dtype=np.int64)
                ends = np.r_[starts[1:] - 1, n - 1]
                blk = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
                conds = list(order_conds)
                for j, c in zip(T, cuts):
                    bi = blk[j]
                    if c:  # gamma(left block) - gamma(right block) > 0
                        row = self._cond(S, W, perm, sign, base, (starts[bi], j, 1.0), (j + 1, ends[bi + 1], -1.0))
                    else:  # gamma(suffix) - gamma(prefix) > 0 inside the block
                        row = self._cond(S, W, perm, sign, base, (j + 1, ends[bi], 1.0), (starts[bi], j, -1.0))
                    conds.append(row)
                block = np.repeat(starts, np.diff(np.r_[starts, n]))
                label = "cuts after " + (",".join(str(j) for j in sorted(cutset)) or "none")
                if groups:
                    label += "; order " + " ".join(str(int(q)) for q in perm)
                if cuts == default_cuts and all(tuple(o) == tuple(range(g0, g1 + 1))
                                                for (g0, g1), o in zip(groups, order_combo)):
                    default = len(options)
                options.append(Option(label, conds, (perm, block)))
        what = []
        if T:
            what.append(f"{len(T)} tight PAV condition(s) (the block partition changes)")
        if groups:
            what.append(f"{len(groups)} tie group(s) split by a block boundary")
        text = " and ".join(what) + f": {len(options)} candidate pieces"
        weight = len(T) + sum(g1 - g0 for g0, g1 in groups)
        return options, default, text, weight, complete

    def _cond(self, S, W, perm, sign, base, plus, minus):
        out: dict = {}
        for (a, b, c) in (plus, minus):
            coef = self._dgamma(S, W, a, b)
            for q, cq in zip(range(a, b + 1), coef):
                e = base + int(perm[q])
                out[e] = out.get(e, 0.0) + c * sign * float(cq)
        return [(0, e, cf) for e, cf in out.items() if cf != 0.0]

    # ------------------------------------------------------------------ values and tangents

    def apply(self, xs, tans, chosen, ctx, k):
        x = xs[0]
        x2, out, perm0, block0 = self._solve(x)
        vals = [out.reshape(x.shape)]
        perm, block = perm0, block0
        if chosen:
            perm, block = perm0.copy(), block0.copy()
            for site, opt in chosen:
                r = site.key[1]
                perm[r], block[r] = opt.data
        if self.indices:
            vals += [perm.reshape(x.shape), block.reshape(x.shape)]
        t = tans[0] if tans else None
        if t is None or k == 0:
            return vals, [None] * len(vals)
        R_, n = x2.shape
        T = t.reshape(k * R_, n)
        J = core.jvp_rows(np.tile(x2, (k, 1)), np.tile(perm, (k, 1)), np.tile(block, (k, 1)), T, op=self.op,
                          regularization=self.reg, strength=self.eps, descending=self.descending)
        return vals, [J.reshape(k, -1)] + [None] * (len(vals) - 1)


def _lse(a: np.ndarray) -> float:
    m = float(np.max(a))
    return m + math.log(float(np.sum(np.exp(a - m))))


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - np.max(a))
    return e / e.sum()
