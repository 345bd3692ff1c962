"""Batched combinatorial solvers against independent oracles (NumPy, SciPy, brute force)."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.stats import rankdata

from nonsmooth.solvers import (argmax_onehot, hard_rank, linear_assignment, shortest_path_grid,
                               sort_permutation, topk_mask)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def _all_frameworks(x):
    """The same input as numpy, torch and jax (float64 where jax allows it)."""
    return {"numpy": x, "torch": torch.tensor(x), "jax": jnp.asarray(x)}


def _to_np(y):
    if isinstance(y, torch.Tensor):
        return y.numpy()
    return np.asarray(y)


# ----------------------------------------------------------------------------- oracles


def dijkstra_cost(c):
    """Cheapest 8-neighbour path cost, both ends counted, by SciPy's Dijkstra."""
    H, W = c.shape
    rows, cols, w = [], [], []
    for i, j in itertools.product(range(H), range(W)):
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            a, b = i + dy, j + dx
            if (dy, dx) != (0, 0) and 0 <= a < H and 0 <= b < W:
                rows.append(i * W + j)
                cols.append(a * W + b)
                # csgraph drops explicit zeros; a tiny positive weight keeps the edge and
                # cannot change a cheapest cost by more than H*W*1e-300.
                w.append(max(c[a, b], 1e-300))
    G = csr_matrix((w, (rows, cols)), shape=(H * W, H * W))
    return dijkstra(G, indices=0)[H * W - 1] + c[0, 0]


def assert_is_path(mask):
    """The mask is a simple 8-connected path from the top-left to the bottom-right corner."""
    H, W = mask.shape
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert mask[0, 0] == 1 and mask[H - 1, W - 1] == 1
    cells = set(zip(*np.nonzero(mask)))
    # Every cell but the two ends has exactly two path neighbours (a chain), and the
    # chain is connected.
    def nbrs(p):
        return [(p[0] + dy, p[1] + dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2)
                if (dy, dx) != (0, 0) and (p[0] + dy, p[1] + dx) in cells]
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        for q in nbrs(stack.pop()):
            if q not in seen:
                seen.add(q)
                stack.append(q)
    assert seen == cells


# ----------------------------------------------------------------------------- argmax, top-k


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_argmax_onehot_matches_numpy_argmax(fw):
    x = np.random.default_rng(0).normal(size=(4, 3, 7))
    y = _to_np(argmax_onehot(_all_frameworks(x)[fw]))
    expected = np.eye(7)[np.argmax(x, axis=-1)]
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_ties_break_to_lowest_index_everywhere(fw):
    x = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    xs = _all_frameworks(x)[fw]
    np.testing.assert_array_equal(_to_np(argmax_onehot(xs)), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(_to_np(topk_mask(2)(xs)), [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(_to_np(hard_rank(xs)), [[2, 3, 4, 1, 5], [1, 2, 3, 4, 5]])


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (3, 9), elements=st.integers(-3, 3).map(float)), st.integers(1, 9))
def test_topk_mask_is_the_best_k_subset(x, k):
    """Property: k ones, and every chosen entry >= every unchosen one; all frameworks agree."""
    outs = [_to_np(topk_mask(k)(v)) for v in _all_frameworks(x).values()]
    for y in outs:
        np.testing.assert_array_equal(y, outs[0])
        assert (y.sum(-1) == k).all()
        for row, m in zip(x, y):
            if k < len(row):
                assert row[m == 1].min() >= row[m == 0].max()
            # objective equals the sum of the k largest values (independent oracle)
            assert row[m == 1].sum() == np.sort(row)[::-1][:k].sum()


# ----------------------------------------------------------------------------- sorting


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (2, 8), elements=st.integers(-4, 4).map(float)))
def test_hard_rank_matches_scipy_ordinal_rankdata(x):
    expected = rankdata(x, method="ordinal", axis=-1)
    for v in _all_frameworks(x).values():
        np.testing.assert_array_equal(_to_np(hard_rank(v)), expected)


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_sort_permutation_sorts_and_agrees_with_rank(fw):
    x = np.random.default_rng(1).normal(size=(5, 6))
    P = _to_np(sort_permutation(_all_frameworks(x)[fw]))
    np.testing.assert_allclose(np.einsum("bij,bj->bi", P, x), np.sort(x, axis=-1))
    np.testing.assert_array_equal(P.sum(-1), 1)
    np.testing.assert_array_equal(P.sum(-2), 1)
    # rank = P^T (1..n)
    np.testing.assert_array_equal(np.einsum("bij,i->bj", P, np.arange(1, 7)),
                                  rankdata(x, method="ordinal", axis=-1))


