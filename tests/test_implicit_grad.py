"""Implicit differentiation (torch): backward modes against closed forms, unrolled AD and
float64 finite differences; DEQ and ImplicitModel layers."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from nonsmooth.implicit import (  # noqa: E402
    DEQ,
    ConvergenceError,
    EquilibriumCell,
    ImplicitModel,
    implicit_fixed_point,
    implicit_root,
    pf_eigenvalue,
    project_rows_l1,
)

D = torch.float64


def _smooth_problem(seed=0, n=5, p=3, batch=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=D)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(n, p, generator=g, dtype=D)
    x = torch.randn(batch, p, generator=g, dtype=D)
    cot = torch.randn(batch, n, generator=g, dtype=D)
    return W, U, x, cot


def _fd_grad(fun, x, h=1e-6):
    """Central differences of a scalar function of x, float64."""
    out = torch.zeros_like(x)
    flat = out.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        flat[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return out


@pytest.mark.parametrize("backward, solver", [("implicit", "anderson"), ("implicit", "broyden"),
                                              ("implicit", "picard"), ("implicit", "gmres"), ("unroll", None)])
def test_smooth_gradients_match_float64_finite_differences(backward, solver):
    W, U, x, cot = _smooth_problem()

    def f(z, x):
        return torch.tanh(z @ W.T + x @ U.T)

    def value(xx):
        with torch.no_grad():
            z, _ = implicit_fixed_point(f, torch.zeros(3, 5, dtype=D), xx, tol=1e-13, stop="abs", max_iter=500)
        return (z * cot).sum()

    xg = x.clone().requires_grad_(True)
    z, stats = implicit_fixed_point(f, torch.zeros(3, 5, dtype=D), xg, backward=backward, backward_solver=solver,
                                    tol=1e-12, max_iter=500)
    (z * cot).sum().backward()
    fd = _fd_grad(value, x)
    torch.testing.assert_close(xg.grad, fd, rtol=1e-6, atol=1e-8)
    if backward == "implicit":
        assert stats.backward is not None and stats.backward.all_converged
        assert stats.backward.method == solver
    else:
        assert stats.backward is None


def test_parameters_inside_a_module_get_implicit_gradients():
    torch.manual_seed(0)
    cell = EquilibriumCell(3, 6, activation="tanh", dtype=D)
    x = torch.randn(4, 3, dtype=D)
    cot = torch.randn(4, 6, dtype=D)
    layer = DEQ(cell, state_shape=(6,), tol=1e-12, max_iter=300)
    (layer(x) * cot).sum().backward()
    g_impl = cell.W.grad.clone()
    cell.W.grad = None
    (layer(x, backward="unroll") * cot).sum().backward()
    torch.testing.assert_close(g_impl, cell.W.grad, rtol=1e-7, atol=1e-9)
    # finite differences on one weight entry
    h = 1e-6
    with torch.no_grad():
        vals = []
        for s in (h, -h):
            cell.W[1, 2] += s
            vals.append((layer(x) * cot).sum().item())
            cell.W[1, 2] -= s
    assert abs((vals[0] - vals[1]) / (2 * h) - g_impl[1, 2].item()) < 1e-6


def test_jfb_and_phantom_closed_forms_on_a_scalar_affine_map():
    a = 0.6
    x = torch.tensor([[1.5]], dtype=D, requires_grad=True)
    f = lambda z, x: a * z + x  # noqa: E731  z* = x / (1 - a)
    for mode, expected in [("implicit", 1 / (1 - a)), ("unroll", 1 / (1 - a)), ("jfb", 1.0)]:
        x.grad = None
        z, _ = implicit_fixed_point(f, torch.zeros(1, 1, dtype=D), x, backward=mode, tol=1e-13, max_iter=500)
        z.sum().backward()
        assert abs(x.grad.item() - expected) < 1e-9, mode
        assert abs(z.item() - 1.5 / (1 - a)) < 1e-10
    # phantom: k damped steps z <- (1-l) z + l f(z): dz_k/dx = l (1 - q^k) / (1 - q), q = 1 - l + l a
    for k, lam in [(1, 1.0), (3, 0.5), (8, 0.8)]:
        x.grad = None
        z, _ = implicit_fixed_point(f, torch.zeros(1, 1, dtype=D), x, backward="phantom", phantom_steps=k,
                                    phantom_damping=lam, tol=1e-13)
        z.sum().backward()
        q = 1 - lam + lam * a
        assert abs(x.grad.item() - lam * (1 - q ** k) / (1 - q)) < 1e-12


def test_relu_fixed_point_at_its_kink():
    # z = relu(a z + x) has z*(x) = relu(x) / (1 - a); at x = 0 the pre-activation sits on the kink.
    a = 0.5
    f = lambda z, x: torch.relu(a * z + x)  # noqa: E731
    for xv, expected in [(1.0, 1 / (1 - a)), (-1.0, 0.0), (0.0, 0.0)]:  # torch: relu'(0) = 0
        x = torch.tensor([[xv]], dtype=D, requires_grad=True)
        z, _ = implicit_fixed_point(f, torch.zeros(1, 1, dtype=D), x, tol=1e-12)
        z.sum().backward()
        assert abs(z.item() - max(xv, 0) / (1 - a)) < 1e-10
        assert x.grad.item() == pytest.approx(expected, abs=1e-10)


def test_implicit_root_closed_form():
    # F(z, a) = z^3 + z - a: z*(2) = 1, dz/da = 1 / (3 z^2 + 1) = 1/4
    a = torch.tensor([[2.0]], dtype=D, requires_grad=True)
    z, stats = implicit_root(lambda z, a: (z ** 3 + z - a) / 4.0, torch.full((1, 1), 0.5, dtype=D), a, tol=1e-13)
    z.sum().backward()
    assert abs(z.item() - 1.0) < 1e-12
    assert abs(a.grad.item() - 0.25) < 1e-10
    assert stats.forward.all_converged


def test_backward_failure_policy_raises():
    W, U, x, cot = _smooth_problem(1)
    xg = x.clone().requires_grad_(True)
    z, _ = implicit_fixed_point(lambda z, x: torch.tanh(z @ W.T + x @ U.T), torch.zeros(3, 5, dtype=D), xg,
                                tol=1e-12, backward_max_iter=1, backward_solver="picard", on_failure="raise")
    with pytest.raises(ConvergenceError, match="implicit backward"):
        (z * cot).sum().backward()


def test_deq_under_torch_compile_matches_eager():
    torch.manual_seed(1)
    cell = EquilibriumCell(3, 5, dtype=D)
    layer = DEQ(cell, state_shape=(5,), tol=1e-10)
    x = torch.randn(4, 3, dtype=D)
    compiled = torch.compile(layer, backend="aot_eager")
    z_c = compiled(x)
    z_c.sum().backward()
    g_c = cell.W.grad.clone()
    cell.W.grad = None
    z_e = layer(x)
    z_e.sum().backward()
    torch.testing.assert_close(z_c, z_e)
    torch.testing.assert_close(g_c, cell.W.grad)


def test_deq_validates_input():
    layer = DEQ(EquilibriumCell(3, 5), state_shape=(5,))
    with pytest.raises(ValueError, match="leading batch"):
        layer(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="backward must be one of"):
        DEQ(EquilibriumCell(3, 5), backward="adjoint")
    with pytest.raises(TypeError, match="callable"):
        DEQ(3)
    assert DEQ(EquilibriumCell(3, 5), solver="broyden").options.method == "broyden"
    with pytest.raises(ValueError, match="either solver= or method="):
        DEQ(EquilibriumCell(3, 5), solver="broyden", method="picard")
    with pytest.raises(ValueError, match="args\\[0\\] contains NaN"):
        layer(torch.full((2, 3), float("nan")))


def test_l1_row_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 7, generator=g, dtype=D) * 2
    kappa = 0.9
    P = project_rows_l1(A, kappa)
    assert float(P.abs().sum(1).max()) <= kappa + 1e-12
    # independent oracle: bisection on the soft threshold theta with sum(max(|a| - theta, 0)) = kappa
    for a, p in zip(A.numpy(), P.numpy()):
        lo, hi = 0.0, np.abs(a).max()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(np.abs(a) - mid, 0).sum() > kappa else (lo, mid)
        np.testing.assert_allclose(p, np.sign(a) * np.maximum(np.abs(a) - hi, 0), atol=1e-10)
    inside = A / (A.abs().sum(1, keepdim=True) * 2)
    torch.testing.assert_close(project_rows_l1(inside, kappa), inside)


def test_implicit_model_is_well_posed_and_matches_its_own_equation():
    torch.manual_seed(2)
    model = ImplicitModel(4, 12, 3, kappa=0.9, dtype=D, tol=1e-12)
    with torch.no_grad():
        model.A.mul_(20.0)  # break well-posedness, then project back
    assert model.pf_eigenvalue() > 1
    model.project_()
    assert float(model.A.detach().abs().sum(1).max()) <= 0.9 + 1e-12
    # independent oracle for lambda_pf(|A|): power iteration on the positive matrix |A| + tiny
    M = model.A.detach().abs().numpy() + 1e-15
    v = np.ones(12)
    for _ in range(3000):
        v = M @ v
        v /= np.linalg.norm(v)
    assert abs(model.pf_eigenvalue() - v @ M @ v) < 1e-6
    assert model.pf_eigenvalue() == pytest.approx(pf_eigenvalue(model.A))
    u = torch.randn(5, 4, dtype=D, requires_grad=True)
    xs = model.state(u)
    torch.testing.assert_close(xs, torch.relu(xs @ model.A.T + u @ model.B.T), atol=1e-10, rtol=0)
    y = model(u)
    torch.testing.assert_close(y, xs @ model.C.T + u @ model.D.T)
    # gradient vs float64 finite differences (no kinks active at a random input, almost surely)
    cot = torch.randn(5, 3, dtype=D)
    (y * cot).sum().backward()
    h = 1e-6
    with torch.no_grad():
        e = torch.zeros_like(u)
        e[2, 1] = h
        fd = ((model(u + e) * cot).sum() - (model(u - e) * cot).sum()) / (2 * h)
    assert abs(fd.item() - u.grad[2, 1].item()) < 1e-6
    with pytest.raises(ValueError, match="kappa"):
        ImplicitModel(2, 3, 1, kappa=1.0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.floats(0.1, 0.9), method=st.sampled_from(["anderson", "broyden", "picard"]),
       act=st.sampled_from(["tanh", "leaky_relu:0.2", "relu"]))
def test_implicit_equals_unrolled_gradient_on_random_contractions(seed, norm, method, act):
    g = torch.Generator().manual_seed(seed)
    cell = EquilibriumCell(3, 5, activation=act, init_scale=norm, dtype=D)
    with torch.no_grad():
        cell.W.copy_(torch.randn(5, 5, generator=g, dtype=D))
        cell.W.mul_(norm / torch.linalg.matrix_norm(cell.W, ord=2))
    layer = DEQ(cell, state_shape=(5,), method=method, tol=1e-12, max_iter=500)
    x = torch.randn(2, 3, generator=g, dtype=D, requires_grad=True)
    cot = torch.randn(2, 5, generator=g, dtype=D)
    (layer(x) * cot).sum().backward()
    g_impl = x.grad.clone()
    x.grad = None
    (layer(x, backward="unroll") * cot).sum().backward()
    # a kink hit exactly is a measure-zero event for random data; both sides then use torch's choice
    torch.testing.assert_close(g_impl, x.grad, rtol=1e-7, atol=1e-9)


def test_higher_order_through_implicit_backward_is_refused():
    x = torch.tensor([[1.0]], dtype=D, requires_grad=True)
    z, _ = implicit_fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(1, 1, dtype=D), x, tol=1e-12)
    # the first derivative may be taken with create_graph (torch.func.grad always does) ...
    (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    zs = z.detach()
    assert abs(g.item() - 1 / (1 - 0.5 * (1 - torch.tanh(zs) ** 2)).item()) < 1e-9
    # ... but differentiating it again raises instead of dropping dz*/dx from the second derivative
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(g.sum(), x)
    # unroll supports it: d2z/dx2 of z = 0.5 z + x is 0
    z, _ = implicit_fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 1, dtype=D), x, backward="unroll",
                                tol=1e-13)
    (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    assert abs(g.item() - 2.0) < 1e-9
