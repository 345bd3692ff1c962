"""Assertion helpers: closed forms, exact reproducers that re-fail when run, dtype
tolerances, kink detection checked against exact PL-program kink arguments."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from nonsmooth.testing import (
    DEFAULT_TOLERANCES,
    add_sink,
    assert_ad_is_clarke,
    assert_matches_fd_off_kinks,
    assert_no_bifurcation,
    pl_programs_and_points,
)
from nonsmooth.testing import _examples as ex

torch = pytest.importorskip("torch")


class _TripleGrad(torch.autograd.Function):
    """x**2 with a wrong backward (3g instead of 2xg): a bug the FD check must catch."""

    @staticmethod
    def forward(ctx, x):
        return x ** 2

    @staticmethod
    def backward(ctx, g):
        return 3 * g


def wrong_square_grad(x):
    return _TripleGrad.apply(x).sum()


def test_fd_matches_closed_form_and_skips_the_kink():
    x = torch.tensor([0.0, 2.0, -1.5], dtype=torch.float64)
    r = assert_matches_fd_off_kinks(ex.abs_sum, x)
    assert r.checked == (1, 2) and list(r.skipped) == [0]
    assert "kink" in r.skipped[0]
    # d/dx sum|x| = sign(x) off the kink: independent closed form.
    assert np.allclose(np.array(r.fd_jacobian)[0, 1:], [1.0, -1.0], atol=1e-8)
    assert r.passed and r.max_abs_error < 1e-8


def test_fd_smooth_function_every_coordinate_checked():
    x = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    r = assert_matches_fd_off_kinks(ex.smooth_quadratic, x)
    assert r.checked == (0, 1, 2) and not r.skipped
    want = x.numpy() + np.cos(x.numpy())
    assert np.allclose(np.array(r.ad_jacobian)[0], want, rtol=1e-12)


def test_fd_catches_a_wrong_backward_with_an_exact_reproducer():
    x = torch.tensor([0.1, 0.7], dtype=torch.float32)  # 0.1 is not exact in binary: hex keeps it
    with pytest.raises(AssertionError) as info:
        assert_matches_fd_off_kinks(wrong_square_grad, x)
    msg = str(info.value)
    assert "AD 3.0" in msg
    assert float(x[0]).hex() in msg and "dtype=torch.float32" in msg
    code = msg[msg.index("# --- nonsmooth reproducer"):]
    # The reproducer is runnable as printed and fails the same way on the same bits.
    with pytest.raises(AssertionError, match="AD 3.0"):
        exec(code, {})


def test_fd_jax_and_tuple_inputs():
    jnp = pytest.importorskip("jax.numpy")
    r = assert_matches_fd_off_kinks(ex.max_pair, jnp.asarray([1.0, 3.0]))
    assert r.framework == "jax" and r.checked == (0, 1)
    assert np.allclose(np.array(r.ad_jacobian), [[0.0, 1.0]])

    def bilinear(a, b):
        return (a * b).sum()

    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, -1.0], dtype=torch.float64)
    r = assert_matches_fd_off_kinks(bilinear, (a, b))
    assert np.allclose(np.array(r.ad_jacobian)[0], [3.0, -1.0, 1.0, 2.0])


def test_tolerances_are_keyed_by_dtype():
    x16 = torch.tensor([0.3, 1.1], dtype=torch.float16)
    r = assert_matches_fd_off_kinks(ex.smooth_quadratic, x16)
    assert (r.rtol, r.atol) == DEFAULT_TOLERANCES["float16"]
    assert r.max_abs_error > DEFAULT_TOLERANCES["float64"][1]  # float16 AD is visibly rounded
    with pytest.raises(AssertionError, match="rtol 1e-06"):
        assert_matches_fd_off_kinks(ex.smooth_quadratic, x16, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: torch.tensor([0.0, float("nan")]), ValueError, "nan"),
    (lambda: torch.tensor([1, 2]), TypeError, "int64"),
    (lambda: np.array([1.0]), TypeError, "torch.from_numpy"),
    (lambda: torch.zeros(0), ValueError, "empty"),
])
def test_bad_inputs_are_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        assert_matches_fd_off_kinks(ex.abs_sum, bad())


def test_bad_options_are_named():
    x = torch.tensor([1.0])
    with pytest.raises(ValueError, match="rtol must be"):
        assert_matches_fd_off_kinks(ex.abs_sum, x, rtol=-1.0)
    with pytest.raises(ValueError, match="step must be"):
        assert_matches_fd_off_kinks(ex.abs_sum, x, step=2.0)


def _axis_kinks(program, x):
    """Oracle: coordinates i along which some kink argument that is 0 at x changes."""
    base = program.kink_arguments(x)
    hits = set()
    for i in range(len(x)):
        xp = x.astype(np.float64).copy()
        xp[i] += 1e-3
        for a0, a1 in zip(base, program.kink_arguments(xp)):
            if np.any((a0 == 0) & (a1 != 0)):
                hits.add(i)
    return hits


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(pl_programs_and_points(3, on_kink=0.7))
def test_fd_skips_only_coordinates_that_cross_an_active_kink(px):
    program, x = px
    f = program.to_torch()
    xt = torch.tensor(x, dtype=torch.float64)
    try:
        r = assert_matches_fd_off_kinks(lambda v: f(v), xt)
    except AssertionError:
        # Only possible when AD itself is off at a kink (e.g. a spurious value).
        assert program.n_active_kinks(x) > 0
        return
    assert set(r.skipped) <= _axis_kinks(program, x)
    if program.n_active_kinks(x) == 0:
        assert r.checked == (0, 1, 2)


def test_records_reach_the_sinks():
    seen = []
    remove = add_sink(seen.append)
    try:
        assert_matches_fd_off_kinks(ex.abs_sum, torch.tensor([0.0, 1.0], dtype=torch.float64))
    finally:
        remove()
    (rec,) = seen
    assert rec["helper"] == "assert_matches_fd_off_kinks" and rec["passed"] is True
    assert rec["x_hex"] == [["0x0.0p+0", "0x1.0000000000000p+0"]] and rec["dtype"] == ["float64"]
    json.dumps(rec)


# ----------------------------------------------------------------------------- engine-backed
def _engine():
    # The engine ships with the package: a missing audit is a failure, not a skip.
    from nonsmooth.conservative import audit  # noqa: F401


def test_clarke_passes_for_abs_and_smooth_and_fails_for_the_spurious_classic():
    _engine()
    a = assert_ad_is_clarke(ex.abs_sum, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert a.verdict.name == "CLARKE"
    assert assert_ad_is_clarke(ex.smooth_quadratic, torch.tensor([0.2, 0.4])).verdict.name == "SMOOTH"
    with pytest.raises(AssertionError) as info:
        assert_ad_is_clarke(ex.relu_difference, torch.tensor([0.0], dtype=torch.float64))
    msg = str(info.value)
    assert "SPURIOUS" in msg and "Clarke" in msg
    assert "from nonsmooth.testing._examples import relu_difference" in msg
    code = msg[msg.index("# --- nonsmooth reproducer"):]
    with pytest.raises(AssertionError, match="SPURIOUS"):
        exec(code, {})


def test_no_bifurcation_fails_at_a_relu_kink_and_passes_off_it():
    _engine()
    with pytest.raises(AssertionError, match="bifurcates") as info:
        assert_no_bifurcation(ex.abs_sum, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert "0x0.0p+0" in str(info.value)
    a = assert_no_bifurcation(ex.abs_sum, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert a.bifurcation is False
