"""jnp implementations of the grid shortest paths (jit/vmap friendly, run on the accelerator).

Same algorithms and tie-breaking as the numpy/torch ones in ``_combinatorial``: for vertex
costs, Bellman-Ford min-plus relaxation until a fixed point, vertex counts along tight
edges, trace-back; for edge costs, dynamic programming over anti-diagonals and trace-back.
Imports only ``_combinatorial_common`` and, lazily, the framework-free index plan.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._combinatorial_common import GRID_SHIFTS as _SHIFTS


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


@functools.partial(jax.jit, static_argnums=1)
def edge_shortest_path_jax(costs, grid):
    from ._combinatorial import edge_path_plan

    H, W = grid
    E, diagonals, (left_edge_of, up_edge_of, left_pred, up_pred) = edge_path_plan(grid)
    batch = costs.shape[:-1]
    c = lax.stop_gradient(costs).reshape((-1, E))
    B = c.shape[0]
    cp = jnp.concatenate([c, jnp.full((B, 1), jnp.inf, c.dtype)], axis=1)
    D = jnp.full((B, H * W), jnp.inf, c.dtype).at[:, 0].set(0)
    from_left = jnp.zeros((B, H * W), bool)
    for nodes, le, ue, ln, un in diagonals:
        via_left = D[:, ln] + cp[:, le]
        via_up = D[:, un] + cp[:, ue]
        take_left = via_left <= via_up
        D = D.at[:, nodes].set(jnp.where(take_left, via_left, via_up))
        from_left = from_left.at[:, nodes].set(take_left)
    out = jnp.zeros((B, E + 1), c.dtype)
    cur = jnp.full((B,), H * W - 1, jnp.int32)
    rows = jnp.arange(B)
    le_t, ue_t = jnp.asarray(left_edge_of, jnp.int32), jnp.asarray(up_edge_of, jnp.int32)
    lp_t, up_t = jnp.asarray(left_pred, jnp.int32), jnp.asarray(up_pred, jnp.int32)
    for _ in range(H + W - 2):
        fl = from_left[rows, cur]
        out = out.at[rows, jnp.where(fl, le_t[cur], ue_t[cur])].set(1)
        cur = jnp.where(fl, lp_t[cur], up_t[cur])
    out = out[:, :E]
    # Under jit the NaN check cannot run; mark such problems NaN instead of a meaningless path.
    bad = ~jnp.isfinite(c).all(axis=1)
    out = jnp.where(bad[:, None], jnp.nan, out)
    return out.reshape(batch + (E,))
