"""Run the built-in suites and write report.json, report.md, index.html, junit.xml.

Schema of ``report.json`` (``schema_version`` 1):

- ``schema``: "nonsmooth-report"; ``schema_version``: 1
- ``generated`` (ISO-8601 UTC), ``nonsmooth_version``, ``quick`` (bool), ``seconds``
- ``partial`` (bool) and ``interrupted_reason``: true when Ctrl-C (or a crash) stopped the run
- ``passed``: every suite ran and every check passed
- ``summary``: ``suites_total``, ``suites_passed``, ``checks_total``, ``checks_passed``
- ``environment``: versions, CPU/GPU, PAV backend (see ``nonsmooth doctor``)
- ``suites``: list of ``{name, title, passed, summary, seconds, error, checks, tables, figures}``;
  a check is ``{name, passed, detail, numbers}``; a table ``{title, columns, rows, note}``;
  a figure ``{title, kind, x, y, series, xlabel, ylabel, logx, logy}``.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

from ._environment import environment
from ._render import to_html, to_junit, to_markdown
from ._suite import SuiteResult

# The report's suites in the order the issue lists them.
SUITES = ("environment", "conventions", "engine", "sort", "perturbed", "implicit", "bifurcation",
          "proofs", "benchmarks")
SCHEMA_VERSION = 1


def _error_result(name: str, message: str, seconds: float = 0.0) -> SuiteResult:
    return SuiteResult(name=name, title=name.capitalize(), checks=[], error=message, seconds=seconds)


def run_suite(name: str, quick: bool, frameworks=None, progress=None) -> dict:
    """Run one suite by name and return its JSON dict; a failure inside is captured, not raised."""
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"nonsmooth.reports._suite_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"nonsmooth.reports._suite_{name}":
            return _error_result(name, f"suite {name!r} is not part of this installation").to_json()
        return _error_result(name, traceback.format_exc(), time.perf_counter() - t0).to_json()
    kwargs = {"quick": quick, "progress": progress}
    if frameworks is not None and "frameworks" in inspect.signature(module.run).parameters:
        kwargs["frameworks"] = tuple(frameworks)
    try:
        result = module.run(**kwargs)
    except KeyboardInterrupt:
        raise
    except Exception:
        return _error_result(name, traceback.format_exc(), time.perf_counter() - t0).to_json()
    # The runner's wall clock, import included, so every suite is timed the same way.
    result = SuiteResult(**{**result.__dict__, "seconds": time.perf_counter() - t0})
    return result.to_json()


def _progress_line(i, n, name, status, *, final=False):
    # A live bar on a terminal; one line per finished suite in logs (no carriage-return soup).
    if sys.stderr.isatty():
        sys.stderr.write(f"\r[{i}/{n}] {name:<12} {status:<60}" + ("\n" if final else ""))
    elif final:
        sys.stderr.write(f"[{i}/{n}] {name:<12} {status}\n")
    sys.stderr.flush()


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "html": out / "index.html",
        "junit": out / "junit.xml",
    }
    paths["json"].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    paths["html"].write_text(to_html(report))
    paths["junit"].write_text(to_junit(report))
    return paths


def _assemble(suites: list[dict], *, quick: bool, seconds: float, partial: bool, reason: str = "") -> dict:
    from nonsmooth import __version__

    checks = [c for s in suites for c in s["checks"]]
    return {
        "schema": "nonsmooth-report",
        "schema_version": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nonsmooth_version": __version__,
        "quick": quick,
        "seconds": seconds,
        "partial": partial,
        "interrupted_reason": reason,
        "passed": (not partial) and all(s["passed"] for s in suites),
        "summary": {
            "suites_total": len(suites),
            "suites_passed": sum(s["passed"] for s in suites),
            "checks_total": len(checks),
            "checks_passed": sum(bool(c["passed"]) for c in checks),
        },
        "environment": environment(),
        "suites": suites,
    }


def run_report(*, out: str | os.PathLike = "nonsmooth-report", quick: bool = False,
               frameworks=None, suites=None, jobs: int = 1, scheduler: str | None = None,
               executor: Executor | None = None, show_progress: bool = True) -> tuple[dict, dict]:
    """Run the suites and write the four report files to ``out``.

    Returns ``(report_dict, paths)``.  Ctrl-C stops the run and still writes what was
    done, marked ``partial``.

    Example:
        >>> report, paths = run_report(out="/tmp/r", quick=True, suites=["environment"],
        ...                            show_progress=False)
        >>> report["suites"][0]["name"]
        'environment'
    """
    names = list(suites) if suites else list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown!r}; choose from {', '.join(SUITES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    t0 = time.perf_counter()
    done: list[dict] = []
    partial, reason = False, ""
    own_executor = client = None
    if executor is None and scheduler:
        try:
            from distributed import Client
        except ImportError as exc:
            raise RuntimeError("--scheduler needs Dask distributed: pip install 'nonsmooth[dask]'") from exc
        client = Client(scheduler)
        executor = client.get_executor()
    if executor is None and jobs > 1:
        executor = own_executor = ProcessPoolExecutor(max_workers=jobs)
    progress = None
    try:
        if executor is None:
            for i, name in enumerate(names, 1):
                if show_progress:
                    _progress_line(i, len(names), name, "running")
                    progress = (lambda msg, i=i, name=name: _progress_line(i, len(names), name, str(msg)[:60]))
                result = run_suite(name, quick, frameworks, progress)
                done.append(result)
                if show_progress:
                    _progress_line(i, len(names), name,
                                   f"{'pass' if result['passed'] else 'FAIL'} ({result['seconds']:.1f} s)",
                                   final=True)
        else:
            futures = [(name, executor.submit(run_suite, name, quick, frameworks, None)) for name in names]
            for i, (name, fut) in enumerate(futures, 1):
                result = fut.result()
                done.append(result)
                if show_progress:
                    _progress_line(i, len(names), name,
                                   f"{'pass' if result['passed'] else 'FAIL'} ({result['seconds']:.1f} s)",
                                   final=True)
    except KeyboardInterrupt:
        partial, reason = True, f"interrupted (Ctrl-C) after {len(done)} of {len(names)} suites"
        if show_progress:
            sys.stderr.write(f"\n{reason}; writing a partial report\n")
    finally:
        if own_executor is not None:
            own_executor.shutdown(wait=not partial, cancel_futures=True)
        if client is not None:
            client.close()
    report = _assemble(done, quick=quick, seconds=time.perf_counter() - t0, partial=partial, reason=reason)
    paths = write_report(report, Path(out))
    return report, paths
