"""The fused perturbed kernels (C) against independent oracles.

Oracles: Random123's published Philox-4x32-10 known-answer vectors and a pure-Python
Philox; long-double / float64 log, exp, sin, cos; the general stacked path of the layers
fed the *same* samples (bit-identical forward means, 1e-12 elsewhere, float64); closed
forms of the smoothed maps (Gumbel argmax = softmax, Gumbel top-k / rank / sort =
Plackett-Luce marginals enumerated exactly, normal argmax of two = Phi); float64 finite
differences of those exact maps for the gradients, with bounds of K standard errors.
"""
import itertools
import os
import math
import signal
import threading
import tracemalloc

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm

from nonsmooth.solvers import (argmax_onehot, fenchel_young_loss, hard_rank, perturbed,
                               perturbed_max, sort_permutation, topk_mask)
from nonsmooth.solvers import _fused

C = pytest.importorskip("nonsmooth.solvers._perturb_c")
K = 5.0  # standard errors allowed (fixed seeds: deterministic tests)
SOLVERS = {"argmax": (argmax_onehot, 1), "topk": (topk_mask(2), 2), "rank": (hard_rank, 0),
           "sortperm": (sort_permutation, 0)}


def spec(name, n, sigma, noise="gumbel", cv=False, output="mean"):
    return _fused.Spec(name, SOLVERS[name][1], n, sigma, noise, cv, output)


# ----------------------------------------------------------------------------- generator