def test_hard_rank_maximizes_the_linear_objective_over_permutations():
    x = np.random.default_rng(2).normal(size=5)
    best = max(itertools.permutations(range(1, 6)), key=lambda p: np.dot(p, x))
    np.testing.assert_array_equal(hard_rank(x), best)


# ----------------------------------------------------------------------------- shortest path


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_shortest_path_matches_scipy_dijkstra_on_warcraft_sized_grids(fw):
    rng = np.random.default_rng(3)
    c = rng.uniform(0.1, 5.0, size=(2, 6, 12, 12))
    m = _to_np(shortest_path_grid(_all_frameworks(c)[fw]))
    assert m.shape == c.shape
    for b in itertools.product(range(2), range(6)):
        assert_is_path(m[b])
        assert abs((m[b] * c[b]).sum() - dijkstra_cost(c[b])) < 1e-9


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1, 1), (1, 5), (4, 1), (3, 5), (6, 6), (7, 4)]),
       st.integers(0, 2**31 - 1), st.booleans())
def test_shortest_path_property_against_dijkstra(shape, seed, integer):
    """Property, including ties and zero-cost plateaus: optimal cost, a valid path, and
    the same path from numpy, torch and jax (a few shapes: each is one jax compile)."""
    H, W = shape
    rng = np.random.default_rng(seed)
    # integer costs: 0..2 makes zero-cost plateaus, 1..3 makes ties without plateaus
    c = rng.integers(seed % 2, 3 + seed % 2, size=(3, H, W)).astype(float) if integer else \
        rng.exponential(size=(3, H, W))
    outs = [_to_np(shortest_path_grid(v)) for v in _all_frameworks(c).values()]
    for m in outs:
        np.testing.assert_array_equal(m, outs[0])
    for b in range(3):
        assert abs((outs[0][b] * c[b]).sum() - dijkstra_cost(c[b])) < 1e-9
        if (c[b] > 0).all():
            assert_is_path(outs[0][b])
        else:  # zero costs: still a connected start-to-end set, and the cheapest one
            assert outs[0][b][0, 0] == 1 and outs[0][b][-1, -1] == 1


def test_equal_cost_paths_are_chosen_identically_in_every_framework():
    # Unit costs: many cheapest paths, no zero-cost plateau; and a zero plateau.
    rng = np.random.default_rng(7)
    for c in (np.ones((2, 6, 7)), rng.integers(1, 3, size=(4, 7, 7)).astype(float),
              np.where(rng.random((4, 7, 7)) < 0.3, 0.0, 1.0)):
        outs = [_to_np(shortest_path_grid(v)) for v in _all_frameworks(c).values()]
        for m in outs[1:]:
            np.testing.assert_array_equal(m, outs[0])
        for b in range(c.shape[0]):
            assert abs((outs[0][b] * c[b]).sum() - dijkstra_cost(c[b])) < 1e-9


def test_tie_path_longer_than_fewest_vertices_reaches_the_start_in_jax():
    # Found by hypothesis: the first tight edge can give a cheapest path with more
    # vertices than the fewest; the jax trace-back once stopped short of the start.
    c = np.array([[2.0, 1, 1, 1, 1], [3, 1, 3, 3, 1], [2, 2, 1, 2, 2]])
    expected = np.array([[1.0, 1, 1, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    for v in _all_frameworks(c).values():
        np.testing.assert_array_equal(_to_np(shortest_path_grid(v)), expected)


def test_shortest_path_clips_negative_costs_at_zero():
    c = np.ones((4, 4))
    c[1, 1] = c[2, 2] = -5.0  # would make the cheapest walk unbounded
    m = shortest_path_grid(c)
    np.testing.assert_array_equal(m, shortest_path_grid(np.maximum(c, 0)))
    assert m[1, 1] == 1 and m[2, 2] == 1


def test_shortest_path_jax_jit_vmap_and_nan_under_jit():
    c = np.random.default_rng(4).uniform(0.5, 2, size=(3, 5, 6)).astype(np.float32)
    expected = shortest_path_grid(c)
    np.testing.assert_array_equal(np.asarray(jax.jit(shortest_path_grid)(jnp.asarray(c))), expected)
    np.testing.assert_array_equal(np.asarray(jax.vmap(shortest_path_grid)(jnp.asarray(c))), expected)
    bad = jnp.asarray(c).at[1, 2, 2].set(jnp.nan)
    out = np.asarray(jax.jit(shortest_path_grid)(bad))
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2]]).any()


def test_shortest_path_single_cell_and_single_row():
    np.testing.assert_array_equal(shortest_path_grid(np.array([[2.0]])), [[1.0]])
    np.testing.assert_array_equal(shortest_path_grid(np.ones((1, 4))), np.ones((1, 4)))


