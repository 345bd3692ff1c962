"""Perturbed optimizers and Fenchel-Young losses against closed forms, with statistical bounds.

Every Monte-Carlo comparison uses a fixed seed and a bound derived from the estimator's
own variance (k standard errors), never a hand-picked tolerance: if the estimator were
biased by more than a few standard errors, the test fails.
"""
import math

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp, softmax
from scipy.stats import norm

from nonsmooth.solvers import (argmax_onehot, fenchel_young_loss, hard_rank, perturbed,
                               perturbed_max, shortest_path_grid, sort_permutation, topk_mask)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

GAMMA = 0.5772156649015329
K = 5.0  # standard errors allowed; at a fixed seed this is a deterministic test


def sign_solver(x):
    """Elementwise argmax over {-1, 1}: sign, as a maximizing solver with event size 1."""
    if isinstance(x, torch.Tensor):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def softmax_jacobian(theta, sigma):
    p = softmax(theta / sigma)
    return (np.diag(p) - np.outer(p, p)) / sigma


THETA = np.array([0.3, -0.5, 1.0, 0.2, -0.1])
SIGMA = 0.5


# ----------------------------------------------------------------------------- forward closed forms


def test_gumbel_argmax_is_softmax_within_binomial_standard_errors():
    N = 20000
    y = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=1)(
        torch.tensor(THETA)).numpy()
    p = softmax(THETA / SIGMA)
    se = np.sqrt(p * (1 - p) / N)  # each coordinate is a mean of N Bernoulli(p_i)
    assert (np.abs(y - p) <= K * se).all(), (y, p, se)
    assert abs(y.sum() - 1) < 1e-12


def test_gumbel_max_is_logsumexp_within_gumbel_standard_error():
    # max_i (theta_i + sigma Z_i) is Gumbel with location sigma*logsumexp(theta/sigma),
    # scale sigma: mean adds sigma*gamma, standard deviation sigma*pi/sqrt(6).
    N = 20000
    for fw_theta in (torch.tensor(THETA), jnp.asarray(THETA, jnp.float32), THETA):
        F = float(perturbed_max(argmax_onehot, num_samples=N, sigma=SIGMA, seed=2)(fw_theta))
        exact = SIGMA * logsumexp(THETA / SIGMA) + SIGMA * GAMMA
        assert abs(F - exact) <= K * SIGMA * math.pi / math.sqrt(6 * N), (F, exact)


def test_normal_perturbed_sign_is_two_phi_minus_one():
    N = 20000
    theta = np.array([-0.4, -0.05, 0.0, 0.1, 0.7])
    m = 2 * norm.cdf(theta / SIGMA) - 1
    se = np.sqrt((1 - m ** 2) / N)
    for t in (torch.tensor(theta), jnp.asarray(theta, jnp.float32)):
        y = np.asarray(perturbed(sign_solver, num_samples=N, sigma=SIGMA, noise="normal",
                                 seed=3)(t[:, None]))[:, 0]
        assert (np.abs(y - m) <= K * se).all(), (y, m)


def test_monte_carlo_error_shrinks_like_one_over_sqrt_n():
    """R independent problems in one batch; their RMS error, times sqrt(N), must equal the
    exact standard deviation sqrt(sum p(1-p)) (so the error is ~ 1/sqrt(N), no bias)."""
    R = 400
    p = softmax(THETA / SIGMA)
    exact_sd = np.sqrt((p * (1 - p)).sum())
    theta = torch.tensor(np.tile(THETA, (R, 1)))
    rms = []
    Ns = [16, 64, 256, 1024]
    for N in Ns:
        y = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=N)(theta).numpy()
        rms.append(np.sqrt(((y - p) ** 2).sum(-1).mean()))
    scaled = np.array(rms) * np.sqrt(Ns) / exact_sd
    # The MSE over R replicates has relative sd ~ sqrt(2/R) ~ 0.07; 4 sd on the RMS ~ 0.15.
    assert (np.abs(scaled - 1) < 4 * np.sqrt(2 / R) / 2 + 0.02).all(), scaled
    slope = np.polyfit(np.log(Ns), np.log(rms), 1)[0]
    assert abs(slope + 0.5) < 0.05, slope


# ----------------------------------------------------------------------------- gradients