def philox_ref(key, ctr):
    """Philox-4x32-10 written from the Random123 paper (Salmon et al., SC 2011)."""
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    x = list(ctr)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [((p1 >> 32) ^ x[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ x[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return x


@pytest.mark.parametrize("key, ctr, expected", [
    # Random123 kat_vectors, philox4x32 10 (key words listed low first there)
    (0, [0, 0, 0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ((1 << 64) - 1, [0xFFFFFFFF] * 4, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ((0x299F31D0 << 32) | 0xA4093822, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(key, ctr, expected):
    out = np.empty((1, 4), np.uint32)
    C.philox(key, np.array([ctr], np.uint32), out)
    assert out[0].tolist() == expected
    assert philox_ref(key, ctr) == expected


def test_noise_is_philox_words_through_the_documented_transforms():
    """Element (sample i, row b, column j) takes word j % 4 of counter (j // 4, b, i, 0);
    Gumbel E = -log U, Z = -log E; normal Z = sqrt(-2 log U(w0)) (cos, sin)(2 pi U'(w1))."""
    key, N, B, d = 0xDEADBEEF12345, 3, 2, 7
    words = np.empty((N, B, d), np.uint64)
    for i, b, j in itertools.product(range(N), range(B), range(d)):
        words[i, b, j] = philox_ref(key, [j // 4, b, i, 0])[j % 4]
    u64 = (words.astype(np.float64) + 0.5) * 2.0**-32
    Z, E = _fused.noise(key, N, (B, d), noise="gumbel")
    np.testing.assert_allclose(E, -np.log(u64), rtol=4e-16)
    np.testing.assert_allclose(Z, -np.log(-np.log(u64)), rtol=1e-14, atol=1e-15)
    Zn, En = _fused.noise(key, N, (B, d), noise="normal")
    assert En is None
    for j in range(0, d, 2):
        r = np.sqrt(-2 * np.log(u64[..., j]))
        a = 2 * np.pi * u64[..., j + 1] if j + 1 < d else None
        if a is not None:
            np.testing.assert_allclose(Zn[..., j], r * np.cos(a), rtol=1e-13, atol=1e-14)
            np.testing.assert_allclose(Zn[..., j + 1], r * np.sin(a), rtol=1e-13, atol=1e-14)
    # float32 uniforms use the top 23 bits: exact, never 0 or 1
    u32 = ((words >> 9).astype(np.float64) + 0.5) * 2.0**-23
    Z32, E32 = _fused.noise(key, N, (B, d), noise="gumbel", dtype=np.float32)
    np.testing.assert_allclose(E32, -np.log(u32), rtol=2e-7)


def test_noise_distribution_and_independence():
    from scipy.stats import gumbel_r, kstest

    for noise, law in (("gumbel", gumbel_r.cdf), ("normal", norm.cdf)):
        for dtype in (np.float64, np.float32):
            Z, _ = _fused.noise(3, 20000, (1, 3), noise=noise, dtype=dtype)
            Z = Z.astype(np.float64)
            for col in range(3):
                assert kstest(Z[:, 0, col], law).pvalue > 1e-3
            assert abs(np.corrcoef(Z[:, 0, 0], Z[:, 0, 1])[0, 1]) < K / math.sqrt(20000)
            assert np.isfinite(Z).all()


# ----------------------------------------------------------------------------- elementwise math


def ulps(ours, ref, dtype):
    ours = ours.astype(np.float64)
    return np.abs(ours - ref) / np.spacing(np.abs(ours).astype(dtype)).astype(np.float64)


def test_log_float32_within_one_ulp_on_every_uniform_and_on_the_e_range():
    m = np.arange(2**23, dtype=np.float64)
    u = ((m + 0.5) * 2.0**-23).astype(np.float32)  # every float32 uniform the kernel makes
    out = np.empty_like(u)
    C.math(0, u, out)
    assert ulps(out, np.log(u.astype(np.float64)), np.float32).max() <= 1.0
    x = np.exp2(np.random.default_rng(0).uniform(-26, 5, 2_000_000)).astype(np.float32)
    out = np.empty_like(x)
    C.math(0, x, out)  # E = -log U lies in [2^-25, 17]
    assert ulps(out, np.log(x.astype(np.float64)), np.float32).max() <= 1.0


def test_log_exp_sincos_float64_within_one_or_two_ulp_of_long_double():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64)
    u = (w.astype(np.float64) + 0.5) * 2.0**-32
    x = np.concatenate([u, np.exp2(rng.uniform(-34, 5, 1_000_000))])
    out = np.empty_like(x)
    C.math(0, x, out)
    assert ulps(out, np.log(x.astype(np.longdouble)), np.float64).max() <= 1.0
    e = rng.uniform(0, 600, 1_000_000)
    out = np.empty_like(e)
    C.math(3, e, out)
    assert ulps(out, np.exp(e.astype(np.longdouble)), np.float64).max() <= 2.0
    angle = 2 * np.pi * (w.astype(np.longdouble) + 0.5) / 2**32
    for which, fn in ((1, np.cos), (2, np.sin)):
        out = np.empty(len(w))
        C.math(which, w.astype(np.uint32), out)
        assert np.abs(out - fn(angle)).max() <= 2 * np.finfo(np.float64).eps
        out32 = np.empty(len(w), np.float32)
        C.math(which, w.astype(np.uint32), out32)
        ang32 = 2 * np.pi * ((w >> 8).astype(np.float64) + 0.5) / 2**24
        assert np.abs(out32 - fn(ang32)).max() <= 2 * np.finfo(np.float32).eps


# ----------------------------------------------------------------------------- fused vs stacked


def stacked_numpy(name, theta, Z, E, sigma, noise, cv, g, v):
    """The general stacked estimator written out on the given samples (NumPy)."""
    solver = SOLVERS[name][0]
    P = theta + sigma * Z
    Y = solver(P)
    N, B = Z.shape[:2]
    score = 1 - E if noise == "gumbel" else Z
    y0 = solver(theta)
    w = (Y * g).reshape(N, B, -1).sum(-1)
    if cv:
        w = w - (y0 * g).reshape(B, -1).sum(-1)
    t = np.einsum("nbd,bd->nb", score, v)
    Yc = Y - y0[None] if cv else Y
    value = (Y * P).sum(-1).mean(0) if name != "sortperm" else None
    return (Y.mean(0), value, np.einsum("nb,nbd->bd", w, score) / (N * sigma),
            np.einsum("nb,nb...->b...", t, Yc) / (N * sigma))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("noise", ["gumbel", "normal"])
@pytest.mark.parametrize("cv", [False, True])
def test_fused_equals_stacked_on_the_same_samples(name, noise, cv):
    rng = np.random.default_rng(hash((name, noise, cv)) % 2**32)
    B, d, N, sigma, key = 3, 6, 257, 0.4, 1234567
    theta = rng.normal(size=(B, d))
    theta[0, 4] = theta[0, 1]  # a tie in theta
    theta[2] *= 300.0  # a row too spread out for the Gumbel ratio scores
    Z, E = _fused.noise(key, N, (B, d), noise=noise)
    sp = spec(name, N, sigma, noise, cv)
    out_event = sp.out_event(d)
    g = rng.normal(size=(B,) + out_event)
    v = rng.normal(size=(B, d))
    mean_ref, value_ref, grad_ref, jvp_ref = stacked_numpy(name, theta, Z, E, sigma, noise, cv,
                                                           g, v)
    mean, value = _fused.forward_numpy(theta, key, sp)
    np.testing.assert_array_equal(mean, mean_ref)  # integer counts / N: bit for bit
    if value_ref is not None:
        np.testing.assert_allclose(value, value_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_fused.vjp_numpy(theta, g[None], key, sp)[0], grad_ref,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_fused.jvp_numpy(theta, v[None], key, sp)[0], jvp_ref,
                               rtol=1e-12, atol=1e-12)


def test_torch_and_jax_layers_equal_the_general_path_fed_the_same_samples():
    """The layers' own stacked code (solver call, mean, score-function estimator) with
    fused=False draws the fused kernel's samples from the same key: the two paths agree."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")

    rng = np.random.default_rng(5)
    theta = rng.normal(size=(4, 5))
    g = rng.normal(size=(4, 5))
    for solver, noise, cv in ((argmax_onehot, "gumbel", False), (topk_mask(2), "normal", True),
                              (hard_rank, "gumbel", True)):
        kw = dict(num_samples=300, sigma=0.3, noise=noise, control_variate=cv, seed=11)
        fused_layer, general = perturbed(solver, **kw), perturbed(solver, fused=False, **kw)
        t1 = torch.tensor(theta, requires_grad=True)
        y1 = fused_layer(t1)
        y1.backward(torch.tensor(g))
        t2 = torch.tensor(theta, requires_grad=True)
        y2 = general(t2)
        y2.backward(torch.tensor(g))
        np.testing.assert_allclose(y1.detach().numpy(), y2.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(t1.grad.numpy(), t2.grad.numpy(), rtol=1e-12, atol=1e-12)

        with jax.enable_x64(True):
            jkey = jax.random.PRNGKey(11)
            f1 = lambda t: (fused_layer(t, key=jkey) * g).sum()  # noqa: E731
            f2 = lambda t: (general(t, key=jkey) * g).sum()  # noqa: E731
            val1, grad1 = jax.value_and_grad(f1)(jax.numpy.asarray(theta))
            val2, grad2 = jax.value_and_grad(f2)(jax.numpy.asarray(theta))
            np.testing.assert_allclose(val1, val2, rtol=1e-12)
            np.testing.assert_allclose(grad1, grad2, rtol=1e-12, atol=1e-12)


def test_one_key_gives_the_same_samples_in_numpy_torch_and_jax():
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from nonsmooth.solvers import _fused_torch

    theta = np.random.default_rng(2).normal(size=(3, 8))
    seed = 77
    for solver in (argmax_onehot, topk_mask(3), hard_rank, sort_permutation):
        layer = perturbed(solver, num_samples=100, sigma=0.5, seed=seed)
        y_np = layer(theta)
        name, k = _fused.solver_spec(solver)
        y_t, _ = _fused_torch._forward_op(torch.tensor(theta), torch.tensor([seed]), name, k,
                                          100, 0.5, "gumbel", False, False)
        with jax.enable_x64(True):
            y_j = np.asarray(layer(jax.numpy.asarray(theta)))  # default key PRNGKey(seed)
        np.testing.assert_array_equal(y_np, y_t.numpy())
        np.testing.assert_array_equal(y_np, y_j)


# ----------------------------------------------------------------------------- closed forms


def plackett_luce(theta, sigma):
    """Exact law of the order of theta + sigma * Gumbel: P(order) = prod softmax over the rest.

    Returns E[top-k mask] for every k, E[rank] (ascending) and E[sort permutation]."""
    d = len(theta)
    w = np.exp(theta / sigma)
    topk = np.zeros((d + 1, d))
    rank = np.zeros(d)
    perm = np.zeros((d, d))
    for order in itertools.permutations(range(d)):  # order[0] = largest
        p, rest = 1.0, w.sum()
        for j in order:
            p *= w[j] / rest
            rest -= w[j]
        for k in range(1, d + 1):
            topk[k, list(order[:k])] += p
        asc = order[::-1]
        for pos, j in enumerate(asc):
            rank[j] += p * (pos + 1)
            perm[pos, j] += p
    return topk, rank, perm


def test_gumbel_closed_forms_within_standard_errors():
    theta = np.array([0.3, -0.5, 1.0, 0.2])
    sigma, N = 0.7, 40000
    topk, rank, perm = plackett_luce(theta, sigma)
    for dtype in (np.float64, np.float32):
        th = theta.astype(dtype)[None]
        y = _fused.forward_numpy(th, 3, spec("argmax", N, sigma))[0][0]
        p = softmax(theta / sigma)
        assert (np.abs(y - p) <= K * np.sqrt(p * (1 - p) / N)).all()
        y = _fused.forward_numpy(th, 4, _fused.Spec("topk", 2, N, sigma, "gumbel", False,
                                                    "mean"))[0][0]
        assert (np.abs(y - topk[2]) <= K * np.sqrt(topk[2] * (1 - topk[2]) / N)).all()
        y = _fused.forward_numpy(th, 5, spec("sortperm", N, sigma))[0][0]
        assert (np.abs(y - perm) <= K * np.sqrt(perm * (1 - perm) / N) + 1e-12).all()
        y = _fused.forward_numpy(th, 6, spec("rank", N, sigma))[0][0]
        var = (np.arange(1, 5)[:, None] ** 2 * perm).sum(0) - rank ** 2
        assert (np.abs(y - rank) <= K * np.sqrt(var / N)).all()
        # perturbed max: sigma logsumexp(theta / sigma) + sigma * Euler's gamma
        val = _fused.forward_numpy(th, 7, spec("argmax", N, sigma, output="value"))[1][0]
        exact = sigma * np.log(np.exp(theta / sigma).sum()) + sigma * np.euler_gamma
        assert abs(val - exact) <= K * sigma * math.pi / math.sqrt(6 * N)


def test_normal_argmax_of_two_is_phi():
    theta = np.array([[0.2, -0.1], [0.0, 0.0], [-1.0, 0.5]])
    sigma, N = 0.6, 40000
    y = _fused.forward_numpy(theta, 9, spec("argmax", N, sigma, "normal"))[0][:, 0]
    p = norm.cdf((theta[:, 0] - theta[:, 1]) / (sigma * math.sqrt(2)))
    assert (np.abs(y - p) <= K * np.sqrt(p * (1 - p) / N)).all()


def replicate_jacobians(sp, theta, R, key):
    """R independent Jacobian estimates: R copies of theta are R rows with their own noise."""
    d = theta.shape[-1]
    rows = np.tile(theta, (R, 1))
    L = math.prod(sp.out_event(d))
    eye = np.eye(d)
    # jvp with the d basis tangents in one call: (d, R, *event) -> J[r, :, j]
    V = np.broadcast_to(eye[:, None, :], (d, R, d))
    Jf = _fused.jvp_numpy(rows, np.ascontiguousarray(V), key, sp).reshape(d, R, L)
    Jf = Jf.transpose(1, 2, 0)
    G = np.broadcast_to(np.eye(L)[:, None, :], (L, R, L)).reshape((L, R) + sp.out_event(d))
    Jr = _fused.vjp_numpy(rows, np.ascontiguousarray(G), key, sp).transpose(1, 0, 2)
    return Jf, Jr


def fd_jacobian(f, theta, h=1e-6):
    cols = []
    for j in range(len(theta)):
        e = np.zeros_like(theta)
        e[j] = h
        cols.append((np.ravel(f(theta + e)) - np.ravel(f(theta - e))) / (2 * h))
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("name, cv", [("argmax", False), ("argmax", True), ("topk", True),
                                      ("rank", False), ("sortperm", True)])
def test_gumbel_jacobian_estimates_match_finite_differences_of_the_exact_map(name, cv):
    theta = np.array([0.3, -0.5, 1.0, 0.2])
    sigma, R, N = 0.7, 200, 400
    exact_map = {"argmax": lambda t: softmax(t / sigma),
                 "topk": lambda t: plackett_luce(t, sigma)[0][2],
                 "rank": lambda t: plackett_luce(t, sigma)[1],
                 "sortperm": lambda t: plackett_luce(t, sigma)[2]}[name]
    J_exact = fd_jacobian(exact_map, theta)
    Jf, Jr = replicate_jacobians(spec(name, N, sigma, cv=cv), theta, R, key=21)
    np.testing.assert_allclose(Jf, Jr, rtol=1e-10, atol=1e-12)  # same samples, J v and J^T g
    mean, se = Jf.mean(0), Jf.std(0, ddof=1) / np.sqrt(R)
    assert (np.abs(mean - J_exact) <= K * se + 1e-9).all(), np.abs(mean - J_exact) / se


def test_normal_jacobian_matches_finite_differences_of_phi():
    theta = np.array([0.2, -0.1])
    sigma, R, N = 0.6, 300, 300
    f = lambda t: np.array([norm.cdf((t[0] - t[1]) / (sigma * math.sqrt(2))),
                            norm.cdf((t[1] - t[0]) / (sigma * math.sqrt(2)))])
    Jf, _ = replicate_jacobians(spec("argmax", N, sigma, "normal"), theta, R, key=8)
    mean, se = Jf.mean(0), Jf.std(0, ddof=1) / np.sqrt(R)
    assert (np.abs(mean - fd_jacobian(f, theta)) <= K * se).all()


# ----------------------------------------------------------------------------- frameworks


def test_torch_layers_gradients_and_second_order():
    torch = pytest.importorskip("torch")
    theta = torch.tensor([[0.3, -0.5, 1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    fmax = perturbed_max(argmax_onehot, num_samples=2000, sigma=0.7, seed=3)
    F = fmax(theta, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(F.sum(), theta, create_graph=True)
    y = perturbed(argmax_onehot, num_samples=2000, sigma=0.7)(
        theta, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(grad.detach().numpy(), y.detach().numpy())
    # Hessian of F_sigma = the perturbed Jacobian estimate (same samples)
    H = torch.stack([torch.autograd.grad(grad[0, i], theta, retain_graph=True)[0][0]
                     for i in range(4)])
    Jr = torch.stack([torch.autograd.grad(y[0, i], theta, retain_graph=True)[0][0]
                      for i in range(4)])
    np.testing.assert_allclose(H.numpy(), Jr.numpy(), rtol=1e-12, atol=1e-14)
    # the mean's own second derivative is not implemented: it raises, never returns zeros
    (gy,) = torch.autograd.grad(y.sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(gy.sum(), theta)


def test_torch_compile_and_float32():
    torch = pytest.importorskip("torch")
    layer = perturbed(topk_mask(2), num_samples=50, sigma=0.5)
    theta = torch.randn(3, 6, requires_grad=True)
    f = torch.compile(lambda t, k: torch.ops.nonsmooth.perturbed_fused(
        t, k, "topk", 2, 50, 0.5, "gumbel", False, False)[0], backend="aot_eager")
    key = torch.tensor([99])
    y = f(theta, key)
    y.sum().backward()
    ref, _ = _fused.forward_numpy(theta.detach().numpy(), 99, _fused.Spec(
        "topk", 2, 50, 0.5, "gumbel", False, "mean"))
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    assert theta.grad.dtype == torch.float32 and torch.isfinite(theta.grad).all()
    assert layer(theta).dtype == torch.float32


def test_jax_mean_hessian_raises_and_value_hessian_is_the_jacobian():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    layer = perturbed(hard_rank, num_samples=300, sigma=0.5)
    fmax = perturbed_max(hard_rank, num_samples=300, sigma=0.5)
    t = jnp.asarray([0.3, -0.1, 0.4])
    key = jax.random.PRNGKey(4)
    J = jax.jacrev(lambda x: layer(x, key=key))(t)
    np.testing.assert_allclose(jax.jacfwd(lambda x: layer(x, key=key))(t), J, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(jax.hessian(lambda x: fmax(x, key=key))(t), J, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.jacfwd(jax.jacrev(lambda x: layer(x, key=key)))(t)
    # vmap over keys: each row of the batch with its own key equals the unbatched call
    keys = jax.random.split(key, 3)
    vm = jax.vmap(lambda k: layer(t, key=k))(keys)
    np.testing.assert_array_equal(vm[2], layer(t, key=keys[2]))


def test_fenchel_young_through_the_fused_kernel():
    torch = pytest.importorskip("torch")
    theta = torch.tensor(np.random.default_rng(1).normal(size=(4, 5)), requires_grad=True)
    target = argmax_onehot(torch.randn(4, 5, dtype=torch.float64))
    loss = fenchel_young_loss(topk_mask(2), num_samples=300, sigma=0.5, seed=8)
    (g,) = torch.autograd.grad(loss(theta, target).sum(), theta)
    y = perturbed(topk_mask(2), num_samples=300, sigma=0.5, seed=8)(theta).detach()
    np.testing.assert_allclose(g.numpy(), (y - target).numpy(), atol=1e-15)


# ----------------------------------------------------------------------------- memory and threads


def test_extra_memory_does_not_grow_with_the_number_of_samples():
    theta = np.random.default_rng(0).normal(size=(16, 50))
    g = np.ones((1, 16, 50))
    peaks = []
    for N in (64, 6400):
        sp = spec("argmax", N, 0.1)
        _fused.forward_numpy(theta, 1, sp)  # warm up
        tracemalloc.start()  # also traces the kernel's PyMem_RawMalloc scratch
        _fused.forward_numpy(theta, 1, sp, n_threads=1)
        _fused.vjp_numpy(theta, g, 1, sp, n_threads=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] == peaks[0], peaks
    assert peaks[1] < 40 * theta.nbytes, peaks  # O(B d), far below N B d


def test_results_do_not_depend_on_the_thread_count():
    theta = np.random.default_rng(3).normal(size=(37, 20))
    g = np.random.default_rng(4).normal(size=(1, 37, 20))
    for name in ("argmax", "rank"):
        sp = spec(name, 500, 0.3)
        ref = _fused.forward_numpy(theta, 5, sp, n_threads=1)[0], \
            _fused.vjp_numpy(theta, g, 5, sp, n_threads=1)
        for nt in (2, 3, 64):
            np.testing.assert_array_equal(_fused.forward_numpy(theta, 5, sp, n_threads=nt)[0],
                                          ref[0])
            np.testing.assert_array_equal(_fused.vjp_numpy(theta, g, 5, sp, n_threads=nt),
                                          ref[1])
    # concurrent calls from Python threads (the GIL is released) agree too
    sp = spec("argmax", 3000, 0.3)
    expect = _fused.forward_numpy(theta, 6, sp)[0]
    results = [None] * 4

    def work(i):
        results[i] = _fused.forward_numpy(theta, 6, sp, n_threads=2)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expect)


# ----------------------------------------------------------------------------- bad input


def run_args(theta, **kw):
    a = dict(mode=0, aux=None, out=np.empty(theta.shape if theta.ndim == 2 else (1, 1)),
             value=None, key=1, n=10, sigma=0.5, noise=0, solver=0, k=1, cv=False, nt=1)
    a.update(kw)
    return (a["mode"], theta, a["aux"], a["out"], a["value"], a["key"], a["n"], a["sigma"],
            a["noise"], a["solver"], a["k"], a["cv"], a["nt"])


@pytest.mark.parametrize("kw, err, match", [
    (dict(sigma=-1.0), ValueError, "sigma must be a finite number > 0, got -1.0"),
    (dict(sigma=float("nan")), ValueError, "sigma must be a finite number > 0, got nan"),
    (dict(n=0), ValueError, r"n_samples must be in \[1, 2\*\*32\).*got 0"),
    (dict(n=2**32), ValueError, r"n_samples must be in \[1, 2\*\*32\)"),
    (dict(nt=0), ValueError, "n_threads must be >= 1, got 0"),
    (dict(key=-1), ValueError, r"key must be an int in \[0, 2\*\*64\), got -1"),
    (dict(key=1.5), TypeError, "key must be an int"),
    (dict(mode=7), ValueError, "mode must be 0"),
    (dict(solver=9), ValueError, "solver must be 0..3, got 9"),
    (dict(noise=5), ValueError, "noise must be 0 .gumbel. or 1 .normal., got 5"),
    (dict(solver=1, k=9), ValueError, r"k must be in \[1, 4\], got 9"),
    (dict(out=np.empty((3, 5))), ValueError, "out has shape"),
    (dict(out=np.empty((3, 4), np.float32)), TypeError, "out must hold native float64"),
    (dict(value=np.empty(3), solver=3, out=np.empty((3, 16))), ValueError,
     "value needs a solver whose output has theta's shape"),
])
def test_kernel_rejects_bad_arguments_before_writing(kw, err, match):
    theta = np.zeros((3, 4))
    with pytest.raises(err, match=match):
        C.run(*run_args(theta, **kw))


def test_kernel_rejects_bad_arrays():
    theta = np.zeros((3, 4))
    with pytest.raises(TypeError, match="theta must hold native float32 or float64"):
        C.run(*run_args(np.zeros((3, 4), np.int64)))
    with pytest.raises(TypeError, match="theta must hold native float32 or float64"):
        C.run(*run_args(np.zeros((3, 4), np.float16)))
    with pytest.raises(ValueError, match="theta must be C-contiguous"):
        C.run(*run_args(np.zeros((4, 3)).T))
    with pytest.raises(ValueError, match="theta must be 2-D"):
        C.run(*run_args(np.zeros(4)))
    with pytest.raises(TypeError, match="buffer protocol"):
        C.run(*run_args(np.zeros((1, 1)), out=np.empty((1, 1)))[:1], [[0.0]],
              *run_args(np.zeros((1, 1)), out=np.empty((1, 1)))[2:])
    ro = np.empty((3, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        C.run(*run_args(theta, out=ro))
    with pytest.raises(ValueError, match="theta must have at least one column"):
        C.run(*run_args(np.zeros((3, 0)), out=np.empty((3, 0))))
    # nothing to do for an empty batch
    assert C.run(*run_args(np.zeros((0, 4)), out=np.empty((0, 4)))) == 0


def test_non_finite_theta_and_overflow_are_statuses_with_nothing_written():
    for bad in (np.nan, np.inf):
        theta = np.zeros((2, 3))
        theta[1, 2] = bad
        out = np.full((2, 3), 7.0)
        assert C.run(*run_args(theta, out=out)) == 1
        assert (out == 7.0).all()
        with pytest.raises(ValueError, match=f"non-finite value \\({float(bad)!r} at flat index 5"):
            _fused.forward_numpy(theta, 1, spec("argmax", 10, 0.5))
    theta = np.full((1, 3), 3e38, np.float32)
    assert C.run(*run_args(theta, out=np.empty((1, 3), np.float32))) == 2
    with pytest.raises(ValueError, match="overflows float32"):
        _fused.forward_numpy(theta, 1, spec("argmax", 10, 0.5))
    with pytest.raises(ValueError, match="overflows float64"):
        _fused.forward_numpy(np.zeros((1, 3)), 1, spec("argmax", 10, 1e307))


def test_layers_handle_odd_inputs():
    torch = pytest.importorskip("torch")
    layer = perturbed(argmax_onehot, num_samples=20, sigma=0.5)
    # non-contiguous and 3-D batches go through the fused op
    t = torch.randn(5, 4, dtype=torch.float64).t()
    assert layer(t).shape == (4, 5)
    t3 = torch.randn(2, 3, 4, dtype=torch.float64)
    assert layer(t3).shape == (2, 3, 4)
    # float16 keeps the stacked path (no fused float16 kernel), with the same contract
    assert layer(torch.randn(2, 4).half()).dtype == torch.float16
    # a user's own solver keeps the stacked path
    assert _fused.solver_spec(lambda x: x) is None
    # top-k with k > d: the solver's own error
    with pytest.raises(ValueError, match="needs at least k entries"):
        perturbed(topk_mask(5), num_samples=3)(torch.zeros(2, 3))


def test_a_huge_number_of_samples_is_interruptible():
    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Stop):
            _fused.forward_numpy(np.zeros((1, 1000)), 1, spec("argmax", 2**32 - 1, 0.5),
                                 n_threads=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_sanitized_build_runs_the_stress_script_clean(tmp_path):
    """ASan + UBSan (+ LeakSanitizer on the kernel's frames): build a sanitized copy of
    the kernel, run tests/_fused_stress.py against it, and require a clean exit."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    libs = [subprocess.run([gcc, f"-print-file-name={n}"], capture_output=True,
                           text=True).stdout.strip() for n in ("libasan.so", "libubsan.so")]
    if not all(Path(p).is_file() for p in libs):
        pytest.skip("libasan/libubsan not installed")
    here = Path(__file__).resolve().parent
    src = here.parent / "solvers" / "_perturb_kernels.c"
    so = tmp_path / "_perturb_c.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-g", "-std=c99", "-fno-math-errno",
                    "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-pthread",
                    f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(so)],
                   check=True)
    env = {**os.environ, "LD_PRELOAD": " ".join(libs), "PYTHONMALLOC": "malloc",
           "ASAN_OPTIONS": "detect_leaks=1:exitcode=0", "UBSAN_OPTIONS": "halt_on_error=1"}
    res = subprocess.run([sys.executable, str(here / "_fused_stress.py"), str(so)],
                         capture_output=True, text=True, env=env, timeout=600)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report[-3000:]
    assert "stress:" in res.stdout
    assert "runtime error" not in report and "ERROR: AddressSanitizer" not in report
    # the interpreter leaks a little at exit; nothing may be allocated by the kernel
    assert "_perturb_kernels.c" not in report, report[-3000:]


def test_torch_func_grad_jacrev_and_hessian():
    torch = pytest.importorskip("torch")
    layer = perturbed(hard_rank, num_samples=200, sigma=0.5)
    fmax = perturbed_max(hard_rank, num_samples=200, sigma=0.5)
    t = torch.tensor([0.3, -0.1, 0.4, 0.0], dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(5)
    J = torch.func.jacrev(lambda x: layer(x, generator=gen()))(t)
    tt = t.clone().requires_grad_()
    y = layer(tt, generator=gen())
    J_autograd = torch.stack([torch.autograd.grad(y[i], tt, retain_graph=True)[0]
                              for i in range(4)])
    np.testing.assert_allclose(J.numpy(), J_autograd.numpy(), rtol=1e-12, atol=1e-14)
    g = torch.func.grad(lambda x: fmax(x, generator=gen()))(t)
    np.testing.assert_array_equal(g.numpy(), y.detach().numpy())
    H = torch.func.jacrev(torch.func.grad(lambda x: fmax(x, generator=gen())))(t)
    np.testing.assert_allclose(H.numpy(), J.numpy(), rtol=1e-12, atol=1e-14)
    # under torch.func the layer takes the general path (same samples), which has second
    # derivatives; in eager mode the fused kernel raises on them instead
    H2 = torch.func.jacrev(torch.func.grad(lambda x: layer(x, generator=gen())[0]))(t)
    assert torch.isfinite(H2).all()
    tt = t.clone().requires_grad_()
    (g1,) = torch.autograd.grad(layer(tt, generator=gen())[0], tt, create_graph=True)
    with pytest.raises(RuntimeError, match="fused=False"):
        torch.autograd.grad(g1.sum(), tt)
