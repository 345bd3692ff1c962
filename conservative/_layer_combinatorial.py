"""The package's hard combinatorial solvers, and the surrogate backward layers around them,
as engine primitives.

Each solver returns an optimum of a linear objective ``<y, theta>`` over a finite set (max
for ``argmax_onehot``, ``topk_mask``, ``hard_rank``, ``sort_permutation``; min for the
shortest paths and the assignment, max for the assignment with ``maximize=True``).  It is
piecewise constant: off ties its Jacobian is 0.  At a tie the optimal set has several
elements; each is an option whose conditions make it the unique optimum nearby (linear in
theta, so exact), and whose value is that solution.  Different values make the engine's
continuity check find the jump (``NOT_LIPSCHITZ``).  Orderings (ranks, permutations) get
one site per tied group, with the chain of strict inequalities of each ordering.

The surrogate layers (``identity_backward``, ``blackbox_backward``) compute the solver in
the forward pass; their backward pass is, by design, not a derivative of it.  The engine
analyses the forward function (the solver's spec) and :func:`~._layers.finish` says that
AD there is a surrogate.
"""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from . import _layers as L
from ._rule_impls import Option, permutation_options

MAX_SOLUTIONS = 256  # optimal solutions of one problem enumerated before sampling stops
MAX_BRUTE_FORCE = 50_000  # assignments checked one by one


def _solvers():
    from nonsmooth.solvers import _combinatorial as C

    return C


def solver_label(solver, maximize=False) -> str:
    C = _solvers()
    if isinstance(solver, C.TopK):
        return f"topk_mask(k={solver.k})"
    if isinstance(solver, C.EdgeShortestPath):
        return f"shortest_path_edges(grid={solver.grid})"
    if solver is C.linear_assignment and maximize:
        return "linear_assignment(maximize=True)"
    if solver is C._assignment_max:
        return "linear_assignment(maximize=True)"
    return getattr(solver, "__name__", None) or type(solver).__name__


def known(solver) -> bool:
    C = _solvers()
    return (solver in (C.argmax_onehot, C.hard_rank, C.sort_permutation, C.shortest_path_grid,
                       C.linear_assignment, C._assignment_max)
            or isinstance(solver, (C.TopK, C.EdgeShortestPath)))


def route_solver(theta, *, solver, maximize=False):
    spec = SolverSpec(solver, bool(maximize))
    return spec, [theta], lambda outs: outs[0]


def _framework_call(solver, theta, framework):
    """A solver the engine does not know, called on its own framework's arrays (float64)."""
    if framework == "torch":
        import torch

        return np.asarray(solver(torch.from_numpy(theta)).detach().cpu().numpy(), dtype=np.float64)
    import jax

    with jax.enable_x64(True):
        return np.asarray(solver(jax.numpy.asarray(theta)), dtype=np.float64)


