"""Identity-with-projection and blackbox backward passes against independent NumPy formulas."""
import numpy as np
import pytest

from nonsmooth.solvers import (argmax_onehot, blackbox_backward, hard_rank, identity_backward,
                               shortest_path_grid, sort_permutation, topk_mask)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def np_project(g, projection):
    """Reference projections over the last two axes (grid problems), written out by hand."""
    g = np.asarray(g, dtype=np.float64)
    flat = g.reshape(g.shape[0], -1)
    if projection is None:
        return g
    if projection in ("mean", "std"):
        flat = flat - flat.mean(1, keepdims=True)
    if projection == "norm":
        n = np.linalg.norm(flat, axis=1, keepdims=True)
        flat = np.divide(flat, n, out=np.zeros_like(flat), where=n > 0)
    if projection == "std":
        s = flat.std(1, keepdims=True)  # population std: sqrt(mean of squares)
        flat = np.divide(flat, s, out=np.zeros_like(flat), where=s > 0)
    return flat.reshape(g.shape)


RNG = np.random.default_rng(0)
COSTS = RNG.uniform(0.5, 2.0, size=(3, 6, 6))
G = RNG.normal(size=(3, 6, 6))


@pytest.mark.parametrize("projection", [None, "mean", "norm", "std"])
def test_identity_backward_torch_and_jax_match_reference(projection):
    layer = identity_backward(shortest_path_grid, projection=projection)
    w = torch.tensor(COSTS, requires_grad=True)
    y = layer(w)
    np.testing.assert_array_equal(y.detach().numpy(), shortest_path_grid(COSTS))
    (gt,) = torch.autograd.grad(y, w, torch.tensor(G))
    # shortest paths minimize: the identity method returns -P(g)
    np.testing.assert_allclose(gt.numpy(), -np_project(G, projection), rtol=1e-12, atol=1e-12)
    _, vjp = jax.vjp(layer, jnp.asarray(COSTS, jnp.float32))
    (gj,) = vjp(jnp.asarray(G, jnp.float32))
    np.testing.assert_allclose(np.asarray(gj), -np_project(G, projection), rtol=1e-5, atol=1e-5)


def test_identity_projection_properties_and_sign_for_maximizers():
    theta = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 7, dtype=torch.float64)
    (d,) = torch.autograd.grad(identity_backward(argmax_onehot, projection="std")(theta), theta, g)
    assert torch.allclose(d.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((d ** 2).mean(-1), torch.ones(4, dtype=torch.float64))
    # maximizing solver: +g
    (d,) = torch.autograd.grad(identity_backward(argmax_onehot)(theta), theta, g)
    assert torch.equal(d, g)
    # a zero or constant gradient has no direction: 0, never NaN
    (d,) = torch.autograd.grad(identity_backward(argmax_onehot, projection="norm")(theta),
                               theta, torch.zeros(4, 7, dtype=torch.float64))
    assert torch.equal(d, torch.zeros_like(d))
    (d,) = torch.autograd.grad(identity_backward(argmax_onehot, projection="std")(theta),
                               theta, torch.ones(4, 7, dtype=torch.float64))
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("lam", [0.5, 20.0])
def test_blackbox_minimizer_matches_the_difference_quotient(lam):
    layer = blackbox_backward(shortest_path_grid, lambda_=lam)
    expected = (shortest_path_grid(COSTS + lam * G) - shortest_path_grid(COSTS)) / lam
    w = torch.tensor(COSTS, requires_grad=True)
    (gt,) = torch.autograd.grad(layer(w), w, torch.tensor(G))
    np.testing.assert_allclose(gt.numpy(), expected, atol=1e-12)
    gj = jax.jit(lambda c, g: jax.vjp(layer, c)[1](g)[0])(jnp.asarray(COSTS), jnp.asarray(G))
    np.testing.assert_allclose(np.asarray(gj), expected, atol=1e-6)


def test_blackbox_maximizer_uses_the_mirrored_quotient():
    theta = np.array([[0.0, 1.0, 0.5]])
    g = np.array([[0.0, 1.0, 0.0]])
    layer = blackbox_backward(argmax_onehot, lambda_=10.0)
    t = torch.tensor(theta, requires_grad=True)
    (d,) = torch.autograd.grad(layer(t), t, torch.tensor(g))
    # theta - 10 g = [0, -9, 0.5]: argmax moves to index 2
    np.testing.assert_allclose(d.numpy(), [[0.0, 0.1, -0.1]])
    # a step against this surrogate lowers the loss <y, g> of the solver
    assert (argmax_onehot(theta - 1.0 * d.numpy() * 100) * g).sum() < (argmax_onehot(theta) * g).sum()


def test_blackbox_recovers_the_true_slope_of_a_piecewise_linear_interpolation():
    # For argmax over two items with loss <y, g>, f(theta) = g[argmax]; the blackbox
    # surrogate is the slope of the interpolation between theta and theta - lambda g,
    # a finite, nonzero number where autograd would return 0.
    theta = torch.tensor([[0.2, 0.0]], requires_grad=True)
    layer = blackbox_backward(argmax_onehot, lambda_=1.0)
    (d,) = torch.autograd.grad((layer(theta) * torch.tensor([[1.0, 0.0]])).sum(), theta)
    assert torch.equal(d, torch.tensor([[1.0, -1.0]]))


def test_surrogates_under_jax_vmap_and_topk():
    layer = blackbox_backward(topk_mask(2), lambda_=2.0)
    theta = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32)
    g = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32)
    batched = jax.vjp(layer, theta)[1](g)[0]
    mapped = jax.vmap(lambda t, gg: jax.vjp(layer, t)[1](gg)[0])(theta, g)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(mapped), atol=1e-6)
    t64, g64 = np.asarray(theta, np.float64), np.asarray(g, np.float64)
    expected = (topk_mask(2)(t64) - topk_mask(2)(t64 - 2.0 * g64)) / 2.0
    np.testing.assert_allclose(np.asarray(batched), expected, atol=1e-6)


