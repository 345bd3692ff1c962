"""``nonsmooth bench perturbed``: forward + gradient of perturbed argmax and top-k.

Problem: batch 64, dimension 100, N = 1000 Gumbel samples, sigma = 0.1.  Each layer is
compared, in the same process and interleaved, with

- the *physical floor*: drawing the same (N x batch x dim) noise and one stacked
  solver call on theta + sigma Z -- what any implementation must at least do;
- peers when installed (extra ``peers``): optax and jaxopt perturbations (jax), PyEPO's
  ``perturbedOpt`` (torch; it solves one instance at a time in Python and only has
  normal noise, so it is compared with our normal-noise layer).

Peers are imported here only, never by the library.  Ratios > 1 mean we are slower.
"""
from __future__ import annotations

import importlib.util

from ._suite import Table
from ._timing import fmt_seconds, interleaved, single_thread

BATCH, DIM, SAMPLES, SIGMA, K = 64, 100, 1000, 0.1, 10


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _torch_rows(quick, out):
    import torch

    from nonsmooth.solvers import argmax_onehot, perturbed, topk_mask
    from nonsmooth.solvers._combinatorial_common import validated_inputs

    single_thread()
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(BATCH, DIM, generator=gen, requires_grad=True)
    g = torch.randn(BATCH, DIM, generator=gen)
    tiny = torch.finfo(theta.dtype).tiny
    rows = []
    for name, solver in (("argmax", argmax_onehot), (f"top-{K}", topk_mask(K))):
        layer = perturbed(solver, num_samples=SAMPLES, sigma=SIGMA)

        def ours(layer=layer):
            theta.grad = None
            layer(theta).backward(g)

        def floor(solver=solver):
            E = torch.rand((SAMPLES, BATCH, DIM), generator=gen)
            E.clamp_(min=tiny)
            torch.log(E, out=E).neg_()
            torch.log(E, out=E)  # Gumbel Z = -log(-log U)
            with validated_inputs():  # as inside the layer: no second finiteness scan
                solver(E.mul_(-SIGMA).add_(theta.detach()))

        t = interleaved({"ours": ours, "floor": floor}, repeats=5 if quick else 25)
        rows.append(["torch", name, fmt_seconds(t["ours"]), fmt_seconds(t["floor"]),
                     round(t["ours"] / t["floor"], 3), "", "", "", ""])
        out(f"  torch {name}: ours {fmt_seconds(t['ours'])}, floor {fmt_seconds(t['floor'])}")
    return rows


def _same_layout(f):
    """f traced with the threefry layout our jax layer uses (for a generator-neutral ratio)."""
    import jax

    def g(*args):
        with jax.threefry_partitionable(False):
            return f(*args)
    return g


def _jax_rows(quick, out):
    import jax
    import jax.numpy as jnp

    from nonsmooth.solvers import argmax_onehot, perturbed, topk_mask

    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    theta = jax.random.normal(k1, (BATCH, DIM))
    g = jax.random.normal(k2, (BATCH, DIM))
    optax_p = jaxopt_p = None
    if _have("optax"):
        from optax import perturbations as optax_p
    if _have("jaxopt"):
        from jaxopt import perturbations as jaxopt_p
    rows = []
    for name, solver in (("argmax", argmax_onehot), (f"top-{K}", topk_mask(K))):
        layer = perturbed(solver, num_samples=SAMPLES, sigma=SIGMA)
        ours = jax.jit(jax.value_and_grad(lambda t, k, layer=layer: jnp.sum(layer(t, key=k) * g)))
        def floor_fn(t, k, solver=solver):
            # the generator layout and Gumbel transform our layer uses: -log(-log U)
            with jax.threefry_partitionable(False):
                tiny = jnp.finfo(t.dtype).tiny
                U = jax.random.uniform(k, (SAMPLES,) + t.shape, t.dtype, minval=tiny, maxval=1.0)
                return solver(t - SIGMA * jnp.log(-jnp.log(U)))

        floor = jax.jit(floor_fn)
        cands = {"ours": lambda: jax.block_until_ready(ours(theta, key)),
                 "floor": lambda: jax.block_until_ready(floor(theta, key))}
        if optax_p is not None:
            pf = optax_p.make_perturbed_fun(solver, num_samples=SAMPLES, sigma=SIGMA)
            fo = jax.jit(jax.value_and_grad(lambda t, k, pf=pf: jnp.sum(pf(k, t) * g)))
            fo_same = jax.jit(jax.value_and_grad(
                _same_layout(lambda t, k, pf=pf: jnp.sum(pf(k, t) * g))))
            cands["optax"] = lambda fo=fo: jax.block_until_ready(fo(theta, key))
            cands["optax, same RNG"] = lambda f=fo_same: jax.block_until_ready(f(theta, key))
        if jaxopt_p is not None:
            pj = jaxopt_p.make_perturbed_argmax(solver, num_samples=SAMPLES, sigma=SIGMA)
            fj = jax.jit(jax.value_and_grad(lambda t, k, pj=pj: jnp.sum(pj(t, k) * g)))
            fj_same = jax.jit(jax.value_and_grad(
                _same_layout(lambda t, k, pj=pj: jnp.sum(pj(t, k) * g))))
            cands["jaxopt"] = lambda fj=fj: jax.block_until_ready(fj(theta, key))
            cands["jaxopt, same RNG"] = lambda f=fj_same: jax.block_until_ready(f(theta, key))
        t = interleaved(cands, repeats=5 if quick else 25)
        ratio = lambda peer: round(t["ours"] / t[peer], 3) if peer in t else "not installed"
        rows.append(["jax", name, fmt_seconds(t["ours"]), fmt_seconds(t["floor"]),
                     round(t["ours"] / t["floor"], 3), ratio("optax"), ratio("jaxopt"),
                     ratio("optax, same RNG"), ratio("jaxopt, same RNG")])
        out(f"  jax {name}: " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in t.items()))
    return rows


