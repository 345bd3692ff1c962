"""Exact analysis of a univariate SymPy ``Piecewise`` around its breakpoints.

SymPy's ``limit`` does not reliably pick the branch of a ``Piecewise`` that is active on
one side of a point, so we do it ourselves: the conditions of a piecewise function of
``x`` can only change truth value where one of their relations has a root, so between
two consecutive roots one branch is active throughout.  We find that branch by
evaluating the conditions exactly at a rational point strictly inside the gap, then take
ordinary limits of that smooth branch.
"""
from __future__ import annotations

import dataclasses

import sympy as sp


def breakpoints(f, x) -> list:
    """Real roots (sorted) of the relations in ``f``'s Piecewise conditions, in ``x``."""
    points = set()
    for pw in f.atoms(sp.Piecewise):
        for _, cond in pw.args:
            if cond in (sp.true, sp.false):
                continue
            for rel in cond.atoms(sp.Rel):
                g = rel.lhs - rel.rhs
                if not g.has(x):
                    continue
                for root in sp.solveset(g, x, domain=sp.S.Reals):
                    points.add(sp.nsimplify(root) if root.is_Float else root)
                if not isinstance(sp.solveset(g, x, domain=sp.S.Reals), sp.FiniteSet):
                    raise ValueError(f"cannot isolate the breakpoints of {rel} in {x}")
    return sorted(points, key=lambda p: float(p))


def _probe(a, other, fraction=sp.Rational(1, 3)):
    """A rational strictly between ``a`` and ``other`` (``other`` may be +-oo)."""
    if other in (sp.oo, -sp.oo):
        return a + (1 if other == sp.oo else -1)
    return a + (other - a) * fraction


def branch_at(f, x, point):
    """The expression ``f`` evaluates to at ``x = point`` with every Piecewise resolved."""
    def pick(*args):
        for expr, cond in args:
            c = cond.subs(x, point) if cond not in (sp.true, sp.false) else cond
            c = sp.simplify(c)
            if c == sp.true:
                return expr
            if c != sp.false:
                raise ValueError(f"cannot decide the condition {cond} at {x} = {point}")
        raise ValueError(f"no branch of the piecewise function is active at {x} = {point}")

    return f.replace(sp.Piecewise, lambda *args: pick(*args))


@dataclasses.dataclass(frozen=True)
class Local:
    """The local picture of ``f`` at ``a``: one-sided branches, values, derivative limits."""

    at: object
    left_branch: object
    right_branch: object
    value_left: object
    value: object
    value_right: object
    slope_left: object   # lim_{x -> a-} f'(x)
    slope_right: object  # lim_{x -> a+} f'(x)


def local(f, x, a, *, points=None) -> Local:
    """The branches active just left and right of ``a`` and their limits at ``a``."""
    points = breakpoints(f, x) if points is None else points
    below = [p for p in points if float(p) < float(a)]
    above = [p for p in points if float(p) > float(a)]
    left_probe = _probe(a, below[-1] if below else -sp.oo)
    right_probe = _probe(a, above[0] if above else sp.oo)
    left_branch = branch_at(f, x, left_probe)
    right_branch = branch_at(f, x, right_probe)
    value = branch_at(f, x, a).subs(x, a)
    return Local(
        at=a,
        left_branch=left_branch,
        right_branch=right_branch,
        value_left=sp.limit(left_branch, x, a, "-"),
        value=sp.simplify(value),
        value_right=sp.limit(right_branch, x, a, "+"),
        slope_left=sp.limit(sp.diff(left_branch, x), x, a, "-"),
        slope_right=sp.limit(sp.diff(right_branch, x), x, a, "+"),
    )


def is_zero_1d(f, x) -> bool:
    """True iff the univariate piecewise ``f`` vanishes for every real ``x`` (exactly)."""
    points = breakpoints(f, x)
    edges = [-sp.oo, *points, sp.oo]
    for lo, hi in zip(edges[:-1], edges[1:]):
        probe = _probe(lo, hi, sp.Rational(1, 2)) if lo != -sp.oo else _probe(hi, lo)
        if lo == -sp.oo and hi == sp.oo:
            probe = sp.Integer(0)
        if sp.simplify(branch_at(f, x, probe)) != 0:
            return False
    return all(sp.simplify(branch_at(f, x, p).subs(x, p)) == 0 for p in points)
