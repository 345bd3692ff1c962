"""jax entry of the fused perturbed kernels (host callback route).

The forward is a ``jax.pure_callback`` into the C kernel (works under ``jit`` and
``vmap``); derivatives come from two primitives, ``nonsmooth_perturbed_jvp`` (J v) and
``nonsmooth_perturbed_vjp`` (J^T g), each the other's transpose, so forward and reverse
mode, ``jacfwd``, ``jacrev``, ``grad`` and ``hessian`` of ``perturbed_max`` all work
without storing samples: every call regenerates them from the Philox key.  A batch of
tangents (``jacfwd``/``jacrev``'s ``vmap``) goes through one kernel call that draws each
sample once for all of them.

Keys: the two 32-bit words of the jax PRNG key are the 64-bit Philox key (high, low);
``jax.random.PRNGKey(seed)`` is ``[seed >> 32, seed & 0xffffffff]``, so the default key
gives the same samples as NumPy with the same seed.

Why a callback and not ``jax.ffi``: an XLA FFI handler must be compiled against
jaxlib's C++ headers, which pip's isolated build of this package cannot see; the
callback costs tens of microseconds per call, against milliseconds of sampling.
Arrays on an accelerator are copied to the host for the kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _fused

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------- host side


def _groups(theta: np.ndarray, kw: np.ndarray, ng: int):
    """Broadcast the ng leading group axes of theta and kw; yield (index, theta_g, key)."""
    gshape = np.broadcast_shapes(theta.shape[:ng], kw.shape[:ng])
    theta = np.broadcast_to(theta, gshape + theta.shape[ng:])
    kw = np.broadcast_to(kw, gshape + kw.shape[ng:])
    for idx in np.ndindex(*gshape):
        w = kw[idx]
        yield idx, gshape, np.ascontiguousarray(theta[idx]), (int(w[0]) << 32) | int(w[1])


def _forward_host(theta, kw, *, spec, want_value):
    theta, kw = np.asarray(theta), np.asarray(kw)
    ng = kw.ndim - 1
    means = values = None
    for idx, gshape, th, key in _groups(theta, kw, ng):
        m, v = _fused.forward_numpy(th, key, spec, want_value=want_value)
        if v is None:
            v = np.zeros(th.shape[:-1], th.dtype)
        if means is None:
            means = np.empty(gshape + m.shape, m.dtype)
            values = np.empty(gshape + v.shape, v.dtype)
        means[idx], values[idx] = m, v
    return means, values


def _linear_host(theta, kw, x, *, spec, ng, nt, transpose):
    theta, kw, x = np.asarray(theta), np.asarray(kw), np.asarray(x)
    fn = _fused.vjp_numpy if transpose else _fused.jvp_numpy
    gshape = np.broadcast_shapes(theta.shape[:ng], kw.shape[:ng], x.shape[:ng])
    x = np.broadcast_to(x, gshape + x.shape[ng:])
    out = None
    for idx, _, th, key in _groups(theta, kw, ng):
        r = fn(th, np.ascontiguousarray(x[idx]), key, spec)
        if out is None:
            out = np.empty(gshape + r.shape, r.dtype)
        out[idx] = r
    if out is None:  # an empty group axis
        out = np.empty(gshape + _linear_shape(theta.shape[ng:], x.shape[ng:], spec, transpose),
                       theta.dtype)
    return out


def _linear_shape(theta_shape, x_shape, spec, transpose):
    d = theta_shape[-1]
    event = spec.out_event(d)
    if transpose:  # x: (*M, *batch, *event) -> (*M, *batch, d)
        return tuple(x_shape[: len(x_shape) - len(event)]) + (d,)
    return tuple(x_shape[:-1]) + event  # x: (*M, *batch, d) -> (*M, *batch, *event)


# ----------------------------------------------------------------------------- primitives


def _make_linear(name: str, transpose: bool) -> Primitive:
    prim = Primitive(name)

    def abstract(theta, kw, x, *, spec, ng, nt):
        gshape = jnp.broadcast_shapes(theta.shape[:ng], kw.shape[:ng], x.shape[:ng])
        shape = _linear_shape(theta.shape[ng:], x.shape[ng:], spec, transpose)
        return jax.core.ShapedArray(gshape + shape, theta.dtype)

    def impl(theta, kw, x, *, spec, ng, nt):
        aval = abstract(theta, kw, x, spec=spec, ng=ng, nt=nt)
        cb = functools.partial(_linear_host, spec=spec, ng=ng, nt=nt, transpose=transpose)
        return jax.pure_callback(cb, jax.ShapeDtypeStruct(aval.shape, aval.dtype),
                                 theta, kw, x.astype(theta.dtype), vmap_method="sequential")

    prim.def_abstract_eval(abstract)
    prim.def_impl(impl)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))
    return prim


_jvp_p = _make_linear("nonsmooth_perturbed_jvp", transpose=False)
_vjp_p = _make_linear("nonsmooth_perturbed_vjp", transpose=True)


def _transpose_rule(other):
    def rule(ct, theta, kw, x, *, spec, ng, nt):
        if ad.is_undefined_primal(theta) or ad.is_undefined_primal(kw):
            raise NotImplementedError("the perturbed estimator is linear in its tangent only")
        if type(ct) is ad.Zero:
            return None, None, ad.Zero(x.aval)
        return None, None, other.bind(theta, kw, ct, spec=spec, ng=ng, nt=nt)
    return rule


ad.primitive_transposes[_jvp_p] = _transpose_rule(_vjp_p)
ad.primitive_transposes[_vjp_p] = _transpose_rule(_jvp_p)


def _jvp_rule(prim):
    def rule(primals, tangents, *, spec, ng, nt):
        theta, kw, x = primals
        dtheta, _, dx = tangents
        if type(dtheta) is not ad.Zero:
            raise NotImplementedError(
                "second derivatives of perturbed(...) are not computed by the fused kernel; "
                "build the layer with fused=False for the likelihood-ratio estimator of every "
                "order (perturbed_max's Hessian, the perturbed Jacobian estimate, works either way)")
        out = prim.bind(theta, kw, x, spec=spec, ng=ng, nt=nt)
        if type(dx) is ad.Zero:
            return out, ad.Zero(jax.core.get_aval(out).to_tangent_aval())
        return out, prim.bind(theta, kw, dx, spec=spec, ng=ng, nt=nt)  # linear in x
    return rule


ad.primitive_jvps[_jvp_p] = _jvp_rule(_jvp_p)
ad.primitive_jvps[_vjp_p] = _jvp_rule(_vjp_p)


def _front(x, dim, size):
    if dim is None:
        return jnp.broadcast_to(x[None], (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def _batch_rule(prim):
    def rule(args, dims, *, spec, ng, nt):
        theta, kw, x = args
        dt, dk, dx = dims
        if dt is None and dk is None:
            # only the tangents are batched: one more tangent axis after the group axes,
            # so one kernel call draws each sample once for all of them
            return prim.bind(theta, kw, jnp.moveaxis(x, dx, ng), spec=spec, ng=ng,
                             nt=nt + 1), ng
        size = theta.shape[dt] if dt is not None else kw.shape[dk]
        return prim.bind(_front(theta, dt, size), _front(kw, dk, size), _front(x, dx, size),
                         spec=spec, ng=ng + 1, nt=nt), 0
    return rule


batching.primitive_batchers[_jvp_p] = _batch_rule(_jvp_p)
batching.primitive_batchers[_vjp_p] = _batch_rule(_vjp_p)


# ----------------------------------------------------------------------------- rules


@functools.lru_cache(maxsize=None)
def _rules(spec: _fused.Spec):
    @jax.custom_jvp
    def mean_from(theta, kw, m):
        """m (the forward's mean), with the estimator as its derivative in theta."""
        del theta, kw
        return m

    @mean_from.defjvp
    def _(primals, tangents):
        theta, kw, m = primals
        return m, _jvp_p.bind(theta, kw, tangents[0], spec=spec, ng=0, nt=0)

    @jax.custom_jvp
    def value_from(theta, kw, val, m):
        del theta, kw, m
        return val

    @value_from.defjvp
    def _(primals, tangents):
        theta, kw, val, m = primals
        # <y_sigma, v>, with y_sigma differentiable again: the Hessian of F_sigma is the
        # perturbed Jacobian estimate
        return val, jnp.sum(mean_from(theta, kw, m) * tangents[0], axis=-1)

    return mean_from, value_from


def _key_words(key, seed: int):
    if key is None:
        return jnp.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], jnp.uint32)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] < 2:
        raise TypeError(f"key must be a jax PRNG key (jax.random.key or PRNGKey), got an "
                        f"array of dtype {key.dtype} and shape {key.shape}")
    return key[..., :2]


