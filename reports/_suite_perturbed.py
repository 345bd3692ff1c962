"""Report suite: perturbed optimizers, SPO+ and surrogate backward passes against closed forms.

Every Monte-Carlo check compares an estimate with its closed form in units of the
estimator's own standard error (a z-score) at a fixed seed, so "passed" means "no
bias visible at this sample size", and the Monte-Carlo error is shown shrinking like
1/sqrt(N) on a log-log plot.  Second derivatives (jax.hessian, torch.func.hessian) are
checked the same way: they once were silently zero.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import time

import numpy as np

from ._suite import Check, Figure, SuiteResult, Table

GAMMA = 0.5772156649015329
Z_MAX = 5.0
THETA = np.array([0.3, -0.5, 1.0, 0.2, -0.1])
SIGMA = 0.5


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _forward_checks(N, rows):
    """Closed forms of the forward pass, framework-free (numpy path of the layers)."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    from nonsmooth.solvers import argmax_onehot, perturbed, perturbed_max

    checks = []
    p = _softmax(THETA / SIGMA)
    y = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=1)(THETA)
    z = float(np.max(np.abs(y - p) / np.sqrt(p * (1 - p) / N)))
    checks.append(Check("Gumbel-perturbed argmax = softmax(theta/sigma)", z <= Z_MAX,
                        f"max |z| = {z:.2f} over {len(p)} coordinates (bound {Z_MAX})",
                        {"max_z": z, "N": N, "estimate": y, "exact": p}))
    rows.append(["argmax (Gumbel)", np.round(y, 4).tolist(), np.round(p, 4).tolist(), round(z, 2)])

    F = float(perturbed_max(argmax_onehot, num_samples=N, sigma=SIGMA, seed=2)(THETA))
    exact = SIGMA * logsumexp(THETA / SIGMA) + SIGMA * GAMMA
    z = abs(F - exact) / (SIGMA * math.pi / math.sqrt(6 * N))
    checks.append(Check("Gumbel-perturbed max = sigma logsumexp(theta/sigma) + sigma gamma",
                        z <= Z_MAX, f"|z| = {z:.2f}", {"z": z, "estimate": F, "exact": exact}))
    rows.append(["max (Gumbel)", round(F, 5), round(exact, 5), round(z, 2)])

    def sign(x):
        return np.where(x >= 0, 1.0, -1.0)

    t = np.array([[-0.4], [0.0], [0.1], [0.7]])
    m = 2 * norm.cdf(t[:, 0] / SIGMA) - 1
    ys = perturbed(sign, num_samples=N, sigma=SIGMA, noise="normal", seed=3)(t)[:, 0]
    z = float(np.max(np.abs(ys - m) / np.sqrt((1 - m ** 2) / N)))
    checks.append(Check("normal-perturbed sign = 2 Phi(theta/sigma) - 1", z <= Z_MAX,
                        f"max |z| = {z:.2f}", {"max_z": z, "estimate": ys, "exact": m}))
    rows.append(["sign (normal)", np.round(ys, 4).tolist(), np.round(m, 4).tolist(), round(z, 2)])
    return checks


def _mc_figure(R, Ns):
    """RMS error of R independent estimates per N; slope of log error vs log N."""
    from nonsmooth.solvers import argmax_onehot, perturbed

    p = _softmax(THETA / SIGMA)
    theta = np.tile(THETA, (R, 1))
    rms = []
    for N in Ns:
        y = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=N)(theta)
        rms.append(float(np.sqrt(((y - p) ** 2).sum(-1).mean())))
    theory = [float(np.sqrt((p * (1 - p)).sum() / N)) for N in Ns]
    slope = float(np.polyfit(np.log(Ns), np.log(rms), 1)[0])
    fig = Figure("Monte-Carlo error of the Gumbel-perturbed argmax against the number of samples", "line",
                 list(Ns), {"measured RMS error": rms, "theory sqrt(sum p(1-p) / N)": theory},
                 xlabel="N (samples)", ylabel="RMS error over replicates", logx=True, logy=True, headline=True,
                 caption=f"{R} independent estimates per N of softmax(theta/sigma), sigma = {SIGMA}; the "
                         f"measured error follows the 1/sqrt(N) law (fitted log-log slope {slope:.3f}).")
    ok = abs(slope + 0.5) < 0.1
    check = Check("Monte-Carlo error shrinks like 1/sqrt(N)", ok,
                  f"log-log slope {slope:.3f} (expected -0.5 +- 0.1), {R} replicates per N",
                  {"slope": slope, "N": list(Ns), "rms": rms, "theory": theory})
    return check, fig


