"""jnp implementation of the grid shortest path (jit/vmap friendly, runs on the accelerator).

Same algorithm and tie-breaking as the numpy/torch one in ``_combinatorial``: Bellman-Ford
min-plus relaxation until a fixed point, vertex counts along tight edges, trace-back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._combinatorial import _SHIFTS


def _shift(a, dy, dx, fill):
    H, W = a.shape[-2], a.shape[-1]
    padded = jnp.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return lax.dynamic_slice_in_dim(
        lax.dynamic_slice_in_dim(padded, 1 + dy, H, axis=1), 1 + dx, W, axis=2)


def _relax_to_fixed_point(x0, step, limit):
    def cond(state):
        i, x, changed = state
        return changed & (i < limit)

    def body(state):
        i, x, _ = state
        new = step(x)
        return i + 1, new, jnp.any(new != x)

    _, x, _ = lax.while_loop(cond, body, (0, x0, jnp.array(True)))
    return x


@jax.jit
def shortest_path_jax(costs):
    batch = costs.shape[:-2]
    H, W = costs.shape[-2], costs.shape[-1]
    c = jnp.maximum(lax.stop_gradient(costs), 0).reshape((-1, H, W))
    B = c.shape[0]
    inf = jnp.array(jnp.inf, c.dtype)
    limit = H * W

    D0 = jnp.full_like(c, inf).at[:, 0, 0].set(c[:, 0, 0])

    def relax_d(D):
        best = _shift(D, *_SHIFTS[0], inf)
        for dy, dx in _SHIFTS[1:]:
            best = jnp.minimum(best, _shift(D, dy, dx, inf))
        return jnp.minimum(D, c + best)

    D = _relax_to_fixed_point(D0, relax_d, limit)
    tight = [(c + _shift(D, dy, dx, inf)) == D for dy, dx in _SHIFTS]

    h0 = jnp.full_like(c, inf).at[:, 0, 0].set(0)

    def relax_h(h):
        best = jnp.where(tight[0], _shift(h, *_SHIFTS[0], inf), inf)
        for k in range(1, len(_SHIFTS)):
            best = jnp.minimum(best, jnp.where(tight[k], _shift(h, *_SHIFTS[k], inf), inf))
        return jnp.minimum(h, best + 1)

    hops = _relax_to_fixed_point(h0, relax_h, limit)

    # As in the numpy/torch path: hop counts decide only in problems with a plateau (a
    # tight edge that does not lower the distance); elsewhere the first tight edge does.
    plateau = jnp.zeros((B,), bool)
    for k, (dy, dx) in enumerate(_SHIFTS):
        plateau = plateau | jnp.any(tight[k] & (_shift(D, dy, dx, inf) >= D), axis=(1, 2))
    plateau = plateau[:, None, None]
    pred = jnp.zeros(c.shape, jnp.int32)
    found = jnp.zeros(c.shape, bool)
    for k, (dy, dx) in enumerate(_SHIFTS):
        hop_ok = _shift(hops, dy, dx, inf) == hops - 1
        ok = tight[k] & jnp.where(plateau, hop_ok, True) & ~found
        pred = jnp.where(ok, k, pred)
        found = found | ok

    flat_pred = pred.reshape((B, H * W))
    offsets = jnp.array([dy * W + dx for dy, dx in _SHIFTS], jnp.int32)
    rows = jnp.arange(B)
    cur = jnp.full((B,), H * W - 1, jnp.int32)
    mask = jnp.zeros((B, H * W), c.dtype).at[rows, cur].set(1)

    # Follow predecessors until every problem is back at the start (flat index 0); the
    # H*W bound only matters for NaN problems, which are masked below.
    def cond(state):
        t, cur, _ = state
        return jnp.any(cur != 0) & (t < H * W)

    def body(state):
        t, cur, mask = state
        k = flat_pred[rows, cur]
        cur = jnp.where(cur != 0, cur + offsets[k], cur)
        return t + 1, cur, mask.at[rows, cur].set(1)

    _, _, mask = lax.while_loop(cond, body, (0, cur, mask))
    # Under jit the NaN check in shortest_path_grid cannot run; mark such problems NaN
    # instead of returning a meaningless path.
    bad = jnp.isnan(c).any(axis=(1, 2))
    mask = jnp.where(bad[:, None], jnp.nan, mask)
    return mask.reshape(batch + (H, W))
