"""LD derivatives vs the exact piece enumeration vs dense sampling, on random
piecewise-linear programs whose point sits on many kinks at once (Hypothesis)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from nonsmooth.conservative import Verdict, audit, clarke_jacobian, ld_jacobian  # noqa: E402
from nonsmooth.conservative import _pieces as A  # noqa: E402
from nonsmooth.conservative._problem import Problem  # noqa: E402
from nonsmooth.conservative import _forward as F  # noqa: E402
from nonsmooth.conservative._lp import hull_residual, min_norm_point, strictly_feasible  # noqa: E402


def as_set(mats, decimals=8):
    return {tuple(np.round(np.asarray(m, dtype=float).ravel(), decimals) + 0.0) for m in mats}


@st.composite
def pl_programs(draw):
    """x in R^n at 0, two layers z = W h with small integer weights, then relu/abs/id per
    unit and an optional max of the first two units: every unit sits on its kink at 0."""
    n = draw(st.integers(2, 3))
    widths = [n, draw(st.integers(2, 3)), draw(st.integers(1, 3))]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        W = np.array(draw(st.lists(st.integers(-2, 2), min_size=a * b, max_size=a * b)), dtype=float).reshape(b, a)
        acts = draw(st.lists(st.sampled_from(["relu", "abs", "id"]), min_size=b, max_size=b))
        layers.append((W, acts))
    use_max = draw(st.booleans()) and widths[-1] >= 2
    return n, layers, use_max


def render(program):
    n, layers, use_max = program
    Ws = [torch.tensor(W, dtype=torch.float64) for W, _ in layers]

    def f(x):
        h = x
        for W, (_, acts) in zip(Ws, layers):
            z = W @ h
            h = torch.stack([torch.relu(z[i]) if a == "relu" else torch.abs(z[i]) if a == "abs" else z[i]
                             for i, a in enumerate(acts)])
        if use_max:
            h = torch.cat([torch.maximum(h[:1], h[1:2]), h[2:]])
        return h

    return f


def numpy_jacobian(program, x):
    """Hand-written Jacobian (no autodiff) of the program at a point off every kink."""
    n, layers, use_max = program
    h, J = x.copy(), np.eye(n)
    for W, acts in layers:
        z, Jz = W @ h, W @ J
        d = np.array([(z[i] > 0) * 1.0 if a == "relu" else np.sign(z[i]) if a == "abs" else 1.0
                      for i, a in enumerate(acts)])
        h = np.array([max(z[i], 0) if a == "relu" else abs(z[i]) if a == "abs" else z[i] for i, a in enumerate(acts)])
        J = d[:, None] * Jz
    if use_max:
        top = J[0] if h[0] > h[1] else J[1]
        J = np.vstack([top[None], J[2:]])
    return J


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pl_programs(), st.integers(0, 2**31 - 1))
def test_ld_enumeration_and_sampling_agree(program, seed):
    n = program[0]
    f = render(program)
    x0 = torch.zeros(n, dtype=torch.float64)
    P = Problem(f, x0, kink_tol=0.0)
    try:
        leaves = P.run(F.EnumPolicy(), None, max_leaves=A.MAX_PIECES, max_sites=16)
    except F.BudgetExceeded:
        return
    enum = as_set(lf.jac for lf in leaves)
    assert all(lf.certified for lf in leaves)

    # every enumerated piece is genuine: at x + t w (w its interior witness) the
    # hand-written Jacobian equals the piece's Jacobian
    for lf in leaves:
        w = lf.witness if lf.witness is not None else np.ones(n)
        if lf.conds:
            assert strictly_feasible(lf.conds)[0]
        J = numpy_jacobian(program, 1e-3 * np.asarray(w))
        if not lf.conds:  # no condition: any direction works
            continue
        np.testing.assert_allclose(J, lf.jac, atol=1e-9)

    # dense sampling at nearby points in general position finds nothing outside the enumeration
    rng = np.random.default_rng(seed)
    sampled = as_set(numpy_jacobian(program, 1e-4 * d) for d in rng.standard_normal((300, n)))
    assert sampled <= enum

    # LD derivatives along random nonsingular directions are enumerated pieces
    for _ in range(6):
        M = rng.standard_normal((n, n))
        assert as_set([ld_jacobian(f, x0, M)]) <= enum


def test_ld_with_identity_resolves_ties_by_later_columns():
    # f = max(x1, x2) at 0 along M = I: the first column moves x1 only, so x1 wins
    f = lambda x: torch.maximum(x[:1], x[1:])  # noqa: E731
    x = torch.zeros(2, dtype=torch.float64)
    assert ld_jacobian(f, x).tolist() == [[1.0, 0.0]]
    assert ld_jacobian(f, x, np.array([[0.0, 1.0], [1.0, 0.0]])).tolist() == [[0.0, 1.0]]
    # first column ties (d1 = d2): the second column decides
    assert ld_jacobian(f, x, np.array([[1.0, -1.0], [1.0, 1.0]])).tolist() == [[0.0, 1.0]]


def test_ld_raw_is_the_directional_derivative():
    # f = |x1| + relu(x2 - x1) at 0; f'(0; d) computed by hand for the first column
    f = lambda x: (torch.abs(x[0]) + torch.relu(x[1] - x[0])).reshape(1)  # noqa: E731
    x = torch.zeros(2, dtype=torch.float64)
    M = np.array([[1.0, 0.5], [3.0, -2.0]])
    raw = ld_jacobian(f, x, M, raw=True)
    d = M[:, 0]
    assert raw[0, 0] == pytest.approx(abs(d[0]) + max(d[1] - d[0], 0.0))


def test_ld_rejects_singular_directions():
    with pytest.raises(ValueError, match="nonsingular"):
        ld_jacobian(torch.abs, torch.zeros(2, dtype=torch.float64), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="directions"):
        ld_jacobian(torch.abs, torch.zeros(2, dtype=torch.float64), np.zeros((3, 2)))


def test_gradient_sampling_agrees_with_enumeration():
    gs_mod = pytest.importorskip("nonsmooth.conservative._sampling")

    def f(x):
        return torch.stack([torch.relu(x[0] - x[1]) + torch.abs(x[1]), torch.maximum(x[0], 2 * x[1])])

    x = torch.zeros(2, dtype=torch.float64)
    C = clarke_jacobian(f, x)
    assert C.exact
    gs = gs_mod.gradient_sampling(f, x, n_samples=200, seed=1)
    assert as_set(gs.samples) <= as_set(C.vertices)


def test_hull_and_min_norm_against_closed_forms():
    pts = np.array([[1.0, 0.0], [0.0, 1.0]])
    res, w = hull_residual(pts, np.array([0.5, 0.5]))
    assert res < 1e-12 and np.allclose(w, [0.5, 0.5])
    res, _ = hull_residual(pts, np.array([1.0, 1.0]))
    assert res == pytest.approx(0.5)  # max-norm distance to the segment
    z, _ = min_norm_point(np.array([[2.0, 1.0], [-1.0, 1.0], [0.0, 3.0]]))
    np.testing.assert_allclose(z, [0.0, 1.0], atol=1e-9)
    z, _ = min_norm_point(np.array([[1.0, 2.0, 2.0]]))
    np.testing.assert_allclose(z, [1.0, 2.0, 2.0])


def test_exact_budget_and_verdict_consistency_on_wide_layer():
    # 8 independent relu kinks at 0 (2^8 pieces); torch's relu'(0) = 0 gives the all-off
    # piece, itself essentially active: CLARKE without needing the full enumeration
    W = torch.tensor(np.random.default_rng(0).integers(-3, 4, (8, 8)), dtype=torch.float64) + 10 * torch.eye(8, dtype=torch.float64)
    a = audit(lambda x: torch.relu(W @ x).sum().reshape(1), torch.zeros(8, dtype=torch.float64))
    assert a.verdict is Verdict.CLARKE
    assert len(a.active_kinks) == 8
