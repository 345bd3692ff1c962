"""Batched combinatorial solvers: the piecewise-constant maps the perturbed, identity and
blackbox layers wrap.

Each solver takes an array with leading batch axes (numpy, torch or jax) and returns
the same kind of array, on the same device, in the input's floating dtype, so that its
outputs can be averaged.  Each carries two attributes the layers read:

- ``event_ndim``: how many trailing axes form one problem (1 for vectors, 2 for grids
  and cost matrices);
- ``sense``: ``"max"`` when the solver returns argmax_y <y, theta> over its feasible
  set, ``"min"`` when it returns the argmin (shortest paths, assignments).

- ``batched``: True: the solver takes leading batch axes (the perturbed, surrogate and
  SPO+ layers call it once on the stacked problems and never probe it).

Ties are broken deterministically and identically in every framework (lowest index
first), so the three back ends return the same answer on the same input.  Under
``torch.compile`` the solvers with data-dependent loops or host calls (shortest paths,
assignment) run as an opaque custom operator, so a compiled graph does not break on them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nonsmooth import _layer_hook

from ._combinatorial_common import GRID_SHIFTS as _SHIFTS
from ._combinatorial_common import check_array, framework_of


def _solver(event_ndim: int, sense: str):
    def mark(fn):
        fn.event_ndim = event_ndim
        fn.sense = sense
        fn.batched = True
        return fn

    return mark


# ----------------------------------------------------------------------------- argmax


@_solver(1, "max")
def argmax_onehot(theta):
    """One-hot vector of the largest entry along the last axis (first index on ties).

    It is argmax_y <y, theta> over the simplex's vertices.

    Example:
        >>> import numpy as np
        >>> argmax_onehot(np.array([[0.1, 2.0, -1.0]]))
        array([[0., 1., 0.]])
    """
    fw = check_array(theta, "theta", event_ndim=1)
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("solver", theta, solver=argmax_onehot)
    if fw == "torch":
        import torch

        idx = theta.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(theta).scatter_(-1, idx, 1.0)
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        return jax.nn.one_hot(jnp.argmax(theta, axis=-1), theta.shape[-1], dtype=theta.dtype)
    idx = np.argmax(theta, axis=-1)[..., None]
    out = np.zeros_like(theta)
    np.put_along_axis(out, idx, 1.0, axis=-1)
    return out


# ----------------------------------------------------------------------------- top-k


@dataclasses.dataclass(frozen=True)
class TopK:
    """The solver returned by :func:`topk_mask`: 0/1 mask of the k largest entries."""

    k: int
    event_ndim = 1
    sense = "max"
    batched = True

    def __call__(self, theta):
        fw = check_array(theta, "theta", event_ndim=1)
        n = theta.shape[-1]
        if self.k > n:
            raise ValueError(f"topk_mask(k={self.k}) needs at least k entries on the last axis, "
                             f"got shape {tuple(theta.shape)}")
        if _layer_hook.active():  # the audit engine is tracing f: one node it understands
            return _layer_hook.route("solver", theta, solver=self)
        if fw == "torch":
            return _topk_torch(theta, self.k)
        if fw == "jax":
            import jax
            import jax.numpy as jnp

            # lax.top_k returns the lower index first among equal values.  Scattering
            # the indices is twice as fast as summing k one-hot rows.
            _, idx = jax.lax.top_k(theta, self.k)
            return jnp.put_along_axis(jnp.zeros_like(theta), idx, 1.0, axis=-1, inplace=False)
        idx = np.argsort(-theta, axis=-1, kind="stable")[..., : self.k]
        out = np.zeros_like(theta)
        np.put_along_axis(out, idx, 1.0, axis=-1)
        return out


def _topk_torch(theta, k):
    import torch

    n = theta.shape[-1]
    if k == n:
        return torch.ones_like(theta)
    # Fast path: when the k-th and (k+1)-th largest differ in every row the top-k set is
    # unique and torch.topk's (arbitrary) tie order cannot matter.
    values, idx = torch.topk(theta, k + 1, dim=-1)
    if bool((values[..., k - 1] > values[..., k]).all()):
        return torch.zeros_like(theta).scatter_(-1, idx[..., :k], 1.0)
    # Ties at the boundary: rebuild the mask from the k-th value so equal entries are
    # taken lowest index first, as in numpy and jax.
    kth = values[..., k - 1: k]
    above = theta > kth
    equal = theta == kth
    room = k - above.sum(dim=-1, keepdim=True)
    take = equal & (torch.cumsum(equal, dim=-1) <= room)
    return (above | take).to(theta.dtype)


def topk_mask(k: int) -> TopK:
    """Solver returning the 0/1 mask of the ``k`` largest entries of the last axis.

    It is argmax_y <y, theta> over {y in {0,1}^n : sum(y) = k}; equal entries are taken
    lowest index first.

    Example:
        >>> import numpy as np
        >>> topk_mask(2)(np.array([3.0, 1.0, 2.0]))
        array([1., 0., 1.])
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return TopK(int(k))


