"""What torch's or jax's reverse mode returns at the kinks of every registered primitive, measured live.

Conventions at kinks are implementation choices that change between versions (abs'(0) is 0
in torch and 1 in jax; relu spelled four ways gets four answers), so nothing here is a table
of expected values: every row runs the installed framework's reverse mode at a point placed
exactly on a kink or a tie, and compares the value with the local Clarke set derived from
the rule registry (elementwise kinks) or from enumerating the tie-breaking orders
(selections: the Clarke set is the convex hull of the Jacobians of every strict order of
the tied inputs).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import numpy as np

from ._rules import RULES, Rule, _requires_holds, evaluate
from ._sampling import hull_distance, min_norm_in_hull

__all__ = ["KinkConventions", "ConventionRow", "LocalClarke", "kink_conventions"]

_TOL = 1e-9


# --------------------------------------------------------------------------- local Clarke sets


@dataclasses.dataclass(frozen=True)
class LocalClarke:
    """The Clarke Jacobian of a probe at its kink: a polytope (its vertices), the unit
    2-norm ball (``kind="ball"``), or ``kind="none"`` with the reason none exists."""

    kind: str
    vertices: tuple = ()
    shape: tuple = ()
    reason: str = ""

    def _V(self) -> np.ndarray:
        return np.array(self.vertices, dtype=np.float64).reshape(len(self.vertices), -1)

    def contains(self, J: Any, *, tol: float = _TOL) -> bool | None:
        """Membership (None when no Clarke set exists); NaN/inf is never a member."""
        if self.kind == "none":
            return None
        J = np.asarray(J, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(J)):
            return False
        if self.kind == "ball":
            return bool(np.linalg.norm(J) <= 1.0 + tol)
        return hull_distance(self._V(), J) <= tol

    def min_norm(self) -> np.ndarray | None:
        if self.kind == "none":
            return None
        if self.kind == "ball":
            return np.zeros(self.shape)
        return min_norm_in_hull(self._V())[0].reshape(self.shape)

    def describe(self) -> str:
        if self.kind == "none":
            return f"none ({self.reason})"
        if self.kind == "ball":
            return "unit 2-norm ball"
        V = self._V()
        if V.shape[1] == 1:
            lo, hi = float(V.min()), float(V.max())
            return f"{{{_num(lo)}}}" if lo == hi else f"[{_num(lo)}, {_num(hi)}]"
        return "conv{" + ", ".join(_mat(v.reshape(self.shape)) for v in V) + "}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "vertices": [list(v) for v in self.vertices], "shape": list(self.shape),
                "reason": self.reason, "description": self.describe()}


def _num(v: float) -> str:
    if not math.isfinite(v):
        return repr(v)
    return f"{v:.6g}"


def _mat(a: np.ndarray) -> str:
    a = np.asarray(a)
    if a.ndim <= 1:
        return "(" + ", ".join(_num(float(v)) for v in a.reshape(-1)) + ")"
    return "[" + "; ".join(", ".join(_num(float(v)) for v in row) for row in a) + "]"


@dataclasses.dataclass(frozen=True)
class _Case:
    """A point on a kink and the Clarke set of the probed math there."""

    point: tuple
    clarke: LocalClarke
    where: str
    sides: tuple = ()  # (left, right) one-sided derivatives of an elementwise kink


def _unary_cases(rule: Rule, params: dict | None = None) -> list[_Case]:
    """One case per declared kink of an elementwise rule (lattice kinks at n = 1)."""
    p = {**rule.params, **(params or {})}
    cases = []
    for k in rule.kinks:
        if not _requires_holds(k.requires, p):  # the registry's own reading of the condition
            continue
        q = dict(p, n=1.0) if k.lattice else p
        at = evaluate(k.at, q)
        continuous = k.continuous
        if k.left_value and k.right_value:
            continuous = evaluate(k.left_value, q) == evaluate(k.right_value, q)
        lo, hi = evaluate(k.clarke[0], q), evaluate(k.clarke[1], q)
        if not continuous:
            clarke = LocalClarke("none", reason="jump: the value is discontinuous, no Clarke Jacobian")
        elif not k.lipschitz and not (math.isfinite(evaluate(k.left, q)) and math.isfinite(evaluate(k.right, q))):
            clarke = LocalClarke("none", reason="infinite slope: not Lipschitz, no Clarke Jacobian")
        elif not (math.isfinite(lo) and math.isfinite(hi)):
            left, right = evaluate(k.left, q), evaluate(k.right, q)
            clarke = LocalClarke("polytope", ((min(left, right),), (max(left, right),)), (1, 1))
        else:
            clarke = LocalClarke("polytope", ((lo,), (hi,)), (1, 1))
        sides = (evaluate(k.left, q), evaluate(k.right, q)) if continuous else ()
        cases.append(_Case((at,), clarke, f"x = {_num(at)}", sides))
    return cases


def _identity_case() -> list[_Case]:
    return [_Case((0.0,), LocalClarke("polytope", ((1.0,),), (1, 1)), "x = 0")]


# Which input index each output copies, for inputs without ties.  An independent model
# of each selection primitive, used only to enumerate the tie-breaking orders.
_INDEX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max": lambda x: np.array([np.argmax(x)]),
    "min": lambda x: np.array([np.argmin(x)]),
    "sort": lambda x: np.argsort(x),
    "sort_desc": lambda x: np.argsort(-x),
    "top1": lambda x: np.argsort(-x)[:1],
    "top2": lambda x: np.argsort(-x)[:2],
    "kth2": lambda x: np.argsort(x)[1:2],
    "median": lambda x: np.argsort(x)[(x.size - 1) // 2:(x.size - 1) // 2 + 1],
    "cummax": lambda x: np.array([int(np.argmax(x[: i + 1])) for i in range(x.size)]),
    "cummin": lambda x: np.array([int(np.argmin(x[: i + 1])) for i in range(x.size)]),
    "maxpool2": lambda x: np.array([i + int(np.argmax(x[i:i + 2])) for i in range(x.size - 1)]),
    "minpool2": lambda x: np.array([i + int(np.argmin(x[i:i + 2])) for i in range(x.size - 1)]),
}


def _selection_case(kind: str, point: tuple) -> list[_Case]:
    """Clarke set of a selection at a tied point: hull of the Jacobians of all strict orders of the ties."""
    x = np.asarray(point, dtype=np.float64)
    values = np.unique(x)
    gaps = np.diff(values)
    eps = 1e-3 * (float(gaps.min()) if gaps.size else 1.0)
    groups = [np.flatnonzero(x == v) for v in values if np.sum(x == v) > 1]
    mats = {}
    for perms in itertools.product(*[itertools.permutations(range(len(g))) for g in groups]):
        bump = np.zeros_like(x)
        for g, perm in zip(groups, perms):
            bump[g] = np.asarray(perm, dtype=np.float64) / max(len(g), 1)
        idx = _INDEX[kind](x + eps * bump)
        J = np.zeros((idx.size, x.size))
        J[np.arange(idx.size), idx] = 1.0
        mats[J.tobytes()] = J
    Js = list(mats.values())
    where = "x = " + _mat(x)
    return [_Case(tuple(x.tolist()), LocalClarke("polytope", tuple(tuple(J.reshape(-1)) for J in Js),
                                                 Js[0].shape), where)]


def _ball_case(n: int) -> list[_Case]:
    return [_Case(tuple([0.0] * n), LocalClarke("ball", shape=(1, n)), "x = 0")]


# --------------------------------------------------------------------------- spellings per framework


@dataclasses.dataclass(frozen=True)
class _Spelling:
    rule: str
    code: str
    fn: Callable | None  # None: the framework cannot express the primitive
    cases: Callable[[], list[_Case]]
    note: str = ""


def _u(name: str, params: dict | None = None):
    return lambda: _unary_cases(RULES[name], params)


def _s(kind: str, point: tuple):
    return lambda: _selection_case(kind, point)


_TIES_HI = (1.0, 3.0, 3.0, 2.0)   # max ties at indices 1, 2
_TIES_LO = (3.0, 1.0, 1.0, 2.0)   # min ties at indices 1, 2
_SORT_PT = (3.0, 1.0, 3.0, 2.0)
_TOP2_PT = (1.0, 3.0, 2.0, 2.0)   # the tie straddles the top-2 boundary
_KTH_PT = (1.0, 2.0, 2.0, 3.0)
_MED_PT = (2.0, 1.0, 2.0)
_CUMMAX_PT = (1.0, 1.0, 0.0)
_CUMMIN_PT = (1.0, 1.0, 2.0)
_PAIR = (1.0, 1.0)


def _torch_spellings() -> list[_Spelling]:
    import torch
    import torch.nn.functional as F

    z = torch.zeros_like
    S = _Spelling
    relu = _u("relu")
    return [
        S("relu", "torch.relu(x)", torch.relu, relu),
        S("relu", "torch.clamp(x, min=0)", lambda x: torch.clamp(x, min=0), relu),
        S("relu", "torch.maximum(x, zeros_like(x))", lambda x: torch.maximum(x, z(x)), relu),
        S("relu", "torch.where(x >= 0, x, 0)", lambda x: torch.where(x >= 0, x, 0.0), relu),
        S("relu", "x * (x > 0)", lambda x: x * (x > 0), relu),
        S("threshold", "F.threshold(x, 0.0, 0.0)", lambda x: F.threshold(x, 0.0, 0.0), _u("threshold")),
        S("abs", "torch.abs(x)", torch.abs, _u("abs")),
        S("leaky_relu", "F.leaky_relu(x)", F.leaky_relu, _u("leaky_relu")),
        S("hardtanh", "F.hardtanh(x)", F.hardtanh, _u("hardtanh")),
        S("relu6", "F.relu6(x)", F.relu6, _u("relu6")),
        S("clamp", "torch.clamp(x, -1, 1)", lambda x: torch.clamp(x, -1.0, 1.0), _u("clamp", {"min": -1.0, "max": 1.0})),
        S("hardsigmoid", "F.hardsigmoid(x)", F.hardsigmoid, _u("hardsigmoid")),
        S("softshrink", "F.softshrink(x)", F.softshrink, _u("softshrink")),
        S("hardswish", "F.hardswish(x)", F.hardswish, _u("hardswish")),
        S("elu", "F.elu(x)", F.elu, _u("elu")),
        S("selu", "F.selu(x)", F.selu, _u("selu")),
        S("celu", "F.celu(x)", F.celu, _u("celu")),
        S("floor", "torch.floor(x)", torch.floor, _u("floor")),
        S("ceil", "torch.ceil(x)", torch.ceil, _u("ceil")),
        S("round", "torch.round(x)", torch.round, _u("round")),
        S("trunc", "torch.trunc(x)", torch.trunc, _u("trunc")),
        S("sign", "torch.sign(x)", torch.sign, _u("sign")),
        S("hardshrink", "F.hardshrink(x)", F.hardshrink, _u("hardshrink")),
        S("sqrt", "torch.sqrt(x)", torch.sqrt, _u("sqrt")),
        S("sqrt", "torch.sqrt(x * x)  (= |x|)", lambda x: torch.sqrt(x * x), _u("abs")),
        S("cbrt", "(none)", None, _u("cbrt"), "torch has no cube root; pow(x, 1/3) is NaN for x < 0"),
        S("pow", "torch.pow(x, 0.5)", lambda x: torch.pow(x, 0.5), _u("pow")),
        S("pow", "x ** 0.5", lambda x: x ** 0.5, _u("pow")),
        S("maximum", "torch.maximum(a, b)", lambda x: torch.maximum(x[0], x[1]), _s("max", _PAIR)),
        S("minimum", "torch.minimum(a, b)", lambda x: torch.minimum(x[0], x[1]), _s("min", _PAIR)),
        S("fmax", "torch.fmax(a, b)", lambda x: torch.fmax(x[0], x[1]), _s("max", _PAIR)),
        S("fmin", "torch.fmin(a, b)", lambda x: torch.fmin(x[0], x[1]), _s("min", _PAIR)),
        S("ge", "torch.where(x >= 0, x, 0)", lambda x: torch.where(x >= 0, x, 0.0), relu),
        S("gt", "torch.where(x > 0, x, 0)", lambda x: torch.where(x > 0, x, 0.0), relu),
        S("le", "torch.where(x <= 0, 0, x)", lambda x: torch.where(x <= 0, 0.0, x), relu),
        S("lt", "torch.where(x < 0, 0, x)", lambda x: torch.where(x < 0, 0.0, x), relu),
        S("eq", "torch.where(x == 0, 0, x)  (= x)", lambda x: torch.where(x == 0, 0.0, x), _identity_case),
        S("ne", "torch.where(x != 0, x, 0)  (= x)", lambda x: torch.where(x != 0, x, 0.0), _identity_case),
        S("where", "torch.where(x > 0, x, -x)  (= |x|)", lambda x: torch.where(x > 0, x, -x), _u("abs")),
        S("max", "torch.max(x)", torch.max, _s("max", _TIES_HI)),
        S("max", "torch.amax(x)", torch.amax, _s("max", _TIES_HI)),
        S("max", "torch.max(x, dim=0).values", lambda x: torch.max(x, dim=0).values, _s("max", _TIES_HI)),
        S("min", "torch.min(x)", torch.min, _s("min", _TIES_LO)),
        S("min", "torch.amin(x)", torch.amin, _s("min", _TIES_LO)),
        S("min", "torch.min(x, dim=0).values", lambda x: torch.min(x, dim=0).values, _s("min", _TIES_LO)),
        S("argmax", "x[torch.argmax(x)]", lambda x: x[torch.argmax(x)], _s("max", _TIES_HI)),
        S("argmin", "x[torch.argmin(x)]", lambda x: x[torch.argmin(x)], _s("min", _TIES_LO)),
        S("sort", "torch.sort(x).values", lambda x: torch.sort(x).values, _s("sort", _SORT_PT)),
        S("sort", "torch.sort(x, stable=True).values", lambda x: torch.sort(x, stable=True).values,
          _s("sort", _SORT_PT)),
        S("sort", "torch.sort(x, descending=True).values", lambda x: torch.sort(x, descending=True).values,
          _s("sort_desc", _SORT_PT)),
        S("topk", "torch.topk(x, 1).values", lambda x: torch.topk(x, 1).values, _s("top1", _TIES_HI)),
        S("topk", "torch.topk(x, 2).values", lambda x: torch.topk(x, 2).values, _s("top2", _TOP2_PT)),
        S("kthvalue", "torch.kthvalue(x, 2).values", lambda x: torch.kthvalue(x, 2).values, _s("kth2", _KTH_PT)),
        S("median", "torch.median(x)", torch.median, _s("median", _MED_PT)),
        S("median", "torch.median(x, dim=0).values", lambda x: torch.median(x, dim=0).values,
          _s("median", _MED_PT)),
        S("cummax", "torch.cummax(x, 0).values", lambda x: torch.cummax(x, 0).values, _s("cummax", _CUMMAX_PT)),
        S("cummin", "torch.cummin(x, 0).values", lambda x: torch.cummin(x, 0).values, _s("cummin", _CUMMIN_PT)),
        S("max_pool", "F.max_pool1d(x, 2, stride=1)", lambda x: F.max_pool1d(x[None, None], 2, 1)[0, 0],
          _s("maxpool2", _TIES_HI)),
        S("min_pool", "-F.max_pool1d(-x, 2, stride=1)", lambda x: -F.max_pool1d(-x[None, None], 2, 1)[0, 0],
          _s("minpool2", _TIES_LO), "torch has no min pool; spelled through max_pool"),
        S("norm", "torch.linalg.vector_norm(x)", torch.linalg.vector_norm, lambda: _ball_case(3)),
        S("norm", "torch.norm(x)", torch.norm, lambda: _ball_case(3)),
        S("norm", "torch.sqrt((x * x).sum())", lambda x: torch.sqrt((x * x).sum()), lambda: _ball_case(3)),
    ]


def _jax_spellings() -> list[_Spelling]:
    import jax
    import jax.numpy as jnp

    S = _Spelling
    relu = _u("relu")

    def pool(op, init):
        return lambda x: jax.lax.reduce_window(x, init, op, (2,), (1,), "VALID")

    return [
        S("relu", "jax.nn.relu(x)", jax.nn.relu, relu),
        S("relu", "jnp.maximum(x, 0)", lambda x: jnp.maximum(x, 0), relu),
        S("relu", "jnp.where(x >= 0, x, 0)", lambda x: jnp.where(x >= 0, x, 0), relu),
        S("relu", "jnp.clip(x, 0)", lambda x: jnp.clip(x, 0), relu),
        S("relu", "x * (x > 0)", lambda x: x * (x > 0), relu),
        S("threshold", "(none)", None, _u("threshold"), "jax has no threshold primitive"),
        S("abs", "jnp.abs(x)", jnp.abs, _u("abs")),
        S("leaky_relu", "jax.nn.leaky_relu(x)", jax.nn.leaky_relu, _u("leaky_relu")),
        S("hardtanh", "jax.nn.hard_tanh(x)", jax.nn.hard_tanh, _u("hardtanh")),
        S("relu6", "jax.nn.relu6(x)", jax.nn.relu6, _u("relu6")),
        S("clamp", "jnp.clip(x, -1, 1)", lambda x: jnp.clip(x, -1.0, 1.0), _u("clamp", {"min": -1.0, "max": 1.0})),
        S("hardsigmoid", "jax.nn.hard_sigmoid(x)", jax.nn.hard_sigmoid, _u("hardsigmoid")),
        S("softshrink", "(none)", None, _u("softshrink"), "jax has no softshrink"),
        S("hardswish", "jax.nn.hard_swish(x)", jax.nn.hard_swish, _u("hardswish")),
        S("elu", "jax.nn.elu(x)", jax.nn.elu, _u("elu")),
        S("selu", "jax.nn.selu(x)", jax.nn.selu, _u("selu")),
        S("celu", "jax.nn.celu(x)", jax.nn.celu, _u("celu")),
        S("floor", "jnp.floor(x)", jnp.floor, _u("floor")),
        S("ceil", "jnp.ceil(x)", jnp.ceil, _u("ceil")),
        S("round", "jnp.round(x)", jnp.round, _u("round")),
        S("trunc", "jnp.trunc(x)", jnp.trunc, _u("trunc")),
        S("sign", "jnp.sign(x)", jnp.sign, _u("sign")),
        S("hardshrink", "(none)", None, _u("hardshrink"), "jax has no hardshrink"),
        S("sqrt", "jnp.sqrt(x)", jnp.sqrt, _u("sqrt")),
        S("sqrt", "jnp.sqrt(x * x)  (= |x|)", lambda x: jnp.sqrt(x * x), _u("abs")),
        S("cbrt", "jnp.cbrt(x)", jnp.cbrt, _u("cbrt")),
        S("pow", "jnp.power(x, 0.5)", lambda x: jnp.power(x, 0.5), _u("pow")),
        S("pow", "x ** 0.5", lambda x: x ** 0.5, _u("pow")),
        S("maximum", "jnp.maximum(a, b)", lambda x: jnp.maximum(x[0], x[1]), _s("max", _PAIR)),
        S("minimum", "jnp.minimum(a, b)", lambda x: jnp.minimum(x[0], x[1]), _s("min", _PAIR)),
        S("fmax", "jnp.fmax(a, b)", lambda x: jnp.fmax(x[0], x[1]), _s("max", _PAIR)),
        S("fmin", "jnp.fmin(a, b)", lambda x: jnp.fmin(x[0], x[1]), _s("min", _PAIR)),
        S("ge", "jnp.where(x >= 0, x, 0)", lambda x: jnp.where(x >= 0, x, 0.0), relu),
        S("gt", "jnp.where(x > 0, x, 0)", lambda x: jnp.where(x > 0, x, 0.0), relu),
        S("le", "jnp.where(x <= 0, 0, x)", lambda x: jnp.where(x <= 0, 0.0, x), relu),
        S("lt", "jnp.where(x < 0, 0, x)", lambda x: jnp.where(x < 0, 0.0, x), relu),
        S("eq", "jnp.where(x == 0, 0, x)  (= x)", lambda x: jnp.where(x == 0, 0.0, x), _identity_case),
        S("ne", "jnp.where(x != 0, x, 0)  (= x)", lambda x: jnp.where(x != 0, x, 0.0), _identity_case),
        S("where", "jnp.where(x > 0, x, -x)  (= |x|)", lambda x: jnp.where(x > 0, x, -x), _u("abs")),
        S("max", "jnp.max(x)", jnp.max, _s("max", _TIES_HI)),
        S("min", "jnp.min(x)", jnp.min, _s("min", _TIES_LO)),
        S("argmax", "x[jnp.argmax(x)]", lambda x: x[jnp.argmax(x)], _s("max", _TIES_HI)),
        S("argmin", "x[jnp.argmin(x)]", lambda x: x[jnp.argmin(x)], _s("min", _TIES_LO)),
        S("sort", "jnp.sort(x)", jnp.sort, _s("sort", _SORT_PT)),
        S("sort", "jnp.sort(x, descending=True)", lambda x: jnp.sort(x, descending=True), _s("sort_desc", _SORT_PT)),
        S("topk", "jax.lax.top_k(x, 1)[0]", lambda x: jax.lax.top_k(x, 1)[0], _s("top1", _TIES_HI)),
        S("topk", "jax.lax.top_k(x, 2)[0]", lambda x: jax.lax.top_k(x, 2)[0], _s("top2", _TOP2_PT)),
        S("kthvalue", "jnp.sort(x)[1]", lambda x: jnp.sort(x)[1], _s("kth2", _KTH_PT),
          "jax has no kthvalue; spelled through sort"),
        S("median", "jnp.median(x)", jnp.median, _s("median", _MED_PT)),
        S("cummax", "jax.lax.cummax(x)", jax.lax.cummax, _s("cummax", _CUMMAX_PT)),
        S("cummin", "jax.lax.cummin(x)", jax.lax.cummin, _s("cummin", _CUMMIN_PT)),
        S("max_pool", "lax.reduce_window(x, -inf, lax.max, (2,), (1,))", pool(jax.lax.max, -jnp.inf),
          _s("maxpool2", _TIES_HI)),
        S("min_pool", "lax.reduce_window(x, inf, lax.min, (2,), (1,))", pool(jax.lax.min, jnp.inf),
          _s("minpool2", _TIES_LO)),
        S("norm", "jnp.linalg.norm(x)", jnp.linalg.norm, lambda: _ball_case(3)),
        S("norm", "jnp.sqrt(jnp.sum(x * x))", lambda x: jnp.sqrt(jnp.sum(x * x)), lambda: _ball_case(3)),
    ]


# --------------------------------------------------------------------------- measuring


def _torch_reverse_jacobian(fn: Callable, point: tuple) -> np.ndarray:
    import torch

    scalar_in = len(point) == 1
    x = torch.tensor(point[0] if scalar_in else list(point), dtype=torch.float64)
    # autograd.functional.jacobian is plain reverse mode: one vjp per output element.
    J = torch.autograd.functional.jacobian(fn, x)
    out = np.asarray(J.detach().numpy(), dtype=np.float64)
    return out.reshape(-1, len(point))


def _jax_reverse_jacobian(fn: Callable, point: tuple) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    scalar_in = len(point) == 1
    with jax.enable_x64(True):
        x = jnp.asarray(point[0] if scalar_in else list(point), dtype=jnp.float64)
        # One compiled program per probe: op-by-op dispatch compiles every primitive separately.
        J = jax.jit(jax.jacrev(fn))(x)
        return np.asarray(J, dtype=np.float64).reshape(-1, len(point))


def _behaviour(ad: np.ndarray, case: _Case, in_set: bool | None, is_min: bool | None) -> str:
    clarke = case.clarke
    if not np.all(np.isfinite(ad)):
        return "non-finite (" + ", ".join(sorted({repr(float(v)) for v in ad.reshape(-1) if not np.isfinite(v)})) + ")"
    if clarke.kind == "none":
        return "no Clarke set"
    if clarke.kind == "polytope":
        V = clarke._V()
        flat = ad.reshape(-1)
        if V.shape[1] == 1:
            lo, hi = float(V.min()), float(V.max())
            v = float(flat[0])
            if lo == hi:
                return "the derivative" if abs(v - lo) <= _TOL else "outside"
            if case.sides and abs(v - case.sides[0]) <= _TOL:
                return "left derivative"
            if case.sides and abs(v - case.sides[1]) <= _TOL:
                return "right derivative"
        else:
            if np.any(np.max(np.abs(V - flat), axis=1) <= _TOL):
                return "picks one tie-breaking order (a vertex)"
        if is_min:
            return "min-norm element (even split)" if V.shape[1] > 1 else "min-norm element"
        return "interior of the Clarke set" if in_set else "outside the Clarke set"
    return "min-norm element" if is_min else ("inside the ball" if in_set else "outside the ball")


@dataclasses.dataclass(frozen=True)
class ConventionRow:
    """What one spelling of one primitive returned at one kink."""

    rule: str
    spelling: str
    where: str
    available: bool
    ad_value: tuple | None
    ad_shape: tuple
    clarke: LocalClarke
    in_clarke: bool | None
    is_min_norm: bool | None
    min_norm: tuple | None
    behaviour: str
    note: str = ""

    def ad_array(self) -> np.ndarray | None:
        return None if self.ad_value is None else np.array(self.ad_value, dtype=np.float64).reshape(self.ad_shape)

    def ad_text(self) -> str:
        if not self.available:
            return "not available"
        if self.ad_value is None:
            return "error"
        a = self.ad_array()
        return _num(float(a.reshape(-1)[0])) if a.size == 1 else _mat(a)

    def to_json(self) -> dict:
        def clean(v):
            return [x if math.isfinite(x) else repr(x) for x in v] if v is not None else None

        return {
            "rule": self.rule, "spelling": self.spelling, "where": self.where, "available": self.available,
            "ad_value": clean(self.ad_value), "ad_shape": list(self.ad_shape), "clarke": self.clarke.to_json(),
            "in_clarke": self.in_clarke, "is_min_norm": self.is_min_norm,
            "min_norm": clean(self.min_norm), "behaviour": self.behaviour, "note": self.note,
        }


def _verdict_word(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "NO")


@dataclasses.dataclass(frozen=True)
class KinkConventions:
    """Measured kink conventions of one framework; see :func:`kink_conventions`."""

    framework: str
    versions: dict
    rows: tuple

    def by_rule(self, rule: str) -> list[ConventionRow]:
        return [r for r in self.rows if r.rule == rule]

    def row(self, spelling: str) -> ConventionRow:
        """The first row whose spelling starts with ``spelling`` (e.g. ``"torch.abs(x)"``)."""
        for r in self.rows:
            if r.spelling.startswith(spelling):
                return r
        raise KeyError(f"no row spelled {spelling!r}; spellings are {sorted({r.spelling for r in self.rows})}")

    def explain(self) -> str:
        measured = [r for r in self.rows if r.available and r.ad_value is not None]
        outside = [r for r in measured if r.in_clarke is False]
        not_min = [r for r in measured if r.in_clarke and not r.is_min_norm]
        missing = sorted({r.rule for r in self.rows if not r.available})
        errors = [r for r in self.rows if r.available and r.ad_value is None]
        ver = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        parts = [
            f"Measured live on {ver}: {len(measured)} (spelling, kink) pairs over "
            f"{len({r.rule for r in self.rows})} registered primitives.",
            f"{len(outside)} returned a value outside the local Clarke set"
            + (" (" + "; ".join(f"{r.spelling} at {r.where} gave {r.ad_text()}" for r in outside[:6])
               + ("; ..." if len(outside) > 6 else "") + ")" if outside else "") + ".",
            f"{len(not_min)} returned a Clarke element that is not the min-norm one.",
        ]
        relu = [r for r in measured if r.rule == "relu"]
        if relu:
            parts.append("relu'(0) by spelling: " + ", ".join(f"{r.spelling} -> {r.ad_text()}" for r in relu) + ".")
        if missing:
            parts.append(f"Not expressible in {self.framework}: {', '.join(missing)}.")
        if errors:
            parts.append("Failed to differentiate: " + "; ".join(f"{r.spelling} ({r.note})" for r in errors) + ".")
        parts.append("Values are what reverse mode returns at points placed exactly on the kink; they are "
                     "conventions of this version, not mathematics, and may change on upgrade.")
        return " ".join(parts)

    def to_json(self) -> dict:
        version = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return {"framework": self.framework, "versions": dict(self.versions),
                "rows": [{**r.to_json(), "framework": self.framework, "version": version} for r in self.rows],
                "explanation": self.explain()}

    def to_markdown(self) -> str:
        head = ("| primitive | spelling | at | AD returned | Clarke set | in Clarke? | min-norm? | behaviour |\n"
                "|---|---|---|---|---|---|---|---|")
        lines = [f"### Kink conventions of {self.framework} ("
                 + ", ".join(f"{k} {v}" for k, v in self.versions.items()) + ")", "", head]
        for r in self.rows:
            cells = [r.rule, f"`{r.spelling}`", r.where, r.ad_text(), r.clarke.describe(),
                     _verdict_word(r.in_clarke), _verdict_word(r.is_min_norm), r.behaviour or r.note]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def _versions(framework: str) -> dict:
    if framework == "torch":
        import torch

        return {"torch": torch.__version__}
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def _measure(sp: _Spelling, case: _Case, jac: Callable) -> ConventionRow:
    common = dict(rule=sp.rule, spelling=sp.code, where=case.where, clarke=case.clarke)
    mn = case.clarke.min_norm()
    mn_t = None if mn is None else tuple(float(v) for v in np.asarray(mn).reshape(-1))
    if sp.fn is None:
        return ConventionRow(**common, available=False, ad_value=None, ad_shape=(), in_clarke=None,
                             is_min_norm=None, min_norm=mn_t, behaviour="", note=sp.note or "not available")
    try:
        ad = jac(sp.fn, case.point)
    except Exception as err:  # a spelling the framework refuses to differentiate is a finding, not a crash
        return ConventionRow(**common, available=True, ad_value=None, ad_shape=(), in_clarke=None,
                             is_min_norm=None, min_norm=mn_t, behaviour="error",
                             note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    in_set = case.clarke.contains(ad)
    is_min = None
    if in_set is not None:
        is_min = bool(in_set and np.all(np.isfinite(ad)) and np.max(np.abs(ad.reshape(-1) - np.asarray(mn).reshape(-1))) <= _TOL)
    return ConventionRow(**common, available=True, ad_value=tuple(float(v) + 0.0 for v in ad.reshape(-1)),
                         ad_shape=tuple(ad.shape), in_clarke=in_set, is_min_norm=is_min, min_norm=mn_t,
                         behaviour=_behaviour(ad, case, in_set, is_min), note=sp.note)


def kink_conventions(framework: str, *, rules: tuple | None = None) -> KinkConventions:
    """Measure what the installed framework's reverse mode returns at every registered kink.

    For every rule in ``RULES`` (or only ``rules``), every spelling of it in ``framework``
    ("torch" or "jax") is differentiated in float64 at points exactly on its kinks or ties;
    each row says what AD returned, the local Clarke set, whether the value is in it and
    whether it is the min-norm element.  Rules the framework cannot express appear as
    rows with ``available=False``.

    Example:
        >>> kc = kink_conventions("torch", rules=("abs",))
        >>> kc.row("torch.abs(x)").ad_text(), kc.row("torch.abs(x)").in_clarke
        ('0', True)
    """
    if framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    if isinstance(rules, str):
        rules = (rules,)
    if rules is not None:
        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise ValueError(f"rules {unknown!r} are not in the registry; known: {sorted(RULES)}")
    try:
        spellings = _torch_spellings() if framework == "torch" else _jax_spellings()
    except ImportError as err:
        raise ImportError(f"kink_conventions({framework!r}) needs {framework} installed: "
                          f"pip install 'nonsmooth[{framework}]' ({err})") from err
    jac = _torch_reverse_jacobian if framework == "torch" else _jax_reverse_jacobian
    wanted = tuple(RULES) if rules is None else tuple(rules)
    by_rule: dict[str, list[_Spelling]] = {}
    for sp in spellings:
        by_rule.setdefault(sp.rule, []).append(sp)
    rows = []
    for name in wanted:
        sps = by_rule.get(name)
        if not sps:
            # A rule added to the registry without a probe here: say so in the table.
            sps = [_Spelling(name, "(no probe)", None, lambda: [_Case((), LocalClarke("none", reason="no probe"), "-")],
                             "no probe written for this rule yet")]
        for sp in sps:
            for case in sp.cases():
                rows.append(_measure(sp, case, jac))
    return KinkConventions(framework=framework, versions=_versions(framework), rows=tuple(rows))
