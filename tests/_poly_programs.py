"""Random programs whose kink arguments are polynomials, with an exact, independent oracle.

A program is an expression tree over two inputs ``(x, y)`` at a point ``x0`` with exactly
representable coordinates.  Kinks (relu, abs, max, min, leaky relu, in several spellings)
act on polynomials in ``u = x - x0[0]``, ``v = y - x0[1]`` that vanish at ``x0``; every
kink argument is *weighted homogeneous* for the weights ``(1, w)`` (``u`` has degree 1,
``v`` degree ``w``), e.g. ``v - u**2`` and ``v - 2 u**2`` for ``w = 2``: they agree to first
order and leave a thin piece between them.  Sums and maxima only combine terms of equal
degree, products add degrees, so every argument along every branch stays weighted
homogeneous.

The oracle (SymPy, exact rationals, no code shared with the engine or any autodiff): on
the arcs ``(u, v) = (s e, t e**w)``, ``s = +-1``, ``e > 0``, a weighted-homogeneous
argument has the sign of its value at ``(s, t)`` whatever ``e``.  So the pieces near ``x0``
are exactly the sign patterns met along ``t`` in R for ``s = +-1``: isolate the real roots
of every argument polynomial (refined until each interval has one pattern), evaluate the
pattern at a rational point of every interval, and differentiate each pattern's
polynomial piece at ``x0``.  Those gradients are the B-subdifferential; their hull is the
Clarke Jacobian.  Each interval times ``e in (0, e0)`` is open, and the intervals cover
everything but the axis ``u = 0``, so nothing is missed and nothing is spurious.
"""
from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import numpy as np
import sympy as sp

U, V, T = sp.symbols("u v t", real=True)

KINKS = ("relu", "abs", "max", "min", "leaky")
SPELLINGS = {
    "relu": ("relu", "clamp", "maximum0", "where"),
    "abs": ("abs", "where", "maxneg"),
    "max": ("maximum", "stackmax", "where"),
    "min": ("minimum", "stackmin", "where"),
    "leaky": ("leaky",),
}


@dataclasses.dataclass(frozen=True)
class E:
    """An expression node: op in var/scale/add/mul/relu/abs/max/min/leaky."""

    op: str
    args: tuple = ()
    value: object = None  # variable index, scale factor (Fraction) or leaky slope
    spelling: str = ""

    def __repr__(self):
        if self.op == "var":
            return "uv"[self.value]
        if self.op == "scale":
            return f"{self.value}*{self.args[0]!r}"
        inner = ", ".join(repr(a) for a in self.args)
        return f"{self.op}[{self.spelling}]({inner})" if self.spelling else f"{self.op}({inner})"


@dataclasses.dataclass(frozen=True)
class PolyProgram:
    outputs: tuple  # of E
    w: int
    x0: tuple  # exactly representable floats

    def __repr__(self):
        return f"PolyProgram(w={self.w}, x0={self.x0}, outputs={list(self.outputs)})"


# --------------------------------------------------------------------------- generator


