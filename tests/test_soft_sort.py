"""soft_sort / soft_rank on NumPy arrays against independent oracles: the permutahedron
projection (exact for L2, certified for KL: ``_permutahedron_oracle``), closed-form limits,
float64 finite differences for every Jacobian, Hypothesis properties, and bad input."""
import itertools
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp
from scipy.stats import rankdata

from nonsmooth.solvers import soft_rank, soft_sort
from nonsmooth.solvers import _soft_sort_core as core
from test_soft_sort_oracles import fd_jacobian, soft_rank_oracle, soft_sort_oracle

REGS = ["l2", "kl"]
DIRS = ["ascending", "descending"]
OPS = {"sort": soft_sort, "rank": soft_rank}
CASES = list(itertools.product(OPS, REGS, DIRS))


def _seed(*parts) -> int:
    """A seed that is the same in every process (str hashes are randomized)."""
    return zlib.crc32(repr(parts).encode())


def _jac(x, op, reg, eps, direction):
    """The analytic Jacobian from the forward pass's perm/block (one row)."""
    x2 = np.ascontiguousarray(np.asarray(x, float)[None])
    desc = direction == "descending"
    _, perm, block = core.forward_rows(x2, op=op, regularization=reg, strength=eps,
                                       descending=desc)
    return core.jacobian_rows(x2, perm, block, op=op, regularization=reg, strength=eps,
                              descending=desc)[0], block[0]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("op,reg,direction", CASES)
@pytest.mark.parametrize("eps", [0.3, 1.0, 4.0])
def test_values_match_the_permutahedron_projection(op, reg, direction, eps):
    rng = np.random.default_rng(_seed(op, reg, direction, eps))
    oracle = soft_sort_oracle if op == "sort" else soft_rank_oracle
    for n in (1, 2, 3, 5):
        x = rng.normal(size=n) * 2
        got = OPS[op](x, regularization=reg, regularization_strength=eps, direction=direction)
        np.testing.assert_allclose(got, oracle(x, reg, eps, direction), atol=1e-12, rtol=0)


@pytest.mark.parametrize("reg", REGS)
def test_pooled_sort_blocks_recomputed_in_closed_form_match_the_projection(reg):
    # n / eps > 16 max|x| with a gap > 1 / eps: the pooled-block closed forms kick in.
    x = np.array([0.6, -0.6, 0.61, -0.61, 0.62, -0.62, 0.59, -0.59, 0.58, -0.58])
    _, _, block = core.forward_rows(x[None], op="sort", regularization=reg, strength=1.0,
                                    descending=True)
    assert len(set(block[0].tolist())) < len(x)
    for direction in DIRS:
        got = soft_sort(x, regularization=reg, direction=direction)
        np.testing.assert_allclose(got, soft_sort_oracle(x, reg, 1.0, direction), atol=1e-12)


def test_float32_sort_keeps_float32_accuracy_when_rho_over_eps_dwarfs_the_values():
    # rho / eps ~ 1e7 here; forming rho / eps - x in float32 would keep ~3 digits of x.
    x = (np.random.default_rng(12).normal(size=(2, 4000)) * 1e4).astype(np.float32)
    for reg in REGS:
        got = soft_sort(x, regularization=reg, regularization_strength=1e-3)
        want = soft_sort(x.astype(np.float64), regularization=reg,
                         regularization_strength=1e-3)
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=3e-7 * np.abs(want).max())
        _, _, block = core.forward_rows(x, op="sort", regularization=reg, strength=1e-3,
                                        descending=False)
        assert any(len(set(r)) < x.shape[1] for r in block.tolist())


def test_batches_are_independent_rows():
    x = np.random.default_rng(0).normal(size=(2, 3, 7))
    for op, reg, direction in CASES:
        f = OPS[op]
        got = f(x, regularization=reg, regularization_strength=0.5, direction=direction)
        assert got.shape == x.shape and got.dtype == x.dtype
        for i, j in np.ndindex(2, 3):
            want = f(x[i, j], regularization=reg, regularization_strength=0.5,
                     direction=direction)
            np.testing.assert_array_equal(got[i, j], want)


