"""jax adapter of the perturbed layers.

The solver only ever sees ``stop_gradient(theta) + sigma Z``, so it may be a jnp function
or a ``pure_callback`` (which jax cannot differentiate).  Derivatives come from the
likelihood-ratio form of ``_perturbed_common``: the output is
(1/N) sum_i w_i(theta) (y_i - b) + b with weights w_i that equal 1 in value and carry the
derivatives through one ``custom_jvp`` whose tangent rule is itself differentiable (it calls
the weights again), so ``grad``/``jacfwd``/``jacrev`` give the score-function estimator and
``hessian`` (and higher orders) the likelihood-ratio estimator of the same samples, never a
silent zero.  ``perturbed_max`` has its own ``custom_jvp``: tangent <y_hat(theta), v>, so
its gradient is the sample mean of the y_i and its Hessian the Jacobian estimate.

theta may be an array (leading batch axes, ``event_ndim`` trailing event axes) or a pytree
of arrays (one problem; the solver gets the pytree with a leading sample axis on every
leaf).  Works under ``jit`` and ``vmap``.

Contract: depends on ``_perturbed_common``, ``_combinatorial_common`` and ``_jax_solve``,
never on the dispatcher ``_perturbed``.
"""
from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

from ._combinatorial_common import is_tracer
from ._jax_solve import call_solver, resolve_batched
from ._perturbed_common import (PerturbedSpec, Z_BOUND, check_samples, check_sigma_for_dtype,
                                check_theta_magnitude)


# ----------------------------------------------------------------------------- entry point


def perturbed_jax(spec: PerturbedSpec, theta, key):
    """y_sigma(theta) or F_sigma(theta) for a jax array or pytree.

    This is the one place where, for jax, noise draw + solver + estimator meet: samples from
    ``draw_noise`` and ``_call_solver``, derivatives from ``_weights``/``_mean_hat``/
    ``_value``.  A fused kernel for a built-in solver plugs in at the top:
    ``if fused.supports(spec, theta): return fused.perturbed_jax(spec, theta, key)``.
    """
    if key is None:
        key = jax.random.PRNGKey(spec.seed)
    is_tree = not isinstance(theta, jax.Array)
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    if not leaves:
        raise ValueError("theta is an empty pytree")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"theta must be floating-point, got a leaf of dtype {leaf.dtype}")
        check_sigma_for_dtype(spec.sigma, leaf.dtype, float(jnp.finfo(leaf.dtype).max))
    nb = 0 if is_tree else theta.ndim - spec.event_ndim
    batch = tuple(leaves[0].shape[:nb])
    if is_tree:
        _check_tree_eagerly(spec, leaves)
    elif not is_tracer(theta) and theta.size and spec.noise.kind != "custom":
        with jax.ensure_compile_time_eval():
            check_theta_magnitude(float(jnp.max(jnp.abs(theta))), spec.sigma, theta.dtype,
                                  float(jnp.finfo(theta.dtype).max))

    N = spec.num_samples
    keys = [key] if len(leaves) == 1 else list(jax.random.split(key, len(leaves)))
    drawn = [draw_noise(spec, leaf, k) for leaf, k in zip(leaves, keys)]
    bases = [jax.lax.stop_gradient(leaf) for leaf in leaves]
    P = [b + spec.sigma * Z for b, (Z, _) in zip(bases, drawn)]
    S = [s for _, s in drawn]
    if spec.control_variate:
        P = [jnp.concatenate([p, b[None]], axis=0) for p, b in zip(P, bases)]
    P_tree = jax.tree_util.tree_unflatten(treedef, P)
    out_dtype = jnp.result_type(*leaves)
    Y_tree = _call_solver(spec, P_tree, theta, is_tree)
    Y_leaves, out_def = jax.tree_util.tree_flatten(Y_tree)
    for y in Y_leaves:
        if not isinstance(y, jax.Array):
            raise TypeError(f"the solver returned {type(y).__name__} for a jax input; "
                            "it must return jax arrays")
    Y_leaves = [jax.lax.stop_gradient(y.astype(out_dtype)) for y in Y_leaves]
    if not is_tree:
        check_samples(tuple(Y_leaves[0].shape), spec, tuple(theta.shape), spec.rows)
    else:
        _check_tree_samples(spec, Y_leaves, out_def, treedef, leaves)

    fns = _rules(spec.sigma, spec.noise, nb, N, spec.control_variate)
    if spec.output == "mean":
        outs = fns.mean_hat(leaves, S, Y_leaves)
        out = jax.tree_util.tree_unflatten(out_def, outs)
    else:
        V0 = sum(jnp.mean(_event_sum(y[:N] * p[:N], nb + 1), axis=0)
                 for y, p in zip(Y_leaves, P))
        out = fns.value(leaves, S, Y_leaves, V0)

    # Under jit a non-finite or overflowing theta cannot raise; mark the problems NaN.
    fmax = jnp.finfo(out_dtype).max
    bad = jnp.zeros(batch, bool)
    for leaf in leaves:
        axes = tuple(range(nb, leaf.ndim))
        bad = bad | ~jnp.all(jnp.isfinite(leaf), axis=axes)
        if spec.noise.kind != "custom":
            bad = bad | jnp.any(jnp.abs(leaf) > fmax - spec.sigma * Z_BOUND, axis=axes)
    return jax.tree_util.tree_map(
        lambda o: jnp.where(bad.reshape(bad.shape + (1,) * (o.ndim - bad.ndim)), jnp.nan, o), out)


