"""The engine against an oracle that shares none of its code.

Random piecewise-linear programs (linear maps, relu, abs, max, min) are built as data with
points exactly on kinks (tests/_pl_programs.py), rendered into torch and jax, and their
B-subdifferential is computed independently by propagating Jacobians by hand at many
nearby points in general position.  The engine must agree: every sampled element lies in
its Clarke hull; when it claims exactness, each of its vertices is a sampled element; LD
derivatives are sampled elements; torch and jax give the same hull; and a SPURIOUS verdict
is never issued when AD lies in the sampled hull.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _pl_programs import (RELU_STYLES, Layer, PLProgram, in_hull, pl_cases, random_program,
                          sampled_b_subdifferential)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from nonsmooth.conservative import Verdict, audit, clarke_jacobian, ld_jacobian

from nonsmooth.conservative._sampling import gradient_sampling

FAST = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SMALL = settings(max_examples=4, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SLOW = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _inputs(x):
    return {"torch": torch.tensor(x, dtype=torch.float64), "jax": _jax64(x)}


def _jax64(x):
    with jax.enable_x64(True):
        return jnp.asarray(x, dtype=jnp.float64)


def _fns(prog):
    return {"torch": prog.render_torch(), "jax": prog.render_jax()}


def _flat(vs, m, n):
    return np.asarray(vs, dtype=np.float64).reshape(-1, m * n)


def _ad(framework, f, x):
    """What reverse mode returns, measured here without the engine."""
    if framework == "torch":
        return torch.autograd.functional.jacobian(f, torch.tensor(x, dtype=torch.float64)).numpy()
    with jax.enable_x64(True):
        return np.asarray(jax.jacrev(f)(jnp.asarray(x, dtype=jnp.float64)))


def _oracle(prog, x, need=()):
    """Sampled B-subdifferential; resampled denser when an engine vertex is not among the samples."""
    B = sampled_b_subdifferential(prog, x, n_directions=3000)
    if any(not B.has(J) for J in need):
        B = sampled_b_subdifferential(prog, x, n_directions=40000, seed=1)
    return B


def _check_hull(V, exact, prog, x, contains=None, label="", require=True):
    """Engine elements are sampled B elements; when exact, every sampled element is in the engine's hull.

    Without exactness the engine's set is an inner approximation, so only the first half holds.
    """
    m, n = prog.n_out, prog.n_in
    V = _flat(V, m, n) if len(V) else np.zeros((0, m * n))
    if require or exact:
        assert V.shape[0] >= 1, label
    B = _oracle(prog, x, need=V)
    for v in V:
        assert B.has(v, tol=1e-7), (label, "engine element not in the sampled B-subdifferential", v, B.elements)
    if exact:
        for J in B.elements:
            assert in_hull(V, J, tol=1e-7), (label, "exact, yet a sampled element is outside the engine hull",
                                             J, V)
            if contains is not None:
                assert contains(J.reshape(m, n), 1e-7), (label, "ClarkeSet.contains disagrees with the LP")
    return B


def _check_clarke(prog, x, framework):
    C = clarke_jacobian(_fns(prog)[framework], _inputs(x)[framework])
    # An empty, non-exact set is an honest "found nothing" (e.g. where() tied to every order).
    return C, _check_hull(C.vertices, C.exact, prog, x, C.contains, framework, require=False)


def _check_audit(prog, x, framework, seed):
    """One audit: its B-subdifferential against the oracle, its verdict never overclaiming, LD in B."""
    m, n = prog.n_out, prog.n_in
    f, xx = _fns(prog)[framework], _inputs(x)[framework]
    a = audit(f, xx, seed=seed % 1000)
    B = _check_hull(a.b_subdifferential, a.exact, prog, x, label=framework,
                    require=a.verdict is not Verdict.UNDECIDED)
    ad = _ad(framework, f, x).reshape(m, n)
    np.testing.assert_allclose(np.asarray(a.ad_jacobian, dtype=np.float64).reshape(m, n), ad, atol=1e-12)
    ad_in = in_hull(B.flat(), ad, tol=1e-7)
    if not ad_in and a.verdict is Verdict.CLARKE:  # rule out a piece the sampling missed
        B = sampled_b_subdifferential(prog, x, n_directions=40000, seed=2)
        ad_in = in_hull(B.flat(), ad, tol=1e-7)
    assert a.verdict is not Verdict.NOT_LIPSCHITZ, (framework, a.explain())
    uses_where = any(L.act == "relu" and L.relu_style == "where" for L in prog.layers)
    if prog.n_active_kinks(x) <= 8 and not uses_where:  # inside the exact budget, no comparisons: must decide
        assert a.verdict is not Verdict.UNDECIDED, (framework, a.reason)
    if ad_in:
        assert a.verdict is not Verdict.SPURIOUS, (framework, ad, B.elements, a.explain())
    if a.verdict is Verdict.SPURIOUS:
        assert not ad_in and a.exact
    if a.verdict is Verdict.CLARKE:
        assert ad_in, (framework, ad, B.elements, a.explain())
    if a.verdict is Verdict.SMOOTH:
        assert len(B.elements) == 1 and np.allclose(B.elements[0], ad)
    # LD derivative along a random nonsingular direction matrix is an exact B element.
    M = np.random.default_rng(seed).standard_normal((n, n)) + 3 * np.eye(n)
    dirs = torch.tensor(M) if framework == "torch" else _jax64(M)
    ld = np.asarray(ld_jacobian(f, xx, dirs), dtype=np.float64).reshape(m, n)
    assert B.has(ld, tol=1e-7) or _oracle(prog, x, need=[ld]).has(ld, tol=1e-7), (framework, ld, B.elements)


@FAST
@given(pl_cases(max_in=3, max_depth=2, max_width=3, max_out=2, relu_styles=RELU_STYLES),
       st.integers(0, 2**31 - 1))
def test_audit_agrees_with_sampled_b_subdifferential_torch(case, seed):
    prog, x = case
    _check_audit(prog, x, "torch", seed)


@FAST
@given(pl_cases(max_in=3, max_depth=2, max_width=3, max_out=2, relu_styles=RELU_STYLES),
       st.integers(0, 2**31 - 1))
def test_audit_agrees_with_sampled_b_subdifferential_jax(case, seed):
    prog, x = case
    _check_audit(prog, x, "jax", seed)


@SMALL
@given(pl_cases(max_in=3, max_depth=2, max_width=3, max_out=2))
def test_torch_and_jax_give_the_same_clarke_hull(case):
    prog, x = case
    m, n = prog.n_out, prog.n_in
    Vt = _flat(clarke_jacobian(_fns(prog)["torch"], _inputs(x)["torch"]).vertices, m, n)
    Vj = _flat(clarke_jacobian(_fns(prog)["jax"], _inputs(x)["jax"]).vertices, m, n)
    for v in Vt:
        assert in_hull(Vj, v), ("torch vertex outside jax hull", v, Vj)
    for v in Vj:
        assert in_hull(Vt, v), ("jax vertex outside torch hull", v, Vt)


@SMALL
@given(pl_cases(max_in=2, max_depth=2, max_width=3, max_out=1))
def test_ld_exact_enumeration_and_gradient_sampling_agree(case):
    prog, x = case
    m, n = prog.n_out, prog.n_in
    f, xx = _fns(prog)["torch"], _inputs(x)["torch"]
    C = clarke_jacobian(f, xx)
    V = _flat(C.vertices, m, n)
    ld = np.asarray(ld_jacobian(f, xx), dtype=np.float64).reshape(-1)
    assert in_hull(V, ld), (ld, V)
    B = _oracle(prog, x)
    gs = gradient_sampling(f, xx, radius=B.t, n_samples=120, seed=3)
    for J in gs.samples:
        assert in_hull(V, J), (J, V)
    found = {tuple(np.round(J.reshape(-1), 9)) for J in gs.samples}
    if C.exact and found == {tuple(np.round(b.reshape(-1), 9)) for b in B.elements}:
        # sampling saw every piece, so both hulls are the Clarke set: same min-norm element
        mn = np.asarray(C.min_norm(), dtype=np.float64).reshape(-1)
        assert abs(np.linalg.norm(mn) - np.linalg.norm(gs.min_norm)) < 1e-6, (mn, gs.min_norm)


# ------------------------------------------------------------------ the mirror trap, by construction


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("n, dtype", [(1, "float64"), (3, "float64"), (3, "float32")])
def test_mirrored_relu_pair_is_certified_spurious(framework, n, dtype):
    """sum_i (relu(z_i) - relu(-z_i)) = sum_i z_i, linear: Clarke set is one point, AD picks relu'(0)."""
    rng = np.random.default_rng(n)
    A = rng.integers(-2, 3, size=(n, n)).astype(float) + 3 * np.eye(n)
    prog = PLProgram(layers=(
        Layer(np.concatenate([A, -A]), np.zeros(2 * n), "relu"),
        Layer(np.concatenate([np.ones(n), -np.ones(n)])[None, :], np.zeros(1), "id"),
    ), n_in=n)
    x = np.zeros(n)
    B = sampled_b_subdifferential(prog, x)
    assert len(B.elements) == 1 and np.allclose(B.elements[0], A.sum(axis=0))
    f = _fns(prog)[framework]
    # dyadic data: the point is exactly on every kink in float32 too
    xx = torch.tensor(x, dtype=getattr(torch, dtype)) if framework == "torch" else (
        _jax64(x) if dtype == "float64" else jnp.asarray(x, dtype=jnp.float32))
    ad = _ad(framework, f, x)
    a = audit(f, xx)
    assert not np.allclose(ad.reshape(-1), B.elements[0].reshape(-1))  # relu'(0) = 0 in both frameworks
    assert a.verdict is Verdict.SPURIOUS and a.exact, a.explain()
    np.testing.assert_allclose(np.asarray(a.ad_jacobian, dtype=np.float64).reshape(-1), ad.reshape(-1))
    np.testing.assert_allclose(np.asarray(a.b_subdifferential, dtype=np.float64).reshape(-1, n), B.flat())


