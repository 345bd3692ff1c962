"""Conservativity along paths: the AD field integrates to the increment of the function."""
from __future__ import annotations

import sympy as sp

from ._ad import AbsP, Max2, Relu, ad_value, true_function
from ._certificate import Derivation, expr_text, is_zero
from ._piecewise1d import branch_at, breakpoints
from ._proof import Proof


def integrate_piecewise(g, t, lo, hi):
    """Exact integral of a piecewise function of ``t`` over [lo, hi], branch by branch.

    The branches are constant in which kink condition holds between consecutive
    breakpoints, so each sub-interval integrates one smooth branch; the breakpoints
    themselves (where AD's kink choices live) have measure zero.
    """
    cuts = [p for p in breakpoints(g, t) if lo < p < hi]
    edges = [lo, *cuts, hi]
    total = sp.Integer(0)
    pieces = []
    for a, b in zip(edges[:-1], edges[1:]):
        branch = sp.simplify(branch_at(g, t, (a + b) / 2))
        pieces.append(((a, b), branch))
        total += sp.integrate(branch, (t, a, b))
    return sp.simplify(total), pieces


def _run(d: Derivation) -> None:
    x1, x2, t = sp.symbols("x1 x2 t", real=True)
    s, r, q = sp.symbols("s r q", real=True)
    program = Relu(x1 - x2) - Relu(x2 - x1) + AbsP(x1) + Max2(x1, 2 * x2)
    f = true_function(program)
    d.expr("program", program)
    d.expr("f", f)
    field = [ad_value(sp.diff(program, v), relu_at_0=s, abs_at_0=r, max_tie_first=q) for v in (x1, x2)]
    for v, comp in zip((x1, x2), field):
        d.expr(f"ad_field_d{v}", comp)
    d.step(f"f(x1, x2) = relu(x1 - x2) - relu(x2 - x1) + |x1| + max(x1, 2 x2); the AD field with "
           f"relu'(0) = s, abs'(0) = r and max's tie weight q on its first argument is "
           f"({expr_text(field[0])}, {expr_text(field[1])})")

    # On the kink x1 = x2 the field is spurious for every s != 1/2 ...
    at = {x1: 1, x2: 1}
    d_at = [sp.simplify(c.subs(at)) for c in field]
    # f is smooth at (1, 1): 0 < 1 < 2 so |x1| = x1, max = 2 x2 nearby, and the relu pair is x1 - x2.
    smooth_grad = [sp.diff(x1 - x2 + x1 + 2 * x2, v) for v in (x1, x2)]
    d.equal(f.subs({x1: 1 + sp.Rational(1, 7), x2: 1 - sp.Rational(1, 5)}),
            (x1 - x2 + x1 + 2 * x2).subs({x1: 1 + sp.Rational(1, 7), x2: 1 - sp.Rational(1, 5)}),
            "near (1, 1) f agrees with the smooth x1 - x2 + x1 + 2 x2 (sample off the kink)")
    agree = sp.solve([d_at[0] - smooth_grad[0], d_at[1] - smooth_grad[1]], [s], dict=True)
    d.step(f"at (1, 1) the AD field is ({expr_text(d_at[0])}, {expr_text(d_at[1])}) while the gradient is "
           f"{tuple(smooth_grad)}; they agree only for {agree}")
    d.require(agree == [{s: sp.Rational(1, 2)}],
              "the AD field is spurious on the kink x1 = x2 unless relu'(0) = 1/2")

    curves = {
        "segment crossing three kinks": ((-1 + 3 * t, 1 - 2 * t), (0, 1)),
        "segment lying on the kink x1 = x2": ((t, t), (-1, 1)),
        "parabola crossing kinks at irrational times": ((t - sp.Rational(1, 2), t ** 2 - sp.Rational(1, 3)), (0, 1)),
    }
    for label, (gamma, (lo, hi)) in curves.items():
        lo, hi = sp.Integer(lo), sp.Integer(hi)
        velocity = [sp.diff(c, t) for c in gamma]
        along = {x1: gamma[0], x2: gamma[1]}
        integrand = sum(comp.subs(along) * v for comp, v in zip(field, velocity))
        total, pieces = integrate_piecewise(integrand, t, lo, hi)
        increment = sp.simplify(f.subs({x1: gamma[0].subs(t, hi), x2: gamma[1].subs(t, hi)})
                                - f.subs({x1: gamma[0].subs(t, lo), x2: gamma[1].subs(t, lo)}))
        d.expr(f"integral[{label}]", total)
        d.expr(f"increment[{label}]", increment)
        cuts = [expr_text(a) for (a, _), _ in pieces[1:]]
        d.step(f"{label}: gamma(t) = ({expr_text(gamma[0])}, {expr_text(gamma[1])}), t in [{lo}, {hi}], "
               f"kinks crossed at t = {cuts or 'none'}; branches of <D(gamma), gamma'>: "
               f"{[expr_text(b) for _, b in pieces]}; integral = {expr_text(total)}, "
               f"f(gamma({hi})) - f(gamma({lo})) = {expr_text(increment)}")
        d.equal(total, increment, f"{label}: the integral of the AD field equals the increment of f")
        d.require(not (total.free_symbols & {s, r, q}),
                  f"{label}: the integral does not depend on the kink choices s, r, q")
        # The chain rule holds on every open sub-interval: d/dt f(gamma(t)) = <D(gamma(t)), gamma'(t)>.
        fg = f.subs(along)
        d.require(all(is_zero(sp.diff(branch_at(fg, t, (a + b) / 2), t) - branch) for (a, b), branch in pieces),
                  f"{label}: d/dt f(gamma(t)) = <D(gamma(t)), gamma'(t)> between consecutive kink times")


PROOFS = (
    Proof(
        name="path_conservativity",
        statement=("For f(x1, x2) = relu(x1 - x2) - relu(x2 - x1) + |x1| + max(x1, 2 x2) and any kink "
                   "choices (relu'(0) = s, abs'(0) = r, max tie weight q), the integral of the AD field along "
                   "curves that cross or run along kinks equals f(end) - f(start), although the field is "
                   "spurious on the kink x1 = x2."),
        latex=r"\int_0^1\langle D_f(\gamma(t)),\gamma'(t)\rangle\,dt=f(\gamma(1))-f(\gamma(0))",
        assumptions=("piecewise-linear f built from relu, abs and max",
                     "curves are polynomial (absolutely continuous)",
                     "s, r, q are arbitrary real numbers"),
        run=_run,
    ),
)
