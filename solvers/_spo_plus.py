"""The SPO+ loss (Elmachtoub & Grigas, Management Science 2022) for linear-objective solvers.

For a minimization problem min_w <c, w> over a feasible set with solver w*(c) and optimal
value z*(c) = <c, w*(c)>, the SPO+ loss of a predicted cost c_hat against the true cost c is

    loss(c_hat; c) = -min_w <2 c_hat - c, w> + 2 <c_hat, w*(c)> - z*(c)
                   = -<2 c_hat - c, w_q> + 2 <c_hat, w*(c)> - z*(c),   w_q = w*(2 c_hat - c),

a convex, piecewise-linear upper bound on the SPO regret <c, w*(c_hat)> - z*(c), zero at
c_hat = c, with subgradient 2 (w*(c) - w_q) in c_hat.  For a maximizing solver the mirror
image (PyEPO's convention): loss = <2 c_hat - c, w_q> - 2 <c_hat, w*(c)> + z*(c),
subgradient 2 (w_q - w*(c)).

The loss is written in plain framework code around one solver call, so every autodiff
feature applies and is exact: the gradient is the subgradient above, the second derivative
is zero (the loss is piecewise linear, so that is the true value almost everywhere).  The
true cost, solution and objective are data (no gradient flows to them).

Contract: imports only ``_combinatorial_common``; torch and jax code is imported when an
input of that framework arrives (torch solver calls go through the opaque
``nonsmooth::solve`` operator, so torch.compile(fullgraph=True) works).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from nonsmooth import _layer_hook

from ._combinatorial_common import (check_array, check_batched, framework_of, solver_info,
                                    solver_name)


@dataclasses.dataclass(frozen=True, eq=False)
class _SPOSpec:
    solver: Callable
    sense: str
    event_ndim: int
    batched: bool | None
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


class SPOPlusLoss:
    """The loss returned by :func:`spo_plus_loss`; call it as
    ``loss(pred_cost, true_cost, true_sol=None, true_obj=None)``."""

    def __init__(self, spec: _SPOSpec):
        self.spec = spec

    sense = property(lambda self: self.spec.sense)
    event_ndim = property(lambda self: self.spec.event_ndim)

    def __call__(self, pred_cost, true_cost, true_sol=None, true_obj=None):
        """SPO+ loss per batch element (shape pred_cost.shape[:-event_ndim]).

        ``true_sol`` (w*(c)) and ``true_obj`` (z*(c)) are computed with the solver when
        omitted (one extra solver call); PyEPO's datasets carry them precomputed.
        """
        spec = self.spec
        fw = check_array(pred_cost, "pred_cost", event_ndim=spec.event_ndim)
        if framework_of(true_cost) != fw:
            raise TypeError(f"pred_cost and true_cost must come from the same framework, got "
                            f"{type(pred_cost).__name__} and {type(true_cost).__name__}")
        check_array(true_cost, "true_cost", event_ndim=spec.event_ndim)
        shape = tuple(pred_cost.shape)
        if tuple(true_cost.shape) != shape:
            raise ValueError(f"true_cost must have pred_cost's shape {shape}, got "
                             f"{tuple(true_cost.shape)}")
        batch = shape[: len(shape) - spec.event_ndim]
        if true_sol is not None:
            if framework_of(true_sol) != fw:
                raise TypeError("true_sol must come from pred_cost's framework")
            if tuple(true_sol.shape) != shape:
                raise ValueError(f"true_sol must have pred_cost's shape {shape}, got "
                                 f"{tuple(true_sol.shape)}")
        if true_obj is not None:
            if framework_of(true_obj) != fw:
                raise TypeError("true_obj must come from pred_cost's framework")
            # PyEPO stores objectives as (batch, 1): accept that too.
            if tuple(true_obj.shape) not in (batch, batch + (1,)):
                raise ValueError(f"true_obj must have shape {batch} (or {batch + (1,)}), got "
                                 f"{tuple(true_obj.shape)}")
        if fw == "torch":
            return _spo_torch(spec, pred_cost, true_cost, true_sol, true_obj, batch)
        if fw == "jax":
            return _spo_jax(spec, pred_cost, true_cost, true_sol, true_obj, batch)
        return _spo_numpy(spec, pred_cost, true_cost, true_sol, true_obj, batch)

    def explain(self) -> str:
        if self.spec.sense == "min":
            rule = ("-min_w <2 c_hat - c, w> + 2 <c_hat, w*(c)> - z*(c); subgradient "
                    "2 (w*(c) - w*(2 c_hat - c))")
        else:
            rule = ("max_w <2 c_hat - c, w> - 2 <c_hat, w*(c)> + z*(c); subgradient "
                    "2 (w*(2 c_hat - c) - w*(c))")
        return (f"SPO+ loss (Elmachtoub & Grigas 2022) of the {self.spec.sense}imizing solver "
                f"{solver_name(self.spec.solver)}: {rule}")

    def to_json(self) -> dict:
        return {"solver": solver_name(self.spec.solver), "sense": self.spec.sense,
                "event_ndim": self.spec.event_ndim, "batched": self.spec.batched}


def spo_plus_loss(solver: Callable, *, sense: str | None = None, event_ndim: int | None = None,
                  batched: bool | None = None) -> SPOPlusLoss:
    """SPO+ loss ``loss(pred_cost, true_cost, true_sol=None, true_obj=None)`` of a solver.

    ``solver`` returns argmin_w <c, w> (``sense="min"``, e.g. ``shortest_path_edges``) or
    argmax (``sense="max"``; default ``solver.sense`` or "max") over its feasible set, for
    costs with leading batch axes.  Conventions follow PyEPO's ``SPOPlus``: the same four
    arguments and the same value and subgradient, but one loss per batch element (PyEPO
    averages: take ``.mean()``).  ``batched`` as in :func:`perturbed`.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import spo_plus_loss, shortest_path_edges
        >>> loss = spo_plus_loss(shortest_path_edges((2, 2)))
        >>> c = np.array([1.0, 2.0, 1.0, 2.0])            # true edge costs
        >>> float(loss(c, c))                              # a perfect prediction costs 0
        0.0
        >>> float(loss(np.array([3.0, 0.0, 3.0, 0.0]), c))  # >= the regret, 4 - 2 = 2
        14.0
    """
    nd, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    check_batched(batched)
    if batched is None and getattr(solver, "batched", None) is True:
        batched = True
    return SPOPlusLoss(_SPOSpec(solver, s, nd, batched))


def _terms(spec, dot, pred, true, wq, wstar, zstar):
    """The loss from its pieces; ``dot`` sums a product over the event axes."""
    q = 2 * pred - true
    if spec.sense == "min":
        return -dot(q, wq) + 2 * dot(pred, wstar) - zstar
    return dot(q, wq) - 2 * dot(pred, wstar) + zstar


def _spo_torch(spec, pred, true, true_sol, true_obj, batch):
    import torch

    from . import _torch_ops

    sid = _torch_ops.id_of(spec)
    axes = tuple(range(len(batch), pred.ndim))
    dot = lambda a, b: (a * b).sum(dim=axes)  # noqa: E731
    true = true.detach().to(pred.dtype)
    q = 2 * pred - true
    # The solver is piecewise constant, so detaching its input changes no derivative; the
    # audit engine needs the input's tangent to see where the solver's ties are.
    wq = torch.ops.nonsmooth.solve(q if _layer_hook.active() else q.detach(), sid)
    wstar = torch.ops.nonsmooth.solve(true, sid) if true_sol is None else \
        true_sol.detach().to(pred.dtype)
    if true_obj is None:
        zstar = dot(true, wstar)
    else:
        zstar = true_obj.detach().to(pred.dtype).reshape(batch)
    return _terms(spec, dot, pred, true, wq, wstar, zstar)


def _spo_jax(spec, pred, true, true_sol, true_obj, batch):
    import jax
    import jax.numpy as jnp

    from ._jax_solve import call_solver, resolve_batched

    nb = len(batch)
    axes = tuple(range(nb, pred.ndim))
    dot = lambda a, b: jnp.sum(a * b, axis=axes)  # noqa: E731
    sg = jax.lax.stop_gradient
    is_batched = resolve_batched(spec.solver, spec.batched, spec.cache, pred, nb)

    def solve(x):
        # (the audit engine needs the input's tangent to see the solver's ties; the solver
        # is piecewise constant, so stop_gradient changes no derivative)
        y = call_solver(spec.solver, x if _layer_hook.active() else sg(x), nlead=nb, batched=is_batched)
        if tuple(y.shape) != tuple(x.shape):
            raise ValueError(f"the solver returned shape {tuple(y.shape)}, but SPO+ needs "
                             f"solutions of the costs' shape {tuple(x.shape)}")
        return sg(y.astype(pred.dtype))

    true = sg(true.astype(pred.dtype))
    wq = solve(2 * pred - true)
    wstar = solve(true) if true_sol is None else sg(true_sol.astype(pred.dtype))
    zstar = dot(true, wstar) if true_obj is None else sg(true_obj.astype(pred.dtype)).reshape(batch)
    out = _terms(spec, dot, pred, true, wq, wstar, zstar)
    # Under jit a non-finite cost cannot raise; mark the affected problems NaN instead.
    bad = ~jnp.all(jnp.isfinite(pred), axis=axes) | ~jnp.all(jnp.isfinite(true), axis=axes)
    return jnp.where(bad, jnp.nan, out)


def _spo_numpy(spec, pred, true, true_sol, true_obj, batch):
    from ._combinatorial_common import validated_inputs

    axes = tuple(range(len(batch), pred.ndim))
    dot = lambda a, b: np.sum(a * b, axis=axes)  # noqa: E731

    def solve(x):
        with validated_inputs():
            if spec.batched is False:
                flat = x.reshape((-1,) + x.shape[len(batch):])
                y = np.stack([np.asarray(spec.solver(r)) for r in flat]).reshape(x.shape)
            else:
                y = np.asarray(spec.solver(x))
        if y.shape != x.shape:
            raise ValueError(f"the solver returned shape {y.shape}, but SPO+ needs solutions of "
                             f"the costs' shape {x.shape}")
        return y.astype(pred.dtype)

    wq = solve(2 * pred - true)
    wstar = solve(true) if true_sol is None else np.asarray(true_sol, pred.dtype)
    zstar = dot(true, wstar) if true_obj is None else np.asarray(true_obj, pred.dtype).reshape(batch)
    return _terms(spec, dot, pred, true, wq, wstar, zstar)
