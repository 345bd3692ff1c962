"""jax adapter of the perturbed layers.

The solver only ever sees ``stop_gradient(theta) + sigma Z``, so it may be a jnp
function or a ``pure_callback`` (which jax cannot differentiate).  Derivatives come
from two ``custom_jvp`` rules that take the stacked samples as data: the mean's
tangent is the score-function estimator (linear in the tangent, so jax transposes it
for ``grad``), and the value's tangent is <y_sigma, v> with y_sigma itself
differentiable, which makes the Hessian of F_sigma the perturbed Jacobian estimate.
Works under ``jit`` and ``vmap``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ._combinatorial_common import validated_inputs
from ._perturbed import PerturbedLayer, check_samples


@functools.lru_cache(maxsize=None)
def _rules(N: int, sigma: float, noise: str, control_variate: bool, event_ndim: int):
    def estimator_tangent(Y, score, v):
        batch_shape = v.shape[: v.ndim - event_ndim]
        B = math.prod(batch_shape)
        out_event = Y.shape[1 + len(batch_shape):]
        Dn = math.prod(v.shape[len(batch_shape):])
        # explicit sizes, not -1: an empty batch must reshape too
        Yf = Y.reshape(Y.shape[0], B, math.prod(out_event))
        vf = v.reshape(B, Dn)
        Sf = score.reshape(N, B, Dn)
        # Multiply-and-reduce rather than einsum: with the batch axis in the middle, XLA's
        # dot would first transpose the (N, B, D) arrays; the reductions fuse instead.
        s = jnp.sum(Sf * vf[None], axis=-1)
        if noise == "gumbel":  # score = 1 - E
            s = jnp.sum(vf, axis=-1)[None, :] - s
        Yc = Yf[:N] - Yf[N][None] if control_variate else Yf
        dy = jnp.sum(Yc * s[..., None], axis=0) / (N * sigma)
        return dy.reshape(batch_shape + out_event)

    @jax.custom_jvp
    def mean(theta, Y, score):
        del theta, score
        return jnp.mean(Y[:N], axis=0)

    @mean.defjvp
    def mean_jvp(primals, tangents):
        theta, Y, score = primals
        v = tangents[0]
        return mean(theta, Y, score), estimator_tangent(Y, score, v)

    @jax.custom_jvp
    def value(theta, Y, P, score):
        del theta, score
        axes = tuple(range(Y.ndim - event_ndim, Y.ndim))
        return jnp.mean(jnp.sum(Y[:N] * P[:N], axis=axes), axis=0)

    @value.defjvp
    def value_jvp(primals, tangents):
        theta, Y, P, score = primals
        v = tangents[0]
        axes = tuple(range(v.ndim - event_ndim, v.ndim))
        ybar = mean(theta, Y, score)  # differentiable again: second order is the estimator
        return value(theta, Y, P, score), jnp.sum(ybar * v, axis=axes)

    return mean, value


def draw_noise(layer: PerturbedLayer, theta, key):
    """(Z, score source): Gumbel Z = -log E with E = -log U (score 1 - E), or normal Z.

    PRNG choice: the user's key with jax's threefry generator, but always in its
    non-partitionable counter layout (``jax.threefry_partitionable(False)``, scoped to this
    draw; the user's global setting is untouched).  On CPU that layout generates the
    (N, *theta.shape) block about twice as fast as the partitionable default of jax >= 0.5,
    and it is the same threefry-2x32 stream cipher, so the noise has the same
    distribution and is reproducible from ``key`` alone (though not bit-identical to
    ``jax.random.gumbel(key, ...)`` under the default layout).  The ``rbg`` and
    ``unsafe_rbg`` implementations were measured too and are *slower* than either
    threefry layout on CPU (jax 0.10.2).  The trade-off: with theta sharded over several
    devices this layout does not shard the draw (that is what "partitionable" buys).
    Gumbel goes through two logs of one uniform (E = -log U is reused as the score),
    which costs less than a separate exponential draw.
    """
    shape = (layer.num_samples,) + tuple(theta.shape)
    with jax.threefry_partitionable(False):
        if layer.noise == "gumbel":
            tiny = jnp.finfo(theta.dtype).tiny
            E = -jnp.log(jax.random.uniform(key, shape, theta.dtype, minval=tiny, maxval=1.0))
            return -jnp.log(E), E
        Z = jax.random.normal(key, shape, theta.dtype)
        return Z, Z


def perturbed_jax(layer: PerturbedLayer, theta, key):
    if key is None:
        key = jax.random.PRNGKey(layer.seed)
    N = layer.num_samples
    Z, score = draw_noise(layer, theta, key)
    base = jax.lax.stop_gradient(theta)
    P = base + layer.sigma * Z
    if layer.control_variate:
        P = jnp.concatenate([P, base[None]], axis=0)
    with validated_inputs():
        Y = layer.solver(P)
    if not isinstance(Y, jax.Array):
        raise TypeError(f"the solver returned {type(Y).__name__} for a jax input; "
                        "it must return a jax array")
    Y = jax.lax.stop_gradient(Y.astype(theta.dtype))
    check_samples(Y, layer, tuple(theta.shape), P.shape[0])
    mean, value = _rules(N, layer.sigma, layer.noise, layer.control_variate, layer.event_ndim)
    out = mean(theta, Y, score) if layer.output == "mean" else value(theta, Y, P, score)
    # Under jit a non-finite theta cannot raise; mark the affected problems NaN instead.
    axes = tuple(range(theta.ndim - layer.event_ndim, theta.ndim))
    bad = ~jnp.all(jnp.isfinite(theta), axis=axes)
    bad = bad.reshape(bad.shape + (1,) * (out.ndim - bad.ndim))
    return jnp.where(bad, jnp.nan, out)