def test_non_contiguous_input_equals_its_copy():
    x = np.random.default_rng(1).normal(size=(9, 6))
    view = x.T[:, ::2]  # neither C- nor F-contiguous
    assert not view.flags.c_contiguous
    for f in OPS.values():
        np.testing.assert_array_equal(f(view), f(np.ascontiguousarray(view)))


def test_read_only_and_broadcast_inputs_are_left_untouched():
    x = np.random.default_rng(13).normal(size=(3, 50))
    frozen = x.copy()
    frozen.setflags(write=False)
    row = np.broadcast_to(x[0], (4, 50))  # read-only, zero stride on the batch axis
    for f in OPS.values():
        for reg in REGS:
            np.testing.assert_array_equal(f(frozen, regularization=reg),
                                          f(x, regularization=reg))
            np.testing.assert_array_equal(f(row, regularization=reg),
                                          np.broadcast_to(f(x[0], regularization=reg), (4, 50)))
    np.testing.assert_array_equal(frozen, x)


def test_zero_rows_give_an_empty_result():
    for f in OPS.values():
        out = f(np.empty((0, 4)))
        assert out.shape == (0, 4)


# --------------------------------------------------------------------------- limits


def _hard_rank_threshold(x, reg):
    """The largest strength with exactly hard ranks (closed form): adjacent sorted values
    at ranks k and k + 1 pool once gap / eps <= 1 (L2) or log((k + 1) / k) (KL)."""
    gaps = np.diff(np.sort(x))
    if reg == "l2":
        return gaps.min()
    k = np.arange(1, len(x))
    return np.min(gaps / np.log((k + 1) / k))


@pytest.mark.parametrize("reg", REGS)
def test_rank_is_hard_exactly_below_the_closed_form_threshold(reg):
    rng = np.random.default_rng(2)
    x = rng.permutation(np.arange(12.0)) * 0.25 + rng.normal(size=12) * 1e-3
    eps = _hard_rank_threshold(x, reg)
    assert eps >= np.min(np.diff(np.sort(x)))  # below the min gap is always hard
    for direction, want in (("ascending", rankdata(x)), ("descending", rankdata(-x))):
        thr = _hard_rank_threshold(x if direction == "ascending" else -x, reg)
        got = soft_rank(x, regularization=reg, regularization_strength=thr * (1 - 1e-9),
                        direction=direction)
        np.testing.assert_array_equal(got, want)
        # At the threshold exactly the closest pair sits on the pooling boundary.
        got = soft_rank(x, regularization=reg, regularization_strength=thr,
                        direction=direction)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        # Just above it the pair is pooled: no longer hard.
        got = soft_rank(x, regularization=reg, regularization_strength=thr * 1.01,
                        direction=direction)
        assert not np.array_equal(got, want)


@pytest.mark.parametrize("reg", REGS)
def test_sort_is_hard_exactly_once_strength_times_max_gap_is_below_one(reg):
    rng = np.random.default_rng(3)
    x = rng.normal(size=15) * 3
    eps = (1 - 1e-9) / np.max(np.diff(np.sort(x)))
    np.testing.assert_array_equal(
        soft_sort(x, regularization=reg, regularization_strength=eps), np.sort(x))
    np.testing.assert_array_equal(
        soft_sort(x, regularization=reg, regularization_strength=eps,
                  direction="descending"), np.sort(x)[::-1])
    gap = np.max(np.diff(np.sort(x)))
    got = soft_sort(x, regularization=reg, regularization_strength=1.02 / gap)
    assert not np.array_equal(got, np.sort(x))