def test_bad_options_and_shapes():
    with pytest.raises(ValueError, match="projection must be .* got 'l1'"):
        identity_backward(argmax_onehot, projection="l1")
    with pytest.raises(ValueError, match="lambda_ must be a finite number > 0, got 0"):
        blackbox_backward(argmax_onehot, lambda_=0)
    with pytest.raises(ValueError, match="sense must be 'max' or 'min'"):
        blackbox_backward(argmax_onehot, sense="up")
    with pytest.raises(ValueError, match="must have its input's shape"):
        identity_backward(sort_permutation)(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="non-finite"):
        blackbox_backward(hard_rank)(torch.tensor([1.0, float("nan")]))
    out = jax.jit(identity_backward(argmax_onehot))(jnp.array([[jnp.nan, 1.0], [0.0, 1.0]]))
    assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1])).all()


def test_explanations_name_the_rule():
    assert "-P(g)" in identity_backward(shortest_path_grid, projection="mean").explain()
    assert "y(w + 3.0 g)" in blackbox_backward(shortest_path_grid, lambda_=3.0).explain()
    assert blackbox_backward(argmax_onehot).to_json()["sense"] == "max"


# ----------------------------------------------------------------------------- transforms


def _layers():
    return [identity_backward(shortest_path_grid, projection="mean"),
            identity_backward(argmax_onehot, projection="norm", event_ndim=2),
            blackbox_backward(shortest_path_grid, lambda_=5.0)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_torch_func_vmap_and_compile_match_eager_autograd(index):
    layer = _layers()[index]
    w = torch.tensor(COSTS)
    g = torch.tensor(G)
    t = w.clone().requires_grad_()
    (eager,) = torch.autograd.grad((layer(t) * g).sum(), t)
    torch.testing.assert_close(torch.func.grad(lambda x: (layer(x) * g).sum())(w), eager)
    per_row = torch.func.vmap(torch.func.grad(lambda x, gg: (layer(x) * gg).sum()))(w, g)
    torch.testing.assert_close(per_row, eager)
    torch._dynamo.reset()
    comp = torch.compile(lambda x: (layer(x) * g).sum(), fullgraph=True, backend="aot_eager")
    t2 = w.clone().requires_grad_()
    comp(t2).backward()
    torch.testing.assert_close(t2.grad, eager)


@pytest.mark.parametrize("index", [0, 2])
def test_second_derivatives_and_forward_mode_raise_in_torch(index):
    layer = _layers()[index]
    t = torch.tensor(COSTS, requires_grad=True)
    g = torch.tensor(G)
    (d,) = torch.autograd.grad((layer(t) ** 2 * g).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives through identity_backward"):
        d.sum().backward()
    with pytest.raises(RuntimeError, match="second derivatives through identity_backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: (layer(y) ** 2 * g).sum())(x).sum())(
            torch.tensor(COSTS))
    with pytest.raises(RuntimeError, match="forward-mode differentiation .* is not available"):
        torch.func.jacfwd(layer)(torch.tensor(COSTS))
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.hessian(lambda x: (layer(x) * g).sum())(torch.tensor(COSTS))


@pytest.mark.parametrize("index", [0, 2])
def test_second_derivatives_raise_in_jax(index):
    layer = _layers()[index]
    g = jnp.asarray(G)
    f = lambda x: jnp.sum(layer(x) ** 2 * g)  # noqa: E731
    x = jnp.asarray(COSTS)
    assert np.isfinite(np.asarray(jax.grad(f)(x))).all()
    with pytest.raises(ValueError, match="second derivatives through identity_backward"):
        jax.grad(lambda y: jnp.sum(jax.grad(f)(y)))(x)
    with pytest.raises(Exception, match="second derivatives|forward-mode|custom_vjp"):
        jax.hessian(f)(x)


def test_per_instance_solver_in_surrogates():
    def one_instance_argmax(x):  # 1-D only
        return jax.nn.one_hot(jnp.argmax(x), x.shape[0])

    layer = blackbox_backward(one_instance_argmax, lambda_=2.0)
    theta = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32)
    g = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32)
    y = layer(theta)
    np.testing.assert_array_equal(np.asarray(y), argmax_onehot(np.asarray(theta)))
    d = jax.vjp(layer, theta)[1](g)[0]
    t64, g64 = np.asarray(theta, np.float64), np.asarray(g, np.float64)
    expected = (argmax_onehot(t64) - argmax_onehot(t64 - 2.0 * g64)) / 2.0
    np.testing.assert_allclose(np.asarray(d), expected, atol=1e-6)
