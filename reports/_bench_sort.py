"""``nonsmooth bench sort``: soft sort/rank on torch tensors against the sort they rest on.

For each shape and dtype, the forward and forward+backward of ``soft_rank`` and
``soft_sort`` (L2 and KL) are timed interleaved with ``torch.sort`` (forward) and
``numpy.argsort`` on the same data, in one process on one thread, and, when they are
importable, with torchsort and fast-soft-sort doing the same job. Ratios below 1 mean
faster than the baseline.
"""
from __future__ import annotations

import importlib

from ._suite import Table
from ._timing import fmt_seconds, interleaved, single_thread

FULL_SHAPES = [((1, 1000), "float64"), ((128, 1000), "float64"), ((32, 100000), "float64"),
               ((1, 1000), "float32"), ((128, 1000), "float32"), ((32, 100000), "float32")]
QUICK_SHAPES = [((1, 1000), "float64"), ((128, 1000), "float64")]
COLUMNS = ["shape", "dtype", "op", "reg", "pass", "median", "x torch.sort", "x np.argsort",
           "x torchsort", "x fast-soft-sort", "target"]


def _peer(name: str, attr: str):
    try:
        return getattr(importlib.import_module(name), attr)
    except Exception:  # not installed, or built against another torch
        return None


def _peers():
    """{peer name: {"rank": fn, "sort": fn}} for the peers importable here."""
    found = {}
    ts_rank, ts_sort = _peer("torchsort", "soft_rank"), _peer("torchsort", "soft_sort")
    if ts_rank is not None and ts_sort is not None:
        found["torchsort"] = {"rank": ts_rank, "sort": ts_sort}
    fs_rank = _peer("fast_soft_sort.pytorch_ops", "soft_rank")
    fs_sort = _peer("fast_soft_sort.pytorch_ops", "soft_sort")
    if fs_rank is not None and fs_sort is not None:
        found["fast-soft-sort"] = {"rank": fs_rank, "sort": fs_sort}
    return found


def _candidates(torch, x, peers):
    from nonsmooth.solvers import soft_rank, soft_sort

    ours = {"rank": soft_rank, "sort": soft_sort}
    x_np = x.numpy()
    weights = torch.linspace(-1.0, 1.0, x.shape[-1], dtype=x.dtype)
    cands = {
        "torch.sort": lambda: torch.sort(x, dim=-1),
        "numpy.argsort": lambda: x_np.argsort(axis=-1),
    }

    def fwd(fn, **kw):
        def run():
            with torch.no_grad():
                fn(x, **kw)
        return run

    def fwd_bwd(fn, **kw):
        def run():
            xr = x.detach().requires_grad_()
            (fn(xr, **kw) * weights).sum().backward()
        return run

    for op in ("rank", "sort"):
        for reg in ("l2", "kl"):
            cands[f"ours/{op}/{reg}/fwd"] = fwd(ours[op], regularization=reg)
            cands[f"ours/{op}/{reg}/fwd+bwd"] = fwd_bwd(ours[op], regularization=reg)
            for name, fns in peers.items():
                kw = dict(regularization=reg, regularization_strength=1.0)
                cands[f"{name}/{op}/{reg}/fwd"] = fwd(fns[op], **kw)
                cands[f"{name}/{op}/{reg}/fwd+bwd"] = fwd_bwd(fns[op], **kw)
    return cands


