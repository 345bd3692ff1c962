"""``audit``: what AD returns through a nonsmooth program, the Clarke Jacobian it should
be in, and a verdict that never overclaims.  Also ``ld_jacobian``, ``clarke_jacobian``
and ``selection_jacobians``, which share the same analysis.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
import platform
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from . import _forward as F
from ._lp import hull_residual, min_norm_point, strictly_feasible

__all__ = [
    "Verdict",
    "ActiveKink",
    "Audit",
    "ClarkeSet",
    "audit",
    "audit_batch",
    "ld_jacobian",
    "clarke_jacobian",
    "selection_jacobians",
]

MAX_PIECES = 4096  # leaves of the exact enumeration before it gives up
ALWAYS_ENUMERATE = 8  # active kinks up to which the enumeration runs even when not needed


class Verdict(str, enum.Enum):
    """The audit's conclusion about AD's output at ``x``."""

    SMOOTH = "SMOOTH"  # no kink active; AD equals the Jacobian (checked by central differences)
    CLARKE = "CLARKE"  # AD lies in the convex hull of B-subdifferential elements found
    SPURIOUS = "SPURIOUS"  # certified: AD is outside the Clarke Jacobian
    NOT_LIPSCHITZ = "NOT_LIPSCHITZ"  # f is discontinuous or non-Lipschitz at x
    UNDECIDED = "UNDECIDED"  # budget or capability exceeded; see ``reason``


@dataclasses.dataclass(frozen=True)
class ActiveKink:
    """One nonsmooth primitive sitting at a kink at ``x``."""

    primitive: str  # registry rule name, e.g. "relu"
    location: str  # where in the trace, e.g. "relu_1 = aten.relu.default(mv_1)"
    clarke: str  # the primitive's local Clarke set there, e.g. "[0, 1]"
    detail: str  # which element and value
    kind: str  # "kink" | "jump" | "tie" | "compare" | "group" | "nonlipschitz" | "norm" | "unsupported"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _fmt_clarke(c) -> str:
    if isinstance(c, tuple) and len(c) == 2 and all(isinstance(v, (int, float)) for v in c):
        return f"[{c[0]:.6g}, {c[1]:.6g}]"
    return str(c)


@dataclasses.dataclass(frozen=True)
class ClarkeSet:
    """B-subdifferential elements found at ``x``; their convex hull approximates (or, when
    ``exact``, equals) the Clarke Jacobian.  ``vertices`` has shape (m, out, in).

    >>> import numpy as np
    >>> C = ClarkeSet(np.array([[[0.0]], [[1.0]]]), True)
    >>> C.contains(np.array([[0.5]])), C.contains(np.array([[2.0]]))
    (True, False)
    """

    vertices: np.ndarray
    exact: bool

    def contains(self, J, tol: float = 1e-7) -> bool:
        """Whether ``J`` (out x in) lies in the convex hull, up to ``tol`` (max-norm)."""
        J = np.asarray(J, dtype=np.float64)
        if len(self.vertices) == 0:
            return False
        if not np.all(np.isfinite(J)):
            return False
        if J.size != self.vertices[0].size:
            raise ValueError(f"J must have shape {self.vertices.shape[1:]}, got {J.shape}")
        res, _ = hull_residual(self.vertices.reshape(len(self.vertices), -1), J.reshape(-1))
        return bool(res <= tol)

    def min_norm(self) -> np.ndarray:
        """The min-Frobenius-norm element of the hull (the steepest-descent certificate)."""
        z, _ = min_norm_point(self.vertices.reshape(len(self.vertices), -1))
        return z.reshape(self.vertices.shape[1:])

    def to_json(self) -> dict:
        return {"vertices": self.vertices.tolist(), "exact": self.exact}

    def explain(self) -> str:
        kind = "exactly the Clarke Jacobian" if self.exact else "an inner approximation of the Clarke Jacobian"
        return f"{len(self.vertices)} B-subdifferential element(s); their convex hull is {kind}."


@dataclasses.dataclass(frozen=True)
class Audit:
    """The result of :func:`audit`.  Arrays are float64 NumPy, Jacobians out x in."""

    verdict: Verdict
    ad_jacobian: np.ndarray | None
    selection_jacobians: np.ndarray
    b_subdifferential: np.ndarray
    exact: bool
    bifurcation: bool
    active_kinks: tuple
    min_norm: np.ndarray | None
    framework: str
    versions: dict
    reason: str
    dtype: str = "float64"
    engine_jacobian: np.ndarray | None = None  # Jacobian of the LD piece along the identity
    hull_distance: float | None = None  # max-norm distance of AD to the hull of b_subdifferential
    notes: tuple = ()

    def explain(self) -> str:
        v = self.verdict
        n_k = len(self.active_kinks)
        parts = []
        if v is Verdict.SMOOTH:
            parts.append("No nonsmooth primitive sits at a kink at this point, so f is differentiable "
                         "here and AD returned its Jacobian (checked against float64 central differences).")
        elif v is Verdict.CLARKE:
            parts.append(f"{n_k} nonsmooth primitive site(s) sit at a kink. AD's output lies in the convex "
                         f"hull of {len(self.b_subdifferential)} B-subdifferential element(s), so it is an "
                         "element of the Clarke Jacobian.")
        elif v is Verdict.SPURIOUS:
            parts.append("AD's output is NOT in the Clarke Jacobian, and this is certified.")
        elif v is Verdict.NOT_LIPSCHITZ:
            parts.append("f is not Lipschitz (or not continuous) at this point, so no Clarke Jacobian exists; "
                         "whatever AD returned is not a generalized derivative.")
        else:
            parts.append("The audit could not decide.")
        reason = " ".join(self.reason.split())
        if reason:
            parts.append(reason if reason.endswith(".") else reason + ".")
        if self.bifurcation:
            parts.append(f"The AD output depends on the derivative chosen at the kinks: "
                         f"{len(self.selection_jacobians)} different selection Jacobians.")
        if n_k:
            shown = "; ".join(f"{k.detail} [{k.location}], local Clarke set {k.clarke}" for k in self.active_kinks[:5])
            more = f" (and {n_k - 5} more)" if n_k > 5 else ""
            parts.append(f"Active kinks: {shown}{more}.")
        if v not in (Verdict.SMOOTH, Verdict.NOT_LIPSCHITZ):
            parts.append("The piece enumeration was " + ("complete." if self.exact else "not complete (the hull found is an inner approximation)."))
        parts.extend(n for n in self.notes if n)
        ver = ", ".join(f"{k} {val}" for k, val in self.versions.items())
        parts.append(f"({self.framework}; {ver}; input dtype {self.dtype})")
        return " ".join(parts)

    def to_json(self) -> dict:
        def arr(a):
            return None if a is None else _finite_or_none(np.asarray(a, dtype=np.float64).tolist())

        d = {
            "verdict": self.verdict.value,
            "ad_jacobian": arr(self.ad_jacobian),
            "selection_jacobians": arr(self.selection_jacobians),
            "b_subdifferential": arr(self.b_subdifferential),
            "exact": self.exact,
            "bifurcation": self.bifurcation,
            "active_kinks": [k.to_json() for k in self.active_kinks],
            "min_norm": arr(self.min_norm),
            "framework": self.framework,
            "versions": dict(self.versions),
            "reason": self.reason,
            "dtype": self.dtype,
            "engine_jacobian": arr(self.engine_jacobian),
            "hull_distance": self.hull_distance,
            "notes": list(self.notes),
            "explanation": self.explain(),
        }
        return json.loads(json.dumps(_finite_or_none(d), default=str))


def _finite_or_none(obj):
    """JSON has no NaN/inf: non-finite numbers become null (text is left alone)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- frameworks


