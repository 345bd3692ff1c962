"""Perturbed layers on the inputs peers' users bring: extreme sigmas, per-instance solvers
(jaxopt's documented ``argmax_fun``), pytrees (optax), and noise given as a distribution
object.  Oracles: closed forms (softmax, the Laplace and normal CDFs), in units of the
estimator's standard error."""
import math

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import laplace

from nonsmooth.solvers import argmax_onehot, fenchel_young_loss, perturbed, perturbed_max

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

K = 5.0
THETA = np.array([0.3, -0.5, 1.0, 0.2])
SIGMA = 0.5


def assert_binomial(y, p, N):
    """Each coordinate of y is a mean of N Bernoulli(p) draws."""
    se = np.sqrt(p * (1 - p) / N)
    assert (np.abs(np.asarray(y, np.float64) - p) <= K * se + 1e-6).all(), (y, p)


# ----------------------------------------------------------------------------- sigma range


@pytest.mark.parametrize("sigma", [1e308, 5e-324, 1e-310, 2e306])
def test_sigmas_outside_the_finite_range_raise_at_construction(sigma):
    with pytest.raises(ValueError, match=r"sigma=.* is outside \[.*\], where the estimator stays"):
        perturbed(argmax_onehot, sigma=sigma)
    with pytest.raises(ValueError, match=r"sigma=.* is outside"):
        fenchel_young_loss(argmax_onehot, sigma=sigma)


def test_sigma_range_follows_the_input_dtype():
    layer = perturbed(argmax_onehot, num_samples=10, sigma=1e-40)  # fine in float64
    assert np.isfinite(layer(np.zeros((2, 3)))).all()
    t64 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    layer(t64).sum().backward()
    assert torch.isfinite(t64.grad).all()
    for x in (np.zeros((2, 3), np.float32), torch.zeros(2, 3), jnp.zeros((2, 3), jnp.float32)):
        with pytest.raises(ValueError, match=r"sigma=1e-40 is outside .* in .*float32"):
            layer(x)
    with pytest.raises(ValueError, match="outside"):
        jax.jit(layer)(jnp.zeros((2, 3), jnp.float32))  # a static check: raises under jit too