def _jacobian_replicates(layer_factory, R, theta):
    """R independent Jacobian estimates (one per batch copy) via torch autograd."""
    n = theta.shape[-1]
    t = torch.tensor(np.tile(theta, (R, 1)), requires_grad=True)
    layer = layer_factory()
    rows = []
    y = layer(t)
    for i in range(n):
        (g,) = torch.autograd.grad(y[:, i].sum(), t, retain_graph=True)
        rows.append(g.numpy())
    return np.stack(rows, axis=1)  # (R, n_out, n_in)


@pytest.mark.parametrize("control_variate", [False, True])
def test_gumbel_argmax_jacobian_is_softmax_jacobian(control_variate):
    R, N = 200, 500
    Js = _jacobian_replicates(lambda: perturbed(argmax_onehot, num_samples=N, sigma=SIGMA,
                                                control_variate=control_variate, seed=4), R, THETA)
    mean, se = Js.mean(0), Js.std(0, ddof=1) / np.sqrt(R)
    exact = softmax_jacobian(THETA, SIGMA)
    assert (np.abs(mean - exact) <= K * se + 1e-12).all(), np.abs(mean - exact) / se


def test_control_variate_keeps_the_mean_and_cuts_the_variance():
    R, N = 200, 200
    theta = np.array([2.0, 0.0, -1.0, 0.5])
    plain = _jacobian_replicates(lambda: perturbed(argmax_onehot, num_samples=N, sigma=SIGMA,
                                                   seed=5), R, theta)
    cv = _jacobian_replicates(lambda: perturbed(argmax_onehot, num_samples=N, sigma=SIGMA,
                                                control_variate=True, seed=5), R, theta)
    assert cv.var(0).sum() < 0.5 * plain.var(0).sum()


