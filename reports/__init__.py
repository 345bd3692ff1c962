"""The correctness report and the ``nonsmooth`` command line.

Example:
    >>> from nonsmooth.reports import run_report
    >>> report, paths = run_report(out="/tmp/nonsmooth-report", quick=True,
    ...                            suites=["environment"], show_progress=False)
    >>> sorted(paths)
    ['html', 'json', 'junit', 'markdown']
"""
from ._render import to_html, to_junit, to_markdown
from ._report import SUITES, run_report, run_suite, write_report
from ._suite import Check, Figure, SuiteResult, Table, inputs

__all__ = [
    "SUITES",
    "Check",
    "Figure",
    "SuiteResult",
    "Table",
    "inputs",
    "run_report",
    "run_suite",
    "to_html",
    "to_junit",
    "to_markdown",
    "write_report",
]
