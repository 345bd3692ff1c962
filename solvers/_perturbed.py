"""Perturbed optimizers and Fenchel-Young losses (Berthet et al., NeurIPS 2020): public API.

For a solver y*(theta) (an argmax of <y, theta> over a finite set, or any piecewise
constant map) and noise Z with density proportional to exp(-nu(z)):

    y_sigma(theta) = E[y*(theta + sigma Z)]                       (``perturbed``)
    F_sigma(theta) = E[<y*(theta + sigma Z), theta + sigma Z>]    (``perturbed_max``)
    grad F_sigma = y_sigma,   J y_sigma(theta)^T g = E[grad nu(Z) <y*(theta + sigma Z), g>] / sigma

estimated with ``num_samples`` Monte-Carlo samples drawn in one batch, so the solver is
called once on an array of shape (num_samples, *theta.shape).  Derivatives of every order
are those of the likelihood-ratio estimator (see ``_perturbed_common``), so second
derivatives are estimates of the true ones, never a silent zero.

This module only validates and dispatches: the framework code lives in ``_perturbed_torch``
and ``_perturbed_jax`` (imported when an input of that framework arrives), the shared
formulas and checks in ``_perturbed_common``.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import numpy as np

from nonsmooth import _layer_hook

from . import _perturbed_common as common
from ._combinatorial_common import check_array, framework_of, solver_info, torch_compiling

NOISES = common.NOISES
EULER_GAMMA = common.EULER_GAMMA


class PerturbedLayer:
    """A perturbed solver.  Call it on an array; see :func:`perturbed`.

    ``output`` is ``"mean"`` (y_sigma, from :func:`perturbed`) or ``"value"`` (F_sigma,
    from :func:`perturbed_max`).  The options are read-only attributes.
    """

    def __init__(self, spec: common.PerturbedSpec):
        self.spec = spec
        self._torch_rng = None  # int64 CPU tensor [seed, calls so far], created on first use

    solver = property(lambda self: self.spec.solver)
    num_samples = property(lambda self: self.spec.num_samples)
    sigma = property(lambda self: self.spec.sigma)
    noise = property(lambda self: self.spec.noise.name if self.spec.noise.kind != "custom"
                     else self.spec.noise.obj)
    control_variate = property(lambda self: self.spec.control_variate)
    seed = property(lambda self: self.spec.seed)
    event_ndim = property(lambda self: self.spec.event_ndim)
    output = property(lambda self: self.spec.output)
    batched = property(lambda self: self.spec.batched)

    def __call__(self, theta, *, key=None, generator=None):
        """Evaluate on ``theta`` of shape (*batch, *event).

        torch: noise comes from the layer's own stream (seeded with ``seed``, a fresh draw
        at every call; a new layer with the same seed replays the sequence), or from
        ``generator`` if given (eager mode only: it seeds this call's stream).
        jax: noise comes from ``key`` (default ``jax.random.PRNGKey(seed)``, the same
        noise at every call: pass a fresh key per training step); theta may be a pytree
        (then it is one problem; use jax.vmap for batches).
        numpy: forward only, noise from ``np.random.default_rng(seed)``.
        """
        fw = _framework_of_input(theta)
        spec = self.spec
        if _layer_hook.active() and fw in ("torch", "jax") and _is_array(theta):
            # the audit engine is tracing f: one node it understands (before the layer's
            # noise stream is touched, so tracing leaves the layer's state as it was)
            check_array(theta, "theta", event_ndim=spec.event_ndim, finite=False)
            return _layer_hook.route("perturbed", theta, spec=spec)
        # issue 16: a built-in solver runs a fused kernel (noise regenerated from a counter,
        # never stored); custom solvers, custom noise, pytrees, torch.compile and torch.func
        # transforms keep the general stacked path below
        fused = self._fused(theta, fw, key, generator)
        if fused is not NotImplemented:
            return fused
        if fw == "jax":
            from ._perturbed_jax import perturbed_jax

            if generator is not None:
                raise TypeError("generator= is for torch inputs; pass key= for jax")
            if _is_array(theta):
                check_array(theta, "theta", event_ndim=spec.event_ndim)
            return perturbed_jax(spec, theta, key)
        check_array(theta, "theta", event_ndim=spec.event_ndim, finite=fw == "numpy")
        if fw == "torch":
            from ._perturbed_torch import perturbed_torch

            if key is not None:
                raise TypeError("key= is for jax inputs; pass generator= for torch")
            return perturbed_torch(spec, theta, self._rng_for_torch(generator))
        if key is not None or generator is not None:
            raise TypeError("numpy inputs use the layer's seed; key=/generator= do not apply")
        return _perturbed_numpy(spec, theta)

    def _fused(self, theta, fw, key, generator):
        want = self.spec.fused
        if want is False:
            return NotImplemented
        out = self._try_fused(theta, fw, key, generator)
        if out is NotImplemented and want is True:
            raise ValueError(
                "fused=True but the fused kernel cannot run here: it needs a built-in solver (argmax_onehot, "
                "topk_mask, hard_rank, sort_permutation), noise='gumbel' or 'normal', one event axis, a "
                "float32/float64 array (torch: eager mode, no torch.func transform or forward AD), and the "
                "C extension (CPU) or Triton (CUDA); pass fused=None to fall back automatically")
        return out

    def _try_fused(self, theta, fw, key, generator):
        if not _is_array(theta) or self.spec.noise.kind == "custom" or self.spec.event_ndim != 1:
            return NotImplemented
        from . import _fused

        if not _fused.available():
            return NotImplemented
        sigma = self.spec.sigma
        if fw == "numpy":
            check_array(theta, "theta", event_ndim=1, finite=True)
            fmax = float(np.finfo(theta.dtype).max) if np.issubdtype(theta.dtype, np.floating) else np.inf
            common.check_sigma_for_dtype(sigma, theta.dtype, fmax)
            if theta.size:
                common.check_theta_magnitude(float(np.abs(theta).max()), sigma, theta.dtype, fmax)
            return _fused.fused_call(self, np.asarray(theta), "numpy")
        if fw == "jax":
            if generator is not None:
                raise TypeError("generator= is for torch inputs; pass key= for jax")
            check_array(theta, "theta", event_ndim=1)
            fmax = float(np.finfo(np.dtype(theta.dtype)).max)
            common.check_sigma_for_dtype(sigma, theta.dtype, fmax)
            from ._combinatorial_common import is_tracer

            if not is_tracer(theta) and theta.size:  # under jit the rows that would overflow come out NaN
                common.check_theta_magnitude(float(np.abs(np.asarray(theta)).max()), sigma, theta.dtype, fmax)
            return _fused.fused_call(self, theta, "jax", key=key)
        if fw != "torch" or key is not None:
            return NotImplemented
        import torch

        if torch_compiling() or torch._C._are_functorch_transforms_active():
            return NotImplemented
        from torch.autograd import forward_ad

        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(theta).tangent is not None:
            return NotImplemented  # forward AD: the general path has the tangent rule
        check_array(theta, "theta", event_ndim=1)
        if theta.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            fmax = torch.finfo(theta.dtype).max
            common.check_sigma_for_dtype(self.spec.sigma, theta.dtype, fmax)
            if theta.numel() and bool(torch.isfinite(theta).all()):
                common.check_theta_magnitude(float(theta.detach().abs().max()), self.spec.sigma, theta.dtype, fmax)
        spec = _fused.layer_spec(self, int(theta.shape[-1]))
        if spec is None or theta.device.type not in ("cpu", "cuda"):
            return NotImplemented
        # one Philox key per call from the layer's counter stream ([seed, calls so far], or a
        # seed drawn from the caller's generator): the key the general path would use too,
        # so compiled or transformed calls see the very same samples
        state = self._rng_for_torch(generator)
        seed, counter = (int(v) for v in state.tolist())
        from ._fused_torch import fused_torch_key

        out = fused_torch_key(spec, theta, common.rng_seed(seed, counter))
        if out is not NotImplemented:
            state[1] += 1
        return out

    def _rng_for_torch(self, generator):
        import torch

        if generator is not None:
            if torch_compiling():
                raise ValueError(
                    "generator= cannot be used under torch.compile (dynamo cannot trace a "
                    "torch.Generator); let the layer draw from its own seeded stream, or "
                    "call it outside the compiled region")
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                                     device=generator.device))
            return torch.tensor([seed, 0], dtype=torch.int64)
        if self._torch_rng is None:
            self._torch_rng = torch.tensor([self.spec.seed, 0], dtype=torch.int64)
        return self._torch_rng

    def freeze(self, theta0, *, key=None, generator=None):
        """The estimator as a deterministic smooth function: samples drawn once at theta0.

        Returns ``f`` with f(theta) = (1/N) sum_i w_i(theta) (y_i - b) + b, the
        likelihood-ratio reweighting of the samples y_i = solver(theta0 + sigma Z_i).
        f(theta0) and all its derivatives at theta0 are exactly what the layer returns with
        the same noise, and f is smooth, so ``torch.autograd.gradcheck``/``gradgradcheck``
        and ``jax.test_util.check_grads`` apply to it (they cannot apply to the layer,
        which draws new samples wherever it is evaluated).  ``perturbed`` layers only.

        Example:
            >>> import torch
            >>> from nonsmooth.solvers import perturbed, argmax_onehot
            >>> layer = perturbed(argmax_onehot, num_samples=100, sigma=0.5)
            >>> t0 = torch.zeros(1, 3, dtype=torch.float64)
            >>> f = layer.freeze(t0)
            >>> torch.autograd.gradcheck(f, t0.clone().requires_grad_())
            True
        """
        if self.spec.output != "mean":
            raise ValueError("freeze() is for perturbed layers: perturbed_max's gradient is the "
                             "sample mean of the y_i, which is not the gradient of one sample "
                             "function, so it has no frozen counterpart")
        fw = framework_of(theta0)
        check_array(theta0, "theta0", event_ndim=self.spec.event_ndim)
        if fw == "torch":
            from ._perturbed_torch import freeze_torch

            return freeze_torch(self.spec, theta0, self._rng_for_torch(generator))
        if fw == "jax":
            from ._perturbed_jax import freeze_jax

            return freeze_jax(self.spec, theta0, key)
        raise TypeError("freeze() needs a torch tensor or a jax array (numpy has no autodiff)")

    def __deepcopy__(self, memo):
        # A copy gets its own spec (and so its own operator id) and replays the seed.
        new = PerturbedLayer(copy.copy(self.spec))
        memo[id(self)] = new
        return new

    def explain(self) -> str:
        return common.explain(self.spec)

    def to_json(self) -> dict:
        return common.to_json(self.spec)

    def __repr__(self) -> str:
        s = self.spec
        return (f"PerturbedLayer(solver={getattr(s.solver, '__name__', s.solver)!s}, "
                f"num_samples={s.num_samples}, sigma={s.sigma}, noise={s.noise.name!r}, "
                f"control_variate={s.control_variate}, seed={s.seed}, "
                f"event_ndim={s.event_ndim}, output={s.output!r})")


def _is_array(x) -> bool:
    try:
        framework_of(x)
        return True
    except TypeError:
        return False


def _framework_of_input(theta) -> str:
    if _is_array(theta):
        return framework_of(theta)
    jax = sys.modules.get("jax")
    if jax is not None:
        leaves = jax.tree_util.tree_leaves(theta)
        if leaves and all(isinstance(leaf, jax.Array) for leaf in leaves):
            return "jax"
    raise TypeError(
        f"theta must be a torch tensor, a jax array (or a pytree of jax arrays) or a numpy "
        f"array, got {type(theta).__name__}; convert it with torch.as_tensor / jnp.asarray / "
        f"np.asarray first")


def perturbed(solver: Callable, *, num_samples: int = 1000, sigma: float = 0.1,
              noise="gumbel", control_variate: bool = False, seed: int = 0,
              event_ndim: int | None = None, batched: bool | None = None,
              fused: bool | None = None) -> PerturbedLayer:
    """Differentiable theta -> y_sigma(theta) = E[solver(theta + sigma Z)].

    The forward pass averages ``num_samples`` solutions computed in *one* call of
    ``solver`` on an array of shape (num_samples, *theta.shape); the backward pass is
    the noise-gradient estimator (1/(N sigma)) sum_i grad nu(Z_i) <y_i, g> (with
    ``control_variate=True``, y_i - solver(theta) replaces y_i: same mean, less variance,
    the unperturbed theta rides along in the same solver call).  Second and higher
    derivatives are the likelihood-ratio estimator's (unbiased, noisier), never zero.

    ``noise``: "gumbel", "normal", or a distribution object (jax: optax's/jaxopt's
    ``sample``/``log_prob`` protocol; torch: a scalar ``torch.distributions`` law with an
    ``icdf``).  Leading axes of theta are batch axes; ``event_ndim`` (default:
    ``solver.event_ndim`` or 1) trailing axes form one problem.  ``batched``: True if the
    solver takes leading axes, False if it solves one instance per call (it is then
    vmapped), None to find out once with a few probe calls (the built-in solvers say True).
    Works on torch tensors (autograd, double backward, forward AD, torch.func, vmap,
    ``torch.compile(fullgraph=True)``) and jax arrays or pytrees (grad, hessian, jacfwd,
    jit, vmap); noise is drawn on theta's device.

    ``fused``: built-in solvers (argmax, top-k, rank, sort permutation) with Gumbel or normal
    noise run a fused kernel by default (C on the CPU, Triton on CUDA): the noise is
    regenerated from a counter-based generator, never stored (memory O(batch x dim)), and the
    first derivatives come from the same kernel.  Its second derivatives of the mean raise;
    ``fused=False`` takes the general path, with derivatives of every order, forward AD and
    ``torch.compile``/``torch.func`` (which switch to it automatically); both draw the same
    samples from the same key on the CPU.  ``fused=True`` raises if the kernel cannot run.

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import perturbed, argmax_onehot
        >>> layer = perturbed(argmax_onehot, num_samples=10000, sigma=1.0)
        >>> theta = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> y = layer(theta)          # close to softmax(theta / sigma)
        >>> y.sum().item()            # doctest: +ELLIPSIS
        1.0...
    """
    return PerturbedLayer(common.make_spec(
        solver, num_samples=num_samples, sigma=sigma, noise=noise,
        control_variate=control_variate, seed=seed, event_ndim=event_ndim, output="mean",
        batched=batched, fused=fused))


def perturbed_max(solver: Callable, *, num_samples: int = 1000, sigma: float = 0.1,
                  noise="gumbel", control_variate: bool = False, seed: int = 0,
                  event_ndim: int | None = None, batched: bool | None = None,
                  fused: bool | None = None) -> PerturbedLayer:
    """Smoothed optimal value theta -> F_sigma(theta) = E[<y*(theta + sigma Z), theta + sigma Z>].

    Its gradient is y_sigma(theta) from the same samples, its Hessian the perturbed
    Jacobian estimate (both frameworks: jax.hessian, torch double backward), its third
    derivative the likelihood-ratio estimate, and so on.  The solver's output must have
    theta's event shape.  For a maximizing solver and Gumbel noise, perturbed_max of
    ``argmax_onehot`` is sigma * logsumexp(theta / sigma) + sigma * euler_gamma.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import perturbed_max, argmax_onehot
        >>> f = perturbed_max(argmax_onehot, num_samples=20000, sigma=1.0)
        >>> round(float(f(np.zeros(2))), 1)   # log 2 + 0.577...
        1.3
    """
    return PerturbedLayer(common.make_spec(
        solver, num_samples=num_samples, sigma=sigma, noise=noise,
        control_variate=control_variate, seed=seed, event_ndim=event_ndim, output="value",
        batched=batched, fused=fused))


class FenchelYoungLoss:
    """The loss returned by :func:`fenchel_young_loss`; call it as ``loss(theta, y)``."""

    def __init__(self, layer: PerturbedLayer, sense: str):
        self.layer, self.sense = layer, sense

    def __call__(self, theta, y, *, key=None, generator=None):
        """Loss per batch element (shape theta.shape[:-event_ndim])."""
        fw = framework_of(theta)
        if framework_of(y) != fw:
            raise TypeError(f"theta and y must come from the same framework, got "
                            f"{type(theta).__name__} and {type(y).__name__}")
        if tuple(y.shape) != tuple(theta.shape):
            raise ValueError(f"y must have theta's shape {tuple(theta.shape)}, got {tuple(y.shape)}")
        value = self.layer(theta, key=key, generator=generator)
        axes = tuple(range(theta.ndim - self.layer.event_ndim, theta.ndim))
        if fw == "torch":
            inner = (theta * y.to(theta.dtype)).sum(dim=axes)
        else:
            inner = (theta * y).sum(axis=axes)
        return value - inner if self.sense == "max" else inner - value

    def explain(self) -> str:
        grad = "y_sigma(theta) - y" if self.sense == "max" else "y - y_sigma(theta)"
        return (f"Fenchel-Young loss of a {self.sense}imizing solver, up to a constant in y; "
                f"gradient in theta: {grad}.  {self.layer.explain()}")

    def to_json(self) -> dict:
        return {"sense": self.sense, **self.layer.to_json()}


def fenchel_young_loss(solver: Callable, *, num_samples: int = 1000, sigma: float = 0.1,
                       noise="gumbel", control_variate: bool = False, seed: int = 0,
                       event_ndim: int | None = None, sense: str | None = None,
                       batched: bool | None = None, fused: bool | None = None) -> FenchelYoungLoss:
    """Perturbed Fenchel-Young loss ``loss(theta, y)``, a convex function of theta.

    For a maximizing solver (``sense="max"``, the default unless ``solver.sense`` says
    otherwise): loss = F_sigma(theta) - <theta, y>, gradient y_sigma(theta) - y.  For a
    minimizing one (shortest paths, assignments): loss = <theta, y> - F_sigma(theta),
    gradient y - y_sigma(theta).  The loss omits the y-dependent constant that would
    make it nonnegative; it is minimized in theta exactly when y_sigma(theta) = y.
    Per batch element, not averaged (PyEPO's ``perturbedFenchelYoung`` averages).

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import fenchel_young_loss, argmax_onehot
        >>> loss = fenchel_young_loss(argmax_onehot, num_samples=100)
        >>> theta = torch.zeros(1, 3, requires_grad=True)
        >>> loss(theta, torch.tensor([[0.0, 0.0, 1.0]])).sum().backward()
        >>> theta.grad.shape
        torch.Size([1, 3])
    """
    _, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    layer = perturbed_max(solver, num_samples=num_samples, sigma=sigma, noise=noise,
                          control_variate=control_variate, seed=seed, event_ndim=event_ndim,
                          batched=batched, fused=fused)
    return FenchelYoungLoss(layer, s)


# ----------------------------------------------------------------------------- numpy


def _perturbed_numpy(spec: common.PerturbedSpec, theta: np.ndarray):
    """Forward-only estimate on numpy arrays (no gradient), noise from the layer's seed."""
    if spec.noise.kind == "custom":
        raise TypeError("a noise distribution object needs torch or jax inputs; numpy inputs "
                        "take noise='gumbel' or 'normal'")
    fmax = np.finfo(theta.dtype).max
    common.check_sigma_for_dtype(spec.sigma, theta.dtype, fmax)
    if theta.size:
        common.check_theta_magnitude(float(np.abs(theta).max()), spec.sigma, theta.dtype, fmax)
    rng = np.random.default_rng(spec.seed)
    shape = (spec.num_samples,) + theta.shape
    if spec.noise.kind == "gumbel":
        Z = -np.log(rng.standard_exponential(shape))
    else:
        Z = rng.standard_normal(shape)
    P = theta + spec.sigma * Z.astype(theta.dtype)
    Y = np.asarray(_solve_numpy(spec, P), dtype=theta.dtype)
    common.check_samples(Y.shape, spec, theta.shape, spec.num_samples)
    if spec.output == "mean":
        return Y.mean(axis=0)
    axes = tuple(range(Y.ndim - spec.event_ndim, Y.ndim))
    return (Y * P).sum(axis=axes).mean(axis=0)


def _solve_numpy(spec, P):
    from ._combinatorial_common import decide_batched_outputs, validated_inputs

    event = P.shape[P.ndim - spec.event_ndim:]
    batched = spec.batched
    if batched is None:
        key = ("numpy", event, P.dtype.str)
        if key not in spec.cache:
            x = np.random.default_rng(0).standard_normal((3,) + event).astype(P.dtype)

            def attempt(arg):
                try:
                    with validated_inputs():
                        return np.asarray(spec.solver(arg), dtype=np.float64)
                except Exception:  # noqa: BLE001
                    return None

            spec.cache[key] = decide_batched_outputs(attempt(x), [attempt(r) for r in x])
        batched = spec.cache[key]
    with validated_inputs():
        if batched:
            return spec.solver(P)
        lead = P.shape[: P.ndim - spec.event_ndim]
        flat = P.reshape((-1,) + event)
        out = np.stack([np.asarray(spec.solver(row)) for row in flat])
        return out.reshape(lead + out.shape[1:])


__all__ = ["perturbed", "perturbed_max", "fenchel_young_loss", "PerturbedLayer",
           "FenchelYoungLoss"]
