"""The fused C soft sort/rank kernels against the NumPy pipeline and direct oracles."""
import itertools

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import rankdata

from nonsmooth.solvers import _isotonic
from nonsmooth.solvers import _soft_sort_core as core

ext = _isotonic._ext
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "soft_forward"),
                                reason="C extension not built")

CASES = list(itertools.product(("rank", "sort"), ("l2", "kl"), (False, True)))


def _fused(x, op, reg, eps, desc):
    out = np.empty_like(x)
    perm = np.empty(x.shape, np.int64)
    block = np.empty(x.shape, np.int64)
    status = ext.soft_forward(x, out, perm, block, op == "rank", reg == "kl", eps, desc)
    return status, out, perm, block


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", [1e-3, 0.3, 1.0, 50.0])
def test_fused_forward_and_vjp_match_the_numpy_pipeline(dtype, eps):
    rng = np.random.default_rng(1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-4)
    for shape in [(1, 1), (3, 2), (5, 7), (4, 100), (2, 3000)]:
        x = rng.normal(size=shape).astype(dtype) * dtype(3.0)
        if shape[1] > 3:
            x[:, 2] = x[:, 0]  # ties
        for op, reg, desc in CASES:
            kw = dict(op=op, regularization=reg, strength=eps, descending=desc)
            status, out, perm, block = _fused(x, op, reg, eps, desc)
            assert status == 0
            want, want_perm, want_block = core._forward_rows_numpy(x, **kw)
            np.testing.assert_allclose(out, want, **tol)
            np.testing.assert_array_equal(block, want_block)
            # perm sorts alpha * x descending (ties may be ordered either way)
            u = core.alpha(op, eps, desc) * np.take_along_axis(x.astype(float), perm, -1)
            assert np.all(np.diff(u, axis=-1) <= 0)
            assert np.array_equal(np.sort(perm, -1), np.broadcast_to(np.arange(shape[1]), shape))
            g = rng.normal(size=shape).astype(dtype)
            dx = np.empty_like(x)
            ext.soft_backward(x, perm, block, g, dx, op == "rank", reg == "kl", eps, desc)
            np.testing.assert_allclose(dx, core._vjp_rows_numpy(x, perm, block, g, **kw),
                                       **tol)


@pytest.mark.parametrize("n", [10, 1000, 70000])
def test_keys_sharing_their_top_bytes_are_fully_sorted(n):
    # Values equal in their top 40+ bits defeat the partial radix; the full pass must
    # take over and still give the exact order and exact hard ranks.
    rng = np.random.default_rng(2)
    x = np.stack([1.0 + rng.permutation(n) * 2.0 ** -50, -1.0 - rng.permutation(n) * 2.0 ** -50])
    for desc in (False, True):
        status, out, perm, _ = _fused(x, "rank", "l2", 2.0 ** -52, desc)
        assert status == 0
        np.testing.assert_array_equal(out, np.apply_along_axis(rankdata, -1, -x if desc else x))
        status, out, _, _ = _fused(x, "sort", "l2", 1e-9, desc)
        np.testing.assert_array_equal(out, -np.sort(-x, -1) if desc else np.sort(x, -1))
    # float32: keys equal in their top 24 bits (values 1 + k 2^-23, k < 2^8, shuffled)
    x32 = (1.0 + np.stack([rng.permutation(n) % 256, rng.permutation(n) % 256])
           * 2.0 ** -23).astype(np.float32)
    for desc in (False, True):
        status, out, perm, _ = _fused(x32, "sort", "l2", 1e-3, desc)
        assert status == 0
        want = -np.sort(-x32, -1) if desc else np.sort(x32, -1)
        np.testing.assert_array_equal(out, want)
        # ties keep the input order (a stable sort)
        got = np.take_along_axis(x32, perm, -1)
        np.testing.assert_array_equal(got, want)
        for r in range(2):
            for v in np.unique(x32[r])[:5]:
                pos = perm[r][got[r] == v]
                assert np.all(np.diff(pos) > 0)