# ----------------------------------------------------------------------------- sorting


@_solver(1, "max")
def hard_rank(theta):
    """Ascending ranks 1..n along the last axis (rank 1 = smallest; ties: lower index first).

    It is argmax_y <y, theta> over the permutations of (1, ..., n), the hard limit of
    ``soft_rank``; returned in theta's dtype so that perturbed averages are meaningful.

    Example:
        >>> import numpy as np
        >>> hard_rank(np.array([0.3, -1.0, 2.0]))
        array([2., 1., 3.])
    """
    fw = check_array(theta, "theta", event_ndim=1)
    n = theta.shape[-1]
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("solver", theta, solver=hard_rank)
    if fw == "torch":
        import torch

        order = torch.sort(theta, dim=-1, stable=True).indices
        ranks = torch.arange(1, n + 1, dtype=theta.dtype, device=theta.device).expand_as(theta)
        return torch.empty_like(theta).scatter_(-1, order, ranks)
    if fw == "jax":
        import jax.numpy as jnp

        order = jnp.argsort(theta, axis=-1, stable=True)
        return (jnp.argsort(order, axis=-1) + 1).astype(theta.dtype)
    order = np.argsort(theta, axis=-1, kind="stable")
    out = np.empty_like(theta)
    np.put_along_axis(out, order, np.broadcast_to(np.arange(1, n + 1, dtype=theta.dtype),
                                                  theta.shape), axis=-1)
    return out


@_solver(1, "max")
def sort_permutation(theta):
    """Permutation matrix P (..., n, n) that sorts the last axis ascending: P @ theta is sorted.

    ``P[..., i, j] = 1`` when theta[j] is the (i+1)-th smallest entry (ties: lower
    index first).  It maximizes <P, w theta^T> with w = (1, ..., n).

    Example:
        >>> import numpy as np
        >>> P = sort_permutation(np.array([0.3, -1.0, 2.0]))
        >>> P @ np.array([0.3, -1.0, 2.0])
        array([-1. ,  0.3,  2. ])
    """
    fw = check_array(theta, "theta", event_ndim=1)
    n = theta.shape[-1]
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("solver", theta, solver=sort_permutation)
    if fw == "torch":
        import torch

        order = torch.sort(theta, dim=-1, stable=True).indices
        out = theta.new_zeros(theta.shape + (n,))
        return out.scatter_(-1, order.unsqueeze(-1), 1.0)
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        order = jnp.argsort(theta, axis=-1, stable=True)
        return jax.nn.one_hot(order, n, dtype=theta.dtype)
    order = np.argsort(theta, axis=-1, kind="stable")
    out = np.zeros(theta.shape + (n,), dtype=theta.dtype)
    np.put_along_axis(out, order[..., None], 1.0, axis=-1)
    return out


# ----------------------------------------------------------------------------- shortest path


@_solver(2, "min")
def shortest_path_grid(costs):
    """Cheapest top-left to bottom-right path on a vertex-weighted grid with 8-neighbour moves.

    ``costs`` has shape (..., H, W).  A path's cost is the sum of the costs of the
    vertices it visits, *both ends included* (the Warcraft convention).  The result is
    the path as a 0/1 mask of shape (..., H, W) in costs' dtype.

    Negative costs would make the cheapest walk unbounded (step back and forth), so
    costs are clipped at 0 first; this matters for perturbed costs.  Among equally
    cheap paths a fixed neighbour order decides, the same in every framework; where
    zero costs make plateaus of equal distance, the path with fewest vertices is taken
    so the trace-back cannot cycle.

    Algorithm: min-plus Bellman-Ford relaxation over the 8 grid shifts, vectorized over
    the batch until no distance changes (runs on the GPU for torch/jax inputs), a
    second relaxation for the number of vertices on tight edges, then one gather per
    path step to trace the path back.

    Example:
        >>> import numpy as np
        >>> c = np.ones((3, 3)); c[1, 1] = 9.0
        >>> shortest_path_grid(c)
        array([[1., 1., 0.],
               [0., 0., 1.],
               [0., 0., 1.]])
    """
    fw = check_array(costs, "costs", event_ndim=2)
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("solver", costs, solver=shortest_path_grid)
    if fw == "jax":
        from ._combinatorial_jax import shortest_path_jax

        return shortest_path_jax(costs)
    if fw == "torch" and _compiling():
        from ._torch_ops import solve_compiled

        return solve_compiled(shortest_path_grid, costs)
    return _shortest_path_eager(costs, fw)


