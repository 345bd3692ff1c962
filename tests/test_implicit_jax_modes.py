"""jax implicit layers beyond first-order reverse mode: jacfwd, hessian (implicit
differentiation applied again), unroll at max_iter under eager grad, pytree states,
trajectories, Jacobian regularisation, bfloat16.  Oracles: scalar closed forms, float64
finite differences of the converged solution map (plain NumPy fixed-point iteration)."""
import math
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from nonsmooth.implicit import (  # noqa: E402
    ConvergenceWarning,
    deq,
    fixed_point,
    implicit_fixed_point,
    implicit_root,
    jacobian_regularization,
)


def _np_solve(W, x, act, iters=5000):
    z = np.zeros((x.shape[0], W.shape[0]))
    for _ in range(iters):
        z = act(z @ W.T + x)
    return z


def _fd_hessian_entries(L, W, pairs, h=1e-4):
    out = []
    for (i, j), (k, l) in pairs:
        E1 = np.zeros_like(W)
        E1[i, j] = h
        E2 = np.zeros_like(W)
        E2[k, l] = h
        out.append((L(W + E1 + E2) - L(W + E1 - E2) - L(W - E1 + E2) + L(W - E1 - E2)) / (4 * h * h))
    return np.array(out)


def test_scalar_closed_form_first_and_second_derivatives():
    a = 0.5

    def z_of(x):  # Anderson forward and backward, the defaults
        z, _ = implicit_fixed_point(lambda z, x: a * jnp.tanh(z) + x, jnp.zeros(1), x, tol=1e-14, stop="abs",
                                    max_iter=500)
        return z[0]

    # (jit: eager jax re-lowers every solver loop on every call)
    with jax.enable_x64(True):
        x = jnp.asarray([0.3])
        z = float(z_of(x))
        s = 1 - math.tanh(z) ** 2
        d1 = 1 / (1 - a * s)
        d2 = a * (-2 * math.tanh(z) * s) * d1 / (1 - a * s) ** 2  # d/dx of 1 / (1 - a s(z(x)))
        both = jax.jit(lambda x: (jax.grad(z_of)(x), jax.jacfwd(z_of)(x), jax.hessian(z_of)(x),
                                  jax.jacrev(jax.jacrev(z_of))(x)))
        g, jf, H, H2 = both(x)
        assert float(g[0]) == pytest.approx(d1, rel=1e-11)
        assert float(jf[0]) == pytest.approx(d1, rel=1e-11)
        assert float(H[0, 0]) == pytest.approx(d2, rel=1e-9)
        assert float(H2[0, 0]) == pytest.approx(d2, rel=1e-9)
        # z = relu(z / 2 + x): z = 2x for x > 0, so z' = 2 and z'' = 0 (not a silent zero first derivative)
        r = lambda x: implicit_fixed_point(lambda z, x: jax.nn.relu(z / 2 + x), jnp.zeros(1), x, tol=1e-14,  # noqa: E731
                                           method="picard")[0][0]
        g, H = jax.jit(lambda x: (jax.grad(r)(x), jax.hessian(r)(x)))(jnp.asarray([0.8]))
        assert float(g[0]) == pytest.approx(2.0, abs=1e-12) and float(H[0, 0]) == 0.0
        # z = z/4 + x^2 (root form): z = 4x^2/3, z'' = 8/3 -- the affine-in-z case jax's own
        # custom_linear_solve rule trips over without the layer's guard
        lin = lambda x: implicit_root(lambda z, x: z - (0.25 * z + x ** 2), jnp.zeros(1), x, tol=1e-14,  # noqa: E731
                                      method="picard")[0][0]
        assert float(jax.jit(jax.hessian(lin))(jnp.asarray([1.5]))[0, 0]) == pytest.approx(8 / 3, rel=1e-10)