# ----------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_linear_assignment_matches_brute_force(fw):
    rng = np.random.default_rng(5)
    c = rng.normal(size=(4, 5, 5))
    y = _to_np(linear_assignment(_all_frameworks(c)[fw]))
    for b in range(4):
        best = min(itertools.permutations(range(5)), key=lambda p: c[b, range(5), p].sum())
        expected = np.zeros((5, 5))
        expected[range(5), best] = 1
        np.testing.assert_array_equal(y[b], expected)
    ymax = _to_np(linear_assignment(_all_frameworks(c)[fw], maximize=True))
    np.testing.assert_array_equal(ymax, linear_assignment(-c))


def test_linear_assignment_under_jax_jit_and_vmap():
    c = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4, 4)))
    expected = linear_assignment(np.asarray(c))
    np.testing.assert_array_equal(np.asarray(jax.jit(linear_assignment)(c)), expected)
    np.testing.assert_array_equal(np.asarray(jax.vmap(linear_assignment)(c)), expected)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("solver", [argmax_onehot, topk_mask(1), hard_rank, sort_permutation])
def test_vector_solvers_reject_bad_input(solver):
    with pytest.raises(ValueError, match="non-finite.*nan"):
        solver(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-finite.*inf"):
        solver(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="floating-point.*int"):
        solver(np.array([1, 2]))
    with pytest.raises(ValueError, match="empty event shape"):
        solver(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        solver(np.array(1.0))
    with pytest.raises(TypeError, match="list"):
        solver([1.0, 2.0])


def test_grid_solvers_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2 dimension"):
        shortest_path_grid(np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        shortest_path_grid(jnp.array([[1.0, jnp.nan]]))
    with pytest.raises(ValueError, match="non-finite"):
        linear_assignment(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        topk_mask(0)
    with pytest.raises(ValueError, match="needs at least k entries"):
        topk_mask(4)(np.ones(3))


def test_non_contiguous_and_batch_free_inputs():
    x = torch.randn(6, 8).t()  # non-contiguous
    np.testing.assert_array_equal(argmax_onehot(x).numpy(), np.eye(6)[np.argmax(x.numpy(), -1)])
    c = torch.rand(12, 12).t() + 0.1
    assert abs((shortest_path_grid(c) * c).sum().item() - dijkstra_cost(c.numpy().astype(float))) < 1e-4
    assert shortest_path_grid(np.ones((0, 3, 3))).shape == (0, 3, 3)


def test_solvers_keep_dtype_and_device():
    x = torch.randn(2, 5, dtype=torch.float32)
    for solver in (argmax_onehot, topk_mask(2), hard_rank):
        y = solver(x)
        assert y.dtype == torch.float32 and y.device == x.device
    assert shortest_path_grid(jnp.ones((3, 3), jnp.float32)).dtype == jnp.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_solvers_agree_with_cpu():
    c = torch.rand(16, 12, 12) + 0.1
    np.testing.assert_array_equal(shortest_path_grid(c.cuda()).cpu().numpy(), shortest_path_grid(c).numpy())
    x = torch.randn(16, 30)
    np.testing.assert_array_equal(topk_mask(5)(x.cuda()).cpu().numpy(), topk_mask(5)(x).numpy())
    np.testing.assert_array_equal(linear_assignment(x[:, :25].reshape(16, 5, 5).cuda()).cpu().numpy(),
                                  linear_assignment(x[:, :25].reshape(16, 5, 5)).numpy())


# ----------------------------------------------------------------------------- edge-cost shortest path


def scipy_edge_distance(sp, costs, method="D"):
    """Cheapest top-left -> bottom-right cost on sp's directed grid graph, by SciPy
    (Dijkstra for nonnegative costs, Bellman-Ford otherwise)."""
    from scipy.sparse.csgraph import shortest_path

    H, W = sp.grid
    tails, heads = zip(*sp.arcs)
    # csgraph drops explicit zeros; a tiny weight keeps the arc without changing the optimum.
    w = np.where(costs == 0, 1e-300, costs)
    G = csr_matrix((w, (tails, heads)), shape=(H * W, H * W))
    return shortest_path(G, method=method, directed=True, indices=0)[H * W - 1]


def assert_is_edge_path(sp, y):
    """y is the indicator of one monotone path: unit flow out of the source into the sink."""
    H, W = sp.grid
    assert set(np.unique(y)) <= {0.0, 1.0}
    flow = np.zeros(H * W)
    for e, (a, b) in enumerate(sp.arcs):
        flow[a] -= y[e]
        flow[b] += y[e]
    expected = np.zeros(H * W)
    expected[0], expected[-1] = -1, 1
    np.testing.assert_array_equal(flow, expected)
    assert y.sum() == H + W - 2


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_edge_shortest_path_matches_scipy_dijkstra_on_pyepo_grids(fw):
    from nonsmooth.solvers import shortest_path_edges

    sp = shortest_path_edges((5, 5))
    assert sp.num_edges == 40 and sp.sense == "min"
    c = np.random.default_rng(8).uniform(0.1, 5.0, size=(3, 10, 40))
    y = _to_np(sp(_all_frameworks(c)[fw]))
    assert y.shape == c.shape
    for b in itertools.product(range(3), range(10)):
        assert_is_edge_path(sp, y[b])
        tol = 1e-4 if fw == "jax" else 1e-9   # jax arrays are float32 here
        assert abs((y[b] * c[b]).sum() - scipy_edge_distance(sp, c[b])) < tol


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1, 2), (2, 1), (2, 3), (4, 4), (3, 6)]), st.integers(0, 2 ** 31 - 1),
       st.sampled_from(["ties", "negative", "zeros"]))