def test_normal_perturbed_sign_derivative_is_gaussian_density():
    R, N = 200, 500
    theta = np.array([-0.3, 0.0, 0.2])
    t = torch.tensor(np.tile(theta[:, None], (R, 1, 1)), requires_grad=True)
    y = perturbed(sign_solver, num_samples=N, sigma=SIGMA, noise="normal", seed=6)(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    d = g.numpy()[..., 0]  # the Jacobian is diagonal: one derivative per coordinate
    exact = 2 * norm.pdf(theta / SIGMA) / SIGMA
    se = d.std(0, ddof=1) / np.sqrt(R)
    assert (np.abs(d.mean(0) - exact) <= K * se).all(), (d.mean(0), exact)


def test_gradient_of_perturbed_max_is_perturbed_argmax_same_samples():
    theta = torch.tensor(np.random.default_rng(0).normal(size=(3, 6)), requires_grad=True)
    F = perturbed_max(argmax_onehot, num_samples=300, sigma=SIGMA, seed=7)(theta)
    (g,) = torch.autograd.grad(F.sum(), theta)
    y = perturbed(argmax_onehot, num_samples=300, sigma=SIGMA, seed=7)(theta)
    np.testing.assert_array_equal(g.numpy(), y.detach().numpy())


def test_fenchel_young_gradient_is_y_sigma_minus_y():
    theta = torch.tensor(np.random.default_rng(1).normal(size=(4, 5)), requires_grad=True)
    target = argmax_onehot(torch.randn(4, 5, dtype=torch.float64))
    loss = fenchel_young_loss(argmax_onehot, num_samples=300, sigma=SIGMA, seed=8)
    (g,) = torch.autograd.grad(loss(theta, target).sum(), theta)
    y = perturbed(argmax_onehot, num_samples=300, sigma=SIGMA, seed=8)(theta).detach()
    np.testing.assert_allclose(g.numpy(), (y - target).numpy(), atol=1e-15)
    # ... and the loss is F_sigma - <theta, y> with the closed form of F_sigma.
    N = 20000
    loss_big = fenchel_young_loss(argmax_onehot, num_samples=N, sigma=SIGMA, seed=9)
    value = loss_big(theta.detach(), target).numpy()
    th = theta.detach().numpy()
    exact = SIGMA * logsumexp(th / SIGMA, axis=-1) + SIGMA * GAMMA - (th * target.numpy()).sum(-1)
    assert (np.abs(value - exact) <= K * SIGMA * math.pi / math.sqrt(6 * N)).all()


def test_fenchel_young_for_a_minimizing_solver_flips_the_sign():
    costs = torch.rand(2, 5, 5, dtype=torch.float64, requires_grad=True)
    target = shortest_path_grid(torch.rand(2, 5, 5, dtype=torch.float64))
    loss = fenchel_young_loss(shortest_path_grid, num_samples=50, sigma=0.2, seed=10)
    assert loss.sense == "min"
    (g,) = torch.autograd.grad(loss(costs, target).sum(), costs)
    y = perturbed(shortest_path_grid, num_samples=50, sigma=0.2, seed=10)(costs).detach()
    np.testing.assert_allclose(g.numpy(), (target - y).numpy(), atol=1e-15)


def test_fenchel_young_loss_is_minimized_at_the_softmax_preimage():
    # y_sigma(theta) = p  <=>  theta = sigma*log p (+c): the gradient vanishes there, and
    # gradient descent on the loss recovers it.
    p = np.array([0.1, 0.2, 0.7])
    theta_star = SIGMA * log_softmax(np.log(p))
    loss = fenchel_young_loss(argmax_onehot, num_samples=20000, sigma=SIGMA, seed=11)
    theta = torch.tensor(theta_star, requires_grad=True)
    (g,) = torch.autograd.grad(loss(theta, torch.tensor(p)), theta)
    assert (np.abs(g.numpy()) <= K * np.sqrt(p * (1 - p) / 20000)).all()


# ----------------------------------------------------------------------------- jax


def test_jax_gradients_jit_vmap_and_hessian():
    theta = jnp.asarray(THETA, jnp.float32)
    key = jax.random.PRNGKey(0)
    layer = perturbed(argmax_onehot, num_samples=1000, sigma=SIGMA)
    Jr = jax.jacrev(lambda t: layer(t, key=key))(theta)
    Jf = jax.jacfwd(lambda t: layer(t, key=key))(theta)
    np.testing.assert_allclose(Jr, Jf, rtol=1e-5, atol=1e-6)
    Jj = jax.jit(jax.jacrev(lambda t, k: layer(t, key=k)))(theta, key)
    np.testing.assert_allclose(Jj, Jr, rtol=1e-5, atol=1e-6)
    # grad F_sigma = y_sigma and Hessian F_sigma = the perturbed Jacobian (same key).
    fmax = perturbed_max(argmax_onehot, num_samples=1000, sigma=SIGMA)
    np.testing.assert_allclose(jax.grad(lambda t: fmax(t, key=key))(theta),
                               layer(theta, key=key), rtol=1e-6)
    np.testing.assert_allclose(jax.hessian(lambda t: fmax(t, key=key))(theta), Jr,
                               rtol=1e-4, atol=1e-5)
    # vmap over theta equals the batched call with the same key per row.
    batch = jnp.stack([theta, 2 * theta])
    vm = jax.vmap(lambda t: layer(t, key=key))(batch)
    np.testing.assert_allclose(vm[1], layer(2 * theta, key=key), rtol=1e-6)


def test_jax_jacobian_replicates_match_softmax_jacobian():
    R, N = 200, 500
    layer = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA)
    t = jnp.asarray(np.tile(THETA, (R, 1)), jnp.float32)
    J = jax.jacrev(lambda x: layer(x, key=jax.random.PRNGKey(1)).sum(0))(t)  # (n_out, R, n_in)
    J = np.asarray(J).transpose(1, 0, 2)
    mean, se = J.mean(0), J.std(0, ddof=1) / np.sqrt(R)
    assert (np.abs(mean - softmax_jacobian(THETA, SIGMA)) <= K * se + 1e-6).all()


def test_jax_topk_perturbed_under_jit_matches_torch_in_distribution():
    theta = np.array([0.5, 0.1, -0.2, 0.9, 0.0])
    N = 20000
    yj = np.asarray(jax.jit(perturbed(topk_mask(2), num_samples=N, sigma=SIGMA))(
        jnp.asarray(theta, jnp.float32)))
    yt = perturbed(topk_mask(2), num_samples=N, sigma=SIGMA)(torch.tensor(theta)).numpy()
    assert abs(yj.sum() - 2) < 1e-4 and abs(yt.sum() - 2) < 1e-12
    # two independent estimates of the same probabilities: difference within K * sqrt(2) se
    se = np.sqrt(yt * (1 - yt) / N)
    assert (np.abs(yj - yt) <= K * np.sqrt(2) * se + 1e-6).all()


# ----------------------------------------------------------------------------- seeds and devices


