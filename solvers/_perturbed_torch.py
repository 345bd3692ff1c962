"""torch adapter of the perturbed layers: one autograd.Function for y_sigma and F_sigma."""
from __future__ import annotations

import math

import torch

from ._combinatorial_common import validated_inputs
from ._perturbed import PerturbedLayer, check_samples


def draw_noise(layer: PerturbedLayer, theta: torch.Tensor, generator) -> tuple:
    """Perturbed inputs P (rows = N, plus theta itself with the control variate) and the
    array the score grad nu(Z) is made from (E for Gumbel, Z for normal).

    Gumbel noise is Z = -log E with E = -log U exponential, so that the score
    1 - exp(-Z) = 1 - E needs no exponential in the backward pass.  U is clamped away
    from 0 so that no sample is infinite.
    """
    N, sigma = layer.num_samples, layer.sigma
    shape = (N,) + tuple(theta.shape)
    rows = N + int(layer.control_variate)
    P = torch.empty((rows,) + tuple(theta.shape), dtype=theta.dtype, device=theta.device)
    if layer.noise == "gumbel":
        E = torch.rand(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        E.clamp_(min=torch.finfo(theta.dtype).tiny)
        torch.log(E, out=E).neg_()
        Pn = P[:N]
        torch.log(E, out=Pn)
        Pn.mul_(-sigma).add_(theta)
        score = E
    else:
        Z = torch.randn(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        torch.add(theta, Z, alpha=sigma, out=P[:N])
        score = Z
    if layer.control_variate:
        P[N] = theta
    return P, score


class _PerturbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, layer, generator):
        N = layer.num_samples
        P, score = draw_noise(layer, theta.detach(), generator)
        with validated_inputs():
            Y = layer.solver(P)
        if not isinstance(Y, torch.Tensor):
            raise TypeError(f"the solver returned {type(Y).__name__} for a torch input; "
                            "it must return a torch tensor")
        if Y.dtype != theta.dtype:
            Y = Y.to(theta.dtype)
        check_samples(Y, layer, tuple(theta.shape), P.shape[0])
        ybar = Y[:N].mean(dim=0)
        ctx.layer = layer
        ctx.batch_ndim = theta.ndim - layer.event_ndim
        ctx.theta_shape = tuple(theta.shape)
        if layer.output == "mean":
            out = ybar
        else:
            axes = tuple(range(1 + ctx.batch_ndim, Y.ndim))
            out = (Y[:N] * P[:N]).sum(dim=axes).mean(dim=0)
        # The score estimator is only needed for y_sigma; F_sigma's gradient is y_sigma.
        if layer.output == "mean":
            ctx.save_for_backward(Y, score)
        else:
            ctx.save_for_backward(ybar)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        layer = ctx.layer
        if layer.output == "value":
            (ybar,) = ctx.saved_tensors
            g = g.reshape(g.shape + (1,) * layer.event_ndim)
            return g * ybar, None, None
        Y, score = ctx.saved_tensors
        N, sigma = layer.num_samples, layer.sigma
        B = math.prod(ctx.theta_shape[: ctx.batch_ndim])
        O = math.prod(Y.shape[1 + ctx.batch_ndim:])
        Dn = math.prod(ctx.theta_shape[ctx.batch_ndim:])
        # explicit sizes, not -1: an empty batch must reshape too
        Yf = Y.reshape(Y.shape[0], B, O)
        gf = g.reshape(B, O)
        # Elementwise products and a (B, 1, N) x (B, N, D) bmm on transposed views are
        # several times faster here than the equivalent einsums, which copy to contiguous.
        w = (Yf[:N] * gf).sum(-1)
        if layer.control_variate:
            # <y_i - y*(theta), g>: the mean of the score is 0, so this changes only variance.
            w = w - (Yf[N] * gf).sum(-1)
        Sf = score.reshape(N, B, Dn)
        weighted = torch.bmm(w.t().unsqueeze(1), Sf.transpose(0, 1)).squeeze(1)
        if layer.noise == "gumbel":
            grad = w.sum(0).unsqueeze(-1) - weighted  # score = 1 - E
        else:
            grad = weighted
        grad = grad.mul_(1.0 / (N * sigma)).reshape(ctx.theta_shape)
        return grad, None, None


def perturbed_torch(layer: PerturbedLayer, theta: torch.Tensor, generator) -> torch.Tensor:
    if generator is not None and generator.device != theta.device:
        # A CPU generator cannot draw CUDA noise (and vice versa).
        if torch.device(generator.device).type != theta.device.type:
            raise ValueError(f"generator is on {generator.device} but theta is on {theta.device}; "
                             "pass a torch.Generator(device=theta.device)")
    return _PerturbedFunction.apply(theta, layer, generator)