def _gradient_checks(R, N):
    import torch

    from nonsmooth.solvers import (argmax_onehot, fenchel_young_loss, perturbed,
                                   perturbed_max)

    checks = []
    p = _softmax(THETA / SIGMA)
    exact = (np.diag(p) - np.outer(p, p)) / SIGMA
    t = torch.tensor(np.tile(THETA, (R, 1)), requires_grad=True)
    y = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=4)(t)
    J = np.stack([torch.autograd.grad(y[:, i].sum(), t, retain_graph=True)[0].numpy()
                  for i in range(len(THETA))], axis=1)
    se = J.std(0, ddof=1) / math.sqrt(R)
    z = float(np.max(np.abs(J.mean(0) - exact) / np.maximum(se, 1e-300)))
    checks.append(Check("Jacobian of Gumbel-perturbed argmax = (diag p - p p^T)/sigma",
                        z <= Z_MAX, f"max |z| = {z:.2f} over {R} replicates of N = {N}",
                        {"max_z": z, "mean_jacobian": J.mean(0), "exact": exact}))

    theta = torch.tensor(np.random.default_rng(0).normal(size=(4, 6)), requires_grad=True)
    F = perturbed_max(argmax_onehot, num_samples=N, sigma=SIGMA, seed=7)(theta)
    (g,) = torch.autograd.grad(F.sum(), theta)
    ys = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=7)(theta).detach()
    d = float((g - ys).abs().max())
    checks.append(Check("grad perturbed_max = perturbed argmax (same samples)", d == 0.0,
                        f"max |difference| = {d:g}", {"max_abs_diff": d}))

    target = torch.eye(6, dtype=torch.float64)[:4]
    loss = fenchel_young_loss(argmax_onehot, num_samples=N, sigma=SIGMA, seed=8)
    (g,) = torch.autograd.grad(loss(theta, target).sum(), theta)
    ys = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, seed=8)(theta).detach()
    d = float((g - (ys - target)).abs().max())
    checks.append(Check("Fenchel-Young gradient = y_sigma - y", d <= 1e-12,
                        f"max |difference| = {d:g}", {"max_abs_diff": d}))
    return checks


def _jax_checks(R, N):
    """The jax adapter (custom_jvp under jit) against the same closed forms."""
    import jax
    import jax.numpy as jnp

    from nonsmooth.solvers import argmax_onehot, perturbed, perturbed_max

    p = _softmax(THETA / SIGMA)
    exact = (np.diag(p) - np.outer(p, p)) / SIGMA
    layer = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA)
    t = jnp.asarray(np.tile(THETA, (R, 1)), jnp.float32)
    key = jax.random.PRNGKey(3)
    J = np.asarray(jax.jit(jax.jacrev(lambda x: layer(x, key=key).sum(0)))(t)).transpose(1, 0, 2)
    se = J.std(0, ddof=1) / math.sqrt(R)
    z = float(np.max(np.abs(J.mean(0) - exact) / np.maximum(se, 1e-30)))
    checks = [Check("jax (jit, custom_jvp): Jacobian of Gumbel-perturbed argmax = softmax Jacobian",
                    z <= Z_MAX, f"max |z| = {z:.2f} over {R} replicates of N = {N}",
                    {"max_z": z})]
    fmax = perturbed_max(argmax_onehot, num_samples=N, sigma=SIGMA)
    x = jnp.asarray(THETA, jnp.float32)
    g = jax.grad(lambda v: fmax(v, key=key))(x)
    d = float(jnp.max(jnp.abs(g - layer(x, key=key))))
    checks.append(Check("jax: grad perturbed_max = perturbed argmax (same key)", d <= 1e-6,
                        f"max |difference| = {d:g}", {"max_abs_diff": d}))
    return checks