def _pyepo_table(quick, out):
    import numpy as np
    import torch
    from pyepo import EPO
    from pyepo.func import perturbedFenchelYoung, perturbedOpt
    from pyepo.model.opt import optModel

    from nonsmooth.solvers import argmax_onehot, fenchel_young_loss, perturbed

    class _ArgmaxModel(optModel):
        """argmax over the one-hot vectors, as a PyEPO model (one instance per solve)."""

        def _getModel(self):
            self.modelSense = EPO.MAXIMIZE
            return None, list(range(DIM))

        def setObj(self, c):
            self._c = np.asarray(c)

        def solve(self):
            y = np.zeros(DIM)
            i = int(np.argmax(self._c))
            y[i] = 1.0
            return y, float(self._c[i])

    single_thread()
    n = 100 if quick else SAMPLES  # PyEPO solves every (sample, batch) instance in Python
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(BATCH, DIM, generator=gen, requires_grad=True)
    g = torch.randn(BATCH, DIM, generator=gen)
    target = argmax_onehot(torch.randn(BATCH, DIM, generator=gen))
    ours_layer = perturbed(argmax_onehot, num_samples=n, sigma=1.0, noise="normal")
    ours_fy = fenchel_young_loss(argmax_onehot, num_samples=n, sigma=1.0, noise="normal")
    peer = perturbedOpt(_ArgmaxModel(), n_samples=n, sigma=1.0)
    peer_fy = perturbedFenchelYoung(_ArgmaxModel(), n_samples=n, sigma=1.0, reduction="sum")

    def step(fn):
        def run():
            theta.grad = None
            fn()
        return run

    cands = {"ours DPO": step(lambda: ours_layer(theta).backward(g)),
             "pyepo DPO": step(lambda: peer(theta).backward(g)),
             "ours PFYL": step(lambda: ours_fy(theta, target).sum().backward()),
             "pyepo PFYL": step(lambda: peer_fy(theta, target).backward())}
    t = interleaved(cands, repeats=2 if quick else 5, warmup=1)
    rows = []
    for what, label in (("DPO", "perturbed argmax (perturbedOpt)"),
                        ("PFYL", "Fenchel-Young loss (perturbedFenchelYoung)")):
        ours_t, peer_t = t[f"ours {what}"], t[f"pyepo {what}"]
        out(f"  torch {label}, normal noise, N={n}: ours {fmt_seconds(ours_t)}, "
            f"PyEPO {fmt_seconds(peer_t)}")
        rows.append([label, fmt_seconds(ours_t), fmt_seconds(peer_t), round(ours_t / peer_t, 4)])
    return Table(
        title=f"Perturbed argmax and FY loss vs PyEPO (torch, normal noise, N={n}, "
              f"batch {BATCH}, dim {DIM})",
        columns=["layer", "ours", "PyEPO", "ours / PyEPO"], rows=rows,
        note="PyEPO calls its optModel once per (sample, batch) instance in a Python loop.")