def test_ties_and_signed_zeros_keep_the_input_order():
    x = np.array([[0.0, -0.0, 1.0, 1.0, -2.0, 0.0]])
    status, out, perm, _ = _fused(x, "rank", "l2", 1e-3, False)
    assert status == 0
    np.testing.assert_array_equal(out, rankdata(x, axis=-1))


def test_kl_pooling_of_long_blocks_matches_the_closed_form():
    # One block of everything (huge eps): the KL rank is sum(rho) softmax(x / eps), the
    # KL projection of e^{x/eps} onto P(rho) when no other constraint is active.
    x = np.random.default_rng(3).normal(size=(1, 500))
    eps = 1e4
    for desc in (False, True):
        _, out, perm, block = _fused(x, "rank", "kl", eps, desc)
        assert np.all(block == 0)
        z = (-x if desc else x) / eps
        want = 500 * 501 / 2 * np.exp(z - logsumexp(z))
        np.testing.assert_allclose(out, want, rtol=1e-13)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_returns_a_status_and_writes_nothing(bad):
    x = np.zeros((2, 5))
    x[1, 3] = bad
    out = np.full_like(x, 7.0)
    perm = np.full(x.shape, -1, np.int64)
    block = np.full(x.shape, -1, np.int64)
    assert ext.soft_forward(x, out, perm, block, True, False, 1.0, False) == 1
    assert np.all(out == 7.0) and np.all(perm == -1) and np.all(block == -1)
    with pytest.raises(ValueError, match=r"must be finite.*row 1, position 3"):
        core.forward_checked(x, op="rank", regularization="l2", strength=1.0, descending=False)


def test_overflowing_scale_returns_a_status():
    x = np.full((1, 3), 1e300)
    o, p, b = np.empty_like(x), np.empty(x.shape, np.int64), np.empty(x.shape, np.int64)
    assert ext.soft_forward(x, o, p, b, True, False, 1e-10, False) == 2
    with pytest.raises(ValueError, match="overflows float64"):
        core.forward_checked(x, op="rank", regularization="l2", strength=1e-10,
                             descending=False)


def test_bad_buffers_are_refused_before_any_work():
    x = np.zeros((2, 4))
    o, p, b = np.empty_like(x), np.empty(x.shape, np.int64), np.empty(x.shape, np.int64)
    with pytest.raises(TypeError, match="out must be float64, got float32"):
        ext.soft_forward(x, o.astype(np.float32), p, b, True, False, 1.0, False)
    with pytest.raises(ValueError, match=r"perm must have shape \(2, 4\)"):
        ext.soft_forward(x, o, p[:, :3].copy(), b, True, False, 1.0, False)
    with pytest.raises(ValueError, match="C-contiguous"):
        ext.soft_forward(np.zeros((4, 2)).T, o, p, b, True, False, 1.0, False)
    with pytest.raises(ValueError, match="writable"):
        ro = np.empty_like(x)
        ro.flags.writeable = False
        ext.soft_forward(x, ro, p, b, True, False, 1.0, False)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ext.soft_forward(x, o, p, b, True, False, 0.0, False)
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        ext.soft_forward(p, o, p, b, True, False, 1.0, False)
    bad_perm = np.zeros(x.shape, np.int64)
    bad_perm[1, 2] = 4
    with pytest.raises(ValueError, match=r"perm must hold column indices in \[0, 4\), got 4"):
        ext.soft_backward(x, bad_perm, b, x, o, True, True, 1.0, False)
    with pytest.raises(TypeError, match="g must be float64, got float32"):
        ext.soft_backward(x, p, b, x.astype(np.float32), o, True, True, 1.0, False)