class SolverSpec(L.LayerSpec):
    kind = "piecewise"
    batchable = True  # acts on trailing axes: a vmapped axis is one more leading axis

    def __init__(self, solver, maximize: bool = False):
        C = _solvers()
        if solver is C._assignment_max:
            solver, maximize = C.linear_assignment, True
        self.solver, self.maximize = solver, maximize
        self.name = solver_label(solver, maximize)
        self.event_ndim = solver.event_ndim
        self.sense = "max" if (maximize or solver.sense == "max") else "min"
        self.rule = L.layer_rule("layer:solver", piecewise_affine=True,
                                 description="a combinatorial solver: piecewise constant, jumps at ties")
        if not known(solver):
            self.unsupported = f"{self.name} (a solver the engine does not know the tie sets of)"

    def key(self):
        return ("solver", self.solver, self.maximize)

    def describe(self):
        return self.name

    def out_meta(self, metas):
        shape, dt = metas[0]
        if self.solver is _solvers().sort_permutation:
            shape = tuple(shape) + (shape[-1],)
        return [(tuple(shape), dt)]

    def _call(self, theta):
        C = _solvers()
        if not known(self.solver):
            return _framework_call(self.solver, theta, getattr(self, "framework", "torch"))
        if self.solver is C.linear_assignment:
            return np.asarray(C.linear_assignment(theta, maximize=self.maximize), dtype=np.float64)
        return np.asarray(self.solver(theta), dtype=np.float64)

    def forward(self, xs):
        return [self._call(np.asarray(xs[0], dtype=np.float64))]

    # ------------------------------------------------------------------ ties

    def sites(self, node_i, xs, tol, int_used):
        C = _solvers()
        theta = np.asarray(xs[0], dtype=np.float64)
        nd = self.event_ndim
        event = theta.shape[theta.ndim - nd:]
        size = int(np.prod(event))
        flat = theta.reshape(-1, *event)
        out = self._call(theta)
        out_flat = out.reshape(flat.shape[0], -1)
        found = []
        if not known(self.solver):
            return [R_unsupported(node_i, 0, f"{self.name}: a solver the engine does not know the ties of")], None
        for b, inst in enumerate(flat):
            base = b * size
            s = self.solver
            if s in (C.hard_rank, C.sort_permutation):
                found += self._order_sites(node_i, b, inst, base, tol)
                continue
            if s is C.argmax_onehot:
                sols = _argmax_set(inst, tol)
            elif isinstance(s, C.TopK):
                sols = _topk_set(inst, s.k, tol)
            elif isinstance(s, C.EdgeShortestPath):
                sols = _edge_paths(inst, s, tol)
            elif s is C.shortest_path_grid:
                if np.any(inst <= tol):
                    found.append(R_unsupported(node_i, b, f"{self.name}: costs <= 0 in problem {b} are clipped at "
                                                          "0 (a kink the engine does not enumerate)"))
                    continue
                sols = _grid_paths(inst, tol)
            else:
                sols = _assignments(inst, self.maximize, tol)
            if sols is None:
                continue
            solutions, complete = sols
            if len(solutions) < 2:
                continue
            found.append(self._set_site(node_i, b, base, solutions, out_flat[b], complete))
        return found, None

    def _set_site(self, node_i, b, base, solutions, current, complete):
        sgn = 1.0 if self.sense == "max" else -1.0
        opts, default = [], 0
        for j, y in enumerate(solutions):
            y = np.asarray(y, dtype=np.float64).reshape(-1)
            conds = []
            for m, z in enumerate(solutions):
                if m == j:
                    continue
                row = sgn * (y - np.asarray(z, dtype=np.float64).reshape(-1))
                conds.append([(0, base + int(e), float(row[e])) for e in np.nonzero(row)[0]])
            if np.array_equal(y, current):
                default = j
            opts.append(Option(f"solution {j}", conds, ("value", b, y)))
        text = (f"{self.name} problem {b}: {len(solutions)}{'' if complete else '+'} optimal solutions tie "
                f"(the output jumps between them)")
        return L.LayerSite(node_i, ("p", b), "layer", opts, text, clarke="none (the output jumps)", discrete=True,
                           complete=complete, weight=len(solutions) - 1, members=None, default=default)

    def _order_sites(self, node_i, b, inst, base, tol):
        v = inst.reshape(-1)
        order = np.argsort(v, kind="stable")
        sites, i = [], 0
        while i < len(order) - 1:
            j = i
            while j < len(order) - 1 and abs(v[order[j + 1]] - v[order[j]]) <= tol:
                j += 1
            if j > i:
                group = np.sort(order[i:j + 1])
                opts, complete = permutation_options(group, np.random.default_rng(base + i))
                # permutation_options orders members ascending in value with conditions
                # x[p[i+1]] - x[p[i]] > 0 on input 0: shift to this problem's elements
                opts = [Option(o.label, [[(0, base + e, c) for _, e, c in cond] for cond in o.conds],
                               ("order", b, np.asarray(o.data))) for o in opts]
                default = next((q for q, o in enumerate(opts) if np.array_equal(o.data[2], group)), 0)
                sites.append(L.LayerSite(
                    node_i, ("g", b, tuple(int(q) for q in group)), "layer", opts,
                    f"{self.name} problem {b}: entries {group.tolist()} tie (their order decides the output)",
                    clarke="none (the output jumps)", discrete=True, complete=complete, weight=len(group) - 1,
                    members=group, default=default))
            i = j + 1
        return sites

    # ------------------------------------------------------------------ values

    def apply(self, xs, tans, chosen, ctx, k):
        C = _solvers()
        theta = np.asarray(xs[0], dtype=np.float64)
        out = self._call(theta)
        if chosen:
            nd = self.event_ndim
            flat_in = theta.reshape(-1, *theta.shape[theta.ndim - nd:])
            flat = out.reshape(flat_in.shape[0], -1).copy()
            orders: dict = {}
            for site, opt in chosen:
                if opt.data is None:  # an unsupported site: the solver's own output
                    continue
                kind, b, data = opt.data
                if kind == "value":
                    flat[b] = data
                else:
                    order = orders.get(b)
                    if order is None:
                        order = orders[b] = np.argsort(flat_in[b].reshape(-1), kind="stable")
                    slots = np.nonzero(np.isin(order, site.members))[0]
                    order[slots] = data
            for b, order in orders.items():
                n = len(order)
                if self.solver is C.hard_rank:
                    r = np.empty(n)
                    r[order] = np.arange(1, n + 1)
                    flat[b] = r
                else:
                    P = np.zeros((n, n))
                    P[np.arange(n), order] = 1.0
                    flat[b] = P.reshape(-1)
            out = flat.reshape(out.shape)
        t = None if k == 0 or not tans or tans[0] is None else np.zeros((k, out.size))
        return [out], [t]