def test_edge_shortest_path_property_against_scipy(grid, seed, kind):
    """Property with ties, zero and negative costs (Bellman-Ford as the oracle there): an
    optimal path, the same one in numpy, torch and jax."""
    from nonsmooth.solvers import shortest_path_edges

    sp = shortest_path_edges(grid)
    rng = np.random.default_rng(seed)
    if kind == "ties":
        c = rng.integers(1, 3, size=(4, sp.num_edges)).astype(float)
    elif kind == "zeros":
        c = rng.integers(0, 2, size=(4, sp.num_edges)).astype(float)
    else:
        c = rng.integers(-3, 4, size=(4, sp.num_edges)).astype(float)
    outs = [_to_np(sp(v)) for v in _all_frameworks(c).values()]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    for b in range(4):
        assert_is_edge_path(sp, outs[0][b])
        method = "BF" if kind == "negative" else "D"
        assert abs(outs[0][b] @ c[b] - scipy_edge_distance(sp, c[b], method)) < 1e-9


def test_edge_shortest_path_tie_rule_enters_from_the_left():
    from nonsmooth.solvers import shortest_path_edges

    sp = shortest_path_edges((2, 2))  # arcs 0->1, 0->2, 1->3, 2->3, all equal
    for v in _all_frameworks(np.ones((1, 4))).values():
        np.testing.assert_array_equal(_to_np(sp(v)), [[0, 1, 0, 1]])  # down, then right


def test_edge_shortest_path_jit_vmap_compile_and_bad_input():
    from nonsmooth.solvers import shortest_path_edges

    sp = shortest_path_edges((4, 3))
    c = np.random.default_rng(9).uniform(0.5, 2, size=(5, sp.num_edges)).astype(np.float32)
    expected = sp(c)
    np.testing.assert_array_equal(np.asarray(jax.jit(sp)(jnp.asarray(c))), expected)
    np.testing.assert_array_equal(np.asarray(jax.vmap(sp)(jnp.asarray(c))), expected)
    bad = np.asarray(jax.jit(sp)(jnp.asarray(c).at[2, 1].set(jnp.nan)))
    assert np.isnan(bad[2]).all() and not np.isnan(bad[[0, 1, 3, 4]]).any()
    torch._dynamo.reset()
    comp = torch.compile(sp, fullgraph=True, backend="aot_eager")
    np.testing.assert_array_equal(comp(torch.tensor(c)).numpy(), expected)
    with pytest.raises(ValueError, match=r"needs 17 edge costs .* got shape \(2, 5\)"):
        sp(np.ones((2, 5)))
    with pytest.raises(ValueError, match="grid must be two positive ints"):
        shortest_path_edges((1, 1))
    with pytest.raises(ValueError, match="grid must be two positive ints"):
        shortest_path_edges((2.5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        sp(torch.full((sp.num_edges,), float("inf")))


def test_perturbed_edge_paths_average_to_a_flow():
    from nonsmooth.solvers import fenchel_young_loss, perturbed, shortest_path_edges

    sp = shortest_path_edges((5, 5))
    c = torch.rand(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = perturbed(sp, num_samples=200, sigma=0.3)(c)
    torch.testing.assert_close(y.sum(-1), torch.full((3,), 8.0, dtype=torch.float64))
    loss = fenchel_young_loss(sp, num_samples=200, sigma=0.3, seed=4)
    assert loss.sense == "min"
    t = c.clone().requires_grad_()
    target = sp(torch.rand(3, 40, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss(t, target).sum(), t)
    ys = perturbed(sp, num_samples=200, sigma=0.3, seed=4)(c)
    torch.testing.assert_close(g, target - ys)
