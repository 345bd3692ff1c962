"""Side by side with the peers users come from (optax, jaxopt, PyEPO); each test skips when
its peer is not installed.  Peers are an oracle of the *conventions* (what the same call
means there); Monte-Carlo comparisons allow K standard errors of both estimates, exact
ones (SPO+, arc order) must agree exactly."""
import math

import numpy as np
import pytest

from nonsmooth.solvers import (argmax_onehot, fenchel_young_loss, perturbed, shortest_path_edges,
                               spo_plus_loss)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

K = 5.0
THETA = np.array([0.3, -0.5, 1.0, 0.2])
SIGMA = 0.5


def assert_same_mean(a, b, k=K):
    """Replicates a (R, ...) and b (R, ...) estimate the same quantity."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    z = np.abs(a.mean(0) - b.mean(0)) / np.maximum(se, 1e-9)
    assert (z <= k).all(), (a.mean(0), b.mean(0), z.max())


def test_optax_hessian_test_case_and_noise_objects():
    optax_p = pytest.importorskip("optax.perturbations")

    def half_sq(x):  # optax: a function of one instance
        return 0.5 * jnp.sum(x ** 2)

    R, N = 60, 1000
    keys = jax.random.split(jax.random.PRNGKey(0), R)
    theta = jnp.asarray([0.3, -0.2, 0.5])
    theirs = optax_p.make_perturbed_fun(half_sq, num_samples=N, sigma=SIGMA)
    H_theirs = jax.jit(jax.vmap(lambda k: jax.hessian(lambda t: theirs(k, t))(theta)))(keys)
    ours = perturbed(half_sq, num_samples=N, sigma=SIGMA, noise=optax_p.Gumbel(),
                     control_variate=True)  # optax's use_baseline=True default
    H_ours = jax.jit(jax.vmap(lambda k: jax.hessian(lambda t: ours(t, key=k))(theta)))(keys)
    assert_same_mean(H_ours, H_theirs)
    H = np.asarray(H_ours, np.float64)   # and both are close to the exact Hessian I
    se = H.std(0, ddof=1) / math.sqrt(R)
    assert (np.abs(H.mean(0) - np.eye(3)) <= K * se).all()


def test_optax_argmax_values_and_gradients_side_by_side():
    optax_p = pytest.importorskip("optax.perturbations")

    def one_hot_argmax(x):
        return jax.nn.one_hot(jnp.argmax(x), x.shape[0])

    R, N = 60, 500
    keys = jax.random.split(jax.random.PRNGKey(1), R)
    theta = jnp.asarray(THETA, jnp.float32)
    theirs = optax_p.make_perturbed_fun(one_hot_argmax, num_samples=N, sigma=SIGMA)
    ours = perturbed(one_hot_argmax, num_samples=N, sigma=SIGMA, noise=optax_p.Normal(),
                     control_variate=True)
    theirs_n = optax_p.make_perturbed_fun(one_hot_argmax, num_samples=N, sigma=SIGMA,
                                          noise=optax_p.Normal())
    for a, b in ((ours, theirs_n),):
        ya = jax.jit(jax.vmap(lambda k: a(theta, key=k)))(keys)
        yb = jax.jit(jax.vmap(lambda k: b(k, theta)))(keys)
        assert_same_mean(ya, yb)
        Ja = jax.jit(jax.vmap(lambda k: jax.jacrev(lambda t: a(t, key=k))(theta)))(keys)
        Jb = jax.jit(jax.vmap(lambda k: jax.jacrev(lambda t: b(k, t))(theta)))(keys)
        assert_same_mean(Ja, Jb)
    del theirs


def test_jaxopt_documented_argmax_fun_side_by_side():
    jaxopt_p = pytest.importorskip("jaxopt.perturbations")

    def argmax_fun(x):  # jaxopt's docstring example: one instance per call
        return jax.nn.one_hot(jnp.argmax(x), x.shape[0])

    R, N = 60, 500
    keys = jax.random.split(jax.random.PRNGKey(2), R)
    theta = jnp.asarray(THETA, jnp.float32)
    theirs = jaxopt_p.make_perturbed_argmax(argmax_fun, num_samples=N, sigma=SIGMA,
                                            control_variate=True)
    ours = perturbed(argmax_fun, num_samples=N, sigma=SIGMA, control_variate=True)
    ya = jax.jit(jax.vmap(lambda k: ours(theta, key=k)))(keys)
    yb = jax.jit(jax.vmap(lambda k: theirs(theta, k)))(keys)
    assert ya.shape == yb.shape == (R, 4)
    assert_same_mean(ya, yb)
    Ja = jax.jit(jax.vmap(lambda k: jax.jacrev(lambda t: ours(t, key=k))(theta)))(keys)
    Jb = jax.jit(jax.vmap(lambda k: jax.jacrev(lambda t: theirs(t, k))(theta)))(keys)
    assert_same_mean(Ja, Jb)
    # ... and ours takes jaxopt's noise objects
    ours_n = perturbed(argmax_fun, num_samples=N, sigma=SIGMA, noise=jaxopt_p.Normal())
    assert ours_n(theta).shape == (4,)


# ----------------------------------------------------------------------------- PyEPO


def _pyepo_argmin_model(n):
    EPO = pytest.importorskip("pyepo").EPO
    from pyepo.model.opt import optModel

    class ArgminModel(optModel):
        """min <c, w> over the unit vectors, one instance per solve (PyEPO's interface)."""

        def __init__(self):
            self.n = n
            super().__init__()

        def _getModel(self):
            self.modelSense = EPO.MINIMIZE
            return None, list(range(n))

        def setObj(self, c):
            self._c = np.asarray(c, dtype=float)

        def solve(self):
            y = np.zeros(n)
            i = int(np.argmin(self._c))
            y[i] = 1.0
            return y, float(self._c[i])

    return ArgminModel()


def argmin_onehot(c):
    return torch.nn.functional.one_hot(c.argmin(-1), c.shape[-1]).to(c.dtype)


argmin_onehot.sense = "min"
argmin_onehot.batched = True


def test_pyepo_spo_plus_values_and_gradients_are_ours():
    pytest.importorskip("pyepo")
    from pyepo.func import SPOPlus

    rng = np.random.default_rng(0)
    n, B = 6, 16
    c = torch.tensor(rng.uniform(0.5, 2, size=(B, n)))
    chat = torch.tensor(rng.normal(1, 1, size=(B, n)))
    w = argmin_onehot(c)
    z = (w * c).sum(-1, keepdim=True)
    theirs = SPOPlus(_pyepo_argmin_model(n), reduction="none")
    p1 = chat.clone().requires_grad_()
    L1 = theirs(p1, c, w, z)
    L1.sum().backward()
    p2 = chat.clone().requires_grad_()
    L2 = spo_plus_loss(argmin_onehot)(p2, c, w, z)
    L2.sum().backward()
    torch.testing.assert_close(L2, L1.reshape(L2.shape).to(L2.dtype))
    torch.testing.assert_close(p2.grad, p1.grad.to(p2.dtype))


def test_pyepo_grid_arc_order_is_ours():
    pytest.importorskip("pyepo")
    from pyepo.model.utils import _get_grid_arcs

    for grid in ((5, 5), (2, 3), (4, 1), (1, 4)):
        assert shortest_path_edges(grid).arcs == _get_grid_arcs(grid)


def test_pyepo_dpo_and_pfyl_estimate_what_ours_estimate():
    pytest.importorskip("pyepo")
    from pyepo.func import perturbedFenchelYoung, perturbedOpt

    n, R, N = 4, 200, 100
    theta = torch.tensor(np.tile(THETA, (R, 1)))
    model = _pyepo_argmin_model(n)
    # PyEPO's defaults: normal noise, n_samples=10, sigma=1.0, seed=135; same law here.
    theirs = perturbedOpt(model, n_samples=N, sigma=1.0)
    ours = perturbed(argmin_onehot, num_samples=N, sigma=1.0, noise="normal")
    assert_same_mean(ours(theta).numpy(), theirs(theta).detach().numpy())
    # gradients of a linear probe
    g = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    t1, t2 = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    (ours(t1) * g).sum().backward()
    (theirs(t2) * g).sum().backward()
    assert_same_mean(t1.grad.numpy(), t2.grad.numpy())
    # PFYL: same loss (minimization: <c_hat, w> - E min), same gradient w - y_sigma
    w = argmin_onehot(torch.tensor(np.tile([0.5, 0.1, 0.9, 0.3], (R, 1))))
    pfy = perturbedFenchelYoung(model, n_samples=N, sigma=1.0, reduction="none")
    fy = fenchel_young_loss(argmin_onehot, num_samples=N, sigma=1.0, noise="normal")
    assert_same_mean(fy(theta, w).numpy(), pfy(theta, w).detach().numpy().reshape(R))
    t1, t2 = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    fy(t1, w).sum().backward()
    pfy(t2, w).sum().backward()
    assert_same_mean(t1.grad.numpy(), t2.grad.numpy())
    assert math.isfinite(float(t1.grad.sum()))