def test_tanh_deq_hessian_matches_finite_differences_x64():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 4))
    W = 0.7 * W / np.linalg.norm(W, 2)
    x = rng.normal(size=(2, 4))
    with jax.enable_x64(True):
        layer = deq(lambda p, z, x: jnp.tanh(z @ p.T + x), tol=1e-13, stop="abs", max_iter=500)
        L = lambda W: jnp.sum(layer(W, jnp.asarray(x)) ** 2)  # noqa: E731
        H, J_fwd = map(np.asarray, jax.jit(lambda W: (
            jax.hessian(L)(W), jax.jacfwd(lambda W: layer(W, jnp.asarray(x)))(W)))(jnp.asarray(W)))
    Lnp = lambda W: float(np.sum(_np_solve(W, x, np.tanh) ** 2))  # noqa: E731
    pairs = [((0, 1), (2, 3)), ((1, 1), (1, 1)), ((3, 0), (0, 2)), ((2, 2), (0, 0))]
    fd = _fd_hessian_entries(Lnp, W, pairs)
    got = np.array([H[i, j, k, l] for (i, j), (k, l) in pairs])
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(H.reshape(16, 16), H.reshape(16, 16).T, atol=1e-10)  # symmetric
    h = 1e-6
    E = np.zeros_like(W)
    E[1, 2] = h
    fdJ = (_np_solve(W + E, x, np.tanh) - _np_solve(W - E, x, np.tanh)) / (2 * h)
    np.testing.assert_allclose(J_fwd[:, :, 1, 2], fdJ, rtol=1e-6, atol=1e-9)


def test_relu_deq_hessian_float32_is_not_silently_zero():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(5, 5))
    W = 0.6 * W / np.linalg.norm(W, 2)
    x = np.abs(rng.normal(size=(1, 5))) + 0.2  # units active: the map is smooth here
    layer = deq(lambda p, z, x: jax.nn.relu(z @ p.T + x), tol=1e-6, method="picard")
    L = lambda W: jnp.sum(layer(W, jnp.asarray(x, jnp.float32)) ** 2)  # noqa: E731
    H = np.asarray(jax.jit(jax.hessian(L))(jnp.asarray(W, jnp.float32)))
    Lnp = lambda W: float(np.sum(_np_solve(W, x, lambda t: np.maximum(t, 0)) ** 2))  # noqa: E731
    pairs = [((0, 0), (0, 0)), ((1, 2), (1, 2)), ((3, 4), (0, 1)), ((2, 0), (4, 4))]
    fd = _fd_hessian_entries(Lnp, W, pairs)
    got = np.array([H[i, j, k, l] for (i, j), (k, l) in pairs])
    assert np.abs(fd).max() > 1.0
    np.testing.assert_allclose(got, fd, rtol=2e-3, atol=2e-3)


def test_vmap_of_grad_and_jit_of_jacfwd():
    layer = deq(lambda p, z, x: jnp.tanh(z @ p.T + x), tol=1e-6, method="picard")
    W = 0.3 * jnp.eye(3)
    xs = jnp.arange(12.0).reshape(4, 1, 3) / 10
    one = jax.jit(jax.grad(lambda W, x: layer(W, x).sum()))
    g = jax.jit(jax.vmap(one, in_axes=(None, 0)))(W, xs)
    for i in range(4):
        np.testing.assert_allclose(g[i], one(W, xs[i]), rtol=1e-5)
    J, Jr = jax.jit(lambda x: (jax.jacfwd(lambda x: layer(W, x))(x), jax.jacrev(lambda x: layer(W, x))(x)))(xs[1])
    np.testing.assert_allclose(J, Jr, rtol=1e-5, atol=1e-6)


def test_unroll_at_max_iter_under_eager_grad_warns_and_returns_the_gradient():
    def loss(x):
        z, _ = implicit_fixed_point(lambda z, x: 0.99 * z + x, jnp.zeros(1), x, backward="unroll", max_iter=5,
                                    method="picard")
        return z.sum()

    with pytest.warns(ConvergenceWarning, match="did not converge"):
        g = jax.grad(loss)(jnp.ones(1))
    # five Picard evaluations from 0: z = x (1 - 0.99^5) / 0.01, differentiated through the iterations
    assert float(g[0]) == pytest.approx((1 - 0.99 ** 5) / 0.01, rel=1e-5)
    with pytest.warns(ConvergenceWarning):
        g_impl = jax.grad(lambda x: implicit_fixed_point(lambda z, x: 0.99 * z + x, jnp.zeros(1), x, max_iter=5,
                                                         method="picard")[0].sum())(jnp.ones(1))
    assert np.isfinite(float(g_impl[0]))