def test_large_strength_gives_the_constant_means():
    x = np.random.default_rng(4).normal(size=(3, 6))
    n = x.shape[-1]
    for direction in DIRS:
        np.testing.assert_allclose(
            soft_rank(x, regularization_strength=1e8, direction=direction), (n + 1) / 2,
            atol=1e-6)
        np.testing.assert_allclose(
            soft_sort(x, regularization_strength=1e8, direction=direction),
            np.broadcast_to(x.mean(-1, keepdims=True), x.shape), atol=1e-6)
        # KL rank lives in P(rho) too: the same limit (n + 1) / 2.
        np.testing.assert_allclose(
            soft_rank(x, regularization="kl", regularization_strength=1e8,
                      direction=direction), (n + 1) / 2, atol=1e-6)
    np.testing.assert_allclose(
        soft_sort(x, regularization="kl", regularization_strength=1e8),
        np.broadcast_to(-(logsumexp(-x, -1, keepdims=True) - np.log(n)), x.shape),
        atol=1e-6)
    np.testing.assert_allclose(
        soft_sort(x, regularization="kl", regularization_strength=1e8,
                  direction="descending"),
        np.broadcast_to(logsumexp(x, -1, keepdims=True) - np.log(n), x.shape), atol=1e-6)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_extreme_strengths_stay_finite_and_tend_to_the_limits(op, reg, direction):
    x = np.random.default_rng(5).normal(size=(4, 50))
    f = OPS[op]
    for eps in (1e-12, 1e-300, 1e12, 1e300):
        out = f(x, regularization=reg, regularization_strength=eps, direction=direction)
        assert np.isfinite(out).all(), eps
    tiny = f(x, regularization=reg, regularization_strength=1e-12, direction=direction)
    hard = (np.sort(x, -1) if direction == "ascending" else -np.sort(-x, -1)) if op == "sort" \
        else np.apply_along_axis(rankdata, -1, x if direction == "ascending" else -x)
    np.testing.assert_array_equal(tiny, hard)


def test_values_closer_than_the_packed_sort_key_are_still_ordered():
    # float64 keys keep 64 - log2(n) bits; these values differ only below that, so the
    # packed sort gets them wrong and the verified fallback must repair every row.
    rng = np.random.default_rng(11)
    x = 1.0 + np.stack([rng.permutation(1000) for _ in range(8)]) * 2.0 ** -50
    packed = core._order_rows(x, descending=False)
    assert not np.all(np.diff(np.take_along_axis(x, packed, -1), axis=-1) >= 0)
    for direction in DIRS:
        want = np.sort(x, -1) if direction == "ascending" else np.sort(x, -1)[:, ::-1]
        np.testing.assert_array_equal(
            soft_sort(x, regularization_strength=1e-6, direction=direction), want)
    np.testing.assert_array_equal(soft_rank(x, regularization_strength=2.0 ** -51),
                                  np.apply_along_axis(rankdata, -1, x))
    np.testing.assert_array_equal(
        soft_rank(x, regularization_strength=2.0 ** -51, direction="descending"),
        np.apply_along_axis(rankdata, -1, -x))


def test_n_equal_one_and_all_equal_rows():
    x = np.array([[2.5], [-1.0]])
    for reg in REGS:
        np.testing.assert_array_equal(soft_rank(x, regularization=reg), np.ones((2, 1)))
        np.testing.assert_array_equal(soft_sort(x, regularization=reg), x)
        jac, _ = _jac(x[0], "sort", reg, 1.0, "ascending")
        np.testing.assert_array_equal(jac, [[1.0]])
        jac, _ = _jac(x[0], "rank", reg, 1.0, "ascending")
        np.testing.assert_array_equal(jac, [[0.0]])
    same = np.full((2, 5), 3.25)
    np.testing.assert_allclose(soft_rank(same), 3.0, rtol=0, atol=0)
    np.testing.assert_array_equal(soft_sort(same, regularization_strength=1e-9), same)
    np.testing.assert_array_equal(soft_sort(same, regularization_strength=1e9), same)