def _gpu_table(quick, out):
    title = f"GPU throughput of perturbed layers, forward + gradient (N = {SAMPLES}, batch {BATCH})"
    columns = ["solver", "problem", "time per call", "samples / s"]
    try:
        import torch
    except ImportError:
        return Table(title, columns, [], note="torch not installed")
    if not torch.cuda.is_available():
        return Table(title, columns, [], note="Not measured in this run: no CUDA device. "
                     "Run `nonsmooth bench perturbed` on a GPU machine to fill this table.")
    from nonsmooth.solvers import argmax_onehot, perturbed, shortest_path_grid, topk_mask

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [("argmax", argmax_onehot, (BATCH, DIM)), (f"top-{K}", topk_mask(K), (BATCH, DIM)),
             ("shortest_path_grid", shortest_path_grid, (BATCH, 12, 12))]
    rows = []
    for name, solver, shape in cases:
        layer = perturbed(solver, num_samples=SAMPLES, sigma=SIGMA)
        theta = torch.rand(shape, device=dev, generator=gen).add_(0.1).requires_grad_()
        g = torch.randn(shape, device=dev, generator=gen)

        def step(layer=layer, theta=theta, g=g):
            theta.grad = None
            layer(theta).backward(g)
            torch.cuda.synchronize()

        t = interleaved({name: step}, repeats=3 if quick else 10)[name]
        rate = SAMPLES * BATCH / t
        rows.append([name, "x".join(map(str, shape[1:])), fmt_seconds(t), f"{rate:,.0f}"])
        out(f"  cuda {name}: {fmt_seconds(t)} per call, {rate:,.0f} samples/s")
    return Table(title, columns, rows, note=f"device: {torch.cuda.get_device_name(dev)}; "
                 "a sample is one perturbed problem (one of N x batch).")


def run(*, quick: bool = False, out=print) -> list[Table]:
    """Measure and print the tables; returns them.

    Example:
        >>> tables = run(quick=True, out=lambda s: None)   # doctest: +SKIP
    """
    out(f"perturbed layers: batch {BATCH}, dim {DIM}, N = {SAMPLES}, Gumbel sigma = {SIGMA}, "
        "forward + gradient")
    rows, notes = [], []
    if _have("torch"):
        rows += _torch_rows(quick, out)
    else:
        notes.append("torch not installed: torch rows skipped")
    if _have("jax"):
        rows += _jax_rows(quick, out)
    else:
        notes.append("jax not installed: jax rows skipped")
    for peer in ("optax", "jaxopt", "pyepo"):
        if not _have(peer):
            notes.append(f"{peer} not installed (pip install nonsmooth[peers]): its column is skipped")
    main = Table(
        title=f"Perturbed argmax / top-{K}: forward + gradient (batch {BATCH}, dim {DIM}, N {SAMPLES})",
        columns=["framework", "layer", "ours", "floor (noise + 1 solver call)",
                 "ours / floor (target <= 1.3)", "ours / optax", "ours / jaxopt",
                 "ours / optax (same RNG)", "ours / jaxopt (same RNG)"],
        rows=rows,
        note=("Medians of interleaved runs in one process, torch on one thread. "
              "Our jax layer draws its noise with threefry's non-partitionable layout "
              "(about 2x faster on CPU, same distribution); 'ours / optax' and 'ours / jaxopt' "
              "time the peers as shipped (jax's default layout), the '(same RNG)' columns "
              "trace the peers under that same layout, isolating everything but the generator. "
              + " ".join(notes)).strip())
    tables = [main]
    if _have("pyepo") and _have("torch"):
        tables.append(_pyepo_table(quick, out))
    tables.append(_gpu_table(quick, out))
    from ._bench_fused import tables as fused_tables  # issue 16: the fused kernels' ratios

    tables += fused_tables(quick, out)
    _print_tables(tables, out)
    return tables


def _print_tables(tables, out):
    for table in tables:
        out("")
        out(table.title)
        widths = [max(len(str(c)), *(len(str(r[i])) for r in table.rows)) if table.rows
                  else len(str(c)) for i, c in enumerate(table.columns)]
        out("  ".join(str(c).ljust(w) for c, w in zip(table.columns, widths)))
        for r in table.rows:
            out("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        if table.note:
            out(f"  note: {table.note}")