def test_theta_that_would_overflow_raises_eagerly_and_is_nan_under_jit():
    layer = perturbed(argmax_onehot, num_samples=10, sigma=1e305)
    big = np.array([[1.79e308, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="theta \\+ sigma Z would overflow"):
        layer(torch.tensor(big))
    with pytest.raises(ValueError, match="would overflow"):
        layer(big)
    small = perturbed(argmax_onehot, num_samples=10, sigma=1e36)
    f32 = np.array([[3.3e38, 0.0], [0.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="would overflow"):
        small(jnp.asarray(f32))
    out = np.asarray(jax.jit(small)(jnp.asarray(f32)))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_gradients_stay_finite_across_the_valid_sigma_range():
    theta = torch.tensor([[0.0, 1e-3, -1e-3]], dtype=torch.float64)
    for sigma in (1e-300, 1e-8, 1.0, 1e8, 1e300):
        t = theta.clone().requires_grad_()
        layer = perturbed(argmax_onehot, num_samples=100, sigma=sigma, control_variate=True)
        layer(t).sum().backward()
        assert torch.isfinite(t.grad).all(), sigma


# ----------------------------------------------------------------------------- per-instance solvers


def jaxopt_argmax_fun(x):
    """jaxopt's documented example: a solver for ONE instance (1-D x)."""
    return jax.nn.one_hot(jnp.argmax(x), x.shape[0])


def test_jaxopt_per_instance_argmax_fun_is_detected_and_vmapped():
    N = 20000
    layer = perturbed(jaxopt_argmax_fun, num_samples=N, sigma=SIGMA)
    y = layer(jnp.asarray(THETA, jnp.float32))   # once a silent scalar 0.0
    assert y.shape == (4,)
    assert_binomial(y, softmax(THETA / SIGMA), N)
    yb = jax.jit(layer)(jnp.asarray(np.stack([THETA, -THETA]), jnp.float32))
    assert yb.shape == (2, 4)
    assert_binomial(yb[1], softmax(-THETA / SIGMA), N)
    # the explicit flag gives the same numbers without a probe
    explicit = perturbed(jaxopt_argmax_fun, num_samples=N, sigma=SIGMA, batched=False)
    np.testing.assert_array_equal(explicit(jnp.asarray(THETA, jnp.float32)), y)
    g = jax.grad(lambda t: layer(t)[2])(jnp.asarray(THETA, jnp.float32))
    assert g.shape == (4,) and np.abs(np.asarray(g)).sum() > 0


def test_torch_per_instance_solver_is_vmapped_and_numpy_looped():
    def one_hot_of_argmax(x):  # one instance, written for 1-D input
        return torch.nn.functional.one_hot(x.argmax(), x.shape[0]).to(x.dtype)

    N = 20000
    layer = perturbed(one_hot_of_argmax, num_samples=N, sigma=SIGMA)
    y = layer(torch.tensor(THETA))
    assert_binomial(y.numpy(), softmax(THETA / SIGMA), N)

    def np_argmax_one(x):
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0  # 1-D only: on a stack this indexes a whole row
        return out

    assert_binomial(perturbed(np_argmax_one, num_samples=N, sigma=SIGMA)(THETA),
                    softmax(THETA / SIGMA), N)


def test_unvmappable_per_instance_solver_is_looped():
    def data_dependent(x):  # PyEPO-style: one instance, Python branching on its values
        if float(x[0]) > 0:
            return torch.ones_like(x)
        return torch.zeros_like(x)

    N = 4000
    layer = perturbed(data_dependent, num_samples=N, noise="normal", batched=False)
    y = layer(torch.zeros(2, 3, dtype=torch.float64)).numpy()  # P(Z_0 > 0) = 1/2
    assert (np.abs(y - 0.5) <= K * math.sqrt(0.25 / N)).all()


def test_batched_flag_is_validated():
    with pytest.raises(TypeError, match="batched must be None"):
        perturbed(argmax_onehot, batched="yes")


# ----------------------------------------------------------------------------- pytrees


def test_jax_pytree_theta_and_pytree_solver_output():
    tree = {"a": jnp.array([0.3, -0.5]), "b": jnp.array([1.0, 0.2])}
    flat = np.array([0.3, -0.5, 1.0, 0.2])

    def tree_argmax(t):  # batched over the leading sample axis of every leaf
        x = jnp.concatenate([t["a"], t["b"]], axis=-1)
        oh = jax.nn.one_hot(jnp.argmax(x, -1), 4)
        return {"a": oh[..., :2], "b": oh[..., 2:]}

    N = 20000
    layer = perturbed(tree_argmax, num_samples=N, sigma=SIGMA)
    y = layer(tree, key=jax.random.PRNGKey(0))
    p = softmax(flat / SIGMA)
    assert_binomial(np.concatenate([y["a"], y["b"]]), p, N)
    # gradients come back as a pytree; the estimator matches the softmax Jacobian row
    R = 100
    keys = jax.random.split(jax.random.PRNGKey(1), R)
    small = perturbed(tree_argmax, num_samples=500, sigma=SIGMA, control_variate=True)
    grads = jax.vmap(lambda k: jax.grad(lambda t: small(t, key=k)["b"][0])(tree))(keys)
    est = np.concatenate([np.asarray(grads["a"]), np.asarray(grads["b"])], axis=1)
    exact = ((np.diag(p) - np.outer(p, p)) / SIGMA)[2]
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(R)
    assert (np.abs(mean - exact) <= K * se).all()
    # perturbed_max on a pytree: value and gradient pytree
    fmax = perturbed_max(tree_argmax, num_samples=N, sigma=SIGMA)
    g = jax.grad(lambda t: fmax(t, key=jax.random.PRNGKey(0)))(tree)
    np.testing.assert_allclose(np.concatenate([g["a"], g["b"]]),
                               np.concatenate([y["a"], y["b"]]), atol=1e-6)


def test_pytree_with_nonfinite_leaf_raises():
    layer = perturbed(lambda t: t, num_samples=3)
    with pytest.raises(ValueError, match="non-finite"):
        layer({"a": jnp.array([1.0, jnp.nan])})


# ----------------------------------------------------------------------------- noise objects


class LaplaceNoise:
    """A distribution object in optax's/jaxopt's protocol: sample(key, shape), log_prob(z)."""

    def sample(self, key, shape, dtype=jnp.float32):
        return jax.random.laplace(key, shape, dtype)

    def log_prob(self, z):
        return -jnp.abs(z)


def sign_solver(x):
    if isinstance(x, torch.Tensor):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


LAPLACE_THETA = np.array([-0.4, -0.05, 0.1, 0.6])


def laplace_sign_closed_form(theta, sigma):
    """E sign(theta + sigma Z) = 1 - 2 F(-theta/sigma); derivative 2 f(theta/sigma) / sigma."""
    return 1 - 2 * laplace.cdf(-theta / sigma), 2 * laplace.pdf(theta / sigma) / sigma


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_laplace_noise_object_matches_closed_forms(framework):
    m, dm = laplace_sign_closed_form(LAPLACE_THETA, SIGMA)
    N, R = 20000, 100
    law = LaplaceNoise() if framework == "jax" else torch.distributions.Laplace(0.0, 1.0)
    layer = perturbed(sign_solver, num_samples=N, sigma=SIGMA, noise=law)
    small = perturbed(sign_solver, num_samples=500, sigma=SIGMA, noise=law)
    if framework == "jax":
        y = np.asarray(layer(jnp.asarray(LAPLACE_THETA[:, None], jnp.float32)))[:, 0]
        t = jnp.asarray(np.tile(LAPLACE_THETA[:, None], (R, 1, 1)), jnp.float32)
        d = np.asarray(jax.grad(lambda x: small(x).sum())(t))[..., 0]
    else:
        y = layer(torch.tensor(LAPLACE_THETA[:, None])).numpy()[:, 0]
        t = torch.tensor(np.tile(LAPLACE_THETA[:, None], (R, 1, 1)), requires_grad=True)
        small(t).sum().backward()
        d = t.grad.numpy()[..., 0]
    assert (np.abs(y - m) <= K * np.sqrt((1 - m ** 2) / N)).all(), (y, m)
    mean, se = d.mean(0), d.std(0, ddof=1) / math.sqrt(R)
    assert (np.abs(mean - dm) <= K * se).all(), (mean, dm)


def test_noise_object_errors_are_explained():
    with pytest.raises(ValueError, match="distribution object with sample and log_prob"):
        perturbed(argmax_onehot, noise=object())
    with pytest.raises(TypeError, match="torch.distributions.Distribution"):
        perturbed(argmax_onehot, num_samples=3, noise=LaplaceNoise())(torch.zeros(3))
    with pytest.raises(ValueError, match="has no icdf"):
        perturbed(argmax_onehot, num_samples=3,
                  noise=torch.distributions.StudentT(3.0))(torch.zeros(3))
    with pytest.raises(ValueError, match="must be scalar"):
        perturbed(argmax_onehot, num_samples=3,
                  noise=torch.distributions.Normal(torch.zeros(3), 1.0))(torch.zeros(3))
    with pytest.raises(TypeError, match="numpy inputs take noise='gumbel' or 'normal'"):
        perturbed(argmax_onehot, num_samples=3, noise=LaplaceNoise())(np.zeros(3))


# ----------------------------------------------------------------------------- jax transforms


def test_jax_jacfwd_jacrev_and_frozen_estimator_check_grads():
    from jax.test_util import check_grads

    # fused=False: the likelihood-ratio estimator of every order (the fused kernel raises on
    # the mean's second derivative)
    layer = perturbed(argmax_onehot, num_samples=60, sigma=SIGMA, control_variate=True, fused=False)
    key = jax.random.PRNGKey(4)
    with jax.enable_x64(True):
        t0 = jnp.asarray(THETA, jnp.float64)
        Jr = jax.jit(jax.jacrev(lambda t: layer(t, key=key)))(t0)
        Jf = jax.jit(jax.jacfwd(lambda t: layer(t, key=key)))(t0)
        np.testing.assert_allclose(Jr, Jf, rtol=1e-12, atol=1e-14)
        f = layer.freeze(t0, key=key)
        check_grads(f, (t0,), order=2, modes=("fwd", "rev"))
        # the layer's first and second derivatives at theta0 are the frozen function's
        np.testing.assert_allclose(Jr, jax.jacrev(f)(t0), rtol=1e-12, atol=1e-14)
        H = jax.jit(jax.hessian(lambda t: layer(t, key=key)[1]))(t0)
        np.testing.assert_allclose(H, jax.hessian(lambda t: f(t)[1])(t0), rtol=1e-10, atol=1e-12)


def test_freeze_is_for_perturbed_layers_only():
    with pytest.raises(ValueError, match="freeze\\(\\) is for perturbed layers"):
        perturbed_max(argmax_onehot).freeze(torch.zeros(3))


def test_jit_of_a_function_closing_over_a_concrete_theta():
    # theta is concrete but every jnp op inside jit is traced: the eager checks must not
    # try to branch on a traced value.
    layer = perturbed(argmax_onehot, num_samples=200, sigma=SIGMA)
    theta = jnp.asarray(THETA, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    y = jax.jit(jax.vmap(lambda k: layer(theta, key=k)))(keys)
    assert y.shape == (3, 4) and np.isfinite(np.asarray(y)).all()
