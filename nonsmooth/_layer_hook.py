"""The switch between the package's own layers and the audit engine.  Framework-free.

While the engine traces ``f`` (:func:`active` is True on this thread), the package's
layers -- soft sort/rank, the hard combinatorial solvers, perturbed layers and
Fenchel-Young losses, identity/blackbox backward passes, implicit layers -- do not run
their usual code: each calls :func:`route` once, which hands the call to the engine's
layer registry (``nonsmooth.conservative._layers``).  The trace then holds one opaque node
per layer, whose pieces, kinks and Jacobians the engine knows.  Outside a trace
:func:`active` is False and every layer takes its normal code path, so what users
differentiate is exactly what they would differentiate without the engine.

Contract: importing this module imports nothing else of the package and no framework;
the solvers depend on it, never on the engine.  The engine installs its handler before
it traces (:func:`install`), and evaluates layers with :func:`suspended` around its own
calls of their code, so a layer evaluated *by* the engine never routes to it again.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["active", "tracing_now", "engine_tracing", "suspended", "install", "route"]

_STATE = threading.local()
_HANDLER = None


def active() -> bool:
    """True while the audit engine traces a program on this thread."""
    return getattr(_STATE, "depth", 0) > 0 and not getattr(_STATE, "suspended", 0)


def tracing_now() -> bool:
    """True while the engine's tracer runs on this thread, even inside :func:`suspended`."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def engine_tracing():
    """Marks the engine's tracing of ``f`` (entered by the engine's tracers only)."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@contextlib.contextmanager
def suspended():
    """The engine runs a layer's own code (its float64 forward, a nested solve): layers
    called there take their normal path."""
    _STATE.suspended = getattr(_STATE, "suspended", 0) + 1
    try:
        yield
    finally:
        _STATE.suspended -= 1


def install(handler) -> None:
    """Set the engine's handler ``handler(kind, arrays, params) -> outputs``."""
    global _HANDLER
    _HANDLER = handler


def route(kind: str, *arrays, **params):
    """Hand one layer call to the engine (only while :func:`active`)."""
    if _HANDLER is None:  # pragma: no cover - the engine installs it before tracing
        raise RuntimeError("nonsmooth: a layer was routed to the audit engine, but no engine is installed")
    return _HANDLER(kind, arrays, params)
