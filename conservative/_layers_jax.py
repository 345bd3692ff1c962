"""jax side of the engine's layers: the ``nonsmooth_layer`` primitive (see :mod:`._layers`).

``nonsmooth_layer[handle](*inputs)`` has an abstract evaluation (the spec's output shapes),
an eager implementation (the spec's float64 NumPy forward) and a lowering through
``pure_callback`` so that a jitted function traced by the engine still runs when jax
replays it.  :func:`trace_state` is a jax configuration state that is part of jax's trace
context: a function jitted by the user is traced afresh under the engine (routing its
layers here) instead of replaying the user's cached trace, and vice versa.
"""
from __future__ import annotations

import contextlib

import numpy as np
import jax
import jax.numpy as jnp

from nonsmooth import _layer_hook as hook

from . import _layers as L

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive
from jax.interpreters import mlir

PRIMITIVE = "nonsmooth_layer"

layer_p = Primitive(PRIMITIVE)
layer_p.multiple_results = True

try:
    from jax._src import config as _config

    _STATE = _config.bool_state("nonsmooth_engine_tracing", False,
                                "internal: the nonsmooth audit engine is tracing (keys jax's trace caches)",
                                include_in_trace_context=True)
except Exception:  # pragma: no cover - a jax without the state API: jit caches are shared
    _STATE = None


def trace_state():
    return _STATE(True) if _STATE is not None else contextlib.nullcontext()


def _float_dtype(dtypes):
    for d in dtypes:
        if jnp.issubdtype(d, jnp.floating):
            return d
    return jnp.float32


def _metas(avals) -> list:
    return [(tuple(int(s) for s in a.shape), "float" if jnp.issubdtype(a.dtype, jnp.floating) else str(np.dtype(a.dtype)))
            for a in avals]


def _out_dtypes(spec, avals):
    fl = _float_dtype([a.dtype for a in avals])
    out = []
    for shape, dt in spec.out_meta(_metas(avals)):
        if dt == "float":
            out.append((shape, fl))
        else:
            d = np.dtype(dt)
            if d == np.int64 and not jax.config.jax_enable_x64:
                d = np.dtype(np.int32)
            out.append((shape, d))
    return out


def _abstract(*avals, handle):
    spec = L.lookup(handle)
    with hook.suspended():  # a spec may call its solver for shapes: that call must not route
        return [jax.core.ShapedArray(shape, dt) for shape, dt in _out_dtypes(spec, avals)]


def _host(spec, avals, *arrays):
    xs = [np.asarray(a, dtype=np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a)
          for a in arrays]
    with hook.suspended():
        outs = spec.forward(xs)
    return [np.asarray(o).astype(dt) for o, (_, dt) in zip(outs, _out_dtypes(spec, avals))]


def _impl(*arrays, handle):
    spec = L.lookup(handle)
    avals = [jax.core.ShapedArray(np.shape(a), np.asarray(a).dtype) for a in arrays]
    return [jnp.asarray(o) for o in _host(spec, avals, *arrays)]


def _lowered(*arrays, handle):
    spec = L.lookup(handle)
    avals = [jax.core.ShapedArray(a.shape, a.dtype) for a in arrays]
    shapes = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in _out_dtypes(spec, avals)]
    return jax.pure_callback(lambda *a: _host(spec, avals, *a), shapes, *arrays)


def _jvp(primals, tangents, *, handle):
    """The engine differentiates its own float64 trace at smooth points (``smooth_jacobian``):
    the layer's Jacobian on the piece its own code takes, fetched from the host."""
    from jax.interpreters import ad

    spec = L.lookup(handle)
    outs = layer_p.bind(*primals, handle=handle)
    avals = [jax.core.ShapedArray(np.shape(p), jnp.asarray(p).dtype) for p in primals]
    fl = [i for i, p in enumerate(primals) if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating)]
    fo = [o for o, v in enumerate(outs) if jnp.issubdtype(v.dtype, jnp.floating)]
    shapes = [jax.ShapeDtypeStruct((int(np.size(outs[o])), int(np.size(primals[i]))), outs[o].dtype)
              for o in fo for i in fl]

    def host(*arrays):
        xs = [np.asarray(a, dtype=np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a)
              for a in arrays]
        with hook.suspended():
            blocks = spec.jacobians(xs)
        return [np.asarray(blocks[o][i], dtype=np.float64).astype(s.dtype) for o in fo for i in fl
                for s in [shapes[fo.index(o) * len(fl) + fl.index(i)]]]

    J = jax.pure_callback(host, shapes, *primals)
    touts = []
    for o, v in enumerate(outs):
        if o not in fo:
            touts.append(ad.Zero.from_primal_value(v))
            continue
        acc = jnp.zeros(v.size, v.dtype)
        for i in fl:
            t = tangents[i]
            if type(t) is ad.Zero:
                continue
            acc = acc + J[fo.index(o) * len(fl) + fl.index(i)] @ jnp.ravel(t)
        touts.append(acc.reshape(v.shape))
    return outs, touts


def _batch(args, dims, *, handle):
    """jax.vmap inside f: layers that act on trailing axes (soft sort, the solvers, the
    perturbed layers) take the mapped axis as one more leading batch axis."""
    spec = L.lookup(handle)
    if not getattr(spec, "batchable", False):
        raise NotImplementedError(f"the engine cannot trace {spec.name} under jax.vmap; audit the function of one "
                                  "sample (or a batch without vmap)")
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)  # None: not mapped
    moved = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
             for a, d in zip(args, dims)]
    outs = layer_p.bind(*moved, handle=handle)
    return outs, [0] * len(outs)


layer_p.def_impl(_impl)
try:  # jax keeps the batching table private since 0.4.3x
    from jax._src.interpreters import batching as _batching
except ImportError:  # pragma: no cover
    from jax.interpreters import batching as _batching

_batching.primitive_batchers[layer_p] = _batch
from jax.interpreters import ad as _ad  # noqa: E402

_ad.primitive_jvps[layer_p] = _jvp
layer_p.def_abstract_eval(_abstract)
mlir.register_lowering(layer_p, mlir.lower_fun(_lowered, multiple_results=True))


def bind(spec, handle: int, inputs: list) -> list:
    return list(layer_p.bind(*[jnp.asarray(a) for a in inputs], handle=int(handle)))


def add_node(tracer, eqn, ins) -> list:
    """The ``nonsmooth_layer`` equation as a layer node of the engine's IR."""
    spec = L.lookup(eqn.params["handle"])
    avals = [o.aval for o in eqn.outvars]
    node = tracer._node(f"layer:{spec.name}", layer_p, ins, avals, {"layer": spec}, rule=spec.rule,
                        origin=spec.name, eqn_params=dict(eqn.params))
    node.location += f"  ({spec.describe()})"
    if spec.unsupported:
        tracer.graph.unsupported.append(spec.unsupported)
    return node.outputs