def _compiling() -> bool:
    from ._combinatorial_common import torch_compiling

    return torch_compiling()


class _Eager:
    """The handful of in-place array operations the eager solver needs, for numpy or torch."""

    def __init__(self, fw):
        if fw == "torch":
            import torch

            self.full = lambda shape, v, like: torch.full(shape, v, dtype=like.dtype,
                                                          device=like.device)
            self.minimum = lambda a, b, out: torch.minimum(a, b, out=out)
            self.add = lambda a, b, out: torch.add(a, b, out=out)
            self.where = torch.where
            self.equal = torch.equal
            self.copy = lambda dst, src: dst.copy_(src)
            self.batch_last = lambda a: a.permute(1, 2, 0).contiguous()
            self.batch_first = lambda a: a.permute(2, 0, 1)
            self.nonzero = lambda a: torch.nonzero(a, as_tuple=True)
        else:
            self.full = lambda shape, v, like: np.full(shape, v, dtype=like.dtype)
            self.minimum = lambda a, b, out: np.minimum(a, b, out=out)
            self.add = lambda a, b, out: np.add(a, b, out=out)
            self.where = np.where
            self.equal = np.array_equal
            self.copy = lambda dst, src: np.copyto(dst, src)
            self.batch_last = lambda a: np.ascontiguousarray(np.moveaxis(a, 0, -1))
            self.batch_first = lambda a: np.moveaxis(a, -1, 0)
            self.nonzero = np.nonzero


