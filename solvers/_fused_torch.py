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


def _forward_impl(theta, key, solver, k, num_samples, sigma, noise, control_variate,
                  want_value):
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


@torch.library.custom_op(_OP, mutates_args=())
def _forward_op(theta: torch.Tensor, key: torch.Tensor, solver: str, k: int, num_samples: int,
                sigma: float, noise: str, control_variate: bool,
                want_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(theta, key, solver, k, num_samples, sigma, noise, control_variate,
                         want_value)


@_forward_op.register_fake
def _(theta, key, solver, k, num_samples, sigma, noise, control_variate, want_value):
    spec = _spec(solver, k, num_samples, sigma, noise, control_variate)
    batch, event = _event(spec, theta)
    return theta.new_empty(batch + event), theta.new_empty(batch)


def _vjp_impl(theta, key, g, solver, k, num_samples, sigma, noise, control_variate):
    spec = _spec(solver, k, num_samples, sigma, noise, control_variate)
    g = g.to(theta.dtype)
    if theta.device.type == "cuda":
        from . import _triton_perturb

        return _triton_perturb.vjp(theta, key, g, spec)
    grad = _fused.vjp_numpy(theta.detach().contiguous().numpy(), g.detach().contiguous().numpy(),
                            int(key.item()), spec, n_threads=torch.get_num_threads())
    return torch.from_numpy(grad)


@torch.library.custom_op(_OP_VJP, mutates_args=())
def _vjp_op(theta: torch.Tensor, key: torch.Tensor, g: torch.Tensor, solver: str, k: int,
            num_samples: int, sigma: float, noise: str,
            control_variate: bool) -> torch.Tensor:
    return _vjp_impl(theta, key, g, solver, k, num_samples, sigma, noise, control_variate)


@_vjp_op.register_fake
def _(theta, key, g, solver, k, num_samples, sigma, noise, control_variate):
    return torch.empty_like(theta, memory_format=torch.contiguous_format)


def _vjp_second_order(ctx, grad):
    raise RuntimeError(
        "the second derivative of perturbed(...) is not computed by the fused kernel; build "
        "the layer with fused=False for the likelihood-ratio estimator of every order "
        "(perturbed_max / fenchel_young_loss have Hessians either way: the perturbed Jacobian "
        "estimate)")


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
        grad = _FusedVjp.apply(theta, key, g_mean.contiguous(), *ctx.options)
    if g_value is not None:
        term = g_value.reshape(g_value.shape + (1,)) * mean
        grad = term if grad is None else grad + term
    return grad, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


def _plain(t: torch.Tensor) -> bool:
    """A real tensor, not a fake/functional/functorch one: NumPy may read it directly."""
    return type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)


class _FusedVjp(torch.autograd.Function):
    """The backward op as an ``autograd.Function`` (functorch, see :class:`_Fused`); its
    own derivative raises."""

    @staticmethod
    def forward(theta, key, g, solver, k, num_samples, sigma, noise, control_variate):
        run = _vjp_impl if _plain(theta) and _plain(g) else _vjp_op
        return run(theta, key, g, solver, k, num_samples, sigma, noise, control_variate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        _vjp_second_order(ctx, grad)

    @staticmethod
    def vmap(info, in_dims, theta, key, g, *options):
        """A batch of cotangents (jacrev): one kernel pass draws each sample once for all
        of them; a batch of thetas or keys: one call each."""
        dt, dk, dg = in_dims[:3]
        n = info.batch_size
        if dt is None and dk is None and _plain(theta) and theta.device.type == "cpu":
            g = g.movedim(dg, 0) if dg is not None else g.expand((n,) + tuple(g.shape))
            spec = _spec(*options)
            lead = _fused.vjp_numpy(theta.detach().contiguous().numpy(),
                                    g.detach().contiguous().to(theta.dtype).numpy(),
                                    int(key.item()), spec, n_threads=torch.get_num_threads())
            return torch.from_numpy(lead), 0
        take = lambda t, d, i: t if d is None else t.select(d, i)
        outs = [_FusedVjp.apply(take(theta, dt, i), take(key, dk, i), take(g, dg, i), *options)
                for i in range(n)]
        return torch.stack(outs), 0


class _Fused(torch.autograd.Function):
    """The eager entry: the op's forward and backward as an ``autograd.Function``.

    ``register_autograd`` alone does not reach ``torch.func.grad``/``jacrev`` in torch
    2.13 (the generated Function lacks ``setup_context``; the soft sort/rank op has the
    same workaround): this class gives functorch the staticmethods it needs, and plain
    tensors skip the dispatcher.  Under torch.compile the op itself is called.
    """

    @staticmethod
    def forward(theta, key, solver, k, num_samples, sigma, noise, control_variate, want_value):
        run = _forward_impl if _plain(theta) else _forward_op
        return run(theta, key, solver, k, num_samples, sigma, noise, control_variate,
                   want_value)

    setup_context = staticmethod(_forward_setup)
    backward = staticmethod(_forward_backward)


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
    run = _forward_op if torch.compiler.is_compiling() else _Fused.apply
    mean, value = run(theta, _key(generator), spec.solver, spec.k, spec.num_samples,
                      spec.sigma, spec.noise, spec.control_variate, spec.output == "value")
    return mean if spec.output == "mean" else value


def fused_torch_key(spec: _fused.Spec, theta: torch.Tensor, key: int):
    """As :func:`fused_torch` with the Philox key given (the layer's own counter stream), so
    the general path fed ``_fused.noise(key, ...)`` draws the very same samples."""
    if theta.dtype not in _DTYPES:
        return NotImplemented
    if theta.device.type not in ("cpu", "cuda") or (
            theta.device.type == "cuda" and not _fused.triton_ready("cuda")):
        return NotImplemented
    key_t = torch.tensor([int(key) & ((1 << 63) - 1)], dtype=torch.int64, device=theta.device)
    run = _forward_op if torch.compiler.is_compiling() else _Fused.apply
    mean, value = run(theta, key_t, spec.solver, spec.k, spec.num_samples,
                      spec.sigma, spec.noise, spec.control_variate, spec.output == "value")
    return mean if spec.output == "mean" else value


__all__ = ["fused_torch", "fused_torch_key"]
