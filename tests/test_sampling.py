"""Gradient sampling against closed forms, brute-force geometry and the hand-propagated PL oracle."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nonsmooth.conservative._sampling import gradient_sampling, hull_distance, min_norm_in_hull

from _pl_programs import pl_cases, sampled_b_subdifferential

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def _as_set(samples):
    return sorted(tuple(np.round(s.reshape(-1), 9)) for s in samples)


# ------------------------------------------------------------------ closed forms


def test_abs_at_zero_torch_sees_both_slopes_and_min_norm_zero():
    gs = gradient_sampling(torch.abs, torch.tensor([0.0]), n_samples=40)
    assert _as_set(gs.samples) == [(-1.0,), (1.0,)]
    assert abs(float(gs.min_norm[0, 0])) < 1e-12
    assert sum(gs.counts) == 40 and gs.n_nonfinite == 0
    assert gs.framework == "torch" and gs.dtype == "float64" and "torch" in gs.versions


def test_max_tie_jax_min_norm_is_midpoint():
    gs = gradient_sampling(lambda x: jnp.maximum(x[0], x[1]), jnp.zeros(2), n_samples=60)
    assert _as_set(gs.samples) == [(0.0, 1.0), (1.0, 0.0)]
    np.testing.assert_allclose(gs.min_norm, [[0.5, 0.5]], atol=1e-10)
    assert gs.framework == "jax" and "jax" in gs.versions


def test_min_norm_of_a_segment_off_the_origin():
    # max(2a+b, a+2b) at 0: hull is the segment (2,1)-(1,2); its closest point to 0 is (1.5, 1.5).
    f = lambda x: torch.maximum(2 * x[0] + x[1], x[0] + 2 * x[1])
    gs = gradient_sampling(f, torch.zeros(2), n_samples=60)
    assert _as_set(gs.samples) == [(1.0, 2.0), (2.0, 1.0)]
    np.testing.assert_allclose(gs.min_norm, [[1.5, 1.5]], atol=1e-9)
    assert gs.kkt_gap < 1e-9


def test_weighted_abs_sum_has_four_pieces():
    f = lambda x: jnp.abs(x[0]) + 2 * jnp.abs(x[1])
    gs = gradient_sampling(f, jnp.zeros(2), n_samples=200)
    assert _as_set(gs.samples) == sorted(tuple(map(float, p)) for p in itertools.product((-1, 1), (-2, 2)))
    np.testing.assert_allclose(gs.min_norm, 0.0, atol=1e-10)


def test_vector_output_jacobians():
    f = lambda x: torch.stack([torch.relu(x[0]), torch.abs(x[1])])
    gs = gradient_sampling(f, torch.zeros(2), n_samples=200)
    expected = sorted(tuple(np.diag([a, b]).reshape(-1).astype(float)) for a in (0, 1) for b in (-1, 1))
    assert _as_set(gs.samples) == expected
    assert gs.samples.shape[1:] == (2, 2) and gs.out_shape == (2,)
    np.testing.assert_allclose(gs.min_norm, 0.0, atol=1e-10)


def test_smooth_function_gives_one_jacobian_close_to_analytic():
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    gs = gradient_sampling(lambda v: (v ** 2).sum() + torch.sin(v[0]), x, radius=1e-7)
    assert gs.n_distinct == 1
    analytic = 2 * x.numpy() + np.array([np.cos(0.3), 0, 0])
    np.testing.assert_allclose(gs.min_norm.reshape(-1), analytic, atol=1e-5)


def test_sqrt_at_zero_reports_nonfinite_jacobians():
    gs = gradient_sampling(torch.sqrt, torch.tensor([0.0]), n_samples=50)
    assert 0 < gs.n_nonfinite < 50
    assert "not locally Lipschitz" in gs.explain()
    assert np.all(np.isfinite(gs.samples))


def test_float32_parameters_fall_back_to_user_dtype():
    W = torch.tensor([[1.0, -1.0]], dtype=torch.float32)
    gs = gradient_sampling(lambda v: torch.relu(W @ v), torch.zeros(2, dtype=torch.float32), n_samples=60,
                           radius=1e-3)
    assert gs.dtype == "float32"
    assert _as_set(gs.samples) == [(0.0, 0.0), (1.0, -1.0)]


def test_data_dependent_control_flow_is_sampled_point_by_point():
    def f(v):  # .item() breaks vmap; the per-point fallback must still work.
        return v.sum() if v[0].item() > 0 else -v.sum()

    gs = gradient_sampling(f, torch.zeros(2), n_samples=40)
    assert _as_set(gs.samples) == [(-1.0, -1.0), (1.0, 1.0)]


def test_contains_and_json():
    gs = gradient_sampling(torch.abs, torch.tensor([0.0]), n_samples=20)
    assert gs.contains(np.array([[0.3]])) and not gs.contains(np.array([[1.5]]))
    blob = json.loads(json.dumps(gs.to_json()))
    assert blob["n_distinct"] == 2 and blob["framework"] == "torch" and "explanation" in blob


# ------------------------------------------------------------------ the QP and LP against brute force


def _brute_min_norm_2d(P):
    from scipy.spatial import Delaunay

    try:
        if Delaunay(P).find_simplex(np.zeros(2)) >= 0:
            return 0.0
    except Exception:  # degenerate (collinear) sets: fall through to segments
        pass
    best = min(np.linalg.norm(p) for p in P)
    for a, b in itertools.combinations(P, 2):
        d = b - a
        s = np.clip(-(a @ d) / (d @ d), 0.0, 1.0) if d @ d > 0 else 0.0
        best = min(best, np.linalg.norm(a + s * d))
    return best


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 7), st.integers(0, 2**31 - 1), st.floats(-3, 3))
def test_min_norm_matches_brute_force_in_2d(k, seed, shift):
    P = np.random.default_rng(seed).normal(size=(k, 2)) + shift
    z, w, gap = min_norm_in_hull(P)
    assert abs(np.linalg.norm(z) - _brute_min_norm_2d(P)) < 1e-7
    np.testing.assert_allclose(P.T @ w, z, atol=1e-9)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=6), st.floats(-8, 8))
def test_hull_distance_in_1d_is_interval_distance(pts, target):
    lo, hi = min(pts), max(pts)
    expected = max(lo - target, target - hi, 0.0)
    assert abs(hull_distance(np.array(pts)[:, None], np.array([target])) - expected) < 1e-8


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"radius": -1.0}, "radius"), ({"radius": float("nan")}, "radius"), ({"n_samples": 0}, "n_samples"),
    ({"dedupe_tol": -1.0}, "dedupe_tol"), ({"framework": "numpy"}, "framework"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_sampling(torch.abs, torch.zeros(1), **kwargs)


def test_bad_points_raise():
    with pytest.raises(ValueError, match="finite"):
        gradient_sampling(torch.abs, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        gradient_sampling(torch.abs, torch.zeros(0))
    with pytest.raises(TypeError, match="floating"):
        gradient_sampling(torch.abs, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="framework"):
        gradient_sampling(np.abs, np.zeros(2))
    with pytest.raises(ValueError, match="points"):
        min_norm_in_hull(np.zeros((0, 2)))


def test_numpy_point_with_explicit_framework():
    gs = gradient_sampling(jnp.abs, np.zeros(1), framework="jax", n_samples=20)
    assert _as_set(gs.samples) == [(-1.0,), (1.0,)]


# ------------------------------------------------------------------ against the independent PL oracle


@settings(max_examples=15, deadline=None, derandomize=True)
@given(pl_cases(max_in=3, max_depth=2, max_width=3))
def test_sampled_jacobians_are_b_subdifferential_elements(case):
    prog, x = case
    oracle = sampled_b_subdifferential(prog, x, n_directions=1500)
    for name, f, xx in (("torch", prog.render_torch(), torch.tensor(x)),
                        ("jax", prog.render_jax(), np.asarray(x))):
        gs = gradient_sampling(f, xx, radius=oracle.t, n_samples=80, seed=1,
                               framework="jax" if name == "jax" else None)
        for J in gs.samples:
            assert oracle.has(J, tol=1e-9), (name, J, oracle.elements)


def test_tuple_input_calls_f_with_each_array_and_stacks_columns():
    a, b = torch.tensor([1.0]), torch.tensor([[1.0, -2.0]])
    gs = gradient_sampling(lambda u, v: torch.maximum(u[0], v[0, 0]) + v[0, 1], (a, b), n_samples=60)
    assert _as_set(gs.samples) == [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0)]
    assert gs.in_shape == ((1,), (1, 2))
    with pytest.raises(TypeError, match="mixes frameworks"):
        gradient_sampling(lambda u, v: u, (a, jnp.ones(1)))
    with pytest.raises(ValueError, match="empty tuple"):
        gradient_sampling(torch.abs, ())


# ------------------------------------------------------------------ the PL oracle itself


from _pl_programs import Layer, PLProgram, RELU_STYLES  # noqa: E402


@settings(max_examples=25, deadline=None, derandomize=True)
@given(pl_cases(max_in=3, max_depth=3, max_width=4, max_out=3, relu_styles=RELU_STYLES), st.integers(0, 2**31 - 1))
def test_pl_oracle_jacobians_match_central_differences_and_renders_match(case, seed):
    prog, x = case
    rng = np.random.default_rng(seed)
    X = x + rng.uniform(-1, 1, size=(5, x.size))  # generic points: no kink active with probability 1
    J, generic = prog.jacobians_np(X)
    assert generic.all()
    h = 1e-6
    for p, Jp in zip(X, J):
        fd = np.stack([(prog(p + h * e) - prog(p - h * e)) / (2 * h) for e in np.eye(x.size)], axis=1)
        np.testing.assert_allclose(Jp, fd, atol=1e-6)
    np.testing.assert_array_equal(prog.render_torch()(torch.tensor(x)).numpy(), prog(x))
    with jax.enable_x64(True):
        np.testing.assert_array_equal(np.asarray(prog.render_jax()(jnp.asarray(x))), prog(x))


def test_pl_oracle_known_b_subdifferentials():
    eye = np.eye(2)
    abs_sum = PLProgram(layers=(Layer(eye, np.zeros(2), "abs"), Layer(np.ones((1, 2)), np.zeros(1), "id")), n_in=2)
    B = sampled_b_subdifferential(abs_sum, np.zeros(2))
    assert _as_set(B.elements) == sorted(tuple(map(float, p)) for p in itertools.product((-1, 1), (-1, 1)))
    pair_max = PLProgram(layers=(Layer(eye, np.zeros(2), "max"), Layer(np.ones((1, 1)), np.zeros(1), "id")), n_in=2)
    assert _as_set(sampled_b_subdifferential(pair_max, np.array([0.5, 0.5])).elements) == [(0.0, 1.0), (1.0, 0.0)]
    # relu(x) - relu(-x) = x: one element although two kinks are active
    mirror = PLProgram(layers=(Layer(np.array([[1.0], [-1.0]]), np.zeros(2), "relu"),
                               Layer(np.array([[1.0, -1.0]]), np.zeros(1), "id")), n_in=1)
    assert mirror.n_active_kinks(np.zeros(1)) == 2
    assert _as_set(sampled_b_subdifferential(mirror, np.zeros(1)).elements) == [(1.0,)]
    # min(relu(x), relu(-x)) is identically 0: one element, 0
    flat = PLProgram(layers=(Layer(np.array([[1.0], [-1.0]]), np.zeros(2), "relu"),
                             Layer(eye, np.zeros(2), "min"), Layer(np.ones((1, 1)), np.zeros(1), "id")), n_in=1)
    assert _as_set(sampled_b_subdifferential(flat, np.zeros(1)).elements) == [(0.0,)]