def _replicate_z(est, exact):
    est = np.asarray(est, np.float64)
    se = est.std(0, ddof=1) / math.sqrt(est.shape[0])
    return float(np.max(np.abs(est.mean(0) - exact) / np.maximum(se, 1e-12)))


def _second_order_checks(R, N, have_torch, have_jax):
    """Hessians of perturbed layers against I and the softmax second derivative."""
    from nonsmooth.solvers import argmax_onehot, perturbed

    def half_sq(X):
        return 0.5 * (X ** 2).sum(-1)

    theta3 = np.array([0.3, -0.2, 0.5])
    p = _softmax(THETA / SIGMA)
    J = (np.diag(p) - np.outer(p, p)) / SIGMA
    eye = np.eye(len(p))
    H_exact = (J[:, None, :] * (eye - p[None, :])[:, :, None]
               - p[:, None, None] * J[None, :, :]) / SIGMA
    checks = []
    if have_torch:
        import torch

        layer = perturbed(half_sq, num_samples=N, sigma=SIGMA, control_variate=True, seed=11,
                          batched=True)
        H = torch.func.vmap(torch.func.hessian(layer))(
            torch.tensor(np.tile(theta3, (R, 1)))).numpy()
        z = _replicate_z(H, np.eye(3))
        checks.append(Check("torch.func.hessian of perturbed |x|^2/2 = I (optax's own test case)",
                            z <= Z_MAX, f"max |z| = {z:.2f} over {R} replicates of N = {N}",
                            {"max_z": z, "mean_hessian": H.mean(0)}))
    if have_jax:
        import jax
        import jax.numpy as jnp

        layer = perturbed(half_sq, num_samples=N, sigma=SIGMA, control_variate=True,
                          batched=True)
        keys = jax.random.split(jax.random.PRNGKey(11), R)
        H = np.asarray(jax.jit(jax.vmap(lambda k: jax.hessian(lambda t: layer(t, key=k))(
            jnp.asarray(theta3, jnp.float32))))(keys))
        z = _replicate_z(H, np.eye(3))
        checks.append(Check("jax.hessian of perturbed |x|^2/2 = I (was silently 0)",
                            z <= Z_MAX, f"max |z| = {z:.2f} over {R} replicates of N = {N}",
                            {"max_z": z, "mean_hessian": H.mean(0)}))
        # second derivatives of the mean: the general path (the fused kernel raises on them)
        soft = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA, control_variate=True, fused=False)
        T = np.asarray(jax.jit(jax.vmap(lambda k: jax.hessian(lambda t: soft(t, key=k))(
            jnp.asarray(THETA, jnp.float32))))(keys))
        z = _replicate_z(T, H_exact)
        checks.append(Check("jax.hessian of Gumbel-perturbed argmax = softmax second derivative",
                            z <= Z_MAX, f"max |z| = {z:.2f} over {len(p) ** 3} entries",
                            {"max_z": z}))
    return checks


