"""Nonsmooth invertibility (Bolte et al. 2021), the implicit Jacobian set, and audit_implicit."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonsmooth.implicit import ElementwiseLayer, check_invertibility, implicit_jacobian_set


def _grid_det_signs(W, lo, hi, active, points=9):
    """Independent oracle: determinants of I - diag(s) W on a grid over the Clarke box."""
    idx = np.flatnonzero(active & (lo != hi))
    grids = [np.linspace(lo[i], hi[i], points) for i in idx]
    dets = []
    for combo in itertools.product(*grids):
        s = lo.copy()
        s[idx] = combo
        dets.append(np.linalg.det(np.eye(len(W)) - s[:, None] * W))
    return np.array(dets)


def test_classic_y_plus_abs_y_is_certified_by_the_engine_torch():
    torch = pytest.importorskip("torch")
    F_t = lambda y, x: y + torch.abs(y) - x  # noqa: E731
    r = check_invertibility(F_t, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert r.invertible is False
    assert r.exact, r.explain()  # the engine's Clarke Jacobian {0, 2} holds the singular element: a certificate
    assert r.sigma_min == 0.0
    assert r.ad_sigma_min == pytest.approx(1.0)  # torch: abs'(0) = 0 gives d_y F = 1, finite
    assert "AD returns a finite derivative" in r.explain()


@pytest.mark.slow
def test_classic_y_plus_abs_y_is_certified_by_the_engine_jax():
    jax = pytest.importorskip("jax")
    F_j = lambda y, x: y + jax.numpy.abs(y) - x  # noqa: E731
    r = check_invertibility(F_j, jax.numpy.zeros(1), jax.numpy.zeros(1))
    assert r.invertible is False and r.exact
    assert r.ad_sigma_min == pytest.approx(2.0)  # jax: abs'(0) = 1


def test_classic_y_plus_abs_y_is_flagged_by_sampling():
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    F_t = lambda y, x: y + torch.abs(y) - x  # noqa: E731
    # numpy callable, and torch/jax without the engine: Jacobians sampled around the point (evidence only)
    r = check_invertibility(lambda y, x: y + np.abs(y) - x, np.zeros(1), np.zeros(1))
    assert r.invertible is False and not r.exact
    r = check_invertibility(F_t, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                            use_engine=False)
    assert r.invertible is False and not r.exact and r.method == "sampled Jacobians"
    assert r.ad_sigma_min == pytest.approx(1.0)
    r = check_invertibility(lambda y, x: y + jax.numpy.abs(y) - x, jax.numpy.zeros(1), jax.numpy.zeros(1),
                            use_engine=False)
    assert r.invertible is False and r.ad_sigma_min == pytest.approx(2.0)  # jax: abs'(0) = 1
    # away from the kink the theorem applies
    r = check_invertibility(F_t, torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                            use_engine=False)
    assert r.invertible is True and r.sigma_min == pytest.approx(2.0)


def test_classic_case_as_a_structured_layer_is_certified():
    # y + |y| - x = 0  <=>  y = act(W y + U x) with act = abs, W = -1, U = 0 ... written as y = -|y| + x:
    # use F(y, x) = y - act(-y + x) with act = identity is smooth; the abs case needs act = abs on W y:
    layer = ElementwiseLayer(np.array([[-1.0]]), U=np.array([[0.0]]), activation="abs")  # F = y - |-y|
    r = check_invertibility(layer, np.zeros(1), np.zeros(1))
    # d_y F = 1 - s * (-1) = 1 + s, s in [-1, 1]: the vertex s = -1 is singular
    assert r.invertible is False and r.exact
    assert r.attained_at == {0: -1.0}


def test_vertices_invertible_but_hull_singular_is_caught():
    # F(z) = z - relu(2 z): d_z F = 1 - 2 s, s in [0, 1]; vertices give 1 and -1, s = 1/2 gives 0.
    layer = ElementwiseLayer(np.array([[2.0]]), activation="relu")
    r = check_invertibility(layer, np.zeros(1), None)
    assert r.invertible is False and r.exact
    assert r.method == "determinant sign change"
    assert r.sigma_min == pytest.approx(1.0)  # both vertices are well conditioned


def _layer_with_kinks(seed, n, k, norm):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, n))
    W *= norm / np.linalg.norm(W, 2)
    z = rng.normal(size=n)
    b = rng.normal(size=n)
    kinks = rng.choice(n, size=k, replace=False)
    b[kinks] = -(W @ z)[kinks]  # pre-activation exactly 0 there
    return ElementwiseLayer(W, b=b, activation="relu"), z, kinks


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), k=st.integers(0, 3), norm=st.floats(0.2, 3.0))
def test_verdict_matches_a_grid_over_the_clarke_box(seed, n, k, norm):
    k = min(k, n)
    layer, z, kinks = _layer_with_kinks(seed, n, k, norm)
    r = check_invertibility(layer, z, None)
    pre = layer.preactivation(z)
    lo, hi, active = layer._act.box(pre, 0.0)
    assert set(np.flatnonzero(active)) == set(kinks.tolist())
    dets = _grid_det_signs(layer.W, lo, hi, active)
    grid_singular = (np.sign(dets).min() != np.sign(dets).max()) or np.any(np.abs(dets) < 1e-12)
    assert r.exact
    if r.invertible:
        assert not grid_singular
        # multi-affine: the smallest |det| over the box is attained at a vertex, never inside
        vert = _grid_det_signs(layer.W, lo, hi, active, points=2)
        assert np.abs(dets).min() >= np.abs(vert).min() - 1e-12
    elif not grid_singular:
        # a sign change can hide between grid points; a finer grid along the segment must find it
        fine = _grid_det_signs(layer.W, lo, hi, active, points=401 if k == 1 else 41)
        assert np.sign(fine).min() != np.sign(fine).max() or np.any(np.abs(fine) < 1e-9)


def test_sufficient_conditions_past_the_kink_budget():
    layer, z, _ = _layer_with_kinks(0, 16, 14, 0.9)
    r = check_invertibility(layer, z, None, max_kinks=4)
    assert r.invertible is True and r.method == "sufficient condition"
    assert r.sufficient["L*|W|_2 < 1"]["holds"]
    assert r.n_active_kinks == 14
    layer, z, _ = _layer_with_kinks(1, 16, 14, 5.0)
    r = check_invertibility(layer, z, None, max_kinks=4)
    assert r.invertible in (False, None)
    assert not r.sufficient["L*|W|_2 < 1"]["holds"]


def test_implicit_jacobian_set_scalar_closed_form_and_membership():
    a = 0.5
    layer = ElementwiseLayer(np.array([[a]]), U=np.array([[1.0]]), activation="relu")
    S = implicit_jacobian_set(layer, np.zeros(1), np.zeros(1))
    assert S.exact and S.active == [0]
    assert sorted(float(M[0, 0]) for M in S.matrices) == pytest.approx([0.0, 1 / (1 - a)])
    # the set over the whole box is {s / (1 - a s): s in [0, 1]} = [0, 2]
    for v, inside in [(0.0, True), (1.0, True), (2.0, True), (2.5, False), (-0.1, False)]:
        ok, dist = S.contains_vjp(np.ones(1), np.array([v]), tol=1e-9)
        assert ok is inside, (v, dist)


def test_membership_lp_matches_sampled_selections():
    layer, z, kinks = _layer_with_kinks(5, 5, 2, 0.8)
    U = np.random.default_rng(9).normal(size=(5, 3))
    x = np.zeros(3)
    layer = ElementwiseLayer(layer.W, U=U, b=layer.b, activation="relu")
    S = implicit_jacobian_set(layer, z, x)
    g = np.random.default_rng(2).normal(size=5)
    rng = np.random.default_rng(3)
    pre = layer.preactivation(z, x)
    d = (pre > 0).astype(float)
    for _ in range(5):
        s = d.copy()
        s[kinks] = rng.uniform(0, 1, size=len(kinks))
        J = np.linalg.solve(np.eye(5) - s[:, None] * layer.W, s[:, None] * U)
        assert S.contains_vjp(g, g @ J, tol=1e-8)[0]
    assert not S.contains_vjp(g, g @ J + 0.5, tol=1e-8)[0]


def test_implicit_jacobian_set_of_a_smooth_callable_is_the_ift_derivative():
    torch = pytest.importorskip("torch")
    F = lambda z, t: z - 0.5 * torch.sin(z) - t  # noqa: E731  dz/dt = 1 / (1 - 0.5 cos z)
    z = torch.tensor([0.3], dtype=torch.float64)
    S = implicit_jacobian_set(F, z, torch.tensor([0.1], dtype=torch.float64))
    assert S.matrices.shape[1:] == (1, 1)
    np.testing.assert_allclose(S.matrices[:, 0, 0], 1 / (1 - 0.5 * np.cos(0.3)), rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        ElementwiseLayer(np.ones((2, 3)))
    with pytest.raises(ValueError, match="activation"):
        ElementwiseLayer(np.eye(2), activation="gelu")
    with pytest.raises(ValueError, match="NaN"):
        ElementwiseLayer(np.array([[np.nan]]))
    layer = ElementwiseLayer(np.eye(2) * 0.5)
    with pytest.raises(ValueError, match="one sample"):
        check_invertibility(layer, np.zeros(3), None)
    with pytest.raises(ValueError, match="max_kinks"):
        check_invertibility(layer, np.zeros(2), None, max_kinks=99)
    with pytest.raises(TypeError, match="callable"):
        check_invertibility(3, np.zeros(2), None)


def test_audit_verdicts():
    torch = pytest.importorskip("torch")
    from nonsmooth.implicit import DEQ, EquilibriumCell, audit_implicit

    torch.manual_seed(0)
    cell = EquilibriumCell(3, 6, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    layer = DEQ(cell, state_shape=(6,), tol=1e-11)
    a = audit_implicit(layer, x)
    assert getattr(a.verdict, "name", a.verdict) == "SMOOTH"
    assert all(s["gap_unroll"] < 1e-6 and s["gap_fd"] < 1e-5 for s in a.samples)
    jfb = DEQ(cell, state_shape=(6,), tol=1e-11, backward="jfb")
    assert audit_implicit(jfb, x).to_json()["verdict"] == "SPURIOUS"
    # put sample 0 on a kink: an inactive unit (z_j = 0) moved onto pre_j = 0 keeps the fixed point
    with torch.no_grad():
        z = layer(x[:1])
        pre = cell.preactivation(z, x[:1])[0]
        j = int(torch.argmin(pre))
        assert pre[j] < 0
        cell.b[j] -= pre[j]
    a = audit_implicit(layer, x[:1], kink_tol=1e-9)
    s = a.samples[0]
    assert s["n_active_kinks"] == 1 and s["invertible"] is True
    assert a.to_json()["verdict"] == "CLARKE"
    with pytest.raises(TypeError, match="DEQ or ImplicitModel"):
        audit_implicit(cell, x)


def test_a_continuum_of_solutions_is_reported_as_singular():
    torch = pytest.importorskip("torch")
    from nonsmooth.implicit import fixed_point

    # y = x - |y| at x = 0: every y <= 0 is a solution; two starts give two different answers
    x = torch.zeros(1, dtype=torch.float64)
    ys = []
    for start in (-0.5, -2.0):
        y, info = fixed_point(lambda y: x - torch.abs(y), torch.tensor([start], dtype=torch.float64), tol=1e-12)
        assert info.all_converged
        ys.append(y)
    assert abs(ys[0].item() - ys[1].item()) > 1.0
    F = lambda y, x: y + torch.abs(y) - x  # noqa: E731
    for y in ys:
        r = check_invertibility(F, y, x, use_engine=False)
        assert r.invertible is False and r.sigma_min == 0.0  # d_y F = 0 on the whole continuum
