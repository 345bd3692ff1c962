"""Report suite 8: the ratio tables of ``nonsmooth bench`` (quick sizes in a quick report).

Timings are reported, not judged: a slow or busy machine must not fail a correctness
report.  A target a benchmark did not meet is still never hidden: every table cell that
starts with ``MISSED`` (and every number over the bound of a column headed
``... (target <= X)``) becomes a warning of this suite, which the report's headline
counts and lists.

A benchmark module may also return :class:`~nonsmooth.reports.Figure` objects among its
tables (e.g. a cost curve); they are drawn in this suite's section.
"""
from __future__ import annotations

import importlib
import io
import re
import time
import traceback

from ._suite import Check, Figure, SuiteResult, Table

BENCHMARKS = ("pav", "sort", "engine", "perturbed", "implicit")
_BOUND = re.compile(r"\(target\s*<=\s*([0-9.eE+-]+)\)")


def missed_targets(name: str, table: Table) -> list[str]:
    """One line per target the table marks as not met, naming the row it is on."""
    out = []
    bounds = {}
    for j, col in enumerate(table.columns):
        m = _BOUND.search(str(col))
        if m:
            bounds[j] = float(m.group(1))
    for row in table.rows:
        where = " ".join(str(c) for c in row[:5] if isinstance(c, str) and not str(c).startswith("MISSED"))
        for j, cell in enumerate(row):
            if isinstance(cell, str) and cell.startswith("MISSED"):
                out.append(f"{name}: {where}: {cell}")
            elif j in bounds and isinstance(cell, (int, float)) and cell > bounds[j]:
                out.append(f"{name}: {where}: MISSED: {table.columns[j]} = {cell:g} > {bounds[j]:g}")
    return out


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    t0 = time.perf_counter()
    checks, tables, figures, warnings = [], [], [], []
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
            checks.append(Check(f"benchmark {name} ran", False, traceback.format_exc()))
            continue
        n_tables = 0
        for t in got:
            if isinstance(t, Figure):
                figures.append(t)
                continue
            t = t if isinstance(t, Table) else Table(**t)
            tables.append(t)
            warnings.extend(missed_targets(name, t))
            n_tables += 1
        checks.append(Check(f"benchmark {name} ran", True, f"{n_tables} table(s)"))
    summary = ("Median times and ratios against named baselines measured in the same process (one thread). "
               "Timings are informative, not pass/fail")
    summary += (f"; {len(warnings)} target(s) MISSED on this run, listed as warnings." if warnings
                else "; every stated target was met on this run.")
    return SuiteResult(name="benchmarks", title="Benchmarks", checks=checks, tables=tables, figures=figures,
                       summary=summary, warnings=warnings, seconds=time.perf_counter() - t0)
