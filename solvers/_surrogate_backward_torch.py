"""torch adapter of identity-with-projection and blackbox backward passes.

One autograd Function in the ``setup_context`` style (so torch.func.grad/vjp/vmap accept
it, with a generated vmap rule); the solver runs through the opaque ``nonsmooth::solve``
operator (so ``torch.compile(fullgraph=True)`` works whatever the solver does).  The
gradient is marked first-order-only: differentiating it again (double backward,
torch.func.hessian) raises, and so does forward mode, with the reasons in
``_surrogate_common``.

Contract: depends on ``_surrogate_common`` and ``_torch_ops``, never on the dispatcher
``_surrogate_backward``.
"""
from __future__ import annotations

import torch

from nonsmooth import _layer_hook

from . import _torch_ops
from ._combinatorial_common import torch_compiling
from ._surrogate_common import NO_FORWARD_MODE, NO_SECOND_ORDER, SurrogateSpec


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


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a computed gradient whose own derivative is undefined."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p):
        return p.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError(NO_SECOND_ORDER)


class _FirstOrderOnlyFwd(_FirstOrderOnly):
    @staticmethod
    def jvp(ctx, dp):
        raise RuntimeError(NO_SECOND_ORDER)


def _solve(spec_id: int, theta: torch.Tensor) -> torch.Tensor:
    return torch.ops.nonsmooth.solve(theta, spec_id)


class _Surrogate(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(theta, spec, spec_id):
        return _solve(spec_id, theta.detach())

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, spec, spec_id = inputs
        ctx.spec, ctx.spec_id = spec, spec_id
        if spec.method == "blackbox":
            ctx.save_for_backward(theta, output)

    @staticmethod
    def backward(ctx, g):
        spec = ctx.spec
        if spec.method == "identity":
            p = project(g, spec.projection, spec.event_ndim)
            grad = p if spec.sense == "max" else -p
        else:
            theta, y = ctx.saved_tensors
            lam = spec.lambda_
            if spec.sense == "min":
                grad = (_solve(ctx.spec_id, (theta + lam * g).detach()) - y) / lam
            else:
                grad = (y - _solve(ctx.spec_id, (theta - lam * g).detach())) / lam
        if torch.is_grad_enabled():
            # create_graph / torch.func: make the gradient's own derivative raise.
            fn = _FirstOrderOnly if torch_compiling() else _FirstOrderOnlyFwd
            grad = fn.apply(grad)
        return grad, None, None


class _SurrogateFwd(_Surrogate):
    @staticmethod
    def jvp(ctx, dtheta, dspec, dspec_id):
        raise RuntimeError(NO_FORWARD_MODE)


def surrogate_torch(spec: SurrogateSpec, theta: torch.Tensor) -> torch.Tensor:
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("surrogate", theta, layer_spec=spec)
    fn = _Surrogate if torch_compiling() else _SurrogateFwd
    return fn.apply(theta, spec, _torch_ops.id_of(spec))