def _framework_of(x) -> str:
    leaves = x if isinstance(x, (tuple, list)) else (x,)
    if len(leaves) == 0:
        raise ValueError("x must be an array or a non-empty tuple of arrays, got an empty tuple")
    mods = {type(a).__module__.split(".")[0] for a in leaves}
    if mods <= {"torch"}:
        return "torch"
    if mods <= {"jax", "jaxlib"}:
        return "jax"
    raise TypeError(
        f"x must be torch tensors or jax arrays (all of one framework); got {sorted(type(a).__name__ for a in leaves)}. "
        "Convert NumPy inputs with torch.as_tensor or jnp.asarray."
    )


def _adapter(framework: str):
    mod = "_trace_torch" if framework == "torch" else "_trace_jax"
    return importlib.import_module(f".{mod}", __package__)


_TRACE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_get(f, key):
    try:
        return _TRACE_CACHE.get(f, {}).get(key)
    except TypeError:  # f cannot be weakly referenced
        return None


def _cache_put(f, key, graph):
    try:
        _TRACE_CACHE.setdefault(f, {})[key] = graph
    except TypeError:
        pass


def _cache_drop(f):
    try:
        _TRACE_CACHE.pop(f, None)
    except TypeError:
        pass


class _Problem:
    """``f`` traced at ``x``, with its float64 interpreter."""

    def __init__(self, f: Callable, x, *, kink_tol: float, graph=None):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if not isinstance(kink_tol, (int, float)) or not math.isfinite(kink_tol) or kink_tol < 0:
            raise ValueError(f"kink_tol must be a finite number >= 0, got {kink_tol!r}")
        self.framework = _framework_of(x)
        self.A = _adapter(self.framework)
        self.f = f
        self.xs = self.A.as_inputs(x)
        for i, t in enumerate(self.xs):
            a = np.asarray(self.A.to_numpy(t), dtype=np.float64)
            if a.size == 0:
                raise ValueError(f"x[{i}] is empty (shape {tuple(a.shape)}); audit needs at least one input element")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"x[{i}] contains NaN or inf (e.g. {a[~np.isfinite(a)][:3].tolist()}); audit needs a finite point")
        self.dtype = self.A.dtype_name(self.xs)
        self.eps = self.A.eps_of(self.xs)
        self.trace_error = None
        self.graph = graph
        self.cached = False
        key = (self.framework, tuple((tuple(t.shape), str(t.dtype)) for t in self.xs))
        if graph is None:
            graph = _cache_get(f, key)
            self.cached = graph is not None
        if graph is None:
            try:
                graph = self.A.trace(f, self.xs)
                _cache_put(f, key, graph)
            except self.A.TraceError as e:
                self.trace_error = str(e)
        self.graph = graph
        self._key = key
        if self.graph is not None:
            # one backend per graph: it caches each node's float64 constant arguments
            self.be = getattr(self.graph, "_backend", None) or self.A.Backend()
            self.graph._backend = self.be
            self.xs64 = [self.A.to64(t) for t in self.xs]
            self.interp = F.Interpreter(self.graph, self.be, self.xs64, kink_tol=kink_tol)
            self.n_in = self.interp.n_in
            self.n_out = sum(v.size for v in self.graph.outputs)

    def tangents(self, M: np.ndarray | None):
        if M is None:
            return self.be.identity_tangents(self.xs64)
        return self.be.tangents_from(M, self.xs64)

    def run(self, policy, M=None, **kw):
        return self.interp.run(policy, self.tangents(M), **kw)

    def values_at(self, xflat: np.ndarray) -> np.ndarray:
        """f at another point (float64, through the same trace)."""
        xs, o = [], 0
        for t in self.xs64:
            s = int(np.prod(t.shape)) if len(t.shape) else 1
            xs.append(self.be.asarray(xflat[o : o + s].reshape(tuple(t.shape))))
            o += s
        outs = self.interp.graph_function()(*xs)
        return np.concatenate([np.asarray(self.be.asnumpy(v), dtype=np.float64).reshape(-1) for v in outs])

    def x_flat(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.be.asnumpy(t), dtype=np.float64).reshape(-1) for t in self.xs64])