def R_unsupported(node_i, b, text):
    return L.LayerSite(node_i, ("p", b), "unsupported", [Option("framework", [], None)], text,
                       complete=False, members=None)


# --------------------------------------------------------------------------- optimal sets


def _argmax_set(v, tol):
    top = float(np.max(v))
    idx = np.nonzero(v >= top - tol)[0]
    if len(idx) < 2:
        return None
    sols = []
    for i in idx:
        y = np.zeros(v.size)
        y[i] = 1.0
        sols.append(y)
    return sols, True


def _topk_set(v, k, tol):
    n = v.size
    if k >= n:
        return None
    srt = np.sort(v)[::-1]
    t = srt[k - 1]
    above = np.nonzero(v > t + tol)[0]
    tied = np.nonzero(np.abs(v - t) <= tol)[0]
    r = k - len(above)
    if len(tied) <= r:
        return None
    combos = list(itertools.islice(itertools.combinations(tied.tolist(), r), MAX_SOLUTIONS + 1))
    complete = len(combos) <= MAX_SOLUTIONS
    sols = []
    for S in combos[:MAX_SOLUTIONS]:
        y = np.zeros(n)
        y[above] = 1.0
        y[list(S)] = 1.0
        sols.append(y)
    return sols, complete


def _enumerate_paths(end, preds, limit):
    """Every path start -> end through ``preds`` (node -> [(pred, item)]), as item lists."""
    out, complete = [], True
    stack = [(end, [])]
    while stack:
        node, items = stack.pop()
        if node == 0:
            out.append(items)
            if len(out) > limit:
                return out[:limit], False
            continue
        for u, item in preds.get(node, []):
            stack.append((u, items + [item]))
    return out, complete