def _shortest_path_eager(costs, fw):
    """Shared numpy/torch implementation.

    Layout (H, W, batch) with an inf border: every neighbour shift is then a plain
    view of the padded buffer and each relaxation touches contiguous batch rows.
    """
    ops = _Eager(fw)
    if fw == "torch":
        import torch

        c = torch.clamp(costs.detach(), min=0)
    else:
        c = np.maximum(costs, 0)
    batch = c.shape[:-2]
    H, W = c.shape[-2], c.shape[-1]
    c = ops.batch_last(c.reshape((-1, H, W)))
    B = c.shape[-1]
    inf = float("inf")

    def views(padded):
        return [padded[1 + dy: 1 + dy + H, 1 + dx: 1 + dx + W] for dy, dx in _SHIFTS]

    def relax(padded, candidates, extra):
        """Fixed point of x <- min(x, extra(min_k candidates_k)) on the padded interior."""
        x = padded[1:-1, 1:-1]
        best = ops.full((H, W, B), inf, c)
        for _ in range(H * W):
            ops.copy(best, candidates[0])
            for cand in candidates[1:]:
                ops.minimum(best, cand, best)
            best = extra(best)
            ops.minimum(best, x, best)
            if ops.equal(best, x):
                break
            ops.copy(x, best)

    # Distances: D[v] = cost of the cheapest path start -> v, both ends included.
    Dp = ops.full((H + 2, W + 2, B), inf, c)
    Dp[1, 1] = c[0, 0]
    # In-place adds: fresh 10-100 MB temporaries per step cost more than the arithmetic.
    relax(Dp, views(Dp), lambda best: ops.add(best, c, best))
    D = Dp[1:-1, 1:-1]

    # Tight edges u -> v lie on some cheapest path; count vertices along them so the
    # trace-back strictly decreases and cannot loop on zero-cost plateaus.
    Dv = views(Dp)
    buf = ops.full((H, W, B), 0, c)
    tight = [ops.add(c, v, buf) == D for v in Dv]
    # Along a tight edge the distance usually drops strictly, and then following any
    # tight edge back reaches the start.  Zero costs (or costs below the distance's
    # rounding) make plateaus where it does not; only then count vertices along tight
    # edges, so the trace-back strictly decreases that count instead.
    plateau = tight[0] & (Dv[0] >= D)
    for t, v in zip(tight[1:], Dv[1:]):
        plateau = plateau | (t & (v >= D))
    plateau = plateau.reshape((H * W, B)).any(0)
    usable = tight
    if bool(plateau.any()):
        # Only the problems with a plateau pay for the second relaxation.
        (idx,) = ops.nonzero(plateau)
        sub_tight = [t[..., idx] for t in tight]
        nb = int(idx.shape[0])
        hp = ops.full((H + 2, W + 2, nb), inf, c)
        hp[1, 1] = 0
        hviews = views(hp)
        hops = hp[1:-1, 1:-1]
        for _ in range(H * W):
            best = ops.where(sub_tight[0], hviews[0], inf)
            for k in range(1, len(_SHIFTS)):
                best = ops.minimum(best, ops.where(sub_tight[k], hviews[k], inf), None)
            best = ops.minimum(best + 1, hops, None)
            if ops.equal(best, hops):
                break
            ops.copy(hops, best)
        usable = [t.copy() if fw == "numpy" else t.clone() for t in tight]
        for k in range(len(_SHIFTS)):
            usable[k][..., idx] = sub_tight[k] & (hviews[k] == hops - 1)

    # Predecessor direction of each vertex: the first usable neighbour.
    pred = ops.full((H, W, B), len(_SHIFTS) - 1, c)
    for k in range(len(_SHIFTS) - 2, -1, -1):
        pred = ops.where(usable[k], k, pred)
    B = c.shape[-1]
    flat_pred = ops.batch_first(pred).reshape((B, H * W))
    mask = ops.full((B, H * W), 0, c)
    offsets = [dy * W + dx for dy, dx in _SHIFTS]
    if fw == "torch":
        import torch

        flat_pred = flat_pred.long()
        offsets_t = torch.tensor(offsets, device=c.device)
        cur = torch.full((B, 1), H * W - 1, device=c.device, dtype=torch.long)
        mask.scatter_(1, cur, 1.0)
        for _ in range(H * W):
            active = cur != 0
            if not bool(active.any()):
                break
            k = torch.gather(flat_pred, 1, cur)
            cur = torch.where(active, cur + offsets_t[k], cur)
            mask.scatter_(1, cur, 1.0)
    else:
        flat_pred = flat_pred.astype(np.int64)
        offsets_a = np.asarray(offsets)
        cur = np.full((B, 1), H * W - 1, dtype=np.int64)
        np.put_along_axis(mask, cur, 1.0, axis=1)
        for _ in range(H * W):
            active = cur != 0
            if not active.any():
                break
            k = np.take_along_axis(flat_pred, cur, axis=1)
            cur = np.where(active, cur + offsets_a[k], cur)
            np.put_along_axis(mask, cur, 1.0, axis=1)
    return mask.reshape(batch + (H, W))


# ----------------------------------------------------------------------------- assignment


def _assignment_numpy(cost: np.ndarray, maximize: bool) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    n, m = cost.shape[-2], cost.shape[-1]
    flat = cost.reshape((-1, n, m))
    out = np.zeros(flat.shape, dtype=cost.dtype)
    for b in range(flat.shape[0]):
        rows, cols = linear_sum_assignment(flat[b], maximize=maximize)
        out[b, rows, cols] = 1.0
    return out.reshape(cost.shape)


@_solver(2, "min")
def linear_assignment(cost, *, maximize: bool = False):
    """0/1 matrix of the cheapest assignment of rows to columns, per batch element.

    ``cost`` has shape (..., n, m); with n <= m every row gets one column (rectangular
    problems as in SciPy).  Solved by ``scipy.optimize.linear_sum_assignment`` on the
    CPU: torch tensors on another device make a host round trip, jax arrays go through
    ``jax.pure_callback`` (works under jit and vmap).  ``maximize=True`` maximizes instead.

    Example:
        >>> import numpy as np
        >>> linear_assignment(np.array([[4.0, 1.0], [2.0, 3.0]]))
        array([[0., 1.],
               [1., 0.]])
    """
    fw = check_array(cost, "cost", event_ndim=2)
    maximize = bool(maximize)
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("solver", cost, solver=linear_assignment, maximize=maximize)
    if fw == "torch":
        import torch

        if _compiling():
            from ._torch_ops import solve_compiled

            return solve_compiled(_assignment_max if maximize else linear_assignment, cost)
        # float64 on the host: NumPy has no bfloat16, and SciPy solves in float64 anyway.
        host = cost.detach().to("cpu", torch.float64).numpy()
        out = _assignment_numpy(host, maximize)
        return torch.from_numpy(out).to(device=cost.device, dtype=cost.dtype)
    if fw == "jax":
        import jax

        shape = jax.ShapeDtypeStruct(cost.shape, cost.dtype)
        return jax.pure_callback(lambda c: _assignment_numpy(np.asarray(c), maximize),
                                 shape, cost, vmap_method="expand_dims")
    return _assignment_numpy(cost, maximize)


