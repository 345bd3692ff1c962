"""nonsmooth.proofs: the whole catalog verifies; wrong or missing registry entries fail;
the symbolic pieces agree with independent numeric oracles (SciPy optimisation and
quadrature); certificates serialise and re-parse; the CLI and the report suite."""
import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.integrate as si
import scipy.optimize as so
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from nonsmooth.proofs import Certificate, Proof, catalog, check_all, get
from nonsmooth.proofs._cli import main
from nonsmooth.proofs._certificate import Derivation
from nonsmooth.proofs._rule_table import rule_proof

RULES = pytest.importorskip("nonsmooth.conservative._rules").RULES
NAMES = [p.name for p in catalog()]


@pytest.fixture(scope="module")
def certificates():
    return {c.name: c for c in check_all()}


# ------------------------------------------------------------------ the whole catalog

@pytest.mark.parametrize("name", NAMES)
def test_catalog_certificate_verifies(certificates, name):
    cert = certificates[name]
    assert cert.verified, cert.explain()


def test_catalog_covers_every_registry_rule_and_the_required_proofs():
    names = set(NAMES)
    assert {f"rule:{r}" for r in RULES} <= names
    assert {"soft_rank_l2", "soft_rank_kl", "soft_sort_l2", "soft_sort_kl", "gumbel_argmax_is_softmax",
            "perturbed_max_gradient", "fenchel_young_gradient", "relu_fixed_point_implicit",
            "spurious_derivative", "path_conservativity"} <= names


@pytest.mark.parametrize("name", NAMES)
def test_certificate_derivation_nonempty_and_expressions_reparse(certificates, name):
    cert = certificates[name]
    assert cert.checks > 0 and cert.derivation, name
    assert all(isinstance(step, str) and step for step in cert.derivation)
    for label, text in cert.expressions:
        parsed = sp.sympify(text)
        # Re-parsing is faithful: printing the parsed expression gives an equivalent expression.
        assert sp.sympify(sp.sstr(parsed)) == parsed, (label, text)
    blob = json.loads(json.dumps(cert.to_json()))
    assert blob["verified"] == cert.verified and blob["name"] == name
    assert set(blob["expressions"]) == {label for label, _ in cert.expressions}


# ------------------------------------------------------------------ the rule table cannot drift

def _with_kink(rule, index, **changes):
    kinks = list(rule.kinks)
    kinks[index] = dataclasses.replace(kinks[index], **changes)
    return dataclasses.replace(rule, kinks=tuple(kinks))


@pytest.mark.parametrize("rule_name, index, changes, needle", [
    ("relu", 0, {"clarke": ("0", "2")}, "Clarke upper end"),
    ("leaky_relu", 0, {"left": "1"}, "left slope"),
    ("hardtanh", 0, {"at": "min_val + 1"}, "no breakpoint"),
    ("sign", 0, {"continuous": True}, "continuous"),
    ("floor", 0, {"right_value": "n + 1"}, "right value"),
    ("sqrt", 0, {"right": "1"}, "right slope"),
    ("elu", 0, {"left": "alpha"}, "left slope"),   # right at the defaults, wrong at the other params
])
def test_a_wrong_registry_entry_fails_its_certificate(rule_name, index, changes, needle):
    good = rule_proof(RULES[rule_name]).check()
    assert good.verified, good.explain()
    bad = rule_proof(_with_kink(RULES[rule_name], index, **changes)).check()
    assert not bad.verified
    assert any(needle in f for f in bad.failures), bad.failures


def test_a_missing_kink_and_a_wrong_flag_fail():
    hardtanh = RULES["hardtanh"]
    missing = rule_proof(dataclasses.replace(hardtanh, kinks=hardtanh.kinks[:1])).check()
    assert not missing.verified and any("declares no kink there" in f for f in missing.failures)
    wrong_impl = rule_proof(dataclasses.replace(RULES["abs"], impl="jump")).check()
    assert not wrong_impl.verified and any("impl" in f for f in wrong_impl.failures)
    not_affine = rule_proof(dataclasses.replace(RULES["hardswish"], piecewise_affine=True)).check()
    assert not not_affine.verified
    maximum = rule_proof(dataclasses.replace(RULES["maximum"], arity=1)).check()
    assert not maximum.verified
    norm = rule_proof(_with_kink(RULES["norm"], 0, clarke=("0", "1"))).check()
    assert not norm.verified