def test_vjp_against_float64_finite_differences_on_a_large_row():
    # Many pooled blocks at n = 300: <g, (f(x + h t) - f(x - h t)) / 2h> = <J^T g, t>.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 300))
    t, g = rng.normal(size=(2, 1, 300))
    h = 1e-6
    for op, reg, desc in CASES:
        # L2 rank pools gaps below eps, KL rank gaps below eps log((k+1)/k), sort gaps
        # above 1 / eps: a mix of singletons and pooled blocks here
        eps = {"rank": 0.004 if reg == "l2" else 0.3, "sort": 50.0}[op]
        kw = dict(op=op, regularization=reg, strength=eps, descending=desc)
        _, perm, block = core.forward_checked(x, **kw)
        assert 10 < len(np.unique(block)) < 290  # some pooling happens
        vg = core.vjp_rows(x, perm, block, g, **kw)
        fp = core.forward_checked(x + h * t, **kw)[0]
        fm = core.forward_checked(x - h * t, **kw)[0]
        assert np.sum(g * (fp - fm) / (2 * h)) == pytest.approx(np.sum(vg * t), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_fast_path_matches_the_differentiable_torch_backward(dtype):
    # Plain contiguous CPU tensors take the lean autograd.Function (C forward and
    # backward); create_graph=True takes the torch-op backward. Both must agree, also for
    # a non-contiguous input (which takes the general path) and any batch shape.
    torch = pytest.importorskip("torch")
    from nonsmooth.solvers import soft_rank, soft_sort
    from nonsmooth.solvers._soft_sort_torch import _SoftSortRankCPU

    dt = getattr(torch, dtype)
    x = torch.randn(3, 2, 40, dtype=dt, generator=torch.Generator().manual_seed(5))
    g = torch.randn(3, 2, 40, dtype=dt, generator=torch.Generator().manual_seed(6))
    for f in (soft_rank, soft_sort):
        for reg in ("l2", "kl"):
            kw = dict(regularization=reg, regularization_strength=0.2)
            xa = x.clone().requires_grad_()
            ya = f(xa, **kw)
            assert type(ya.grad_fn).__name__ == _SoftSortRankCPU.__name__ + "Backward"
            (fast,) = torch.autograd.grad(ya, xa, g)
            xb = x.clone().requires_grad_()
            (slow,) = torch.autograd.grad(f(xb, **kw), xb, g, create_graph=True)
            tol = 1e-12 if dtype == "float64" else 1e-5
            torch.testing.assert_close(fast, slow.detach(), atol=tol, rtol=tol)
            xt = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
            assert not xt.is_contiguous()
            yt = f(xt, **kw)
            torch.testing.assert_close(yt, ya.detach(), atol=0, rtol=0)
            (gt,) = torch.autograd.grad(yt, xt, g)
            torch.testing.assert_close(gt, fast, atol=tol, rtol=tol)


def test_torch_fast_path_rejects_nan_before_the_kernel():
    torch = pytest.importorskip("torch")
    from nonsmooth.solvers import soft_rank

    x = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"must be finite.*nan at row 1, position 4"):
        soft_rank(x)


def test_torch_no_grad_path_and_forward_ad_dual_tensors():
    # Without a graph the fast path skips autograd entirely; a dual tensor (forward AD,
    # no requires_grad) must still get its tangent J t, checked against the dense
    # Jacobian of the NumPy pipeline.
    torch = pytest.importorskip("torch")
    import torch.autograd.forward_ad as fwAD
    from nonsmooth.solvers import soft_rank, soft_sort

    x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for f, op in ((soft_rank, "rank"), (soft_sort, "sort")):
        for reg in ("l2", "kl"):
            kw = dict(regularization=reg, regularization_strength=0.3)
            with torch.no_grad():
                plain = f(x, **kw)
            assert plain.grad_fn is None
            x2 = x.numpy()
            ckw = dict(op=op, regularization=reg, strength=0.3, descending=False)
            want, perm, block = core._forward_rows_numpy(x2, **ckw)
            np.testing.assert_allclose(plain.numpy(), want, atol=1e-12)
            with fwAD.dual_level():
                y = f(fwAD.make_dual(x, t), **kw)
                tangent = fwAD.unpack_dual(y).tangent
            jac = core.jacobian_rows(x2, perm, block, **ckw)
            np.testing.assert_allclose(tangent.numpy(), np.einsum("rij,rj->ri", jac, t.numpy()),
                                       atol=1e-12)