def test_ties_get_equal_ranks_and_the_average_rank_in_the_hard_limit():
    x = np.array([0.5, 2.0, 2.0, -1.0, 2.0, 7.0])
    for eps in (1e-6, 0.1, 1.0):
        r = soft_rank(x, regularization_strength=eps)
        assert r[1] == r[2] == r[4]
        assert r.sum() == pytest.approx(21.0, abs=1e-12)
        rk = soft_rank(x, regularization="kl", regularization_strength=eps)
        assert rk[1] == rk[2] == rk[4]
    np.testing.assert_allclose(soft_rank(x, regularization_strength=1e-6), rankdata(x),
                               atol=1e-12)
    # Sorting tied values is still the hard sort (any order of equal values is the same).
    np.testing.assert_array_equal(soft_sort(x, regularization_strength=1e-3), np.sort(x))


# --------------------------------------------------------------------------- Jacobians


@pytest.mark.parametrize("op,reg,direction", CASES)
@pytest.mark.parametrize("eps", [0.2, 1.0, 3.0])
def test_jacobian_matches_float64_finite_differences(op, reg, direction, eps):
    rng = np.random.default_rng(_seed(op, reg, direction, eps))
    f = OPS[op]
    for n in (1, 2, 4, 7):
        x = rng.normal(size=n) * 2
        jac, _ = _jac(x, op, reg, eps, direction)
        fd = fd_jacobian(lambda v: f(v, regularization=reg, regularization_strength=eps,
                                     direction=direction), x)
        np.testing.assert_allclose(jac, fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("direction", DIRS)
def test_kl_sort_jacobian_uses_softmax_of_the_sorted_values_over_multi_element_blocks(
        direction):
    # The trap: on a pooled block, d out / d (sorted values) is 1 softmax(w_B)^T, not
    # 1 softmax(s_B)^T as in the widely copied reference implementation.
    x = np.array([-3.1, 0.4, 2.9, 0.0, 5.2, -1.3])
    eps = 1.5
    jac, block = _jac(x, "sort", "kl", eps, direction)
    assert len(set(block.tolist())) < len(x), "want at least one multi-element block"
    f = lambda v: soft_sort(v, regularization="kl", regularization_strength=eps,
                            direction=direction)
    fd = fd_jacobian(f, x)
    np.testing.assert_allclose(jac, fd, atol=1e-7, rtol=1e-6)
    # The reference's rule (softmax over rho/eps within each block) is measurably off.
    sign = 1.0 if direction == "descending" else -1.0
    order = np.argsort(-sign * x)
    s = np.arange(len(x), 0, -1.0) / eps
    wrong = np.zeros((len(x), len(x)))
    for b in set(block.tolist()):
        members = np.flatnonzero(block == b)
        p = np.exp(s[members] - logsumexp(s[members]))
        wrong[np.ix_(members, order[members])] = p
    assert np.max(np.abs(wrong - fd)) > 1e-2


@pytest.mark.parametrize("op,reg", list(itertools.product(OPS, REGS)))
def test_jacobian_at_ties_for_rank_and_away_from_them_for_sort(op, reg):
    x = np.array([1.0, 2.0, 2.0, 0.5]) if op == "rank" else np.array([1.0, 2.0, 2.6, 0.5])
    jac, _ = _jac(x, op, reg, 0.7, "ascending")
    f = lambda v: OPS[op](v, regularization=reg, regularization_strength=0.7)
    np.testing.assert_allclose(jac, fd_jacobian(f, x), atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.8, 5.0])