def _spo_and_edge_checks(n):
    """SPO+ against its hand-derived value; the edge shortest path against SciPy."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    from nonsmooth.solvers import shortest_path_edges, spo_plus_loss

    def argmin_onehot(c):
        return np.eye(c.shape[-1])[np.argmin(c, -1)]

    argmin_onehot.sense = "min"
    argmin_onehot.batched = True
    value = float(spo_plus_loss(argmin_onehot)(np.array([3.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0])))
    checks = [Check("SPO+ = hand-derived value (c = (1,2,3), c_hat = (3,0,1): 7)", value == 7.0,
                    f"loss = {value:g}", {"loss": value})]
    try:
        import torch

        p = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
        spo_plus_loss(argmin_onehot_t)(p, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).backward()
        g = p.grad.numpy()
        ok = bool(np.array_equal(g, [2.0, -2.0, 0.0]))
        checks.append(Check("SPO+ subgradient = 2 (w*(c) - w*(2 c_hat - c)) = (2, -2, 0)", ok,
                            f"torch gradient {g.tolist()}", {"gradient": g}))
    except ImportError:
        pass
    sp = shortest_path_edges((5, 5))
    rng = np.random.default_rng(12)
    costs = rng.uniform(0.1, 5.0, size=(n, sp.num_edges))
    paths = sp(costs)
    tails, heads = zip(*sp.arcs)
    worst = 0.0
    for b in range(n):
        G = csr_matrix((costs[b], (tails, heads)), shape=(25, 25))
        worst = max(worst, abs(float(paths[b] @ costs[b]) - dijkstra(G, indices=0)[24]))
    checks.append(Check("shortest_path_edges cost = SciPy Dijkstra (PyEPO's 5x5 grid, 40 arcs)",
                        worst <= 1e-9, f"{n} grids, worst cost difference {worst:g}",
                        {"grids": n, "worst_abs_diff": worst}))
    return checks


def argmin_onehot_t(c):
    import torch

    return torch.nn.functional.one_hot(c.argmin(-1), c.shape[-1]).to(c.dtype)


argmin_onehot_t.sense = "min"
argmin_onehot_t.batched = True


def _surrogate_checks():
    import torch

    from nonsmooth.solvers import (argmax_onehot, blackbox_backward, identity_backward,
                                   shortest_path_grid)

    rng = np.random.default_rng(5)
    costs = rng.uniform(0.5, 2.0, size=(8, 12, 12))
    G = rng.normal(size=(8, 12, 12))
    checks = []
    w = torch.tensor(costs, requires_grad=True)
    (d,) = torch.autograd.grad(identity_backward(shortest_path_grid, projection="mean")(w), w,
                               torch.tensor(G))
    ref = -(G - G.mean(axis=(1, 2), keepdims=True))
    err = float(np.abs(d.numpy() - ref).max())
    checks.append(Check("identity backward (mean projection) = -(g - mean g) for a minimizer",
                        err <= 1e-12, f"max |difference| = {err:g}", {"max_abs_diff": err}))
    lam = 5.0
    (d,) = torch.autograd.grad(blackbox_backward(shortest_path_grid, lambda_=lam)(w), w,
                               torch.tensor(G))
    ref = (shortest_path_grid(costs + lam * G) - shortest_path_grid(costs)) / lam
    err = float(np.abs(d.numpy() - ref).max())
    checks.append(Check("blackbox backward = (y(w + lambda g) - y(w)) / lambda", err <= 1e-12,
                        f"max |difference| = {err:g}", {"max_abs_diff": err}))
    # Sanity: one step against the blackbox direction never increases <y, g> for argmax
    # (the step moves theta exactly to the interpolation point theta - lambda g).
    theta = rng.normal(size=(200, 6))
    gg = rng.normal(size=(200, 6))
    t = torch.tensor(theta, requires_grad=True)
    (d,) = torch.autograd.grad(blackbox_backward(argmax_onehot, lambda_=lam)(t), t, torch.tensor(gg))
    before = (argmax_onehot(theta) * gg).sum(-1)
    after = (argmax_onehot(theta - lam * gg) * gg).sum(-1)
    nz = np.abs(d.numpy()).sum(-1) > 0
    ok = bool((after <= before + 1e-12).all())
    checks.append(Check("blackbox interpolation point never increases the linear loss", ok,
                        f"{int(nz.sum())} of 200 problems get a nonzero surrogate gradient",
                        {"nonzero": int(nz.sum()), "worst_increase": float((after - before).max())}))
    return checks


def _shortest_path_check(n):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    from nonsmooth.solvers import shortest_path_grid

    rng = np.random.default_rng(6)
    costs = rng.uniform(0.1, 5.0, size=(n, 12, 12))
    masks = shortest_path_grid(costs)
    H = W = 12
    worst = 0.0
    for b in range(n):
        rows, cols, wts = [], [], []
        for i, j, dy, dx in itertools.product(range(H), range(W), (-1, 0, 1), (-1, 0, 1)):
            a, c = i + dy, j + dx
            if (dy, dx) != (0, 0) and 0 <= a < H and 0 <= c < W:
                rows.append(i * W + j)
                cols.append(a * W + c)
                wts.append(costs[b, a, c])
        G = csr_matrix((wts, (rows, cols)), shape=(H * W, H * W))
        best = dijkstra(G, indices=0)[-1] + costs[b, 0, 0]
        worst = max(worst, abs(float((masks[b] * costs[b]).sum()) - best))
    return Check("shortest_path_grid cost = SciPy Dijkstra (12x12, 8 neighbours, both ends counted)",
                 worst <= 1e-9, f"{n} grids, worst cost difference {worst:g}",
                 {"grids": n, "worst_abs_diff": worst})


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    """Run the perturbed-layer audit.

    Example:
        >>> result = run(quick=True)          # doctest: +SKIP
        >>> result.passed
        True
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    N = 4000 if quick else 20000
    checks, figures, notes = [], [], []
    rows = []
    say("closed forms of the forward pass")
    checks += _forward_checks(N, rows)
    say("Monte-Carlo error vs N")
    check, fig = _mc_figure(100 if quick else 400, [16, 64, 256, 1024] if quick
                            else [16, 64, 256, 1024, 4096])
    checks.append(check)
    figures.append(fig)
    if importlib.util.find_spec("torch") is not None:
        say("gradients (torch autograd)")
        checks += _gradient_checks(60 if quick else 200, 300 if quick else 1000)
        say("identity and blackbox backward")
        checks += _surrogate_checks()
    else:
        notes.append("torch is not installed: gradient and surrogate checks not run")
    if importlib.util.find_spec("jax") is not None:
        say("jax adapter")
        checks += _jax_checks(60 if quick else 200, 300 if quick else 1000)
    else:
        notes.append("jax is not installed: jax checks not run")
    say("second derivatives")
    checks += _second_order_checks(60 if quick else 200, 1000 if quick else 2000,
                                   importlib.util.find_spec("torch") is not None,
                                   importlib.util.find_spec("jax") is not None)
    say("shortest path vs Dijkstra")
    checks.append(_shortest_path_check(5 if quick else 30))
    say("SPO+ and edge shortest path")
    checks += _spo_and_edge_checks(20 if quick else 200)
    table = Table(f"Perturbed layers vs closed forms (N = {N}, sigma = {SIGMA}, fixed seeds)",
                  ["quantity", "estimate", "closed form", "|z| (bound 5)"], rows,
                  note="z = (estimate - closed form) / standard error of the estimator.")
    passed = sum(c.passed for c in checks)
    summary = (f"{passed}/{len(checks)} checks passed: perturbed argmax/max/sign and their "
               "first and second derivatives match closed forms within 5 standard errors, the "
               "Monte-Carlo error decays like 1/sqrt(N), SPO+ and the edge shortest path match "
               "their hand and SciPy oracles, and the surrogate backward passes follow their "
               "formulas. "
               + " ".join(notes)).strip()
    return SuiteResult("perturbed", "Perturbed optimizers, Fenchel-Young and SPO+ losses and "
                       "surrogate backward passes", checks, [table], figures, summary,
                       seconds=time.perf_counter() - start)
