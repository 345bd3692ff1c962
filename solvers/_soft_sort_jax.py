"""Soft sort/rank for jax arrays: ``custom_jvp`` around a ``pure_callback`` forward.

The callback runs the NumPy kernel and returns the values with the integer ``perm``
and ``block`` it found. The tangent rule is written in linear jnp ops (gathers and a
segment sum) from those integers, so jax can transpose it (``grad``, ``jacrev``) and
differentiate it again (for KL the block softmax is recomputed from ``x`` in jnp).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nonsmooth import _layer_hook

from . import _soft_sort_core as _core


def _host_forward(x, *, op, regularization, strength, descending):
    x = np.asarray(x)
    n = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, n)
    out, perm, block = _core.forward_checked(x2, op=op, regularization=regularization,
                                             strength=strength, descending=descending)
    # int32 indices: valid with and without jax_enable_x64.
    return (out.reshape(x.shape), perm.astype(np.int32).reshape(x.shape),
            block.astype(np.int32).reshape(x.shape))


def _forward(x, op, regularization, strength, descending):
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct(x.shape, jnp.int32),
              jax.ShapeDtypeStruct(x.shape, jnp.int32))
    host = functools.partial(_host_forward, op=op, regularization=regularization,
                             strength=strength, descending=descending)
    # The kernel handles any leading axes, so vmapped axes are simply prepended.
    return jax.pure_callback(host, shapes, x, vmap_method="expand_dims")


def _segsum_bcast(values, block):
    """Per-block sums broadcast back to every member (linear in ``values``)."""
    n = values.shape[-1]
    v2 = values.reshape(-1, n)
    rows = v2.shape[0]
    ids = (block.reshape(-1, n) + (jnp.arange(rows, dtype=block.dtype) * n)[:, None]).ravel()
    sums = jax.ops.segment_sum(v2.ravel(), ids, num_segments=rows * n)
    return sums[ids].reshape(values.shape)


def _unsort(values_sorted, perm):
    """``out[perm] = values_sorted`` row-wise, as a (linear) scatter-add."""
    n = values_sorted.shape[-1]
    v2 = values_sorted.reshape(-1, n)
    rows = v2.shape[0]
    ids = (perm.reshape(-1, n) + (jnp.arange(rows, dtype=perm.dtype) * n)[:, None]).ravel()
    out = jax.ops.segment_sum(v2.ravel(), ids, num_segments=rows * n, unique_indices=True)
    return out.reshape(values_sorted.shape)


def _block_weights(x, perm, block, op, regularization, strength, descending):
    if regularization == "l2":
        return 1.0 / _segsum_bcast(jnp.ones(block.shape, x.dtype), block)
    xs = jnp.take_along_axis(x, perm, axis=-1)
    # u_j - u_first = alpha (x_j - x_first) <= 0 (u is sorted descending), formed from the
    # difference so that ties give exactly 0 and a huge 1/eps gives -inf, never NaN.
    d = xs - jnp.take_along_axis(xs, block, axis=-1)
    if op == "rank":
        d = d / strength
    if _core.alpha(op, strength, descending) < 0:
        d = -d
    e = jnp.exp(d)
    return e / _segsum_bcast(e, block)


def _rank_kl_scale(block, dtype):
    """``S_B = sum_B rho`` per element (sorted coordinates): KL rank's Jacobian factor."""
    n = block.shape[-1]
    rho = jnp.broadcast_to(jnp.arange(n, 0, -1, dtype=dtype), block.shape)
    return _segsum_bcast(rho, block)


def _tangent(x, perm, block, t, op, regularization, strength, descending):
    """``J(x) t``: linear in ``t``; depends on ``x`` only through the KL block softmax."""
    p = _block_weights(x, perm, block, op, regularization, strength, descending)
    ts = jnp.take_along_axis(t, perm, axis=-1)
    if op == "sort":
        return _segsum_bcast(p * ts, block)
    a = _core.alpha(op, strength, descending)
    r = ts - _segsum_bcast(p * ts, block)
    if regularization == "kl":  # J = a S_B (diag p - p p^T)
        r = r * p * _rank_kl_scale(block, t.dtype)
    return _unsort(a * r, perm)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _soft(x, op, regularization, strength, descending):
    return _forward(x, op, regularization, strength, descending)[0]


@_soft.defjvp
def _soft_jvp(op, regularization, strength, descending, primals, tangents):
    (x,), (t,) = primals, tangents
    # The callback sees no tangents (stop_gradient), so this rule can itself be
    # differentiated: higher orders go through _known below.
    out, perm, block = _forward(jax.lax.stop_gradient(x), op, regularization, strength,
                                descending)
    return (_known(x, out, perm, block, op, regularization, strength, descending),
            _tangent(x, perm, block, t, op, regularization, strength, descending))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _known(x, out, perm, block, op, regularization, strength, descending):
    """The value ``out`` already computed at ``x``, with the derivative of soft sort/rank
    on the piece fixed by ``perm``/``block``: makes jvp-of-jvp exact at no extra cost."""
    return out


@_known.defjvp
def _known_jvp(op, regularization, strength, descending, primals, tangents):
    x, out, perm, block = primals
    t = tangents[0]
    return (_known(x, out, perm, block, op, regularization, strength, descending),
            _tangent(x, perm, block, t, op, regularization, strength, descending))


_COMPUTE = {jnp.dtype(jnp.float32): jnp.float32, jnp.dtype(jnp.float64): jnp.float64,
            jnp.dtype(jnp.float16): jnp.float32, jnp.dtype(jnp.bfloat16): jnp.float32}


def soft_sort_rank_jax(x, *, op: str, fn: str, regularization: str, strength: float,
                       descending: bool):
    """Validated entry point behind :func:`nonsmooth.solvers.soft_sort` for jax arrays.

    Concrete arrays with NaN/inf raise ``ValueError`` here; under ``jit`` the check runs
    in the host callback and jax re-raises it as a runtime error quoting the message.
    """
    work = _COMPUTE.get(jnp.dtype(x.dtype))
    if work is None:
        raise TypeError(
            f"{fn} needs floating-point values, got a jax array of dtype {x.dtype}; convert "
            "first, e.g. values.astype(jnp.float32)")
    if x.ndim == 0:
        raise ValueError(f"{fn}: values must have at least one axis, got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"{fn}: values must not be empty along the last axis, got shape "
                         f"{tuple(x.shape)}")
    if x.size == 0:
        return x
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("soft_sort", x, op=op, regularization=regularization, strength=strength,
                                 descending=descending)
    if not isinstance(x, jax.core.Tracer):
        host = np.asarray(x.astype(work)).reshape(-1, x.shape[-1])
        _core.check_scale(_core.check_finite_rows(host), x.shape[-1], host.dtype, op=op,
                          strength=strength)
    xw = x.astype(work) if work != x.dtype else x
    out = _soft(xw, op, regularization, strength, descending)
    return out.astype(x.dtype) if work != x.dtype else out


__all__ = ["soft_sort_rank_jax"]
