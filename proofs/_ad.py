"""Symbolic automatic differentiation with a chosen derivative at each kink.

Each nonsmooth primitive is an opaque SymPy function whose ``fdiff`` is another opaque
function (its derivative *rule*).  ``sympy.diff`` then applies the chain rule primitive
by primitive, exactly as forward- or reverse-mode AD does on an expression tree; the
result is what AD returns once the rule placeholders are replaced by the primitive's
derivative with the framework's choice at the kink (``ad_value``).  Replacing the
primitives themselves by their mathematical definitions (``true_function``) gives the
function AD differentiates.
"""
from __future__ import annotations

import sympy as sp


class Relu(sp.Function):
    """relu(u) as an AD primitive."""

    nargs = 1

    def fdiff(self, argindex=1):
        return ReluRule(self.args[0])


class ReluRule(sp.Function):
    """The derivative AD uses for relu at ``u`` (a placeholder until a choice is made)."""

    nargs = 1


class AbsP(sp.Function):
    """|u| as an AD primitive."""

    nargs = 1

    def fdiff(self, argindex=1):
        return AbsRule(self.args[0])


class AbsRule(sp.Function):
    nargs = 1


class Max2(sp.Function):
    """max(u, v) as an AD primitive (its tie rule gives weight q to u and 1-q to v)."""

    nargs = 2

    def fdiff(self, argindex=1):
        u, v = self.args
        return MaxRuleFirst(u, v) if argindex == 1 else MaxRuleSecond(u, v)


class MaxRuleFirst(sp.Function):
    nargs = 2


class MaxRuleSecond(sp.Function):
    nargs = 2


def true_function(expr):
    """Replace every AD primitive in ``expr`` by its mathematical definition."""
    return expr.replace(Relu, lambda u: sp.Piecewise((0, u < 0), (u, True))).replace(
        AbsP, lambda u: sp.Piecewise((-u, u < 0), (u, True))).replace(
        Max2, lambda u, v: sp.Piecewise((u, u >= v), (v, True)))


def ad_value(expr, *, relu_at_0=None, abs_at_0=None, max_tie_first=None):
    """Replace the derivative-rule placeholders by the derivatives with the given kink choices.

    ``relu_at_0`` is relu'(0), ``abs_at_0`` is abs'(0), ``max_tie_first`` is the weight
    max(u, v) puts on u at a tie (v gets the rest); each may be a SymPy symbol.
    """
    def relu_rule(u):
        return sp.Piecewise((0, u < 0), (relu_at_0, sp.Eq(u, 0)), (1, True))

    def abs_rule(u):
        return sp.Piecewise((-1, u < 0), (abs_at_0, sp.Eq(u, 0)), (1, True))

    def max_first(u, v):
        return sp.Piecewise((1, u > v), (max_tie_first, sp.Eq(u, v)), (0, True))

    def max_second(u, v):
        return sp.Piecewise((0, u > v), (1 - max_tie_first, sp.Eq(u, v)), (1, True))

    out = expr
    if relu_at_0 is not None:
        out = out.replace(ReluRule, relu_rule)
    if abs_at_0 is not None:
        out = out.replace(AbsRule, abs_rule)
    if max_tie_first is not None:
        out = out.replace(MaxRuleFirst, max_first).replace(MaxRuleSecond, max_second)
    return out
