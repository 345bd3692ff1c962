"""The package's own layers as primitives of the engine: one IR node per layer call.

**Tracing.**  The tracers run ``f`` inside :func:`tracing`.  There the layers of
:mod:`nonsmooth.solvers` and :mod:`nonsmooth.implicit` do not run their usual code: each
calls ``nonsmooth._layer_hook.route(kind, *arrays, **options)`` once, which lands in
:func:`_route` here.  That builds a :class:`LayerSpec` (framework-free; float64 NumPy),
registers it under an integer handle and binds the framework's single opaque operation
for layers: torch ``torch.ops.nonsmooth_engine.layer(inputs, handle)``
(:mod:`._layers_torch`), jax the primitive ``nonsmooth_layer[handle]``
(:mod:`._layers_jax`).  The tracers turn that operation into a :class:`~._ir.Node` whose
rule (``LAYER_RULES``, impl ``"layer"``) says whether the layer is piecewise affine, and
whose ``params["layer"]`` is the spec.  The user's own AD never sees any of this: outside
:func:`tracing` the layers take their normal code path.

**Interpretation.**  ``_forward.Interpreter`` hands impl ``"layer"`` to :func:`sites` and
:func:`apply`, which ask the spec for the *sites* active at x (each a :class:`LayerSite`
whose options are the layer's candidate pieces, with strict linear conditions on the
layer's input tangents), and for the values and tangents of a chosen piece.

**Verdicts.**  :func:`monte_carlo_audit` and :func:`finish` adjust what the verdict may
claim when a perturbed (Monte Carlo) layer or a surrogate backward pass is in the program.

Contract of a spec: ``forward`` is the layer's own float64 output; ``sites`` lists every
place where the layer is nonsmooth at x, each option being one essentially active piece
candidate whose conditions are exact at first order when ``piecewise_affine``; ``apply``
with no choice at a site gives the piece the layer's own code takes at x.
"""
from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import importlib
import itertools
import threading

import numpy as np

from nonsmooth import _layer_hook as hook

from . import _rule_impls as R
from ._ir import Var
from ._problem import TooLarge
from ._rules import LAYER_RULES, Rule

__all__ = ["LayerSpec", "LayerSite", "LayerUndecided", "tracing", "lookup", "sites", "apply"]


class LayerUndecided(TooLarge):
    """A layer the engine cannot analyse at this point; the audit is UNDECIDED with the reason.

    (A subclass of ``TooLarge`` only so the audit's existing handler turns it into the reason.)"""


def layer_rule(name: str, *, piecewise_affine: bool, description: str) -> str:
    """Register (once) and return the name of the rule for one kind of layer."""
    if name not in LAYER_RULES:
        LAYER_RULES[name] = Rule(name, 1, "layer", {}, (), (), (), description, impl="layer",
                                 piecewise_affine=piecewise_affine)
    return name


