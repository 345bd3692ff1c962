"""jax adapter: trace ``f`` with ``jax.make_jaxpr`` (inlining jit, closed calls and the
primal bodies of custom_jvp/custom_vjp functions) and evaluate/differentiate single
primitives in float64.

Imported only when the user's arrays are jax arrays.  Float64 is switched on with the
``jax.enable_x64`` context manager around the engine's own computations only; the
user's configuration is never changed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from ._ir import Graph, Lit, Node, Var
from ._rules import rule_for_jax_primitive

FRAMEWORK = "jax"

_INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "name_scope"}
_CONTROL = {"custom_linear_solve", "custom_transpose"}
_CONTROL_LOWERED = {"cond", "scan", "while"}  # switch and fori_loop lower to these

_SMOOTH = {
    "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1", "sin",
    "cos", "tan", "tanh", "sinh", "cosh", "asinh", "acosh", "atanh", "asin", "acos", "atan",
    "logistic", "erf", "erfc", "erf_inv", "lgamma", "digamma", "integer_pow", "pow",
    "square", "rsqrt", "dot_general", "transpose", "reshape", "broadcast_in_dim", "squeeze",
    "expand_dims", "concatenate", "slice", "dynamic_slice", "dynamic_update_slice", "gather",
    "scatter-add", "scatter_add", "scatter", "reduce_sum", "reduce_prod", "cumsum", "cumprod",
    "cumlogsumexp", "convert_element_type", "select_n", "iota", "copy", "copy_p", "pad", "rev",
    "conv_general_dilated", "reduce_precision", "stop_gradient", "and", "or", "not", "xor",
    "is_finite", "split", "tri", "triangular_solve", "cholesky", "lu_pivots_to_permutation",
    "logaddexp", "reduce_and", "reduce_or", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "population_count", "clz", "rem_int",
    "optimization_barrier", "sharding_constraint", "mesh_cast", "reshard", "pvary", "square",
    "stack", "unstack", "real", "imag", "conj", "max_p_noop",
}
_LINEAR = {"add", "add_any", "sub", "neg", "transpose", "reshape", "broadcast_in_dim", "squeeze",
           "expand_dims", "concatenate", "slice", "dynamic_slice", "dynamic_update_slice", "gather",
           "scatter-add", "scatter_add", "reduce_sum", "cumsum", "convert_element_type", "select_n",
           "copy", "copy_p", "pad", "rev", "stop_gradient", "reduce_precision", "split",
           "optimization_barrier", "sharding_constraint", "pvary", "stack", "unstack"}
_BILINEAR = {"mul", "dot_general", "conv_general_dilated"}


class TraceError(Exception):
    """``f`` could not be traced (data-dependent control flow, non-array output, ...)."""


def _x64():
    return jax.enable_x64(True)


def _dtype_name(aval) -> str:
    return str(np.dtype(aval.dtype)) if hasattr(aval, "dtype") else "object"


class _Tracer:
    def __init__(self):
        self.graph = Graph(FRAMEWORK, [], [], [], {})
        self.counter = 0
        self.producer: dict[int, Node] = {}

    def new_var(self, aval) -> Var:
        self.counter += 1
        shape = tuple(int(s) for s in getattr(aval, "shape", ()))
        return Var(self.counter, shape, _dtype_name(aval))

    def atom(self, a, env):
        if type(a).__name__ == "Literal":  # keep the literal's own dtype (int32 counters stay int32 under x64)
            dt = getattr(getattr(a, "aval", None), "dtype", None)
            return Lit(np.asarray(a.val, dtype=dt) if dt is not None else np.asarray(a.val))
        return env[a]

    def walk(self, jaxpr, consts, args, depth=0):
        env = {}
        for cv, c in zip(jaxpr.constvars, consts):
            v = self.new_var(cv.aval)
            self.graph.consts[v.id] = c
            env[cv] = v
        for iv, a in zip(jaxpr.invars, args):
            env[iv] = a
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            ins = [self.atom(a, env) for a in eqn.invars]
            if name in _INLINE:
                sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
                if sub is None:
                    self.graph.unsupported.append(f"{name} (no body to inline)")
                    outs = [self.new_var(o.aval) for o in eqn.outvars]
                else:
                    inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
                    outs = self.walk(inner, inner_consts, ins, depth + 1)
                for o, v in zip(eqn.outvars, outs):
                    env[o] = v
                continue
            if name in _CONTROL_LOWERED:  # branches inlined, loops unrolled or loop nodes: _jax_control
                from . import _jax_control

                outs = _jax_control.lower(self, eqn, ins, depth)
            else:
                outs = self.add(eqn, name, ins)
            for o, v in zip(eqn.outvars, outs):
                env[o] = v
        return [self.atom(a, env) for a in jaxpr.outvars]

    def _node(self, prim_name, payload, ins, out_avals, params, rule=None, origin="", eqn_params=None):
        outs = tuple(self.new_var(a) for a in out_avals)
        loc = f"{', '.join(f'v{o.id}' for o in outs)} = {prim_name}({', '.join(f'v{a.id}' if isinstance(a, Var) else repr(getattr(a, 'value', a)) for a in ins)})"
        node = Node(prim_name, tuple(ins), outs, params, payload=(payload, eqn_params or {}), rule=rule,
                    location=loc, origin=origin)
        self.graph.nodes.append(node)
        for o in outs:
            self.producer[o.id] = node
        return node

    def add(self, eqn, name, ins):
        avals = [o.aval for o in eqn.outvars]
        p = dict(eqn.params)
        float_in = any(isinstance(a, Var) and a.is_float for a in ins)
        if name == "nonsmooth_layer":  # a layer of the package (_layers.py)
            from ._layers_jax import add_node

            return add_node(self, eqn, ins)
        if name == "clamp":  # clamp(lo, x, hi) = min(max(x, lo), hi)
            lo, x, hi = ins
            n1 = self._node("max", lax.max_p, [x, lo], avals, {}, rule="maximum", origin="clamp")
            n2 = self._node("min", lax.min_p, [n1.outputs[0], hi], avals, {}, rule="minimum", origin="clamp")
            return n2.outputs
        if name == "sqrt":
            terms = self._square_terms(ins[0])
            if terms:
                out_aval = avals[0]
                stack_aval = jax.core.ShapedArray((*out_aval.shape, len(terms)), out_aval.dtype)
                st = self._node("stack", _stack_last, list(terms), [stack_aval], {})
                st.location += f"  (the {len(terms)} squared terms of a sqrt, stacked)"
                node = self._node("norm", _norm_fn((len(out_aval.shape),)), [st.outputs[0]], avals,
                                  {"ord": 2, "dim": [len(out_aval.shape)]}, rule="norm")
                node.location += "  (sqrt of a sum of squares, read as a 2-norm)"
                return node.outputs
            z = self._sum_of_squares(ins[0])
            if z is not None:
                arg, axes = z
                fn = _norm_fn(axes)
                node = self._node("norm", fn, [arg], avals, {"ord": 2, "dim": list(axes)}, rule="norm")
                node.location += "  (sqrt of a sum of squares, read as a 2-norm)"
                return node.outputs
        rule = rule_for_jax_primitive(name)
        params = {}
        if name == "convert_element_type":
            src = ins[0]
            dst = np.dtype(p["new_dtype"])
            if isinstance(src, Var) and src.is_float and not np.issubdtype(dst, np.floating):
                if dst == np.bool_:
                    self.graph.unsupported.append("convert_element_type float -> bool (a jump at 0)")
                else:
                    node = self._node(name, eqn.primitive, ins, avals, {}, rule="trunc", eqn_params=p)
                    return node.outputs
        if rule is not None:
            if rule.name == "pow":
                e = ins[1]
                if isinstance(e, Lit):
                    params = {"exponent": float(np.asarray(e.value))}
                else:
                    rule = None  # x ** array: smooth where x > 0; poles show as non-finite values
            elif rule.impl == "select":
                params = {k: v for k, v in p.items() if k in ("axes", "axis", "num_keys", "k", "dimension")}
            if rule is not None:
                node = self._node(name, eqn.primitive, ins, avals, params, rule=rule.name, eqn_params=p)
                return node.outputs
        if name in _CONTROL:
            self.graph.unsupported.append(
                f"{name} (the engine does not look inside it)")
        elif name not in _SMOOTH and (float_in or any(np.issubdtype(np.dtype(a.dtype), np.floating) for a in avals if hasattr(a, "dtype"))):
            self.graph.unsupported.append(name)
        node = self._node(name, eqn.primitive, ins, avals, {}, eqn_params=p)
        return node.outputs

    def _square_base(self, v):
        if not isinstance(v, Var):
            return None
        m = self.producer.get(v.id)
        if m is None:
            return None
        if m.prim == "mul" and isinstance(m.inputs[0], Var) and self._same(m.inputs[0], m.inputs[1]):
            return m.inputs[0]
        if m.prim == "integer_pow" and m.payload[1].get("y") == 2:
            return m.inputs[0]
        if m.prim == "square":
            return m.inputs[0]
        return None

    def _same(self, a, b, depth=0) -> bool:
        """Whether two operands compute the same value: the same variable, or the same
        primitive with the same params on the same operands (``v[0] * v[0]``)."""
        if a is b:
            return True
        if isinstance(a, Lit) and isinstance(b, Lit):
            return np.array_equal(np.asarray(a.value), np.asarray(b.value))
        if depth > 8 or not (isinstance(a, Var) and isinstance(b, Var)):
            return False
        na, nb = self.producer.get(a.id), self.producer.get(b.id)
        if na is None or nb is None or na.prim != nb.prim or len(na.inputs) != len(nb.inputs):
            return False
        if [o.id for o in na.outputs].index(a.id) != [o.id for o in nb.outputs].index(b.id):
            return False
        try:
            if repr(na.payload[1]) != repr(nb.payload[1]):
                return False
        except Exception:
            return False
        return all(self._same(x, y, depth + 1) for x, y in zip(na.inputs, nb.inputs))

    def _square_terms(self, v, depth=0):
        """The ``z_i`` of ``v = z_1**2 + z_2**2 + ...`` (at least two terms), else None."""
        if not isinstance(v, Var) or depth > 64:
            return None
        n = self.producer.get(v.id)
        if n is None or n.prim not in ("add", "add_any") or len(n.inputs) != 2:
            return None
        parts = []
        for a in n.inputs:
            z = self._square_base(a)
            if z is None:
                z = self._square_terms(a, depth + 1)
                if not z:
                    return None
                parts += z
            else:
                parts.append(z)
        return parts

    def _sum_of_squares(self, v):
        """``v = reduce_sum(z * z)`` (or of ``z ** 2``): return (z, axes)."""
        if not isinstance(v, Var):
            return None
        n = self.producer.get(v.id)
        if n is None or n.prim != "reduce_sum":
            return None
        axes = tuple(n.payload[1].get("axes", ()))
        sq = n.inputs[0]
        m = self.producer.get(sq.id) if isinstance(sq, Var) else None
        if m is None:
            return None
        if m.prim == "mul" and isinstance(m.inputs[0], Var) and self._same(m.inputs[0], m.inputs[1]):
            return m.inputs[0], axes
        if m.prim == "integer_pow" and m.payload[1].get("y") == 2:
            return m.inputs[0], axes
        return None


def _stack_last(*ts):
    return jnp.stack(jnp.broadcast_arrays(*ts), axis=-1)


def _norm_fn(axes):
    def norm(z):
        return jnp.sqrt(jnp.sum(z * z, axis=tuple(axes)))

    return norm


def _user_context(xs):
    """float64 inputs exist only where the user enabled x64: trace and differentiate f in
    that same (scoped) setting, else jax would silently or loudly mix in float32."""
    if any(np.dtype(x.dtype) == np.float64 for x in xs):
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def trace(f: Callable, xs: tuple) -> Graph:
    def g(*args):
        out = f(*args) if len(xs) > 1 else f(args[0])
        return jax.tree_util.tree_leaves(out)

    from ._layers import tracing  # the package's own layers: one node each (_layers.py)

    try:
        with _user_context(xs), tracing(FRAMEWORK):
            closed = jax.make_jaxpr(g)(*xs)
    except Exception as e:
        raise TraceError(f"jax could not trace f with make_jaxpr: {type(e).__name__}: {e}") from e
    t = _Tracer()
    ins = [t.new_var(v.aval) for v in closed.jaxpr.invars]
    t.graph.inputs = ins
    outs = t.walk(closed.jaxpr, closed.consts, ins)
    for o in outs:
        if isinstance(o, Lit):  # an output that does not depend on anything: materialize it
            node = t._node("copy", lax.copy_p, [o], [jax.core.ShapedArray(np.shape(o.value), np.asarray(o.value).dtype)], {})
            o = node.outputs[0]
        t.graph.outputs.append(o)
    return t.graph


# --------------------------------------------------------------------------- evaluation


def _p64(v):
    if isinstance(v, np.dtype) and np.issubdtype(v, np.floating):
        return np.dtype("float64")
    try:
        if isinstance(v, type) and np.issubdtype(v, np.floating):
            return np.dtype("float64")
    except TypeError:
        pass
    return v


def _v64(v):
    if isinstance(v, (jax.Array, np.ndarray, np.generic)) or hasattr(v, "dtype"):
        dt = np.dtype(v.dtype)
        if np.issubdtype(dt, np.floating):
            return jnp.asarray(v, dtype=jnp.float64)
        return jnp.asarray(v)
    return v


class Backend:
    framework = FRAMEWORK

    def const(self, v):
        with _x64():
            return _v64(v)

    def input(self, v):
        with _x64():
            return _v64(v)

    def _call(self, node: Node, vals):
        prim, params = node.payload
        vals = [_v64(v) if not isinstance(v, (int, float, bool)) else v for v in vals]
        if callable(prim) and not hasattr(prim, "bind"):
            out = prim(*vals)
            return [out]
        p = {k: _p64(v) for k, v in params.items()}
        out = prim.bind(*vals, **p)
        return list(out) if prim.multiple_results else [out]

    def eval(self, node: Node, vals) -> list:
        with _x64():
            return self._call(node, vals)

    JIT_AFTER = 3  # calls of the same node's tangent rule before it is compiled

    def jvp(self, node: Node, vals, tans) -> list:
        idx = [i for i, t in enumerate(tans) if t is not None]
        if not idx:
            return [None] * len(node.outputs)
        arrays = [i for i, v in enumerate(vals) if isinstance(v, (jax.Array, np.ndarray))]
        key = (id(node), tuple(idx), tuple(arrays), tuple(tuple(tans[i].shape) for i in idx))
        counts = self.__dict__.setdefault("_jvp_counts", {})
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > self.JIT_AFTER:
            compiled = self.__dict__.setdefault("_jvp_jit", {})
            fn = compiled.get(key)
            if fn is None:
                fn = compiled[key] = self._compiled_jvp(node, vals, idx, arrays)
            with _x64():
                out = fn([_v64(vals[i]) for i in arrays], [tans[i] for i in idx])
            return [o if v.is_float else None for o, v in zip(out, node.outputs)]
        with _x64():
            prim = [_v64(vals[i]) for i in idx]

            def fn(*d):
                v = list(vals)
                for i, x in zip(idx, d):
                    v[i] = x
                outs = self._call(node, v)
                return tuple(o if jnp.issubdtype(o.dtype, jnp.floating) else jnp.zeros(()) for o in outs)

            def one(*t):
                return jax.jvp(fn, tuple(prim), tuple(t))[1]

            out = jax.vmap(one)(*[tans[i] for i in idx])
        return [o if v.is_float else None for o, v in zip(out, node.outputs)]

    def _compiled_jvp(self, node, vals, idx, arrays):
        """The batched tangent rule of one node, compiled once (many runs reuse it)."""
        static = {i: v for i, v in enumerate(vals) if i not in arrays}
        n = len(vals)

        def batched(arrs, ts):
            v = [None] * n
            for i, a in static.items():
                v[i] = a
            for i, a in zip(arrays, arrs):
                v[i] = a

            def fn(*d):
                w = list(v)
                for i, x in zip(idx, d):
                    w[i] = x
                outs = self._call(node, w)
                return tuple(o if jnp.issubdtype(o.dtype, jnp.floating) else jnp.zeros(()) for o in outs)

            prim = [v[i] for i in idx]
            return jax.vmap(lambda *t: jax.jvp(fn, tuple(prim), tuple(t))[1])(*ts)

        return jax.jit(batched)

    def is_linear(self, node: Node, live: list) -> bool:
        name = node.prim
        if name in _LINEAR:
            return True
        if name in _BILINEAR:
            return sum(bool(x) for x in live) <= 1
        if name == "div":
            return len(live) < 2 or not live[1]
        return False

    def jacobian(self, fn, xs64, *, reverse: bool) -> np.ndarray:
        def flat(*xs):
            return jnp.concatenate([jnp.ravel(o) for o in fn(*xs)])

        with _x64():
            argnums = tuple(range(len(xs64)))
            jac = (jax.jacrev if reverse else jax.jacfwd)(flat, argnums=argnums)(*xs64)
            n_out = jac[0].shape[0]
            return np.concatenate([np.asarray(j).reshape(n_out, -1) for j in jac], axis=1)

    # --- helpers for frozen-branch programs (second-order analysis)

    def where(self, mask: np.ndarray, a, b):
        with _x64():
            return jnp.where(jnp.asarray(mask), a, b)

    def broadcast(self, a, shape):
        with _x64():
            return jnp.broadcast_to(a, tuple(shape))

    def flat(self, a):
        return jnp.ravel(a)

    def take(self, a, positions: np.ndarray):
        if isinstance(positions, np.ndarray):
            positions = np.asarray(positions, dtype=np.int64)
        return jnp.ravel(a)[positions]

    def concat(self, parts):
        with _x64():
            return jnp.concatenate([jnp.ravel(p) for p in parts])

    def compile_jacobian_hessian(self, fn):
        """``(x0, arrays) -> (J (m, n), H (m, n, n))`` of ``fn(x_flat, *arrays)`` in x at x0,
        compiled once: the pattern arrays change between calls, their shapes do not."""
        with _x64():
            jitted = jax.jit(lambda x, *a: (jax.jacrev(fn)(x, *a), jax.jacfwd(jax.jacrev(fn))(x, *a)))

        def jh(x0, arrays):
            with _x64():
                J, H = jitted(jnp.asarray(np.asarray(x0, dtype=np.float64)), *[jnp.asarray(a) for a in arrays])
                return np.asarray(J, dtype=np.float64), np.asarray(H, dtype=np.float64)

        return jh

    def asnumpy(self, v) -> np.ndarray:
        return np.asarray(v)

    def asarray(self, a: np.ndarray, like=None):
        with _x64():
            return jnp.asarray(a)

    def identity_tangents(self, xs64) -> list:
        sizes = [int(np.prod(x.shape)) if x.ndim else 1 for x in xs64]
        n = sum(sizes)
        eye = np.eye(n)
        out, o = [], 0
        with _x64():
            for x, s in zip(xs64, sizes):
                out.append(jnp.asarray(eye[:, o : o + s].reshape(n, *x.shape)))
                o += s
        return out

    def tangents_from(self, M: np.ndarray, xs64) -> list:
        out, o = [], 0
        Mt = np.ascontiguousarray(M.T)
        with _x64():
            for x in xs64:
                s = int(np.prod(x.shape)) if x.ndim else 1
                out.append(jnp.asarray(Mt[:, o : o + s].reshape(M.shape[1], *x.shape)))
                o += s
        return out


# --------------------------------------------------------------------------- user-level AD


def as_inputs(x) -> tuple:
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for i, t in enumerate(xs):
        if not isinstance(t, jax.Array):
            raise TypeError(f"x[{i}] must be a jax array like the others, got {type(t).__name__}")
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(f"x[{i}] must have a floating dtype, got {t.dtype}")
    return xs


def ad_jacobian(f: Callable, xs: tuple, n_out: int | None):
    def flat_f(*args):
        out = f(*args) if len(xs) > 1 else f(args[0])
        y = jnp.concatenate([jnp.ravel(o) for o in jax.tree_util.tree_leaves(out)])
        return y, y

    with _user_context(xs):
        jac, y = jax.jacrev(flat_f, argnums=tuple(range(len(xs))), has_aux=True)(*xs)
    n = int(np.size(y))
    cols = [np.asarray(j, dtype=np.float64).reshape(n, -1) for j in jac]
    return np.concatenate(cols, axis=1), np.asarray(y, dtype=np.float64).reshape(-1)


def shadow_inputs(graph: Graph, xs) -> dict:
    """Inputs of every nonsmooth node as XLA computes them in the user's dtype (no float64
    promotion): {node index: [float64 NumPy arrays]}."""
    vals = {v.id: x for v, x in zip(graph.inputs, xs)}
    for cid, c in graph.consts.items():
        vals[cid] = c
    out = {}
    with _user_context(xs):
        for i, node in enumerate(graph.nodes):
            ins = [vals.get(v.id) if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
            if node.rule is not None:
                out[i] = [_flush(np.asarray(a, dtype=np.float64), a) for a in ins]
            prim, params = node.payload
            if callable(prim) and not hasattr(prim, "bind"):
                res = [prim(*ins)]
            else:
                res = prim.bind(*ins, **params)
                res = list(res) if prim.multiple_results else [res]
            for o, r in zip(node.outputs, res):
                vals[o.id] = r
    return out


def _flush(a64: np.ndarray, a) -> np.ndarray:
    """XLA reads subnormal inputs as zero: so must the engine, when it decides kinks."""
    dt = np.dtype(getattr(a, "dtype", np.float64))
    if np.issubdtype(dt, np.floating) and flushes_subnormals(str(dt)):
        tiny = np.finfo(dt).tiny
        a64 = np.where(np.abs(a64) < tiny, np.copysign(0.0, a64), a64)
    return a64


_FLUSH: dict = {}


def flushes_subnormals(dtype: str) -> bool:
    """Whether XLA treats subnormal ``dtype`` numbers as zero in comparisons (it does on CPU)."""
    if dtype not in _FLUSH:
        try:
            dt = np.dtype(dtype)
            tiny = np.finfo(dt).tiny
            ctx = jax.enable_x64(True) if dt == np.float64 else contextlib.nullcontext()
            with ctx:
                x = jnp.asarray(np.asarray(-tiny / 4, dtype=dt))
                _FLUSH[dtype] = not bool(jax.jit(lambda v: v < 0)(x))
        except Exception:
            _FLUSH[dtype] = False
    return _FLUSH[dtype]


def versions() -> dict:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def dtype_name(xs) -> str:
    return str(np.dtype(xs[0].dtype))


def eps_of(xs) -> float:
    return float(jnp.finfo(xs[0].dtype).eps)


def to_numpy(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


def to64(t):
    with _x64():
        return jnp.asarray(np.asarray(t, dtype=np.float64))