def test_vjp_is_the_transpose_of_jvp(eps):
    # vjp_rows (segment reductions, singleton shortcut) and jvp_rows (bincount) are
    # written independently; <g, J t> = <J^T g, t> ties them together.
    rng = np.random.default_rng(6)
    x2 = rng.normal(size=(40, 9))
    t, g = rng.normal(size=(2, 40, 9))
    mixed = 0
    for op, reg, direction in CASES:
        kw = dict(op=op, regularization=reg, strength=eps, descending=direction == "descending")
        _, perm, block = core.forward_rows(x2, **kw)
        n_blocks = sum(len(set(b)) for b in block.tolist())
        mixed += x2.size < 2 * n_blocks < 2 * x2.size  # singletons dominate, some pooled
        jt = core.jvp_rows(x2, perm, block, t, **kw)
        vg = core.vjp_rows(x2, perm, block, g, **kw)
        assert np.sum(g * jt) == pytest.approx(np.sum(vg * t), rel=1e-12, abs=1e-12)
        # and row by row against the dense Jacobian
        jac = core.jacobian_rows(x2, perm, block, **kw)
        np.testing.assert_allclose(vg, np.einsum("ri,rij->rj", g, jac), atol=1e-12)
    if eps == 0.8:
        assert mixed > 0


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_float32_agrees_with_float64(op, reg, direction):
    x = np.random.default_rng(7).normal(size=(8, 40))
    f = OPS[op]
    kw = dict(regularization=reg, regularization_strength=0.3, direction=direction)
    got = f(x.astype(np.float32), **kw)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, f(x, **kw), rtol=2e-5, atol=2e-4)


def test_half_precision_is_computed_in_float32():
    x = np.random.default_rng(8).normal(size=(3, 10)).astype(np.float16)
    for f in OPS.values():
        got = f(x, regularization_strength=0.5)
        assert got.dtype == np.float16
        want = f(x.astype(np.float32), regularization_strength=0.5).astype(np.float16)
        np.testing.assert_array_equal(got, want)


def test_numpy_bfloat16_is_computed_in_float32():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(8).normal(size=(3, 10)).astype(ml_dtypes.bfloat16)
    for f in OPS.values():
        got = f(x, regularization="kl", regularization_strength=0.5)
        assert got.dtype == x.dtype
        want = f(x.astype(np.float32), regularization="kl", regularization_strength=0.5)
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


def test_kl_weights_stay_finite_at_small_strength_in_float32():
    x = np.random.default_rng(9).normal(size=(4, 30)).astype(np.float32)
    x[:, 1] = x[:, 0]  # a tie forces a pooled block at every strength
    for op in OPS:
        for eps in (1e-2, 1e-3, 1e-4):
            kw = dict(op=op, regularization="kl", strength=eps, descending=False)
            out, perm, block = core.forward_rows(x, **kw)
            assert np.isfinite(out).all()
            g = core.vjp_rows(x, perm, block, np.ones_like(x), **kw)
            assert np.isfinite(g).all(), (op, eps)


# --------------------------------------------------------------------------- properties

_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 12)),
                   elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False))
_eps = st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3])


@settings(max_examples=60, deadline=None)
@given(_rows, _eps, st.sampled_from(REGS), st.sampled_from(DIRS))
def test_soft_sort_output_is_sorted_in_the_requested_direction(x, eps, reg, direction):
    out = soft_sort(x, regularization=reg, regularization_strength=eps, direction=direction)
    step = np.diff(out, axis=-1)
    tol = 1e-9 * (1 + np.abs(out).max())
    assert np.all(step >= -tol) if direction == "ascending" else np.all(step <= tol)


