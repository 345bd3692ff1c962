"""torch adapter of the perturbed layers.

Two parts:

1. ``nonsmooth::perturbed_samples`` (a custom operator): draws the noise from the layer's
   counter-based stream, checks theta, calls the solver once on the stacked
   (rows, *batch, *event) array and returns the samples.  Being opaque, it works under
   ``torch.compile(fullgraph=True)``; it has a fake kernel and a vmap rule (the solver takes
   leading batch axes, so a vmapped call is one larger call).
2. ``estimate``: the likelihood-ratio estimator of ``_perturbed_common`` in differentiable
   torch code.  Its custom primitive, ``_LikelihoodRatio`` (the weights w_i(theta), all
   ones in value), has a backward that is itself differentiable (double backward,
   ``torch.func.hessian``), a forward-mode rule (``torch.autograd.forward_ad``,
   ``torch.func.jacfwd``) and a generated vmap rule; ``_UnitWeightedMean`` averages the
   samples with those weights at the cost of a plain mean.  Dynamo does not trace autograd
   Functions with a forward-mode rule, so under torch.compile the same classes are used
   without it (``_LikelihoodRatio`` rather than ``_LikelihoodRatioFwd``).  Distribution
   objects and the frozen estimator use plain tensor code for the weights.

Contract: depends on ``_perturbed_common``, ``_combinatorial_common`` and ``_torch_ops``,
never on the dispatcher ``_perturbed``.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch

from . import _torch_ops
from ._combinatorial_common import running_eagerly, torch_compiling, validated_inputs
from ._perturbed_common import (PerturbedSpec, check_samples, check_sigma_for_dtype,
                                check_theta_magnitude, rng_seed)

_COUNTER_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- entry point


def perturbed_torch(spec: PerturbedSpec, theta: torch.Tensor, rng_state: torch.Tensor):
    """y_sigma(theta) (spec.output == "mean") or F_sigma(theta) ("value").

    This is the one place where, for torch, noise draw + solver + estimator meet: the
    samples come from ``perturbed_samples`` and the derivatives from ``estimate``.  A fused
    kernel for a built-in solver (noise regenerated from the counter, never stored) plugs in
    here: ``if fused.supports(spec, theta): return fused.perturbed(spec, theta, rng_state)``,
    returning the same value with the same derivatives (or raising for the orders it lacks).

    ``rng_state`` is an int64 CPU tensor [seed, counter]; the operator advances the counter.
    """
    check_sigma_for_dtype(spec.sigma, theta.dtype, torch.finfo(theta.dtype).max)
    Y, S, V = torch.ops.nonsmooth.perturbed_samples(theta.detach(), rng_state,
                                                    _torch_ops.id_of(spec))
    return estimate(spec, theta, Y, S, V)


# ----------------------------------------------------------------------------- samples


def _philox_noise(spec: PerturbedSpec, theta: torch.Tensor, key):
    """(Z, E) from the fused kernels' counter-based generator for this key, when it can
    draw them (built-in noise, float32/64 on the CPU): the same samples as the fused path."""
    if key is None or spec.noise.kind not in ("gumbel", "normal") or theta.device.type != "cpu" \
            or theta.dtype not in (torch.float32, torch.float64) or theta.ndim < 1:
        return None
    from . import _fused

    if not _fused.available():
        return None
    dtype = np.float32 if theta.dtype == torch.float32 else np.float64
    Z, E = _fused.noise(key, spec.num_samples, tuple(theta.shape), noise=spec.noise.kind, dtype=dtype)
    return torch.from_numpy(Z), None if E is None else torch.from_numpy(E)


def draw_and_solve(spec: PerturbedSpec, theta: torch.Tensor, generator: torch.Generator, key=None):
    """(Y, S, V): solver outputs on the rows of P, the noise's score data, and the sample
    mean of <y_i, P_i> for ``perturbed_max`` (an empty tensor otherwise).

    Gumbel noise is Z = -log E with E = -log U exponential; S = E, so the score
    1 - exp(-Z) = 1 - E needs no exponential.  U is clamped away from 0 so that no sample is
    infinite.  Normal: S = Z.  A distribution object: Z = icdf(U), S = Z.
    """
    N, sigma = spec.num_samples, spec.sigma
    shape = (N,) + tuple(theta.shape)
    P = torch.empty((spec.rows,) + tuple(theta.shape), dtype=theta.dtype, device=theta.device)
    kind = spec.noise.kind
    philox = _philox_noise(spec, theta, key)
    if philox is not None:
        Z, E = philox
        torch.add(theta, Z, alpha=sigma, out=P[:N])
        S = E if kind == "gumbel" else Z
    elif kind == "gumbel":
        E = torch.rand(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        E.clamp_(min=torch.finfo(theta.dtype).tiny)
        torch.log(E, out=E).neg_()
        Pn = P[:N]
        torch.log(E, out=Pn)
        Pn.mul_(-sigma).add_(theta)
        S = E
    elif kind == "normal":
        Z = torch.randn(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        torch.add(theta, Z, alpha=sigma, out=P[:N])
        S = Z
    else:
        S = _custom_noise(spec.noise.obj, shape, theta, generator)
        torch.add(theta, S, alpha=sigma, out=P[:N])
        _torch_ops.check_finite(P[:N], "theta + sigma Z")
    if spec.control_variate:
        P[N] = theta
    batched = _resolve_batched(spec, theta)
    with validated_inputs(), running_eagerly():
        Y = _torch_ops.call_solver(spec.solver, P, spec.event_ndim, batched)
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"the solver returned {type(Y).__name__} for a torch input; "
                        "it must return a torch tensor")
    Y = Y.to(theta.dtype)
    check_samples(tuple(Y.shape), spec, tuple(theta.shape), spec.rows)
    if spec.output == "value":
        axes = tuple(range(Y.ndim - spec.event_ndim, Y.ndim))
        V = (Y[:N] * P[:N]).sum(dim=axes).mean(dim=0)
    else:
        V = theta.new_empty((0,))
    return Y if Y.is_contiguous() else Y.contiguous(), S, V


def _custom_noise(dist, shape, theta, generator):
    if not isinstance(dist, torch.distributions.Distribution):
        raise TypeError(f"a torch layer needs noise='gumbel', 'normal' or a "
                        f"torch.distributions.Distribution, got {type(dist).__name__} "
                        f"(optax/jaxopt noise objects work with jax inputs)")
    if tuple(dist.batch_shape) or tuple(dist.event_shape):
        raise ValueError(f"the noise distribution must be scalar (one law for every coordinate), "
                         f"got batch_shape {tuple(dist.batch_shape)}, event_shape "
                         f"{tuple(dist.event_shape)}")
    eps = torch.finfo(theta.dtype).eps
    U = torch.rand(shape, generator=generator, dtype=theta.dtype, device=theta.device)
    U.clamp_(min=eps, max=1 - eps)
    try:
        Z = dist.icdf(U)
    except NotImplementedError as err:
        raise ValueError(f"{type(dist).__name__} has no icdf; the layer samples by inversion "
                         f"so that its seed decides the noise.  Use a distribution with an "
                         f"icdf (Normal, Laplace, Cauchy, Gumbel, ...)") from err
    return Z.to(theta.dtype)


def _resolve_batched(spec, theta) -> bool:
    if spec.batched is not None:
        return spec.batched
    event = tuple(theta.shape[theta.ndim - spec.event_ndim:])
    key = ("torch", event, theta.dtype, theta.device.type)
    if key not in spec.cache:
        spec.cache[key] = _torch_ops.probe_batched(spec.solver, event, theta.dtype, theta.device)
    return spec.cache[key]


def _out_event(spec, theta) -> tuple:
    """The solver's output event shape, found by one call on a real single-row input
    (for the fake kernel; cached)."""
    event = tuple(int(s) for s in theta.shape[theta.ndim - spec.event_ndim:])
    key = ("torch-out", event, theta.dtype)
    if key not in spec.cache:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            x = torch.zeros((1,) + event, dtype=theta.dtype, device=theta.device)
            batched = _resolve_batched(spec, x[0])
            with validated_inputs(), running_eagerly():
                y = _torch_ops.call_solver(spec.solver, x, spec.event_ndim, batched)
        spec.cache[key] = tuple(y.shape[1:])
    return spec.cache[key]


@torch.library.custom_op("nonsmooth::perturbed_samples", mutates_args=("rng_state",))
def perturbed_samples(theta: torch.Tensor, rng_state: torch.Tensor,
                      spec_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _torch_ops.lookup(spec_id)
    _torch_ops.check_finite(theta, "theta")
    if spec.noise.kind != "custom" and theta.numel():
        check_theta_magnitude(float(theta.abs().max()), spec.sigma, theta.dtype,
                              torch.finfo(theta.dtype).max)
    with _COUNTER_LOCK:
        seed, counter = (int(v) for v in rng_state.tolist())
        rng_state[1] += 1
    generator = torch.Generator(device=theta.device)
    generator.manual_seed(rng_seed(seed, counter))
    Y, S, V = draw_and_solve(spec, theta, generator, key=rng_seed(seed, counter))
    # Outputs of a custom operator must not alias its inputs.
    return Y if Y.data_ptr() != theta.data_ptr() else Y.clone(), S, V


@perturbed_samples.register_fake
def _perturbed_samples_fake(theta, rng_state, spec_id):
    spec = _torch_ops.lookup(spec_id)
    batch = tuple(theta.shape[: theta.ndim - spec.event_ndim])
    out = _out_event(spec, theta)
    Y = theta.new_empty((spec.rows,) + batch + out)
    S = theta.new_empty((spec.num_samples,) + tuple(theta.shape))
    V = theta.new_empty(batch if spec.output == "value" else (0,))
    return Y, S, V


def _perturbed_samples_vmap(info, in_dims, theta, rng_state, spec_id):
    if in_dims[1] is not None:
        raise ValueError("the perturbed layer's rng state cannot be vmapped")
    if in_dims[0] is None:
        return perturbed_samples(theta, rng_state, spec_id), (None, None, None)
    # vmapped axis -> leading batch axis of one call; outputs carry it after the sample axis.
    # randomness="same" asks for the same noise across the vmapped axis, so the layer is
    # then called per element with one counter value; otherwise each element gets its own
    # independent noise (the layer's stream is explicit, so there is no hidden global RNG
    # for randomness="error" to protect).
    x = theta.movedim(in_dims[0], 0)
    if info.randomness == "same":
        saved = rng_state.clone()
        outs = []
        for i in range(x.shape[0]):
            rng_state.copy_(saved)
            outs.append(perturbed_samples(x[i], rng_state, spec_id))
        Y, S, V = (torch.stack(t, dim=1) for t in zip(*outs))
    else:
        Y, S, V = perturbed_samples(x.contiguous(), rng_state, spec_id)
    spec = _torch_ops.lookup(spec_id)
    v_dim = 0 if spec.output == "value" else None
    if v_dim is None:
        V = theta.new_empty((0,))
    return (Y, S, V), (1, 1, v_dim)


torch.library.register_vmap("nonsmooth::perturbed_samples", _perturbed_samples_vmap)


# ----------------------------------------------------------------------------- estimator


def _score_vjp(kind: str, c, S, d, sigma: float):
    """sum_i c_i grad_theta log w_i(theta): (B, D) from c (N, B) and S (N, B, D).

    ``d`` = (theta - theta0) / sigma when derivatives of this result are wanted, else None
    (then exp(d) = 1 and the result is the first-order estimator at no extra cost).
    """
    # A (B, 1, N) x (B, N, D) bmm on transposed views: several times faster here than the
    # equivalent einsum, which copies to contiguous.
    weighted = torch.bmm(c.t().unsqueeze(1), S.transpose(0, 1)).squeeze(1)
    if kind == "gumbel":
        if d is not None:
            weighted = weighted * torch.exp(d)
        return (c.sum(0).unsqueeze(-1) - weighted) / sigma
    out = weighted if d is None else weighted - c.sum(0).unsqueeze(-1) * d
    return out / sigma


def _score_dot(kind: str, S, d, v, sigma: float):
    """<grad_theta log w_i(theta), v> for every sample: (N, B) from v (B, D)."""
    if kind == "gumbel":
        sv = torch.bmm(S.transpose(0, 1), (torch.exp(d) * v).unsqueeze(-1)).squeeze(-1).t()
        return (v.sum(-1).unsqueeze(0) - sv) / sigma
    sv = torch.bmm(S.transpose(0, 1), v.unsqueeze(-1)).squeeze(-1).t()
    return (sv - (d * v).sum(-1).unsqueeze(0)) / sigma


class _LikelihoodRatio(torch.autograd.Function):
    """w_i(theta) for built-in noise: value 1 (theta == theta0), derivatives of every order."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta, S, sigma, kind):
        return S.new_ones(S.shape[:2])

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, S, sigma, kind = inputs
        ctx.save_for_backward(theta, S)
        ctx.save_for_forward(theta, S)
        ctx.sigma, ctx.kind = sigma, kind

    @staticmethod
    def backward(ctx, gw):
        theta, S = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph / torch.func: return the gradient as a differentiable function
            # of theta, so that its own derivative is the second-order estimator.
            c = gw * _LikelihoodRatioFwd.apply(theta, S, ctx.sigma, ctx.kind)
            d = (theta - theta.detach()) / ctx.sigma
            return _score_vjp(ctx.kind, c, S, d, ctx.sigma), None, None, None
        return _score_vjp(ctx.kind, gw, S, None, ctx.sigma), None, None, None


