"""Second derivatives of the perturbed layers against closed forms and numerical integration.

jax.hessian of a perturbed layer was once silently zero.  Every estimate here is compared
with an independent oracle in units of its own standard error over R independent
replicates (one per batch row or vmapped element), so a zero, a missing term of the
second-order estimator or a wrong sign fails by many standard errors.
"""
import functools
import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import softmax
from scipy.stats import norm

from nonsmooth.solvers import argmax_onehot, perturbed, perturbed_max

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

K = 5.0  # standard errors allowed; fixed seeds make each test deterministic


def assert_within(estimates, exact, k=K, floor=1e-9):
    """Replicates (R, ...) agree with the exact array within k standard errors."""
    est = np.asarray(estimates, np.float64)
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(est.shape[0])
    z = np.abs(mean - exact) / np.maximum(se, floor)
    assert (z <= k).all(), (mean, exact, z.max())


def half_squared_norm(X):
    """f(x) = |x|^2 / 2 on the last axis, batched: E f(theta + sigma Z) has Hessian I."""
    return 0.5 * (X ** 2).sum(-1)


THETA3 = np.array([0.3, -0.2, 0.5])


@pytest.mark.parametrize("noise", ["gumbel", "normal"])
def test_torch_hessian_of_perturbed_half_squared_norm_is_identity(noise):
    # optax's own test expects this (Hessian of the perturbed 1/2 |x|^2 close to I).
    R, N = 100, 2000
    layer = perturbed(half_squared_norm, num_samples=N, sigma=0.5, noise=noise, seed=1,
                      control_variate=True, batched=True)
    thetas = torch.tensor(np.tile(THETA3, (R, 1)))
    # vmap gives each replicate its own noise; hessian = jacfwd(jacrev): forward over reverse
    H = torch.func.vmap(torch.func.hessian(layer))(thetas).numpy()
    assert (np.abs(H).sum(axis=(1, 2)) > 0.1).all()  # never the silent zero
    assert_within(H, np.eye(3))
    # double backward (reverse over reverse) through the batched layer
    t = thetas.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(t).sum(), t, create_graph=True)
    H2 = np.stack([torch.autograd.grad(g[:, j].sum(), t, retain_graph=True)[0].numpy()
                   for j in range(3)], axis=1)  # (R, 3, 3)
    assert_within(H2, np.eye(3))


@pytest.mark.parametrize("noise", ["gumbel", "normal"])
def test_jax_hessian_of_perturbed_half_squared_norm_is_identity(noise):
    R, N = 100, 2000
    layer = perturbed(half_squared_norm, num_samples=N, sigma=0.5, noise=noise,
                      control_variate=True, batched=True)
    keys = jax.random.split(jax.random.PRNGKey(0), R)
    thetas = jnp.asarray(np.tile(THETA3, (R, 1)), jnp.float32)
    H = jax.jit(jax.vmap(jax.hessian(lambda t, k: layer(t, key=k))))(thetas, keys)
    H = np.asarray(H)
    assert (np.abs(H).sum(axis=(1, 2)) > 0.1).all()
    assert_within(H, np.eye(3))


def softmax_derivatives(theta, sigma):
    """p = softmax(theta / sigma), its Jacobian J[i, j] and second derivatives H[i, j, k]."""
    p = softmax(theta / sigma)
    n = len(p)
    eye = np.eye(n)
    J = (np.diag(p) - np.outer(p, p)) / sigma
    H = (J[:, None, :] * (eye - p[None, :])[:, :, None]
         - p[:, None, None] * J[None, :, :]) / sigma
    return p, J, H


def test_softmax_derivative_oracle_matches_finite_differences():
    # The closed form used below, checked against central differences of its Jacobian.
    theta, sigma, h = np.array([0.3, -0.5, 1.0, 0.2]), 0.7, 1e-6
    _, _, H = softmax_derivatives(theta, sigma)
    for k in range(4):
        e = np.eye(4)[k] * h
        fd = (softmax_derivatives(theta + e, sigma)[1] - softmax_derivatives(theta - e, sigma)[1]) / (2 * h)
        np.testing.assert_allclose(H[:, :, k], fd, atol=1e-8)


THETA4 = np.array([0.3, -0.5, 1.0, 0.2])
SIGMA = 0.7


def test_torch_second_derivative_of_gumbel_argmax_is_softmax_second_derivative():
    R, N = 200, 1000
    _, _, H = softmax_derivatives(THETA4, SIGMA)
    layer = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, control_variate=True, seed=2, fused=False)
    t = torch.tensor(np.tile(THETA4, (R, 1)), requires_grad=True)
    y = layer(t)
    est = np.zeros((R, 4, 4, 4))
    for i in range(4):
        (gi,) = torch.autograd.grad(y[:, i].sum(), t, create_graph=True)
        for j in range(4):
            (hij,) = torch.autograd.grad(gi[:, j].sum(), t, retain_graph=True)
            est[:, i, j, :] = hij.numpy()
    assert_within(est, H)


def test_jax_second_derivative_of_gumbel_argmax_is_softmax_second_derivative():
    R, N = 200, 1000
    _, _, H = softmax_derivatives(THETA4, SIGMA)
    layer = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, control_variate=True, fused=False)
    keys = jax.random.split(jax.random.PRNGKey(1), R)
    theta = jnp.asarray(THETA4, jnp.float32)
    est = jax.jit(jax.vmap(lambda k: jax.hessian(lambda t: layer(t, key=k))(theta)))(keys)
    assert_within(np.asarray(est), H)


