"""The rule registry: what the engine knows about each nonsmooth primitive, as plain data.

Nothing here imports torch, jax or SymPy.  Every expression is a string that SymPy can
parse (``sympy.sympify(kink.left, locals=params)``) and that the engine evaluates with
:func:`evaluate` on plain floats, so a proof certificate and the engine read the same
facts.  Example::

    >>> from nonsmooth.conservative import RULES
    >>> k = RULES["leaky_relu"].kinks[0]
    >>> k.at, k.left, k.right
    ('0', 'negative_slope', '1')
    >>> RULES["leaky_relu"].kink_points()
    [(0.0, 0.01, 1.0)]
"""
from __future__ import annotations

import dataclasses
import math

__all__ = [
    "Kink",
    "Rule",
    "RULES",
    "evaluate",
    "rule_for_torch_op",
    "rule_for_jax_primitive",
]

FAMILIES = (
    "elementwise_unary",
    "elementwise_binary",
    "selection",
    "jump",
    "nonlipschitz",
    "norm",
)

# How the engine treats a primitive (see _rule_impls.py):
#   "unary"        elementwise map, derivative switches at the kink points (left/right)
#   "jump"         elementwise map with a jump: derivative 0 on both sides, values differ
#   "nonlipschitz" elementwise map with an infinite one-sided derivative at its kink
#   "pick"         elementwise binary max/min: the output copies one operand
#   "compare"      comparison of two operands: a boolean that flips at a tie
#   "select"       output elements are copies of input elements chosen by an ordering
#                  (sort, max reductions, pooling, cummax ...); ties are the kinks
#   "norm"         vector norm, nonsmooth where its argument vanishes
#   "mask"         where/select_n: smooth given the boolean operand (which carries the kink)
#   "layer"        one of the package's own layers (soft sort, solvers, implicit layers):
#                  its pieces and Jacobians come from its spec (_layers.py), in LAYER_RULES
IMPLS = ("unary", "jump", "nonlipschitz", "pick", "compare", "select", "norm", "mask", "layer")


