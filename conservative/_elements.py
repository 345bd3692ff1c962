"""Collect B-subdifferential elements at x from every source, and what AD could return.

Sources, cheapest first: the exact piece enumeration (:mod:`._pieces`) when few kinks are
active; AD-selection Jacobians (vertex derivative choices per kink) whose first-order
region is nonempty; lexicographic (LD) derivatives along random nonsingular direction
matrices (Khan & Barton: exact B-elements for PC^1 programs); the enumeration again
when the elements found do not already settle AD.  Also the *convention* Jacobians: one
derivative choice per primitive shared by all its sites (what a framework setting such
as relu'(0) = s changes), and whether f's branch limits agree (:mod:`._continuity`).

Contract: every element in ``b_elems`` is a B-subdifferential element of f at x
(each source is sound on its own); ``exact`` and ``exact_basis`` come from the piece
stage's contract, never from here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import _forward as F
from ._boxes import box_analysis
from ._continuity import branch_limits
from ._lp import strictly_feasible
from ._pieces import enumerate_pieces
from ._problem import check_size

ALWAYS_ENUMERATE = 8  # active kinks up to which the enumeration runs even when not needed
N_RANDOM_CONVENTIONS = 2


@dataclasses.dataclass
class Analysis:
    J0: np.ndarray | None
    out0: np.ndarray
    sites: dict
    b_elems: list
    b_sources: list
    sel: list
    conv: list
    exact: bool
    exact_basis: str
    discontinuous: str
    continuity: str  # "continuous" | "jump" | "unsure"
    notes: list
    box: object = None  # a _boxes.BoxSet when the Clarke Jacobian is a Minkowski sum of small sets


def _site_assign(seed: int, choice: str):
    def assign(site):
        if choice == "first":
            return 0
        if choice == "last":
            return len(site.options) - 1
        h = hash((seed, site.node, _key_hash(site.key))) & 0xFFFFFFFF
        return int(np.random.default_rng(h).integers(len(site.options)))

    return assign


def _key_hash(key):
    return tuple(tuple(k.tolist()) if isinstance(k, np.ndarray) else k for k in key)


def assignments(sites: dict, n_directions: int, seed: int) -> list:
    """Vertex choices to try: every combination when there are at most n_directions + 2,
    else all-first, all-last and n_directions random ones."""
    order = sorted(sites.values(), key=lambda s: (s.node, str(s.key)))
    radices = [max(1, len(s.options)) for s in order]
    n_combos = int(np.prod(radices, dtype=float)) if radices else 1
    if n_combos > n_directions + 2:
        return ([_site_assign(0, "first"), _site_assign(0, "last")]
                + [_site_assign(seed * 100003 + j, "random") for j in range(n_directions)])
    index = {(s.node, _key_hash(s.key)): i for i, s in enumerate(order)}
    out = []
    for c in range(n_combos):
        digits, r = [], c
        for b in radices:
            digits.append(r % b)
            r //= b
        out.append(lambda site, d=digits: d[index[(site.node, _key_hash(site.key))]]
                   if (site.node, _key_hash(site.key)) in index else 0)
    return out


def convention_weights(P, sites: dict, seed: int) -> list[dict]:
    """Per-primitive conventions to try: every vertex combination of the primitives' keys
    (up to 64) and a few random interior values (a polynomial in s that agrees at random
    points and at the vertices is constant with probability one)."""
    keys = sorted({F.convention_key(s, P.graph.nodes[s.node]) for s in sites.values()})
    rng = np.random.default_rng(seed + 7)
    out = []
    if len(keys) <= 6:
        for bits in range(1 << len(keys)):
            out.append({k: float((bits >> j) & 1) for j, k in enumerate(keys)})
    else:
        out += [{k: 0.0 for k in keys}, {k: 1.0 for k in keys}]
    for _ in range(N_RANDOM_CONVENTIONS):
        out.append({k: float(rng.uniform(0.05, 0.95)) for k in keys})
    return out


def convention_jacobians(P, sites: dict, seed: int) -> list:
    return [P.run(F.ConventionPolicy(w))[0].jac for w in convention_weights(P, sites, seed)]


def distinct(mats: list, tol: float = 1e-10) -> list:
    out = []
    for m in mats:
        if not np.all(np.isfinite(m)):
            if not any(np.array_equal(m, o, equal_nan=True) for o in out):
                out.append(m)
            continue
        scale = 1.0 + float(np.max(np.abs(m))) if m.size else 1.0
        if not any(np.all(np.isfinite(o)) and np.max(np.abs(m - o)) <= tol * scale for o in out):
            out.append(m)
    return out


def analyse(P, *, exact_budget: int, n_directions: int, seed: int, need_enum: Callable | None = None,
            conventions: bool = True) -> Analysis:
    rng = np.random.default_rng(seed)
    n = P.n_in
    notes: list[str] = []
    P.interp.run(F.LexPolicy(), [None] * len(P.xs64))
    out0 = P.values_at(P.x_flat())  # f(x) itself (branch choices may move values to one-sided limits)
    if not P.interp.sites_seen:
        # No kink active: the Jacobian is computed lazily (see _certificate.smooth_jacobian).
        return Analysis(None, out0, {}, [], ["identity"], [], [], True, "no kink is active", "", "continuous", notes)
    check_size(P)
    leaf0 = P.run(F.LexPolicy())[0]
    sites = dict(P.interp.sites_seen)

    kinds = {s.kind for s in sites.values()}
    weight = sum(s.weight for s in sites.values())
    b_elems, b_src, sel = [], [], []
    leaves_for_continuity = []
    pc1 = not (kinds & {"nonlipschitz", "unsupported"})

    exact, basis, enumerated = False, "", False
    blockers = kinds & {"norm", "unsupported", "nonlipschitz"}
    incomplete = [s for s in sites.values() if not s.complete]
    if blockers:
        basis = {
            "norm": "a 2-norm at 0 has infinitely many pieces",
            "unsupported": "a primitive at a kink is not supported",
            "nonlipschitz": "a non-Lipschitz point is active",
        }[sorted(blockers)[0]]
    elif incomplete:
        basis = (getattr(incomplete[0], "incomplete_reason", "")  # a layer's own reason (_layers.py)
                 or f"a tied group of {len(incomplete[0].members)} elements is too large to enumerate its orderings")
    elif weight > exact_budget:
        basis = f"{weight} active kinks exceed exact_budget={exact_budget}"
    eligible = not basis

    # Many kinks in one layer: the Clarke Jacobian as a Minkowski sum, decided exactly.
    if weight > ALWAYS_ENUMERATE:
        box = box_analysis(P, sites)
        if box is not None:
            return _box_analysis_result(P, box, leaf0, out0, sites, n_directions, seed, conventions, notes)

    def enumerate_now():
        nonlocal exact, basis, enumerated
        enumerated = True
        ps = enumerate_pieces(P, budget=exact_budget, seed=seed)
        exact, basis = ps.exact, ps.basis
        for lf in ps.leaves:
            if lf.certified:
                b_elems.append(lf.jac)
                b_src.append("enumeration")
                leaves_for_continuity.append(lf)
        for J in ps.extra:
            b_elems.append(J)
            b_src.append("second order")

    # 1. Exact enumeration of the essentially active pieces first when few kinks are active.
    if eligible and weight <= ALWAYS_ENUMERATE:
        enumerate_now()

    # With many kinks, stop sampling once AD is inside the hull of certified elements
    # (jumps and comparisons need every branch for the continuity check).
    def settled():
        return (need_enum is not None and not exact and weight > ALWAYS_ENUMERATE
                and not (kinds & {"jump", "compare"}) and not need_enum(b_elems))

    # 2. AD-selection Jacobians: every vertex choice when there are few, else the all-first,
    #    all-last and n_directions random ones.
    for idx, assign in enumerate(assignments(sites, n_directions, seed)):
        if idx >= 10 and idx % 8 == 2 and settled():
            break
        leaf = P.run(F.AssignPolicy(assign))[0]
        sel.append(leaf.jac)
        if pc1 and leaf.certified and not any(site.kind == "norm" for site, _ in leaf.choices):
            ok, _ = strictly_feasible(leaf.conds)
            if ok and not (leaf.degenerate and any(site.discrete for site, _ in leaf.choices)):
                b_elems.append(leaf.jac)
                b_src.append("selection")
                leaves_for_continuity.append(leaf)

    # 3. LD derivatives along +-identity and random direction matrices: exact B-elements
    #    for PC1 programs (Khan & Barton).  A cross-check only when the enumeration is exact.
    n_mats = 4 if exact else max(2, n_directions)
    mats = [np.eye(n), -np.eye(n)]
    while len(mats) < n_mats:
        M = rng.standard_normal((n, n))
        mats += [M, -M]
    fresh = []  # per matrix: did it give an element not seen before?
    for idx, M in enumerate(mats[:n_mats]):
        if idx >= 8 and idx % 8 == 0 and settled():
            break
        if idx >= 16 and not any(fresh[-8:]):
            break  # the last eight direction matrices found nothing new: saturated
        leaf = P.run(F.LexPolicy(), M)[0]
        try:
            Minv = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            continue
        J = leaf.jac @ Minv
        with np.errstate(all="ignore"):
            near = np.abs(J - np.round(J)) < 1e-12  # M^{-1} round-off around exact (often integer) pieces
        J = np.where(near, np.round(J), J)
        leaves_for_continuity.append(leaf)
        if pc1 and leaf.certified and np.all(np.isfinite(J)):
            fresh.append(len(distinct(b_elems + [J])) > len(distinct(b_elems)))
            b_elems.append(J)
            b_src.append("LD")
        else:
            fresh.append(False)

    # 4. More kinks: enumerate only if the elements found do not already settle AD.
    if eligible and not enumerated:
        if need_enum is not None and not need_enum(b_elems):
            basis = f"enumeration of {weight} active kinks skipped: AD already lies in the hull of the elements found"
        else:
            enumerate_now()

    conv = convention_jacobians(P, sites, seed) if conventions else []

    # 5. Continuity: essentially active pieces whose limits at x differ -> f jumps at x.
    discontinuous, continuity = "", "continuous"
    if kinds & {"jump", "compare"} or any(s.discrete for s in sites.values()):
        continuity, text = branch_limits(P, leaves_for_continuity)
        if continuity == "jump":
            discontinuous = text
        elif continuity == "unsure":
            notes.append(text)
    return Analysis(leaf0.jac, out0, sites, b_elems, b_src, sel, conv, exact, basis, discontinuous, continuity, notes)


def _box_analysis_result(P, box, leaf0, out0, sites, n_directions, seed, conventions, notes) -> Analysis:
    """Selections and conventions follow from J(s) = J0 + sum s_i D_i without more passes:
    one summed generator per convention key, then J(s) for a shared s per key is additive."""
    order = sorted(sites.values(), key=lambda s: (s.node, str(s.key)))
    keys = [F.convention_key(s, P.graph.nodes[s.node]) for s in order]
    per_key = {}
    for key in sorted(set(keys)):
        idx = np.array([j for j, k in enumerate(keys) if k == key])
        per_key[key] = (box.A[:, idx] * box.delta[idx]) @ box.R[idx]
    top = box.J0 + sum(per_key.values())
    sel = [box.J0, top]
    conv = []
    if conventions:
        for w in convention_weights(P, sites, seed):
            conv.append(box.J0 + sum(w[key] * D for key, D in per_key.items()))
    elems = box.representatives()
    return Analysis(leaf0.jac, out0, sites, elems, ["box"] * len(elems), sel, conv, True, box.basis, "",
                    "continuous", notes, box)
