"""Where the assertion helpers report each audit they perform.

Plain Python with no heavy imports: the pytest plugin installs a sink here (for
``--nonsmooth-json``), and anyone else may too (``add_sink``).  Records are dicts that
``json.dumps`` accepts.
"""
from __future__ import annotations

from typing import Callable

_sinks: list[Callable[[dict], None]] = []
_context: dict = {}


def add_sink(sink: Callable[[dict], None]) -> Callable[[], None]:
    """Call ``sink(record)`` for every audit the assertion helpers perform; returns a remover.

    Example:
        >>> seen = []
        >>> remove = add_sink(seen.append)
        >>> emit({"helper": "demo"}); remove()
        >>> seen[0]["helper"]
        'demo'
    """
    _sinks.append(sink)

    def remove() -> None:
        if sink in _sinks:
            _sinks.remove(sink)

    return remove


def set_context(**values) -> None:
    """Fields merged into every later record (the plugin sets the current test id)."""
    for key, value in values.items():
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def emit(record: dict) -> None:
    """Hand ``record`` (plus the current context) to every sink."""
    if not _sinks:
        return
    full = {**_context, **record}
    for sink in list(_sinks):
        sink(full)
