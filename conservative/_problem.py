"""Stage 1, tracing: ``f`` at ``x`` as a traced program with its float64 interpreter.

Contract: :class:`Problem` either holds a graph whose float64 evaluation is the
framework's own primitives applied in order (``graph_function``), or ``trace_error``
saying why tracing failed.  Which side of a kink a point lies on is decided with the
framework's own arithmetic as well as float64: a kink the user's dtype lands on exactly
(float32 rounding) or that XLA sees because it flushes subnormals to zero is active,
so the engine and the framework agree about where the kinks are.

The tracers are not reentrant (torch's functorch levels, jax's trace state), so every
entry point of the engine holds :data:`ENGINE_LOCK`: concurrent audits run one after
the other and give the serial results.
"""
from __future__ import annotations

import importlib
import math
import platform
import threading
import weakref
from typing import Callable

import numpy as np

from . import _forward as F

__all__ = ["ENGINE_LOCK", "Problem", "TooLarge", "check_size", "framework_of", "ad_jacobian", "versions"]

ENGINE_LOCK = threading.RLock()
MAX_TANGENT_FLOATS = 2 * 10**8  # 1.6 GB of float64 tangents at the widest intermediate


def framework_of(x) -> str:
    leaves = x if isinstance(x, (tuple, list)) else (x,)
    if len(leaves) == 0:
        raise ValueError("x must be an array or a non-empty tuple of arrays, got an empty tuple")
    mods = {type(a).__module__.split(".")[0] for a in leaves}
    if mods <= {"torch"}:
        return "torch"
    if mods <= {"jax", "jaxlib"}:
        return "jax"
    raise TypeError(
        f"x must be torch tensors or jax arrays (all of one framework); got {sorted(type(a).__name__ for a in leaves)}. "
        "Convert NumPy inputs with torch.as_tensor or jnp.asarray."
    )


def adapter(framework: str):
    mod = "_trace_torch" if framework == "torch" else "_trace_jax"
    return importlib.import_module(f".{mod}", __package__)


_TRACE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_get(f, key):
    try:
        return _TRACE_CACHE.get(f, {}).get(key)
    except TypeError:  # f cannot be weakly referenced
        return None


def _cache_put(f, key, graph):
    try:
        _TRACE_CACHE.setdefault(f, {})[key] = graph
    except TypeError:
        pass


def cache_drop(f):
    try:
        _TRACE_CACHE.pop(f, None)
    except TypeError:
        pass


class Problem:
    """``f`` traced at ``x``, with its float64 interpreter."""

    def __init__(self, f: Callable, x, *, kink_tol: float, graph=None, use_cache: bool = True):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if not isinstance(kink_tol, (int, float)) or not math.isfinite(kink_tol) or kink_tol < 0:
            raise ValueError(f"kink_tol must be a finite number >= 0, got {kink_tol!r}")
        self.framework = framework_of(x)
        self.A = adapter(self.framework)
        self.f = f
        self.xs = self.A.as_inputs(x)
        for i, t in enumerate(self.xs):
            a = np.asarray(self.A.to_numpy(t), dtype=np.float64)
            if a.size == 0:
                raise ValueError(f"x[{i}] is empty (shape {tuple(a.shape)}); audit needs at least one input element")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"x[{i}] contains NaN or inf (e.g. {a[~np.isfinite(a)][:3].tolist()}); audit needs a finite point")
        self.dtype = self.A.dtype_name(self.xs)
        self.eps = self.A.eps_of(self.xs)
        self.kink_tol = float(kink_tol)
        self.trace_error = None
        self.cached = False
        key = (self.framework, tuple((tuple(t.shape), str(t.dtype)) for t in self.xs))
        if graph is None and use_cache:
            graph = _cache_get(f, key)
            self.cached = graph is not None
        if graph is None:
            try:
                graph = self.A.trace(f, self.xs)
                if use_cache:
                    _cache_put(f, key, graph)
            except self.A.TraceError as e:
                self.trace_error = str(e)
        self.graph = graph
        self._key = key
        if self.graph is not None:
            # one backend per graph: it caches each node's float64 constant arguments
            self.be = getattr(self.graph, "_backend", None) or self.A.Backend()
            self.graph._backend = self.be
            self.xs64 = [self.A.to64(t) for t in self.xs]
            self.shadow = self._shadow_values()
            self.interp = F.Interpreter(self.graph, self.be, self.xs64, kink_tol=self.kink_tol,
                                        shadow=self.shadow, flush=self.A.flushes_subnormals(self.dtype))
            self.n_in = self.interp.n_in
            self.n_out = sum(v.size for v in self.graph.outputs)

    def _shadow_values(self) -> dict:
        """The nonsmooth primitives' inputs as the framework computes them in the user's dtype
        (float32 rounding can land exactly on a kink that float64 misses)."""
        if self.dtype == "float64" or not self.graph.nonsmooth_nodes():
            return {}
        try:
            return self.A.shadow_inputs(self.graph, self.xs)
        except Exception:  # the float64 analysis stands on its own; this only adds kinks
            return {}

    def tangents(self, M: np.ndarray | None):
        if M is None:
            return self.be.identity_tangents(self.xs64)
        return self.be.tangents_from(M, self.xs64)

    def run(self, policy, M=None, **kw):
        return self.interp.run(policy, self.tangents(M), **kw)

    def values_at(self, xflat: np.ndarray) -> np.ndarray:
        """f at another point (float64, through the same trace)."""
        outs = self.interp.graph_function()(*self.split(xflat))
        return np.concatenate([np.asarray(self.be.asnumpy(v), dtype=np.float64).reshape(-1) for v in outs])

    def split(self, xflat: np.ndarray) -> list:
        xs, o = [], 0
        for t in self.xs64:
            s = int(np.prod(t.shape)) if len(t.shape) else 1
            xs.append(self.be.asarray(np.asarray(xflat[o : o + s], dtype=np.float64).reshape(tuple(t.shape))))
            o += s
        return xs

    def x_flat(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.be.asnumpy(t), dtype=np.float64).reshape(-1) for t in self.xs64])


class TooLarge(ValueError):
    pass


def check_size(P: Problem) -> None:
    widest = max([v.size for n in P.graph.nodes for v in n.outputs if v.is_float] + [1])
    if P.n_in * widest > MAX_TANGENT_FLOATS:
        raise TooLarge(
            f"x has {P.n_in} elements and the widest intermediate {widest}: the dense tangent matrix at the kinks "
            f"({P.n_in * widest:.3g} floats) exceeds {MAX_TANGENT_FLOATS:.0e}. Audit a function of fewer inputs "
            "(e.g. close over the rest of x) or a smaller slice of the model."
        )


def versions(P) -> dict:
    import scipy

    return {**P.A.versions(), "numpy": np.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


def ad_jacobian(P: Problem, n_out: int | None):
    """What the framework's reverse mode returns for the user's f, and f(x); or the error."""
    try:
        jac, y = P.A.ad_jacobian(P.f, P.xs, n_out)
        return (jac, y), ""
    except Exception as e:  # what the framework itself says about f
        return None, f"{type(e).__name__}: {e}"
