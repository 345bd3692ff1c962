"""Fixed-point and root solvers (torch): closed-form solutions, per-sample stopping,
relative stopping, failure policies and bad input."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from nonsmooth.implicit import ConvergenceError, ConvergenceWarning, fixed_point, root  # noqa: E402

METHODS = ["picard", "anderson", "broyden"]


def _contraction(n, norm, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    return A * (norm / np.linalg.norm(A, 2))


@pytest.mark.parametrize("method", METHODS)
def test_linear_fixed_point_matches_numpy_solve(method):
    A = _contraction(6, 0.8, 0)
    c = np.random.default_rng(1).normal(size=(5, 6))
    At, ct = torch.tensor(A), torch.tensor(c)
    z, info = fixed_point(lambda z: z @ At.T + ct, torch.zeros(5, 6, dtype=torch.float64), method=method,
                          tol=1e-12, max_iter=500)
    expected = np.linalg.solve(np.eye(6) - A, c.T).T  # independent: dense LAPACK solve
    assert info.all_converged
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert np.all(info.residual <= 1e-12)
    assert info.history.shape[1] == 5


@settings(max_examples=25, deadline=None)
@given(a=st.lists(st.floats(-0.9, 0.9), min_size=1, max_size=6), b=st.floats(-50, 50),
       method=st.sampled_from(METHODS))
def test_scalar_affine_maps_closed_form(a, b, method):
    a_t = torch.tensor(a, dtype=torch.float64)[:, None]
    z, info = fixed_point(lambda z: a_t * z + b, torch.zeros(len(a), 1, dtype=torch.float64), method=method,
                          tol=1e-11, atol=1e-300, max_iter=2000)
    expected = b / (1 - np.array(a))
    assert info.all_converged
    np.testing.assert_allclose(z.numpy()[:, 0], expected, rtol=1e-8, atol=1e-9)


def test_each_sample_stops_on_its_own_residual():
    a = torch.tensor([[0.1], [0.99]], dtype=torch.float64)
    z, info = fixed_point(lambda z: a * z + 1.0, torch.zeros(2, 1, dtype=torch.float64), method="picard",
                          tol=1e-8, max_iter=5000)
    assert info.all_converged
    # Picard error contracts by |a| per step: ~8 steps for 0.1, ~1800 for 0.99
    assert info.steps[0] <= 12 < 1000 < info.steps[1]
    # the easy sample was frozen at its converged value, not iterated further
    np.testing.assert_allclose(z[0, 0].item(), 1 / 0.9, rtol=1e-7)
    np.testing.assert_allclose(z[1, 0].item(), 100.0, rtol=1e-6)


def test_relative_stop_is_scale_invariant_and_absolute_is_not():
    A = torch.tensor(_contraction(4, 0.7, 3))
    c = torch.tensor(np.random.default_rng(4).normal(size=(3, 4)))
    steps = {}
    for scale in (1.0, 1e6):
        for stop in ("rel", "abs"):
            z, info = fixed_point(lambda z: z @ A.T + scale * c, torch.zeros(3, 4, dtype=torch.float64),
                                  method="picard", tol=1e-6, stop=stop, max_iter=2000)
            assert info.all_converged
            steps[scale, stop] = info.steps.tolist()
            res = torch.linalg.vector_norm(z @ A.T + scale * c - z, dim=1)
            if stop == "rel":
                # the returned z is one step past the checked iterate, so its residual is smaller still
                assert bool((res <= 1e-6 * torch.linalg.vector_norm(z, dim=1)).all())
    assert steps[1.0, "rel"] == steps[1e6, "rel"]
    assert max(steps[1e6, "abs"]) > max(steps[1.0, "abs"]) + 10


def test_anderson_beats_picard_on_slow_linear_map():
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    A = torch.tensor(Q @ np.diag(np.linspace(0.0, 0.98, 12)) @ Q.T)  # spectral radius 0.98: Picard ~900 steps
    c = torch.ones(2, 12, dtype=torch.float64)
    _, pic = fixed_point(lambda z: z @ A.T + c, torch.zeros(2, 12, dtype=torch.float64), method="picard",
                         tol=1e-8, max_iter=3000)
    _, anda = fixed_point(lambda z: z @ A.T + c, torch.zeros(2, 12, dtype=torch.float64), method="anderson",
                          m=10, tol=1e-8, max_iter=3000)
    assert anda.all_converged and pic.all_converged
    assert anda.max_steps < pic.max_steps / 3


@pytest.mark.parametrize("method", METHODS)
def test_root_linear_closed_form(method):
    M = np.eye(5) + 0.3 * np.random.default_rng(6).normal(size=(5, 5)) / np.sqrt(5)
    b = np.random.default_rng(7).normal(size=(2, 5))
    Mt, bt = torch.tensor(M), torch.tensor(b)
    z, info = root(lambda z: z @ Mt.T - bt, torch.zeros(2, 5, dtype=torch.float64), method=method, tol=1e-12,
                   max_iter=500)
    assert info.all_converged
    np.testing.assert_allclose(z.numpy(), np.linalg.solve(M, b.T).T, rtol=1e-9, atol=1e-10)


def test_divergent_map_raises_floating_point_error_naming_the_step():
    with pytest.raises(FloatingPointError, match="NaN/inf at iteration"):
        fixed_point(lambda z: 3.0 * z + 1.0, torch.ones(2, 1, dtype=torch.float64), method="picard",
                    max_iter=100000)


def test_failure_policies():
    def f(z):
        return 0.999 * z + 1.0

    z0 = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="did not converge"):
        fixed_point(f, z0, method="picard", max_iter=5, on_failure="raise")
    with pytest.warns(ConvergenceWarning, match="Not converged"):
        fixed_point(f, z0, method="picard", max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = fixed_point(f, z0, method="picard", max_iter=5, on_failure="ignore")
    assert not info.converged.any() and info.best_returned.all()
    assert info.steps.tolist() == [5, 5]
    # the best iterate is returned: the residual history is decreasing, so it is the last image f(z_4)
    expected = sum(0.999 ** j for j in range(5))
    np.testing.assert_allclose(z.numpy()[:, 0], expected, rtol=1e-12)


def test_oscillating_map_returns_best_iterate_and_says_so():
    # f(z) = -z + 1 has fixed point 1/2 but Picard from 0 oscillates 0, 1, 0, 1...
    z, info = fixed_point(lambda z: 1.0 - z, torch.zeros(1, 1, dtype=torch.float64), method="picard", max_iter=6,
                          on_failure="ignore")
    assert not info.all_converged
    assert "smallest residual" in info.explain()
    # Anderson solves it exactly (affine map: one secant step)
    z, info = fixed_point(lambda z: 1.0 - z, torch.zeros(1, 1, dtype=torch.float64), method="anderson")
    assert info.all_converged and abs(z.item() - 0.5) < 1e-7  # Tikhonov term lam=1e-8


def test_zero_solution_with_relative_stop_is_explained():
    with pytest.warns(ConvergenceWarning, match="near zero"):
        fixed_point(lambda z: 0.5 * z, torch.ones(1, 1, dtype=torch.float64), method="picard", max_iter=60)
    z, info = fixed_point(lambda z: 0.5 * z, torch.ones(1, 1, dtype=torch.float64), method="picard", max_iter=60,
                          atol=1e-12)
    assert info.all_converged and abs(z.item()) < 1e-12


def test_multiple_fixed_points_depend_on_the_start():
    # z = z^2 has fixed points 0 and 1 (1 is repelling for Picard, so Anderson finds it from nearby)
    f = lambda z: z * z  # noqa: E731
    z_a, info_a = fixed_point(f, torch.tensor([[0.3]], dtype=torch.float64), method="picard", tol=1e-10,
                              atol=1e-200, max_iter=200)
    z_b, info_b = fixed_point(f, torch.tensor([[1.05]], dtype=torch.float64), method="anderson", tol=1e-10)
    assert info_a.all_converged and info_b.all_converged
    assert abs(z_a.item()) < 1e-10 and abs(z_b.item() - 1.0) < 1e-9


def test_non_contiguous_and_float32_inputs():
    A = torch.tensor(_contraction(4, 0.5, 8))
    base = torch.randn(4, 3, dtype=torch.float64)
    c = base.T  # non-contiguous (3, 4)
    assert not c.is_contiguous()
    z, info = fixed_point(lambda z: z @ A.T + c, torch.zeros(3, 4, dtype=torch.float64).T.contiguous().T,
                          tol=1e-12)
    z2, _ = fixed_point(lambda z: z @ A.T + c.contiguous(), torch.zeros(3, 4, dtype=torch.float64), tol=1e-12)
    torch.testing.assert_close(z, z2)
    z32, info32 = fixed_point(lambda z: z @ A.T.float() + c.float(), torch.zeros(3, 4), tol=1e-5)
    assert z32.dtype == torch.float32 and info32.all_converged
    torch.testing.assert_close(z32.double(), z2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="newton"), ValueError, "method must be one of"),
    (dict(tol=-1.0), ValueError, "tol must be"),
    (dict(tol=float("nan")), ValueError, "tol must be"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(m=0), ValueError, "m must be"),
    (dict(stop="relative"), ValueError, "stop must be"),
    (dict(on_failure="shout"), ValueError, "on_failure"),
    (dict(beta=0.0), ValueError, "beta"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fixed_point(lambda z: z, torch.zeros(2, 2), **kwargs)


def test_bad_states_and_maps():
    with pytest.raises(ValueError, match="NaN/inf"):
        fixed_point(lambda z: z, torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="floating dtype"):
        fixed_point(lambda z: z, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        fixed_point(lambda z: z, torch.zeros(0, 3))
    with pytest.raises(TypeError, match="torch.Tensor or a jax.Array"):
        fixed_point(lambda z: z, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="must return the shape"):
        fixed_point(lambda z: z[:, :1], torch.zeros(2, 2))
    with pytest.raises(TypeError, match="must be callable"):
        fixed_point(3, torch.zeros(2, 2))