@dataclasses.dataclass(frozen=True)
class Kink:
    """One kink of an elementwise primitive, in terms of its scalar parameters.

    ``at``: location; ``left``/``right``: one-sided derivatives there; ``clarke``: the
    Clarke interval ``[lo, hi]`` (``("nan", "nan")`` where none exists); ``continuous``
    and ``lipschitz`` say whether the primitive is continuous / Lipschitz at the kink.
    ``lattice`` is ``"integers"`` when the kink repeats at ``at`` for every integer ``n``
    (floor, round, ...), ``"nonzero_integers"`` when ``n = 0`` is excluded (trunc),
    otherwise ``""``.  ``left_value``/``right_value`` are the
    one-sided limits of the primitive's value (differ only at jumps; in terms of the
    params and of ``n``, the integer of the lattice).
    """

    at: str
    left: str
    right: str
    clarke: tuple[str, str]
    continuous: bool
    lipschitz: bool
    lattice: str = ""
    left_value: str = ""
    right_value: str = ""
    requires: str = ""  # condition on the params for the kink, e.g. "min is not None", "Ne(value, threshold)"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A nonsmooth primitive: its kinks, the ops that spell it in torch and jax, and how
    the engine treats it (``impl``; see ``IMPLS``).

    ``piecewise_affine`` is True when every piece is affine (relu, abs, max, sort, ...):
    then first-order sign patterns describe the pieces exactly.  ``selection`` names
    the ordering rule of a ``"select"`` primitive (``"max"``, ``"sort"``, ...).
    """

    name: str
    arity: int
    family: str
    params: dict
    kinks: tuple[Kink, ...]
    torch_ops: tuple[str, ...]
    jax_primitives: tuple[str, ...]
    description: str
    impl: str = "unary"
    piecewise_affine: bool = True
    selection: str = ""

    def kink_points(self, params: dict | None = None) -> list[tuple[float, float, float]]:
        """``[(at, left, right), ...]`` as floats for the given params (defaults filled in),
        skipping kinks whose ``requires`` condition fails (e.g. ``clamp`` without ``max``)."""
        p = {**self.params, **(params or {})}
        out = []
        for k in self.kinks:
            if k.requires and not _requires_holds(k.requires, p):
                continue
            if k.lattice:
                continue  # repeating kinks are tested by _rule_impls.lattice_kinks
            out.append((evaluate(k.at, p), evaluate(k.left, p), evaluate(k.right, p)))
        return out


_NAMESPACE = {
    "Min": min,
    "Max": max,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
    "oo": math.inf,
    "nan": math.nan,
    "pi": math.pi,
    "Rational": lambda a, b: a / b,
    "Piecewise": lambda *pairs: next(v for v, c in pairs if c),
    "Eq": lambda a, b: float(a == b),
    "Ne": lambda a, b: float(a != b),
    "True": True,
}


def evaluate(expr: str, params: dict) -> float:
    """Evaluate a registry expression (SymPy syntax, restricted names) on float params.

    >>> evaluate("alpha*scale", {"alpha": 2.0, "scale": 0.5})
    1.0
    """
    ns = dict(_NAMESPACE)
    for k, v in params.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            ns[k] = float(v)
    try:
        return float(eval(expr, {"__builtins__": {}}, ns))  # noqa: S307 - registry strings only
    except ZeroDivisionError:
        return math.nan


def _requires_holds(cond: str, params: dict) -> bool:
    """``"NAME is not None"`` or a condition such as ``"Ne(value, threshold)"``."""
    if not cond:
        return True
    name, sep, rest = cond.partition(" is not None")
    if sep and not rest.strip():
        return params.get(name.strip()) is not None
    return bool(evaluate(cond, params))


def _k(at, left, right, clarke=None, continuous=True, lipschitz=True, **kw):
    if clarke is None:
        clarke = (f"Min({left}, {right})", f"Max({left}, {right})")
    return Kink(at, left, right, tuple(clarke), continuous, lipschitz, **kw)


_JUMP = ("nan", "nan")

_RULE_LIST = [
    # ---- elementwise unary, continuous, piecewise affine ----
    Rule("relu", 1, "elementwise_unary", {}, (_k("0", "0", "1"),),
         ("aten.relu.default", "aten.relu_.default"), (),
         "max(x, 0); jax spells it max(x, 0.0) (rule 'maximum')"),
    Rule("threshold", 1, "elementwise_unary", {"threshold": 0.0, "value": 0.0},
         (_k("threshold", "0", "1", requires="Eq(value, threshold)"),
          _k("threshold", "0", "1", _JUMP, False, False, left_value="value", right_value="threshold",
             requires="Ne(value, threshold)")),
         ("aten.threshold.default", "aten.threshold_.default"), (),
         "x if x > threshold else value; a jump unless value == threshold", impl="jump"),
    Rule("abs", 1, "elementwise_unary", {}, (_k("0", "-1", "1"),),
         ("aten.abs.default", "aten.abs_.default"), ("abs",), "|x|"),
    Rule("leaky_relu", 1, "elementwise_unary", {"negative_slope": 0.01},
         (_k("0", "negative_slope", "1"),),
         ("aten.leaky_relu.default", "aten.leaky_relu_.default"), (),
         "x if x > 0 else negative_slope * x"),
    Rule("hardtanh", 1, "elementwise_unary", {"min_val": -1.0, "max_val": 1.0},
         (_k("min_val", "0", "1"), _k("max_val", "1", "0")),
         ("aten.hardtanh.default", "aten.hardtanh_.default"), (),
         "clamp(x, min_val, max_val); torch also spells relu6 this way"),
    Rule("relu6", 1, "elementwise_unary", {"min_val": 0.0, "max_val": 6.0},
         (_k("min_val", "0", "1"), _k("max_val", "1", "0")), (), (),
         "min(max(x, 0), 6); traced as hardtanh(0, 6) in torch, max/min in jax"),
    Rule("clamp", 1, "elementwise_unary", {"min": None, "max": None},
         (_k("min", "0", "1", requires="min is not None"),
          _k("max", "1", "0", requires="max is not None")),
         ("aten.clamp.default", "aten.clamp_.default", "aten.clamp_min.default",
          "aten.clamp_max.default"), (),
         "clamp/clip with scalar bounds; tensor bounds are traced as maximum then minimum"),
    Rule("hardsigmoid", 1, "elementwise_unary", {},
         (_k("-3", "0", "Rational(1, 6)"), _k("3", "Rational(1, 6)", "0")),
         ("aten.hardsigmoid.default", "aten.hardsigmoid_.default"), (),
         "clamp(x/6 + 1/2, 0, 1)"),
    Rule("softshrink", 1, "elementwise_unary", {"lambd": 0.5},
         (_k("-lambd", "1", "0"), _k("lambd", "0", "1")),
         ("aten.softshrink.default",), (), "x - lambd, 0 or x + lambd"),
    # ---- elementwise unary, continuous, piecewise smooth (not affine) ----
    Rule("hardswish", 1, "elementwise_unary", {},
         (_k("-3", "0", "-Rational(1, 2)"), _k("3", "Rational(3, 2)", "1")),
         ("aten.hardswish.default", "aten.hardswish_.default"), (),
         "x * hardsigmoid(x)", piecewise_affine=False),
    Rule("elu", 1, "elementwise_unary", {"alpha": 1.0, "scale": 1.0, "input_scale": 1.0},
         (_k("0", "alpha*scale*input_scale", "scale"),),
         ("aten.elu.default", "aten.elu_.default"), (),
         "scale*x if x > 0 else scale*alpha*(exp(input_scale*x) - 1); torch traces selu as elu",
         piecewise_affine=False),
    Rule("selu", 1, "elementwise_unary",
         {"alpha": 1.6732632423543772, "scale": 1.0507009873554805},
         (_k("0", "alpha*scale", "scale"),), (), (),
         "scale*elu(x, alpha); traced as elu in torch, gt/select_n in jax",
         piecewise_affine=False),
    Rule("celu", 1, "elementwise_unary", {"alpha": 1.0}, (_k("0", "1", "1"),),
         ("aten.celu.default", "aten.celu_.default"), (),
         "max(0, x) + min(0, alpha*(exp(x/alpha) - 1)); C^1 at 0, kinked only in curvature",
         piecewise_affine=False),
    # ---- jumps ----
    Rule("floor", 1, "jump", {},
         (_k("n", "0", "0", _JUMP, False, False, lattice="integers",
             left_value="n - 1", right_value="n"),),
         ("aten.floor.default", "aten.floor_.default"), ("floor",),
         "largest integer <= x; jumps at every integer", impl="jump"),
    Rule("ceil", 1, "jump", {},
         (_k("n", "0", "0", _JUMP, False, False, lattice="integers",
             left_value="n", right_value="n + 1"),),
         ("aten.ceil.default", "aten.ceil_.default"), ("ceil",),
         "smallest integer >= x; jumps at every integer", impl="jump"),
    Rule("round", 1, "jump", {},
         (_k("n + Rational(1, 2)", "0", "0", _JUMP, False, False, lattice="integers",
             left_value="n", right_value="n + 1"),),
         ("aten.round.default", "aten.round_.default"), ("round",),
         "nearest integer (half to even); jumps at every half-integer", impl="jump"),
    Rule("trunc", 1, "jump", {},
         (_k("n", "0", "0", _JUMP, False, False, lattice="nonzero_integers",
             left_value="Piecewise((n - 1, n > 0), (n, True))",
             right_value="Piecewise((n, n > 0), (n + 1, True))"),),
         ("aten.trunc.default", "aten.trunc_.default", "aten.fix.default"), (),
         "integer part toward 0 (also float->int casts); jumps at nonzero integers",
         impl="jump"),
    Rule("sign", 1, "jump", {},
         (_k("0", "0", "0", _JUMP, False, False, left_value="-1", right_value="1"),),
         ("aten.sign.default", "aten.sign_.default", "aten.sgn.default"), ("sign",),
         "-1, 0 or 1; jumps at 0", impl="jump"),
    Rule("hardshrink", 1, "jump", {"lambd": 0.5},
         (_k("-lambd", "1", "0", _JUMP, False, False, left_value="-lambd", right_value="0"),
          _k("lambd", "0", "1", _JUMP, False, False, left_value="0", right_value="lambd")),
         ("aten.hardshrink.default",), (), "x if |x| > lambd else 0; jumps at ±lambd",
         impl="jump"),
    # ---- non-Lipschitz points ----
    Rule("sqrt", 1, "nonlipschitz", {},
         (_k("0", "nan", "oo", _JUMP, True, False),),
         ("aten.sqrt.default", "aten.sqrt_.default"), ("sqrt",),
         "square root; infinite slope at 0", impl="nonlipschitz", piecewise_affine=False),
    Rule("cbrt", 1, "nonlipschitz", {},
         (_k("0", "oo", "oo", _JUMP, True, False),), (), ("cbrt",),
         "cube root; infinite slope at 0", impl="nonlipschitz", piecewise_affine=False),
    Rule("pow", 1, "nonlipschitz", {"exponent": 0.5},
         (_k("0", "nan", "oo", _JUMP, True, False, requires="exponent is not None"),),
         ("aten.pow.Tensor_Scalar",), ("pow",),
         "x**exponent; for 0 < exponent < 1 infinite slope at 0, smooth for integer "
         "exponents >= 1 and C^1 for exponents > 1", impl="nonlipschitz",
         piecewise_affine=False),
    # ---- elementwise binary ----
    Rule("maximum", 2, "elementwise_binary", {}, (),
         ("aten.maximum.default", "aten.max.other"), ("max",),
         "elementwise max(a, b); kink where a == b", impl="pick", selection="max"),
    Rule("minimum", 2, "elementwise_binary", {}, (),
         ("aten.minimum.default", "aten.min.other"), ("min",),
         "elementwise min(a, b); kink where a == b", impl="pick", selection="min"),
    Rule("fmax", 2, "elementwise_binary", {}, (), ("aten.fmax.default",), (),
         "elementwise max ignoring NaN; kink where a == b", impl="pick", selection="max"),
    Rule("fmin", 2, "elementwise_binary", {}, (), ("aten.fmin.default",), (),
         "elementwise min ignoring NaN; kink where a == b", impl="pick", selection="min"),
    # ---- comparisons (the kinks behind where/select) ----
    *[
        Rule(cmp, 2, "jump", {}, (),
             tuple(f"aten.{cmp}.{ov}" for ov in ("Scalar", "Tensor")), (cmp,),
             f"comparison a {sym} b: a boolean that flips where a == b; where/select "
             "driven by it is continuous only if its branches agree there",
             impl="compare", selection=cmp)
        for cmp, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                         ("eq", "=="), ("ne", "!="))
    ],
    Rule("where", 3, "selection", {}, (), ("aten.where.self",), ("select_n",),
         "where(cond, a, b): smooth in a and b given cond; the comparison making cond "
         "carries the kink", impl="mask"),
    # ---- selections: outputs are input elements chosen by an ordering ----
    Rule("max", 1, "selection", {}, (),
         ("aten.max.default", "aten.max.dim", "aten.amax.default"), ("reduce_max",),
         "max reduction (values, indices); ties pick one index", impl="select",
         selection="max"),
    Rule("min", 1, "selection", {}, (),
         ("aten.min.default", "aten.min.dim", "aten.amin.default"), ("reduce_min",),
         "min reduction (values, indices); ties pick one index", impl="select",
         selection="min"),
    Rule("argmax", 1, "selection", {}, (), ("aten.argmax.default",), ("argmax",),
         "index of the max; used downstream by gather/indexing", impl="select",
         selection="max"),
    Rule("argmin", 1, "selection", {}, (), ("aten.argmin.default",), ("argmin",),
         "index of the min", impl="select", selection="min"),
    Rule("sort", 1, "selection", {}, (), ("aten.sort.default", "aten.sort.stable"),
         ("sort",), "sort along a dim; ties permute the tied elements", impl="select",
         selection="sort"),
    Rule("topk", 1, "selection", {}, (), ("aten.topk.default",), ("top_k",),
         "k largest (or smallest) along a dim", impl="select", selection="topk"),
    Rule("kthvalue", 1, "selection", {}, (), ("aten.kthvalue.default",), (),
         "k-th smallest along a dim", impl="select", selection="kthvalue"),
    Rule("median", 1, "selection", {}, (), ("aten.median.default", "aten.median.dim"),
         (), "lower median; jax computes median by sort", impl="select",
         selection="median"),
    Rule("cummax", 1, "selection", {}, (), ("aten.cummax.default",), ("cummax",),
         "running max along a dim", impl="select", selection="cummax"),
    Rule("cummin", 1, "selection", {}, (), ("aten.cummin.default",), ("cummin",),
         "running min along a dim", impl="select", selection="cummin"),
    Rule("max_pool", 1, "selection", {}, (),
         ("aten.max_pool1d_with_indices.default", "aten.max_pool2d_with_indices.default",
          "aten.max_pool3d_with_indices.default", "aten.max_pool2d.default"),
         ("reduce_window_max",), "max over (possibly overlapping) windows",
         impl="select", selection="max"),
    Rule("min_pool", 1, "selection", {}, (), (), ("reduce_window_min",),
         "min over windows", impl="select", selection="min"),
    # ---- norms ----
    Rule("norm", 1, "norm", {"ord": 2.0},
         (_k("0", "-1", "1", ("-1", "1")),),
         ("aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim",
          "aten.norm.Scalar"), (),
         "vector p-norm; at 0 the Clarke set is the dual unit ball (for ord=2 the unit "
         "ball, not a polytope; ord=1 and ord=inf are polyhedral and enumerated exactly, "
         "other ords are refused at a kink); sqrt(sum(x*x)) is recognised as the 2-norm",
         impl="norm", piecewise_affine=False),
]

class _Registry(dict):
    """``RULES``: the framework primitives above.  The package's own layers (soft sort,
    solvers, implicit layers; ``_layers.py``) add rules to ``LAYER_RULES`` at run time; a
    lookup ``RULES[name]`` finds them, iteration and ``in`` do not (they are not framework
    primitives and have no SymPy certificate in ``nonsmooth.proofs``)."""

    def __missing__(self, key):
        return LAYER_RULES[key]


LAYER_RULES: dict[str, Rule] = {}
RULES: dict[str, Rule] = _Registry((r.name, r) for r in _RULE_LIST)

_BY_TORCH = {op: r for r in _RULE_LIST for op in r.torch_ops}
_BY_JAX = {p: r for r in _RULE_LIST for p in r.jax_primitives}


def rule_for_torch_op(op_name) -> Rule | None:
    """The rule for an aten overload name such as ``"aten.relu.default"`` (or the
    OpOverload itself), or ``None`` when the op is not a registered nonsmooth primitive.

    >>> rule_for_torch_op("aten.hardtanh.default").name
    'hardtanh'
    """
    return _BY_TORCH.get(str(op_name))


def rule_for_jax_primitive(name) -> Rule | None:
    """The rule for a jax primitive name such as ``"max"`` (or the primitive itself).

    >>> rule_for_jax_primitive("reduce_window_max").name
    'max_pool'
    """
    return _BY_JAX.get(getattr(name, "name", name))