# ------------------------------------------------------------------ heavier variants


@pytest.mark.slow
@SLOW
@given(pl_cases(max_in=4, max_depth=3, max_width=4, max_out=3, relu_styles=RELU_STYLES))
def test_clarke_and_audit_agree_with_sampled_b_subdifferential_many(case):
    prog, x = case
    for fw in ("torch", "jax"):
        _check_clarke(prog, x, fw)
        _check_audit(prog, x, fw, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_wide_programs_with_many_active_kinks(seed):
    prog, x = random_program(np.random.default_rng(seed), n_in=3, widths=[8, 6], acts=["relu", "abs"],
                             kink_fraction=0.5, mirror=bool(seed % 2))
    C, B = _check_clarke(prog, x, "torch")
    a = audit(_fns(prog)["torch"], _inputs(x)["torch"])
    if in_hull(B.flat(), a.ad_jacobian):
        assert a.verdict is not Verdict.SPURIOUS


# ------------------------------------------------------------------ the showcase suite


def test_engine_showcase_suite_matches_closed_form_verdicts():
    from nonsmooth.reports._suite_engine import run

    res = run(quick=True)
    failed = [(c.name, c.numbers.get("verdict"), c.detail[:200]) for c in res.checks if not c.passed]
    assert not failed, failed
    names = {c.name for c in res.checks}
    assert "torch: relu(x) - relu(-x) at 0 -> SPURIOUS" in names and "jax: sqrt at 0 -> NOT_LIPSCHITZ" in names
