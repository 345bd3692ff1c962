"""jax adapter of identity-with-projection and blackbox backward passes (custom_vjp)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._surrogate_backward import SurrogateLayer, check_output


def project(g, projection, event_ndim: int):
    """Apply the identity method's projection over the trailing ``event_ndim`` axes."""
    if projection is None:
        return g
    axes = tuple(range(g.ndim - event_ndim, g.ndim))
    if projection in ("mean", "std"):
        g = g - jnp.mean(g, axis=axes, keepdims=True)
    if projection == "mean":
        return g
    if projection == "norm":
        scale = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
    else:
        scale = jnp.sqrt(jnp.mean(g * g, axis=axes, keepdims=True))
    # A zero (or constant, for "std") gradient has no direction: return 0, not 0/0.
    return jnp.where(scale > 0, g / jnp.where(scale > 0, scale, 1), 0)


def _solve(layer, theta):
    y = layer.solver(theta)
    if not isinstance(y, jax.Array):
        raise TypeError(f"the solver returned {type(y).__name__} for a jax input; "
                        "it must return a jax array")
    check_output(y, theta, layer)
    return y.astype(theta.dtype)


@functools.lru_cache(maxsize=256)
def _rule(layer: SurrogateLayer):
    @jax.custom_vjp
    def f(theta):
        return _solve(layer, theta)

    def fwd(theta):
        y = _solve(layer, theta)
        return y, (theta, y)

    def bwd(res, g):
        theta, y = res
        if layer.method == "identity":
            p = project(g, layer.projection, layer.event_ndim)
            return ((p if layer.sense == "max" else -p),)
        lam = layer.lambda_
        if layer.sense == "min":
            return ((_solve(layer, theta + lam * g) - y) / lam,)
        return ((y - _solve(layer, theta - lam * g)) / lam,)

    f.defvjp(fwd, bwd)
    return f


def surrogate_jax(layer: SurrogateLayer, theta):
    out = _rule(layer)(theta)
    # Under jit a non-finite theta cannot raise; mark the affected problems NaN instead.
    axes = tuple(range(theta.ndim - layer.event_ndim, theta.ndim))
    bad = ~jnp.all(jnp.isfinite(theta), axis=axes)
    return jnp.where(bad.reshape(bad.shape + (1,) * layer.event_ndim), jnp.nan, out)
