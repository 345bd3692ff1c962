"""Run the built-in suites and write report.json, report.md, index.html, junit.xml.

Schema of ``report.json`` (``schema_version`` 2):

- ``schema``: "nonsmooth-report"; ``schema_version``: 2
- ``generated`` (ISO-8601 UTC), ``nonsmooth_version``, ``quick`` (bool), ``seconds``
- ``command``: the command line that reproduces the run; ``seed``: the fixed seed
  convention (every random draw in the suites uses a fixed seed, so a re-run on the same
  versions gives the same numbers, timings aside)
- ``partial`` (bool) and ``interrupted_reason``: true when Ctrl-C (or a crash) stopped the run
- ``passed``: every suite ran and every check passed; ``verdict``: "passed", "failed" or
  "partial"; ``headline``: one sentence stating the outcome (what the report's banner says)
- ``summary``: ``suites_total``, ``suites_passed``, ``suites_failed``, ``suites_errored``,
  ``checks_total``, ``checks_passed``, ``checks_failed``, ``warnings`` (benchmark targets
  MISSED and other findings that do not fail a suite)
- ``environment``: versions, CPU/GPU, PAV backend (see ``nonsmooth doctor``)
- ``suites``: list of ``{name, title, status, passed, summary, seconds, error, error_detail,
  warnings, checks, tables, figures}``; ``status`` is "passed", "failed" or "errored";
  ``error`` is one line, ``error_detail`` ``{type, message, where, inputs, hint, traceback}``
  (null unless errored); a check is ``{name, passed, detail, numbers}``; a table
  ``{title, columns, rows, note}``; a figure as :class:`~nonsmooth.reports.Figure`.

Schema 1 files lack ``status``, ``error_detail``, ``warnings``, ``verdict``, ``headline``,
``command``, ``seed`` and the failed/errored counts; the renderers accept both.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import os
import shlex
import sys
import time
import traceback
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

from ._environment import environment
from ._render import headline, to_html, to_junit, to_markdown
from ._suite import SuiteResult

# The report's suites in the order the issue lists them.
SUITES = ("environment", "conventions", "engine", "sort", "perturbed", "implicit", "bifurcation",
          "proofs", "benchmarks")
SCHEMA_VERSION = 2
SEED_NOTE = ("fixed: every random draw in the suites uses a seed written in the suite's code, so re-running "
             "the command on the same versions reproduces every number except timings")


class OutputDirError(ValueError):
    """The report's output folder cannot be created or written."""


def check_output_dir(out) -> Path:
    """Create ``out`` and prove it is writable, so a bad folder fails before any suite runs.

    Example:
        >>> check_output_dir("/dev/null/x")
        Traceback (most recent call last):
        ...
        nonsmooth.reports._report.OutputDirError: cannot write the report to '/dev/null/x': Not a directory
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".nonsmooth-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"cannot write the report to {str(out)!r}: {err.strerror or err}") from None
    return path


def _error_result(name: str, message: str, seconds: float = 0.0, detail: dict | None = None) -> dict:
    data = SuiteResult(name=name, title=name.capitalize(), checks=[], error=message, seconds=seconds).to_json()
    data["error_detail"] = detail
    return data


def _case_inputs(exc: BaseException) -> dict:
    """The ``inputs(...)`` attached to the exception or to one it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = getattr(exc, "nonsmooth_inputs", None)
        if found:
            return dict(found)
        exc = exc.__cause__ or exc.__context__
    return {}


def _where(tb: traceback.TracebackException) -> str:
    """The innermost frame in this package's own code: where a maintainer would look first."""
    root = str(Path(__file__).resolve().parents[1])
    mine = [f for f in tb.stack if str(Path(f.filename).resolve()).startswith(root)]
    frame = (mine or list(tb.stack) or [None])[-1]
    if frame is None:
        return ""
    try:
        shown = str(Path(frame.filename).resolve().relative_to(root))
    except ValueError:
        shown = frame.filename
    return f"{shown}:{frame.lineno} in {frame.name}"