# --------------------------------------------------------------------------- analysis


MAX_TANGENT_FLOATS = 2 * 10**8  # 1.6 GB of float64 tangents at the widest intermediate


class TooLarge(ValueError):
    pass


def _check_size(P: _Problem) -> None:
    widest = max([v.size for n in P.graph.nodes for v in n.outputs if v.is_float] + [1])
    if P.n_in * widest > MAX_TANGENT_FLOATS:
        raise TooLarge(
            f"x has {P.n_in} elements and the widest intermediate {widest}: the dense tangent matrix at the kinks "
            f"({P.n_in * widest:.3g} floats) exceeds {MAX_TANGENT_FLOATS:.0e}. Audit a function of fewer inputs "
            "(e.g. close over the rest of x) or a smaller slice of the model."
        )


@dataclasses.dataclass
class _Analysis:
    J0: np.ndarray
    out0: np.ndarray
    sites: dict
    b_elems: list
    b_sources: list
    sel: list
    exact: bool
    exact_reason: str
    discontinuous: str
    enum_leaves: list
    notes: list


def _site_assign(seed: int, choice: str):
    def assign(site):
        if choice == "first":
            return 0
        if choice == "last":
            return len(site.options) - 1
        h = hash((seed, site.node, _key_hash(site.key))) & 0xFFFFFFFF
        return int(np.random.default_rng(h).integers(len(site.options)))

    return assign


def _assignments(sites: dict, n_directions: int, seed: int) -> list:
    """Vertex choices to try: every combination when there are at most n_directions + 2,
    else all-first, all-last and n_directions random ones."""
    order = sorted(sites.values(), key=lambda s: (s.node, str(s.key)))
    radices = [max(1, len(s.options)) for s in order]
    n_combos = int(np.prod(radices, dtype=float)) if radices else 1
    if n_combos > n_directions + 2:
        return ([_site_assign(0, "first"), _site_assign(0, "last")]
                + [_site_assign(seed * 100003 + j, "random") for j in range(n_directions)])
    index = {(s.node, _key_hash(s.key)): i for i, s in enumerate(order)}
    out = []
    for c in range(n_combos):
        digits, r = [], c
        for b in radices:
            digits.append(r % b)
            r //= b
        out.append(lambda site, d=digits: d[index[(site.node, _key_hash(site.key))]]
                   if (site.node, _key_hash(site.key)) in index else 0)
    return out


def _key_hash(key):
    return tuple(tuple(k.tolist()) if isinstance(k, np.ndarray) else k for k in key)


def _distinct(mats: list, tol: float = 1e-10) -> list:
    out = []
    for m in mats:
        if not np.all(np.isfinite(m)):
            if not any(np.array_equal(m, o, equal_nan=True) for o in out):
                out.append(m)
            continue
        scale = 1.0 + float(np.max(np.abs(m))) if m.size else 1.0
        if not any(np.all(np.isfinite(o)) and np.max(np.abs(m - o)) <= tol * scale for o in out):
            out.append(m)
    return out


