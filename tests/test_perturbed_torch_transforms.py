"""torch perturbed layers under torch.compile, torch.func, forward AD, gradcheck and vmap.

The oracle for every transform is the plain eager autograd result with the same noise (two
layers with the same seed draw the same noise on their k-th call), and for gradcheck the
float64 finite differences of the frozen estimator (the layer's estimator as a smooth
function of theta with its samples held fixed).
"""
import numpy as np
import pytest

from nonsmooth.solvers import (argmax_onehot, fenchel_young_loss, perturbed, perturbed_max,
                               shortest_path_grid, topk_mask)

torch = pytest.importorskip("torch")
tf = torch.func

SIGMA = 0.5


def theta_batch(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("make", [
    lambda: perturbed(argmax_onehot, num_samples=200, sigma=SIGMA),
    lambda: perturbed(topk_mask(2), num_samples=200, sigma=SIGMA, noise="normal",
                      control_variate=True),
    lambda: perturbed_max(argmax_onehot, num_samples=200, sigma=SIGMA),
])
def test_compile_fullgraph_matches_eager_values_and_gradients(make):
    torch._dynamo.reset()
    theta = theta_batch()
    g = torch.randn(make()(theta).shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    eager, comp = make(), make()
    f = compiled(lambda t: (comp(t) * g).sum())
    for _ in range(2):  # the second call must advance the stream inside the compiled graph
        t1 = theta.clone().requires_grad_()
        t2 = theta.clone().requires_grad_()
        v1 = (eager(t1) * g).sum()
        v2 = f(t2)
        (g1,) = torch.autograd.grad(v1, t1)
        (g2,) = torch.autograd.grad(v2, t2)
        torch.testing.assert_close(v2, v1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)


def test_compile_fenchel_young_and_shortest_path_target():
    # The loss and a built-in solver with data-dependent loops, both inside one graph.
    torch._dynamo.reset()
    costs = torch.rand(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target_costs = torch.rand(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eager = fenchel_young_loss(shortest_path_grid, num_samples=20, sigma=0.2)
    comp = fenchel_young_loss(shortest_path_grid, num_samples=20, sigma=0.2)
    f = compiled(lambda c, tc: comp(c, shortest_path_grid(tc)).sum())
    c1, c2 = costs.clone().requires_grad_(), costs.clone().requires_grad_()
    v1 = eager(c1, shortest_path_grid(target_costs)).sum()
    v2 = f(c2, target_costs)
    torch.testing.assert_close(v2, v1)
    torch.testing.assert_close(torch.autograd.grad(v2, c2)[0], torch.autograd.grad(v1, c1)[0])


def test_compile_raises_on_nonfinite_theta_and_user_generator():
    torch._dynamo.reset()
    layer = perturbed(argmax_onehot, num_samples=10)
    f = compiled(layer)
    with pytest.raises(ValueError, match="theta contains a non-finite value.*nan"):
        f(torch.tensor([[0.0, float("nan")]]))
    gen = torch.Generator().manual_seed(0)
    g = compiled(lambda t: layer(t, generator=gen))
    with pytest.raises(Exception, match="generator= cannot be used under torch.compile"):
        g(torch.zeros(1, 3))


def test_func_grad_jacrev_jacfwd_forward_ad_agree_with_eager():
    theta = theta_batch(shape=(5,))
    layers = [perturbed(topk_mask(2), num_samples=300, sigma=SIGMA, seed=4) for _ in range(5)]
    # 1. eager reverse mode, row by row
    t = theta.clone().requires_grad_()
    y = layers[0](t)
    J = torch.stack([torch.autograd.grad(y[i], t, retain_graph=True)[0] for i in range(5)])
    assert J.abs().max() > 0
    torch.testing.assert_close(tf.jacrev(layers[1])(theta), J)
    torch.testing.assert_close(tf.jacfwd(layers[2])(theta), J)
    v = torch.linspace(-1, 1, 5, dtype=torch.float64)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = layers[3](fwAD.make_dual(theta, v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, J @ v)
    w = torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(tf.grad(lambda x: (layers[4](x) * w).sum())(theta), J.T @ w)


def test_func_grad_of_fenchel_young_is_y_sigma_minus_y():
    theta = theta_batch()
    target = argmax_onehot(theta_batch(seed=5))
    loss = fenchel_young_loss(argmax_onehot, num_samples=300, sigma=SIGMA, seed=6)
    g = tf.grad(lambda t: loss(t, target).sum())(theta)
    y = perturbed(argmax_onehot, num_samples=300, sigma=SIGMA, seed=6)(theta)
    torch.testing.assert_close(g, y - target, rtol=0, atol=1e-14)


def test_double_backward_of_perturbed_max_is_the_perturbed_jacobian():
    theta = theta_batch(shape=(5,))
    fmax = perturbed_max(argmax_onehot, num_samples=300, sigma=SIGMA, seed=7)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(fmax(t), t, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(5)])
    J = tf.jacrev(perturbed(argmax_onehot, num_samples=300, sigma=SIGMA, seed=7))(theta)
    torch.testing.assert_close(H, J)
    torch.testing.assert_close(tf.hessian(
        perturbed_max(argmax_onehot, num_samples=300, sigma=SIGMA, seed=7))(theta), J)


@pytest.mark.parametrize("noise", ["gumbel", "normal", "laplace"])
@pytest.mark.parametrize("control_variate", [False, True])
def test_gradcheck_on_frozen_estimator_and_layer_matches_it(noise, control_variate):
    law = torch.distributions.Laplace(0.0, 1.0) if noise == "laplace" else noise
    layer = perturbed(topk_mask(2), num_samples=40, sigma=SIGMA, noise=law, fused=False,
                      control_variate=control_variate)
    theta0 = theta_batch(seed=8, shape=(2, 4))
    f = layer.freeze(theta0, generator=torch.Generator().manual_seed(9))
    t = theta0.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (t,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (t,))
    # The layer at theta0 with the same noise: same value, Jacobian and second derivatives.
    y = layer(t, generator=torch.Generator().manual_seed(9))
    yf = f(t)
    torch.testing.assert_close(y, yf, rtol=0, atol=0)
    for out in (y, yf):
        out.retain_grad()
    J = [torch.autograd.grad(o[0, 1], t, create_graph=True)[0] for o in (y, yf)]
    torch.testing.assert_close(J[0], J[1], rtol=1e-12, atol=1e-13)
    H = [torch.autograd.grad(j[0, 2], t)[0] for j in J]
    torch.testing.assert_close(H[0], H[1], rtol=1e-12, atol=1e-13)


def test_vmap_randomness_same_and_different():
    layer = perturbed(argmax_onehot, num_samples=50, sigma=SIGMA, seed=10)
    x = theta_batch(shape=(6,)).expand(3, 6)
    diff = tf.vmap(layer, randomness="different")(x)
    assert not torch.equal(diff[0], diff[1])
    same = tf.vmap(layer, randomness="same")(x)
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    default = tf.vmap(layer)(x)  # the layer's stream is explicit: independent per element
    assert default.shape == (3, 6) and not torch.equal(default[0], default[1])


def test_vmap_and_func_raise_on_nonfinite_theta():
    layer = perturbed(argmax_onehot, num_samples=10)
    with pytest.raises(ValueError, match="non-finite"):
        tf.vmap(layer)(torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        tf.grad(lambda t: layer(t).sum())(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_theta(dtype):
    layer = perturbed(argmax_onehot, num_samples=200, sigma=SIGMA)
    t = theta_batch().to(dtype).requires_grad_()
    y = layer(t)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.sum().backward()
    assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
