"""Our own table of the engine's nonsmooth primitives, written from their mathematical
definitions (independently of the engine's registry, which states only kinks and slopes).

Unary primitives are SymPy expressions in ``x`` and their parameters (``Piecewise``
wherever a case split is part of the definition).  Vector primitives are small-``n``
instances written with explicit comparisons.  The rule-table proofs derive everything
else (kinks, one-sided slopes, Clarke sets, continuity, Lipschitz) from these.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import sympy as sp

R = sp.Rational
x = sp.Symbol("x", real=True)


def _pw(*pairs):
    return sp.Piecewise(*pairs)


def _window(n_lo: int, n_hi: int, value_on: Callable[[int], tuple]):
    """A Piecewise over [n_lo, n_hi) gluing ``value_on(k) -> ((expr, cond), ...)``."""
    pairs = []
    for k in range(n_lo, n_hi):
        pairs.extend(value_on(k))
    pairs.append((sp.nan, True))
    return sp.Piecewise(*pairs)


def _round_half_even(k):
    even = k if k % 2 == 0 else k + 1
    return ((k, (x > k - R(1, 2)) & (x < k + R(1, 2))), (even, sp.Eq(x, k + R(1, 2))))


@dataclasses.dataclass(frozen=True)
class Unary:
    """f(x; params) and the parameter values to check it at (besides the defaults).

    ``domain``: where f is real (sqrt, fractional powers).  ``lattice``: the integers n
    at which a repeating kink is checked (the definition is exact on the window).
    ``check_defaults``: False when the defaults leave the primitive without kinks to check
    (clamp with no bounds).
    """

    build: Callable[..., object]
    samples: tuple = ()
    domain: object = sp.S.Reals
    lattice: tuple = ()
    check_defaults: bool = True
    note: str = ""


_WIN = (-4, 5)   # window of integers for floor/ceil/round/trunc definitions
_LATTICE = (-2, -1, 0, 1, 2)

UNARY: dict[str, Unary] = {
    "relu": Unary(lambda: _pw((0, x < 0), (x, True))),
    "threshold": Unary(lambda threshold, value: _pw((x, x > threshold), (value, True)),
                       samples=({"threshold": R(1, 2), "value": -2}, {"threshold": -1, "value": 3})),
    "abs": Unary(lambda: _pw((-x, x < 0), (x, True))),
    "leaky_relu": Unary(lambda negative_slope: _pw((negative_slope * x, x < 0), (x, True)),
                        samples=({"negative_slope": R(1, 5)}, {"negative_slope": -3})),
    "hardtanh": Unary(lambda min_val, max_val: _pw((min_val, x < min_val), (x, x <= max_val), (max_val, True)),
                      samples=({"min_val": -2, "max_val": R(1, 3)},)),
    "relu6": Unary(lambda min_val, max_val: _pw((0, x < 0), (x, x <= 6), (6, True)),
                   note="min(max(x, 0), 6): the parameters are fixed at 0 and 6"),
    "clamp": Unary(lambda min, max: _pw(*(([(min, x < min)] if min is not None else [])
                                         + ([(max, x > max)] if max is not None else [])), (x, True)),
                   samples=({"min": -1, "max": 2}, {"min": R(1, 2)}, {"max": -R(3, 2)}),
                   check_defaults=False),
    "hardsigmoid": Unary(lambda: _pw((0, x <= -3), (1, x >= 3), (x / 6 + R(1, 2), True))),
    "softshrink": Unary(lambda lambd: _pw((x - lambd, x > lambd), (x + lambd, x < -lambd), (0, True)),
                        samples=({"lambd": 2},)),
    "hardswish": Unary(lambda: _pw((0, x <= -3), (x, x >= 3), (x * (x + 3) / 6, True))),
    "elu": Unary(lambda alpha, scale, input_scale: _pw((scale * x, x > 0),
                                                       (scale * alpha * (sp.exp(input_scale * x) - 1), True)),
                 samples=({"alpha": R(1, 2), "scale": 3, "input_scale": R(2, 3)},)),
    "selu": Unary(lambda alpha, scale: scale * _pw((x, x > 0), (alpha * (sp.exp(x) - 1), True)),
                  samples=({"alpha": 2, "scale": R(1, 3)},)),
    "celu": Unary(lambda alpha: _pw((x, x > 0), (0, True)) + _pw((alpha * (sp.exp(x / alpha) - 1), x < 0), (0, True)),
                  samples=({"alpha": R(1, 4)}, {"alpha": 3})),
    "floor": Unary(lambda: _window(*_WIN, lambda k: (((k, (x >= k) & (x < k + 1))),)), lattice=_LATTICE),
    "ceil": Unary(lambda: _window(*_WIN, lambda k: (((k + 1, (x > k) & (x <= k + 1))),)), lattice=_LATTICE),
    "round": Unary(lambda: _window(*_WIN, _round_half_even), lattice=_LATTICE),
    "trunc": Unary(lambda: _window(*_WIN, lambda k: ((k, (x >= k) & (x < k + 1) & (x >= 0)),
                                                     (k + 1, (x > k) & (x <= k + 1) & (x < 0)))),
                   lattice=_LATTICE),
    "sign": Unary(lambda: _pw((-1, x < 0), (0, sp.Eq(x, 0)), (1, True))),
    "hardshrink": Unary(lambda lambd: _pw((x, (x > lambd) | (x < -lambd)), (0, True)),
                        samples=({"lambd": 3},)),
    "sqrt": Unary(lambda: sp.sqrt(x), domain=sp.Interval(0, sp.oo)),
    "cbrt": Unary(lambda: _pw((-sp.root(-x, 3), x < 0), (sp.root(x, 3), True))),
    "pow": Unary(lambda exponent: x ** exponent, domain=sp.Interval(0, sp.oo),
                 samples=({"exponent": R(1, 3)}, {"exponent": R(3, 4)}),
                 note="the kink is checked for 0 < exponent < 1, the non-Lipschitz case the rule is for"),
}


# ---------------------------------------------------------------- vector primitives

def _max2(a, b):
    return sp.Piecewise((a, a >= b), (b, True))


def _min2(a, b):
    return sp.Piecewise((a, a <= b), (b, True))


def _argmax(xs):
    """Index of the first maximal entry, by explicit comparisons."""
    pairs = []
    for i, xi in enumerate(xs):
        cond = sp.And(*[xi > xj for xj in xs[:i]], *[xi >= xj for xj in xs[i + 1:]])
        pairs.append((i, cond))
    return sp.Piecewise(*pairs[:-1], (len(xs) - 1, True))


def _argmin(xs):
    return _argmax([-v for v in xs])


def _sorted_asc(xs):
    """Ascending sort by a network of compare-exchange steps (a sorting network)."""
    v = list(xs)
    n = len(v)
    for i in range(n):
        for j in range(n - 1 - i):
            v[j], v[j + 1] = _min2(v[j], v[j + 1]), _max2(v[j], v[j + 1])
    return v


@dataclasses.dataclass(frozen=True)
class Vector:
    """A small-n instance: ``build(xs) -> list of outputs``; ``kind`` says what the outputs are.

    kind: "values" (outputs are input values), "index" (an integer index), "bool"
    (a 0/1 comparison), "mask" (where: first input is the 0/1 condition).
    ``semantics(values) -> outputs`` restates the primitive from an ordering of exact
    values (how the registry describes selections: a copy chosen by an ordering).
    """

    n: int
    build: Callable
    kind: str
    semantics: Callable
    instance: str


def _order_semantics(fn):
    return lambda vals: fn(list(vals))


def _idx_max(v):
    return max(range(len(v)), key=lambda i: (v[i], -i))


def _idx_min(v):
    return min(range(len(v)), key=lambda i: (v[i], i))


_CMP = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b,
        "lt": lambda a, b: a < b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b}
_CMP_EXPR = {"ge": sp.GreaterThan, "gt": sp.StrictGreaterThan, "le": sp.LessThan,
             "lt": sp.StrictLessThan, "eq": sp.Eq, "ne": sp.Ne}


def _cmp_def(name):
    rel = _CMP_EXPR[name]
    return Vector(2, lambda xs: [sp.Piecewise((1, rel(xs[0], xs[1])), (0, True))], "bool",
                  lambda v: [int(bool(_CMP[name](v[0], v[1])))], f"{name}(a, b)")


VECTOR: dict[str, Vector] = {
    "maximum": Vector(2, lambda xs: [_max2(*xs)], "values", lambda v: [max(v)], "maximum(a, b)"),
    "minimum": Vector(2, lambda xs: [_min2(*xs)], "values", lambda v: [min(v)], "minimum(a, b)"),
    "fmax": Vector(2, lambda xs: [_max2(*xs)], "values", lambda v: [max(v)], "fmax(a, b) on reals"),
    "fmin": Vector(2, lambda xs: [_min2(*xs)], "values", lambda v: [min(v)], "fmin(a, b) on reals"),
    **{c: _cmp_def(c) for c in _CMP},
    "where": Vector(3, lambda xs: [sp.Piecewise((xs[1], sp.Eq(xs[0], 1)), (xs[2], True))], "mask",
                    lambda v: [v[1] if v[0] == 1 else v[2]], "where(c, a, b), c in {0, 1}"),
    "max": Vector(3, lambda xs: [_max2(_max2(xs[0], xs[1]), xs[2])], "values",
                  lambda v: [max(v)], "max of 3 entries"),
    "min": Vector(3, lambda xs: [_min2(_min2(xs[0], xs[1]), xs[2])], "values",
                  lambda v: [min(v)], "min of 3 entries"),
    "argmax": Vector(3, lambda xs: [_argmax(xs)], "index", lambda v: [_idx_max(v)], "argmax of 3 entries"),
    "argmin": Vector(3, lambda xs: [_argmin(xs)], "index", lambda v: [_idx_min(v)], "argmin of 3 entries"),
    "sort": Vector(3, lambda xs: _sorted_asc(xs), "values", lambda v: sorted(v), "ascending sort of 3 entries"),
    "topk": Vector(3, lambda xs: list(reversed(_sorted_asc(xs)))[:2], "values",
                   lambda v: sorted(v, reverse=True)[:2], "top-2 of 3 entries, descending"),
    "kthvalue": Vector(3, lambda xs: [_sorted_asc(xs)[1]], "values", lambda v: [sorted(v)[1]],
                       "2nd smallest of 3 entries"),
    # An even count is what tells the lower median from the upper one; n = 2 keeps SymPy fast.
    "median": Vector(2, lambda xs: [_sorted_asc(xs)[0]], "values", lambda v: [sorted(v)[(len(v) - 1) // 2]],
                     "lower median of 2 entries"),
    "cummax": Vector(3, lambda xs: [xs[0], _max2(xs[0], xs[1]), _max2(_max2(xs[0], xs[1]), xs[2])], "values",
                     lambda v: [max(v[:j + 1]) for j in range(3)], "running max of 3 entries"),
    "cummin": Vector(3, lambda xs: [xs[0], _min2(xs[0], xs[1]), _min2(_min2(xs[0], xs[1]), xs[2])], "values",
                     lambda v: [min(v[:j + 1]) for j in range(3)], "running min of 3 entries"),
    "max_pool": Vector(3, lambda xs: [_max2(xs[0], xs[1]), _max2(xs[1], xs[2])], "values",
                       lambda v: [max(v[0:2]), max(v[1:3])], "max pool, window 2, stride 1, 3 entries"),
    "min_pool": Vector(3, lambda xs: [_min2(xs[0], xs[1]), _min2(xs[1], xs[2])], "values",
                       lambda v: [min(v[0:2]), min(v[1:3])], "min pool, window 2, stride 1, 3 entries"),
}

# Norms: the vector 2-norm, checked in dimensions 1 to 3.
NORM_DIMS = (1, 2, 3)


def norm2(xs):
    return sp.sqrt(sum(v ** 2 for v in xs))


def tie_points(n: int):
    """Every point of {0, 1, 2}^n with at least one tie (exact integers)."""
    return [p for p in itertools.product(range(3), repeat=n) if len(set(p)) < n]
