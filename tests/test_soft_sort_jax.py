"""soft_sort / soft_rank on jax arrays: custom_jvp around pure_callback; jit, vmap, grad,
jacfwd, jacrev and check_grads, against the certified projection and float64 finite
differences, and agreement with NumPy and torch."""
import itertools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from nonsmooth.solvers import soft_rank, soft_sort  # noqa: E402
from test_soft_sort_oracles import fd_jacobian, soft_rank_oracle, soft_sort_oracle  # noqa: E402

REGS = ["l2", "kl"]
DIRS = ["ascending", "descending"]
OPS = {"sort": soft_sort, "rank": soft_rank}
CASES = list(itertools.product(OPS, REGS, DIRS))


@pytest.fixture
def x64():
    """float64 for this test only; restores the user's setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _f(op, reg, direction, eps=0.7):
    return lambda x: OPS[op](x, regularization=reg, regularization_strength=eps,
                             direction=direction)


def _x(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape) * 2


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_values_match_the_oracle_and_numpy_under_jit(x64, op, reg, direction):
    x = _x(3, 5, seed=1)
    f = _f(op, reg, direction)
    got = jax.jit(f)(jnp.asarray(x))
    assert isinstance(got, jax.Array) and got.dtype == jnp.float64 and got.shape == x.shape
    oracle = soft_sort_oracle if op == "sort" else soft_rank_oracle
    for r in range(3):
        np.testing.assert_allclose(np.asarray(got[r]), oracle(x[r], reg, 0.7, direction),
                                   atol=1e-12)
    np.testing.assert_array_equal(np.asarray(got), f(x))


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_check_grads_both_modes(x64, op, reg, direction):
    x = jnp.asarray(_x(2, 6, seed=2))
    check_grads(_f(op, reg, direction), (x,), order=1, modes=("fwd", "rev"))
    check_grads(_f(op, reg, direction), (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_jacobians_match_float64_finite_differences(x64, op, reg, direction):
    x = _x(7, seed=3)
    f = _f(op, reg, direction, eps=1.3)
    fd = fd_jacobian(lambda v: f(np.asarray(v)), x)
    for jac in (jax.jacfwd(f), jax.jacrev(f), jax.jit(jax.jacrev(f))):
        np.testing.assert_allclose(np.asarray(jac(jnp.asarray(x))), fd, atol=1e-6)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_vmap_of_grad_matches_rows(x64, op, reg, direction):
    f = _f(op, reg, direction)
    x = jnp.asarray(_x(4, 3, 6, seed=4))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(f(x)))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=1, out_axes=1)(x)),
                                  np.asarray(f(x)))
    w = jnp.linspace(-1, 2, 6)
    loss = lambda r: jnp.sum(f(r) * w)
    batched = jax.jit(jax.vmap(jax.vmap(jax.grad(loss))))(x)
    for i, j in np.ndindex(4, 3):
        np.testing.assert_allclose(np.asarray(batched[i, j]), np.asarray(jax.grad(loss)(x[i, j])),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_float32_jacobians_match_float64_finite_differences(op, reg, direction):
    # jax_enable_x64 off: the tangent rule runs in float32.
    x = _x(9, seed=8)
    f = _f(op, reg, direction, eps=0.9)
    fd = fd_jacobian(lambda v: f(np.asarray(v)), x)
    xf = jnp.asarray(x, dtype=jnp.float32)
    for jac in (jax.jacfwd(f), jax.jit(jax.jacrev(f))):
        got = jac(xf)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), fd, atol=2e-5, rtol=1e-4)
    out = jax.jit(lambda v: soft_rank(v, regularization="KL", direction="DESCENDING"))(xf)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(soft_rank(xf, regularization="kl",
                                                       direction="descending")))


def test_float32_default_and_low_precision():
    # jax_enable_x64 off (the default): float32 in, float32 out, finite KL gradients at 1e-4.
    x = jnp.asarray(_x(4, 40, seed=5), dtype=jnp.float32)
    x = x.at[:, 1].set(x[:, 0])
    for op, reg, direction in CASES:
        out = _f(op, reg, direction, eps=0.5)(x)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out),
                                   _f(op, reg, direction, eps=0.5)(np.asarray(x, np.float64)),
                                   rtol=2e-5, atol=2e-4)
    for op in OPS:
        for eps in (1e-2, 1e-4):
            g = jax.grad(lambda r: jnp.sum(_f(op, "kl", "ascending", eps)(r)
                                           * jnp.linspace(0, 1, 40)))(x)
            assert jnp.isfinite(g).all(), (op, eps)
    for dtype in (jnp.float16, jnp.bfloat16):
        xh = x.astype(dtype)
        out = soft_rank(xh, regularization_strength=0.5)
        assert out.dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(out, np.float32),
            np.asarray(soft_rank(xh.astype(jnp.float32), regularization_strength=0.5)
                       .astype(dtype), np.float32))


def test_torch_jax_numpy_agree_on_values_and_gradients(x64):
    torch = pytest.importorskip("torch")
    x = _x(3, 8, seed=6)
    w = _x(3, 8, seed=7)
    for op, reg, direction in CASES:
        f = _f(op, reg, direction)
        xt = torch.tensor(x, requires_grad=True)
        out_t = f(xt)
        (out_t * torch.tensor(w)).sum().backward()
        out_j, vjp = jax.vjp(f, jnp.asarray(x))
        (g_j,) = vjp(jnp.asarray(w))
        np.testing.assert_allclose(out_t.detach().numpy(), f(x), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(out_j), f(x), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(g_j), xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="finite.*nan"):
        soft_rank(jnp.array([1.0, jnp.nan]))
    with pytest.raises(Exception, match="finite"):  # raised in the callback under jit
        jax.block_until_ready(jax.jit(soft_sort)(jnp.array([1.0, jnp.inf])))
    with pytest.raises(TypeError, match="floating-point.*astype"):
        soft_rank(jnp.arange(4))
    with pytest.raises(ValueError, match="0-d"):
        soft_sort(jnp.float32(1.0) * jnp.ones(()))
    with pytest.raises(ValueError, match="empty"):
        soft_sort(jnp.ones((2, 0)))
    with pytest.raises(ValueError, match="'sideways'"):
        soft_sort(jnp.ones(3), direction="sideways")
    with pytest.raises(ValueError, match="regularization_strength.*0.0"):
        soft_rank(jnp.ones(3), regularization_strength=0.0)


def test_x64_setting_is_left_alone():
    before = jax.config.jax_enable_x64
    soft_rank(jnp.arange(4.0))
    assert jax.config.jax_enable_x64 == before