class LayerSpec(abc.ABC):
    """One kind of layer call, as the engine sees it (subclasses override what applies).

    ``kind``: "piecewise" (finitely many pieces: soft sort, hard solvers), "monte_carlo"
    (perturbed layers: smooth, estimated by sampling), "surrogate" (the forward is a solver,
    the backward pass is by design not its derivative), "implicit" (a fixed point).
    """

    name = "layer"
    kind = "piecewise"
    rule = ""
    unsupported = ""  # non-empty: the engine knows nothing about this layer (the reason)

    def key(self):
        """A hashable key: equal keys are interchangeable specs (None: never shared)."""
        return None

    @abc.abstractmethod
    def out_meta(self, metas: list) -> list:
        """[(shape, dtype name)] of the outputs from the inputs' [(shape, dtype name)]."""
        raise NotImplementedError

    @abc.abstractmethod
    def forward(self, xs: list) -> list:
        """The outputs at float64 NumPy inputs ``xs`` (integer outputs as int64)."""
        raise NotImplementedError

    def sites(self, node_i: int, xs: list, tol: float, int_used: bool):
        """(sites active at ``xs``, context for :meth:`apply`)."""
        return [], None

    @abc.abstractmethod
    def apply(self, xs: list, tans: list, chosen: list, ctx, k: int):
        """(output values, output tangents (k, size) or None) on the chosen pieces."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def jacobians(self, xs: list) -> list:
        """Dense Jacobian blocks ``[[d out_o / d in_i]]`` (None for non-float) on the piece the
        layer's own code takes at ``xs``: the framework's derivative of the layer node when the
        engine differentiates its own float64 trace (smooth points only)."""
        ctx = self.sites(-1, xs, 0.0, False)[1]
        sizes = [None if x is None or not np.issubdtype(np.asarray(x).dtype, np.floating) else int(np.size(x))
                 for x in xs]
        k = sum(s for s in sizes if s)
        eye, tans, o = np.eye(k), [], 0
        for s in sizes:
            if s is None:
                tans.append(None)
            else:
                tans.append(eye[:, o:o + s])
                o += s
        vals, otans = self.apply(xs, tans, [], ctx, k)
        blocks = []
        for t in otans:
            if t is None:
                blocks.append(None)
                continue
            J = np.asarray(t, dtype=np.float64).reshape(k, -1).T  # (out size, k)
            row, o = [], 0
            for s in sizes:
                row.append(None if s is None else J[:, o:o + s])
                o += s or 0
            blocks.append(row)
        return blocks

    def tolerance(self) -> float:
        """Relative accuracy of what AD returns through this layer beyond the dtype's
        rounding (an iterative solve's tolerance); 0 for exact layers."""
        return 0.0


@dataclasses.dataclass
class LayerSite(R.Site):
    """A site of a layer: its options are candidate pieces; ``default`` is the one the
    layer's own code takes at x (what AD differentiates)."""

    default: int = 0

    def lex(self, rowfn):
        """The option whose conditions are all lexicographically positive along the
        tangent directions (Khan and Barton's rule, for a piece choice)."""
        for opt in self.options:
            if all(_lex_sign(rowfn(c)) > 0 for c in opt.conds):
                return opt
        return self.options[self.default]  # degenerate at every order the directions see

    def convention(self, s: float):
        """No framework setting changes a layer's choice: it is always its own."""
        return self.options[self.default]


def _lex_sign(row: np.ndarray) -> int:
    eps = 1e-12 * (1.0 + float(np.max(np.abs(row)))) if row.size else 0.0
    return R._first_sign(row, eps)


def cond_from_row(row: np.ndarray, pos: int = 0, offset: int = 0) -> list:
    """A dense row over one input's flat elements as a condition list."""
    return [(pos, offset + int(e), float(row[e])) for e in np.nonzero(row)[0]]


# --------------------------------------------------------------------------- handles


_LOCK = threading.Lock()
_BY_HANDLE: "collections.OrderedDict[int, LayerSpec]" = collections.OrderedDict()
_BY_KEY: dict = {}
_NEXT = itertools.count(1)
MAX_HANDLES = 4096  # specs kept alive for traces jax may replay from its jit cache


def register(spec: LayerSpec) -> int:
    key = spec.key()
    with _LOCK:
        if key is not None and key in _BY_KEY and _BY_KEY[key] in _BY_HANDLE:
            h = _BY_KEY[key]
            _BY_HANDLE.move_to_end(h)
            return h
        h = next(_NEXT)
        _BY_HANDLE[h] = spec
        if key is not None:
            _BY_KEY[key] = h
        while len(_BY_HANDLE) > MAX_HANDLES:
            old, old_spec = _BY_HANDLE.popitem(last=False)
            k = old_spec.key()
            if k is not None and _BY_KEY.get(k) == old:
                del _BY_KEY[k]
        return h


def lookup(handle: int) -> LayerSpec:
    with _LOCK:
        spec = _BY_HANDLE.get(int(handle))
    if spec is None:
        raise KeyError(f"nonsmooth layer #{handle} is gone (a jit-compiled trace of an older audit was replayed); "
                       "audit a fresh function object")
    return spec


# --------------------------------------------------------------------------- tracing


_FACTORIES = {
    "soft_sort": "._layer_sort:route_soft_sort",
    "solver": "._layer_combinatorial:route_solver",
    "perturbed": "._layer_perturbed:route_perturbed",
    "surrogate": "._layer_combinatorial:route_surrogate",
    "implicit": "._layer_implicit:route_implicit",
}


def _factory(kind: str):
    mod, _, fn = _FACTORIES[kind].partition(":")
    return getattr(importlib.import_module(mod, __package__), fn)


def _framework(arrays) -> str:
    from nonsmooth._frameworks import array_framework

    for a in arrays:
        fw = array_framework(a)
        if fw in ("torch", "jax"):
            return fw
    raise TypeError("a layer was routed to the engine without torch or jax inputs")


def _route(kind, arrays, params):
    spec, inputs, finish = _factory(kind)(*arrays, **params)
    fw = _framework(inputs)
    handle = register(spec)
    mod = importlib.import_module("._layers_torch" if fw == "torch" else "._layers_jax", __package__)
    return finish(mod.bind(spec, handle, inputs))


@contextlib.contextmanager
def tracing(framework: str):
    """Around the engine's tracing of ``f``: the package's layers route to :func:`_route`."""
    hook.install(_route)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hook.engine_tracing())
        if framework == "jax":
            from ._layers_jax import trace_state

            stack.enter_context(trace_state())
        yield