def test_third_derivative_of_gumbel_max_is_softmax_second_derivative():
    # F_sigma = sigma logsumexp(theta/sigma) + const: its third derivative is the softmax's
    # second derivative (jax: jacfwd of hessian; the estimator of every order is defined).
    R, N = 200, 1000
    _, _, H = softmax_derivatives(THETA4, SIGMA)
    fmax = perturbed_max(argmax_onehot, num_samples=N, sigma=SIGMA, control_variate=True, fused=False)
    keys = jax.random.split(jax.random.PRNGKey(2), R)
    theta = jnp.asarray(THETA4, jnp.float32)
    T = jax.jit(jax.vmap(lambda k: jax.jacfwd(jax.hessian(lambda t: fmax(t, key=k)))(theta)))(keys)
    assert_within(np.asarray(T), H)


# ----------------------------------------------------------------------------- normal noise vs quad


def normal_argmax_by_quadrature(theta, sigma):
    """E[max_i(theta_i + sigma Z_i)] and P(i is the argmax) for iid standard normal Z, by 1-D
    quadrature over the value t of the winner: density phi((t - theta_i)/sigma)/sigma times
    prod_{j != i} Phi((t - theta_j)/sigma)."""
    n = len(theta)
    lo, hi = theta.min() - 12 * sigma, theta.max() + 12 * sigma

    def win(i, t):
        others = [norm.cdf((t - theta[j]) / sigma) for j in range(n) if j != i]
        return norm.pdf((t - theta[i]) / sigma) / sigma * np.prod(others, axis=0)

    opts = dict(epsabs=1e-13, epsrel=1e-12, limit=200)
    p = np.array([integrate.quad(lambda t: win(i, t), lo, hi, **opts)[0] for i in range(n)])
    F = sum(integrate.quad(lambda t: t * win(i, t), lo, hi, **opts)[0] for i in range(n))
    return F, p


def test_quadrature_oracle_matches_the_two_variable_closed_form():
    # d = 2: E max = theta_2 + D Phi(D/s) + s phi(D/s), D = theta_1 - theta_2, s = sigma sqrt 2
    theta, sigma = np.array([0.4, -0.1]), 0.6
    F, p = normal_argmax_by_quadrature(theta, sigma)
    D, s = theta[0] - theta[1], sigma * math.sqrt(2)
    assert abs(F - (theta[1] + D * norm.cdf(D / s) + s * norm.pdf(D / s))) < 1e-10
    assert abs(p[0] - norm.cdf(D / s)) < 1e-10


@functools.lru_cache(maxsize=None)
def _quadrature_oracle(theta_tuple, sigma):
    theta = np.array(theta_tuple)
    F, p = normal_argmax_by_quadrature(theta, sigma)
    h = 1e-4  # the quadrature is smooth in theta: central differences of p give its Jacobian
    J = np.stack([(normal_argmax_by_quadrature(theta + h * e, sigma)[1]
                   - normal_argmax_by_quadrature(theta - h * e, sigma)[1]) / (2 * h)
                  for e in np.eye(3)], axis=1)
    return F, p, J


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_normal_perturbed_max_value_gradient_hessian_match_quadrature(framework):
    theta, sigma = np.array([0.2, -0.3, 0.1]), 0.5
    F, p, J = _quadrature_oracle(tuple(theta), sigma)
    R, N = 100, 2000
    fmax = perturbed_max(argmax_onehot, num_samples=N, sigma=sigma, noise="normal",
                         control_variate=True, seed=3)
    if framework == "torch":
        thetas = torch.tensor(np.tile(theta, (R, 1)))
        value = fmax(thetas).numpy()
        grad = torch.func.vmap(torch.func.grad(fmax))(thetas).numpy()
        hess = torch.func.vmap(torch.func.hessian(fmax))(thetas).numpy()
    else:
        keys = jax.random.split(jax.random.PRNGKey(3), R)
        t = jnp.asarray(theta, jnp.float32)
        value = np.asarray(jax.vmap(lambda k: fmax(t, key=k))(keys))
        grad = np.asarray(jax.vmap(lambda k: jax.grad(lambda x: fmax(x, key=k))(t))(keys))
        hess = np.asarray(jax.vmap(lambda k: jax.hessian(lambda x: fmax(x, key=k))(t))(keys))
    assert_within(value, F)
    assert_within(grad, p)
    assert_within(hess, J)


def test_fused_path_raises_on_second_derivatives_of_the_mean_and_says_what_to_do():
    """The fused kernel computes first derivatives only; a second derivative of perturbed(...)
    raises and names fused=False, never a silent number."""
    torch = pytest.importorskip("torch")
    layer = perturbed(argmax_onehot, num_samples=100, sigma=0.5)
    theta = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(theta)[0, 0], theta, create_graph=True)
    with pytest.raises(RuntimeError, match="fused=False"):
        torch.autograd.grad(g.sum(), theta)
    jax = pytest.importorskip("jax")
    with pytest.raises(NotImplementedError, match="fused=False"):
        jax.hessian(lambda t: layer(t)[0, 0])(jax.numpy.zeros((1, 3)))