@_solver(2, "max")
def _assignment_max(cost):
    return linear_assignment(cost, maximize=True)


# ----------------------------------------------------------------------------- edge shortest path


@dataclasses.dataclass(frozen=True)
class EdgeShortestPath:
    """The solver returned by :func:`shortest_path_edges` (PyEPO's grid shortest path)."""

    grid: tuple
    event_ndim = 1
    sense = "min"
    batched = True

    @property
    def num_edges(self) -> int:
        H, W = self.grid
        return H * (W - 1) + (H - 1) * W

    @property
    def arcs(self) -> list:
        """(tail, head) node pairs in cost order; node (i, j) is numbered i * W + j."""
        H, W = self.grid
        arcs = []
        for i in range(H):
            arcs += [(i * W + j, i * W + j + 1) for j in range(W - 1)]
            if i < H - 1:
                arcs += [(i * W + j, (i + 1) * W + j) for j in range(W)]
        return arcs

    def __call__(self, costs):
        fw = check_array(costs, "costs", event_ndim=1)
        if costs.shape[-1] != self.num_edges:
            raise ValueError(
                f"shortest_path_edges(grid={self.grid}) needs {self.num_edges} edge costs on the "
                f"last axis (PyEPO's arc order: see .arcs), got shape {tuple(costs.shape)}")
        if _layer_hook.active():  # the audit engine is tracing f: one node it understands
            return _layer_hook.route("solver", costs, solver=self)
        if fw == "jax":
            from ._combinatorial_jax import edge_shortest_path_jax

            return edge_shortest_path_jax(costs, self.grid)
        if fw == "torch" and _compiling():
            from ._torch_ops import solve_compiled

            return solve_compiled(self, costs)
        return _edge_path_eager(costs, self.grid, fw)


def shortest_path_edges(grid) -> EdgeShortestPath:
    """Solver: cheapest path on an H x W grid with *edge* costs, as in PyEPO.

    Nodes are the grid points, numbered i * W + j; arcs go right ((i, j) -> (i, j+1)) and
    down ((i, j) -> (i+1, j)), listed row by row, each row's right arcs before its down
    arcs (PyEPO's ``shortestPathModel`` order; ``.arcs`` lists them).  The path runs from
    the top-left node to the bottom-right one.  ``costs`` has shape (..., num_edges); the
    result is the 0/1 indicator of the path's arcs in costs' dtype.  The graph is acyclic,
    so negative costs are fine (no clipping).  Ties: the path enters a node from the left
    when both ways cost the same, identically in numpy, torch and jax.

    Algorithm: dynamic programming over the anti-diagonals, vectorized over the batch, then
    an H + W - 2 step trace-back (every path has exactly that many arcs).

    Example:
        >>> import numpy as np
        >>> sp = shortest_path_edges((2, 2))      # arcs: 0->1, 0->2, 1->3, 2->3
        >>> sp(np.array([1.0, 5.0, 1.0, 1.0]))
        array([1., 0., 1., 0.])
    """
    try:
        H, W = (int(g) for g in grid)
        ok = all(float(g) == int(g) for g in grid) and H >= 1 and W >= 1 and H * W >= 2
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"grid must be two positive ints (rows, cols) with at least 2 nodes, "
                         f"got {grid!r}")
    return EdgeShortestPath((H, W))


def edge_index_maps(grid):
    """(right, down): arrays with the edge index of arc (i, j)->(i, j+1) and
    (i, j)->(i+1, j); -1 where there is no such arc."""
    H, W = grid
    right = np.full((H, W), -1, dtype=np.int64)
    down = np.full((H, W), -1, dtype=np.int64)
    e = 0
    for i in range(H):
        for j in range(W - 1):
            right[i, j] = e
            e += 1
        if i < H - 1:
            for j in range(W):
                down[i, j] = e
                e += 1
    return right, down