def _analyse(P: _Problem, *, exact_budget: int, n_directions: int, seed: int, need_enum: Callable | None = None) -> _Analysis:
    rng = np.random.default_rng(seed)
    n = P.n_in
    notes: list[str] = []
    P.interp.run(F.LexPolicy(), [None] * len(P.xs64))
    out0 = P.values_at(P.x_flat())  # f(x) itself (branch choices may move values to one-sided limits)
    if not P.interp.sites_seen:
        # No kink active: the Jacobian is computed lazily (see _engine_jacobian).
        return _Analysis(None, out0, {}, [], ["identity"], [], True, "", "", [], notes)
    _check_size(P)
    leaf0 = P.run(F.LexPolicy())[0]
    sites = dict(P.interp.sites_seen)

    kinds = {s.kind for s in sites.values()}
    weight = sum(s.weight for s in sites.values())
    b_elems, b_src, sel = [], [], []
    leaves_for_continuity = []
    pc1 = not (kinds & {"nonlipschitz", "unsupported"})

    # Which kinds of sites block an exact enumeration?
    exact, exact_reason, enum_leaves, enumerated = False, "", [], False
    blockers = kinds & {"norm", "unsupported", "nonlipschitz"}
    incomplete = [s for s in sites.values() if not s.complete]
    if blockers:
        exact_reason = {
            "norm": "a 2-norm at 0 has infinitely many pieces",
            "unsupported": "a primitive at a kink is not supported",
            "nonlipschitz": "a non-Lipschitz point is active",
        }[sorted(blockers)[0]]
    elif incomplete:
        exact_reason = f"a tied group of {len(incomplete[0].members)} elements is too large to enumerate its orderings"
    elif weight > exact_budget:
        exact_reason = f"{weight} active kinks exceed exact_budget={exact_budget}"
    eligible = not exact_reason

    def enumerate_pieces():
        nonlocal exact, exact_reason, enum_leaves, enumerated
        enumerated = True
        try:
            enum_leaves = P.run(F.EnumPolicy(), None, max_leaves=MAX_PIECES, max_sites=exact_budget)
            exact = True
            if any(not lf.certified for lf in enum_leaves):
                exact, exact_reason = False, "a jump or comparison ties to first order (decided at second order)"
            elif any(lf.nonaffine_kink for lf in enum_leaves) and _dependent_rows(enum_leaves):
                exact, exact_reason = False, ("kink arguments that are not piecewise affine have linearly dependent "
                                              "gradients, so thin (second-order) pieces may exist")
            for lf in enum_leaves:
                if lf.certified:
                    b_elems.append(lf.jac)
                    b_src.append("enumeration")
                    leaves_for_continuity.append(lf)
        except F.BudgetExceeded as e:
            exact_reason = f"enumeration stopped: {e}"
            enum_leaves = []
        except F.NotEnumerable as e:
            exact_reason = f"enumeration impossible: {e}"
            enum_leaves = []

    # 1. Exact enumeration of the essentially active pieces first when few kinks are active.
    if eligible and weight <= ALWAYS_ENUMERATE:
        enumerate_pieces()

    # With many kinks, stop sampling once AD is inside the hull of certified elements
    # (jumps and comparisons need every branch for the continuity check).
    def settled():
        return (need_enum is not None and not exact and weight > ALWAYS_ENUMERATE
                and not (kinds & {"jump", "compare"}) and not need_enum(b_elems))

    # 3. AD-selection Jacobians: every vertex choice when there are few, else the all-first,
    #    all-last and n_directions random ones.
    assigns = _assignments(sites, n_directions, seed)
    for idx, assign in enumerate(assigns):
        if idx >= 10 and idx % 8 == 2 and settled():
            break
        leaf = P.run(F.AssignPolicy(assign))[0]
        sel.append(leaf.jac)
        if pc1 and leaf.certified and not any(site.kind == "norm" for site, _ in leaf.choices):
            ok, _ = strictly_feasible(leaf.conds)
            if ok and not (leaf.degenerate and any(site.discrete for site, _ in leaf.choices)):
                b_elems.append(leaf.jac)
                b_src.append("selection")
                leaves_for_continuity.append(leaf)

    # 2. LD derivatives along +-identity and random direction matrices: exact B-elements
    #    for PC1 programs (Khan & Barton).  A cross-check only when the enumeration is exact.
    n_mats = 4 if exact else max(2, n_directions)
    mats = [np.eye(n), -np.eye(n)]
    while len(mats) < n_mats:
        M = rng.standard_normal((n, n))
        mats += [M, -M]
    for idx, M in enumerate(mats[:n_mats]):
        if idx >= 8 and idx % 8 == 0 and settled():
            break
        leaf = P.run(F.LexPolicy(), M)[0]
        try:
            Minv = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            continue
        J = leaf.jac @ Minv
        with np.errstate(all="ignore"):
            near = np.abs(J - np.round(J)) < 1e-12  # M^{-1} round-off around exact (often integer) pieces
        J = np.where(near, np.round(J), J)
        leaves_for_continuity.append(leaf)
        if pc1 and leaf.certified and np.all(np.isfinite(J)):
            b_elems.append(J)
            b_src.append("LD")

    # 4. More kinks: enumerate only if the elements found do not already settle AD.
    if eligible and not enumerated:
        if need_enum is not None and not need_enum(b_elems):
            exact_reason = f"enumeration of {weight} active kinks skipped: AD already lies in the hull of the elements found"
        else:
            enumerate_pieces()

    # 5. Continuity: certified pieces whose limits at x differ -> f jumps at x.
    discontinuous = ""
    if kinds & {"jump", "compare"} or any(s.discrete for s in sites.values()):
        cands = [lf for lf in leaves_for_continuity if lf.certified]
        feas = [lf for lf in cands if strictly_feasible(lf.conds)[0]]
        if len(feas) >= 2:
            ref = feas[0].out
            for lf in feas[1:]:
                gap = float(np.max(np.abs(lf.out - ref))) if ref.size else 0.0
                if gap > 1e-9 * (1.0 + float(np.max(np.abs(ref)))):
                    discontinuous = (f"f takes different limits at x along two branches (values differ by "
                                     f"{gap:.3g}): it is discontinuous there")
                    break
    return _Analysis(leaf0.jac, out0, sites, b_elems, b_src, sel, exact, exact_reason, discontinuous,
                     enum_leaves, notes)


def _engine_jacobian(P: _Problem) -> np.ndarray:
    """f's float64 Jacobian at a point where no kink is active: every primitive is
    differentiable there, so the framework's own derivative of the traced program is it.
    Reverse mode when outputs are fewer; if it hits 0 * inf (where-guarded singularities)
    use the per-primitive forward pass, which does not."""
    J = None
    try:
        J = P.be.jacobian(P.interp.graph_function(), P.xs64, reverse=P.n_out < P.n_in)
    except Exception:
        J = None
    if J is None or not np.all(np.isfinite(J)):
        J = P.run(F.LexPolicy())[0].jac
    return J


def _dependent_rows(leaves) -> bool:
    for lf in leaves:
        if len(lf.conds) < 2:
            continue
        R = np.asarray(lf.conds)
        R = R / np.linalg.norm(R, axis=1, keepdims=True)
        uniq = []
        for r in R:
            if not any(np.allclose(r, u, atol=1e-10) or np.allclose(r, -u, atol=1e-10) for u in uniq):
                uniq.append(r)
        if len(uniq) >= 2 and np.linalg.matrix_rank(np.asarray(uniq), tol=1e-9) < len(uniq):
            return True
    return False