def test_public_functions_agree_with_and_without_the_fused_kernel(monkeypatch):
    # Installs without the C build run the NumPy pipeline through the same entry points.
    from nonsmooth.solvers import soft_rank, soft_sort

    x = np.random.default_rng(10).normal(size=(3, 50))
    x[:, 5] = x[:, 9]
    kws = [dict(regularization=r, regularization_strength=e, direction=d)
           for r in ("l2", "kl") for e in (0.05, 1.0) for d in ("ascending", "descending")]
    fused = [(soft_rank(x, **kw), soft_sort(x, **kw)) for kw in kws]
    monkeypatch.setattr(core, "_FUSED", False)
    for kw, (rank, sort) in zip(kws, fused):
        np.testing.assert_allclose(soft_rank(x, **kw), rank, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(soft_sort(x, **kw), sort, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="must be finite"):
        soft_rank(np.array([1.0, np.nan]))


@pytest.mark.parametrize("eps", [1e-3, 0.05, 1.0, 1e4])
def test_kl_forward_weights_are_the_block_softmax(eps):
    # The KL forward can hand its block softmax to the backward; it must equal
    # softmax(u_B) computed directly (NumPy's block_weights), and the backward given it
    # must equal the backward that recomputes it.
    rng = np.random.default_rng(12)
    x = rng.normal(size=(5, 400))
    x[:, 3] = x[:, 7]
    for op, desc in itertools.product(("rank", "sort"), (False, True)):
        o, p, b = np.empty_like(x), np.empty(x.shape, np.int64), np.empty(x.shape, np.int64)
        w = np.empty(x.shape)
        assert ext.soft_forward(x, o, p, b, op == "rank", True, eps, desc, w) == 0
        want = core.block_weights(x, p, b, op=op, regularization="kl", strength=eps,
                                  descending=desc)
        np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-300)
        g = rng.normal(size=x.shape)
        d1, d2 = np.empty_like(x), np.empty_like(x)
        ext.soft_backward(x, p, b, g, d1, op == "rank", True, eps, desc)
        ext.soft_backward(x, p, b, g, d2, op == "rank", True, eps, desc, w)
        np.testing.assert_allclose(d2, d1, rtol=1e-11, atol=1e-11 * np.abs(d1).max())


def test_weights_buffers_are_checked():
    x = np.zeros((2, 4))
    o, p, b = np.empty_like(x), np.empty(x.shape, np.int64), np.empty(x.shape, np.int64)
    with pytest.raises(ValueError, match="weights are only computed for kl"):
        ext.soft_forward(x, o, p, b, True, False, 1.0, False, np.empty(x.shape))
    with pytest.raises(TypeError, match="weights must be float64, got float32"):
        ext.soft_forward(x, o, p, b, True, True, 1.0, False, np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 4\)"):
        ext.soft_forward(x, o, p, b, True, True, 1.0, False, np.empty((2, 3)))
    ext.soft_forward(x, o, p, b, True, True, 1.0, False)
    with pytest.raises(ValueError, match="weights are only used for kl"):
        ext.soft_backward(x, p, b, x, o, True, False, 1.0, False, np.empty(x.shape))


