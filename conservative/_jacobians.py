"""``ld_jacobian``, ``clarke_jacobian`` and ``selection_jacobians``: the engine's analyses
without a verdict.  Same stages and the same contracts as :func:`audit`."""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import _forward as F
from ._audit import check_int
from ._certificate import smooth_jacobian
from ._elements import analyse, assignments, distinct
from ._problem import ENGINE_LOCK, Problem, check_size
from ._result import ClarkeSet

__all__ = ["ld_jacobian", "clarke_jacobian", "selection_jacobians"]


def _problem(f, x, kink_tol) -> Problem:
    P = Problem(f, x, kink_tol=kink_tol)
    if P.graph is None:
        raise ValueError(f"f could not be traced: {P.trace_error}")
    if P.graph.unsupported:
        raise ValueError(f"f uses primitive(s) the engine does not support: {', '.join(sorted(set(P.graph.unsupported)))}")
    return P


def ld_jacobian(f: Callable, x, directions=None, *, raw: bool = False, kink_tol: float = 0.0) -> np.ndarray:
    """Lexicographic (LD) derivative of ``f`` at ``x`` along ``directions`` (n x k, identity
    by default).  Returns ``f'(x; M) M^{-1}`` (out x n), an element of the
    B-subdifferential for piecewise-C1 programs; with ``raw=True`` returns ``f'(x; M)``
    (out x k) for any M.  Raises ``ValueError`` where the LD derivative does not exist
    (a non-Lipschitz primitive at its singular point, such as sqrt at 0).

    >>> import torch
    >>> ld_jacobian(torch.abs, torch.zeros(1)).tolist()
    [[1.0]]
    """
    with ENGINE_LOCK:
        P = _problem(f, x, kink_tol)
        if directions is None:
            M = np.eye(P.n_in)
        else:
            M = np.asarray(directions, dtype=np.float64)
            if M.ndim != 2 or M.shape[0] != P.n_in:
                raise ValueError(f"directions must be an (n, k) matrix with n = {P.n_in} input elements, got shape {M.shape}")
            if not np.all(np.isfinite(M)):
                raise ValueError("directions must be finite, got NaN or inf entries")
        check_size(P)
        leaf = P.run(F.LexPolicy(), M)[0]
        bad = [s for s, _ in leaf.choices if s.kind == "nonlipschitz"]
        if bad or not np.all(np.isfinite(leaf.jac)):
            where = bad[0].text if bad else "a primitive whose derivative is not finite here"
            raise ValueError(f"the LD derivative does not exist at this point: {where} (f is not Lipschitz there, "
                             "or the program spells a Lipschitz function in a way the engine does not recognise, "
                             "e.g. a norm written as sqrt of a sum of squares that mixes shapes; write it with "
                             "torch.linalg.vector_norm / jnp.linalg.norm)")
        if raw:
            return leaf.jac
        if M.shape[0] != M.shape[1] or np.linalg.matrix_rank(M) < M.shape[0]:
            raise ValueError(f"directions must be square and nonsingular for a B-subdifferential element "
                             f"(got shape {M.shape}, rank {np.linalg.matrix_rank(M)}); pass raw=True for f'(x; M)")
        return leaf.jac @ np.linalg.inv(M)


def clarke_jacobian(f: Callable, x, *, kink_tol: float = 0.0, exact_budget: int = 16, n_directions: int = 64,
                    seed: int = 0) -> ClarkeSet:
    """The B-subdifferential elements the engine finds at ``x`` (LD derivatives, feasible
    vertex selections and, within ``exact_budget``, every essentially active piece).  At a
    point where no kink is active it is ``{Jacobian of f}``, exactly.  ``exact`` holds under
    the contract of :mod:`nonsmooth.conservative._pieces`, named in ``basis``.

    >>> import torch
    >>> C = clarke_jacobian(torch.abs, torch.zeros(1))
    >>> sorted(C.vertices.reshape(-1).tolist()), C.exact
    ([-1.0, 1.0], True)
    """
    check_int("exact_budget", exact_budget, 0)
    check_int("n_directions", n_directions, 1)
    with ENGINE_LOCK:
        P = _problem(f, x, kink_tol)
        A = analyse(P, exact_budget=exact_budget, n_directions=n_directions, seed=seed, conventions=False)
        kinds = {s.kind for s in A.sites.values()}
        if A.discontinuous or "nonlipschitz" in kinds:
            raise ValueError("f is not Lipschitz (or not continuous) at x: it has no Clarke Jacobian there. "
                             + (A.discontinuous or "A non-Lipschitz primitive is at its singular point."))
        if A.continuity == "unsure":
            raise ValueError("whether f is continuous at x is not settled: " + (A.notes[-1] if A.notes else ""))
        if not A.sites:
            J = smooth_jacobian(P)
            if not np.all(np.isfinite(J)):
                raise ValueError("f's Jacobian is not finite at x (a pole or a domain boundary)")
            return ClarkeSet(J[None] + 0.0, True, "f is differentiable at x (no kink is active)")
        B = [b for b in distinct(A.b_elems) if np.all(np.isfinite(b))]
        if A.box is not None:
            return ClarkeSet(np.stack(B) + 0.0, True, A.exact_basis + " (vertices: representatives; contains() "
                             "decides membership in the whole set)", structure=A.box)
        return ClarkeSet(np.stack(B) + 0.0 if B else np.zeros((0, P.n_out, P.n_in)), bool(A.exact), A.exact_basis)


def selection_jacobians(f: Callable, x, *, kink_tol: float = 0.0, n_directions: int = 64, seed: int = 0) -> np.ndarray:
    """The distinct Jacobians AD would return for vertex derivative choices at the active
    kinks (every combination when there are few, else all first, all last and
    ``n_directions`` random ones), shape (m, out, in).

    >>> import torch
    >>> sorted(selection_jacobians(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1)).reshape(-1).tolist())
    [0.0, 1.0, 2.0]
    """
    with ENGINE_LOCK:
        P = Problem(f, x, kink_tol=kink_tol)
        if P.graph is None:
            raise ValueError(f"f could not be traced: {P.trace_error}")
        leaf0 = P.run(F.LexPolicy())[0]
        if not P.interp.sites_seen:
            return leaf0.jac[None]
        out = [P.run(F.AssignPolicy(a))[0].jac for a in assignments(dict(P.interp.sites_seen), n_directions, seed)]
        return np.stack(distinct(out))