def _active_kinks(P: _Problem, sites: dict) -> tuple:
    out = []
    for (ni, _), s in sorted(sites.items(), key=lambda kv: kv[0][0]):
        node = P.graph.nodes[ni]
        out.append(ActiveKink(node.origin or node.rule, node.describe(), _fmt_clarke(s.clarke), s.text, s.kind))
    return tuple(out)


def _nonlipschitz_evidence(P: _Problem, analysis: _Analysis, rng) -> str:
    """Difference quotients of f that keep growing like t^(-1/2) as t -> 0 show f is not
    Lipschitz at x; returns a sentence with the numbers, or ''."""
    x = P.x_flat()
    f0 = analysis.out0
    n = x.size
    dirs = [np.eye(n)[i] * s for i in range(min(n, 8)) for s in (1.0, -1.0)]
    dirs += [rng.standard_normal(n) for _ in range(4)]
    ts = [1e-4, 1e-6, 1e-8, 1e-10]
    scale = 1.0 + float(np.max(np.abs(x)))
    for d in dirs:
        d = d / np.linalg.norm(d)
        qs = []
        for t in ts:
            with np.errstate(all="ignore"):
                ft = P.values_at(x + t * scale * d)
            if not np.all(np.isfinite(ft)):
                qs = []
                break
            qs.append(float(np.max(np.abs(ft - f0))) / (t * scale))
        if len(qs) == len(ts) and qs[0] > 0 and all(b > 5.0 * a for a, b in zip(qs, qs[1:])):
            return ("difference quotients |f(x + t d) - f(x)| / t grow without bound as t -> 0 "
                    f"({', '.join(f'{q:.3g}' for q in qs)} for t = 1e-4 .. 1e-10)")
    return ""


def _fd_check(P: _Problem, J: np.ndarray, rng) -> float:
    """Relative gap between J v and float64 central differences along a random v.  Steps
    shrink (1e-6 .. 1e-10) until one does not straddle a nearby kink; the best is returned
    with its step's round-off allowance subtracted."""
    x = P.x_flat()
    v = rng.standard_normal(x.size)
    v /= np.linalg.norm(v)
    jv = J @ v
    best = math.inf
    for h_rel, allowance in ((1e-6, 0.0), (1e-8, 1e-7), (1e-10, 1e-5)):
        h = h_rel * (1.0 + float(np.max(np.abs(x))))
        with np.errstate(all="ignore"):
            fd = (P.values_at(x + h * v) - P.values_at(x - h * v)) / (2 * h)
        if not np.all(np.isfinite(fd)):  # f is not finite on both sides: not differentiable here
            return math.inf
        gap = float(np.max(np.abs(fd - jv))) / (1.0 + float(np.max(np.abs(jv)))) if jv.size else 0.0
        best = min(best, max(0.0, gap - allowance))
        if best <= 1e-6:
            break
    return best


def _undecided(P, reason, ad=None, **kw) -> Audit:
    return Audit(
        verdict=Verdict.UNDECIDED,
        ad_jacobian=ad,
        selection_jacobians=kw.get("sel", np.zeros((0,))),
        b_subdifferential=kw.get("b", np.zeros((0,))),
        exact=False,
        bifurcation=kw.get("bif", False),
        active_kinks=kw.get("kinks", ()),
        min_norm=None,
        framework=P.framework,
        versions=_versions(P),
        reason=reason,
        dtype=P.dtype,
        engine_jacobian=kw.get("J0"),
    )


