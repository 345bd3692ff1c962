"""audit() on jax programs against closed forms, and torch/jax agreeing on the same math."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from nonsmooth.conservative import Verdict, audit, clarke_jacobian, ld_jacobian  # noqa: E402


def as_set(mats, decimals=9):
    return {tuple(np.round(np.asarray(m, dtype=float).ravel(), decimals) + 0.0) for m in mats}


def test_engine_does_not_flip_x64_globally():
    before = jax.config.jax_enable_x64
    audit(jnp.abs, jnp.zeros(1))
    assert jax.config.jax_enable_x64 == before
    assert jnp.ones(1).dtype == (jnp.float64 if before else jnp.float32)


def test_relu_minus_relu_spurious_in_jax():
    a = audit(lambda x: jax.nn.relu(x) - jax.nn.relu(-x), jnp.zeros(1))
    assert a.verdict is Verdict.SPURIOUS and a.exact
    assert a.ad_jacobian.tolist() == [[0.0]]
    assert as_set(a.b_subdifferential) == {(1.0,)}
    assert a.framework == "jax" and "jax" in a.versions


def test_abs_at_zero_is_clarke_with_jax_convention():
    a = audit(jnp.abs, jnp.zeros(1))
    assert a.verdict is Verdict.CLARKE
    assert a.ad_jacobian.tolist() == [[1.0]]  # jax's convention abs'(0) = 1
    assert as_set(a.b_subdifferential) == {(-1.0,), (1.0,)}


def test_smooth_network_matches_analytic_jacobian():
    rng = np.random.default_rng(0)
    W1, W2 = rng.standard_normal((6, 3)), rng.standard_normal((2, 6))
    x = rng.standard_normal(3)

    def f(x):
        return jnp.asarray(W2, dtype=x.dtype) @ jnp.tanh(jnp.asarray(W1, dtype=x.dtype) @ x)

    a = audit(f, jnp.asarray(x, dtype=jnp.float32))
    assert a.verdict is Verdict.SMOOTH
    J = W2 @ np.diag(1 - np.tanh(W1 @ x) ** 2) @ W1
    np.testing.assert_allclose(a.ad_jacobian, J, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.engine_jacobian, J, rtol=1e-5, atol=1e-6)


def test_sqrt_and_floor():
    assert audit(jnp.sqrt, jnp.zeros(1)).verdict is Verdict.NOT_LIPSCHITZ
    assert audit(jnp.floor, jnp.ones(1)).verdict is Verdict.NOT_LIPSCHITZ


def test_clip_is_split_into_max_and_min():
    a = audit(lambda x: jnp.clip(x, -1.0, 1.0), jnp.array([1.0, -1.0, 0.5]))
    assert a.verdict is Verdict.CLARKE and a.exact
    expect = [np.diag([p, q, 1.0]) for p in (0.0, 1.0) for q in (0.0, 1.0)]
    assert as_set(a.b_subdifferential) == as_set(expect)
    assert {k.primitive for k in a.active_kinks} <= {"clamp", "maximum", "minimum"}


@pytest.mark.parametrize(
    "fn,xs",
    [(jnp.sort, [2.0, 2.0, 0.0, 3.0]), (lambda x: lax.top_k(x, 2)[0], [2.0, 2.0, 0.0, 1.0]),
     (lax.cummax, [2.0, 2.0, 0.0, 3.0]), (jnp.median, [2.0, 2.0, 0.0, 3.0]), (jnp.max, [3.0, 3.0, 0.0, 1.0]),
     (lambda x: x[jnp.argmax(x)], [3.0, 3.0, 0.0, 1.0]),
     (lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (2,), (2,), "VALID"), [2.0, 2.0, 0.0, 3.0])],
    ids=["sort", "top_k", "cummax", "median", "reduce_max", "argmax", "reduce_window_max"],
)
def test_selections_with_ties(fn, xs):
    x = jnp.array(xs)
    a = audit(fn, x)
    assert a.verdict is Verdict.CLARKE and a.exact
    # brute-force oracle: Jacobians at the two perturbations that break the tie
    found = []
    for eps in (1e-3, -1e-3):
        found.append(np.asarray(jax.jacobian(fn)(x.at[0].add(eps))).reshape(-1, 4))
    assert as_set(found) <= as_set(a.b_subdifferential)


def test_norm_at_zero_nan_gradient_is_spurious():
    # jnp.linalg.norm is sqrt(sum(x*x)); the engine reads it as a norm (Lipschitz), so the
    # NaN that jax's AD returns at 0 is certified not to be a generalized derivative
    a = audit(jnp.linalg.norm, jnp.zeros(3))
    assert np.isnan(a.ad_jacobian).all()
    assert a.verdict is Verdict.SPURIOUS
    assert any(k.primitive == "norm" for k in a.active_kinks)


def test_softmax_max_shift_is_not_a_kink():
    # softmax subtracts stop_gradient(max(x)); ties in that max do not make f nonsmooth
    a = audit(lambda x: jax.nn.softmax(x), jnp.ones(3))
    assert a.verdict is Verdict.SMOOTH


def test_where_comparison_jump():
    assert audit(lambda x: jnp.where(x >= 0, 1.0, 0.0), jnp.zeros(1)).verdict is Verdict.NOT_LIPSCHITZ
    a = audit(lambda x: jnp.where(x >= 0, x, 0.0), jnp.zeros(1))
    assert a.verdict is Verdict.CLARKE and as_set(a.b_subdifferential) == {(0.0,), (1.0,)}


@pytest.mark.parametrize(
    "fn,x,expect",
    [
        (lambda x: jax.nn.leaky_relu(x, 0.1), 0.0, {(0.1,), (1.0,)}),
        (jax.nn.elu, 0.0, {(1.0,)}),
        (lambda x: jax.nn.elu(x, 0.5), 0.0, {(0.5,), (1.0,)}),
        (jax.nn.relu6, 6.0, {(0.0,), (1.0,)}),
        (jax.nn.hard_tanh, 1.0, {(0.0,), (1.0,)}),
        (jax.nn.hard_swish, -3.0, {(0.0,), (-0.5,)}),
        (jax.nn.hard_sigmoid, -3.0, {(0.0,), (1 / 6,)}),
    ],
    ids=["leaky", "elu", "elu05", "relu6", "hard_tanh", "hard_swish", "hard_sigmoid"],
)
def test_jax_activations(fn, x, expect):
    a = audit(fn, jnp.array([x]))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential, 6) == {tuple(np.round(e, 6)) for e in expect}


def test_trunc_written_as_select_is_continuous_at_zero():
    # jnp.trunc is where(x < 0, ceil(x), floor(x)): both jumps sit at 0 but on the side
    # the comparison discards, so f is continuous (constant) there
    a = audit(jnp.trunc, jnp.zeros(1))
    assert a.verdict in (Verdict.CLARKE, Verdict.SMOOTH)
    assert np.allclose(a.b_subdifferential, 0.0)


def test_unsupported_and_control_flow():
    a = audit(lambda x: jnp.fmod(x, 1.0), jnp.array([0.5]))
    assert a.verdict is Verdict.UNDECIDED and "rem" in a.reason
    b = audit(lambda x: lax.cond(x[0] > 0, lambda y: y, lambda y: -y, x), jnp.array([1.0]))
    assert b.verdict is Verdict.SMOOTH and b.ad_jacobian.tolist() == [[1.0]]  # control flow: test_jax_control.py

    def py_branch(x):
        if x[0] > 0:
            return x
        return -x

    c = audit(py_branch, jnp.array([1.0]))
    assert c.verdict is Verdict.UNDECIDED and "trace" in c.reason


def test_pytree_tuple_inputs():
    a = audit(lambda x, y: jnp.maximum(x, y), (jnp.ones(1), jnp.ones(1)))
    assert a.ad_jacobian.shape == (1, 2)
    assert as_set(a.b_subdifferential) == {(1.0, 0.0), (0.0, 1.0)}


# --------------------------------------------------------------------------- torch and jax agree


torch = pytest.importorskip("torch")

PAIRS = [
    ("relu-diff", lambda x: torch.relu(x) - torch.relu(-x), lambda x: jax.nn.relu(x) - jax.nn.relu(-x), [0.0, 1.0]),
    ("abs-sum", lambda x: torch.abs(x).sum().reshape(1), lambda x: jnp.abs(x).sum().reshape(1), [0.0, 0.0]),
    ("max-pair", lambda x: torch.maximum(x[:1], x[1:]), lambda x: jnp.maximum(x[:1], x[1:]), [1.0, 1.0]),
    ("sort", lambda x: torch.sort(x).values, jnp.sort, [1.0, 1.0]),
    ("clamp", lambda x: torch.clamp(x, 0.0, 1.0), lambda x: jnp.clip(x, 0.0, 1.0), [0.0, 1.0]),
    ("net", lambda x: torch.relu(torch.stack([x[0] - x[1], x[0] + x[1]])).sum().reshape(1),
     lambda x: jax.nn.relu(jnp.stack([x[0] - x[1], x[0] + x[1]])).sum().reshape(1), [1.0, 1.0]),
]


@pytest.mark.parametrize("name,ft,fj,x", PAIRS, ids=[p[0] for p in PAIRS])
def test_torch_and_jax_agree_on_the_clarke_jacobian(name, ft, fj, x):
    at = audit(ft, torch.tensor(x, dtype=torch.float64))
    aj = audit(fj, jnp.array(x))
    assert at.exact and aj.exact
    assert as_set(at.b_subdifferential) == as_set(aj.b_subdifferential)
    Ct = clarke_jacobian(ft, torch.tensor(x, dtype=torch.float64))
    assert as_set(Ct.vertices) == as_set(aj.b_subdifferential)
    M = np.array([[2.0, 1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(ld_jacobian(ft, torch.tensor(x, dtype=torch.float64), M),
                               ld_jacobian(fj, jnp.array(x), M), atol=1e-12)


def test_float64_input_made_under_scoped_x64():
    # float64 arrays exist only under x64; the engine traces and differentiates f in that
    # same scoped setting instead of failing on float32/float64 mixes
    with jax.enable_x64(True):
        x = jnp.zeros(1, dtype=jnp.float64)
    a = audit(lambda x: jax.nn.relu(x) - jax.nn.relu(-x), x)
    assert a.verdict is Verdict.SPURIOUS and a.dtype == "float64"
    b = audit(jnp.sort, x.at[0].set(1.0))
    assert b.verdict is Verdict.SMOOTH
    assert jnp.ones(1).dtype == jnp.float32 or jax.config.jax_enable_x64


def test_custom_vjp_body_is_analysed_while_ad_uses_the_custom_rule():
    @jax.custom_vjp
    def myrelu(x):
        return jnp.maximum(x, 0.0)

    myrelu.defvjp(lambda x: (myrelu(x), x), lambda x, g: (0.5 * g,))
    a = audit(lambda x: myrelu(x) - myrelu(-x), jnp.zeros(1))
    # the math is x (Clarke set {1}); the custom backward gives 0.5 + 0.5 = 1
    assert as_set(a.b_subdifferential) == {(1.0,)}
    assert a.ad_jacobian.tolist() == [[1.0]] and a.verdict is Verdict.CLARKE
    b = audit(lambda x: jax.lax.fori_loop(0, 2, lambda i, v: jnp.abs(v), x), jnp.zeros(1))
    assert b.verdict is Verdict.CLARKE and as_set(b.b_subdifferential) == {(-1.0,), (1.0,)}  # |(|x|)| at 0
