"""torch implicit layers under the ways people differentiate them: gradcheck with defaults,
forward mode, torch.func.grad(functional_call), second derivatives (refused), bf16/f16,
tuple states, trajectories with fixed-point correction, per-iteration statistics, Jacobian
regularisation.  Oracles: scalar closed forms, float64 finite differences of the converged
solution map, an explicit Picard loop, exact Jacobians from torch.autograd.functional."""
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nonsmooth.implicit import (  # noqa: E402
    DEQ,
    ConvergenceWarning,
    EquilibriumCell,
    ImplicitModel,
    fixed_point,
    implicit_fixed_point,
    jacobian_regularization,
)

D = torch.float64


def _layer(activation="tanh", seed=0, tol=1e-12, **kw):
    torch.manual_seed(seed)
    return DEQ(EquilibriumCell(3, 5, activation=activation, dtype=D), state_shape=(5,), tol=tol, **kw)


def _solution(layer, x):
    """The converged solution map, by plain Picard iteration in float64 (independent of the solvers)."""
    cell = layer.f
    with torch.no_grad():
        z = torch.zeros(x.shape[0], cell.W.shape[0], dtype=D)
        for _ in range(3000):
            z = cell(z, x)
    return z


def test_gradcheck_with_default_settings():
    layer = _layer()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    # forward mode and undefined incoming gradients as well
    assert torch.autograd.gradcheck(layer, (x,), check_forward_ad=True, check_undefined_grad=True)
    params = tuple(layer.f.parameters())
    assert torch.autograd.gradcheck(lambda W, U, b: layer(x.detach()), params)


@pytest.mark.parametrize("how", ["forward_ad", "func_jvp"])
def test_forward_mode_matches_finite_differences(how):
    layer = _layer(activation="relu", seed=1)
    x = torch.randn(3, 3, dtype=D)
    t = torch.randn(3, 3, dtype=D)
    if how == "forward_ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = layer(fwAD.make_dual(x, t))
            tangent = fwAD.unpack_dual(out).tangent
    else:
        _, tangent = torch.func.jvp(layer, (x,), (t,))
    h = 1e-6
    fd = (_solution(layer, x + h * t) - _solution(layer, x - h * t)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    assert layer.last_stats.backward.method == "anderson"  # the tangent solve is recorded


def test_torch_func_grad_of_functional_call_matches_backward_and_fd():
    layer = _layer(seed=2)
    x = torch.randn(2, 3, dtype=D)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p):
        return (torch.func.functional_call(layer, p, (x,)) ** 2).sum()

    g = torch.func.grad(loss)(params)
    (layer(x) ** 2).sum().backward()
    for k, v in layer.named_parameters():
        torch.testing.assert_close(g[k], v.grad, rtol=1e-8, atol=1e-10)
    # one entry against central differences of the converged map
    h = 1e-6
    with torch.no_grad():
        W = layer.f.W
        W[0, 1] += h
        up = (_solution(layer, x) ** 2).sum()
        W[0, 1] -= 2 * h
        dn = (_solution(layer, x) ** 2).sum()
        W[0, 1] += h
    assert abs(float(g["f.W"][0, 1]) - float((up - dn) / (2 * h))) < 1e-6
    # gmres backward under torch.func as well (its Hessenberg matrix is built out of place)
    layer2 = _layer(seed=2, backward_solver="gmres")
    g2 = torch.func.grad(lambda p: (torch.func.functional_call(layer2, p, (x,)) ** 2).sum())(params)
    torch.testing.assert_close(g2["f.W"], g["f.W"], rtol=1e-7, atol=1e-9)


