"""The data a report suite returns: checks with the numbers behind them, tables, figures.

Suites live in ``reports/_suite_<name>.py`` and expose ``run(*, quick: bool = False,
progress=None) -> SuiteResult``.  Everything here is plain data so ``report.json`` is a
faithful dump of it, and the renderers (Markdown, HTML, JUnit) read only that dump.

A suite that wants an error to name the case it was working on wraps the work in
:func:`inputs`; the runner shows those values next to the exception.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

# Figure kinds the renderer draws (see ``reports/_plot.py``).
FIGURE_KINDS = ("line", "bar", "image", "interval")


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become strings; arrays become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


@contextlib.contextmanager
def inputs(**values):
    """Attach ``values`` to any exception raised inside, for the report's error block.

    The innermost ``inputs`` wins, so wrap the smallest step that names the case.

    Example:
        >>> try:
        ...     with inputs(op="rank", n=5, eps=0.3):
        ...         raise RuntimeError("oracle failed")
        ... except RuntimeError as err:
        ...     err.nonsmooth_inputs
        {'op': 'rank', 'n': 5, 'eps': 0.3}
    """
    try:
        yield
    except Exception as exc:
        if getattr(exc, "nonsmooth_inputs", None) is None:
            try:
                exc.nonsmooth_inputs = _jsonable(values)
            except AttributeError:  # an exception type with __slots__: nothing to attach to
                pass
        raise


@dataclasses.dataclass(frozen=True)
class Check:
    """One pass/fail check.  ``numbers`` holds the measured values behind the verdict."""

    name: str
    passed: bool
    detail: str = ""
    numbers: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Table:
    """A table: ``columns`` names, ``rows`` lists of cells (str/float/int).

    A cell whose text starts with ``MISSED`` marks a benchmark target that was not met;
    the report counts and highlights it.
    """

    title: str
    columns: list
    rows: list
    note: str = ""

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Figure:
    """A plot as data; the report draws it with matplotlib (inline SVG in the HTML).

    ``kind``:

    - ``"line"``: ``x`` shared by every series (None or NaN leaves a gap);
    - ``"bar"``: ``x`` are category labels, one bar per series and category;
      ``errors`` may give ``{series: [[low, high], ...]}`` for error bars;
    - ``"image"``: ``series`` is ``{"z": 2-D list}`` with ``z[i][j]`` at ``(x[j], y[i])``;
      ``zlabel`` names the colour scale, ``levels`` (optional) names discrete values;
    - ``"interval"``: ``x`` are category labels drawn top to bottom, ``intervals`` is
      ``{name: [[low, high], ...]}`` (a shaded range per category) and every series a
      marker per category.

    ``title`` and ``caption`` become the figure's caption in the HTML; ``reference`` draws
    horizontal reference lines ``{label: y}``; ``headline`` puts the figure on the report's
    first screen.
    """

    title: str
    kind: str
    x: list
    series: dict
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    y: list = dataclasses.field(default_factory=list)
    caption: str = ""
    headline: bool = False
    zlabel: str = ""
    levels: dict = dataclasses.field(default_factory=dict)
    errors: dict = dataclasses.field(default_factory=dict)
    intervals: dict = dataclasses.field(default_factory=dict)
    reference: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in FIGURE_KINDS:
            raise ValueError(f"Figure kind must be one of {FIGURE_KINDS}, got {self.kind!r}")

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class SuiteResult:
    """What one suite found.  ``warnings`` are findings that do not fail the suite
    (a benchmark target MISSED on a busy machine); the report shows them in its headline."""

    name: str
    title: str
    checks: list
    tables: list = dataclasses.field(default_factory=list)
    figures: list = dataclasses.field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    error: str = ""
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "status": "errored" if self.error else ("passed" if self.passed else "failed"),
            "summary": self.summary,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "error_detail": None,
            "warnings": [str(w) for w in self.warnings],
            "checks": [c.to_json() for c in self.checks],
            "tables": [t.to_json() for t in self.tables],
            "figures": [f.to_json() for f in self.figures],
        }