def fused_jax(spec: _fused.Spec, theta, key, seed: int):
    """The layer's output through the C kernel, or NotImplemented (stacked path)."""
    if np.dtype(theta.dtype) not in _DTYPES:
        return NotImplemented
    kw = _key_words(key, seed)
    d = theta.shape[-1]
    batch = tuple(theta.shape[:-1])
    event = spec.out_event(d)
    # Under jit a non-finite theta cannot raise: its rows come out NaN (as in the stacked path).
    bad = ~jnp.all(jnp.isfinite(theta), axis=-1)
    # rows where theta + sigma Z could overflow (|Z| < 40, as the general path assumes)
    limit = float(np.finfo(np.dtype(theta.dtype)).max) - spec.sigma * 40.0
    bad = bad | (jnp.max(jnp.abs(theta), axis=-1) > limit)
    safe = jnp.where(bad[..., None], jnp.zeros((), theta.dtype), theta)
    want_value = spec.output == "value"
    shapes = (jax.ShapeDtypeStruct(batch + event, theta.dtype),
              jax.ShapeDtypeStruct(batch, theta.dtype))
    m, val = jax.pure_callback(
        functools.partial(_forward_host, spec=spec, want_value=want_value), shapes,
        jax.lax.stop_gradient(safe), kw, vmap_method="expand_dims")
    mean_from, value_from = _rules(spec)
    if want_value:
        out = value_from(safe, kw, val, m)
        return jnp.where(bad, jnp.nan, out)
    out = mean_from(safe, kw, m)
    return jnp.where(bad.reshape(bad.shape + (1,) * len(event)), jnp.nan, out)


def philox_noise(num_samples: int, noise: str, theta, key, seed: int):
    """(Z, S) for the general path from the fused kernels' generator and the same key, so
    ``fused=False`` layers and ``freeze`` see the samples the fused kernel draws."""
    kw = _key_words(key, seed)
    shape = (num_samples,) + tuple(theta.shape)
    dt = np.dtype(theta.dtype)

    def host(words):
        words = np.asarray(words)
        k = (int(words[0]) << 32) | int(words[1])
        Z, E = _fused.noise(k, num_samples, tuple(theta.shape), noise=noise, dtype=dt)
        return Z, (E if E is not None else Z)

    out = jax.ShapeDtypeStruct(shape, dt)
    return jax.pure_callback(host, (out, out), kw, vmap_method="sequential")


__all__ = ["fused_jax", "philox_noise"]