def test_second_derivatives_raise_instead_of_dropping_terms():
    x = torch.tensor([[0.4]], dtype=D, requires_grad=True)
    a = torch.tensor(0.5, dtype=D, requires_grad=True)

    def z_of(x):
        return implicit_fixed_point(lambda z, x: a * torch.tanh(z) + x, torch.zeros(1, 1, dtype=D), x, tol=1e-12)[0]

    (g,) = torch.autograd.grad(z_of(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(g.sum(), x)
    (g,) = torch.autograd.grad(z_of(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(g.sum(), a)  # a mixed derivative as well
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.func.grad(lambda x: torch.func.grad(lambda x: z_of(x).sum())(x).sum())(x.detach())
    # downstream parameters enter only through the incoming gradient: still refused, never zero
    w = torch.tensor(2.0, dtype=D, requires_grad=True)
    (gx,) = torch.autograd.grad((w * z_of(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(gx.sum(), w)
    layer = _layer()
    for transform in (torch.func.jacfwd, torch.func.jacrev, torch.func.vmap):
        with pytest.raises((RuntimeError, ValueError), match="vmap"):
            transform(layer)(torch.randn(2, 3, dtype=D))


def test_scalar_closed_forms():
    # z = a tanh(z) + x: dz/dx = 1 / (1 - a (1 - z^2)), dz/da = tanh(z) dz/dx
    a = torch.tensor(0.7, dtype=D, requires_grad=True)
    x = torch.tensor([[0.3]], dtype=D, requires_grad=True)
    z, _ = implicit_fixed_point(lambda z, x: a * torch.tanh(z) + x, torch.zeros(1, 1, dtype=D), x, tol=1e-13)
    z.sum().backward()
    zs = float(z.detach())
    assert abs(zs - (0.7 * math.tanh(zs) + 0.3)) < 1e-12
    d = 1 / (1 - 0.7 * (1 - math.tanh(zs) ** 2))
    assert abs(float(x.grad) - d) < 1e-10 and abs(float(a.grad) - math.tanh(zs) * d) < 1e-10
    # z = relu(z / 2 + x): z = 2x, dz/dx = 2 for x > 0; z = 0, dz/dx = 0 for x < 0
    for xv, zv, dv in ((0.8, 1.6, 2.0), (-0.8, 0.0, 0.0)):
        xt = torch.tensor([[xv]], dtype=D, requires_grad=True)
        z, _ = implicit_fixed_point(lambda z, x: torch.relu(z / 2 + x), torch.zeros(1, 1, dtype=D), xt, tol=1e-13)
        z.sum().backward()
        assert abs(float(z.detach()) - zv) < 1e-12 and float(xt.grad) == pytest.approx(dv, abs=1e-12)


@pytest.mark.parametrize("dtype, tol, rtol", [(torch.bfloat16, 2e-2, 4e-2), (torch.float16, 2e-3, 5e-3)])
def test_low_precision_layers_match_float32(dtype, tol, rtol):
    torch.manual_seed(3)
    cell = EquilibriumCell(8, 32, activation="tanh", init_scale=0.6)
    x = torch.randn(16, 8)
    ref = DEQ(cell, state_shape=(32,), tol=1e-6)
    z32 = ref(x)
    (z32 ** 2).sum().backward()
    g32 = cell.W.grad.clone()
    low = DEQ(EquilibriumCell(8, 32, activation="tanh"), state_shape=(32,), tol=tol)
    low.f.load_state_dict(cell.state_dict())
    low = low.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        z = low(x.to(dtype))
        (z.float() ** 2).sum().backward()
    assert z.dtype == dtype and low.f.W.grad.dtype == dtype
    assert low.last_stats.forward.all_converged and low.last_stats.backward.all_converged
    assert float((z.float() - z32).abs().max() / z32.abs().max()) < rtol
    assert float((low.f.W.grad.float() - g32).norm() / g32.norm()) < rtol
    # asking for more than the dtype can resolve says so
    tight = DEQ(low.f, state_shape=(32,), tol=1e-9, max_iter=30)
    with pytest.warns(ConvergenceWarning, match=f"state is {str(dtype).split('.')[1]}"):
        tight(x.to(dtype))


@pytest.mark.parametrize("bad", [(-3,), (0,), (2.5,), "5", ((4,), (-1,)), (True,)])
def test_state_shape_is_validated_at_construction(bad):
    with pytest.raises(ValueError, match="state_shape") as info:
        DEQ(EquilibriumCell(3, 5), state_shape=bad)
    assert repr(bad) in str(info.value)


def test_tuple_states_closed_form_and_fd():
    # a = b / 2 + x, b = a / 4 + 1  =>  a = (x + 1/2) / (7/8)
    x = torch.tensor([[2.0]], dtype=D, requires_grad=True)
    z0 = (torch.zeros(1, 1, dtype=D), torch.zeros(1, 1, dtype=D))
    (a, b), stats = implicit_fixed_point(lambda z, x: (0.5 * z[1] + x, 0.25 * z[0] + 1.0), z0, x, tol=1e-13)
    a.sum().backward()
    assert abs(float(a) - 2.5 / 0.875) < 1e-12 and abs(float(x.grad) - 1 / 0.875) < 1e-12
    # a nonlinear pair with different shapes, through the DEQ layer, against finite differences
    torch.manual_seed(4)
    W1 = torch.randn(4, 2, dtype=D) * 0.5
    W2 = torch.randn(2, 4, dtype=D) * 0.5

    def cell(z, x):
        h, c = z
        return torch.tanh(c @ W1.T + x), 0.5 * torch.tanh(h @ W2.T)

    layer = DEQ(cell, state_shape=((4,), (2,)), tol=1e-13)
    xs = torch.randn(3, 4, dtype=D, requires_grad=True)
    h, c = layer(xs)
    assert h.shape == (3, 4) and c.shape == (3, 2)
    cot = torch.randn(3, 2, dtype=D)
    (c * cot).sum().backward()

    def value(xx):
        with torch.no_grad():
            return float((layer(xx)[1] * cot).sum())

    e = torch.zeros_like(xs)
    e[1, 2] = 1e-6
    fd = (value(xs.detach() + e) - value(xs.detach() - e)) / 2e-6
    assert abs(float(xs.grad[1, 2]) - fd) < 1e-8
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        DEQ(lambda z, x: z[0], state_shape=((4,), (2,)))(xs)


def test_trajectory_matches_an_explicit_picard_loop_and_is_corrected():
    torch.manual_seed(5)
    W = torch.randn(4, 4, dtype=D)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(2, 4, dtype=D, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    z, stats = implicit_fixed_point(f, torch.zeros(2, 4, dtype=D), x, method="picard", tol=1e-10,
                                    trajectory=(1, 3, 7, 10_000 - 1), max_iter=10_000)
    iterates, zz = {}, torch.zeros(2, 4, dtype=D)
    with torch.no_grad():
        for k in range(1, 8):
            zz = f(zz, x)
            iterates[k] = zz.clone()
    traj = stats.trajectory
    assert stats.forward.trajectory_steps == (1, 3, 7, 9999) and len(traj) == 4
    # correction_steps=1, damping 1: the state returned is f(z_k) with a graph (JFB at z_k)
    with torch.no_grad():
        for t, k in zip(traj[:3], (1, 3, 7)):
            torch.testing.assert_close(t, f(iterates[k], x), rtol=0, atol=1e-15)
        torch.testing.assert_close(traj[3], z, rtol=0, atol=1e-9)  # past the end: the final state
    (g,) = torch.autograd.grad(traj[1].sum(), x)
    xi = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(f(iterates[3], xi).sum(), xi)
    torch.testing.assert_close(g, g_ref)
    # per-iteration statistics against the explicit loop: |f(z_k) - z_k| at k = 0, 1, 2
    hist = stats.forward.abs_history
    zz = torch.zeros(2, 4, dtype=D)
    with torch.no_grad():
        for k in range(3):
            fz = f(zz, x)
            np.testing.assert_allclose(hist[k], torch.linalg.vector_norm(fz - zz, dim=1).numpy(), rtol=1e-12)
            np.testing.assert_allclose(stats.forward.rel_history[k],
                                       (torch.linalg.vector_norm(fz - zz, dim=1)
                                        / torch.linalg.vector_norm(fz, dim=1)).numpy(), rtol=1e-12)
            zz = fz
    assert int(max(stats.forward.steps)) == len(hist)
    # an int asks for evenly spaced iterations; bad values are named
    _, info = fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1, dtype=D), trajectory=4, max_iter=40)
    assert info.trajectory_steps == (10, 20, 30, 40)
    with pytest.raises(ValueError, match="trajectory"):
        fixed_point(lambda z: z, torch.zeros(1, 1, dtype=D), trajectory=(0, 5))
    with pytest.raises(ValueError, match="correction_damping"):
        DEQ(EquilibriumCell(3, 5), correction_damping=1.5)


def test_deq_trajectory_damped_correction():
    layer = _layer(seed=6, trajectory=(2,), correction_steps=2, correction_damping=0.5, method="picard")
    x = torch.randn(2, 3, dtype=D)
    layer(x)
    (t,) = layer.last_stats.trajectory
    cell = layer.f
    with torch.no_grad():
        z = torch.zeros(2, 5, dtype=D)
        for _ in range(2):
            z = cell(z, x)
        for _ in range(2):
            z = 0.5 * z + 0.5 * cell(z, x)
    torch.testing.assert_close(t.detach(), z, rtol=0, atol=1e-15)
    assert t.requires_grad


def test_jacobian_regularization_is_unbiased_and_differentiable():
    torch.manual_seed(7)
    layer = _layer(seed=7)
    x = torch.randn(4, 3, dtype=D)
    z = layer(x)
    # exact |df/dz|_F^2 per sample, averaged over the batch and divided by the state size
    exact = 0.0
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda zz: layer.f(zz[None], x[i:i + 1])[0], z[i].detach())
        exact += float((J ** 2).sum()) / 5 / 4
    gen = torch.Generator().manual_seed(0)
    est = layer.jacobian_regularization(z, x, n_samples=4000, generator=gen)
    assert abs(float(est) - exact) < 0.05 * exact
    est.backward()
    assert layer.f.W.grad is not None and bool(torch.isfinite(layer.f.W.grad).all())
    # d/dA of E|eps^T A|^2 = 2A for a linear map (averaged over many draws)
    A = torch.tensor([[0.5, -0.2], [0.3, 0.25]], dtype=D, requires_grad=True)
    est = jacobian_regularization(lambda z: z @ A.T, torch.zeros(50_000, 2, dtype=D),
                                  generator=torch.Generator().manual_seed(1), normalize=False)
    est.backward()
    assert abs(float(est) - float((A ** 2).sum())) < 0.02
    torch.testing.assert_close(A.grad, 2 * A.detach(), rtol=0, atol=0.03)
    with pytest.raises(ValueError, match="n_samples"):
        jacobian_regularization(lambda z: z, torch.zeros(2, 2), n_samples=0)
    with pytest.raises(TypeError, match="key= is for jax"):
        jacobian_regularization(lambda z: z, torch.zeros(2, 2), key=0)


def test_implicit_model_runs_in_bfloat16():
    torch.manual_seed(8)
    model = ImplicitModel(4, 8, 2, tol=2e-2).to(torch.bfloat16)
    y = model(torch.randn(3, 4, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and model.A.grad.dtype == torch.bfloat16


def test_jacobian_regularization_matches_torchdeq_on_the_same_noise():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")  # a second implementation, same normalisation
    torch.manual_seed(9)
    W = torch.randn(6, 6) * 0.3
    x = torch.randn(4, 6)
    z = torch.randn(4, 6)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    z0 = z.clone().requires_grad_(True)
    torch.manual_seed(123)
    theirs = torchdeq_loss.jac_reg(f(z0, x), z0, vecs=3)
    torch.manual_seed(123)
    ours = jacobian_regularization(f, z, x, n_samples=3)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
