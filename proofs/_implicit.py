"""The nonsmooth implicit derivative of the scalar fixed point z = relu(a z + b x)."""
from __future__ import annotations

import sympy as sp

from ._ad import Relu, ad_value, true_function
from ._certificate import Derivation, expr_text, is_zero
from ._proof import Proof


def _run(d: Derivation) -> None:
    a, b, x, z, s = sp.symbols("a b x z s", real=True)
    t_pos = sp.Symbol("t", positive=True)   # stands for b*x > 0
    t_neg = sp.Symbol("t", negative=True)   # stands for b*x < 0
    contraction = sp.Interval.open(-1, 1)
    d.step("assumptions: a in (-1, 1), b != 0; F(z, x) = z - relu(a z + b x)")

    # 1 - a > 0 on the whole admissible range: the fact every region argument needs.
    d.require(sp.solveset(1 - a > 0, a, contraction) == contraction, "1 - a > 0 for every a in (-1, 1)")
    # Sign arguments below need that fact inside SymPy: write a = 1 - p with p > 0.
    gap = sp.Symbol("p", positive=True)
    below_one = {a: 1 - gap}

    u = a * z + b * x
    # Region u > 0: relu is the identity, the fixed point solves z = a z + b x.
    z_pos = sp.solve(sp.Eq(z, u), z)[0]
    d.expr("z_on_active_region", z_pos)
    u_at = sp.simplify(u.subs(z, z_pos))
    d.step(f"region a z + b x > 0: z = {expr_text(z_pos)}, where a z + b x = {expr_text(u_at)}")
    d.equal(u_at * (1 - a), b * x, "there a z + b x = b x / (1 - a), so the region is exactly b x > 0")
    # Region u < 0: relu is zero.
    z_neg = sp.solve(sp.Eq(z, 0), z)[0]
    u_neg = u.subs(z, z_neg)
    d.step(f"region a z + b x < 0: z = {z_neg}, where a z + b x = {expr_text(u_neg)}: the region b x < 0")
    d.equal(u_neg, b * x, "on the inactive region a z + b x reduces to b x")

    z_star = sp.Piecewise((z_pos, b * x > 0), (0, True))
    d.expr("z_star", z_star)
    residual = true_function(z - Relu(u)).subs(z, z_star)
    on_each = [residual.subs(x, t / b).subs(below_one) for t in (t_pos, t_neg, sp.Integer(0))]
    d.require(all(is_zero(r) for r in on_each),
              "z*(x) = Piecewise((b x/(1-a), b x > 0), (0, True)) satisfies z* = relu(a z* + b x) "
              "for b x > 0, b x < 0 and b x = 0")

    slope_pos = sp.diff(z_pos, x)
    slope_neg = sp.diff(sp.Integer(0), x)
    d.expr("dz_dx_active", slope_pos)
    d.expr("dz_dx_inactive", slope_neg)
    d.step(f"derivative on each region: {expr_text(slope_pos)} where b x > 0, {slope_neg} where b x < 0")
    clarke = (slope_neg, slope_pos)
    d.step(f"both regions touch x = 0, so the Clarke set there is conv{{{slope_neg}, {expr_text(slope_pos)}}}")

    # Implicit differentiation with the conservative Jacobian of F: relu'(0) = s in [0, 1].
    program = z - Relu(u)
    dF_dz = ad_value(sp.diff(program, z), relu_at_0=s).subs({x: 0, z: 0})
    dF_dx = ad_value(sp.diff(program, x), relu_at_0=s).subs({x: 0, z: 0})
    d.expr("dF_dz_at_kink", dF_dz)
    d.expr("dF_dx_at_kink", dF_dx)
    d.step(f"conservative Jacobian of F at (z, x) = (0, 0): [{expr_text(dF_dz)}, {expr_text(dF_dx)}], s in [0, 1]")
    # dF/dz is affine in s, so its extremes over [0, 1] are at the endpoints.
    d.require(sp.diff(dF_dz, s, 2) == 0, "dF/dz is affine in s")
    ends = [sp.simplify(dF_dz.subs(s, v)) for v in (0, 1)]
    d.require(all(sp.solveset(e > 0, a, contraction) == contraction if e.has(a) else e > 0 for e in ends),
              f"dF/dz at s = 0, 1 is {ends[0]} and {expr_text(ends[1])}, both > 0 on (-1, 1): every "
              f"element of the conservative Jacobian is invertible in z, so the implicit theorem applies")
    implicit = sp.simplify(-dF_dx / dF_dz)
    d.expr("implicit_derivative", implicit)
    d.step(f"implicit derivative -A^-1 B = {expr_text(implicit)}")
    d.equal(sp.diff(implicit, s), b / (1 - s * a) ** 2,
            "d/ds of the implicit derivative is b / (1 - s a)^2 (one sign on [0, 1]: monotone)")
    lo_hi = (implicit.subs(s, 0), implicit.subs(s, 1))
    d.equal(lo_hi[0], clarke[0], "s = 0 gives the derivative of the inactive region")
    d.equal(lo_hi[1], clarke[1], "s = 1 gives the derivative of the active region")
    d.step("hence {-A^-1 B : s in [0, 1]} = conv{0, b/(1-a)}: the implicit conservative Jacobian "
           "equals the Clarke set of z* at the kink")
    # Away from the kink the implicit formula reduces to the region derivative.
    away_pos = ad_value(sp.diff(program, x), relu_at_0=s).subs(z, z_pos).subs(x, t_pos / b)
    away_dz = ad_value(sp.diff(program, z), relu_at_0=s).subs(z, z_pos).subs(x, t_pos / b)
    d.equal((-away_pos / away_dz).subs(below_one), slope_pos.subs(below_one),
            "on b x > 0 implicit differentiation gives b/(1-a)")
    away_neg = [ad_value(sp.diff(program, v), relu_at_0=s).subs(z, z_neg).subs(x, t_neg / b) for v in (x, z)]
    d.equal(-away_neg[0] / away_neg[1], slope_neg, "on b x < 0 implicit differentiation gives 0")
    _cross_check_engine(d, a, b, clarke)