@pytest.mark.parametrize("shape", [(13,), (3, 13), (2, 2, 13)])
def test_torch_lean_path_float32_kl_backward_matches_float64_finite_differences(shape):
    # float32 KL reuses the forward's float64 block softmax in the backward (no exp
    # recomputed); the vector-Jacobian product must match central differences of the
    # float64 NumPy pipeline at strengths with pooled blocks and with singletons, and
    # for 1-D and 3-D inputs (the lean path reshapes to rows and back).
    torch = pytest.importorskip("torch")
    from nonsmooth.solvers import soft_rank, soft_sort

    gen = np.random.default_rng(21)
    x64 = gen.normal(size=shape)
    g64 = gen.normal(size=shape)
    for f, op in ((soft_rank, "rank"), (soft_sort, "sort")):
        for eps in (3.0, 0.5, 0.05):
            def ref(v, op=op, eps=eps):
                rows = v.reshape(-1, shape[-1])
                return core._forward_rows_numpy(rows, op=op, regularization="kl",
                                                strength=eps, descending=False)[0]
            h = 1e-6
            fd = np.empty(x64.size)
            for k in range(x64.size):
                d = np.zeros(x64.size)
                d[k] = h
                d = d.reshape(shape)
                fd[k] = np.sum((ref(x64 + d) - ref(x64 - d)).reshape(shape) * g64) / (2 * h)
            x = torch.tensor(x64, dtype=torch.float32, requires_grad=True)
            y = f(x, regularization="kl", regularization_strength=eps)
            assert y.shape == x.shape and y.dtype == torch.float32
            (y * torch.tensor(g64, dtype=torch.float32)).sum().backward()
            np.testing.assert_allclose(x.grad.numpy().ravel(), fd, rtol=2e-3,
                                       atol=2e-3 * np.abs(fd).max())


def test_torch_lean_path_rejects_in_place_change_before_backward():
    # The backward reads x through a NumPy view; autograd's version check must still
    # catch an in-place edit between forward and backward instead of a wrong gradient.
    torch = pytest.importorskip("torch")
    from nonsmooth.solvers import soft_rank

    leaf = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    x = leaf * 1.0
    y = soft_rank(x, regularization="kl")
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kl_rows_on_both_sides_of_the_shared_exp_spread_limit(dtype):
    # A KL row whose scaled values spread less than 600 pools with exps taken once
    # against the row's max; a wider row pools with one exp per merge. Rows of one batch
    # on either side of the limit (and at it) must both match the NumPy pipeline, and
    # their forward softmax weights must match the directly computed block softmax.
    rng = np.random.default_rng(21)
    base = rng.normal(size=(1, 300))
    base = (base - base.min()) / (base.max() - base.min())  # spread exactly 1
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-3)
    for op, desc in itertools.product(("rank", "sort"), (False, True)):
        eps = 1.0 if op == "rank" else 3.0  # rank scales x by 1/eps, sort does not
        spreads = [1.0, 599.0, 600.0, 601.0, 2000.0]
        x = np.concatenate([base * sp for sp in spreads]).astype(dtype)
        x[:, 5] = x[:, 9]  # ties
        kw = dict(op=op, regularization="kl", strength=eps, descending=desc)
        o, p, b = np.empty_like(x), np.empty(x.shape, np.int64), np.empty(x.shape, np.int64)
        w = np.empty(x.shape)
        assert ext.soft_forward(x, o, p, b, op == "rank", True, eps, desc, w) == 0
        want, _, want_block = core._forward_rows_numpy(x, **kw)
        np.testing.assert_allclose(o, want, **tol)
        np.testing.assert_array_equal(b, want_block)
        assert np.any(b[:, 1:] != np.arange(1, 300))  # some rows pool, so it is exercised
        want_w = core.block_weights(x, p, b, **kw)
        np.testing.assert_allclose(w, want_w, rtol=1e-12 if dtype == np.float64 else 1e-5,
                                   atol=1e-300)
        g = rng.normal(size=x.shape).astype(dtype)
        dx = np.empty_like(x)
        ext.soft_backward(x, p, b, g, dx, op == "rank", True, eps, desc, w)
        np.testing.assert_allclose(dx, core._vjp_rows_numpy(x, p, b, g, **kw), **tol)
