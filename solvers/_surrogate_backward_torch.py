"""torch adapter of identity-with-projection and blackbox backward passes."""
from __future__ import annotations

import torch

from ._surrogate_backward import SurrogateLayer, check_output


def project(g: torch.Tensor, projection, event_ndim: int) -> torch.Tensor:
    """Apply the identity method's projection over the trailing ``event_ndim`` axes."""
    if projection is None:
        return g
    axes = tuple(range(g.ndim - event_ndim, g.ndim))
    if projection in ("mean", "std"):
        g = g - g.mean(dim=axes, keepdim=True)
    if projection == "mean":
        return g
    if projection == "norm":
        scale = torch.sqrt((g * g).sum(dim=axes, keepdim=True))
    else:
        scale = torch.sqrt((g * g).mean(dim=axes, keepdim=True))
    # A zero (or constant, for "std") gradient has no direction: return 0, not 0/0.
    return torch.where(scale > 0, g / torch.where(scale > 0, scale, 1), torch.zeros_like(g))


def _solve(layer, theta):
    y = layer.solver(theta)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the solver returned {type(y).__name__} for a torch input; "
                        "it must return a torch tensor")
    check_output(y, theta, layer)
    return y.to(theta.dtype)


class _Surrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, layer):
        theta = theta.detach()
        y = _solve(layer, theta)
        ctx.layer = layer
        if layer.method == "blackbox":
            ctx.save_for_backward(theta, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        layer = ctx.layer
        if layer.method == "identity":
            p = project(g, layer.projection, layer.event_ndim)
            return (p if layer.sense == "max" else -p), None
        theta, y = ctx.saved_tensors
        lam = layer.lambda_
        if layer.sense == "min":
            return (_solve(layer, theta + lam * g) - y) / lam, None
        return (y - _solve(layer, theta - lam * g)) / lam, None


def surrogate_torch(layer: SurrogateLayer, theta: torch.Tensor) -> torch.Tensor:
    return _Surrogate.apply(theta, layer)