class _LikelihoodRatioFwd(_LikelihoodRatio):
    """With a forward-mode rule (eager only: dynamo cannot trace one)."""

    @staticmethod
    def jvp(ctx, dtheta, dS, dsigma, dkind):
        theta, S = ctx.saved_tensors
        d = (theta - theta.detach()) / ctx.sigma
        w = _LikelihoodRatioFwd.apply(theta, S, ctx.sigma, ctx.kind)
        return w * _score_dot(ctx.kind, S, d, dtheta, ctx.sigma)


class _UnitWeightedMean(torch.autograd.Function):
    """(1/N) sum_i w_i Y_i for weights that are 1 in value (the layer's own w_i at theta0):
    the forward is a plain mean, the backward the per-sample <Y_i, g> as one elementwise
    product and reduction (faster here than any bmm/einsum on the (N, B, O) samples)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w, Y):
        return Y.mean(dim=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, Y = inputs
        ctx.save_for_backward(Y)
        ctx.save_for_forward(Y)

    @staticmethod
    def backward(ctx, g):
        (Y,) = ctx.saved_tensors
        return (Y * g).sum(-1) / Y.shape[0], None


class _UnitWeightedMeanFwd(_UnitWeightedMean):
    @staticmethod
    def jvp(ctx, dw, dY):
        (Y,) = ctx.saved_tensors
        return torch.bmm(dw.t().unsqueeze(1), Y.transpose(0, 1)).squeeze(1) / Y.shape[0]


def _likelihood_ratio_plain(theta, S, law, sigma: float, theta0=None):
    """The same weights as plain tensor code, for distribution objects and the frozen
    estimator (there theta0 is the fixed point the samples were drawn at)."""
    d = (theta - (theta.detach() if theta0 is None else theta0)) / sigma
    if law.kind == "gumbel":
        logw = d.sum(-1).unsqueeze(0) - torch.bmm(
            S.transpose(0, 1), torch.expm1(d).unsqueeze(-1)).squeeze(-1).t()
    elif law.kind == "normal":
        logw = torch.bmm(S.transpose(0, 1), d.unsqueeze(-1)).squeeze(-1).t() \
            - 0.5 * (d * d).sum(-1).unsqueeze(0)
    else:
        lp = law.obj.log_prob
        logw = (lp(S - d.unsqueeze(0)) - lp(S)).sum(-1).to(theta.dtype)
    return torch.exp(logw - logw.detach() if theta0 is None else logw)


def _weights(theta, S, law, sigma: float, compiling: bool, theta0=None):
    if law.kind == "custom" or theta0 is not None:
        return _likelihood_ratio_plain(theta, S, law, sigma, theta0)
    fn = _LikelihoodRatio if compiling else _LikelihoodRatioFwd
    return fn.apply(theta, S, sigma, law.kind)


def _mean_hat(theta, Y, S, spec: PerturbedSpec, compiling: bool, theta0=None):
    """(1/N) sum_i w_i(theta) (Y_i - b) + b, shape (B, O)."""
    N = spec.num_samples
    w = _weights(theta, S, spec.noise, spec.sigma, compiling, theta0)
    if theta0 is None:   # the layer itself: w == 1 in value
        fn = _UnitWeightedMean if compiling else _UnitWeightedMeanFwd
        out = fn.apply(w, Y[:N])
    else:                # the frozen estimator at any theta
        out = torch.bmm(w.t().unsqueeze(1), Y[:N].transpose(0, 1)).squeeze(1) / N
    if spec.control_variate:
        # b (1 - mean_i w_i): zero in value, keeps the mean of the derivative estimator
        # while removing y*(theta) from each sample's contribution.
        out = out + Y[N] * (1 - w.mean(0)).unsqueeze(-1)
    return out


class _Value(torch.autograd.Function):
    """F_sigma(theta): value = sample mean of <y_i, P_i>; gradient = y_hat(theta), whose own
    derivatives (double backward) are those of the likelihood-ratio estimator."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta, V, ybar, Y, S, spec, compiling):
        return V.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, V, ybar, Y, S, spec, compiling = inputs
        ctx.save_for_backward(theta, ybar, Y, S)
        ctx.save_for_forward(theta, ybar, Y, S)
        ctx.spec, ctx.compiling = spec, compiling

    @staticmethod
    def backward(ctx, gV):
        theta, ybar, Y, S = ctx.saved_tensors
        if torch.is_grad_enabled():
            y = _mean_hat(theta, Y, S, ctx.spec, ctx.compiling)
        else:
            y = ybar
        return gV.unsqueeze(-1) * y, None, None, None, None, None, None


