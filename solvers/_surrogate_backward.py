"""Backward passes that replace the (zero almost everywhere) Jacobian of a solver: public API.

- identity with projection (Sahoo et al., ICLR 2023): the forward pass is the solver,
  the backward pass returns +P(g) for a maximizing solver and -P(g) for a minimizing
  one, P removing the mean and/or normalizing the incoming gradient g.
- blackbox (Vlastelica et al., ICLR 2020): the gradient of the piecewise-linear
  interpolation of the loss, one extra solver call at costs moved by lambda * g:
  (y(w + lambda g) - y(w)) / lambda for a minimizing solver, and the mirror image
  (y(t) - y(t - lambda g)) / lambda for a maximizing one.

Neither is the derivative of anything the forward pass computes: they are surrogate
directions, which is why the report suite audits them only for sign and scale, and why
second derivatives and forward mode raise.  This module validates and dispatches; the
framework code lives in ``_surrogate_backward_torch`` / ``_surrogate_backward_jax``, the
shared pieces in ``_surrogate_common``.
"""
from __future__ import annotations

from typing import Callable

from . import _surrogate_common as common
from ._combinatorial_common import check_array

PROJECTIONS = common.PROJECTIONS


class SurrogateLayer:
    """A solver with a surrogate backward pass; see :func:`identity_backward`,
    :func:`blackbox_backward`.  ``method`` is "identity" or "blackbox"."""

    def __init__(self, spec: common.SurrogateSpec):
        self.spec = spec

    solver = property(lambda self: self.spec.solver)
    method = property(lambda self: self.spec.method)
    projection = property(lambda self: self.spec.projection)
    lambda_ = property(lambda self: self.spec.lambda_)
    sense = property(lambda self: self.spec.sense)
    event_ndim = property(lambda self: self.spec.event_ndim)

    def __call__(self, theta):
        fw = check_array(theta, "theta", event_ndim=self.spec.event_ndim)
        if fw == "torch":
            from ._surrogate_backward_torch import surrogate_torch

            return surrogate_torch(self.spec, theta)
        if fw == "jax":
            from ._surrogate_backward_jax import surrogate_jax

            return surrogate_jax(self.spec, theta)
        # numpy has no autodiff: the forward pass is all there is.
        return self.spec.solver(theta)

    def explain(self) -> str:
        return common.explain(self.spec)

    def to_json(self) -> dict:
        return common.to_json(self.spec)


def identity_backward(solver: Callable, *, projection: str | None = None,
                      sense: str | None = None, event_ndim: int | None = None,
                      batched: bool | None = None) -> SurrogateLayer:
    """The solver in the forward pass, the (projected) identity in the backward pass.

    ``projection``: None (g itself), "mean" (g minus its mean over the event axes),
    "norm" (g divided by its Euclidean norm; 0 stays 0) or "std" (mean removed, then
    divided by the standard deviation; constant g gives 0).  The sign is + for a
    maximizing solver and - for a minimizing one (``sense``, default ``solver.sense``).
    ``batched`` as in :func:`perturbed`.  First-order reverse mode only (torch autograd,
    torch.func.grad/vjp/vmap, torch.compile; jax grad/vjp/jit/vmap).

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import identity_backward, shortest_path_grid
        >>> layer = identity_backward(shortest_path_grid, projection="mean")
        >>> w = torch.rand(2, 5, 5, requires_grad=True)
        >>> layer(w).sum().backward()        # g = 1 everywhere: its mean removed is 0
        >>> float(w.grad.abs().max())
        0.0
    """
    return SurrogateLayer(common.make_identity(solver, projection=projection, sense=sense,
                                               event_ndim=event_ndim, batched=batched))


def blackbox_backward(solver: Callable, *, lambda_: float = 20.0, sense: str | None = None,
                      event_ndim: int | None = None,
                      batched: bool | None = None) -> SurrogateLayer:
    """The solver in the forward pass, blackbox differentiation in the backward pass.

    The backward pass calls the solver once more, at theta moved by ``lambda_`` times
    the incoming gradient, and returns the difference quotient (see the module doc).
    Larger ``lambda_`` gives a smoother, more biased surrogate.  First-order reverse mode
    only, as :func:`identity_backward`.

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import blackbox_backward, argmax_onehot
        >>> layer = blackbox_backward(argmax_onehot, lambda_=10.0)
        >>> theta = torch.tensor([[0.0, 1.0]], requires_grad=True)
        >>> (layer(theta) * torch.tensor([[0.0, 1.0]])).sum().backward()
        >>> theta.grad        # theta - 10 g flips the argmax: descent lowers theta[1]
        tensor([[-0.1000,  0.1000]])
    """
    return SurrogateLayer(common.make_blackbox(solver, lambda_=lambda_, sense=sense,
                                               event_ndim=event_ndim, batched=batched))