def _check_tree_eagerly(spec, leaves):
    for leaf in leaves:
        if is_tracer(leaf) or not leaf.size:
            continue
        with jax.ensure_compile_time_eval():
            if not bool(jnp.all(jnp.isfinite(leaf))):
                raise ValueError("theta has a leaf with a non-finite value; the solvers need "
                                 "finite inputs")
            if spec.noise.kind != "custom":
                check_theta_magnitude(float(jnp.max(jnp.abs(leaf))), spec.sigma, leaf.dtype,
                                      float(jnp.finfo(leaf.dtype).max))


def _check_tree_samples(spec, Y_leaves, out_def, treedef, leaves):
    for y in Y_leaves:
        if y.ndim < 1 or y.shape[0] != spec.rows:
            raise ValueError(
                f"the solver must return leaves with a leading sample axis of {spec.rows}; got "
                f"a leaf of shape {tuple(y.shape)} (pass batched=False if it solves one "
                f"instance per call)")
    if spec.output == "value":
        same = out_def == treedef and all(
            y.shape[1:] == leaf.shape for y, leaf in zip(Y_leaves, leaves))
        if not same:
            raise ValueError("perturbed_max / fenchel_young_loss need a solver whose output "
                             "pytree has theta's structure and shapes (a linear objective)")


def _event_sum(x, nlead: int):
    return jnp.sum(x, axis=tuple(range(nlead, x.ndim)))


# ----------------------------------------------------------------------------- noise, solver


def draw_noise(spec, theta, key):
    """(Z, S): the noise and its score data (S = E = exp(-Z) for Gumbel, S = Z otherwise).

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
    which costs less than a separate exponential draw.  A distribution object draws with
    its own ``sample(key, shape)``.
    """
    spec = getattr(spec, "spec", spec)
    shape = (spec.num_samples,) + tuple(theta.shape)
    if spec.noise.kind == "custom":
        Z = jnp.asarray(spec.noise.obj.sample(key, shape)).astype(theta.dtype)
        if Z.shape != shape:
            raise ValueError(f"noise.sample(key, {shape}) returned shape {tuple(Z.shape)}")
        return Z, Z
    if np.dtype(theta.dtype) in (np.float32, np.float64) and theta.ndim >= 1:
        from . import _fused

        if _fused.available():
            # the fused kernels' counter-based generator, keyed the same way: the general
            # path, freeze() and the fused kernel then see the same samples
            from ._fused_jax import philox_noise

            return philox_noise(spec.num_samples, spec.noise.kind, theta, key, spec.seed)
    with jax.threefry_partitionable(False):
        if spec.noise.kind == "gumbel":
            tiny = jnp.finfo(theta.dtype).tiny
            E = -jnp.log(jax.random.uniform(key, shape, theta.dtype, minval=tiny, maxval=1.0))
            return -jnp.log(E), E
        Z = jax.random.normal(key, shape, theta.dtype)
        return Z, Z


def _call_solver(spec, P_tree, theta, is_tree):
    nb = 0 if is_tree else theta.ndim - spec.event_ndim
    batched = resolve_batched(spec.solver, spec.batched, spec.cache, theta, nb)
    return call_solver(spec.solver, P_tree, nlead=1 + nb, batched=batched)


# ----------------------------------------------------------------------------- estimator


