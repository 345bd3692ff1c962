"""Soundness families of issue 13, each against an oracle written separately from the engine.

* LD derivatives of piecewise-linear examples in the style of Khan & Barton (2013, 2015)
  against an exact lexicographic oracle: plain Python on ``fractions.Fraction`` evaluates the
  program at ``x + t m_1 + t^2 m_2 + ...`` (t tiny), where it sits on one affine piece, and
  reads that piece's Jacobian by exact differences; ``f'(x; M) = J M``.
* Jumps at the scale of a few float64 ulps of the values involved.
* Points at subnormal numbers and at -0.0 in both frameworks.
* 8 threads auditing at once give the serial results.
* The small contract items: Clarke set at a smooth point, sqrt of a sum of squares,
  detach, AD reported when undecided, bifurcation per primitive convention.
"""
from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from nonsmooth.conservative import Verdict, audit, clarke_jacobian, ld_jacobian  # noqa: E402


def _j64(v):
    with jax.enable_x64(True):
        return jnp.asarray(np.asarray(v, dtype=np.float64))


# --------------------------------------------------------------------------- Khan & Barton style LD

def _pmax(a, b):
    return a if a >= b else b


def _pmin(a, b):
    return a if a <= b else b


# each example: (python function on a list of Fractions/floats, torch spelling, jax spelling, n)
EXAMPLES = {
    "max(min(x1, -x2), x2 - x1)": (
        lambda x: [_pmax(_pmin(x[0], -x[1]), x[1] - x[0])],
        lambda x: torch.maximum(torch.minimum(x[0], -x[1]), x[1] - x[0]).reshape(1),
        lambda x: jnp.maximum(jnp.minimum(x[0], -x[1]), x[1] - x[0]).reshape(1), 2),
    "|x1 - x2| - |x1|": (
        lambda x: [abs(x[0] - x[1]) - abs(x[0])],
        lambda x: (torch.abs(x[0] - x[1]) - torch.abs(x[0])).reshape(1),
        lambda x: (jnp.abs(x[0] - x[1]) - jnp.abs(x[0])).reshape(1), 2),
    "min(|x1|, x2) and max(x1, |x2|)": (
        lambda x: [_pmin(abs(x[0]), x[1]), _pmax(x[0], abs(x[1]))],
        lambda x: torch.stack([torch.minimum(torch.abs(x[0]), x[1]), torch.maximum(x[0], torch.abs(x[1]))]),
        lambda x: jnp.stack([jnp.minimum(jnp.abs(x[0]), x[1]), jnp.maximum(x[0], jnp.abs(x[1]))]), 2),
    "relu(x1 + x2 - relu(x1 - x3)) - relu(x3)": (
        lambda x: [_pmax(x[0] + x[1] - _pmax(x[0] - x[2], 0), 0) - _pmax(x[2], 0)],
        lambda x: (torch.relu(x[0] + x[1] - torch.relu(x[0] - x[2])) - torch.relu(x[2])).reshape(1),
        lambda x: (jax.nn.relu(x[0] + x[1] - jax.nn.relu(x[0] - x[2])) - jax.nn.relu(x[2])).reshape(1), 3),
    "max of three affine maps minus their median": (
        lambda x: [_pmax(_pmax(x[0], x[1]), x[2]) - sorted([x[0], x[1], x[2]])[1]],
        lambda x: (x.max() - x.sort().values[1]).reshape(1),
        lambda x: (jnp.max(x) - jnp.sort(x)[1]).reshape(1), 3),
}