def edge_path_plan(grid):
    """Index arrays for the DP (shared by the eager and the jax implementations).

    For every node v = (i, j) other than the start: the edge entering from the left
    (right[i, j-1]) and from above (down[i-1, j]), or the sentinel E (a cost of +inf) when
    there is none, and the predecessor node on each side; nodes grouped by anti-diagonal.
    """
    H, W = grid
    right, down = edge_index_maps(grid)
    E = H * (W - 1) + (H - 1) * W
    diagonals = []
    for k in range(1, H + W - 1):
        ii = np.arange(max(0, k - W + 1), min(k, H - 1) + 1)
        jj = k - ii
        nodes = ii * W + jj
        left_edge = np.where(jj > 0, right[ii, np.maximum(jj - 1, 0)], E)
        up_edge = np.where(ii > 0, down[np.maximum(ii - 1, 0), jj], E)
        left_node = np.where(jj > 0, nodes - 1, 0)
        up_node = np.where(ii > 0, nodes - W, 0)
        diagonals.append((nodes, left_edge, up_edge, left_node, up_node))
    # Trace-back tables per node: the edge and predecessor for "came from the left" / "above".
    n = H * W
    left_edge_of = np.full(n, E, np.int64)
    up_edge_of = np.full(n, E, np.int64)
    left_pred = np.zeros(n, np.int64)
    up_pred = np.zeros(n, np.int64)
    for nodes, le, ue, ln, un in diagonals:
        left_edge_of[nodes], up_edge_of[nodes] = le, ue
        left_pred[nodes], up_pred[nodes] = ln, un
    return E, diagonals, (left_edge_of, up_edge_of, left_pred, up_pred)


def _edge_path_eager(costs, grid, fw):
    H, W = grid
    E, diagonals, (left_edge_of, up_edge_of, left_pred, up_pred) = edge_path_plan(grid)
    batch = tuple(costs.shape[:-1])
    if fw == "torch":
        import torch

        c = costs.detach().reshape(-1, E)
        B = c.shape[0]
        dev = c.device
        cp = torch.cat([c, c.new_full((B, 1), float("inf"))], dim=1)
        D = c.new_full((B, H * W), float("inf"))
        D[:, 0] = 0
        from_left = torch.zeros((B, H * W), dtype=torch.bool, device=dev)
        t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
        for nodes, le, ue, ln, un in diagonals:
            nodes, le, ue, ln, un = map(t, (nodes, le, ue, ln, un))
            via_left = D[:, ln] + cp[:, le]
            via_up = D[:, un] + cp[:, ue]
            take_left = via_left <= via_up
            D[:, nodes] = torch.where(take_left, via_left, via_up)
            from_left[:, nodes] = take_left
        out = c.new_zeros((B, E + 1))
        cur = torch.full((B,), H * W - 1, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)
        le_t, ue_t, lp_t, up_t = map(t, (left_edge_of, up_edge_of, left_pred, up_pred))
        for _ in range(H + W - 2):
            fl = from_left[rows, cur]
            out[rows, torch.where(fl, le_t[cur], ue_t[cur])] = 1
            cur = torch.where(fl, lp_t[cur], up_t[cur])
        return out[:, :E].reshape(batch + (E,))
    c = np.asarray(costs).reshape(-1, E)
    B = c.shape[0]
    cp = np.concatenate([c, np.full((B, 1), np.inf, dtype=c.dtype)], axis=1)
    D = np.full((B, H * W), np.inf, dtype=c.dtype)
    D[:, 0] = 0
    from_left = np.zeros((B, H * W), dtype=bool)
    for nodes, le, ue, ln, un in diagonals:
        via_left = D[:, ln] + cp[:, le]
        via_up = D[:, un] + cp[:, ue]
        take_left = via_left <= via_up
        D[:, nodes] = np.where(take_left, via_left, via_up)
        from_left[:, nodes] = take_left
    out = np.zeros((B, E + 1), dtype=c.dtype)
    cur = np.full(B, H * W - 1, dtype=np.int64)
    rows = np.arange(B)
    for _ in range(H + W - 2):
        fl = from_left[rows, cur]
        out[rows, np.where(fl, left_edge_of[cur], up_edge_of[cur])] = 1
        cur = np.where(fl, left_pred[cur], up_pred[cur])
    return out[:, :E].reshape(batch + (E,))