def test_torch_seed_reproducible_and_generator_advances():
    # near-ties at sigma = 0.1, so that different noise gives different averages
    theta = 0.05 * torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = perturbed(argmax_onehot, num_samples=50, seed=3)
    b = perturbed(argmax_onehot, num_samples=50, seed=3)
    first = a(theta)
    np.testing.assert_array_equal(first.numpy(), b(theta).numpy())
    second = a(theta)
    assert not torch.equal(first, second)  # fresh noise at the next call
    np.testing.assert_array_equal(second.numpy(), b(theta).numpy())  # the same sequence
    # a user generator decides the noise of that call and is advanced by it
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from_g = a(theta, generator=g1)
    np.testing.assert_array_equal(from_g.numpy(), b(theta, generator=g2).numpy())
    assert not torch.equal(from_g, a(theta, generator=g1))


def test_jax_key_reproducible():
    layer = perturbed(argmax_onehot, num_samples=50, sigma=1.0)
    t = jnp.ones((2, 4))
    np.testing.assert_array_equal(layer(t, key=jax.random.PRNGKey(5)), layer(t, key=jax.random.PRNGKey(5)))
    assert not np.array_equal(layer(t, key=jax.random.PRNGKey(5)), layer(t, key=jax.random.PRNGKey(6)))
    np.testing.assert_array_equal(layer(t), layer(t, key=jax.random.PRNGKey(0)))


def test_float32_noise_never_infinite():
    # 2^24 uniforms would hit 0 about once; the clamp keeps every sample finite.
    theta = torch.zeros(64, 100)
    F = perturbed_max(argmax_onehot, num_samples=3000, sigma=1.0)(theta)
    assert torch.isfinite(F).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_on_device_and_reproducible():
    theta = torch.randn(8, 10, device="cuda", requires_grad=True)
    layer = perturbed(argmax_onehot, num_samples=100, seed=1)
    y = layer(theta)
    assert y.device.type == "cuda"
    y.sum().backward()
    np.testing.assert_array_equal(
        perturbed(argmax_onehot, num_samples=100, seed=1)(theta).detach().cpu().numpy(),
        y.detach().cpu().numpy())


# ----------------------------------------------------------------------------- other solvers


def test_perturbed_rank_and_sort_are_doubly_consistent():
    theta = torch.tensor([[0.2, -0.3, 0.9, 0.1]], dtype=torch.float64)
    r = perturbed(hard_rank, num_samples=2000, sigma=0.3, seed=12)(theta)
    P = perturbed(sort_permutation, num_samples=2000, sigma=0.3, seed=12)(theta)
    # same samples: E[rank] = E[P]^T (1..n), and E[P] is doubly stochastic
    np.testing.assert_allclose(r.numpy(), torch.einsum("bij,i->bj", P, torch.arange(1.0, 5, dtype=torch.float64)).numpy())
    np.testing.assert_allclose(P.sum(-1).numpy(), 1)
    np.testing.assert_allclose(P.sum(-2).numpy(), 1)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma must be a finite number > 0, got 0.0"),
    ({"sigma": -1}, "sigma must be"),
    ({"sigma": float("nan")}, "sigma must be"),
    ({"num_samples": 0}, "num_samples must be an int >= 1, got 0"),
    ({"num_samples": 2.5}, "num_samples"),
    ({"noise": "cauchy"}, "noise must be 'gumbel', 'normal' or a distribution object.*got 'cauchy'"),
    ({"seed": -1}, "seed"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perturbed(argmax_onehot, **kwargs)
    with pytest.raises(ValueError, match=match):
        fenchel_young_loss(argmax_onehot, **kwargs)


def test_bad_theta_raises_eagerly_and_is_nan_under_jit():
    layer = perturbed(argmax_onehot, num_samples=10)
    with pytest.raises(ValueError, match="non-finite.*nan"):
        layer(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        layer(jnp.array([1.0, jnp.inf]))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="control_variate"):
        perturbed(argmax_onehot, control_variate=1)
    out = np.asarray(jax.jit(lambda t: layer(t))(jnp.array([[1.0, jnp.nan], [0.0, 1.0]])))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_solver_contract_violations_are_explained():
    with pytest.raises(ValueError, match="theta's event shape"):
        perturbed_max(sort_permutation, num_samples=5)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="keep the leading"):
        perturbed(lambda x: x.sum(0), num_samples=5, batched=True)(torch.randn(2, 3))
    loss = fenchel_young_loss(argmax_onehot, num_samples=5)
    with pytest.raises(ValueError, match="y must have theta's shape"):
        loss(torch.randn(2, 3), torch.zeros(3))
    with pytest.raises(TypeError, match="same framework"):
        loss(torch.randn(3), np.zeros(3))