def _edge_paths(c, solver, tol):
    H, W = solver.grid
    arcs = solver.arcs
    D = np.full(H * W, np.inf)
    D[0] = 0.0
    into: dict = {}
    for e, (u, v) in enumerate(arcs):
        into.setdefault(v, []).append((u, e))
    order = sorted(range(H * W), key=lambda q: (q // W + q % W))  # anti-diagonals: a topological order
    for v in order[1:]:
        D[v] = min(D[u] + c[e] for u, e in into[v])
    slack = tol * (H + W) + 16 * np.finfo(np.float64).eps * (np.abs(c).sum() + 1.0)
    preds = {v: [(u, e) for u, e in into.get(v, []) if D[u] + c[e] - D[v] <= slack] for v in range(1, H * W)}
    paths, complete = _enumerate_paths(H * W - 1, preds, MAX_SOLUTIONS)
    if len(paths) < 2:
        return None
    sols = []
    for items in paths:
        y = np.zeros(len(arcs))
        y[items] = 1.0
        sols.append(y)
    return sols, complete


def _grid_paths(c, tol):
    H, W = c.shape
    from nonsmooth.solvers._combinatorial_common import GRID_SHIFTS

    D = np.full((H, W), np.inf)
    D[0, 0] = c[0, 0]
    heap = [(D[0, 0], 0, 0)]
    while heap:
        d, i, j = heapq.heappop(heap)
        if d > D[i, j]:
            continue
        for dy, dx in GRID_SHIFTS:
            a, b = i + dy, j + dx
            if 0 <= a < H and 0 <= b < W and d + c[a, b] < D[a, b]:
                D[a, b] = d + c[a, b]
                heapq.heappush(heap, (D[a, b], a, b))
    slack = tol * H * W + 16 * np.finfo(np.float64).eps * (float(D.max()) + 1.0)
    preds = {}
    for i in range(H):
        for j in range(W):
            if i == 0 and j == 0:
                continue
            v = i * W + j
            for dy, dx in GRID_SHIFTS:
                a, b = i + dy, j + dx
                if 0 <= a < H and 0 <= b < W and D[a, b] + c[i, j] - D[i, j] <= slack:
                    preds.setdefault(v, []).append((a * W + b, a * W + b))
    paths, complete = _enumerate_paths(H * W - 1, preds, MAX_SOLUTIONS)
    if len(paths) < 2:
        return None
    sols = []
    for items in paths:
        y = np.zeros(H * W)
        y[items] = 1.0
        y[H * W - 1] = 1.0
        sols.append(y)
    return sols, complete


def _assignments(cost, maximize, tol):
    n, m = cost.shape
    sgn = -1.0 if maximize else 1.0
    C = sgn * cost
    if n > m:
        res = _assignments(cost.T, maximize, tol)
        if res is None:
            return None
        sols, complete = res
        return [y.reshape(m, n).T.reshape(-1) for y in sols], complete
    slack = tol * n + 16 * np.finfo(np.float64).eps * (np.abs(cost).sum() + 1.0)
    count = math.perm(m, n)
    if count <= MAX_BRUTE_FORCE:
        perms = np.array(list(itertools.permutations(range(m), n)), dtype=np.int64).reshape(count, n)
        totals = C[np.arange(n)[None, :], perms].sum(axis=1)
        best = totals.min()
        hits = perms[totals <= best + slack]
        if len(hits) < 2:
            return None
        complete = len(hits) <= MAX_SOLUTIONS
        sols = []
        for p in hits[:MAX_SOLUTIONS]:
            y = np.zeros((n, m))
            y[np.arange(n), p] = 1.0
            sols.append(y.reshape(-1))
        return sols, complete
    # large problems: another optimum exists iff forbidding some pair of the optimum keeps the value
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(C)
    best = C[rows, cols].sum()
    y0 = np.zeros((n, m))
    y0[rows, cols] = 1.0
    sols = [y0.reshape(-1)]
    big = np.abs(C).max() * (n + 1) + 1.0
    for r, c in zip(rows, cols):
        C2 = C.copy()
        C2[r, c] = big
        r2, c2 = linear_sum_assignment(C2)
        if C2[r2, c2].sum() <= best + slack:
            y = np.zeros((n, m))
            y[r2, c2] = 1.0
            if not any(np.array_equal(y.reshape(-1), s) for s in sols):
                sols.append(y.reshape(-1))
    if len(sols) < 2:
        return None
    return sols, False


# --------------------------------------------------------------------------- surrogates


def route_surrogate(theta, *, layer_spec):
    from nonsmooth._frameworks import array_framework

    spec = SurrogateSpec(layer_spec)
    spec.framework = array_framework(theta)
    return spec, [theta], lambda outs: outs[0]


class SurrogateSpec(SolverSpec):
    """The forward pass of ``identity_backward``/``blackbox_backward``: the solver itself."""

    kind = "surrogate"

    def __init__(self, layer_spec):
        self.layer = layer_spec
        super().__init__(layer_spec.solver)
        from nonsmooth.solvers._surrogate_common import explain

        self.explanation = explain(layer_spec)
        self.method = layer_spec.method
        self.name = f"{layer_spec.method}_backward({solver_label(layer_spec.solver)})"
        if not known(layer_spec.solver):
            self.unsupported = ""  # the surrogate is named as such whatever the solver

    def key(self):
        return ("surrogate", self.layer)