def lexicographic_oracle(fpy, x, M):
    """f'(x; M) for a piecewise-linear f and nonsingular M, exactly: the Jacobian J of the
    piece containing x + sum t^j m_j (open for nonsingular M), times M."""
    n, k = M.shape
    t = Fraction(1, 10**6)
    base = [Fraction(float(v)) for v in x]
    for j in range(k):
        for i in range(n):
            base[i] += t ** (j + 1) * Fraction(float(M[i, j]))
    s = t ** (k + 2)
    f0 = fpy(base)
    J = np.zeros((len(f0), n))
    for i in range(n):
        p = list(base)
        p[i] += s
        fi = fpy(p)
        for o in range(len(f0)):
            J[o, i] = float((fi[o] - f0[o]) / s)
    return J @ M


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ld_derivatives_match_the_exact_lexicographic_oracle(name, framework):
    fpy, ft, fj, n = EXAMPLES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    x = np.zeros(n)
    f = ft if framework == "torch" else fj
    xs = torch.zeros(n, dtype=torch.float64) if framework == "torch" else _j64(x)
    Ms = [np.eye(n), -np.eye(n), np.eye(n)[::-1]] + [rng.integers(-3, 4, size=(n, n)).astype(float) for _ in range(6)]
    for M in Ms:
        if abs(np.linalg.det(M)) < 0.5:  # the oracle reads one piece's Jacobian: M must be nonsingular
            continue
        want = lexicographic_oracle(fpy, x, M)
        got = ld_jacobian(f, xs, M, raw=True)
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=f"{name} {framework} M={M.tolist()}")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_b_subdifferential_elements_are_pieces_of_the_oracle(name):
    """Every element the engine reports is the Jacobian of a piece: along some direction d
    the oracle's directional derivative f'(x; d) equals V d."""
    fpy, ft, _, n = EXAMPLES[name]
    C = clarke_jacobian(ft, torch.zeros(n, dtype=torch.float64))
    ds = np.random.default_rng(0).standard_normal((400, n))
    directional = [lexicographic_oracle(fpy, np.zeros(n), d[:, None]).ravel() for d in ds]
    for V in C.vertices:
        assert any(np.allclose(V @ d, fd, atol=1e-9) for d, fd in zip(ds, directional)), (name, V)


# --------------------------------------------------------------------------- ulp-scale jumps


@pytest.mark.parametrize("jump", [1e-6, 1e-8, 1e-9])
def test_a_jump_far_above_the_float_spacing_is_not_continuous(jump):
    """Floats near 1e4 are 1.8e-12 apart: a jump of 1e-9 is 500 spacings."""
    f = lambda v: torch.where(v > 0, v + (1e4 + jump), v + 1e4)  # noqa: E731
    a = audit(f, torch.zeros(1, dtype=torch.float64))
    assert a.verdict is Verdict.NOT_LIPSCHITZ, a.explain()


def test_a_jump_far_above_the_float_spacing_in_jax():
    f = lambda v: jnp.where(v > 0, v + (1e4 + 1e-6), v + 1e4)  # noqa: E731
    assert audit(f, _j64([0.0])).verdict is Verdict.NOT_LIPSCHITZ


def test_branches_equal_up_to_rounding_stay_continuous():
    """3x and 0.3 + 3(x - 0.1) agree at x = 0.1 up to one ulp: continuous within rounding."""
    f = lambda v: torch.where(v > 0.1, 3 * v, 0.3 + 3 * (v - 0.1))  # noqa: E731
    a = audit(f, torch.tensor([0.1], dtype=torch.float64))
    assert a.verdict in (Verdict.CLARKE, Verdict.SMOOTH), a.explain()


def test_a_jump_of_a_few_ulps_is_not_called_continuous_with_certainty():
    """A jump comparable to the rounding budget is never certified CLARKE-exact as continuous
    beyond what rounding allows: the engine either says NOT_LIPSCHITZ or UNDECIDED, or CLARKE
    (continuous within rounding) -- but never a certified SPURIOUS."""
    big = 1e4
    f = lambda v: torch.where(v > 0, v + (big + 2 * np.spacing(big)), v + big)  # noqa: E731
    a = audit(f, torch.zeros(1, dtype=torch.float64))
    assert a.verdict is not Verdict.SPURIOUS


# --------------------------------------------------------------------------- subnormals and -0.0


@pytest.mark.parametrize("fn", [lambda v: jnp.maximum(v, 0.0), jax.nn.relu, lambda v: jnp.abs(v)])
def test_jax_subnormal_points_are_kinks_as_xla_sees_them(fn):
    """XLA reads -5e-324 as 0: the engine must treat it as the kink (AD did)."""
    x = _j64([-5e-324])
    a = audit(fn, x)
    assert a.verdict in (Verdict.CLARKE,), a.explain()
    ld = ld_jacobian(fn, x)
    assert ld.ravel()[0] in (0.0, 1.0, -1.0) and ld.ravel()[0] != 0.5


def test_torch_subnormal_points_are_not_kinks():
    """torch does not flush subnormals by default: -5e-324 < 0 and relu is flat there."""
    x = torch.tensor([-5e-324], dtype=torch.float64)
    a = audit(torch.relu, x)
    assert a.verdict is Verdict.SMOOTH and a.engine_jacobian.ravel()[0] == 0.0


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_negative_zero_is_the_kink(framework):
    if framework == "torch":
        f, x = (lambda v: torch.relu(v) - torch.relu(-v)), torch.tensor([-0.0], dtype=torch.float64)
    else:
        f, x = (lambda v: jax.nn.relu(v) - jax.nn.relu(-v)), _j64([-0.0])
    a = audit(f, x)
    assert a.verdict is Verdict.SPURIOUS and a.exact
    assert a.b_subdifferential.reshape(-1).tolist() == [1.0]