def _cross_check_engine(d: Derivation, a, b, clarke) -> None:
    """Optional: nonsmooth.implicit's vertex Jacobian set at the kink against the Clarke set."""
    try:
        import numpy as np

        from nonsmooth.implicit import ElementwiseLayer, implicit_jacobian_set
    except ImportError as exc:
        d.step(f"engine cross-check skipped: nonsmooth.implicit is unavailable ({exc})")
        return
    worst = 0.0
    cases = [(sp.Rational(1, 2), 1), (sp.Rational(-3, 4), 2), (sp.Rational(9, 10), sp.Rational(-1, 3))]
    for av, bv in cases:
        layer = ElementwiseLayer(np.array([[float(av)]]), U=np.array([[float(bv)]]), activation="relu")
        got = sorted(float(M[0, 0]) for M in implicit_jacobian_set(layer, np.array([0.0]), np.array([0.0])).matrices)
        want = sorted(float(e.subs({a: av, b: bv})) for e in clarke)
        worst = max(worst, max(abs(g - w) for g, w in zip(got, want)) if len(got) == len(want) else float("inf"))
    d.require(worst <= 1e-12,
              f"nonsmooth.implicit.implicit_jacobian_set returns exactly the endpoints {{0, b/(1-a)}} for "
              f"(a, b) in {[(str(x), str(y)) for x, y in cases]} (max error {worst:.1e})",
              failure=f"nonsmooth.implicit.implicit_jacobian_set disagrees with the Clarke set endpoints by {worst}")


PROOFS = (
    Proof(
        name="relu_fixed_point_implicit",
        statement=("The fixed point z*(x) of z = relu(a z + b x) with |a| < 1 is relu(b x)/(1 - a); its "
                   "derivative is b/(1-a) where b x > 0 and 0 where b x < 0, and at x = 0 the implicit "
                   "conservative Jacobian {s b/(1 - s a) : s in [0, 1]} equals the Clarke set conv{0, b/(1-a)}."),
        latex=(r"z^\star=\mathrm{relu}(az^\star+bx),\ |a|<1:\ z^\star(x)=\frac{\mathrm{relu}(bx)}{1-a},\ "
               r"\Big\{\tfrac{sb}{1-sa}:s\in[0,1]\Big\}=\partial^C z^\star(0)=\mathrm{conv}\{0,\tfrac{b}{1-a}\}"),
        assumptions=("a in (-1, 1) (contraction)", "b real, nonzero", "relu'(0) ranges over [0, 1]"),
        run=_run,
    ),
)