# --------------------------------------------------------------------------- interpretation


def _np_inputs(interp, node, in_vals) -> list:
    out = []
    for v, val in zip(node.inputs, in_vals):
        if val is None:
            out.append(None)
            continue
        a = np.asarray(interp.be.asnumpy(val))
        out.append(a.astype(np.float64) if (isinstance(v, Var) and v.is_float) or np.issubdtype(a.dtype, np.floating) else a)
    return out


def sites(interp, i, node, in_vals):
    """The active sites of a layer node (the interpreter's ``_sites`` for impl "layer")."""
    spec = node.params["layer"]
    xs = _np_inputs(interp, node, in_vals)
    int_used = any((not o.is_float) and interp.users.get(o.id, 0) > 0 for o in node.outputs)
    with hook.suspended():
        found, ctx = spec.sites(i, xs, interp.tol, int_used)
    return found, {"xs": xs, "spec": ctx}


def apply(interp, node, ctx, chosen, in_vals, in_tans):
    """Values and tangents of a layer node on the chosen pieces (``_apply`` for impl "layer")."""
    spec = node.params["layer"]
    xs = ctx["xs"] if ctx else _np_inputs(interp, node, in_vals)
    k = interp._k
    tans = [None if t is None or k == 0 else np.asarray(interp.be.asnumpy(t), dtype=np.float64).reshape(k, -1)
            for t in in_tans]
    with hook.suspended():
        vals, otans = spec.apply(xs, tans, list(chosen), ctx["spec"] if ctx else None, k)
    return interp._back(node, vals, otans)


def layer_nodes(graph) -> list:
    return [n for n in graph.nodes if n.rule is not None and isinstance(n.params.get("layer"), LayerSpec)]


def tolerance(graph) -> float:
    """The largest extra relative tolerance the layers of ``graph`` need (iterative solves)."""
    return max([n.params["layer"].tolerance() for n in layer_nodes(graph)] + [0.0])


def monte_carlo(graph) -> bool:
    return any(n.params["layer"].kind == "monte_carlo" for n in layer_nodes(graph))


def monte_carlo_audit(P, A, ad, y_user, ad_tol, rng, seed):
    from ._layer_perturbed import monte_carlo_audit as run

    return run(P, A, ad, y_user, ad_tol, rng, seed)


def finish(P, result):
    """Name a surrogate backward pass: where AD goes through ``identity_backward``,
    ``blackbox_backward`` (or an implicit layer's ``jfb``/``phantom`` backward), it is by
    design not a generalized derivative of f, so the verdict is UNDECIDED with that reason
    and the Clarke Jacobian of f itself stays in the result (NOT_LIPSCHITZ stands: no
    derivative of f exists there, whatever AD returns)."""
    import dataclasses as dc

    from ._result import Verdict

    if P.graph is None:
        return result
    rel = P.interp.relevant
    named = []
    for n in layer_nodes(P.graph):
        spec = n.params["layer"]
        text = getattr(spec, "explanation", "") if spec.kind == "surrogate" else getattr(spec, "surrogate", "")
        if text and any(o.id in rel for o in n.outputs):
            named.append(f"{spec.name}: {text}")
    if not named:
        return result
    what = ("AD goes through a surrogate backward pass, which by design is not a generalized derivative of f ("
            + "; ".join(named) + ")")
    if result.verdict is Verdict.NOT_LIPSCHITZ:
        return dc.replace(result, notes=tuple(result.notes) + (what + ".",))
    B = result.b_subdifferential
    if B is not None and len(B):
        clarke = (f"the Clarke Jacobian of f itself at x is the hull of the {len(B)} element(s) in "
                  f"b_subdifferential{' (exact)' if result.exact else ''}")
        if result.hull_distance is not None:
            clarke += f"; AD lies at distance {result.hull_distance:.3g} from it"
    else:
        clarke = "the Clarke Jacobian of f itself was not determined" + (f" ({result.reason})" if result.reason else "")
    return dc.replace(result, verdict=Verdict.UNDECIDED, reason=f"{what}: the audit does not judge it; {clarke}.")