def test_float32_rounding_onto_a_kink_counts():
    """float32(0.1) - 0.1 is 0 in float32 (AD saw the kink) and 1.5e-9 in float64."""
    x = torch.tensor([0.1], dtype=torch.float32)
    a = audit(lambda v: torch.relu(v - 0.1), x)
    assert a.verdict is Verdict.CLARKE, a.explain()


# --------------------------------------------------------------------------- threads


def test_eight_threads_give_the_serial_results():
    progs = [
        (lambda v: torch.relu(v) - torch.relu(-v), torch.zeros(2, dtype=torch.float64)),
        (lambda v: torch.abs(v).sum().reshape(1), torch.zeros(3, dtype=torch.float64)),
        (lambda v: torch.clamp(v[1] - v[0] ** 2, min=0) - torch.relu(v[1] - 2 * v[0] ** 2),
         torch.zeros(2, dtype=torch.float64)),
        (lambda v: torch.tanh(v), torch.ones(2, dtype=torch.float64)),
    ]
    serial = [(audit(f, x).verdict, audit(f, x).exact) for f, x in progs]
    results, errors = {}, []

    def work(i):
        try:
            f, x = progs[i % len(progs)]
            a = audit(f, x)
            results[i] = (a.verdict, a.exact)
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[i] == serial[i % len(progs)] for i in range(16))


# --------------------------------------------------------------------------- contract items


def test_clarke_set_at_a_differentiable_point_is_the_gradient():
    C = clarke_jacobian(lambda v: (v ** 2).sum().reshape(1), torch.ones(2, dtype=torch.float64))
    assert C.exact and C.vertices.tolist() == [[[2.0, 2.0]]]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_sqrt_of_a_sum_of_squares_is_read_as_a_norm(framework):
    if framework == "torch":
        f, x = (lambda v: torch.sqrt(v[0] ** 2 + v[1] * v[1])), torch.zeros(2, dtype=torch.float64)
    else:
        f, x = (lambda v: jnp.sqrt(v[0] ** 2 + v[1] * v[1])), _j64([0.0, 0.0])
    J = ld_jacobian(f, x)
    assert np.all(np.isfinite(J)) and abs(np.linalg.norm(J) - 1.0) < 1e-12


def test_ld_refuses_where_it_does_not_exist():
    with pytest.raises(ValueError, match="does not exist"):
        ld_jacobian(lambda v: torch.sqrt(v[0] ** 2 + v[1]), torch.zeros(2, dtype=torch.float64))


def test_detach_that_changes_the_derivative_is_undecided_with_ad_reported():
    a = audit(lambda v: (v * v.detach()).sum().reshape(1), torch.ones(2, dtype=torch.float64))
    assert a.verdict is Verdict.UNDECIDED and "detach" in a.reason
    assert a.ad_jacobian is not None and a.ad_jacobian.tolist() == [[1.0, 1.0]]


def test_softmax_max_shift_through_stop_gradient_is_fine():
    a = audit(jax.nn.softmax, _j64([1.0, 1.0, 0.0]))
    assert a.verdict is Verdict.SMOOTH


def test_undecided_audits_report_what_ad_returned():
    a = audit(lambda v: torch.relu(v[1] - v[0] ** 4) - torch.relu(v[1] - 2 * v[0] ** 4),
              torch.zeros(2, dtype=torch.float64))
    assert a.ad_jacobian is not None and a.ad_jacobian.shape == (1, 2)


def test_bifurcation_means_one_convention_per_primitive():
    """relu(x) + relu(-x): with relu'(0) = s everywhere AD returns s - s = 0 for every s, so no
    framework setting changes it; independent per-kink choices still differ (s1 - s2)."""
    a = audit(lambda v: torch.relu(v) + torch.relu(-v), torch.zeros(1, dtype=torch.float64))
    assert not a.bifurcation
    assert len(a.selection_jacobians) > 1
    b = audit(lambda v: torch.relu(torch.relu(v)) - torch.relu(v), torch.zeros(1, dtype=torch.float64))
    assert b.bifurcation  # s^2 - s: equal at s = 0 and 1, not at s = 1/2