def _monomials(deg: int, w: int):
    return [(a, b) for b in range(deg // w + 1) for a in [deg - w * b] if a >= 0]


def _poly(rng: random.Random, deg: int, w: int) -> E:
    """A random weighted-homogeneous polynomial of degree ``deg`` as an expression."""
    terms = []
    for a, b in _monomials(deg, w):
        if rng.random() < 0.7 or not terms:
            c = Fraction(rng.choice([-3, -2, -1, 1, 2, 3]), rng.choice([1, 1, 2]))
            factors = [E("var", (), 0)] * a + [E("var", (), 1)] * b
            m = factors[0]
            for f in factors[1:]:
                m = E("mul", (m, f))
            terms.append(E("scale", (m,), c))
    out = terms[0]
    for t in terms[1:]:
        out = E("add", (out, t))
    return out


def _kink_expr(rng: random.Random, deg: int, w: int, depth: int) -> E:
    kind = rng.choice(KINKS)
    spelling = rng.choice(SPELLINGS[kind])
    arg = _argument(rng, deg, w, depth)
    if kind in ("max", "min"):
        other = _argument(rng, deg, w, depth)
        return E(kind, (arg, other), None, spelling)
    if kind == "leaky":
        return E("leaky", (arg,), Fraction(1, 4), spelling)
    return E(kind, (arg,), None, spelling)


def _argument(rng: random.Random, deg: int, w: int, depth: int) -> E:
    p = _poly(rng, deg, w)
    if depth > 0 and rng.random() < 0.5:
        inner = _kink_expr(rng, deg, w, depth - 1)
        p = E("add", (p, E("scale", (inner,), Fraction(rng.choice([-2, -1, 1, 2])))))
    return p


def random_poly_program(seed: int) -> PolyProgram:
    """Two to four kinks on weighted-homogeneous arguments; ``w`` in {1, 2, 3}; one or two outputs."""
    rng = random.Random(seed)
    w = rng.choice([1, 2, 2, 3])
    degs = [w] if w > 1 else [1]
    if rng.random() < 0.3:
        degs.append(2 * w if w > 1 else 2)  # an argument with a zero gradient (degenerate)
    outs = []
    for _ in range(rng.choice([1, 1, 2])):
        terms = []
        for _ in range(rng.choice([1, 2, 2, 3])):
            d = rng.choice(degs)
            k = _kink_expr(rng, d, w, rng.choice([0, 0, 1]))
            terms.append(E("scale", (k,), Fraction(rng.choice([-2, -1, 1, 2, 3]))))
        if rng.random() < 0.4:
            terms.append(_poly(rng, w, w))  # a smooth term
        o = terms[0]
        for t in terms[1:]:
            o = E("add", (o, t))
        outs.append(o)
    x0 = rng.choice([(0.0, 0.0), (0.0, 0.0), (1.0, -2.0), (0.5, 3.0)])
    return PolyProgram(tuple(outs), w, x0)


# --------------------------------------------------------------------------- exact evaluation


def _eval(e: E, env: dict, pattern: list, sym: bool):
    """Value of ``e`` (exact) with branches decided by the sign of exact arguments; appends
    (kink id, branch, argument polynomial in (u, v)) to ``pattern``.  With ``sym``, values
    are SymPy expressions in u, v along the branches taken at the numeric point ``env``."""
    if e.op == "var":
        return env["sym" if sym else "num"][e.value]
    if e.op == "scale":
        a = _eval(e.args[0], env, pattern, sym)
        return sp.Rational(e.value.numerator, e.value.denominator) * a
    if e.op == "add":
        return _eval(e.args[0], env, pattern, sym) + _eval(e.args[1], env, pattern, sym)
    if e.op == "mul":
        return _eval(e.args[0], env, pattern, sym) * _eval(e.args[1], env, pattern, sym)
    # kinks: decide on the numeric value, build the symbolic piece
    if e.op in ("relu", "abs", "leaky"):
        an = _eval_num(e.args[0], env)
        a = _eval(e.args[0], env, pattern, sym)
        branch = 1 if an > 0 else (-1 if an < 0 else 0)
        pattern.append((id(e), branch))
        if e.op == "relu":
            return a if branch > 0 else 0 * a
        if e.op == "abs":
            return a if branch >= 0 else -a
        slope = sp.Rational(e.value.numerator, e.value.denominator)
        return a if branch > 0 else slope * a
    a = _eval(e.args[0], env, pattern, sym)
    b = _eval(e.args[1], env, pattern, sym)
    an, bn = _eval_num(e.args[0], env), _eval_num(e.args[1], env)
    branch = 1 if an > bn else (-1 if an < bn else 0)
    pattern.append((id(e), branch))
    if e.op == "max":
        return a if branch >= 0 else b
    return b if branch >= 0 else a


def _eval_num(e: E, env: dict):
    return _eval(e, dict(env), [], False)


def _arguments(e: E, env: dict, out: list):
    """The kink arguments (symbolic in u, v) along the branches taken at ``env``."""
    if e.op in ("var",):
        return
    for a in e.args:
        _arguments(a, env, out)
    if e.op in ("relu", "abs", "leaky"):
        out.append(sp.expand(_eval(e.args[0], env, [], True)))
    elif e.op in ("max", "min"):
        out.append(sp.expand(_eval(e.args[0], env, [], True) - _eval(e.args[1], env, [], True)))


def _env(s, t, w):
    u, v = sp.Rational(s), t
    return {"num": (u, v), "sym": (U, V)}


def oracle(prog: PolyProgram, max_rounds: int = 12):
    """The B-subdifferential at x0 (exact): a list of (n_out, 2) float arrays."""
    w = prog.w
    polys: set = set()
    patterns: dict = {}
    for _ in range(max_rounds):
        # isolate the real roots in t of every argument polynomial seen so far, both signs of s
        new = False
        for s in (1, -1):
            pts = _sample_points(polys, s, w)
            for t in pts:
                env = _env(s, t, w)
                pat = []
                for o in prog.outputs:
                    _eval(o, env, pat, False)
                key = (s, tuple(b for _, b in pat))
                args = []
                for o in prog.outputs:
                    _arguments(o, env, args)
                on_root = False
                for a in args:
                    p = sp.expand(a.subs({U: s, V: T}))
                    if p != 0 and p.free_symbols:
                        on_root = on_root or p.subs(T, t) == 0
                        if p not in polys:
                            polys.add(p)
                            new = True
                # a point that lands on a root of an argument not yet isolated is on a
                # boundary, not in an open piece: that argument joins the polynomials and
                # the next round samples on both sides of its root (an argument that is
                # identically zero is a tie everywhere, not a boundary)
                if key not in patterns and not on_root:
                    patterns[key] = env
        if not new:
            break
    else:
        raise RuntimeError("oracle did not stabilize")
    grads = []
    for key, env in patterns.items():
        rows = []
        for o in prog.outputs:
            piece = sp.expand(_eval(o, env, [], True))
            rows.append([float(sp.diff(piece, U).subs({U: 0, V: 0})), float(sp.diff(piece, V).subs({U: 0, V: 0}))])
        grads.append(np.array(rows))
    return _distinct(grads)


def _sample_points(polys, s, w):
    """Rational points between (and beyond) the isolated real roots of the polynomials in t."""
    ps = [sp.Poly(p, T) for p in polys if sp.Poly(p, T).degree() > 0]
    if not ps:
        return [sp.Rational(0), sp.Rational(7, 3), sp.Rational(-5, 2)]
    ivs = sp.intervals([p.as_expr() for p in ps], eps=sp.Rational(1, 10**6))
    bounds = sorted({(sp.Rational(a), sp.Rational(b)) for (a, b), _ in ivs})
    if not bounds:  # no real root: one sign pattern along t
        return [sp.Rational(0)]
    pts = [bounds[0][0] - 1]
    for (a1, b1), (a2, b2) in zip(bounds, bounds[1:]):
        if b1 < a2:
            pts.append((b1 + a2) / 2)
    pts.append(bounds[-1][1] + 1)
    return pts


def _distinct(mats, tol=1e-12):
    out = []
    for m in mats:
        if not any(np.max(np.abs(m - o)) <= tol for o in out):
            out.append(m)
    return out


# --------------------------------------------------------------------------- rendering


def render(prog: PolyProgram, framework: str):
    """A torch or jax function of a length-2 vector computing the program."""
    if framework == "torch":
        import torch
        import torch.nn.functional as Fn

        def node(e, uv):
            if e.op == "var":
                return uv[e.value]
            if e.op == "scale":
                return float(e.value) * node(e.args[0], uv)
            if e.op == "add":
                return node(e.args[0], uv) + node(e.args[1], uv)
            if e.op == "mul":
                return node(e.args[0], uv) * node(e.args[1], uv)
            a = node(e.args[0], uv)
            sp_ = e.spelling
            if e.op == "relu":
                return {"relu": lambda: torch.relu(a), "clamp": lambda: torch.clamp(a, min=0.0),
                        "maximum0": lambda: torch.maximum(a, torch.zeros_like(a)),
                        "where": lambda: torch.where(a > 0, a, torch.zeros_like(a))}[sp_]()
            if e.op == "abs":
                return {"abs": lambda: torch.abs(a), "where": lambda: torch.where(a >= 0, a, -a),
                        "maxneg": lambda: torch.maximum(a, -a)}[sp_]()
            if e.op == "leaky":
                return Fn.leaky_relu(a, float(e.value))
            b = node(e.args[1], uv)
            if e.op == "max":
                return {"maximum": lambda: torch.maximum(a, b), "stackmax": lambda: torch.stack([a, b]).max(0).values,
                        "where": lambda: torch.where(a > b, a, b)}[sp_]()
            return {"minimum": lambda: torch.minimum(a, b), "stackmin": lambda: torch.stack([a, b]).min(0).values,
                    "where": lambda: torch.where(a < b, a, b)}[sp_]()

        def f(xy):
            uv = (xy[0] - prog.x0[0], xy[1] - prog.x0[1])
            return torch.stack([node(o, uv) for o in prog.outputs])

        return f
    import jax
    import jax.numpy as jnp

    def jnode(e, uv):
        if e.op == "var":
            return uv[e.value]
        if e.op == "scale":
            return float(e.value) * jnode(e.args[0], uv)
        if e.op == "add":
            return jnode(e.args[0], uv) + jnode(e.args[1], uv)
        if e.op == "mul":
            return jnode(e.args[0], uv) * jnode(e.args[1], uv)
        a = jnode(e.args[0], uv)
        sp_ = e.spelling
        if e.op == "relu":
            return {"relu": lambda: jax.nn.relu(a), "clamp": lambda: jnp.clip(a, 0.0, None),
                    "maximum0": lambda: jnp.maximum(a, 0.0), "where": lambda: jnp.where(a > 0, a, 0.0)}[sp_]()
        if e.op == "abs":
            return {"abs": lambda: jnp.abs(a), "where": lambda: jnp.where(a >= 0, a, -a),
                    "maxneg": lambda: jnp.maximum(a, -a)}[sp_]()
        if e.op == "leaky":
            return jax.nn.leaky_relu(a, float(e.value))
        b = jnode(e.args[1], uv)
        if e.op == "max":
            return {"maximum": lambda: jnp.maximum(a, b), "stackmax": lambda: jnp.max(jnp.stack([a, b]), axis=0),
                    "where": lambda: jnp.where(a > b, a, b)}[sp_]()
        return {"minimum": lambda: jnp.minimum(a, b), "stackmin": lambda: jnp.min(jnp.stack([a, b]), axis=0),
                "where": lambda: jnp.where(a < b, a, b)}[sp_]()

    def g(xy):
        uv = (xy[0] - prog.x0[0], xy[1] - prog.x0[1])
        return jnp.stack([jnode(o, uv) for o in prog.outputs])

    return g


def hull_distance(points, target) -> float:
    """max-norm distance from target to conv(points), by SciPy's LP (independent of the engine)."""
    from scipy.optimize import linprog

    P = np.asarray([np.ravel(p) for p in points], dtype=np.float64)
    y = np.ravel(np.asarray(target, dtype=np.float64))
    m, d = P.shape
    c = np.r_[np.zeros(m), 1.0]
    A_ub = np.vstack([np.hstack([P.T, -np.ones((d, 1))]), np.hstack([-P.T, -np.ones((d, 1))])])
    res = linprog(c, A_ub=A_ub, b_ub=np.r_[y, -y], A_eq=np.r_[np.ones(m), 0.0][None], b_eq=[1.0],
                  bounds=[(0, None)] * (m + 1), method="highs")
    return float(res.x[-1]) if res.status == 0 else float("inf")
