"""audit() on torch programs against closed forms."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as Fn  # noqa: E402

from nonsmooth.conservative import Verdict, audit, audit_batch, clarke_jacobian, ld_jacobian, selection_jacobians  # noqa: E402


def as_set(mats, decimals=9):
    return {tuple(np.round(np.asarray(m, dtype=float).ravel(), decimals) + 0.0) for m in mats}


def t64(*v):
    return torch.tensor(v, dtype=torch.float64)


# --------------------------------------------------------------------------- the classics


def test_relu_minus_relu_is_spurious_and_certified():
    a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1))
    assert a.verdict is Verdict.SPURIOUS
    assert a.exact
    assert a.ad_jacobian.tolist() == [[0.0]]
    assert as_set(a.b_subdifferential) == {(1.0,)}
    assert a.bifurcation  # relu'(0) in {0, 1} gives 0, 1 or 2
    assert as_set(a.selection_jacobians) == {(0.0,), (1.0,), (2.0,)}
    assert a.hull_distance == pytest.approx(1.0)


def test_relu_minus_relu_vector_is_spurious_with_identity_clarke():
    a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(3, dtype=torch.float64))
    assert a.verdict is Verdict.SPURIOUS and a.exact
    assert as_set(a.b_subdifferential) == as_set([np.eye(3)])


def test_abs_at_zero_is_clarke():
    a = audit(torch.abs, torch.zeros(1))
    assert a.verdict is Verdict.CLARKE
    assert a.ad_jacobian.tolist() == [[0.0]]  # torch's convention abs'(0) = 0
    assert as_set(a.b_subdifferential) == {(-1.0,), (1.0,)}
    assert a.exact
    assert a.min_norm.tolist() == [[0.0]]
    assert a.active_kinks[0].primitive == "abs"
    assert a.active_kinks[0].clarke == "[-1, 1]"


def test_relu_plus_relu_of_negative_is_abs():
    a = audit(lambda x: torch.relu(x) + torch.relu(-x), torch.zeros(1))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(-1.0,), (1.0,)}


def test_smooth_mlp_matches_analytic_jacobian():
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    W2 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    b1 = torch.randn(7, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)

    def f(x):
        return W2 @ torch.tanh(W1 @ x + b1)

    a = audit(f, x)
    assert a.verdict is Verdict.SMOOTH
    h = W1 @ x + b1
    J = (W2 @ torch.diag(1 - torch.tanh(h) ** 2) @ W1).numpy()
    np.testing.assert_allclose(a.ad_jacobian, J, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.engine_jacobian, J, rtol=1e-10, atol=1e-12)
    assert a.active_kinks == ()


def test_relu_net_at_generic_point_is_smooth():
    g = torch.Generator().manual_seed(1)
    W1, W2 = torch.randn(16, 5, generator=g), torch.randn(2, 16, generator=g)
    x = torch.randn(5, generator=g)
    a = audit(lambda x: W2 @ torch.relu(W1 @ x), x)
    assert a.verdict is Verdict.SMOOTH
    mask = ((W1 @ x) > 0).double()
    J = W2.double() @ torch.diag(mask) @ W1.double()
    np.testing.assert_allclose(a.ad_jacobian, J.numpy(), rtol=1e-5, atol=1e-5)
    assert a.dtype == "float32"


def test_sqrt_at_zero_is_not_lipschitz():
    a = audit(torch.sqrt, torch.zeros(1))
    assert a.verdict is Verdict.NOT_LIPSCHITZ
    assert "grow" in a.reason


def test_floor_at_one_is_not_lipschitz_and_between_integers_smooth():
    a = audit(torch.floor, torch.ones(1, dtype=torch.float64))
    assert a.verdict is Verdict.NOT_LIPSCHITZ
    assert "discontinuous" in a.reason
    b = audit(torch.floor, torch.full((1,), 0.5, dtype=torch.float64))
    assert b.verdict is Verdict.SMOOTH and b.ad_jacobian.tolist() == [[0.0]]


@pytest.mark.parametrize("fn,x", [(torch.sign, 0.0), (torch.round, 0.5), (torch.ceil, 2.0), (torch.trunc, -1.0)])
def test_jumps_are_not_lipschitz(fn, x):
    assert audit(fn, t64(x)).verdict is Verdict.NOT_LIPSCHITZ


def test_trunc_at_zero_is_continuous():
    # trunc jumps at nonzero integers only: at 0 it is constant nearby
    a = audit(torch.trunc, t64(0.0))
    assert a.verdict in (Verdict.SMOOTH, Verdict.CLARKE)
    assert np.allclose(a.ad_jacobian, 0.0)


def test_sqrt_of_square_is_not_overclaimed():
    # sqrt(x**2) = |x| is Lipschitz, yet AD gives NaN: the engine must not say NOT_LIPSCHITZ
    a = audit(lambda x: torch.sqrt(x**2), t64(0.0))
    assert a.verdict is Verdict.UNDECIDED
    assert np.isnan(a.ad_jacobian).all()


def test_where_guarded_sqrt_nan_gradient_is_spurious():
    # f = 0 near x = -1, but torch's backward through where gives 0 * inf = NaN
    a = audit(lambda x: torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x)), t64(-1.0))
    assert a.verdict is Verdict.SPURIOUS
    assert np.isnan(a.ad_jacobian).all()
    assert a.engine_jacobian.tolist() == [[0.0]]


# --------------------------------------------------------------------------- selections


def test_maximum_at_tie():
    a = audit(lambda x: torch.maximum(x[0], x[1]), t64(2.0, 2.0))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (0.0, 1.0)}
    np.testing.assert_allclose(a.ad_jacobian, [[0.5, 0.5]])  # torch splits ties evenly
    np.testing.assert_allclose(a.min_norm, [[0.5, 0.5]], atol=1e-9)


def test_max_reduction_with_dim_at_tie_picks_one_index():
    a = audit(lambda x: x.max(dim=0).values, t64(3.0, 3.0, 1.0))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)}
    assert sorted(a.ad_jacobian.ravel().tolist()) == [0.0, 0.0, 1.0]


def test_sort_with_ties():
    a = audit(lambda x: torch.sort(x).values, t64(1.0, 1.0, 2.0))
    assert a.verdict is Verdict.CLARKE and a.exact
    P = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    assert as_set(a.b_subdifferential) == as_set([np.eye(3), P])


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.topk(x, 2).values,
        lambda x: torch.kthvalue(x, 2).values,
        lambda x: torch.median(x),
        lambda x: torch.cummax(x, 0).values,
        lambda x: Fn.max_pool1d(x.reshape(1, 1, -1), 2).reshape(-1),
    ],
    ids=["topk", "kthvalue", "median", "cummax", "max_pool"],
)
def test_selection_ops_with_ties_are_clarke_and_exact(fn):
    x = t64(2.0, 2.0, 0.0, 3.0)
    a = audit(fn, x)
    assert a.verdict is Verdict.CLARKE and a.exact
    # every B-element is a 0/1 selection matrix
    for B in a.b_subdifferential:
        assert set(np.unique(B)) <= {0.0, 1.0}
    # and the two tied elements can each be the one selected: brute force by perturbing
    found = []
    for eps in (1e-6, -1e-6):
        y = x.clone()
        y[0] += eps
        found.append(torch.func.jacrev(fn)(y).reshape(-1, 4).numpy())
    assert as_set(found) <= as_set(a.b_subdifferential)


def test_argmax_indexing_at_tie():
    a = audit(lambda x: torch.gather(x, 0, torch.argmax(x).reshape(1)), t64(1.0, 1.0))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (0.0, 1.0)}


def test_clamp_at_both_bounds():
    a = audit(lambda x: torch.clamp(x, -1.0, 1.0), t64(1.0, -1.0, 0.5))
    assert a.verdict is Verdict.CLARKE and a.exact
    expect = [np.diag([p, q, 1.0]) for p in (0.0, 1.0) for q in (0.0, 1.0)]
    assert as_set(a.b_subdifferential) == as_set(expect)


def test_where_from_comparison_continuous_and_discontinuous():
    a = audit(lambda x: torch.where(x >= 0, x, torch.zeros_like(x)), t64(0.0))
    assert a.verdict is Verdict.CLARKE and as_set(a.b_subdifferential) == {(0.0,), (1.0,)}
    b = audit(lambda x: torch.where(x >= 0, torch.ones_like(x), torch.zeros_like(x)), t64(0.0))
    assert b.verdict is Verdict.NOT_LIPSCHITZ


def test_norm_at_zero():
    a = audit(lambda x: torch.linalg.vector_norm(x), torch.zeros(3, dtype=torch.float64))
    assert a.verdict is Verdict.CLARKE  # torch returns 0, inside the unit ball
    assert not a.exact  # the unit ball is not a polytope
    norms = np.linalg.norm(a.b_subdifferential.reshape(len(a.b_subdifferential), -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-12)  # B-elements lie on the unit sphere


@pytest.mark.parametrize(
    "fn,x,expect",
    [
        (lambda x: Fn.leaky_relu(x, 0.1), 0.0, {(0.1,), (1.0,)}),
        (Fn.hardswish, -3.0, {(0.0,), (-0.5,)}),
        (Fn.hardswish, 3.0, {(1.5,), (1.0,)}),
        (Fn.hardsigmoid, 3.0, {(0.0,), (1 / 6,)}),
        (Fn.relu6, 6.0, {(0.0,), (1.0,)}),
        (lambda x: Fn.elu(x, alpha=0.5), 0.0, {(0.5,), (1.0,)}),
        (Fn.selu, 0.0, {(1.0507009873554805,), (1.6732632423543772 * 1.0507009873554805,)}),
        (lambda x: Fn.softshrink(x, 0.5), 0.5, {(0.0,), (1.0,)}),
        (Fn.hardtanh, -1.0, {(0.0,), (1.0,)}),
    ],
    ids=["leaky", "hardswish-3", "hardswish3", "hardsigmoid", "relu6", "elu", "selu", "softshrink", "hardtanh"],
)
def test_activation_kinks_match_one_sided_derivatives(fn, x, expect):
    a = audit(fn, t64(x))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {tuple(np.round(e, 9)) for e in expect}
    # independent oracle: one-sided float64 finite differences of the same function
    h = 1e-7
    xx = t64(x)
    right = float((fn(xx + h) - fn(xx)) / h)
    left = float((fn(xx) - fn(xx - h)) / h)
    got = sorted(b for (b,) in as_set(a.b_subdifferential))
    assert got == pytest.approx(sorted([left, right]), abs=1e-5)


def test_hardshrink_is_a_jump():
    assert audit(lambda x: Fn.hardshrink(x, 0.5), t64(0.5)).verdict is Verdict.NOT_LIPSCHITZ


# --------------------------------------------------------------------------- networks with kinks


def test_relu_network_with_exact_zero_preactivation():
    W1 = torch.tensor([[1.0, -1.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    W2 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    x = t64(1.0, 1.0)  # first pre-activation is exactly 0

    def f(x):
        return W2 @ torch.relu(W1 @ x)

    a = audit(f, x)
    assert len(a.active_kinks) == 1 and a.active_kinks[0].primitive == "relu"
    on = (W2 @ torch.diag(t64(1.0, 1.0, 1.0)) @ W1).numpy()
    off = (W2 @ torch.diag(t64(0.0, 1.0, 1.0)) @ W1).numpy()
    assert as_set(a.b_subdifferential) == as_set([on, off])
    assert a.exact
    assert a.verdict is Verdict.CLARKE  # torch's relu'(0) = 0 picks the "off" piece
    np.testing.assert_allclose(a.ad_jacobian, off)


def test_two_layer_kinks_downstream_depend_on_upstream_choice():
    # h = relu(x1 - x2); y = relu(h - x3) at x = (1, 1, 0): both kinks active, and
    # the second kink's argument has a different gradient under each branch of the first
    def f(x):
        h = torch.relu(x[0] - x[1])
        return torch.relu(h - x[2]).reshape(1)

    a = audit(f, t64(1.0, 1.0, 0.0))
    assert a.exact
    # pieces: y = x1 - x2 - x3 (x1 > x2, x1 - x2 > x3), y = -x3 (x1 < x2, x3 < 0), else 0
    assert as_set(a.b_subdifferential) == {(0.0, 0.0, 0.0), (1.0, -1.0, -1.0), (0.0, 0.0, -1.0)}
    assert a.verdict is Verdict.CLARKE


def test_infeasible_pattern_is_pruned():
    # relu(x) - relu(x) = 0: patterns (on, off) and (off, on) have empty interior
    a = audit(lambda x: torch.relu(x) - torch.relu(x), t64(0.0))
    assert as_set(a.b_subdifferential) == {(0.0,)}
    assert a.verdict is Verdict.CLARKE


def test_max_of_affine_pieces_in_2d():
    # f = max(x1, x2, -x1 - x2) at 0: three essentially active pieces
    def f(x):
        return torch.max(torch.stack([x[0], x[1], -x[0] - x[1]])).reshape(1)

    a = audit(f, torch.zeros(2, dtype=torch.float64))
    assert a.exact
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (0.0, 1.0), (-1.0, -1.0)}
    C = clarke_jacobian(f, torch.zeros(2, dtype=torch.float64))
    assert C.contains(np.array([[0.0, 0.0]]))  # 0 = (e1 + e2 + (-1,-1)) / 3
    assert not C.contains(np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(C.min_norm(), [[0.0, 0.0]], atol=1e-9)


# --------------------------------------------------------------------------- inputs and outputs


def test_tuple_inputs_are_concatenated_columns():
    a = audit(lambda x, y: torch.maximum(x, y), (t64(1.0), t64(1.0)))
    assert a.verdict is Verdict.CLARKE
    assert a.ad_jacobian.shape == (1, 2)
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (0.0, 1.0)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes(dtype):
    a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(2, dtype=dtype))
    assert a.verdict is Verdict.SPURIOUS
    assert a.dtype == str(dtype).replace("torch.", "")
    assert a.ad_jacobian.dtype == np.float64


def test_float32_near_kink_is_not_called_spurious():
    # W @ x is 1e-9 in float64 but rounds to exactly 0 in float32 for AD
    W = torch.tensor([[1.0, -1.0]])
    x = torch.tensor([1.0, 1.0 - 2 ** -24])
    a = audit(lambda x: torch.relu(W @ x) - torch.relu(-(W @ x)), x)
    assert a.verdict is not Verdict.SPURIOUS or a.exact


def test_audit_batch_and_json():
    res = audit_batch(torch.abs, torch.tensor([[0.0], [1.0], [-2.0]], dtype=torch.float64))
    assert [r.verdict for r in res] == [Verdict.CLARKE, Verdict.SMOOTH, Verdict.SMOOTH]
    d = res[0].to_json()
    assert json.loads(json.dumps(d))["verdict"] == "CLARKE"
    assert "torch" in d["versions"]
    assert "Clarke" in res[0].explain()


def test_ld_jacobian_of_abs_follows_the_first_direction():
    x = torch.zeros(1, dtype=torch.float64)
    assert ld_jacobian(torch.abs, x).tolist() == [[1.0]]
    assert ld_jacobian(torch.abs, x, np.array([[-2.0]])).tolist() == [[-1.0]]
    raw = ld_jacobian(torch.abs, x, np.array([[-2.0, 3.0]]), raw=True)
    assert raw.tolist() == [[2.0, -3.0]]  # f'(0; [-2, 3]) = -sign(-2) * [-2, 3]


def test_selection_jacobians_of_relu_difference():
    S = selection_jacobians(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1))
    assert as_set(S) == {(0.0,), (1.0,), (2.0,)}


# --------------------------------------------------------------------------- bad input


def test_unsupported_primitive_is_undecided_and_named():
    a = audit(lambda x: torch.remainder(x, 1.0), t64(0.5))
    assert a.verdict is Verdict.UNDECIDED
    assert "remainder" in a.reason


def test_data_dependent_control_flow_is_undecided():
    def f(x):
        if x.sum() > 0:
            return x
        return -x

    a = audit(f, t64(1.0))
    assert a.verdict is Verdict.UNDECIDED
    assert "trace" in a.reason


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        audit(torch.abs, t64(float("nan")))
    with pytest.raises(ValueError, match="empty"):
        audit(torch.abs, torch.zeros(0))
    with pytest.raises(TypeError, match="floating"):
        audit(torch.abs, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="kink_tol"):
        audit(torch.abs, t64(0.0), kink_tol=-1.0)
    with pytest.raises(ValueError, match="exact_budget"):
        audit(torch.abs, t64(0.0), exact_budget=1.5)
    with pytest.raises(TypeError, match="torch tensors or jax arrays"):
        audit(torch.abs, np.zeros(2))
    with pytest.raises(TypeError, match="callable"):
        audit(3, t64(0.0))


def test_kink_tol_widens_activity():
    a = audit(torch.abs, t64(1e-9))
    assert a.verdict is Verdict.SMOOTH
    b = audit(torch.abs, t64(1e-9), kink_tol=1e-6)
    assert b.active_kinks and b.verdict is Verdict.CLARKE


def test_budget_exceeded_is_honest():
    # Kinks in two layers (the outer relu reads the inner ones), so no Minkowski-sum
    # decomposition applies and the pieces must be enumerated: with a budget of 2
    # nothing is certified beyond it.  AD (all zeros) is far from every element found
    # (all ones, or all twos), yet the set may be incomplete: UNDECIDED, naming the budget.
    def f(x):
        inner = torch.relu(x).sum() - torch.relu(-x).sum()
        return ((torch.relu(x) - torch.relu(-x)).sum() + torch.relu(inner)).reshape(1)

    a = audit(f, torch.zeros(6, dtype=torch.float64), exact_budget=2)
    assert not a.exact
    assert a.verdict is Verdict.UNDECIDED
    assert "exact_budget" in a.reason


def test_one_layer_of_kinks_needs_no_budget():
    # One layer of independent kinks is decided as a Minkowski sum of 1-kink sets, with
    # no enumeration of its 2^6 sign patterns: exact even under exact_budget=2.  Oracle:
    # d/dx_i (relu(x_i) - relu(-x_i)) = 1 on both sides, so the Clarke set is {ones}.
    W = torch.eye(6, dtype=torch.float64)
    f = lambda x: (torch.relu(W @ x) - torch.relu(-(W @ x))).sum().reshape(1)  # noqa: E731
    x = torch.zeros(6, dtype=torch.float64)
    a = audit(f, x, exact_budget=2)
    assert a.exact and a.verdict is Verdict.SPURIOUS
    C = clarke_jacobian(f, x, exact_budget=2)
    assert C.exact and C.contains(np.ones((1, 6))) and not C.contains(np.full((1, 6), 0.9), tol=1e-3)


def test_clamp_with_tensor_bounds_and_nn_module():
    lo, hi = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    a = audit(lambda x: torch.clamp(x, lo, hi), t64(0.0))
    assert a.verdict is Verdict.CLARKE and as_set(a.b_subdifferential) == {(0.0,), (1.0,)}
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].bias.zero_()
    b = audit(net, torch.zeros(2, dtype=torch.float64))  # every hidden unit at its kink
    assert b.exact and len(b.active_kinks) == 3
    W1, W2 = net[0].weight.detach().numpy(), net[2].weight.detach().numpy()
    rng = np.random.default_rng(0)
    sampled = as_set(W2 @ np.diag((W1 @ d > 0).astype(float)) @ W1 for d in rng.standard_normal((400, 2)))
    assert sampled <= as_set(b.b_subdifferential)


def test_one_norm_and_x_sign_x():
    a = audit(lambda x: torch.linalg.vector_norm(x, ord=1).reshape(1), t64(0.0, 0.0))
    assert a.exact and as_set(a.b_subdifferential) == {(s, u) for s in (-1.0, 1.0) for u in (-1.0, 1.0)}
    b = audit(lambda x: x * torch.sign(x), t64(0.0))  # = |x|: sign jumps, the product does not
    assert b.verdict is Verdict.CLARKE and as_set(b.b_subdifferential) == {(-1.0,), (1.0,)}


def test_explanations_read_as_sentences():
    a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1))
    text = a.explain()
    assert "NOT in the Clarke Jacobian" in text and "certified" in text and "  " not in text
    assert "relu" in text and "torch" in text
    W = torch.eye(4, dtype=torch.float64)
    b = audit(lambda x: (torch.relu(W @ x) - torch.relu(-(W @ x))).sum().reshape(1),
              torch.zeros(4, dtype=torch.float64), exact_budget=2)
    assert b.verdict is Verdict.UNDECIDED
    assert any("Gradient sampling" in n and "not a certificate" in n for n in b.notes)


def test_too_large_dense_tangents_are_refused_clearly(monkeypatch):
    from nonsmooth.conservative import _problem

    monkeypatch.setattr(_problem, "MAX_TANGENT_FLOATS", 100)
    a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(20))
    assert a.verdict is Verdict.UNDECIDED and "fewer inputs" in a.reason
    with pytest.raises(ValueError, match="fewer inputs"):
        ld_jacobian(torch.abs, torch.zeros(20))
    # a smooth point needs no tangent matrix at all
    assert audit(torch.tanh, torch.zeros(20)).verdict is Verdict.SMOOTH


def test_atan2_is_not_assumed_smooth():
    # atan2 jumps across the negative x axis: at (y, x) = (0, -1) torch's derivative is
    # finite, yet f is discontinuous there; the engine must not call it SMOOTH
    a = audit(lambda v: torch.atan2(v[:1], v[1:]), t64(0.0, -1.0))
    assert a.verdict is Verdict.UNDECIDED and "atan2" in a.reason


def test_json_maps_nonfinite_to_null_and_keeps_text():
    a = audit(lambda x: torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x)), t64(-1.0))
    d = json.loads(json.dumps(a.to_json(), allow_nan=False))
    assert d["ad_jacobian"] == [[None]]
    assert "NaN" in d["reason"]


@pytest.mark.parametrize(
    "fn,x,verdict,words",
    [
        (lambda x: x**0.5, 0.0, Verdict.NOT_LIPSCHITZ, "grow"),
        (lambda x: torch.abs(x) ** 0.5, 0.0, Verdict.NOT_LIPSCHITZ, "grow"),
        (lambda x: x**1.5, 1.0, Verdict.SMOOTH, ""),
        (lambda x: x**1.5, 0.0, Verdict.UNDECIDED, "domain boundary"),
        (lambda x: x**-1.0, 0.0, Verdict.UNDECIDED, "not finite"),
        (torch.log, 0.0, Verdict.UNDECIDED, "not finite"),
    ],
    ids=["sqrt-pow", "abs-sqrt", "pow1.5-at-1", "pow1.5-at-0", "pole", "log0"],
)
def test_fractional_powers_poles_and_domains(fn, x, verdict, words):
    a = audit(fn, t64(x))
    assert a.verdict is verdict
    assert words in a.reason


def test_hand_written_norm_is_read_as_a_norm():
    # sqrt(sum(x**2)) is the 2-norm: Lipschitz at 0 (Clarke set the unit ball), but torch's
    # AD returns NaN there (sqrt'(0) * 0): certified not a generalized derivative
    a = audit(lambda x: torch.sqrt((x**2).sum()), torch.zeros(3, dtype=torch.float64))
    assert [k.primitive for k in a.active_kinks] == ["norm"]
    assert np.isnan(a.ad_jacobian).all() and a.verdict is Verdict.SPURIOUS
    b = audit(lambda x: torch.sqrt((x * x).sum(dim=-1)), torch.ones(2, 3, dtype=torch.float64))
    assert b.verdict is Verdict.SMOOTH
    np.testing.assert_allclose(b.ad_jacobian, np.kron(np.eye(2), np.full((1, 3), 1 / np.sqrt(3))), atol=1e-12)


def test_inf_norm_ties_and_zero():
    f = lambda x: torch.linalg.vector_norm(x, ord=float("inf")).reshape(1)  # noqa: E731
    a = audit(f, t64(0.0, 0.0))
    assert a.exact and a.verdict is Verdict.CLARKE
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)}
    b = audit(f, t64(1.0, -1.0))
    assert b.exact and as_set(b.b_subdifferential) == {(1.0, 0.0), (0.0, -1.0)}


def test_threshold_is_a_jump_only_when_value_differs():
    assert audit(lambda x: torch.threshold(x, 0.0, 0.0), t64(0.0)).verdict is Verdict.CLARKE
    assert audit(lambda x: torch.threshold(x, 0.5, -2.0), t64(0.5)).verdict is Verdict.NOT_LIPSCHITZ


def test_dtype_casts_inside_f():
    A = torch.tensor([[1.0, -1.0], [2.0, 1.0]], dtype=torch.float64)
    a = audit(lambda x: torch.relu(A.to(x.dtype) @ x) - torch.relu(-(A.to(x.dtype) @ x)), torch.zeros(2))
    assert a.verdict is Verdict.SPURIOUS and a.exact  # float -> float casts are smooth
    # float -> int casts truncate: a jump at nonzero integers, continuous elsewhere
    b = audit(lambda x: x * x.to(torch.int64).to(x.dtype), t64(1.0))
    assert b.verdict is Verdict.NOT_LIPSCHITZ
    c = audit(lambda x: x * x.to(torch.int64).to(x.dtype), t64(1.5))
    assert c.verdict is Verdict.SMOOTH
