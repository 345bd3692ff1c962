"""Calling a user's or a built-in solver from jax code: batched or one instance at a time.

Contract: ``resolve_batched`` decides once per instance shape whether a solver takes
leading batch axes (built-ins say so; a user's solver is probed with three concrete random
instances, stacked versus alone), and ``call_solver`` then calls it once on the stacked
array or vmaps it.  Depends on ``_combinatorial_common`` only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._combinatorial_common import decide_batched_outputs, validated_inputs


def resolve_batched(solver, batched, cache: dict, theta, nb: int) -> bool:
    """``batched`` if given, else probe: does solver map (3, *instance) row by row?

    ``theta`` is an array whose first ``nb`` axes are batch axes, or a pytree (nb = 0)
    that is one instance.  The result is cached in ``cache`` per instance shapes/dtypes.
    """
    if batched is not None:
        return batched
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    inst = tuple((tuple(leaf.shape[nb:]), str(leaf.dtype)) for leaf in leaves)
    key = ("jax", treedef, inst)
    if key not in cache:
        rng = np.random.default_rng(0)
        with jax.ensure_compile_time_eval():
            stack = [jnp.asarray(rng.standard_normal((3,) + s), dtype=d) for s, d in inst]

            def flat_out(out, lead):
                ys = jax.tree_util.tree_leaves(out)
                if lead and any(np.ndim(y) < 1 or np.shape(y)[0] != 3 for y in ys):
                    return np.zeros((0,))
                parts = [np.asarray(y, np.float64).reshape((3, -1) if lead else (-1,))
                         for y in ys]
                return np.concatenate(parts, axis=-1)

            def attempt(args, lead):
                try:
                    with validated_inputs():
                        out = solver(jax.tree_util.tree_unflatten(treedef, args))
                    return flat_out(out, lead)
                except Exception:  # noqa: BLE001 - any failure means "not this convention"
                    return None

            stacked = attempt(stack, True)
            each = [attempt([a[j] for a in stack], False) for j in range(3)]
        cache[key] = decide_batched_outputs(stacked, each)
    return cache[key]


def call_solver(solver, x, *, nlead: int, batched: bool):
    """solver on x (array or pytree) whose first ``nlead`` axes are leading (batch) axes."""
    with validated_inputs():
        if batched:
            return solver(x)
        leaves = jax.tree_util.tree_leaves(x)
        lead = tuple(leaves[0].shape[:nlead])
        flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[nlead:]), x)
        out = jax.vmap(solver)(flat)
        return jax.tree_util.tree_map(lambda y: y.reshape(lead + y.shape[1:]), out)