def _hint(name: str, exc: BaseException, quick: bool) -> str:
    rerun = f"nonsmooth report --suites {name}" + (" --quick" if quick else "")
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None) or "a package"
        return (f"A package this suite needs is missing ({missing}): install it, e.g. "
                f"pip install 'nonsmooth[torch,jax,report]', or leave a framework out with --frameworks; "
                f"then re-run `{rerun}`.")
    if isinstance(exc, MemoryError):
        return f"The machine ran out of memory: re-run `{rerun} --quick`, with fewer --jobs."
    text = str(exc)
    lead = ""
    if text.lower().startswith("oracle"):
        lead = ("The independent reference (the oracle) failed on these inputs, not the code it checks; "
                "the suite's remaining checks did not run. ")
    return (lead + f"Re-run only this suite with `{rerun}`. If it fails again, it is a bug in nonsmooth: "
            "report it with report.json attached (it holds these inputs, the versions and the traceback).")


def _error_detail(name: str, exc: BaseException, *, quick: bool, frameworks, step: str) -> dict:
    tb = traceback.TracebackException.from_exception(exc)
    inputs = {"suite": name, "quick": quick,
              "frameworks": ",".join(frameworks) if frameworks else "all installed"}
    if step:
        inputs["step"] = step
    inputs.update(_case_inputs(exc))
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "where": _where(tb),
        "inputs": inputs,
        "hint": _hint(name, exc, quick),
        "traceback": "".join(tb.format()),
    }


