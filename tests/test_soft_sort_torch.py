"""soft_sort / soft_rank on torch tensors: the nonsmooth::soft_sort_rank custom op
(opcheck, gradcheck, gradgradcheck, torch.compile, torch.func), values against the certified
projection, gradients against float64 finite differences, dtypes, devices, errors."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nonsmooth.solvers import soft_rank, soft_sort  # noqa: E402
from nonsmooth.solvers import _soft_sort_torch  # noqa: E402,F401  (registers the ops)
from test_soft_sort_oracles import fd_jacobian, soft_rank_oracle, soft_sort_oracle  # noqa: E402

REGS = ["l2", "kl"]
DIRS = ["ascending", "descending"]
OPS = {"sort": soft_sort, "rank": soft_rank}
CASES = list(itertools.product(OPS, REGS, DIRS))


def _f(op, reg, direction, eps=0.7):
    return lambda x: OPS[op](x, regularization=reg, regularization_strength=eps,
                             direction=direction)


def _x(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_values_match_the_projection_oracle_and_numpy(op, reg, direction):
    x = _x(3, 5, seed=1)
    got = _f(op, reg, direction)(x)
    assert isinstance(got, torch.Tensor) and got.dtype == x.dtype and got.shape == x.shape
    oracle = soft_sort_oracle if op == "sort" else soft_rank_oracle
    for r in range(3):
        np.testing.assert_allclose(got[r].numpy(), oracle(x[r].numpy(), reg, 0.7, direction),
                                   atol=1e-12)
    np.testing.assert_array_equal(got.numpy(), _f(op, reg, direction)(x.numpy()))


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_gradcheck_and_gradgradcheck_float64(op, reg, direction):
    x = _x(2, 6, seed=2).requires_grad_()
    f = _f(op, reg, direction)
    assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_jacobian_matches_float64_finite_differences(op, reg, direction):
    x = _x(7, seed=3)
    f = _f(op, reg, direction, eps=1.3)
    fd = fd_jacobian(lambda v: f(np.asarray(v)), x.numpy())
    np.testing.assert_allclose(torch.func.jacrev(f)(x).numpy(), fd, atol=1e-6)
    np.testing.assert_allclose(torch.func.jacfwd(f)(x).numpy(), fd, atol=1e-6)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("rank", [True, False])
def test_opcheck(reg, rank):
    op = torch.ops.nonsmooth.soft_sort_rank.default
    for x in (_x(4, 6, seed=4), _x(2, 3, 5, seed=5), _x(6, seed=6).float()):
        torch.library.opcheck(op, (x, 0.5, reg, rank, False))
        torch.library.opcheck(op, (x.requires_grad_(), 0.5, reg, rank, True))


@pytest.mark.parametrize("op,reg", list(itertools.product(OPS, REGS)))
def test_torch_compile_fullgraph_matches_eager(op, reg):
    f = _f(op, reg, "ascending")
    loss = lambda x: (f(x) * torch.arange(x.shape[-1], dtype=x.dtype)).sum()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = _x(3, 8, seed=7)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss(xe).backward()
    value = compiled(xc)
    value.backward()
    torch.testing.assert_close(value, loss(x), rtol=0, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_with_peer_spellings():
    # fast-soft-sort's upper-case options trace like the lower-case ones.
    f = lambda x: soft_rank(x, regularization="KL", direction="DESCENDING",
                            regularization_strength=0.5)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = _x(2, 7, seed=11)
    torch.testing.assert_close(compiled(x), soft_rank(x, regularization="kl",
                                                      direction="descending",
                                                      regularization_strength=0.5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_vmap_and_grad(op, reg, direction):
    f = _f(op, reg, direction)
    x = _x(4, 3, 6, seed=8)
    for in_dims in (0, 1):
        xv = x.movedim(0, in_dims)
        got = torch.func.vmap(f, in_dims=in_dims)(xv)
        torch.testing.assert_close(got, torch.stack([f(x[i]) for i in range(4)]))
    weights = torch.linspace(-1, 2, 6, dtype=x.dtype)
    loss = lambda r: (f(r) * weights).sum()
    grads = torch.func.vmap(torch.func.grad(loss))(x[:, 0])
    for i in range(4):
        xi = x[i, 0].clone().requires_grad_()
        loss(xi).backward()
        torch.testing.assert_close(grads[i], xi.grad)


def test_backward_through_batch_shapes_and_non_contiguous_views():
    base = _x(6, 10, seed=9)
    view = base.t()[::2]  # (5, 6), non-contiguous
    assert not view.is_contiguous()
    for op, reg, direction in CASES:
        f = _f(op, reg, direction)
        a = view.clone().requires_grad_()
        b = view.contiguous().clone().requires_grad_()
        (f(a.t()[:, ::1].t()) ** 2).sum().backward()
        (f(b) ** 2).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
        x3 = _x(2, 3, 4, seed=10)
        torch.testing.assert_close(f(x3), f(x3.reshape(6, 4)).reshape(2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_computed_in_float32_and_cast_back(dtype):
    x = _x(3, 9, seed=11, dtype=dtype).requires_grad_()
    for op, reg, direction in CASES:
        out = _f(op, reg, direction)(x)
        assert out.dtype == dtype
        want = _f(op, reg, direction)(x.detach().float()).to(dtype)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        (g,) = torch.autograd.grad(out.float().sum(), x)
        assert g.dtype == dtype and torch.isfinite(g).all()


def test_kl_gradients_stay_finite_at_small_strength_in_float32():
    x = _x(4, 50, seed=12, dtype=torch.float32)
    x[:, 1] = x[:, 0]  # a tie makes a pooled block at every strength
    for op in OPS:
        for eps in (1e-2, 1e-3, 1e-4):
            xr = x.clone().requires_grad_()
            out = OPS[op](xr, regularization="kl", regularization_strength=eps)
            (out * torch.linspace(0, 1, 50)).sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all(), (op, eps)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_float32_func_jacobians_match_float64_finite_differences(op, reg, direction):
    # torch.func takes the differentiable torch-op backward, computed in float32 here.
    x = _x(9, seed=14)
    f = _f(op, reg, direction, eps=0.9)
    fd = fd_jacobian(lambda v: f(np.asarray(v)), x.numpy())
    for jac in (torch.func.jacrev(f), torch.func.jacfwd(f)):
        got = jac(x.float())
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), fd, atol=2e-5, rtol=1e-4)


def test_float32_gradients_agree_with_float64():
    x = _x(5, 30, seed=13)
    w = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for op, reg, direction in CASES:
        grads = []
        for dt in (torch.float64, torch.float32):
            xr = x.to(dt).detach().clone().requires_grad_()
            (_f(op, reg, direction, eps=0.5)(xr) * w.to(dt)).sum().backward()
            grads.append(xr.grad.double())
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="finite.*nan"):
        soft_rank(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="finite.*inf"):
        torch.compile(soft_sort, fullgraph=True, backend="aot_eager")(
            torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(TypeError, match="floating-point.*to\\(torch.float32\\)"):
        soft_rank(torch.arange(4))
    with pytest.raises(ValueError, match="0-d"):
        soft_sort(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        soft_sort(torch.empty(2, 0))
    with pytest.raises(ValueError, match="'entropic'"):
        soft_sort(torch.ones(3), regularization="entropic")
    with pytest.raises(ValueError, match="-0.5"):
        soft_rank(torch.ones(3), regularization_strength=-0.5)
    with pytest.raises(TypeError, match="regularization_strength"):
        soft_rank(torch.ones(3), regularization_strength=torch.tensor(1.0))
    assert soft_rank(torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip_matches_cpu():
    x = _x(4, 20, seed=14)
    for op, reg, direction in CASES:
        f = _f(op, reg, direction)
        xc = x.cuda().requires_grad_()
        out = f(xc)
        assert out.device == xc.device
        (out ** 2).sum().backward()
        xh = x.clone().requires_grad_()
        (f(xh) ** 2).sum().backward()
        torch.testing.assert_close(out.cpu(), f(x))
        torch.testing.assert_close(xc.grad.cpu(), xh.grad)


@pytest.mark.parametrize("op,reg,direction", CASES)
def test_numpy_backward_and_differentiable_torch_backward_agree(op, reg, direction):
    # create_graph=False runs the NumPy backward op, create_graph=True the torch-op one.
    f = _f(op, reg, direction, eps=0.4)
    g = _x(3, 9, seed=15)
    for eps_scale in (1.0, 1e-3):  # pooled blocks, then only singletons
        x = _x(3, 9, seed=16) / eps_scale
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ga,) = torch.autograd.grad(f(xa), xa, g)
        (gb,) = torch.autograd.grad(f(xb), xb, g, create_graph=True)
        torch.testing.assert_close(ga, gb.detach(), rtol=1e-12, atol=1e-12)
        ops = torch.ops.nonsmooth.soft_sort_rank_backward.default
        out, perm, block = torch.ops.nonsmooth.soft_sort_rank(x, 0.4, reg, op == "rank",
                                                              direction == "descending")
        torch.library.opcheck(ops, (x, perm, block, g, 0.4, reg, op == "rank",
                                    direction == "descending"))


def test_hard_regime_gradients_are_the_permutation_and_zero():
    x = torch.tensor([[3.0, -1.0, 7.0, 0.5]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 10.0, 100.0, 1000.0]], dtype=torch.float64)
    (g,) = torch.autograd.grad((soft_sort(x, regularization_strength=1e-3) * w).sum(), x)
    # ascending order of x is (-1, 0.5, 3, 7): x[1] gets w[0], x[3] w[1], x[0] w[2], x[2] w[3]
    torch.testing.assert_close(g, torch.tensor([[100.0, 1.0, 1000.0, 10.0]], dtype=torch.float64))
    (g,) = torch.autograd.grad((soft_rank(x, regularization_strength=1e-3) * w).sum(), x)
    torch.testing.assert_close(g, torch.zeros_like(g))


def test_backward_op_vmap_rule_matches_a_loop():
    bwd = torch.ops.nonsmooth.soft_sort_rank_backward
    x = _x(4, 2, 7, seed=17)
    g = _x(2, 7, seed=18)  # shared by the batch: in_dims None
    for rank, reg in itertools.product((True, False), REGS):
        _, perm, block = torch.ops.nonsmooth.soft_sort_rank(x, 0.6, reg, rank, False)
        got = torch.func.vmap(lambda a, p, b: bwd(a, p, b, g, 0.6, reg, rank, False))(
            x, perm, block)
        for i in range(4):
            torch.testing.assert_close(got[i], bwd(x[i], perm[i], block[i], g, 0.6, reg,
                                                   rank, False))
