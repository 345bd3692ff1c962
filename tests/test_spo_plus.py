"""SPO+ loss (Elmachtoub & Grigas 2022) against a hand-derived value, brute-force enumeration
of the feasible set, float64 finite differences of the convex loss, and its properties."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nonsmooth.solvers import argmax_onehot, shortest_path_edges, spo_plus_loss

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def argmin_onehot(c):
    """Minimizing solver over the unit vectors (numpy, torch or jax; batched)."""
    if isinstance(c, torch.Tensor):
        return torch.nn.functional.one_hot(c.argmin(-1), c.shape[-1]).to(c.dtype)
    if isinstance(c, jax.Array):
        return jax.nn.one_hot(jnp.argmin(c, -1), c.shape[-1], dtype=c.dtype)
    return np.eye(c.shape[-1], dtype=c.dtype)[np.argmin(c, -1)]


argmin_onehot.sense = "min"
argmin_onehot.batched = True


def as_framework(x, fw):
    if fw == "torch":
        return torch.tensor(x, dtype=torch.float64)
    if fw == "jax":
        return jnp.asarray(x)
    return np.asarray(x, np.float64)


def to_np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def grad_of(loss, pred, true, fw, **kw):
    if fw == "torch":
        p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
        loss(p, torch.tensor(true, dtype=torch.float64), **kw).sum().backward()
        return p.grad.numpy()
    return np.asarray(jax.grad(lambda p: loss(p, jnp.asarray(true), **kw).sum())(jnp.asarray(pred)))


# ----------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_hand_derived_value_and_subgradient(fw):
    # c = (1, 2, 3), c_hat = (3, 0, 1): w*(c) = e0, z* = 1; 2 c_hat - c = (5, -2, -1),
    # whose minimizer is e1 with value -2.  loss = 2 + 2*3 - 1 = 7; subgradient
    # 2 (w*(c) - w_q) = 2 (e0 - e1) = (2, -2, 0).
    loss = spo_plus_loss(argmin_onehot)
    c, chat = [1.0, 2.0, 3.0], [3.0, 0.0, 1.0]
    assert float(loss(as_framework(chat, fw), as_framework(c, fw))) == 7.0
    if fw != "numpy":
        np.testing.assert_array_equal(grad_of(loss, chat, c, fw), [2.0, -2.0, 0.0])


def test_hand_derived_maximization_mirror():
    # max problem over unit vectors: c = (3, 2, 1), c_hat = (0, 3, 1): w*(c) = e0, z* = 3;
    # 2 c_hat - c = (-3, 4, 1): maximizer e1, value 4.  loss = 4 - 2*0 + 3 = 7;
    # subgradient 2 (w_q - w*) = (-2, 2, 0).  (PyEPO's MAXIMIZE convention.)
    loss = spo_plus_loss(argmax_onehot)
    assert loss.sense == "max"
    c, chat = [3.0, 2.0, 1.0], [0.0, 3.0, 1.0]
    for fw in ("numpy", "torch", "jax"):
        assert float(loss(as_framework(chat, fw), as_framework(c, fw))) == 7.0
    for fw in ("torch", "jax"):
        np.testing.assert_array_equal(grad_of(loss, chat, c, fw), [-2.0, 2.0, 0.0])


# ----------------------------------------------------------------------------- brute force


GRID = (3, 3)
SP = shortest_path_edges(GRID)


def all_paths(grid):
    """Every monotone top-left -> bottom-right path as an arc indicator (by enumeration of
    the move sequences, independent of the solver)."""
    H, W = grid
    arcs = {a: e for e, a in enumerate(SP.arcs)} if grid == GRID else \
        {a: e for e, a in enumerate(shortest_path_edges(grid).arcs)}
    E = len(arcs)
    paths = []
    for downs in itertools.combinations(range(H + W - 2), H - 1):
        w = np.zeros(E)
        i = j = 0
        for step in range(H + W - 2):
            if step in downs:
                w[arcs[(i * W + j, (i + 1) * W + j)]] = 1
                i += 1
            else:
                w[arcs[(i * W + j, i * W + j + 1)]] = 1
                j += 1
        paths.append(w)
    return np.array(paths)


PATHS = all_paths(GRID)


def spo_brute(chat, c):
    zs = PATHS @ c
    wstar = PATHS[np.argmin(zs)]
    return -np.min(PATHS @ (2 * chat - c)) + 2 * chat @ wstar - zs.min()


def test_enumeration_has_the_binomial_number_of_paths():
    assert len(PATHS) == 6 and (PATHS.sum(1) == 4).all()


@pytest.mark.parametrize("fw", ["numpy", "torch", "jax"])
def test_values_match_enumeration_and_gradients_match_finite_differences(fw):
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 2.0, size=(20, SP.num_edges))
    chat = rng.normal(1.0, 1.0, size=(20, SP.num_edges))  # negative predictions too
    loss = spo_plus_loss(SP)
    got = to_np(loss(as_framework(chat, fw), as_framework(c, fw)))
    expected = np.array([spo_brute(a, b) for a, b in zip(chat, c)])
    tol = 1e-5 if fw == "jax" else 1e-12  # jax computes in float32 here
    np.testing.assert_allclose(got, expected, atol=tol)
    if fw == "numpy":
        return
    g = grad_of(loss, chat, c, fw)
    h = 1e-6  # generic points: the piecewise-linear loss is linear within h
    for b in range(0, 20, 4):
        fd = np.array([(spo_brute(chat[b] + h * e, c[b]) - spo_brute(chat[b] - h * e, c[b])) / (2 * h)
                       for e in np.eye(SP.num_edges)])
        np.testing.assert_allclose(g[b], fd, atol=1e-6 if fw == "torch" else 1e-5)
        # ... and equals the closed-form subgradient 2 (w*(c) - w*(2 c_hat - c))
        wstar = PATHS[np.argmin(PATHS @ c[b])]
        wq = PATHS[np.argmin(PATHS @ (2 * chat[b] - c[b]))]
        np.testing.assert_allclose(g[b], 2 * (wstar - wq), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1))
def test_properties_zero_at_truth_bounds_regret_and_convex(seed):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.1, 3.0, size=SP.num_edges)
    a, b = rng.normal(1, 1.5, size=(2, SP.num_edges))
    loss = spo_plus_loss(SP)
    assert abs(loss(c, c)) < 1e-12
    zstar = (PATHS @ c).min()
    regret = SP(a) @ c - zstar
    assert regret >= -1e-12
    assert loss(a, c) >= regret - 1e-12
    assert loss(0.5 * (a + b), c) <= 0.5 * (loss(a, c) + loss(b, c)) + 1e-12


def test_given_true_solution_and_objective_match_computed_ones():
    rng = np.random.default_rng(1)
    c = torch.tensor(rng.uniform(0.5, 2, size=(4, SP.num_edges)))
    chat = torch.tensor(rng.normal(1, 1, size=(4, SP.num_edges)))
    loss = spo_plus_loss(SP)
    w = SP(c)
    z = (w * c).sum(-1, keepdim=True)  # PyEPO's (batch, 1) objectives
    torch.testing.assert_close(loss(chat, c, w, z), loss(chat, c))


def test_torch_transforms_and_exact_zero_second_derivative():
    rng = np.random.default_rng(2)
    c = torch.tensor(rng.uniform(0.5, 2, size=(3, SP.num_edges)))
    chat = torch.tensor(rng.normal(1, 1, size=(3, SP.num_edges)))
    loss = spo_plus_loss(SP)
    eager = torch.func.grad(lambda p: loss(p, c).sum())(chat)
    torch._dynamo.reset()
    comp = torch.compile(lambda p: loss(p, c).sum(), fullgraph=True, backend="aot_eager")
    p = chat.clone().requires_grad_()
    comp(p).backward()
    torch.testing.assert_close(p.grad, eager)
    vm = torch.func.vmap(torch.func.grad(lambda p, t: loss(p, t)))(chat, c)
    torch.testing.assert_close(vm, eager)
    # The loss is piecewise linear: its Hessian is exactly zero away from kinks (true value).
    H = torch.func.hessian(lambda p: loss(p, c[0]))(chat[0])
    assert torch.equal(H, torch.zeros_like(H))


def test_jax_jit_vmap_and_nan_under_jit():
    rng = np.random.default_rng(3)
    c = jnp.asarray(rng.uniform(0.5, 2, size=(3, SP.num_edges)))
    chat = jnp.asarray(rng.normal(1, 1, size=(3, SP.num_edges)))
    loss = spo_plus_loss(SP)
    np.testing.assert_allclose(jax.jit(loss)(chat, c), loss(chat, c), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(loss)(chat, c), loss(chat, c), rtol=1e-6)
    bad = chat.at[1, 0].set(jnp.nan)
    out = np.asarray(jax.jit(loss)(bad, c))
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()


def test_bad_inputs_are_explained():
    loss = spo_plus_loss(SP)
    c = np.ones((2, SP.num_edges))
    with pytest.raises(ValueError, match="true_cost must have pred_cost's shape"):
        loss(c, np.ones((2, 3)))
    with pytest.raises(TypeError, match="same framework"):
        loss(torch.tensor(c), c)
    with pytest.raises(ValueError, match="non-finite"):
        loss(np.full_like(c, np.nan), c)
    with pytest.raises(ValueError, match="true_obj must have shape"):
        loss(c, c, None, np.ones(3))
    with pytest.raises(ValueError, match="SPO\\+ needs solutions of the costs' shape"):
        spo_plus_loss(lambda x: x.sum(-1), sense="min", batched=True)(c, c)
    assert "2 (w*(c) - w*(2 c_hat - c))" in loss.explain()
