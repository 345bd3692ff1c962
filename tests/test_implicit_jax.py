"""jax solvers and implicit differentiation: closed forms, jit/vmap, agreement with torch."""
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from nonsmooth.implicit import (  # noqa: E402
    implicit_model,
    project_rows_l1,
    ConvergenceError,
    ConvergenceWarning,
    deq,
    fixed_point,
    implicit_fixed_point,
    root,
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _problem(seed=0, n=6, p=3, batch=4):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, n))
    W *= 0.7 / np.linalg.norm(W, 2)
    U = rng.normal(size=(n, p))
    x = rng.normal(size=(batch, p))
    cot = rng.normal(size=(batch, n))
    return W, U, x, cot


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_linear_fixed_point_under_jit(x64, method):
    W, _, x, _ = _problem()
    c = np.random.default_rng(1).normal(size=(4, 6))
    Wj, cj = jnp.asarray(W), jnp.asarray(c)
    solve = jax.jit(lambda z0: fixed_point(lambda z: z @ Wj.T + cj, z0, method=method, tol=1e-12, max_iter=400))
    z, info = solve(jnp.zeros((4, 6)))
    np.testing.assert_allclose(np.asarray(z), np.linalg.solve(np.eye(6) - W, c.T).T, rtol=1e-9, atol=1e-10)
    assert info.all_converged
    assert np.asarray(info.steps).shape == (4,)


def test_root_closed_form(x64):
    z, info = root(lambda z: z - jnp.cos(z), jnp.zeros((3, 1)), tol=1e-12)
    np.testing.assert_allclose(np.asarray(z), 0.7390851332151607, rtol=1e-10)


@pytest.mark.parametrize("backward, solver", [
    ("implicit", None),
    pytest.param("implicit", "broyden", marks=pytest.mark.slow),
    pytest.param("implicit", "gmres", marks=pytest.mark.slow),
    pytest.param("unroll", None, marks=pytest.mark.slow),
])
def test_gradients_match_float64_finite_differences(x64, backward, solver):
    W, U, x, cot = map(jnp.asarray, _problem())

    def f(z, x):
        return jnp.tanh(z @ W.T + x @ U.T)

    def loss(x, mode=backward):
        z, _ = implicit_fixed_point(f, jnp.zeros((4, 6)), x, backward=mode, backward_solver=solver, tol=1e-12,
                                    max_iter=400)
        return jnp.sum(z * cot)

    g = jax.jit(jax.grad(loss))(x)
    # central differences along a few random directions, from one compiled forward
    value = jax.jit(lambda x: loss(x, "implicit"))
    h = 1e-6
    for d in np.random.default_rng(7).normal(size=(3, *x.shape)):
        fd = (value(x + h * d) - value(x - h * d)) / (2 * h)
        assert abs(float(fd) - float(jnp.sum(g * d))) < 1e-7 * (1 + abs(float(fd)))


def test_closure_parameters_get_gradients_and_jit_grad_works(x64):
    W, U, x, cot = map(jnp.asarray, _problem(2))

    def loss(W):
        z, _ = implicit_fixed_point(lambda z, x: jnp.tanh(z @ W.T + x @ U.T), jnp.zeros((4, 6)), x, tol=1e-12)
        return jnp.sum(z * cot)

    def loss_unroll(W):
        z, _ = implicit_fixed_point(lambda z, x: jnp.tanh(z @ W.T + x @ U.T), jnp.zeros((4, 6)), x, tol=1e-12,
                                    backward="unroll")
        return jnp.sum(z * cot)

    g = jax.jit(jax.grad(loss))(W)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(loss_unroll)(W)), rtol=1e-8, atol=1e-10)


def test_jfb_and_phantom_closed_forms(x64):
    a = 0.6
    f = lambda z, x: a * z + x  # noqa: E731
    for mode, expected in [("jfb", 1.0), ("implicit", 1 / (1 - a))]:
        g = jax.grad(lambda x: implicit_fixed_point(f, jnp.zeros((1, 1)), x, backward=mode, tol=1e-13)[0].sum())(
            jnp.ones((1, 1)))
        assert abs(float(g[0, 0]) - expected) < 1e-9
    k, lam = 4, 0.5
    g = jax.grad(lambda x: implicit_fixed_point(f, jnp.zeros((1, 1)), x, backward="phantom", phantom_steps=k,
                                                phantom_damping=lam, tol=1e-13)[0].sum())(jnp.ones((1, 1)))
    q = 1 - lam + lam * a
    assert abs(float(g[0, 0]) - lam * (1 - q ** k) / (1 - q)) < 1e-12