def run(*, quick: bool = False, out=print) -> list[Table]:
    """Time soft sort/rank against torch.sort, numpy.argsort and installed peers.

    Example:
        >>> tables = run(quick=True, out=lambda s: None)  # doctest: +SKIP
        >>> tables[0].columns[:3]  # doctest: +SKIP
        ['shape', 'dtype', 'op']
    """
    import numpy as np
    import torch

    torch.set_num_threads(1)
    single_thread()
    # glibc hands freed blocks above its (dynamic) thresholds back to the OS and
    # page-faults them in again on the next call; freeing one 24 MB block raises those
    # thresholds, the steady state of any process that has handled a large array. Every
    # candidate, baselines included, is measured in that same state.
    np.empty(24 << 20, np.uint8).fill(0)
    peers = _peers()
    missing = [p for p in ("torchsort", "fast-soft-sort") if p not in peers]
    rows = []
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    for shape, dtype in shapes:
        size = shape[0] * shape[-1]
        # Per-call overhead decides (1, 1000): many cheap repeats steady its median.
        if size <= 1000:
            repeats = 40 if quick else 200
        else:
            repeats = 5 if quick or size >= 10**6 else 25
        x = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(dtype))
        times = interleaved(_candidates(torch, x, peers), repeats=repeats, warmup=1)
        t_sort, t_argsort = times["torch.sort"], times["numpy.argsort"]
        rows.append([f"{shape}", dtype, "torch.sort", "-", "fwd", fmt_seconds(t_sort),
                     1.0, round(t_sort / t_argsort, 2), "", "", ""])
        rows.append([f"{shape}", dtype, "numpy.argsort", "-", "fwd", fmt_seconds(t_argsort),
                     round(t_argsort / t_sort, 2), 1.0, "", "", ""])
        for key, t in times.items():
            parts = key.split("/")
            if parts[0] != "ours":
                continue
            _, op, reg, mode = parts
            row = [f"{shape}", dtype, f"soft_{op}", reg, mode, fmt_seconds(t),
                   round(t / t_sort, 2), round(t / t_argsort, 2)]
            for peer in ("torchsort", "fast-soft-sort"):
                tp = times.get(f"{peer}/{op}/{reg}/{mode}")
                row.append(round(t / tp, 2) if tp else "not installed")
            t_peer = times.get(f"torchsort/{op}/{reg}/{mode}")
            row.append(_verdict(shape, mode, t / t_sort, t / t_argsort,
                                t / t_peer if t_peer else None))
            rows.append(row)
    note = ("Median of interleaved runs, one thread, torch CPU tensors, strength 1.0, x ~ N(0, 1); "
            "ratios are ours / "
            "baseline (below 1 = faster). Every row computes the same operator as the peers "
            "(KL soft rank included: the paper's exp(P_E(z, log rho)), in [1, n]). Targets (issue 2), column 'target': at batch >= 128, "
            "fwd+bwd <= 0.5x torch.sort, <= 1.5x numpy.argsort and <= 1/3 of torchsort's "
            "time (when installed); at (1, 1000) fwd+bwd <= 2x torch.sort. The (1, 1000) "
            "fwd+bwd includes the harness (a product, a sum and backward()), which alone "
            "costs about 2x torch.sort's median there.")
    if missing:
        note += " Not installed, so not compared: " + ", ".join(missing) + "."
    table = Table(title="soft sort / soft rank (torch tensors)", columns=COLUMNS, rows=rows,
                  note=note)
    out(_render(table))
    from ._bench_fused import sort_device_table  # issue 16: CUDA tensors stay on the device

    device = sort_device_table(quick, out)
    out(f"{device.title}: {device.note}")
    return [table, device]


def _verdict(shape, mode: str, vs_sort: float, vs_argsort: float, vs_torchsort) -> str:
    """Issue 2's targets for fwd+bwd: 'met' or what was missed (blank for fwd rows)."""
    if mode != "fwd+bwd":
        return ""
    if shape[0] >= 128:
        missed = [f"{vs_sort:.2f} > 0.5x torch.sort" if vs_sort > 0.5 else "",
                  f"{vs_argsort:.2f} > 1.5x argsort" if vs_argsort > 1.5 else "",
                  f"{vs_torchsort:.2f} > 1/3 torchsort"
                  if vs_torchsort is not None and vs_torchsort > 1 / 3 else ""]
    elif shape == (1, 1000):
        missed = [f"{vs_sort:.2f} > 2x torch.sort" if vs_sort > 2.0 else ""]
    else:
        return "no target"
    missed = [m for m in missed if m]
    return "met" if not missed else "MISSED: " + ", ".join(missed)


def _render(table: Table) -> str:
    cells = [table.columns] + [[str(c) for c in r] for r in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]
    lines = [table.title]
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(table.note)
    return "\n".join(lines)
