"""The strategies really produce kinks, ties, exact zeros and adversarial floats.

Fractions are measured over many draws and compared with thresholds; exactness is
checked against Python ``fractions`` (exact rational arithmetic), torch and jax.
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import InvalidArgument

from nonsmooth.testing import (
    PLProgram,
    adversarial_arrays,
    adversarial_floats,
    kink_points,
    pl_programs,
    pl_programs_and_points,
    tied_arrays,
    zero_preactivations,
)


def collect(strategy, n=150):
    seen = []

    @settings(max_examples=n, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        seen.append(value)

    run()
    assert len(seen) >= n // 2, f"only {len(seen)} examples drawn"
    return seen


def ulps_between(a, b, dtype):
    """Number of representable dtype values strictly stepping from a to b."""
    a, b = dtype.type(a), dtype.type(b)
    n = 0
    step = np.inf if b > a else -np.inf
    while a != b and n < 1000:
        a = np.nextafter(a, dtype.type(step), dtype=dtype)
        n += 1
    return n


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_kink_points_hit_kinks_and_their_ulp_neighbours(dtype):
    dt = np.dtype(dtype)
    kinks = (0.0, 1.0, -0.5)
    draws = collect(kink_points(kinks=kinks, shape=(6,), dtype=dtype, max_ulps=3))
    entries = np.concatenate(draws)
    assert entries.dtype == dt
    on = np.isin(entries, kinks)
    assert all(np.isin(d, kinks).any() for d in draws)  # min_on_kink=1
    assert on.mean() >= 0.4, on.mean()
    near = []
    for v in entries[~on]:
        d = min(ulps_between(k, v, dt) for k in kinks)
        near.append(1 <= d <= 3)
    assert np.mean(near) * (~on).mean() >= 0.08, np.mean(near)
    # near-kink values really are a few ulps off, not merely "close".
    assert any(0 < abs(float(v)) < 1e-3 for v in entries[~on]) or dtype == "float16"


def test_kink_points_validation_quotes_bad_values():
    with pytest.raises(InvalidArgument, match="0.1"):
        kink_points(kinks=(0.1,), dtype="float32")  # not representable in float32
    with pytest.raises(InvalidArgument, match="'int32'"):
        kink_points(dtype="int32")
    with pytest.raises(InvalidArgument, match="-1"):
        kink_points(shape=(2, -1))
    with pytest.raises(InvalidArgument, match="nan"):
        kink_points(kinks=(float("nan"),))
    with pytest.raises(InvalidArgument, match="1.5"):
        kink_points(on_kink=1.5)
    with pytest.raises(InvalidArgument, match="min_on_kink=3"):
        kink_points(shape=(2,), min_on_kink=3)
    with pytest.raises(InvalidArgument, match="inf"):
        kink_points(min_value=float("-inf"))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_tied_arrays_have_ties_in_every_lane(dtype):
    draws = collect(tied_arrays(dtype, (3, 5), axis=1, min_ties=1), n=80)
    for x in draws:
        assert x.shape == (3, 5) and x.dtype == np.dtype(dtype)
        for row in x:
            assert len(np.unique(row)) < 5


def test_tied_arrays_near_ties_are_within_max_ulps():
    dt = np.dtype("float32")
    draws = collect(tied_arrays("float32", (6,), min_ties=2, max_ulps=2, near_tie=0.7), n=100)
    exact = near = 0
    for x in draws:
        vals = sorted(set(x.tolist()))
        exact += len(vals) < 6
        gaps = [ulps_between(a, b, dt) for a, b in zip(vals, vals[1:])]
        near += any(1 <= g <= 2 for g in gaps)
    assert near / len(draws) >= 0.4, near / len(draws)
    assert exact / len(draws) >= 0.1, exact / len(draws)


def test_tied_arrays_validation():
    with pytest.raises(InvalidArgument, match="axis=2"):
        tied_arrays("float64", (3, 4), axis=2)
    with pytest.raises(InvalidArgument, match=r"\(3, 1\)"):
        tied_arrays("float64", (3, 1))
    with pytest.raises(InvalidArgument, match="near_tie=0.5"):
        tied_arrays("float64", (4,), near_tie=0.5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_preactivations_any_order_are_exact_in_numpy_torch_and_jax(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    W = rng.normal(size=(7, 5)).astype(dtype)
    b = rng.normal(size=7).astype(dtype)
    draws = collect(zero_preactivations(W, b), n=60)
    hits = []
    for x, bb, units in draws:
        assert x.dtype == np.dtype(dtype) and bb.dtype == np.dtype(dtype)
        z_np = W @ x + bb
        z_t = torch.nn.functional.linear(torch.from_numpy(x)[None], torch.from_numpy(W),
                                         torch.from_numpy(bb))[0].numpy()
        # Exact rational evaluation: an oracle independent of any summation order.
        z_q = [sum(Fraction(float(W[i, j])) * Fraction(float(x[j])) for j in range(5))
               + Fraction(float(bb[i])) for i in units]
        hits.append(all(z_np[list(units)] == 0) and all(z_t[list(units)] == 0)
                    and all(q == 0 for q in z_q))
        # Units not chosen keep the given bias.
        others = [i for i in range(7) if i not in units]
        assert np.array_equal(bb[others], b[others])
    assert np.mean(hits) == 1.0


def test_zero_preactivations_any_order_exact_in_jax():
    jnp = pytest.importorskip("jax.numpy")
    W = np.random.default_rng(2).normal(size=(6, 4)).astype("float32")
    draws = collect(zero_preactivations(W, units=(0, 3, 5)), n=40)
    for x, b, units in draws:
        z = np.asarray(jnp.asarray(W) @ jnp.asarray(x) + jnp.asarray(b))
        assert units == (0, 3, 5)
        assert np.all(z[list(units)] == 0)


def test_zero_preactivations_numpy_mode_is_exact_for_numpy_and_generic_x():
    W = np.random.default_rng(3).normal(size=(5, 8))
    draws = collect(zero_preactivations(W, exact="numpy"), n=60)
    for x, b, units in draws:
        assert np.all((W @ x + b)[list(units)] == 0)
    assert np.mean([np.count_nonzero(x) > 1 for x, _, _ in draws]) > 0.5


def test_zero_preactivations_validation():
    with pytest.raises(InvalidArgument, match=r"\(3,\)"):
        zero_preactivations(np.ones(3))
    with pytest.raises(InvalidArgument, match=r"units=\(7,\)"):
        zero_preactivations(np.ones((3, 2)), units=(7,))
    with pytest.raises(InvalidArgument, match="nan"):
        zero_preactivations(np.array([[1.0, np.nan]]))
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(InvalidArgument, match="no column"):
        zero_preactivations(W, units=(0, 1))
    with pytest.raises(InvalidArgument, match="'fast'"):
        zero_preactivations(W, exact="fast")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_adversarial_floats_cover_subnormals_signed_zero_and_huge(dtype):
    fi = np.finfo(dtype)
    values = collect(adversarial_floats(dtype), n=300)
    v = np.array(values, dtype=dtype)
    assert np.all(np.isfinite(v))
    subnormal = (v != 0) & (np.abs(v) < fi.tiny)
    neg_zero = (v == 0) & np.signbit(v)
    huge = np.abs(v) >= fi.max / 4
    assert subnormal.mean() >= 0.05, subnormal.mean()
    assert neg_zero.any()
    assert huge.mean() >= 0.03, huge.mean()


def test_adversarial_floats_respect_switches():
    fi = np.finfo("float32")
    values = np.array(collect(adversarial_floats("float32", allow_subnormal=False,
                                                 allow_signed_zero=False, allow_huge=False), n=200))
    assert not np.any((values != 0) & (np.abs(values) < fi.tiny))
    assert not np.any((values == 0) & np.signbit(values))
    assert np.all(np.abs(values) < fi.max / 4)
    with pytest.raises(InvalidArgument, match="'yes'"):
        adversarial_floats("float32", allow_nan="yes")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adversarial_arrays_cancel_in_float_sums(dtype):
    draws = collect(adversarial_arrays(dtype, (6,)), n=120)
    lost = 0
    for x in draws:
        exact = sum(Fraction(float(v)) for v in x)
        naive = np.float64(0)
        acc = np.dtype(dtype).type(0)
        for v in x:
            acc = acc + v
        lost += Fraction(float(acc)) != exact
        assert np.all(np.isfinite(x))
    # Most arrays lose their small entries in a left-to-right float sum.
    assert lost / len(draws) >= 0.5, lost / len(draws)


def exact_eval(program, x):
    """Independent oracle: the program evaluated in exact rational arithmetic."""
    h = [Fraction(float(v)) for v in x]
    for layer in program.layers:
        kind = layer[0]
        if kind == "linear":
            h = [sum(Fraction(w) * v for w, v in zip(row, h)) + Fraction(bi)
                 for row, bi in zip(layer[1], layer[2])]
        elif kind == "relu":
            h = [max(v, 0) for v in h]
        elif kind == "abs":
            h = [abs(v) for v in h]
        else:
            f = max if kind == "max" else min
            out = [f(h[i], h[i + 1]) for i in range(0, len(h) - 1, 2)]
            h = out + (h[-1:] if len(h) % 2 else [])
    return h


def test_pl_programs_and_points_hit_kinks_and_evaluate_exactly():
    draws = collect(pl_programs_and_points(3, on_kink=0.8), n=120)
    hit = [p.n_active_kinks(x) > 0 for p, x in draws]
    assert np.mean(hit) >= 0.7, np.mean(hit)
    for p, x in draws:
        exact = exact_eval(p, x)
        for dtype in ("float32", "float64"):
            got = p.to_numpy()(x.astype(dtype))
            assert [Fraction(float(g)) for g in got] == exact


def test_pl_program_renders_agree_across_frameworks():
    torch = pytest.importorskip("torch")
    draws = collect(pl_programs_and_points(2), n=40)
    for p, x in draws:
        want = exact_eval(p, x)
        got_t = p.to_torch()(torch.from_numpy(x)).numpy()
        assert [Fraction(float(g)) for g in got_t] == want
        rebuilt = eval(p.source(), {"nonsmooth": __import__("nonsmooth")})
        assert rebuilt == p


def test_pl_program_render_jax():
    jnp = pytest.importorskip("jax.numpy")
    p = PLProgram(2, (("linear", ((1, -1), (1, 1)), (0, -1)), ("max",), ("linear", ((2,),), (1,))))
    x = np.array([1.5, 0.5], dtype="float32")
    assert float(p.to_jax()(jnp.asarray(x))[0]) == float(2 * max(1.0, 1.0) + 1)
    assert p.n_active_kinks(x) == 1


def test_pl_programs_validation():
    with pytest.raises(InvalidArgument, match="'tanh'"):
        pl_programs(2, ops=("relu", "tanh"))
    with pytest.raises(InvalidArgument, match=r"\(3, 1\)"):
        pl_programs(2, width=(3, 1))
    with pytest.raises(InvalidArgument, match="n_inputs=0"):
        pl_programs(0)
    with pytest.raises(ValueError, match="'mxnet'"):
        PLProgram(1, (("relu",),)).to("mxnet")