class _ValueFwd(_Value):
    """_Value with a forward-mode rule (eager only: dynamo cannot trace one)."""

    @staticmethod
    def jvp(ctx, dtheta, dV, dybar, dY, dS, dspec, dcompiling):
        theta, ybar, Y, S = ctx.saved_tensors
        return (_mean_hat(theta, Y, S, ctx.spec, ctx.compiling) * dtheta).sum(-1)


def estimate(spec: PerturbedSpec, theta, Y, S, V):
    """The layer's output from its samples, differentiable in theta to every order."""
    N = spec.num_samples
    batch = tuple(theta.shape[: theta.ndim - spec.event_ndim])
    out_event = tuple(Y.shape[1 + len(batch):])
    # explicit sizes, not -1: an empty batch must reshape too
    B = math.prod(batch)
    D = math.prod(theta.shape[len(batch):])
    O = math.prod(out_event)
    th = theta.reshape(B, D)
    Sf = S.reshape(N, B, D)
    Yf = Y.reshape(Y.shape[0], B, O)
    compiling = torch_compiling()
    if spec.output == "mean":
        return _mean_hat(th, Yf, Sf, spec, compiling).reshape(batch + out_event)
    ybar = Yf[:N].mean(0)
    fn = _Value if compiling else _ValueFwd
    return fn.apply(th, V.reshape(B), ybar, Yf, Sf, spec, compiling).reshape(batch)


