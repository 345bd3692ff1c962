"""Stage 3, pieces: enumerate the essentially active pieces at x, with an exactness contract.

Every active kink site splits a neighbourhood of x by the sign of its *argument* (relu's
input, ``a - b`` at a tie of max, differences of tied sort keys).  A sign pattern is a
*piece*; it is essentially active when its region has interior arbitrarily close to x,
and the Clarke Jacobian is the convex hull of the gradients of the essentially active
pieces.  The enumeration walks the patterns depth first and prunes a partial pattern
when its first-order cone ``{d : row_c . d > 0}`` is empty (an LP).

**What is always true.** A piece reported is essentially active: its first-order cone is
open and nonempty (so ``x + t d`` lies in its region), or a second-order arc lies in its
region (:mod:`._second_order`).  Its gradient is therefore a B-subdifferential element.

**When the set is exact** (``exact=True``; ``basis`` names the case):

1. every first-order pruning is exact, because the rows involved are
   (a) from piecewise-affine kink arguments (then the cone *is* the region near x), or
   (b) dependent through an identity among the arguments: a nonnegative combination of
   them is identically zero, or a nonpositive sum of squares (``relu(g)`` and
   ``relu(-g)``, ``-(u*u) > 0``; checked on linear forms over atoms by :mod:`._canonical`).
   Linearly independent rows (a linear-independence kink qualification, LIKQ) never
   prune, since their cone is never empty.  And no pruning follows a kink whose
   non-affine argument has a zero gradient; or
2. every pattern that (1) cannot settle is decided at second order (a witness arc or a
   Farkas/negative-curvature emptiness certificate) — for unary kinks, ties of binary
   max/min, comparisons and tie orders of selections; at most
   ``MAX_SECOND_ORDER_PATTERNS`` patterns and ``MAX_SECOND_ORDER_INPUTS`` inputs.

Otherwise the set is what was *found so far* (``exact=False``) and the reason says which
condition failed, e.g. kink arguments that agree to first order but not to second, whose
thin pieces may be higher order than two (``x**4 < y < 2 x**4``).  The enumeration also
gives up (not exact) past ``max_leaves`` pieces or ``budget`` active kinks, at a 2-norm at 0
(infinitely many pieces), at a tied group too large to enumerate, and when a jump or a
comparison ties to first order with branches that differ.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from . import _forward as F
from ._canonical import farkas_identity, pruning_is_exact
from ._frozen import FrozenProgram, NotFrozen
from ._second_order import decide

MAX_PIECES = 4096  # leaves of the exact enumeration before it gives up
MAX_SECOND_ORDER_PATTERNS = 256
MAX_SECOND_ORDER_INPUTS = 64


@dataclasses.dataclass
class PieceSet:
    leaves: list  # first-order leaves (each an essentially active piece when certified)
    extra: list  # gradients of pieces found active at second order
    exact: bool
    basis: str  # why exact, or why not


def _site_id(site):
    return (site.node, site.key)


def enumerate_pieces(P, *, budget: int, seed: int = 0) -> PieceSet:
    """Depth-first enumeration of the essentially active pieces (see the module docstring)."""
    try:
        leaves = P.run(F.EnumPolicy(), None, max_leaves=MAX_PIECES, max_sites=budget)
    except F.BudgetExceeded as e:
        return PieceSet([], [], False, f"enumeration stopped: {e}")
    except F.NotEnumerable as e:
        return PieceSet([], [], False, f"enumeration impossible: {e}")
    pruned = list(P.interp.pruned)
    sites = dict(P.interp.sites_seen)
    if any(not lf.certified for lf in leaves):
        return PieceSet(leaves, [], False, "a jump or comparison ties to first order (decided at second order)")
    uncertain = []
    kinds = set()
    for pr in pruned:
        if pr.after_degenerate_nonaffine:
            uncertain.append(pr)
            kinds.add("degenerate")
            continue
        ok, why = pruning_is_exact(P, pr.conds, pr.meta, pr.choices)
        kinds.add(why)
        if not ok:
            uncertain.append(pr)
    nonaffine_any = any(not m.affine for lf in leaves for m in lf.meta) or any(not m.affine for pr in pruned for m in pr.meta)
    if not uncertain:
        return PieceSet(leaves, [], True, _basis(nonaffine_any, kinds))
    extra, ok, why = _second_order_patterns(P, sites, leaves, pruned, uncertain, seed)
    if ok:
        return PieceSet(leaves, extra, True, "first-order sign patterns, and a second-order analysis of the "
                                             "patterns whose kink arguments agree to first order")
    return PieceSet(leaves, extra, False,
                    "kink arguments that are not piecewise affine have linearly dependent gradients, so pieces "
                    "thinner than first order may exist; " + why)


def _basis(nonaffine: bool, kinds: set) -> str:
    if not nonaffine:
        return "first-order sign patterns are exact because every kink argument is piecewise affine"
    parts = ["first-order sign patterns are exact here"]
    if "identity" in kinds:
        parts.append("the kink arguments' gradients are dependent only through identities among the arguments")
    else:
        parts.append("the non-affine kink arguments have linearly independent gradients wherever a pattern was "
                     "pruned (LIKQ)")
    return ": ".join(parts)


def _second_order_patterns(P, sites: dict, leaves, pruned, uncertain, seed):
    """Decide every full pattern an uncertain pruning left open; returns (extra gradients,
    all decided?, reason)."""
    if P.n_in > MAX_SECOND_ORDER_INPUTS:
        return [], False, f"the second-order analysis is limited to {MAX_SECOND_ORDER_INPUTS} inputs"
    order = sorted(sites.values(), key=lambda s: (s.node, str(s.key)))
    if any(s.kind not in ("kink", "tie", "group", "compare") or not s.complete for s in order):
        bad = next(s for s in order if s.kind not in ("kink", "tie", "group", "compare") or not s.complete)
        return [], False, f"the second-order analysis does not handle {bad.kind} sites ({bad.text})"
    n_patterns = int(np.prod([len(s.options) for s in order], dtype=float))
    if n_patterns > MAX_SECOND_ORDER_PATTERNS:
        return [], False, f"{n_patterns} sign patterns exceed the second-order budget of {MAX_SECOND_ORDER_PATTERNS}"
    collapsed = set(P.interp.collapsed)
    # a pattern differing from a found piece only at sites whose options agree to first
    # order *in that piece's branch* has that piece's gradient: nothing to decide
    found = [_found_key(lf, collapsed) for lf in leaves]
    exact_prunes = [{_site_id(s): o.label for s, o in pr.choices} for pr in pruned if not any(pr is u for u in uncertain)]
    try:
        frozen = FrozenProgram(P, order)
    except NotFrozen as e:
        return [], False, str(e)
    extra, undecided = [], 0
    for combo in itertools.product(*[range(len(s.options)) for s in order]):
        pat = {_site_id(s): s.options[c].label for s, c in zip(order, combo)}
        if any(all(pat.get(k) == v for k, v in f.items()) for f in found):
            continue
        if any(all(pat.get(k) == v for k, v in p.items()) for p in exact_prunes):
            continue
        pattern = {_site_id(s): s.options[c] for s, c in zip(order, combo)}
        try:
            rows, hess = frozen.conditions(pattern)
        except Exception as e:  # a primitive without second derivatives in the framework
            return extra, False, f"the framework could not differentiate the frozen program twice ({type(e).__name__})"
        keep = ~_identically_zero(P, order, pattern, rows)
        rows, hess = rows[keep], hess[keep]
        if _identity_empty(P, order, pattern, rows, keep):
            continue
        verdict = decide(rows, hess, seed=seed) if len(rows) else "active"
        if verdict == "active":
            leaf = P.run(F.AssignPolicy(_assign_from(pattern)))[0]
            extra.append(leaf.jac)
        elif verdict == "undecided":
            undecided += 1
    if undecided:
        return extra, False, (f"{undecided} sign pattern(s) stay undecided at second order (their regions, if any, "
                              "are thinner than x**2)")
    return extra, True, ""


def _found_key(leaf, collapsed: set) -> dict:
    """A found piece's choices, less the sites collapsed under the choices before them."""
    key, before = {}, []
    for s, o in leaf.choices:
        if (s.node, s.key, tuple(before)) not in collapsed:
            key[_site_id(s)] = o.label
        before.append((s.node, s.key, o.label))
    return key


