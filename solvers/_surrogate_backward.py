"""Backward passes that replace the (zero almost everywhere) Jacobian of a solver.

- identity with projection (Sahoo et al., ICLR 2023): the forward pass is the solver,
  the backward pass returns +P(g) for a maximizing solver and -P(g) for a minimizing
  one, P removing the mean and/or normalizing the incoming gradient g.
- blackbox (Vlastelica et al., ICLR 2020): the gradient of the piecewise-linear
  interpolation of the loss, one extra solver call at costs moved by lambda * g:
  (y(w + lambda g) - y(w)) / lambda for a minimizing solver, and the mirror image
  (y(t) - y(t - lambda g)) / lambda for a maximizing one.

Neither is the derivative of anything the forward pass computes: they are surrogate
directions, which is why the report suite audits them only for sign and scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ._combinatorial_common import check_array, solver_info

PROJECTIONS = (None, "mean", "norm", "std")


@dataclasses.dataclass(frozen=True)
class SurrogateLayer:
    """A solver with a surrogate backward pass; see :func:`identity_backward`,
    :func:`blackbox_backward`.  ``method`` is "identity" or "blackbox"."""

    solver: Callable
    method: str
    projection: str | None
    lambda_: float
    sense: str
    event_ndim: int

    def __call__(self, theta):
        fw = check_array(theta, "theta", event_ndim=self.event_ndim)
        if fw == "torch":
            from ._surrogate_backward_torch import surrogate_torch

            return surrogate_torch(self, theta)
        if fw == "jax":
            from ._surrogate_backward_jax import surrogate_jax

            return surrogate_jax(self, theta)
        # numpy has no autodiff: the forward pass is all there is.
        return self.solver(theta)

    def explain(self) -> str:
        if self.method == "identity":
            sign = "+" if self.sense == "max" else "-"
            return (f"forward: the solver; backward: {sign}P(g) with P = "
                    f"{self.projection or 'identity'} (identity with projection)")
        if self.sense == "min":
            rule = f"(y(w + {self.lambda_} g) - y(w)) / {self.lambda_}"
        else:
            rule = f"(y(t) - y(t - {self.lambda_} g)) / {self.lambda_}"
        return f"forward: the solver; backward: {rule} (blackbox differentiation)"

    def to_json(self) -> dict:
        return {"solver": getattr(self.solver, "__name__", repr(self.solver)),
                "method": self.method, "projection": self.projection,
                "lambda_": self.lambda_, "sense": self.sense, "event_ndim": self.event_ndim}


def identity_backward(solver: Callable, *, projection: str | None = None,
                      sense: str | None = None, event_ndim: int | None = None) -> SurrogateLayer:
    """The solver in the forward pass, the (projected) identity in the backward pass.

    ``projection``: None (g itself), "mean" (g minus its mean over the event axes),
    "norm" (g divided by its Euclidean norm; 0 stays 0) or "std" (mean removed, then
    divided by the standard deviation; constant g gives 0).  The sign is + for a
    maximizing solver and - for a minimizing one (``sense``, default ``solver.sense``).

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import identity_backward, shortest_path_grid
        >>> layer = identity_backward(shortest_path_grid, projection="mean")
        >>> w = torch.rand(2, 5, 5, requires_grad=True)
        >>> layer(w).sum().backward()        # g = 1 everywhere: its mean removed is 0
        >>> float(w.grad.abs().max())
        0.0
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be None, 'mean', 'norm' or 'std', got {projection!r}")
    nd, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    return SurrogateLayer(solver, "identity", projection, 0.0, s, nd)


def blackbox_backward(solver: Callable, *, lambda_: float = 20.0, sense: str | None = None,
                      event_ndim: int | None = None) -> SurrogateLayer:
    """The solver in the forward pass, blackbox differentiation in the backward pass.

    The backward pass calls the solver once more, at theta moved by ``lambda_`` times
    the incoming gradient, and returns the difference quotient (see the module doc).
    Larger ``lambda_`` gives a smoother, more biased surrogate.

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import blackbox_backward, argmax_onehot
        >>> layer = blackbox_backward(argmax_onehot, lambda_=10.0)
        >>> theta = torch.tensor([[0.0, 1.0]], requires_grad=True)
        >>> (layer(theta) * torch.tensor([[0.0, 1.0]])).sum().backward()
        >>> theta.grad        # theta - 10 g flips the argmax: descent lowers theta[1]
        tensor([[-0.1000,  0.1000]])
    """
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) \
            or not math.isfinite(lambda_) or lambda_ <= 0:
        raise ValueError(f"lambda_ must be a finite number > 0, got {lambda_!r}")
    nd, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    return SurrogateLayer(solver, "blackbox", None, float(lambda_), s, nd)


def check_output(y, theta, layer: SurrogateLayer):
    if tuple(y.shape) != tuple(theta.shape):
        raise ValueError(
            f"{layer.method}_backward needs a solver whose output has its input's shape "
            f"{tuple(theta.shape)} (costs and solutions live in the same space); got "
            f"{tuple(y.shape)}")