def test_layers_explain_themselves():
    layer = perturbed(topk_mask(3), num_samples=7, sigma=0.2, control_variate=True)
    assert "7 samples" in layer.explain() and "control variate" in layer.explain()
    assert layer.to_json()["num_samples"] == 7
    assert "y - y_sigma" in fenchel_young_loss(shortest_path_grid).explain()


def test_empty_batch_gives_empty_results_and_gradients():
    theta = torch.zeros(0, 4, requires_grad=True)
    y = perturbed(argmax_onehot, num_samples=5)(theta)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert theta.grad.shape == (0, 4)
    g = jax.grad(lambda t: perturbed(argmax_onehot, num_samples=5)(t).sum())(jnp.zeros((0, 4)))
    assert g.shape == (0, 4)


@pytest.mark.parametrize("noise, control_variate", [("gumbel", True), ("normal", False)])
def test_jax_estimator_variants_are_unbiased(noise, control_variate):
    """jax control variate (Gumbel argmax vs softmax Jacobian) and normal noise (sign vs
    the Gaussian density), as replicate z-tests."""
    R, N = 200, 500
    if noise == "gumbel":
        theta, solver = np.tile(THETA, (R, 1)), argmax_onehot
        exact = softmax_jacobian(THETA, SIGMA)
    else:
        base = np.array([-0.3, 0.0, 0.2])
        theta, solver = np.tile(base[:, None], (R, 1, 1)), sign_solver
        exact = 2 * norm.pdf(base / SIGMA) / SIGMA
    layer = perturbed(solver, num_samples=N, sigma=SIGMA, noise=noise,
                      control_variate=control_variate)
    t = jnp.asarray(theta, jnp.float32)
    if noise == "gumbel":
        J = jax.jacrev(lambda x: layer(x, key=jax.random.PRNGKey(2)).sum(0))(t)
        est = np.asarray(J).transpose(1, 0, 2)
    else:
        est = np.asarray(jax.grad(lambda x: layer(x, key=jax.random.PRNGKey(2)).sum())(t))[..., 0]
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(R)
    assert (np.abs(mean - exact) <= K * se + 1e-6).all(), np.abs(mean - exact) / se


def test_jax_fenchel_young_gradient_is_y_sigma_minus_y_under_jit():
    theta = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)
    target = jnp.eye(5, dtype=jnp.float32)[jnp.array([0, 3, 4])]
    key = jax.random.PRNGKey(4)
    loss = fenchel_young_loss(argmax_onehot, num_samples=200, sigma=SIGMA)
    g = jax.jit(jax.grad(lambda t: loss(t, target, key=key).sum()))(theta)
    y = perturbed(argmax_onehot, num_samples=200, sigma=SIGMA)(theta, key=key)
    np.testing.assert_allclose(np.asarray(g), np.asarray(y - target), atol=1e-6)


@pytest.mark.parametrize("noise", ["gumbel", "normal"])
def test_jax_noise_layout_keeps_distribution_and_global_flag(noise):
    """The fast threefry layout must give the same law and leave the user's setting alone."""
    from scipy.stats import gumbel_r, kstest

    from nonsmooth.solvers._perturbed_jax import draw_noise

    layer = perturbed(argmax_onehot, num_samples=20000, sigma=SIGMA, noise=noise)
    theta = jnp.zeros((3,), jnp.float32)
    before = jax.config.jax_threefry_partitionable
    Z, score = jax.jit(lambda t, k: draw_noise(layer, t, k))(theta, jax.random.PRNGKey(3))
    assert jax.config.jax_threefry_partitionable == before
    Z, score = np.asarray(Z, np.float64), np.asarray(score, np.float64)
    law = gumbel_r.cdf if noise == "gumbel" else norm.cdf
    for col in range(3):
        assert kstest(Z[:, col], law).pvalue > 1e-3
    # columns are independent draws: their correlation is within 5 standard errors of 0
    assert abs(np.corrcoef(Z[:, 0], Z[:, 1])[0, 1]) < K / math.sqrt(Z.shape[0])
    np.testing.assert_allclose(score, np.exp(-Z) if noise == "gumbel" else Z, rtol=1e-5)
    # the layer's output depends on the key only, not on the user's global layout choice
    t = jnp.asarray([0.3, -0.1, 0.2])
    flag_on = layer(t, key=jax.random.PRNGKey(8))
    with jax.threefry_partitionable(not before):
        flag_off = layer(t, key=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(flag_on, flag_off)
