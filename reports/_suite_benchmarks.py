"""Report suite 8: the ratio tables of ``nonsmooth bench`` (quick sizes in a quick report)."""
from __future__ import annotations

import importlib
import io
import time
import traceback

from ._suite import Check, SuiteResult, Table

BENCHMARKS = ("pav", "sort", "engine", "perturbed", "implicit")


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    t0 = time.perf_counter()
    checks, tables = [], []
    for name in BENCHMARKS:
        if progress:
            progress(f"bench {name}")
        try:
            module = importlib.import_module(f"nonsmooth.reports._bench_{name}")
        except ModuleNotFoundError:
            continue
        sink = io.StringIO()
        try:
            got = module.run(quick=quick, out=lambda *a, **k: print(*a, file=sink, **k))
        except Exception:
            checks.append(Check(f"benchmark {name} ran", False, traceback.format_exc()[-800:]))
            continue
        # Timings are reported, not judged: a slow machine must not fail a correctness report.
        checks.append(Check(f"benchmark {name} ran", True, f"{len(got)} table(s)"))
        for t in got:
            tables.append(t if isinstance(t, Table) else Table(**t))
    return SuiteResult(name="benchmarks", title="Benchmarks", checks=checks, tables=tables,
                       summary="Median times and ratios against named baselines measured in the same "
                               "process (one thread). Timings are informative, not pass/fail.",
                       seconds=time.perf_counter() - t0)
