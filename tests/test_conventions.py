"""kink_conventions against closed-form Clarke sets, one-sided finite differences and direct measurements."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from nonsmooth.conservative import RULES
from nonsmooth.conservative._conventions import kink_conventions

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


@pytest.fixture(scope="module")
def tc():
    return kink_conventions("torch")


@pytest.fixture(scope="module")
def jc():
    return kink_conventions("jax")


def _torch_grad(fn, a):
    x = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x), x)
    return float(g)


def _jax_grad(fn, a):
    with jax.enable_x64(True):
        return float(jax.grad(fn)(jnp.float64(a)))


# ------------------------------------------------------------------ the facts the issue names


def test_abs_at_zero_differs_between_torch_and_jax(tc, jc):
    t = tc.row("torch.abs(x)")
    j = jc.row("jnp.abs(x)")
    # the module's numbers are the frameworks' own, measured here a second time
    assert t.ad_array().item() == _torch_grad(torch.abs, 0.0)
    assert j.ad_array().item() == _jax_grad(jnp.abs, 0.0)
    assert t.ad_array().item() != j.ad_array().item()
    # closed form: the Clarke set of |x| at 0 is [-1, 1], min-norm element 0
    for r in (t, j):
        v = r.ad_array().item()
        assert r.in_clarke == (-1 <= v <= 1)
        assert r.is_min_norm == (v == 0)
        assert r.clarke.describe() == "[-1, 1]"


RELU_TORCH = {
    "torch.relu(x)": torch.relu,
    "torch.clamp(x, min=0)": lambda x: torch.clamp(x, min=0),
    "torch.maximum(x, zeros_like(x))": lambda x: torch.maximum(x, torch.zeros_like(x)),
    "torch.where(x >= 0, x, 0)": lambda x: torch.where(x >= 0, x, 0.0),
    "x * (x > 0)": lambda x: x * (x > 0),
}
RELU_JAX = {
    "jax.nn.relu(x)": jax.nn.relu,
    "jnp.maximum(x, 0)": lambda x: jnp.maximum(x, 0),
    "jnp.where(x >= 0, x, 0)": lambda x: jnp.where(x >= 0, x, 0.0),
    "jnp.clip(x, 0)": lambda x: jnp.clip(x, 0),
    "x * (x > 0)": lambda x: x * (x > 0),
}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_relu_spellings_measured_and_judged_against_zero_one(framework, tc, jc):
    kc, table, grad = (tc, RELU_TORCH, _torch_grad) if framework == "torch" else (jc, RELU_JAX, _jax_grad)
    rows = {r.spelling: r for r in kc.by_rule("relu")}
    assert set(table) <= set(rows)
    values = set()
    for code, fn in table.items():
        r = rows[code]
        v = r.ad_array().item()
        assert v == grad(fn, 0.0), code
        values.add(v)
        assert r.in_clarke == (0.0 <= v <= 1.0)  # Clarke set of relu at 0: [0, 1]
        assert r.is_min_norm == (v == 0.0)       # its min-norm element: 0
    # the same math written differently does not get one answer
    assert len(values) >= 2


def test_elementwise_max_tie_is_even_split_in_both(tc, jc):
    for kc, code in ((tc, "torch.maximum(a, b)"), (jc, "jnp.maximum(a, b)")):
        r = kc.row(code)
        g = r.ad_array().reshape(-1)
        # closed form: conv{(1,0),(0,1)}, min-norm (1/2, 1/2)
        assert r.in_clarke == bool(np.all(g >= -1e-12) and abs(g.sum() - 1) < 1e-12)
        assert r.is_min_norm == bool(np.allclose(g, [0.5, 0.5]))


def test_sqrt_of_square_is_nan_outside_abs_clarke_set(tc, jc):
    for kc, code in ((tc, "torch.sqrt(x * x)"), (jc, "jnp.sqrt(x * x)")):
        r = kc.row(code)
        assert np.isnan(r.ad_array()).all() and r.in_clarke is False
        assert "non-finite" in r.behaviour


def test_jumps_and_non_lipschitz_have_no_clarke_set(tc, jc):
    for kc in (tc, jc):
        for rule in ("floor", "ceil", "round", "trunc", "sign", "sqrt", "pow"):
            rows = [r for r in kc.by_rule(rule) if r.available and "x * x" not in r.spelling]
            assert rows, rule
            for r in rows:
                assert r.clarke.kind == "none" and r.in_clarke is None and r.is_min_norm is None


def test_identity_written_with_eq_gets_a_value_outside_its_clarke_set(tc, jc):
    # where(x == 0, 0, x) is x everywhere: Clarke set {1}
    for kc, code, fn, grad in ((tc, "torch.where(x == 0", lambda x: torch.where(x == 0, 0.0, x), _torch_grad),
                               (jc, "jnp.where(x == 0", lambda x: jnp.where(x == 0, 0.0, x), _jax_grad)):
        r = kc.row(code)
        v = grad(fn, 0.0)
        assert r.ad_array().item() == v and r.in_clarke == (v == 1.0)


def test_norm_at_zero_judged_against_unit_ball(tc, jc):
    for kc in (tc, jc):
        for r in kc.by_rule("norm"):
            g = r.ad_array().reshape(-1)
            assert r.in_clarke == bool(np.all(np.isfinite(g)) and np.linalg.norm(g) <= 1 + 1e-12)
            assert r.is_min_norm == bool(np.all(np.isfinite(g)) and np.allclose(g, 0))


# ------------------------------------------------------------------ every row against independent oracles


def _fn_for(kc, spelling):
    from nonsmooth.conservative import _conventions as C

    sps = C._torch_spellings() if kc.framework == "torch" else C._jax_spellings()
    return next(sp.fn for sp in sps if sp.code == spelling)


def _eval(kc, fn, x):
    if kc.framework == "torch":
        return np.asarray(fn(torch.tensor(x, dtype=torch.float64)).detach().numpy(), dtype=np.float64)
    with jax.enable_x64(True):
        return np.asarray(fn(jnp.asarray(x, dtype=jnp.float64)), dtype=np.float64)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_unary_clarke_intervals_match_one_sided_finite_differences(framework, tc, jc):
    kc = tc if framework == "torch" else jc
    checked = 0
    for r in kc.rows:
        if not r.available or r.clarke.kind != "polytope" or r.ad_shape != (1, 1):
            continue
        fn = _fn_for(kc, r.spelling)
        a = float(r.where.split("=")[1])
        h = 1e-7
        f0 = _eval(kc, fn, a)
        left = (f0 - _eval(kc, fn, a - h)) / h
        right = (_eval(kc, fn, a + h) - f0) / h
        lo, hi = min(left, right), max(left, right)  # 1-D piecewise C^1: Clarke = [min, max] of one-sided slopes
        V = np.array(r.clarke.vertices).reshape(-1)
        assert abs(V.min() - lo) < 1e-5 and abs(V.max() - hi) < 1e-5, (r.spelling, V, lo, hi)
        v = r.ad_array().item()
        if np.isfinite(v):
            assert r.in_clarke == (lo - 1e-6 <= v <= hi + 1e-6), r.spelling
            assert r.is_min_norm == (abs(v - float(np.clip(0.0, lo, hi))) < 1e-6), r.spelling
        checked += 1
    assert checked >= 20


def _jacobian(kc, fn, x):
    if kc.framework == "torch":
        return torch.autograd.functional.jacobian(fn, torch.tensor(x, dtype=torch.float64)).numpy()
    with jax.enable_x64(True):
        return np.asarray(jax.jacrev(fn)(jnp.asarray(x, dtype=jnp.float64)))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_selection_clarke_vertices_match_sampled_jacobians_near_the_tie(framework, tc, jc):
    kc = tc if framework == "torch" else jc
    rng = np.random.default_rng(0)
    checked = 0
    for r in kc.rows:
        if not r.available or r.clarke.kind != "polytope" or r.ad_shape[1] == 1:
            continue
        fn = _fn_for(kc, r.spelling)
        x = np.array([float(v) for v in r.where.split("(")[1].rstrip(")").split(",")])
        found = set()
        for _ in range(60):  # away from ties the Jacobian is unambiguous in any framework
            J = _jacobian(kc, fn, x + 1e-4 * rng.standard_normal(x.size)).reshape(-1, x.size)
            found.add(tuple(np.round(J.reshape(-1), 9)))
        vertices = {tuple(np.round(np.array(v), 9)) for v in r.clarke.vertices}
        assert found == vertices, r.spelling
        checked += 1
    assert checked >= 10


def test_sort_clarke_set_is_the_sorting_permutations(tc):
    r = tc.row("torch.sort(x).values")
    x = np.array([3.0, 1.0, 3.0, 2.0])
    expected = set()
    for perm in itertools.permutations(range(4)):
        if np.all(np.diff(x[list(perm)]) >= 0):
            expected.add(tuple(np.eye(4)[list(perm)].reshape(-1)))
    assert {tuple(v) for v in r.clarke.vertices} == expected and len(expected) == 2


# ------------------------------------------------------------------ coverage, output, errors


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_every_registered_rule_has_a_row(framework, tc, jc):
    kc = tc if framework == "torch" else jc
    assert {r.rule for r in kc.rows} == set(RULES)
    assert all(r.spelling != "(no probe)" for r in kc.rows)
    for r in kc.rows:
        if not r.available:
            assert r.ad_value is None and r.ad_text() == "not available" and r.note
        else:
            assert r.ad_value is not None, (r.spelling, r.note)
    assert framework in kc.versions


def test_not_available_rows_are_reported_not_skipped(jc, tc):
    assert not jc.by_rule("softshrink")[0].available
    assert not tc.by_rule("cbrt")[0].available
    assert "Not expressible in jax" in jc.explain()


def test_json_and_markdown(tc):
    blob = json.loads(json.dumps(tc.to_json()))
    assert blob["framework"] == "torch" and len(blob["rows"]) == len(tc.rows)
    md = tc.to_markdown()
    assert md.count("\n| ") == len(tc.rows) + 1 and "torch.abs(x)" in md
    assert "relu'(0) by spelling" in tc.explain()


def test_bad_arguments():
    with pytest.raises(ValueError, match="framework"):
        kink_conventions("numpy")
    with pytest.raises(ValueError, match="nope"):
        kink_conventions("torch", rules=("nope",))


def test_subset_of_rules():
    kc = kink_conventions("jax", rules=("abs", "sort"))
    assert {r.rule for r in kc.rows} == {"abs", "sort"}


def test_import_does_not_load_frameworks():
    code = ("import sys, nonsmooth.conservative._conventions, nonsmooth.conservative._sampling; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conventions_suite_checks_pass_and_render():
    from nonsmooth.reports._suite_conventions import run

    res = run(quick=True)
    assert res.checks and all(c.passed for c in res.checks), [c.name for c in res.checks if not c.passed]
    table = res.tables[0]
    assert len(table.rows) >= len(RULES) and "torch AD" in table.columns and "jax AD" in table.columns
    fig = next(f for f in res.figures if f.kind == "interval")  # AD values against the Clarke ranges
    assert set(fig.series) >= {"torch AD", "jax AD"} and len(fig.intervals["Clarke set (by hand)"]) == len(fig.x)
    assert all(len(v) == len(fig.x) for v in fig.series.values())
    json.dumps(res.to_json(), allow_nan=False)
    assert "abs'(0)" in res.summary
