"""The fused perturbed kernels' benchmarks (part of ``nonsmooth bench perturbed``).

Problem as in ``_bench_perturbed``: batch 64, dimension 100, N = 1000, sigma = 0.1,
Gumbel noise, forward + gradient, torch on one thread.  Baselines, each measured in
the same process, interleaved:

- ``torch.rand(N, B, d)`` alone -- drawing the uniforms the unfused way (target: the
  fused forward + gradient costs no more, ratio <= 1.0);
- the same layer with the fused kernel switched off (the general stacked path);
- jax: optax and jaxopt perturbations with their default settings, jitted (target:
  ours <= 0.5x the faster of the two); skipped, and said so, when not installed;
- memory: peak resident memory of forward + gradient in a fresh process per N, fused
  vs stacked, so the O(B d) vs O(N B d) growth is visible;
- GPU (when CUDA is there): samples per second of the Triton kernels at B=1024,
  d=1000, N=100 float32 against the memory-bandwidth floor of reading theta and writing
  the outputs, and soft sort/rank (128, 1000) on the device vs torchsort.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from ._suite import Table
from ._timing import fmt_seconds, interleaved, single_thread

BATCH, DIM, SAMPLES, SIGMA, K = 64, 100, 1000, 0.1, 10


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def torch_table(quick, out) -> Table:
    import torch

    from nonsmooth.solvers import _fused, argmax_onehot, perturbed, topk_mask

    single_thread()
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(BATCH, DIM, generator=gen, requires_grad=True)
    g = torch.randn(BATCH, DIM, generator=gen)
    rows = []
    for name, solver in (("argmax", argmax_onehot), (f"top-{K}", topk_mask(K))):
        layer = perturbed(solver, num_samples=SAMPLES, sigma=SIGMA)

        def fused(layer=layer):
            theta.grad = None
            layer(theta).backward(g)

        def stacked(layer=layer):
            with _fused.disabled():
                theta.grad = None
                layer(theta).backward(g)

        cands = {"fused": fused, "stacked": stacked,
                 "torch.rand": lambda: torch.rand((SAMPLES, BATCH, DIM), generator=gen)}
        t = interleaved(cands, repeats=5 if quick else 21)
        rows.append([name, fmt_seconds(t["fused"]), fmt_seconds(t["stacked"]),
                     fmt_seconds(t["torch.rand"]), round(t["fused"] / t["torch.rand"], 3),
                     round(t["fused"] / t["stacked"], 3)])
        out(f"  torch {name}: fused {fmt_seconds(t['fused'])}, stacked "
            f"{fmt_seconds(t['stacked'])}, torch.rand(N, B, d) {fmt_seconds(t['torch.rand'])}")
    from nonsmooth.solvers import _perturb_c

    return Table(
        title=f"Fused perturbed kernel, torch CPU, forward + gradient (float32, batch {BATCH}, "
              f"dim {DIM}, N {SAMPLES}, Gumbel sigma {SIGMA}, one thread)",
        columns=["layer", "fused", "stacked (fused off)", "torch.rand(N, B, d) alone",
                 "fused / torch.rand (target <= 1.0)", "fused / stacked"],
        rows=rows,
        note=(f"Medians of interleaved runs in one process. Philox ISA: {_perturb_c.PHILOX_ISA}. "
              "The fused kernel regenerates the noise in the backward instead of storing it."))


def jax_table(quick, out) -> Table:
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
        cands = {"ours": lambda: jax.block_until_ready(ours(theta, key))}
        if optax_p is not None:
            pf = optax_p.make_perturbed_fun(solver, num_samples=SAMPLES, sigma=SIGMA)
            fo = jax.jit(jax.value_and_grad(lambda t, k, pf=pf: jnp.sum(pf(k, t) * g)))
            cands["optax"] = lambda fo=fo: jax.block_until_ready(fo(theta, key))
        if jaxopt_p is not None:
            pj = jaxopt_p.make_perturbed_argmax(solver, num_samples=SAMPLES, sigma=SIGMA)
            fj = jax.jit(jax.value_and_grad(lambda t, k, pj=pj: jnp.sum(pj(t, k) * g)))
            cands["jaxopt"] = lambda fj=fj: jax.block_until_ready(fj(theta, key))
        t = interleaved(cands, repeats=5 if quick else 21)
        peers = [t[p] for p in ("optax", "jaxopt") if p in t]
        cell = lambda p: fmt_seconds(t[p]) if p in t else "not installed"
        rows.append([name, fmt_seconds(t["ours"]), cell("optax"), cell("jaxopt"),
                     round(t["ours"] / min(peers), 3) if peers else "no peer installed"])
        out(f"  jax {name}: " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in t.items()))
    missing = [p for p in ("optax", "jaxopt") if not _have(p)]
    return Table(
        title=f"Fused perturbed kernel, jax CPU, jitted forward + gradient (float32, batch "
              f"{BATCH}, dim {DIM}, N {SAMPLES})",
        columns=["layer", "ours (fused)", "optax", "jaxopt",
                 "ours / faster peer (target <= 0.5)"],
        rows=rows,
        note=("Peers with their default settings (noise law and RNG as shipped), jitted. "
              + (f"Not installed: {', '.join(missing)} (pip install nonsmooth[peers])."
                 if missing else "")).strip())


_MEMORY_SCRIPT = r"""
import json, resource, sys, tracemalloc, torch
torch.set_num_threads(1)
from nonsmooth.solvers import _fused, argmax_onehot, perturbed
N, fused = int(sys.argv[1]), sys.argv[2] == "fused"
theta = torch.randn(%(B)d, %(D)d, requires_grad=True)
g = torch.randn(%(B)d, %(D)d)
def step(n):
    layer = perturbed(argmax_onehot, num_samples=n, sigma=0.1)
    theta.grad = None
    if fused:
        layer(theta).backward(g)
    else:
        with _fused.disabled():
            layer(theta).backward(g)
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
step(2)  # imports, kernels, allocator warm-up
try:  # Linux: reset the peak-RSS mark, so the peak is this call's alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    step(N)
    peak = status("VmHWM:")
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(N)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# the fused path allocates through numpy and PyMem_RawMalloc: tracemalloc sees every byte
tracemalloc.start()
step(N)
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps([max(0, peak - before), traced]))
"""


def memory_table(quick, out) -> Table:
    Ns = (1000, 4000) if quick else (1000, 4000, 16000)
    script = _MEMORY_SCRIPT % {"B": BATCH, "D": DIM}
    rows = []
    for N in Ns:
        row = [N, f"{N * BATCH * DIM * 4 / 2**20:.1f} MB"]
        for path in ("fused", "stacked"):
            res = subprocess.run([sys.executable, "-c", script, str(N), path], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode != 0:
                row.append("failed: " + res.stderr.strip().splitlines()[-1][:80])
                continue
            rss, traced = json.loads(res.stdout.strip().splitlines()[-1])
            row.append(f"{rss / 2**20:.1f} MB")
            if path == "fused":
                row.append(f"{traced / 2**10:.1f} KB")
        rows.append(row)
        out(f"  memory N={N}: fused {row[2]} ({row[3]} traced), stacked {row[4]}")
    return Table(
        title=f"Peak extra memory of forward + gradient (torch CPU, float32, argmax, batch "
              f"{BATCH}, dim {DIM})",
        columns=["N", "one (N, B, d) float32 array", "fused (RSS)", "fused (bytes traced)",
                 "stacked (RSS)"],
        rows=rows,
        note=("Peak resident set size during the call minus the resident size before it, in "
              "a fresh process per cell (Linux: VmHWM after resetting it through "
              "/proc/self/clear_refs); 'bytes traced' is tracemalloc's peak over the fused "
              "call, which sees all of its allocations (numpy outputs, the C kernel's "
              "scratch). The fused kernel's extra memory is O(B d) accumulators and "
              "per-thread scratch, whatever N; the stacked path holds several (N, B, d) "
              "arrays."))


def _no_gpu(title, columns):
    """The table when no CUDA device (or no triton) is here, saying so; else None."""
    try:
        import torch
    except ImportError:
        return Table(title, columns, [], note="torch not installed")
    if not torch.cuda.is_available():
        return Table(title, columns, [], note=(
            "Not measured in this run: no CUDA device (this session was lent none). The Triton "
            "kernels are tested under TRITON_INTERPRET=1 against the C kernels instead; run "
            "this benchmark on a GPU machine to fill this table."))
    if not _have("triton"):
        return Table(title, columns, [], note="triton not installed (pip install nonsmooth[gpu])")
    return None


def gpu_table(quick, out) -> Table:
    title = "GPU: fused Triton perturbed argmax, forward + gradient (B=1024, d=1000, N=100, float32)"
    columns = ["case", "time", "throughput", "fraction of the bandwidth floor"]
    missing = _no_gpu(title, columns)
    if missing is not None:
        return missing
    import torch

    from nonsmooth.solvers import argmax_onehot, perturbed

    dev = torch.device("cuda")
    B, D, N = 1024, 1000, 100
    theta = torch.randn(B, D, device=dev, requires_grad=True)
    g = torch.randn(B, D, device=dev)
    layer = perturbed(argmax_onehot, num_samples=N, sigma=SIGMA)
    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)

    def fwd_grad():
        theta.grad = None
        layer(theta).backward(g)
        torch.cuda.synchronize()

    def copy():
        big.clone()
        torch.cuda.synchronize()

    t = interleaved({"fused": fwd_grad, "copy": copy}, repeats=3 if quick else 10)
    bandwidth = 2 * big.numel() / t["copy"]  # read + write, bytes/s, measured
    # forward: read theta, write mean; backward: read theta and g, write grad
    floor = 5 * B * D * 4 / bandwidth
    rows = [["perturbed argmax fwd+grad", fmt_seconds(t["fused"]),
             f"{N * B / t['fused']:,.0f} samples/s", f"{floor / t['fused']:.3f}"]]
    out(f"  cuda fused argmax: {rows[0][1]}, {rows[0][2]}, {rows[0][3]} of the floor")
    return Table(title, columns, rows, note=(
        f"device: {torch.cuda.get_device_name(dev)}; bandwidth {bandwidth / 1e9:.0f} GB/s "
        "measured by a device copy; the floor moves theta (twice), g, mean and grad once."))


def sort_device_table(quick, out) -> Table:
    """Soft sort/rank L2 of a CUDA (128, 1000) tensor on the device vs torchsort (``bench sort``)."""
    title = "GPU: soft sort / soft rank L2 (128, 1000) float32 on the device (Triton PAV)"
    columns = ["op", "ours fwd+bwd", "torchsort fwd+bwd", "ours / torchsort"]
    missing = _no_gpu(title, columns)
    if missing is not None:
        return missing
    import torch

    from nonsmooth.solvers import soft_rank, soft_sort

    x = torch.randn(128, 1000, device="cuda")
    w = torch.linspace(-1.0, 1.0, 1000, device="cuda")

    def run(fn):
        def step():
            xr = x.detach().requires_grad_()
            (fn(xr, regularization_strength=1.0) * w).sum().backward()
            torch.cuda.synchronize()
        return step

    cands = {"rank": run(soft_rank), "sort": run(soft_sort)}
    try:
        import torchsort

        cands["torchsort rank"] = run(torchsort.soft_rank)
        cands["torchsort sort"] = run(torchsort.soft_sort)
    except Exception:  # not installed, or built without CUDA
        pass
    t = interleaved(cands, repeats=3 if quick else 10)
    rows = []
    for op in ("rank", "sort"):
        peer = t.get(f"torchsort {op}")
        rows.append([f"soft_{op}", fmt_seconds(t[op]),
                     fmt_seconds(peer) if peer else "not available",
                     round(t[op] / peer, 3) if peer else ""])
    out("  cuda " + ", ".join(f"{r[0]} {r[1]}" for r in rows))
    return Table(title, columns, rows, note=f"device: {torch.cuda.get_device_name('cuda')}")


def tables(quick: bool, out) -> list:
    """The fused kernel's tables, for ``_bench_perturbed.run``."""
    from nonsmooth.solvers import _fused

    if not _fused.available():
        return [Table("Fused perturbed kernel", ["note"], [["C extension not built"]])]
    result = []
    if _have("torch"):
        result.append(torch_table(quick, out))
        result.append(memory_table(quick, out))
    if _have("jax"):
        result.append(jax_table(quick, out))
    result.append(gpu_table(quick, out))
    return result
