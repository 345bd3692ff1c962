"""The data a report suite returns: checks with the numbers behind them, tables, figures.

Suites live in ``reports/_suite_<name>.py`` and expose ``run(*, quick: bool = False,
progress=None) -> SuiteResult``.  Everything here is plain data so ``report.json`` is a
faithful dump of it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


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
    """A table: ``columns`` names, ``rows`` lists of cells (str/float/int)."""

    title: str
    columns: list
    rows: list
    note: str = ""

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Figure:
    """A line or bar chart as data; the report renders it (SVG in the HTML).

    ``kind`` is "line" (``x`` shared by every series), "bar" (``x`` are category
    labels) or "image" (``series`` holds {"z": 2-D list} on the grid ``x`` by ``y``).
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

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class SuiteResult:
    name: str
    title: str
    checks: list
    tables: list = dataclasses.field(default_factory=list)
    figures: list = dataclasses.field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "summary": self.summary,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "checks": [c.to_json() for c in self.checks],
            "tables": [t.to_json() for t in self.tables],
            "figures": [f.to_json() for f in self.figures],
        }
