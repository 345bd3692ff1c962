"""relu(x) - relu(-x) is the identity, yet backprop returns 2 relu'(0) at 0."""
from __future__ import annotations

import sympy as sp

from ._ad import Relu, ad_value, true_function
from ._certificate import Derivation, expr_text, is_zero
from ._piecewise1d import local
from ._proof import Proof


def _run(d: Derivation) -> None:
    x = sp.Symbol("x", real=True)
    s = sp.Symbol("s", real=True)
    program = Relu(x) - Relu(-x)
    d.expr("program", program)
    f = true_function(program)
    d.expr("f", f)
    d.step(f"f(x) = relu(x) - relu(-x) with relu(u) = Piecewise((0, u < 0), (u, True)): {expr_text(f)}")

    folded = sp.piecewise_fold(f)
    d.equal(folded, x, "f(x) - x is identically 0 (branch by branch between breakpoints, and at them)")
    # Region by region, so the identity does not rest on simplify alone.
    pos, neg = sp.Symbol("p", positive=True), sp.Symbol("q", negative=True)
    d.require(all(is_zero(f.subs(x, v) - v) for v in (pos, neg, sp.Integer(0))),
              "f(p) = p for p > 0, f(q) = q for q < 0 and f(0) = 0")

    ad = sp.diff(program, x)
    d.expr("ad_rule_form", ad)
    d.step(f"chain rule primitive by primitive (what backprop does): f'(x) = {expr_text(ad)}")
    ad_s = ad_value(ad, relu_at_0=s)
    d.expr("ad_with_relu_prime_0_equal_s", ad_s)
    at0 = sp.simplify(ad_s.subs(x, 0))
    d.expr("ad_at_0", at0)
    d.step(f"with relu'(0) = s the AD output at x = 0 is {expr_text(at0)}")
    d.equal(at0, 2 * s, "backprop at 0 returns 2 s")
    d.require(all(is_zero(ad_s.subs(x, v) - 1) for v in (pos, neg)),
              "backprop returns 1 at every x != 0")

    # The Clarke set of f at 0, from the one-sided limits of f' (f is Lipschitz).
    loc = local(f, x, sp.Integer(0))
    left, right = loc.slope_left, loc.slope_right
    d.step(f"one-sided limits of f' at 0: left {left}, right {right}; Clarke set = [{sp.Min(left, right)}, "
           f"{sp.Max(left, right)}]")
    d.require(left == 1 and right == 1, "the Clarke set of f at 0 is {1}")

    bad = sp.solve(sp.Eq(2 * s, 1), s)
    d.expr("only_consistent_choice", bad[0] if bad else sp.nan)
    d.require(bad == [sp.Rational(1, 2)], "2 s lies in the Clarke set {1} only for s = 1/2")
    spurious = {c: at0.subs(s, c) for c in (0, 1)}
    d.require(all(v != 1 for v in spurious.values()),
              "the conventions relu'(0) = 0 (torch) and relu'(0) = 1 (jax, clamp) give 0 and 2, "
              "both outside the Clarke set {1}: a spurious derivative")


PROOFS = (
    Proof(
        name="spurious_derivative",
        statement=("relu(x) - relu(-x) = x for every real x, yet backpropagation with relu'(0) = s "
                   "returns 2s at x = 0, which is outside the Clarke set {1} unless s = 1/2."),
        latex=(r"\mathrm{relu}(x)-\mathrm{relu}(-x)\equiv x,\quad "
               r"\widehat{\nabla}f(0)=2s\notin\partial^C f(0)=\{1\}\ \text{for } s\neq\tfrac12"),
        assumptions=("relu(u) = max(u, 0); backprop uses relu'(u) = 0 for u < 0, 1 for u > 0, s at 0",),
        run=_run,
    ),
)