def run_suite(name: str, quick: bool, frameworks=None, progress=None) -> dict:
    """Run one suite by name and return its JSON dict; a failure inside is captured, not raised."""
    t0 = time.perf_counter()
    last_step = [""]

    def note(message):
        last_step[0] = str(message)
        if progress is not None:
            progress(message)

    try:
        module = importlib.import_module(f"nonsmooth.reports._suite_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"nonsmooth.reports._suite_{name}":
            return _error_result(name, f"suite {name!r} is not part of this installation")
        detail = _error_detail(name, exc, quick=quick, frameworks=frameworks, step="import")
        return _error_result(name, f"{detail['type']}: {detail['message']}", time.perf_counter() - t0, detail)
    kwargs = {"quick": quick, "progress": note}
    if frameworks is not None and "frameworks" in inspect.signature(module.run).parameters:
        kwargs["frameworks"] = tuple(frameworks)
    try:
        result = module.run(**kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        detail = _error_detail(name, exc, quick=quick, frameworks=frameworks, step=last_step[0])
        first = (detail["message"].splitlines() or [""])[0]
        return _error_result(name, f"{detail['type']}: {first}", time.perf_counter() - t0, detail)
    # The runner's wall clock, import included, so every suite is timed the same way.
    result = SuiteResult(**{**result.__dict__, "seconds": time.perf_counter() - t0})
    return result.to_json()


class _Progress:
    """A tqdm bar over the suites on a terminal; plain lines (no carriage returns) otherwise."""

    def __init__(self, total: int, *, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        isatty = getattr(self.stream, "isatty", lambda: False)
        if enabled and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="suite", dynamic_ncols=True, leave=False,
                            bar_format="{desc} {bar:16} {n_fmt}/{total_fmt} suites [{elapsed}] {postfix}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def start(self, i: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{name:<12}")
            self.bar.set_postfix_str("")
        else:
            self._line(f"[{i}/{self.total}] {name}: running")

    def step(self, message) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(str(message)[:70])

    def finish(self, i: int, name: str, result: dict) -> None:
        if not self.enabled:
            return
        status = result.get("status") or ("passed" if result["passed"] else "failed")
        n, k = len(result["checks"]), sum(bool(c["passed"]) for c in result["checks"])
        extra = f": {result['error']}" if result.get("error") else ""
        if result.get("warnings"):
            extra += f"; {len(result['warnings'])} warning(s)"
        self._line(f"[{i}/{self.total}] {name:<12} {status.upper() if status != 'passed' else status} "
                   f"{k}/{n} checks ({result['seconds']:.1f} s){extra}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out = check_output_dir(out)
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


def _command(out, quick, frameworks, suites, jobs, scheduler) -> str:
    parts = ["nonsmooth", "report", "--out", str(out)]
    if quick:
        parts.append("--quick")
    if frameworks:
        parts += ["--frameworks", ",".join(frameworks)]
    if suites:
        parts += ["--suites", ",".join(suites)]
    if scheduler:
        parts += ["--scheduler", scheduler]
    elif jobs and jobs > 1:
        parts += ["--jobs", str(jobs)]
    return shlex.join(parts)


def _assemble(suites: list[dict], *, quick: bool, seconds: float, partial: bool, reason: str = "",
              command: str = "") -> dict:
    from nonsmooth import __version__

    checks = [c for s in suites for c in s["checks"]]
    errored = sum(bool(s.get("error")) for s in suites)
    passed = sum(bool(s["passed"]) for s in suites)
    report = {
        "schema": "nonsmooth-report",
        "schema_version": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nonsmooth_version": __version__,
        "quick": quick,
        "seconds": seconds,
        "command": command,
        "seed": SEED_NOTE,
        "partial": partial,
        "interrupted_reason": reason,
        "passed": (not partial) and all(s["passed"] for s in suites),
        "summary": {
            "suites_total": len(suites),
            "suites_passed": passed,
            "suites_failed": len(suites) - passed - errored,
            "suites_errored": errored,
            "checks_total": len(checks),
            "checks_passed": sum(bool(c["passed"]) for c in checks),
            "checks_failed": sum(not c["passed"] for c in checks),
            "warnings": sum(len(s.get("warnings") or []) for s in suites),
        },
        "environment": environment(),
        "suites": suites,
    }
    report["verdict"] = "partial" if partial else ("passed" if report["passed"] else "failed")
    report["headline"] = headline(report)
    return report


def run_report(*, out: str | os.PathLike = "nonsmooth-report", quick: bool = False,
               frameworks=None, suites=None, jobs: int = 1, scheduler: str | None = None,
               executor: Executor | None = None, show_progress: bool = True,
               command: str | None = None) -> tuple[dict, dict]:
    """Run the suites and write the four report files to ``out``.

    Returns ``(report_dict, paths)``.  The output folder is checked first (an
    :class:`OutputDirError` before any suite runs).  Ctrl-C stops the run and still writes
    what was done, marked ``partial``.  ``command`` is recorded as the command line that
    reproduces the run (default: the equivalent ``nonsmooth report ...``).

    Example:
        >>> report, paths = run_report(out="/tmp/r", quick=True, suites=["environment"],
        ...                            show_progress=False)
        >>> report["suites"][0]["name"], report["verdict"]
        ('environment', 'passed')
    """
    names = list(suites) if suites else list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown!r}; choose from {', '.join(SUITES)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    check_output_dir(out)
    if command is None:
        command = _command(out, quick, frameworks, suites, jobs, scheduler)
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
    bar = _Progress(len(names), enabled=show_progress)
    try:
        if executor is None:
            for i, name in enumerate(names, 1):
                bar.start(i, name)
                result = run_suite(name, quick, frameworks, bar.step if show_progress else None)
                done.append(result)
                bar.finish(i, name, result)
        else:
            futures = [(name, executor.submit(run_suite, name, quick, frameworks, None)) for name in names]
            for i, (name, fut) in enumerate(futures, 1):  # all running already: report them as they end
                result = fut.result()
                done.append(result)
                bar.finish(i, name, result)
    except KeyboardInterrupt:
        partial, reason = True, f"interrupted (Ctrl-C) after {len(done)} of {len(names)} suites"
        if show_progress:
            bar.close()
            sys.stderr.write(f"\n{reason}; writing a partial report\n")
    finally:
        bar.close()
        if own_executor is not None:
            own_executor.shutdown(wait=not partial, cancel_futures=True)
        if client is not None:
            client.close()
    report = _assemble(done, quick=quick, seconds=time.perf_counter() - t0, partial=partial, reason=reason,
                       command=command)
    paths = write_report(report, Path(out))
    return report, paths
