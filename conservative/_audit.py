"""``audit``: what AD returns through a nonsmooth program, the Clarke Jacobian it should be
in, and a verdict that never overclaims.

The pipeline, one module per stage: tracing (:mod:`._problem`) -> forward tangents
(:mod:`._forward`) -> pieces and their exactness contract (:mod:`._pieces`, with
:mod:`._elements` collecting every source of elements) -> certificate
(:mod:`._certificate`) -> verdict and explanation (:mod:`._verdict`, :mod:`._result`).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from . import _forward as F
from . import _layers as L
from ._certificate import reproduces
from ._elements import analyse
from ._lp import hull_residual
from ._problem import ENGINE_LOCK, Problem, TooLarge, ad_jacobian, cache_drop
from ._result import ActiveKink, Audit, ClarkeSet, Verdict
from ._verdict import undecided, verdict

__all__ = ["Verdict", "ActiveKink", "Audit", "ClarkeSet", "audit", "audit_batch", "check_int"]


def check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _stop_gradient_changes_derivative(P) -> str:
    """detach/stop_gradient make AD differentiate another function than f; say so when it
    changes the derivative here (softmax's max shift does not)."""
    from ._forward import STOP

    stops = [n for n in P.graph.nodes if n.prim in STOP and any(
        hasattr(v, "id") and v.id in P.interp.live for v in n.inputs)]
    if not stops and getattr(P.graph.nodes, "virtual", None) is not None:  # inside loop bodies (_loops)
        from ._loops import has_live_stop

        stops = [True] if has_live_stop(P) else []
    if not stops:
        return ""
    try:
        P.interp.stop_identity = False
        J_ad = P.run(F.LexPolicy())[0].jac
        P.interp.stop_identity = True
        J_f = P.run(F.LexPolicy())[0].jac
    finally:
        P.interp.stop_identity = False
    scale = 1.0 + float(np.max(np.abs(J_f))) if J_f.size else 1.0
    if np.all(np.isfinite(J_f)) and np.all(np.isfinite(J_ad)) and float(np.max(np.abs(J_f - J_ad))) <= 1e-12 * scale:
        return ""
    return ("f applies detach/stop_gradient to a value that depends on x, and that changes the derivative: AD "
            "differentiates f with that value held constant, which is not a derivative of f itself (read as the "
            "identity, detach would give a different Jacobian), so the engine makes no claim")


def audit(f: Callable, x, *, kink_tol: float = 0.0, exact_budget: int = 16, n_directions: int = 64,
          seed: int = 0, _graph=None) -> Audit:
    """Audit what reverse-mode AD returns for ``f`` at ``x``.

    ``f`` maps torch tensors (or jax arrays) to an array (or a tuple of arrays, whose
    elements are the Jacobian's rows, in order); ``x`` is one array, or a tuple of arrays
    passed to ``f`` as separate arguments (their elements are the columns, in order).
    Any float dtype: AD runs in it, the analyses in float64, and a kink counts as active
    where either float64 or the framework's own arithmetic (its dtype, its flushing of
    subnormals) puts the point on it.  The trace is cached per ``f`` and shapes, and
    checked against ``f(x)`` on every call.  ``kink_tol`` widens "at a kink" to
    ``|distance| <= kink_tol``; ``exact_budget`` caps the number of active kinks whose
    pieces are enumerated exactly (one layer of independent kinks, as in ``relu(W x)``,
    is decided as a Minkowski sum without enumeration, whatever the budget); ``n_directions`` is the number of random LD direction
    matrices and of sampled vertex choices.

    Thread safety: calls from several threads are serialized (the tracers of torch and
    jax are not reentrant), so concurrent audits return exactly the serial results.

    Example:
        >>> import torch
        >>> a = audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1))
        >>> a.verdict.value, a.ad_jacobian.tolist(), a.b_subdifferential.tolist()
        ('SPURIOUS', [[0.0]], [[[1.0]]])
    """
    if not isinstance(kink_tol, (int, float)) or isinstance(kink_tol, bool) or not math.isfinite(kink_tol) or kink_tol < 0:
        raise ValueError(f"kink_tol must be a finite number >= 0, got {kink_tol!r}")
    check_int("exact_budget", exact_budget, 0)
    check_int("n_directions", n_directions, 1)
    check_int("seed", seed, 0)
    with ENGINE_LOCK:
        return _audit(f, x, kink_tol=float(kink_tol), exact_budget=exact_budget, n_directions=n_directions,
                      seed=seed, graph=_graph)


def _audit(f, x, *, kink_tol, exact_budget, n_directions, seed, graph):
    P = Problem(f, x, kink_tol=kink_tol, graph=graph)
    got, ad_err = ad_jacobian(P, getattr(P, "n_out", None))
    if got is not None or P.graph is None or getattr(P.graph.nodes, "virtual", None) is None:
        return _decide(P, f, x, got, ad_err, kink_tol=kink_tol, exact_budget=exact_budget,
                       n_directions=n_directions, seed=seed)
    # control flow the framework's reverse mode refuses (jax's while_loop): audit what its
    # forward mode returns instead, and say so (_loops)
    from ._loops import reverse_mode_fallback, with_ad_mode

    got, mode, note = reverse_mode_fallback(P, ad_err)
    res = _decide(P, f, x, got, ad_err, kink_tol=kink_tol, exact_budget=exact_budget, n_directions=n_directions,
                  seed=seed)
    return with_ad_mode(res, mode, note)


def _decide(P, f, x, got, ad_err, *, kink_tol, exact_budget, n_directions, seed):
    rng = np.random.default_rng(seed)
    ad = got[0] if got is not None else None
    if P.graph is None:
        return undecided(P, f"f could not be traced, so its primitives are unknown: {P.trace_error}", ad)
    if got is None:
        return undecided(P, f"the framework's reverse mode failed on f: {ad_err}")
    ad, y_user = got
    ad_tol = min(max(100 * P.eps, 1e-9), 0.05)  # AD runs in the user's dtype
    ad_tol = max(ad_tol, L.tolerance(P.graph))  # iterative layers: AD is as accurate as their solves

    def ad_in(b_elems):
        if not b_elems or not np.all(np.isfinite(ad)):
            return False
        B = np.stack(b_elems)
        res, _ = hull_residual(B.reshape(len(B), -1), ad.reshape(-1))
        return res <= ad_tol * (1.0 + float(np.max(np.abs(B))))

    def run_analysis(P):
        try:
            return analyse(P, exact_budget=exact_budget, n_directions=n_directions, seed=seed,
                           need_enum=lambda b: not ad_in(b))
        except TooLarge as e:
            return str(e)
        except Exception as e:  # a primitive the adapter cannot evaluate in float64, ...
            if P.graph.unsupported:
                return None
            if os.environ.get("NONSMOOTH_ENGINE_DEBUG"):
                raise
            return f"the engine failed on this program ({type(e).__name__}: {e}); please report it"

    A = run_analysis(P)
    if isinstance(A, str):
        return undecided(P, A, ad)
    if A is None:
        return undecided(P, f"unsupported primitive(s): {', '.join(sorted(set(P.graph.unsupported)))}", ad)
    if L.layer_nodes(P.graph) and L.monte_carlo(P.graph):  # perturbed layers: a statistical check (_layers.py)
        return L.finish(P, L.monte_carlo_audit(P, A, ad, y_user, ad_tol, rng, seed))
    if not reproduces(A.out0, y_user, ad_tol):
        if P.cached:  # the closure changed since the cached trace: trace again
            cache_drop(f)
            P = Problem(f, x, kink_tol=kink_tol)
            if P.graph is None:
                return undecided(P, f"f could not be traced, so its primitives are unknown: {P.trace_error}", ad)
            A = run_analysis(P)
            if isinstance(A, str):
                return undecided(P, A, ad)
        if A is None or not reproduces(A.out0, y_user, ad_tol):
            return undecided(P, "the traced program does not reproduce f(x) (randomness, hidden state or a "
                                "side effect in f?), so an analysis of the trace would not be about f.", ad)
    stop = _stop_gradient_changes_derivative(P)
    if stop:
        return undecided(P, stop, ad, J0=A.J0)
    return L.finish(P, verdict(P, A, ad, ad_tol, rng, seed))  # surrogate backward passes are named (_layers.py)


def audit_batch(f: Callable, xs, **kwargs) -> list[Audit]:
    """Audit ``f`` at many points: ``xs`` is a sequence of points (each what ``audit`` takes)
    or one array whose leading axis indexes the points.  The trace is reused.

    >>> import torch
    >>> [a.verdict.value for a in audit_batch(torch.abs, torch.tensor([[0.0], [1.0]]))]
    ['CLARKE', 'SMOOTH']
    """
    points = list(xs) if not hasattr(xs, "shape") else [xs[i] for i in range(xs.shape[0])]
    if not points:
        raise ValueError("xs must hold at least one point, got an empty batch")
    # the trace cache makes every point after the first skip tracing (same shapes/dtypes)
    return [audit(f, p, **kwargs) for p in points]