def test_pytree_states_closed_form_trajectory_and_jit():
    # a = b / 2 + x, b = a / 4 + 1  =>  a = (x + 1/2) / (7/8)
    f = lambda z, x: {"a": 0.5 * z["b"] + x, "b": 0.25 * z["a"] + 1.0}  # noqa: E731
    with jax.enable_x64(True):
        z0 = {"a": jnp.zeros((1, 1)), "b": jnp.zeros((1, 1))}
        x = jnp.asarray([[2.0]])
        solve = jax.jit(lambda x: implicit_fixed_point(f, z0, x, tol=1e-13, method="picard", trajectory=(1, 2, 99)))
        z, info = solve(x)
        assert float(z["a"][0, 0]) == pytest.approx(2.5 / 0.875, rel=1e-12)
        # Picard from 0: after 1 step (a, b) = (x, 1), after 2 steps a = 1/2 + x; corrected by one more step
        traj = info.trajectory
        assert info.trajectory_steps == (1, 2, 99)
        assert float(traj[0]["a"][0, 0]) == pytest.approx(0.5 * 1.0 + 2.0)
        assert float(traj[1]["b"][0, 0]) == pytest.approx(0.25 * 2.5 + 1.0)
        assert float(traj[2]["a"][0, 0]) == pytest.approx(2.5 / 0.875, rel=1e-12)
        np.testing.assert_allclose(info.abs_history[0, 0], math.hypot(2.0, 1.0), rtol=1e-12)
        a_of = lambda x: implicit_fixed_point(f, z0, x, tol=1e-13, method="picard")[0]["a"].sum()  # noqa: E731
        g, H = jax.jit(lambda x: (jax.grad(a_of)(x), jax.hessian(a_of)(x)))(x)
        assert float(g[0, 0]) == pytest.approx(1 / 0.875, rel=1e-12)
        assert float(H.reshape(())) == 0.0
        # corrected states are f(z_k) with z_k detached: d a/dx = 1 (a <- b/2 + x), d b/dx = 0
        def a_plus_1000_b(x):
            t = implicit_fixed_point(f, z0, x, trajectory=(2,), method="picard")[1].trajectory[0]
            return t["a"].sum() + 1e3 * t["b"].sum()

        assert float(jax.jit(jax.grad(a_plus_1000_b))(x)[0, 0]) == pytest.approx(1.0, rel=1e-12)
    layer = deq(lambda p, z, x: (jnp.tanh(z[1] @ p.T + x), 0.5 * z[0]), state_shape=((3,), (3,)), tol=1e-6,
                with_info=True, trajectory=3)
    (h, c), info = layer(0.2 * jnp.eye(3), jnp.ones((2, 3)))
    assert h.shape == (2, 3) and c.shape == (2, 3) and len(info.trajectory) == 3
    with pytest.raises(ValueError, match="state_shape"):
        deq(lambda p, z, x: z, state_shape=(-3,))


def test_jacobian_regularization_jax():
    A = jnp.asarray([[0.5, -0.2], [0.3, 0.25]])
    est = lambda A: jacobian_regularization(lambda z: z @ A.T, jnp.zeros((50_000, 2)),  # noqa: E731
                                            key=jax.random.key(0), normalize=False)
    assert float(est(A)) == pytest.approx(float(jnp.sum(A ** 2)), abs=0.02)
    np.testing.assert_allclose(jax.grad(est)(A), 2 * A, atol=0.03)
    with pytest.raises(TypeError, match="key"):
        jacobian_regularization(lambda z: z, jnp.zeros((2, 2)))


def test_bfloat16_deq_matches_float32():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(16, 16))
    W = 0.6 * W / np.linalg.norm(W, 2)
    x = rng.normal(size=(8, 16))
    f = lambda p, z, x: jnp.tanh(z @ p.T + x)  # noqa: E731
    ref = deq(f, tol=1e-6, method="picard")
    z32, g32 = jax.jit(lambda W: (ref(W, jnp.asarray(x, jnp.float32)), jax.grad(
        lambda W: jnp.sum(ref(W, jnp.asarray(x, jnp.float32)) ** 2))(W)))(jnp.asarray(W, jnp.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        layer = deq(f, tol=2e-2, method="picard")
        xb = jnp.asarray(x, jnp.bfloat16)
        zb, gb = jax.jit(lambda W: (layer(W, xb), jax.grad(
            lambda W: jnp.sum(layer(W, xb).astype(jnp.float32) ** 2))(W)))(jnp.asarray(W, jnp.bfloat16))
    assert zb.dtype == jnp.bfloat16 and gb.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(zb.astype(jnp.float32) - z32)) / jnp.max(jnp.abs(z32)))
    gerr = float(jnp.linalg.norm(gb.astype(jnp.float32) - g32) / jnp.linalg.norm(g32))
    assert err < 4e-2 and gerr < 4e-2
    _, info = fixed_point(lambda z: 0.5 * z + 1, jnp.zeros((1, 1), jnp.bfloat16), tol=1e-2)
    assert info.state_dtype == "bfloat16" and bool(info.converged.all())