def _metas(order, pattern):
    from ._forward import CondMeta

    choices = tuple((s, pattern[_site_id(s)]) for s in order)
    return choices, [CondMeta(s.node, tuple(cond), False, choices) for s in order for cond in pattern[_site_id(s)].conds]


def _identically_zero(P, order, pattern, rows) -> np.ndarray:
    """The conditions that are identically zero: ties between arguments that are the same
    expression (``min(a, a)``, ``relu(a - a)``).  Such a site splits nothing (every option
    is the same function), so its strict conditions, never satisfiable, must not make the
    pattern look empty: they are dropped."""
    from ._canonical import Canonicalizer, condition_form

    choices, metas = _metas(order, pattern)
    out = np.zeros(len(metas), dtype=bool)
    canon = None
    for i, meta in enumerate(metas):
        if np.max(np.abs(rows[i]), initial=0.0) == 0.0:
            canon = canon or Canonicalizer(P, choices)
            out[i] = not any(v != 0.0 for v in condition_form(canon, P, meta).values())
    return out


def _identity_empty(P, order, pattern, rows, keep) -> bool:
    """Whether a nonnegative combination of the pattern's (kept) conditions is identically
    zero (or a nonpositive sum of squares): then they cannot all be positive anywhere."""
    choices, metas = _metas(order, pattern)
    metas = [m for m, k in zip(metas, keep) if k]
    return farkas_identity(P, list(rows), metas, choices)


def _assign_from(pattern: dict):
    labels = {k: o.label for k, o in pattern.items()}

    def assign(site):
        want = labels.get(_site_id(site))
        for j, o in enumerate(site.options):
            if o.label == want:
                return j
        return 0

    return assign