def _versions(P) -> dict:
    import scipy

    return {**P.A.versions(), "numpy": np.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


def _ad(P: _Problem, n_out: int | None):
    try:
        jac, y = P.A.ad_jacobian(P.f, P.xs, n_out)
        return (jac, y), ""
    except Exception as e:  # what the framework itself says about f
        return None, f"{type(e).__name__}: {e}"


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def audit(f: Callable, x, *, kink_tol: float = 0.0, exact_budget: int = 16, n_directions: int = 64,
          seed: int = 0, _graph=None) -> Audit:
    """Audit what reverse-mode AD returns for ``f`` at ``x``.

    ``f`` maps torch tensors (or jax arrays) to an array (or a tuple of arrays, whose
    elements are the Jacobian's rows, in order); ``x`` is one array, or a tuple of arrays
    passed to ``f`` as separate arguments (their elements are the columns, in order).
    Any float dtype: AD runs in it, the analyses in float64.  The trace is cached per
    ``f`` and shapes, and checked against ``f(x)`` on every call.  ``kink_tol`` widens
    "at a kink" to ``|distance| <= kink_tol``; ``exact_budget`` caps the number of active
    kinks whose pieces are enumerated exactly; ``n_directions`` is the number of random
    LD direction matrices and of sampled vertex choices.

    Example:
        >>> import torch
        >>> a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1))
        >>> a.verdict.value, a.ad_jacobian.tolist(), a.b_subdifferential.tolist()
        ('SPURIOUS', [[0.0]], [[[1.0]]])
    """
    if not isinstance(kink_tol, (int, float)) or isinstance(kink_tol, bool) or not math.isfinite(kink_tol) or kink_tol < 0:
        raise ValueError(f"kink_tol must be a finite number >= 0, got {kink_tol!r}")
    _check_int("exact_budget", exact_budget, 0)
    _check_int("n_directions", n_directions, 1)
    _check_int("seed", seed, 0)
    P = _Problem(f, x, kink_tol=float(kink_tol), graph=_graph)
    rng = np.random.default_rng(seed)
    if P.graph is None:
        return _undecided(P, f"f could not be traced, so its primitives are unknown: {P.trace_error}")
    got, ad_err = _ad(P, P.n_out)
    if got is None:
        return _undecided(P, f"the framework's reverse mode failed on f: {ad_err}")
    ad, y_user = got
    ad_tol = min(max(100 * P.eps, 1e-9), 0.05)  # AD runs in the user's dtype

    def ad_in(b_elems):
        if not b_elems or not np.all(np.isfinite(ad)):
            return False
        B = np.stack(b_elems)
        res, _ = hull_residual(B.reshape(len(B), -1), ad.reshape(-1))
        return res <= ad_tol * (1.0 + float(np.max(np.abs(B))))

    def analyse(P):
        try:
            return _analyse(P, exact_budget=exact_budget, n_directions=n_directions, seed=seed,
                            need_enum=lambda b: not ad_in(b))
        except TooLarge as e:
            return str(e)
        except Exception:  # a primitive the adapter cannot evaluate in float64, ...
            if P.graph.unsupported:
                return None
            raise

    A = analyse(P)
    if isinstance(A, str):
        return _undecided(P, A, ad)
    if A is None:
        return _undecided(P, f"unsupported primitive(s): {', '.join(sorted(set(P.graph.unsupported)))}", ad)
    if not _reproduces(A.out0, y_user, ad_tol):
        if P.cached:  # the closure changed since the cached trace: trace again
            _cache_drop(f)
            P = _Problem(f, x, kink_tol=float(kink_tol))
            if P.graph is None:
                return _undecided(P, f"f could not be traced, so its primitives are unknown: {P.trace_error}")
            A = analyse(P)
            if isinstance(A, str):
                return _undecided(P, A, ad)
        if A is None or not _reproduces(A.out0, y_user, ad_tol):
            return _undecided(P, "the traced program does not reproduce f(x) (randomness, hidden state or a "
                                 "side effect in f?), so an analysis of the trace would not be about f.", ad)
    kinks = _active_kinks(P, A.sites)
    sel = np.stack(_distinct(A.sel)) if A.sel else np.zeros((0, P.n_out, P.n_in))
    B = [b for b in _distinct(A.b_elems) if np.all(np.isfinite(b))]
    Barr = np.stack(B) + 0.0 if B else np.zeros((0, P.n_out, P.n_in))  # + 0.0: no -0 entries
    bif = len(sel) > 1
    common = dict(ad_jacobian=ad, selection_jacobians=sel, b_subdifferential=Barr, bifurcation=bif,
                  active_kinks=kinks, framework=P.framework, versions=_versions(P), dtype=P.dtype,
                  engine_jacobian=A.J0)
    nonfinite_ad = not np.all(np.isfinite(ad))
    ad_note = ("AD returned NaN/inf entries, which are never a generalized derivative."
               if nonfinite_ad else "")

    if P.graph.unsupported:
        return Audit(Verdict.UNDECIDED, exact=False, min_norm=None,
                     reason=f"unsupported primitive(s) in the trace: {', '.join(sorted(set(P.graph.unsupported)))}; "
                            "the engine does not know their kinks, so it makes no claim.",
                     notes=(ad_note,) if ad_note else (), **common)

    kinds = {s.kind for s in A.sites.values()}
    if not np.all(np.isfinite(A.out0)):
        return Audit(Verdict.UNDECIDED, exact=False, min_norm=None,
                     reason="f(x) is not finite (a pole or a domain boundary): there is nothing to differentiate.",
                     **common)
    # ---------- discontinuity / non-Lipschitz
    if A.discontinuous:
        return Audit(Verdict.NOT_LIPSCHITZ, exact=A.exact, min_norm=None, reason=A.discontinuous,
                     notes=(ad_note,) if ad_note else (), **common)
    if "nonlipschitz" in kinds:
        ev = _nonlipschitz_evidence(P, A, rng)
        if ev:
            return Audit(Verdict.NOT_LIPSCHITZ, exact=False, min_norm=None,
                         reason=f"a non-Lipschitz point is active and {ev}.", notes=(ad_note,) if ad_note else (), **common)
        return Audit(Verdict.UNDECIDED, exact=False, min_norm=None,
                     reason="a primitive with an infinite slope (sqrt, fractional power) sits at its singular point, "
                            "but f's difference quotients stay bounded there (its argument vanishes to second order, "
                            "e.g. sqrt(x**2)): whether f is Lipschitz is decided beyond first order."
                            + (" " + ad_note if ad_note else ""), **common)
    if "unsupported" in kinds:
        bad = [s.text for s in A.sites.values() if s.kind == "unsupported"]
        return Audit(Verdict.UNDECIDED, exact=False, min_norm=None, reason=f"unsupported kink: {bad[0]}", **common)
    if kinds & {"jump", "compare"} and not A.exact:
        has_jump = any(s.kind == "jump" for s in A.sites.values())
        if has_jump:
            return Audit(Verdict.UNDECIDED, exact=False, min_norm=None,
                         reason="a jump primitive sits at its jump but continuity could not be settled: " + A.exact_reason,
                         **common)

    # ---------- smooth point
    if not A.sites:
        if not np.all(np.isfinite(A.out0)):
            return _undecided(P, "f is not finite at x (a pole or a domain boundary of a smooth primitive).", ad)
        if not nonfinite_ad and _fd_check(P, ad, rng) <= max(ad_tol, 1e-6):
            # AD agrees with float64 central differences along random directions; report
            # the engine's own Jacobian when it is cheap, else AD's (checked) one
            small = P.n_in * P.n_out <= 256
            J = _engine_jacobian(P) if small else ad
            notes = () if small else ("The Jacobian reported is AD's, checked against float64 central differences.",)
            return Audit(Verdict.SMOOTH, exact=True, min_norm=J, reason="", hull_distance=0.0, notes=notes,
                         **{**common, "b_subdifferential": J[None], "selection_jacobians": J[None],
                            "engine_jacobian": J if small else None})
        J = _engine_jacobian(P)
        common["engine_jacobian"] = J
        if not np.all(np.isfinite(J)):
            return _undecided(P, "f's Jacobian is not finite at x (a pole or a domain boundary of a smooth "
                                 "primitive).", ad, J0=J)
        gap = _fd_check(P, J, rng)
        if gap == math.inf:
            return _undecided(P, "f is not finite on both sides of x (a domain boundary such as x**1.5 at 0): "
                                 "it is not differentiable there in the usual sense.", ad, J0=J)
        if gap > 1e-5:
            return _undecided(P, f"the engine's Jacobian disagrees with float64 central differences (relative gap "
                                 f"{gap:.2g}); f may not be smooth at x.", ad, J0=J)
        scale = 1.0 + float(np.max(np.abs(J)))
        dist = float(np.max(np.abs(ad - J))) if not nonfinite_ad else math.inf
        if dist <= ad_tol * scale:
            return Audit(Verdict.SMOOTH, exact=True, min_norm=J, reason="", hull_distance=dist,
                         **{**common, "b_subdifferential": J[None], "selection_jacobians": J[None]})
        near = _near_kink_note(P)
        if near:
            return Audit(Verdict.UNDECIDED, exact=False, min_norm=J, reason=near, hull_distance=dist,
                         **{**common, "b_subdifferential": J[None]})
        return Audit(Verdict.SPURIOUS, exact=True, min_norm=J, hull_distance=dist,
                     reason=("f is differentiable at x (no primitive at a kink; float64 central differences agree "
                             f"with its Jacobian to {gap:.1g}) but AD returned something else (max gap {dist:.3g}). "
                             + ad_note).strip(), **{**common, "b_subdifferential": J[None]})

    # ---------- at a kink: hull membership
    if not B:
        return Audit(Verdict.UNDECIDED, exact=A.exact, min_norm=None,
                     reason="no B-subdifferential element could be certified at this point. " + A.exact_reason, **common)
    res, _ = hull_residual(Barr.reshape(len(Barr), -1), ad.reshape(-1)) if not nonfinite_ad else (math.inf, None)
    mn = min_norm_point(Barr.reshape(len(Barr), -1))[0].reshape(Barr.shape[1:])
    scale = 1.0 + float(np.max(np.abs(Barr)))
    common["min_norm"] = mn
    if res <= ad_tol * scale:
        return Audit(Verdict.CLARKE, exact=A.exact, hull_distance=res,
                     reason="" if A.exact else A.exact_reason, **common)
    lipschitz_program = not (kinds & {"jump", "nonlipschitz", "unsupported"})
    if A.exact or (nonfinite_ad and lipschitz_program):
        near = _near_kink_note(P) if P.dtype != "float64" else ""
        if near and not nonfinite_ad:
            return Audit(Verdict.UNDECIDED, exact=A.exact, hull_distance=res, reason=near, **common)
        why = ("every essentially active piece was enumerated (LP over first-order sign patterns)" if A.exact
               else "f is locally Lipschitz here and AD is not finite")
        return Audit(Verdict.SPURIOUS, exact=A.exact, hull_distance=res,
                     reason=f"AD lies at max-norm distance {res:.3g} from the Clarke Jacobian; certified because {why}. "
                            + ad_note, **common)
    hint = _sampling_hint(P, Barr, ad, ad_tol, seed)
    return Audit(Verdict.UNDECIDED, exact=False, hull_distance=res,
                 reason=(f"AD is not in the hull of the {len(B)} B-subdifferential element(s) found (distance {res:.3g}), "
                         f"but the enumeration was not exact: {A.exact_reason}.").strip(),
                 notes=(hint,) if hint else (), **common)


def _sampling_hint(P: _Problem, B: np.ndarray, ad: np.ndarray, tol: float, seed: int) -> str:
    """Last resort (Burke-Lewis-Overton): Jacobians at random points very close to x.  They
    approximate B-subdifferential elements but certify nothing, so they only inform."""
    try:
        from ._sampling import gradient_sampling
    except ImportError:
        return ""
    if not np.all(np.isfinite(ad)):
        return ""
    try:
        gs = gradient_sampling(P.f, P.xs[0] if len(P.xs) == 1 else tuple(P.xs), radius=1e-7 * (1.0 + float(np.max(np.abs(P.x_flat())))),
                               n_samples=min(400, 4 * P.n_in + 40), seed=seed)
        S = np.asarray(gs.samples, dtype=np.float64).reshape(-1, P.n_out * P.n_in)
    except Exception:
        return ""
    pts = np.concatenate([B.reshape(len(B), -1), S]) if len(B) else S
    res, _ = hull_residual(pts, ad.reshape(-1))
    inside = res <= tol * (1.0 + float(np.max(np.abs(pts))))
    return (f"Gradient sampling ({len(S)} distinct nearby Jacobians, not a certificate) finds AD "
            + ("inside their hull with the elements above." if inside else f"at distance {res:.3g} from their hull."))


def _reproduces(out: np.ndarray, y_user: np.ndarray, tol: float) -> bool:
    if out.shape != y_user.shape:
        return False
    both = np.isfinite(out) & np.isfinite(y_user)
    if not np.array_equal(np.isfinite(out), np.isfinite(y_user)):
        return False
    scale = 1.0 + np.abs(out[both])
    return bool(np.all(np.abs(out[both] - y_user[both]) <= 10 * tol * scale))


def _near_kink_note(P: _Problem) -> str:
    if P.eps >= 1e-15:
        tol = math.sqrt(P.eps)
        interp = F.Interpreter(P.graph, P.be, P.xs64, kink_tol=tol)
        interp.run(F.LexPolicy(), P.tangents(None))
        if set(interp.sites_seen) - set(P.interp.sites_seen) and P.dtype != "float64":
            return (f"AD ran in {P.dtype}, where some primitive is within {tol:.1g} of a kink that float64 does not "
                    "see exactly; audit with kink_tol to treat it as active, or in float64.")
    return ""


def audit_batch(f: Callable, xs, **kwargs) -> list[Audit]:
    """Audit ``f`` at many points: ``xs`` is a sequence of points (each what ``audit`` takes)
    or one array whose leading axis indexes the points.  The trace is reused.

    >>> import torch
    >>> [a.verdict.value for a in audit_batch(torch.abs, torch.tensor([[0.0], [1.0]]))]
    ['CLARKE', 'SMOOTH']
    """
    points = list(xs) if not hasattr(xs, "shape") else [xs[i] for i in range(xs.shape[0])]
    if not points:
        raise ValueError("xs must hold at least one point, got an empty batch")
    # the trace cache makes every point after the first skip tracing (same shapes/dtypes)
    return [audit(f, p, **kwargs) for p in points]


# --------------------------------------------------------------------------- the other entry points


def ld_jacobian(f: Callable, x, directions=None, *, raw: bool = False, kink_tol: float = 0.0) -> np.ndarray:
    """Lexicographic (LD) derivative of ``f`` at ``x`` along ``directions`` (n x k, identity
    by default).  Returns ``f'(x; M) M^{-1}`` (out x n), an element of the
    B-subdifferential for piecewise-C1 programs; with ``raw=True`` returns ``f'(x; M)``
    (out x k) for any M.

    >>> import torch
    >>> ld_jacobian(torch.abs, torch.zeros(1)).tolist()
    [[1.0]]
    """
    P = _Problem(f, x, kink_tol=kink_tol)
    if P.graph is None:
        raise ValueError(f"f could not be traced: {P.trace_error}")
    if P.graph.unsupported:
        raise ValueError(f"f uses primitive(s) the engine does not support: {', '.join(sorted(set(P.graph.unsupported)))}")
    if directions is None:
        M = np.eye(P.n_in)
    else:
        M = np.asarray(directions, dtype=np.float64)
        if M.ndim != 2 or M.shape[0] != P.n_in:
            raise ValueError(f"directions must be an (n, k) matrix with n = {P.n_in} input elements, got shape {M.shape}")
        if not np.all(np.isfinite(M)):
            raise ValueError("directions must be finite, got NaN or inf entries")
    _check_size(P)
    leaf = P.run(F.LexPolicy(), M)[0]
    if raw:
        return leaf.jac
    if M.shape[0] != M.shape[1] or np.linalg.matrix_rank(M) < M.shape[0]:
        raise ValueError(f"directions must be square and nonsingular for a B-subdifferential element "
                         f"(got shape {M.shape}, rank {np.linalg.matrix_rank(M)}); pass raw=True for f'(x; M)")
    return leaf.jac @ np.linalg.inv(M)


def clarke_jacobian(f: Callable, x, *, kink_tol: float = 0.0, exact_budget: int = 16, n_directions: int = 64,
                    seed: int = 0) -> ClarkeSet:
    """The B-subdifferential elements the engine finds at ``x`` (LD derivatives, feasible
    vertex selections and, within ``exact_budget``, every essentially active piece).

    >>> import torch
    >>> C = clarke_jacobian(torch.abs, torch.zeros(1))
    >>> sorted(C.vertices.reshape(-1).tolist()), C.exact
    ([-1.0, 1.0], True)
    """
    _check_int("exact_budget", exact_budget, 0)
    _check_int("n_directions", n_directions, 1)
    P = _Problem(f, x, kink_tol=kink_tol)
    if P.graph is None:
        raise ValueError(f"f could not be traced: {P.trace_error}")
    if P.graph.unsupported:
        raise ValueError(f"f uses primitive(s) the engine does not support: {', '.join(sorted(set(P.graph.unsupported)))}")
    A = _analyse(P, exact_budget=exact_budget, n_directions=n_directions, seed=seed)
    kinds = {s.kind for s in A.sites.values()}
    if A.discontinuous or "nonlipschitz" in kinds:
        raise ValueError("f is not Lipschitz (or not continuous) at x: it has no Clarke Jacobian there. "
                         + (A.discontinuous or "A non-Lipschitz primitive is at its singular point."))
    B = _distinct(A.b_elems)
    return ClarkeSet(np.stack(B) if B else np.zeros((0, P.n_out, P.n_in)), bool(A.exact or not A.sites))


def selection_jacobians(f: Callable, x, *, kink_tol: float = 0.0, n_directions: int = 64, seed: int = 0) -> np.ndarray:
    """The distinct Jacobians AD would return for vertex derivative choices at the active
    kinks (every combination when there are few, else all first, all last and
    ``n_directions`` random ones), shape (m, out, in).

    >>> import torch
    >>> sorted(selection_jacobians(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1)).reshape(-1).tolist())
    [0.0, 1.0, 2.0]
    """
    P = _Problem(f, x, kink_tol=kink_tol)
    if P.graph is None:
        raise ValueError(f"f could not be traced: {P.trace_error}")
    leaf0 = P.run(F.LexPolicy())[0]
    if not P.interp.sites_seen:
        return leaf0.jac[None]
    out = [P.run(F.AssignPolicy(a))[0].jac for a in _assignments(dict(P.interp.sites_seen), n_directions, seed)]
    return np.stack(_distinct(out))