def freeze_torch(spec: PerturbedSpec, theta0: torch.Tensor, rng_state: torch.Tensor):
    """theta -> y_hat(theta) with the samples drawn once at theta0 (see PerturbedLayer.freeze)."""
    theta0 = theta0.detach().clone()
    check_sigma_for_dtype(spec.sigma, theta0.dtype, torch.finfo(theta0.dtype).max)
    Y, S, _ = torch.ops.nonsmooth.perturbed_samples(theta0, rng_state, _torch_ops.id_of(spec))
    N = spec.num_samples
    nb = theta0.ndim - spec.event_ndim
    batch = tuple(theta0.shape[:nb])
    B, D = math.prod(batch), math.prod(theta0.shape[nb:])
    out_event = tuple(Y.shape[1 + nb:])
    Yf = Y.reshape(Y.shape[0], B, math.prod(out_event))
    Sf = S.reshape(N, B, D)
    t0 = theta0.reshape(B, D)

    def estimator(theta):
        if tuple(theta.shape) != tuple(theta0.shape):
            raise ValueError(f"the frozen estimator takes theta of shape {tuple(theta0.shape)}, "
                             f"got {tuple(theta.shape)}")
        th = theta.reshape(B, D)
        return _mean_hat(th, Yf, Sf, spec, False, t0).reshape(batch + out_event)

    return estimator