def test_monkeypatched_registry_flows_into_the_catalog(monkeypatch):
    bad = _with_kink(RULES["relu"], 0, clarke=("0", "2"))
    monkeypatch.setitem(RULES, "relu", bad)
    (cert,) = check_all(["rule:relu"])
    assert not cert.verified and "Clarke upper end" in " ".join(cert.failures)


def test_an_unknown_primitive_fails_with_no_proof(monkeypatch):
    new = dataclasses.replace(RULES["relu"], name="frobnicate")
    monkeypatch.setitem(RULES, "frobnicate", new)
    (cert,) = check_all(["rule:frobnicate"])
    assert not cert.verified
    assert "no proof for primitive 'frobnicate'" in cert.failures[0]


# ------------------------------------------------------------------ independent numeric oracles

def _project_scipy(z, w, kind):
    """The projection by SLSQP on Rado's inequalities: an oracle independent of the KKT pieces."""
    n = len(z)
    ws = np.sort(w)[::-1]
    cap = np.cumsum(ws if kind == "l2" else np.exp(ws))
    cons = [{"type": "eq", "fun": lambda m: np.sum(m) - cap[-1]}]
    for size in range(1, n):
        for subset in __import__("itertools").combinations(range(n), size):
            cons.append({"type": "ineq", "fun": lambda m, s=subset, c=cap[size - 1]: c - np.sum(m[list(s)])})
    if kind == "l2":
        res = so.minimize(lambda m: 0.5 * np.sum((m - z) ** 2), np.full(n, cap[-1] / n), constraints=cons,
                          method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        assert res.success, res.message
        return res.x
    # KL(m | e^z) with m = e^u, so positivity is built in and the problem stays well scaled.
    log_cons = [dict(c, fun=lambda u, f=c["fun"]: f(np.exp(u))) for c in cons]
    res = so.minimize(lambda u: np.sum(np.exp(u) * (u - z - 1.0)), np.full(n, np.log(cap[-1] / n)),
                      constraints=log_cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    # status 8: the line search cannot improve any further at this ftol (converged to precision)
    assert res.success or res.status == 8, res.message
    return res.x


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(-12, 12), min_size=3, max_size=3, unique=True),
       st.sampled_from(["l2", "kl"]))
def test_kkt_pieces_match_a_scipy_projection(zs, kind):
    from nonsmooth.proofs._soft_sort import active_piece, pieces_at

    z = [sp.Rational(v, 4) for v in zs]
    w = [sp.Integer(3), sp.Integer(2), sp.Integer(1)]
    piece = active_piece(pieces_at(z, w, kind), {})
    if piece is None:  # the point sits on a face boundary; the proofs avoid such points
        return
    exact = np.array([float(sp.N(v, 30)) for v in piece.output])
    oracle = _project_scipy(np.array([float(v) for v in z]), np.array([3.0, 2.0, 1.0]), kind)
    np.testing.assert_allclose(exact, oracle, atol=1e-5)


@pytest.mark.parametrize("t1, t2, sigma", [(0.3, -0.2, 0.7), (1.0, 2.5, 1.3), (-1.0, -1.0, 0.2)])
def test_gumbel_integral_matches_quadrature(t1, t2, sigma):
    from nonsmooth.proofs._perturbed import _z, gumbel_cdf, gumbel_pdf, integrate_over_reals_gumbel

    a, b, s = sp.symbols("a b s", real=True)
    closed = integrate_over_reals_gumbel(gumbel_pdf(_z) * gumbel_cdf(_z + (a - b) / s))
    value = float(closed.subs({a: t1, b: t2, s: sigma}))
    d = (t1 - t2) / sigma
    quad, _ = si.quad(lambda z: math.exp(-z - math.exp(-z)) * math.exp(-math.exp(-(z + d))), -30, 30)
    assert value == pytest.approx(quad, abs=1e-9)
    assert value == pytest.approx(1 / (1 + math.exp(-d)), abs=1e-12)


def test_piecewise_local_analysis_matches_finite_differences():
    from nonsmooth.proofs._piecewise1d import is_zero_1d, local
    from nonsmooth.proofs._primitive_table import UNARY, x

    f = UNARY["hardswish"].build()
    g = sp.lambdify(x, f, "math")
    for c in (-3, 3):
        loc = local(f, x, sp.Integer(c))
        h = 1e-7
        assert float(loc.slope_left) == pytest.approx((g(c) - g(c - h)) / h, abs=1e-5)
        assert float(loc.slope_right) == pytest.approx((g(c + h) - g(c)) / h, abs=1e-5)
    relu = UNARY["relu"].build()
    assert is_zero_1d(relu - relu.subs(x, -x) - x, x)
    assert not is_zero_1d(relu - x, x)