@settings(max_examples=60, deadline=None)
@given(_rows, _eps, st.sampled_from(REGS), st.sampled_from(DIRS), st.randoms())
def test_soft_rank_is_permutation_equivariant(x, eps, reg, direction, rnd):
    perm = list(range(x.shape[-1]))
    rnd.shuffle(perm)
    kw = dict(regularization=reg, regularization_strength=eps, direction=direction)
    np.testing.assert_allclose(soft_rank(x[:, perm], **kw), soft_rank(x, **kw)[:, perm],
                               rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(_rows, _eps, st.sampled_from(DIRS))
def test_rank_sums_and_sort_sum(x, eps, direction):
    n = x.shape[-1]
    r = soft_rank(x, regularization_strength=eps, direction=direction)
    np.testing.assert_allclose(r.sum(-1), n * (n + 1) / 2, rtol=1e-12)
    s = soft_sort(x, regularization_strength=eps, direction=direction)
    np.testing.assert_allclose(s.sum(-1), x.sum(-1), rtol=1e-9, atol=1e-9 * np.abs(x).sum())
    rk = soft_rank(x, regularization="kl", regularization_strength=eps, direction=direction)
    # KL rank is in P(rho) as well: the same sum, entries in [1, n] (clamped exactly).
    np.testing.assert_allclose(rk.sum(-1), n * (n + 1) / 2, rtol=1e-12)
    assert rk.min() >= 1.0 and rk.max() <= n


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("f", [soft_sort, soft_rank])
def test_bad_input_gets_clear_errors(f):
    x = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match=r"finite.*nan"):
        f(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"finite.*-inf.*row 1, position 0"):
        f(np.array([[1.0, 2.0], [-np.inf, 0.0]]))
    with pytest.raises(ValueError, match="empty"):
        f(np.empty((3, 0)))
    with pytest.raises(ValueError, match="scalar"):
        f(np.float64(1.0) * np.ones(()))
    for dtype in (np.int64, np.bool_, np.complex128, object):
        with pytest.raises(TypeError, match="floating-point.*astype"):
            f(np.ones(3, dtype=dtype))
    with pytest.raises(TypeError, match="np.asarray"):
        f([1.0, 2.0])
    with pytest.raises(ValueError, match=r"'l2' or 'kl' \(any case\), got 'L1'"):
        f(x, regularization="L1")
    with pytest.raises(ValueError, match="'up'"):
        f(x, direction="up")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"regularization_strength.*{bad!r}"):
            f(x, regularization_strength=bad)
    for bad in (True, "1.0", None):
        with pytest.raises(TypeError, match="regularization_strength"):
            f(x, regularization_strength=bad)
    with pytest.raises(ValueError, match="overflows float64"):
        f(np.array([1e300, -1e300]), regularization_strength=1e-308)


@pytest.mark.parametrize("f", [soft_sort, soft_rank])
def test_peer_spellings_upper_case_accepted_typos_and_positional_options_explained(f):
    # fast-soft-sort writes direction="DESCENDING"; any case means the same operator.
    x = np.random.default_rng(14).normal(size=(2, 6))
    for reg, direction in itertools.product(REGS, DIRS):
        want = f(x, regularization=reg, direction=direction, regularization_strength=0.4)
        got = f(x, regularization=reg.upper(), direction=direction.upper(),
                regularization_strength=0.4)
        np.testing.assert_array_equal(got, want)
    # A typo quotes the value and the accepted spelling.
    with pytest.raises(ValueError, match=r"got 'kll'; did you mean regularization='kl'\?"):
        f(x, regularization="kll")
    with pytest.raises(ValueError, match=r"got 'DESCENDNG'; did you mean direction='descending'"):
        f(x, direction="DESCENDNG")
    # Positional options (torchsort: regularization, strength; fast-soft-sort: direction,
    # strength, regularization) are refused with the keyword call spelled out.
    name = f.__name__
    with pytest.raises(TypeError, match=rf"write {name}\(values, regularization='kl', "
                                        r"regularization_strength=0.5\)"):
        f(x, "kl", 0.5)
    with pytest.raises(TypeError, match=rf"write {name}\(values, direction='descending', "
                                        r"regularization_strength=0.1, regularization='l2'\)"):
        f(x, "DESCENDING", 0.1, "l2")


def test_importing_solvers_loads_neither_torch_nor_jax():
    code = ("import sys, numpy as np; import nonsmooth.solvers as s; "
            "s.soft_rank(np.arange(3.0)); s.soft_sort(np.arange(3.0), regularization='kl'); "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
