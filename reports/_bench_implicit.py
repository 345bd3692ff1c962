"""``nonsmooth bench implicit``: a ReLU DEQ ``z = relu(W z + U x + b)`` (width 256, batch 64,
tol 1e-6, Anderson m = 5) solved and differentiated by nonsmooth's implicit layer, by unrolled
backprop through the same iterations, and by torchdeq when it is installed.

Reports forward steps, forward and backward time (interleaved medians, one thread), the
gradient error against a float64 reference, and the bytes autograd saves for backward as the
number of forward steps grows (constant for implicit backward, linear for unrolling).

A second table runs each library *with its own defaults*, as a user who changes nothing gets
them (torchdeq 0.1.0: Picard, absolute tol 1e-3, 40 steps, one-step phantom/JFB gradient,
best iterate returned silently): residual reached, whether a warning was raised, gradient
error and time, on a well-conditioned (|W|_2 = 0.9) and a slow (rate 0.99) ReLU DEQ.
"""
from __future__ import annotations

import math

import numpy as np

from ._suite import Table
from ._timing import fmt_seconds, interleaved, single_thread


def _problem(torch, width, batch, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=g) / math.sqrt(width)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(width, in_features, generator=g) / math.sqrt(in_features)
    b = 0.1 * torch.randn(width, generator=g)
    x = torch.randn(batch, in_features, generator=g)
    cot = torch.randn(batch, width, generator=g)
    return W, U, b, x, cot