# ------------------------------------------------------------------ API behaviour

def test_get_and_select_errors():
    assert get("spurious_derivative").name == "spurious_derivative"
    with pytest.raises(ValueError, match="no proof named 'nope'"):
        get("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        get(3)
    with pytest.raises(ValueError, match="shell-style patterns"):
        check_all(["rule:does-not-exist"])
    with pytest.raises(TypeError, match="names must be"):
        check_all(7)
    with pytest.raises(TypeError, match="got 3"):
        check_all(["rule:relu", 3])


def test_check_all_progress_and_patterns():
    calls = []
    certs = check_all(["rule:relu", "rule:ab*"], progress=lambda i, n, name: calls.append((i, n, name)))
    assert [c.name for c in certs] == ["rule:relu", "rule:abs"]
    assert calls == [(0, 2, "rule:relu"), (1, 2, "rule:abs"), (2, 2, "")]


def test_a_crashing_or_empty_proof_is_a_failed_certificate():
    def boom(d: Derivation):
        d.step("about to divide")
        raise ZeroDivisionError("division by zero")

    cert = Proof("boom", "s", "x", (), boom).check()
    assert isinstance(cert, Certificate) and not cert.verified
    assert "ZeroDivisionError" in cert.failures[0]
    empty = Proof("empty", "s", "x", (), lambda d: None).check()
    assert not empty.verified and "no checks" in empty.failures[0]
    assert "FAILED" in empty.explain()


def test_cli(tmp_path, capsys):
    assert main(["spurious_derivative", "--no-progress"]) == 0
    assert "VERIFIED  spurious_derivative" in capsys.readouterr().out
    assert main(["--list", "rule:re*"]) == 0
    out = capsys.readouterr().out
    assert "rule:relu" in out and "rule:relu6" in out and "spurious" not in out
    assert main(["no-such-proof", "--no-progress"]) == 2
    assert "no proof named" in capsys.readouterr().err
    path = tmp_path / "certs.json"
    assert main(["relu_fixed_point_implicit", "--json", str(path)]) == 0
    err = capsys.readouterr().err
    assert "1/1" in err  # the progress bar
    blob = json.loads(path.read_text())
    assert blob["certificates"][0]["verified"] is True and blob["proofs"][0]["latex"]
    assert main(["spurious_derivative", "--json", str(tmp_path / "missing" / "x.json")]) == 2


def test_cli_exit_status_is_nonzero_when_a_certificate_fails(monkeypatch, capsys):
    monkeypatch.setitem(RULES, "relu", _with_kink(RULES["relu"], 0, left="1"))
    assert main(["rule:relu", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "left slope" in out


def test_report_suite(monkeypatch):
    from nonsmooth.reports import _suite_proofs

    monkeypatch.setattr(_suite_proofs, "QUICK", ("spurious_derivative", "rule:abs"))
    messages = []
    result = _suite_proofs.run(quick=True, progress=messages.append)
    assert [c.name for c in result.checks] == ["spurious_derivative", "rule:abs"]
    assert all(c.passed for c in result.checks) and result.passed
    assert "Derivation:" in result.checks[0].detail and result.checks[0].numbers["computed_checks"] > 0
    assert messages == ["1/2 spurious_derivative", "2/2 rule:abs"]
    json.dumps(result.to_json())


def test_parametric_requires_and_nonzero_lattice_express_the_registry_fixes():
    # trunc is continuous at 0 (it jumps at the nonzero integers only); threshold is a jump only
    # when value != threshold.  Written that way, both entries verify.
    trunc = RULES["trunc"]
    fixed = dataclasses.replace(trunc, kinks=(dataclasses.replace(trunc.kinks[0], lattice="nonzero_integers"),))
    assert rule_proof(fixed).check().verified
    th = RULES["threshold"]
    jump = dataclasses.replace(th.kinks[0], continuous=False, lipschitz=False, clarke=("nan", "nan"),
                               requires="Ne(value, threshold)")
    kink = dataclasses.replace(th.kinks[0], continuous=True, lipschitz=True,
                               clarke=("Min(0, 1)", "Max(0, 1)"), requires="Eq(value, threshold)")
    cert = rule_proof(dataclasses.replace(th, kinks=(jump, kink))).check()
    assert cert.verified, cert.failures
    # ... and the same split with the flags swapped fails.
    swapped = dataclasses.replace(th, kinks=(dataclasses.replace(jump, requires="Eq(value, threshold)"),
                                             dataclasses.replace(kink, requires="Ne(value, threshold)")))
    assert not rule_proof(swapped).check().verified
