"""The rule registry is plain, consistent data: parsable by SymPy, no framework imports,
and its one-sided slopes match the frameworks' own functions (float64 finite differences)."""
import math
import subprocess
import sys

import numpy as np
import pytest
import sympy

from nonsmooth.conservative import RULES, rule_for_jax_primitive, rule_for_torch_op
from nonsmooth.conservative._rules import FAMILIES, IMPLS, evaluate


def test_registry_imports_no_framework():
    code = "import sys, nonsmooth.conservative as c; c.RULES; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_fields_are_well_formed(name):
    r = RULES[name]
    assert r.name == name and r.family in FAMILIES and r.impl in IMPLS
    assert r.arity >= 1 and r.description
    syms = {k: sympy.Symbol(k) for k in [*r.params, "n"]}
    for k in r.kinks:
        for e in (k.at, k.left, k.right, *k.clarke, k.left_value, k.right_value):
            if e:
                sympy.sympify(e, locals=syms)
        if k.continuous and k.lipschitz:
            # the Clarke interval is the hull of the one-sided slopes
            p = {kk: (1.0 if v is None else v) for kk, v in r.params.items()}
            lo, hi = evaluate(k.clarke[0], p), evaluate(k.clarke[1], p)
            left, right = evaluate(k.left, p), evaluate(k.right, p)
            assert lo == pytest.approx(min(left, right)) and hi == pytest.approx(max(left, right))


def test_lookups():
    assert rule_for_torch_op("aten.relu.default").name == "relu"
    assert rule_for_torch_op("aten.hardtanh.default").name == "hardtanh"
    assert rule_for_torch_op("aten.max_pool2d_with_indices.default").name == "max_pool"
    assert rule_for_torch_op("aten.mm.default") is None
    assert rule_for_jax_primitive("max").name == "maximum"
    assert rule_for_jax_primitive("reduce_window_max").name == "max_pool"
    assert rule_for_jax_primitive("dot_general") is None


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if r.family == "elementwise_unary" and r.torch_ops))
def test_one_sided_slopes_match_torch(name):
    r = RULES[name]
    op = eval("torch.ops." + r.torch_ops[0])  # noqa: S307 - registry names
    schema_names = [a.name for a in op._schema.arguments[1:]]
    params = {k: v for k, v in r.params.items()}
    if name == "clamp":
        params = {"min": -0.5, "max": 2.0}
    args = [params[k] for k in schema_names if k in params]
    f = lambda x: op(x, *args)  # noqa: E731
    for at, left, right in r.kink_points(params):
        x = torch.tensor([at], dtype=torch.float64)
        h = 1e-7
        fd_r = float((f(x + h) - f(x)) / h)
        fd_l = float((f(x) - f(x - h)) / h)
        assert fd_r == pytest.approx(right, abs=1e-5), (name, at)
        assert fd_l == pytest.approx(left, abs=1e-5), (name, at)


@pytest.mark.parametrize("name", ["floor", "ceil", "round", "trunc", "sign"])
def test_jump_one_sided_values_match_torch(name):
    r = RULES[name]
    op = eval("torch.ops." + r.torch_ops[0])  # noqa: S307
    k = r.kinks[0]
    off = evaluate(k.at, {"n": 0.0})
    for n in ([-2.0, -1.0, 1.0, 3.0] if k.lattice else [0.0]):
        at = n + off if k.lattice else evaluate(k.at, {})
        x = torch.tensor([at], dtype=torch.float64)
        lv, rv = evaluate(k.left_value, {"n": n}), evaluate(k.right_value, {"n": n})
        assert float(op(x - 1e-9)) == lv and float(op(x + 1e-9)) == rv