class _Rules:
    """The custom_jvp functions of one (sigma, noise, batch rank, N, control variate)."""

    def __init__(self, sigma, law, nb, N, cv):
        self.sigma, self.law, self.nb, self.N, self.cv = sigma, law, nb, N, cv

        @jax.custom_jvp
        def weights(thetas, Ss):
            return jnp.ones(Ss[0].shape[: 1 + nb], Ss[0].dtype)

        @weights.defjvp
        def weights_jvp(primals, tangents):
            thetas, Ss = primals
            dthetas, _ = tangents
            w = weights(thetas, Ss)  # differentiable again: higher orders come from here
            return w, w * self.score_dot(thetas, Ss, dthetas)

        @jax.custom_jvp
        def value(thetas, Ss, Ys, V0):
            return V0

        @value.defjvp
        def value_jvp(primals, tangents):
            thetas, Ss, Ys, V0 = primals
            dthetas = tangents[0]
            ys = self.mean_hat(thetas, Ss, Ys)
            dot = sum(_event_sum(y * v, nb) for y, v in zip(ys, dthetas))
            return V0, dot

        self.weights, self.value = weights, value

    def score_dot(self, thetas, Ss, vs):
        """sum over leaves and event axes of grad_theta log w_i(theta) * v: (N, *batch)."""
        sigma, nb = self.sigma, self.nb
        total = 0.0
        for theta, S, v in zip(thetas, Ss, vs):
            v = jnp.broadcast_to(v, theta.shape)
            d = (theta - jax.lax.stop_gradient(theta)) / sigma
            if self.law.kind == "gumbel":
                part = _event_sum(v, nb)[None] - _event_sum(S * (jnp.exp(d) * v)[None], nb + 1)
            elif self.law.kind == "normal":
                part = _event_sum(S * v[None], nb + 1) - _event_sum(d * v, nb)[None]
            else:
                lp = self.law.obj.log_prob
                dlp = jax.grad(lambda z: jnp.sum(lp(z)))
                part = -_event_sum(dlp(S - d[None]) * v[None], nb + 1)
            total = total + part / sigma
        return total

    def mean_hat(self, thetas, Ss, Ys):
        """Per output leaf: (1/N) sum_i w_i (y_i - b) + b."""
        N, nb = self.N, self.nb
        w = self.weights(list(thetas), list(Ss))
        outs = []
        for y in Ys:
            wy = w.reshape(w.shape + (1,) * (y.ndim - 1 - nb))
            out = jnp.sum(wy * y[:N], axis=0) / N
            if self.cv:
                out = out + y[N] * (1 - jnp.mean(wy, axis=0))
            outs.append(out)
        return outs


@functools.lru_cache(maxsize=256)
def _rules(sigma, law, nb, N, cv) -> _Rules:
    return _Rules(sigma, law, nb, N, cv)


def freeze_jax(spec: PerturbedSpec, theta0, key):
    """theta -> y_hat(theta) with the samples drawn once at theta0 (arrays only)."""
    if key is None:
        key = jax.random.PRNGKey(spec.seed)
    check_sigma_for_dtype(spec.sigma, theta0.dtype, float(jnp.finfo(theta0.dtype).max))
    N, sigma, nb = spec.num_samples, spec.sigma, theta0.ndim - spec.event_ndim
    theta0 = jax.lax.stop_gradient(theta0)
    Z, S = draw_noise(spec, theta0, key)
    P = theta0 + sigma * Z
    if spec.control_variate:
        P = jnp.concatenate([P, theta0[None]], axis=0)
    Y = _call_solver(spec, P, theta0, False)
    check_samples(tuple(Y.shape), spec, tuple(theta0.shape), spec.rows)
    Y = Y.astype(theta0.dtype)

    def estimator(theta):
        d = (theta - theta0) / sigma
        if spec.noise.kind == "gumbel":
            logw = _event_sum(d, nb)[None] - _event_sum(S * jnp.expm1(d)[None], nb + 1)
        elif spec.noise.kind == "normal":
            logw = _event_sum(S * d[None], nb + 1) - 0.5 * _event_sum(d * d, nb)[None]
        else:
            lp = spec.noise.obj.log_prob
            logw = _event_sum(lp(S - d[None]) - lp(S), nb + 1)
        w = jnp.exp(logw)
        w = w.reshape(w.shape + (1,) * (Y.ndim - 1 - nb))
        out = jnp.sum(w * Y[:N], axis=0) / N
        if spec.control_variate:
            out = out + Y[N] * (1 - jnp.mean(w, axis=0))
        return out

    return estimator