def _saved_bytes(torch, fn):
    """Bytes of tensors autograd saves for backward while ``fn`` runs (storage-deduplicated)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def run(*, quick: bool = False, out=print) -> list:
    import torch

    from nonsmooth.implicit import implicit_fixed_point

    single_thread()
    width, batch, in_features = (64, 16, 32) if quick else (256, 64, 128)
    repeats = 3 if quick else 9
    tol, m, max_iter = 1e-6, 5, 200
    W, U, b, x, cot = _problem(torch, width, batch, in_features)
    params = [p.requires_grad_(True) for p in (W, U, b)]

    def f(z, x):
        return torch.relu(z @ W.T + x @ U.T + b)

    # float64 reference gradient (implicit, tight tolerance)
    W64, U64, b64 = (p.detach().double().requires_grad_(True) for p in (W, U, b))
    z_ref, _ = implicit_fixed_point(lambda z, x: torch.relu(z @ W64.T + x @ U64.T + b64),
                                    torch.zeros(batch, width, dtype=torch.float64), x.double(), tol=1e-13,
                                    stop="abs", max_iter=1000, m=m)
    (z_ref * cot.double()).sum().backward()
    g_ref = torch.cat([W64.grad.flatten(), U64.grad.flatten(), b64.grad.flatten()]).float()

    def grad_err():
        g = torch.cat([p.grad.flatten() for p in params])
        return float(torch.linalg.vector_norm(g - g_ref) / torch.linalg.vector_norm(g_ref))

    def zero():
        for p in params:
            p.grad = None

    z0 = torch.zeros(batch, width)
    candidates = {}
    steps = {}

    for label, backward in (("nonsmooth implicit", "implicit"), ("unrolled backprop", "unroll")):
        def fwd(backward=backward, label=label):
            z, stats = implicit_fixed_point(f, z0, x, backward=backward, method="anderson", m=m, tol=tol,
                                            stop="abs", max_iter=max_iter, on_failure="ignore")
            steps[label] = (float(stats.forward.steps.mean()), int(stats.forward.steps.max()),
                            bool(stats.forward.all_converged))
            return z

        candidates[label] = fwd

    try:
        from torchdeq import get_deq
    except ImportError:
        get_deq = None
    if get_deq is not None:
        tdeq = get_deq(f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="abs", ift=True,
                       b_solver="anderson", b_max_iter=max_iter, b_tol=tol, b_stop_mode="abs")

        def fwd_torchdeq():
            zs, info = tdeq(lambda z: f(z, x), z0)
            nstep = info["nstep"].float()
            res = info["abs_lowest"]
            steps["torchdeq"] = (float(nstep.mean()), int(nstep.max()), bool((res <= tol).all()))
            return zs[-1]

        candidates["torchdeq"] = fwd_torchdeq

    jax_fwd, jax_tot = {}, {}
    jax_note = ""
    try:
        import os
        import sys

        if "jax" not in sys.modules:  # one thread for XLA too, as for torch (must precede the import)
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        import jax
        import jax.numpy as jnp

        from nonsmooth.implicit import deq
    except ImportError:
        jax = None
        jax_note = " jax is not installed: its row is skipped."
    if jax is not None:
        pj = tuple(jnp.asarray(t.detach().numpy()) for t in (W, U, b))
        xj, cj = jnp.asarray(x.numpy()), jnp.asarray(cot.numpy())
        layer_j = deq(lambda p, z, x: jax.nn.relu(z @ p[0].T + x @ p[1].T + p[2]), state_shape=(width,),
                      method="anderson", m=m, tol=tol, stop="abs", max_iter=max_iter, on_failure="ignore",
                      with_info=True)
        fwd_j = jax.jit(lambda p: layer_j(p, xj))
        grad_j = jax.jit(jax.grad(lambda p: jnp.sum(layer_j(p, xj)[0] * cj)))
        _, info_j = fwd_j(pj)
        sj = np.asarray(info_j.steps)
        steps["nonsmooth jax (jit)"] = (float(sj.mean()), int(sj.max()), bool(np.asarray(info_j.converged).all()))
        jax_fwd["nonsmooth jax (jit)"] = lambda: jax.block_until_ready(fwd_j(pj))
        jax_tot["nonsmooth jax (jit)"] = lambda: jax.block_until_ready(grad_j(pj))

    def forward_only(fn):
        def go():
            with torch.no_grad():
                fn()
        return go

    def forward_backward(fn):
        def go():
            zero()
            (fn() * cot).sum().backward()
        return go

    t_fwd = interleaved({**{k: forward_only(v) for k, v in candidates.items()}, **jax_fwd}, repeats=repeats)
    t_tot = interleaved({**{k: forward_backward(v) for k, v in candidates.items()}, **jax_tot}, repeats=repeats)
    errs = {}
    for k, v in candidates.items():
        forward_backward(v)()
        errs[k] = grad_err()
    if jax is not None:
        gj = grad_j(pj)
        flat = torch.cat([torch.tensor(np.asarray(a)).flatten() for a in gj])
        errs["nonsmooth jax (jit)"] = float(torch.linalg.vector_norm(flat - g_ref) / torch.linalg.vector_norm(g_ref))
        candidates["nonsmooth jax (jit)"] = None
    base = "nonsmooth implicit"
    rows = []
    for k in candidates:
        mean_steps, max_steps, conv = steps[k]
        bwd = max(t_tot[k] - t_fwd[k], 0.0)
        rows.append([k, f"{mean_steps:.1f} / {max_steps}", "yes" if conv else "NO", fmt_seconds(t_fwd[k]),
                     fmt_seconds(bwd), fmt_seconds(t_tot[k]), f"{t_tot[k] / t_tot[base]:.2f}x",
                     f"{steps[k][1] / steps[base][1]:.2f}x", f"{errs[k]:.1e}"])
    note = (f"width {width}, batch {batch}, input {in_features}, |W|_2 = 0.9, Anderson m = {m}, tol {tol:g} "
            f"(absolute residual per sample, torchdeq's working mode), float32, one thread; times are interleaved "
            f"medians of {repeats}; ratios are against 'nonsmooth implicit'; gradient error is relative to a float64 "
            "implicit solve at tol 1e-13.")
    if get_deq is None:
        note += " torchdeq is not installed (pip install torchdeq): its row is skipped."
    note += jax_note
    t1 = Table(title="ReLU DEQ: forward steps, time and gradient agreement", columns=[
        "method", "fwd steps mean / max", "converged", "forward", "backward", "fwd+bwd", "time ratio",
        "max-steps ratio", "grad rel. error"], rows=rows, note=note)

    # backward memory as the number of forward steps grows (tol unreachable: exactly k steps)
    mem_rows = []
    for k in ((5, 10, 20) if quick else (5, 10, 20, 40)):
        row = [k]
        for backward in ("implicit", "unroll"):
            zero()
            _, nbytes = _saved_bytes(torch, lambda backward=backward, k=k: implicit_fixed_point(
                f, z0, x, backward=backward, method="anderson", m=m, tol=1e-30, stop="abs", max_iter=k,
                on_failure="ignore")[0])
            row.append(f"{nbytes / 2 ** 20:.2f} MiB")
        mem_rows.append(row)
    t2 = Table(title="Bytes saved for backward vs forward steps", columns=[
        "forward steps", "nonsmooth implicit", "unrolled backprop"], rows=mem_rows,
        note="tensors autograd keeps for the backward pass (saved-tensor hooks, storages counted once); implicit "
             "backward keeps one evaluation of f whatever the number of forward steps.")
    t3 = _defaults_table(torch, quick=quick, repeats=repeats)
    for t in (t1, t2, t3):
        _print(t, out)
    return [t1, t2, t3]


def _defaults_table(torch, *, quick, repeats):
    """Each library with the settings a user gets by changing nothing."""
    import warnings

    from nonsmooth.implicit import ConvergenceWarning, implicit_fixed_point

    width, batch, in_features = (64, 16, 32) if quick else (256, 64, 128)
    try:
        from torchdeq import get_deq
    except ImportError:
        get_deq = None
    rows = []
    for label in ("|W|_2 = 0.9", "slow: rate 0.99"):
        W, U, b, x, cot = _problem(torch, width, batch, in_features, seed=1)
        if label.startswith("slow"):
            # symmetric W with spectrum in [0, 0.99] and positive inputs: the ReLUs stay active, the map
            # is affine with rate 0.99, so 40 Picard steps shrink the error by only 0.99^40 = 0.67
            g = torch.Generator().manual_seed(2)
            Q, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
            W = (Q * torch.linspace(0.0, 0.99, width)) @ Q.T
            b = b.abs() + 1.0
            x = x.abs()
        params = [p.requires_grad_(True) for p in (W, U, b)]

        def f(z, x, W=W, U=U, b=b):
            return torch.relu(z @ W.T + x @ U.T + b)

        W64, U64, b64 = (p.detach().double().requires_grad_(True) for p in (W, U, b))
        z_ref, _ = implicit_fixed_point(lambda z, x: torch.relu(z @ W64.T + x @ U64.T + b64),
                                        torch.zeros(batch, width, dtype=torch.float64), x.double(), tol=1e-13,
                                        stop="abs", max_iter=5000)
        (z_ref * cot.double()).sum().backward()
        g_ref = torch.cat([W64.grad.flatten(), U64.grad.flatten(), b64.grad.flatten()])
        z0 = torch.zeros(batch, width)
        cands = {"nonsmooth defaults": lambda f=f: implicit_fixed_point(f, z0, x)[0],
                 "nonsmooth, torchdeq's settings": lambda f=f: implicit_fixed_point(
                     f, z0, x, method="picard", tol=1e-3, stop="abs", max_iter=40, backward="jfb")[0]}
        if get_deq is not None:
            tdeq = get_deq()
            tdeq_ift = get_deq(ift=True)
            cands["torchdeq get_deq()"] = lambda f=f, d=tdeq: d(lambda z: f(z, x), z0)[0][-1]
            cands["torchdeq get_deq(ift=True)"] = lambda f=f, d=tdeq_ift: d(lambda z: f(z, x), z0)[0][-1]

        def step(fn, params=params):
            for p in params:
                p.grad = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                z = fn()
                (z * cot).sum().backward()
            return z, caught

        stats = {}
        for name, fn in cands.items():
            z, caught = step(fn)
            with torch.no_grad():
                r = f(z.detach(), x) - z.detach()
                absr = torch.linalg.vector_norm(r, dim=1)
                rel = absr / torch.linalg.vector_norm(f(z.detach(), x), dim=1)
            g = torch.cat([p.grad.flatten() for p in params]).double()
            err = float(torch.linalg.vector_norm(g - g_ref) / torch.linalg.vector_norm(g_ref))
            zerr = float((z.detach().double() - z_ref.detach()).abs().max() / z_ref.detach().abs().max())
            warned = sum(issubclass(w.category, ConvergenceWarning) or "converge" in str(w.message).lower()
                         for w in caught)
            stats[name] = (float(absr.max()), float(rel.max()), zerr, err, warned)
        times = interleaved({k: (lambda fn=fn: step(fn)) for k, fn in cands.items()}, repeats=repeats)
        base = times["nonsmooth defaults"]
        for name in cands:
            absr, rel, zerr, err, warned = stats[name]
            rows.append([label, name, f"{absr:.1e}", f"{rel:.1e}", f"{zerr:.1e}", f"{err:.1e}",
                         "yes" if warned else "no", fmt_seconds(times[name]), f"{times[name] / base:.2f}x"])
    note = (f"width {width}, batch {batch}, float32, one thread; each library's defaults: nonsmooth = Anderson "
            "m=5, relative tol 1e-6 per sample, max_iter 100, implicit backward solved to the same tolerance, "
            "ConvergenceWarning when a sample misses it; torchdeq 0.1.0 get_deq() = Picard, absolute tol 1e-3 "
            "(batch max), 40 steps, one-step phantom gradient (JFB), best iterate returned without a warning; "
            "ift=True swaps in the implicit backward (Picard, tol 1e-6, 40 steps); \"nonsmooth, torchdeq's settings\" "
            "is method='picard', tol=1e-3, stop='abs', max_iter=40, backward='jfb' (per-sample stopping). Residuals of the returned z; "
            "errors relative to a float64 solve at tol 1e-13; time = forward + backward, ratio vs nonsmooth.")
    if get_deq is None:
        note += " torchdeq is not installed (pip install torchdeq): its rows are skipped."
    return Table(title="Out of the box: each library's defaults", columns=[
        "problem", "configuration", "max abs residual", "max rel residual", "z rel. error", "grad rel. error",
        "warned", "fwd+bwd", "time ratio"], rows=rows, note=note)


def _print(table, out):
    widths = [max(len(str(c)), *(len(str(r[i])) for r in table.rows)) for i, c in enumerate(table.columns)]
    out(table.title)
    out("  ".join(str(c).ljust(w) for c, w in zip(table.columns, widths)))
    for r in table.rows:
        out("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    if table.note:
        out(f"({table.note})")
    out("")