def test_jax_and_torch_agree_on_a_relu_deq(x64):
    torch = pytest.importorskip("torch")
    from nonsmooth.implicit import DEQ

    W, U, x, cot = _problem(3, n=8, p=3, batch=5)
    Wt, Ut = torch.tensor(W, requires_grad=True), torch.tensor(U)
    layer_t = DEQ(lambda z, x: torch.relu(z @ Wt.T + x @ Ut.T), state_shape=(8,), tol=1e-12)
    z_t = layer_t(torch.tensor(x))
    (z_t * torch.tensor(cot)).sum().backward()

    layer_j = deq(lambda p, z, x: jax.nn.relu(z @ p.T + x @ jnp.asarray(U).T), state_shape=(8,), tol=1e-12)
    z_j = layer_j(jnp.asarray(W), jnp.asarray(x))
    g_j = jax.grad(lambda W: jnp.sum(layer_j(W, jnp.asarray(x)) * cot))(jnp.asarray(W))
    np.testing.assert_allclose(np.asarray(z_j), z_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g_j), Wt.grad.numpy(), rtol=1e-8, atol=1e-10)


def test_deq_composes_with_vmap_and_reports_backward_info(x64):
    records = []
    f = lambda p, z, x: jnp.tanh(z @ p.T + x)  # noqa: E731
    layer = deq(f, tol=1e-10, on_backward=records.append, with_info=True)
    p = 0.4 * jnp.eye(3)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 3)))
    z, info = jax.vmap(lambda x: layer(p, x))(xs)
    assert z.shape == (5, 2, 3) and np.asarray(info.converged).all()
    # samples are independent, so one flat batch gives the same equilibria
    z_flat, _ = layer(p, xs.reshape(10, 3))
    np.testing.assert_allclose(np.asarray(z).reshape(10, 3), np.asarray(z_flat), rtol=1e-9, atol=1e-12)
    jax.grad(lambda p: jnp.sum(layer(p, xs[0])[0]))(p)
    jax.effects_barrier()
    assert records and records[-1].all_converged


def test_failure_policies_eager(x64):
    f = lambda z: 0.999 * z + 1.0  # noqa: E731
    with pytest.raises(ConvergenceError):
        fixed_point(f, jnp.zeros((2, 1)), method="picard", max_iter=5, on_failure="raise")
    with pytest.warns(ConvergenceWarning):
        fixed_point(f, jnp.zeros((2, 1)), method="picard", max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = fixed_point(f, jnp.zeros((2, 1)), method="picard", max_iter=5, on_failure="ignore")
    assert not np.asarray(info.converged).any() and np.asarray(info.steps).tolist() == [5, 5]
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        fixed_point(lambda z: 3.0 * z + 1.0, jnp.ones((1, 1)), method="picard", max_iter=100000)


def test_nonfinite_under_jit_stops_and_flags(x64):
    solve = jax.jit(lambda z0: fixed_point(lambda z: 3.0 * z + 1.0, z0, method="picard", max_iter=100000,
                                           on_failure="ignore"))
    with pytest.raises(Exception, match="NaN/inf"):
        z, info = solve(jnp.ones((1, 1)))
        jax.block_until_ready(z)
        jax.effects_barrier()


def test_bad_input():
    with pytest.raises(TypeError, match="floating"):
        fixed_point(lambda z: z, jnp.zeros((2, 2), dtype=jnp.int32))
    with pytest.raises(ValueError, match="empty"):
        fixed_point(lambda z: z, jnp.zeros((0, 2)))
    with pytest.raises(ValueError, match="NaN"):
        fixed_point(lambda z: z, jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match="must return the shape"):
        fixed_point(lambda z: z[:, :1], jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="backward must be one of"):
        deq(lambda p, z, x: z, backward="adjoint")


def test_implicit_model_matches_its_equation_and_torch(x64):
    torch = pytest.importorskip("torch")
    from nonsmooth.implicit import ImplicitModel

    torch.manual_seed(0)
    model = ImplicitModel(3, 8, 2, kappa=0.9, dtype=torch.float64, tol=1e-12)
    u = torch.randn(4, 3, dtype=torch.float64)
    y_t = model(u)
    y_t.sum().backward()
    params = {k: jnp.asarray(getattr(model, k).detach().numpy()) for k in "ABCD"}
    uj = jnp.asarray(u.numpy())
    loss = jax.jit(lambda p: jnp.sum(implicit_model(p, uj, tol=1e-12)))
    np.testing.assert_allclose(float(loss(params)), float(y_t.sum()), rtol=1e-12)
    g = jax.grad(loss)(params)
    for k in "ABCD":
        np.testing.assert_allclose(np.asarray(g[k]), getattr(model, k).grad.numpy(), rtol=1e-8, atol=1e-10)
    A = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)) * 2)
    np.testing.assert_allclose(np.asarray(project_rows_l1(A, 0.9)),
                               project_rows_l1(torch.tensor(np.asarray(A)), 0.9).numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="missing 'D'"):
        implicit_model({k: params[k] for k in "ABC"}, uj)
