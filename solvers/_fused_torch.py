"""torch entry of the fused perturbed kernels: the ``nonsmooth::perturbed_fused`` custom ops.

``perturbed_fused(theta, key, ...) -> (mean, value)`` and its backward
``perturbed_fused_vjp(theta, key, g, ...) -> grad``, which regenerates the forward's
samples from the same key.  Both have fake kernels (torch.compile traces them) and run
the C kernel on CPU tensors (on their memory, no copies of contiguous input) or the
Triton kernels on CUDA tensors.  The key is a one-element int64 tensor drawn from the
layer's generator, so a CUDA call reads it on the device without a host sync.

Derivatives: the mean's backward is the score-function estimator (first order only; a
second backward through it raises); the value's backward is ``g * mean`` with ``mean``
itself differentiable, so the Hessian of ``perturbed_max`` is the perturbed Jacobian
estimate, as in jax.
"""
from __future__ import annotations

import torch

from . import _fused

_OP = "nonsmooth::perturbed_fused"
_OP_VJP = "nonsmooth::perturbed_fused_vjp"
_DTYPES = (torch.float32, torch.float64)


def _spec(solver, k, num_samples, sigma, noise, control_variate):
    return _fused.Spec(solver, k, num_samples, sigma, noise, control_variate, "mean")


def _event(spec, theta):
    return tuple(theta.shape[:-1]), spec.out_event(int(theta.shape[-1]))


@torch.library.custom_op(_OP, mutates_args=())
def _forward_op(theta: torch.Tensor, key: torch.Tensor, solver: str, k: int, num_samples: int,
                sigma: float, noise: str, control_variate: bool,
                want_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(solver, k, num_samples, sigma, noise, control_variate)
    batch, event = _event(spec, theta)
    if theta.device.type == "cuda":
        from . import _triton_perturb

        return _triton_perturb.forward(theta, key, spec, want_value=want_value)
    mean, value = _fused.forward_numpy(theta.detach().contiguous().numpy(), int(key.item()),
                                       spec, want_value=want_value,
                                       n_threads=torch.get_num_threads())
    mean = torch.from_numpy(mean)
    value = torch.from_numpy(value) if value is not None else theta.new_zeros(batch)
    return mean, value


@_forward_op.register_fake
def _(theta, key, solver, k, num_samples, sigma, noise, control_variate, want_value):
    spec = _spec(solver, k, num_samples, sigma, noise, control_variate)
    batch, event = _event(spec, theta)
    return theta.new_empty(batch + event), theta.new_empty(batch)


@torch.library.custom_op(_OP_VJP, mutates_args=())
def _vjp_op(theta: torch.Tensor, key: torch.Tensor, g: torch.Tensor, solver: str, k: int,
            num_samples: int, sigma: float, noise: str,
            control_variate: bool) -> torch.Tensor:
    spec = _spec(solver, k, num_samples, sigma, noise, control_variate)
    g = g.to(theta.dtype)
    if theta.device.type == "cuda":
        from . import _triton_perturb

        return _triton_perturb.vjp(theta, key, g, spec)
    grad = _fused.vjp_numpy(theta.detach().contiguous().numpy(), g.detach().contiguous().numpy(),
                            int(key.item()), spec, n_threads=torch.get_num_threads())
    return torch.from_numpy(grad)


@_vjp_op.register_fake
def _(theta, key, g, solver, k, num_samples, sigma, noise, control_variate):
    return torch.empty_like(theta, memory_format=torch.contiguous_format)


def _vjp_second_order(ctx, grad):
    raise RuntimeError(
        "the second derivative of perturbed(...) (the derivative of its score-function "
        "backward) is not implemented for torch; perturbed_max / fenchel_young_loss do have "
        "second derivatives (their Hessian is the perturbed Jacobian estimate)")


def _vjp_setup(ctx, inputs, output):
    pass


_vjp_op.register_autograd(_vjp_second_order, setup_context=_vjp_setup)


def _forward_setup(ctx, inputs, output):
    theta, key, solver, k, num_samples, sigma, noise, control_variate, want_value = inputs
    mean, _ = output
    ctx.save_for_backward(theta, key, mean)
    ctx.options = (solver, k, num_samples, sigma, noise, control_variate)
    # an output that is not used gets None, not zeros: a layer's unused mean must not put
    # the (first-order only) estimator into a graph that is differentiated again
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, g_mean, g_value):
    theta, key, mean = ctx.saved_tensors
    grad = None
    if g_mean is not None:
        grad = _vjp_op(theta, key, g_mean.contiguous(), *ctx.options)
    if g_value is not None:
        term = g_value.reshape(g_value.shape + (1,)) * mean
        grad = term if grad is None else grad + term
    return grad, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


def _key(generator) -> torch.Tensor:
    """One 62-bit Philox key per call from the generator (fresh noise at every call)."""
    return torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device)


def fused_torch(spec: _fused.Spec, theta: torch.Tensor, generator):
    """The layer's output through the custom op, or NotImplemented (stacked path)."""
    if theta.dtype not in _DTYPES or generator is None:
        return NotImplemented
    if theta.device.type not in ("cpu", "cuda") or (
            theta.device.type == "cuda" and not _fused.triton_ready("cuda")):
        return NotImplemented  # no triton: the stacked path runs on the device
    if torch.device(generator.device).type != theta.device.type:
        raise ValueError(f"generator is on {generator.device} but theta is on {theta.device}; "
                         "pass a torch.Generator(device=theta.device)")
    mean, value = _forward_op(theta, _key(generator), spec.solver, spec.k, spec.num_samples,
                              spec.sigma, spec.noise, spec.control_variate,
                              spec.output == "value")
    return mean if spec.output == "mean" else value


__all__ = ["fused_torch"]
