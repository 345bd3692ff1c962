"""Perturbed optimizers and Fenchel-Young losses (Berthet et al., NeurIPS 2020).

For a solver y*(theta) (an argmax of <y, theta> over a finite set, or any piecewise
constant map) and noise Z with density proportional to exp(-nu(z)):

    y_sigma(theta) = E[y*(theta + sigma Z)]                       (``perturbed``)
    F_sigma(theta) = E[<y*(theta + sigma Z), theta + sigma Z>]    (``perturbed_max``)
    grad F_sigma = y_sigma,   J y_sigma(theta)^T g = E[grad nu(Z) <y*(theta + sigma Z), g>] / sigma

estimated with ``num_samples`` Monte-Carlo samples drawn in one batch, so the solver
is called once on an array of shape (num_samples, *theta.shape).  grad nu(z) = z for
normal noise and 1 - exp(-z) for Gumbel noise.

The torch and jax implementations live in ``_perturbed_torch`` and ``_perturbed_jax``
and are imported only when the input is a tensor of that framework.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from ._combinatorial_common import check_array, framework_of, solver_info

NOISES = ("gumbel", "normal")
EULER_GAMMA = 0.5772156649015329


def _check_options(num_samples, sigma, noise, control_variate, seed):
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)) \
            or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be 'gumbel' or 'normal', got {noise!r}")
    if not isinstance(control_variate, bool):
        raise TypeError(f"control_variate must be True or False, got {control_variate!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class PerturbedLayer:
    """A perturbed solver.  Call it on an array; see :func:`perturbed`.

    ``output`` is ``"mean"`` (y_sigma, from :func:`perturbed`) or ``"value"`` (F_sigma,
    from :func:`perturbed_max`).
    """

    solver: Callable
    num_samples: int
    sigma: float
    noise: str
    control_variate: bool
    seed: int
    event_ndim: int
    output: str = "mean"
    # torch.Generator per device, created on first use from ``seed``; advancing it gives
    # fresh noise at every call, and a new layer with the same seed replays the sequence.
    _generators: dict = dataclasses.field(default_factory=dict, repr=False)

    def __call__(self, theta, *, key=None, generator=None):
        """Evaluate on ``theta`` of shape (*batch, *event).

        torch: noise comes from ``generator`` if given, else from the layer's own
        generator on theta's device (seeded with ``seed``, advanced at every call).
        jax: noise comes from ``key`` (default ``jax.random.PRNGKey(seed)``, the same
        noise at every call: pass a fresh key per training step).
        numpy: forward only, noise from ``np.random.default_rng(seed)``.
        """
        fw = check_array(theta, "theta", event_ndim=self.event_ndim)
        # issue 16: built-in solvers run a fused kernel (noise regenerated, never stored)
        from ._fused import fused_call

        out = fused_call(self, theta, fw, key=key, generator=generator)
        if out is not NotImplemented:
            return out
        if fw == "torch":
            from ._perturbed_torch import perturbed_torch

            if generator is None:
                generator = self._torch_generator(theta.device)
            return perturbed_torch(self, theta, generator)
        if fw == "jax":
            from ._perturbed_jax import perturbed_jax

            return perturbed_jax(self, theta, key)
        return _perturbed_numpy(self, theta)

    def _torch_generator(self, device):
        import torch

        gen = self._generators.get(str(device))
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(self.seed))
            self._generators[str(device)] = gen
        return gen

    def explain(self) -> str:
        what = "E[y*(theta + sigma Z)]" if self.output == "mean" else \
            "E[<y*(theta + sigma Z), theta + sigma Z>]"
        cv = ", control variate y*(theta)" if self.control_variate else ""
        return (f"{what} with {self.noise} Z, sigma={self.sigma}, {self.num_samples} samples in "
                f"one stacked call of {getattr(self.solver, '__name__', self.solver)!s}{cv}; "
                f"the gradient is the score-function estimator")

    def to_json(self) -> dict:
        return {"solver": getattr(self.solver, "__name__", repr(self.solver)),
                "num_samples": self.num_samples, "sigma": self.sigma, "noise": self.noise,
                "control_variate": self.control_variate, "seed": self.seed,
                "event_ndim": self.event_ndim, "output": self.output}


def perturbed(solver: Callable, *, num_samples: int = 1000, sigma: float = 0.1,
              noise: str = "gumbel", control_variate: bool = False, seed: int = 0,
              event_ndim: int | None = None) -> PerturbedLayer:
    """Differentiable theta -> y_sigma(theta) = E[solver(theta + sigma Z)].

    The forward pass averages ``num_samples`` solutions computed in *one* call of
    ``solver`` on an array of shape (num_samples, *theta.shape); the backward pass is
    the noise-gradient estimator (1/(N sigma)) sum_i grad nu(Z_i) <y_i, g> (with
    ``control_variate=True``, y_i - solver(theta) replaces y_i: same mean, less variance,
    the unperturbed theta rides along in the same solver call).  Leading axes of theta
    are batch axes; ``event_ndim`` (default: ``solver.event_ndim`` or 1) trailing axes
    form one problem.  Works on torch tensors (autograd) and jax arrays (custom_jvp:
    grad, jacfwd, jit, vmap); noise is drawn on theta's device.

    Example:
        >>> import torch
        >>> from nonsmooth.solvers import perturbed, argmax_onehot
        >>> layer = perturbed(argmax_onehot, num_samples=10000, sigma=1.0)
        >>> theta = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> y = layer(theta)          # close to softmax(theta / sigma)
        >>> y.sum().item()            # doctest: +ELLIPSIS
        1.0...
    """
    _check_options(num_samples, sigma, noise, control_variate, seed)
    nd, _ = solver_info(solver, event_ndim=event_ndim)
    return PerturbedLayer(solver, int(num_samples), float(sigma), noise, control_variate,
                          int(seed), nd)


def perturbed_max(solver: Callable, *, num_samples: int = 1000, sigma: float = 0.1,
                  noise: str = "gumbel", control_variate: bool = False, seed: int = 0,
                  event_ndim: int | None = None) -> PerturbedLayer:
    """Smoothed optimal value theta -> F_sigma(theta) = E[<y*(theta + sigma Z), theta + sigma Z>].

    Its gradient is y_sigma(theta) (the same samples), and its Hessian in jax is the
    perturbed Jacobian estimate; torch gives first derivatives only (a second backward
    through the layer raises, rather than returning a silent zero).  The solver's output must have theta's event shape.
    For a maximizing solver and Gumbel noise, perturbed_max of ``argmax_onehot`` is
    sigma * logsumexp(theta / sigma) + sigma * euler_gamma.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import perturbed_max, argmax_onehot
        >>> f = perturbed_max(argmax_onehot, num_samples=20000, sigma=1.0)
        >>> round(float(f(np.zeros(2))), 1)   # log 2 + 0.577...
        1.3
    """
    layer = perturbed(solver, num_samples=num_samples, sigma=sigma, noise=noise,
                      control_variate=control_variate, seed=seed, event_ndim=event_ndim)
    return dataclasses.replace(layer, output="value", _generators={})


@dataclasses.dataclass(frozen=True, eq=False)
class FenchelYoungLoss:
    """The loss returned by :func:`fenchel_young_loss`; call it as ``loss(theta, y)``."""

    layer: PerturbedLayer
    sense: str

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
                       noise: str = "gumbel", control_variate: bool = False, seed: int = 0,
                       event_ndim: int | None = None, sense: str | None = None
                       ) -> FenchelYoungLoss:
    """Perturbed Fenchel-Young loss ``loss(theta, y)``, a convex function of theta.

    For a maximizing solver (``sense="max"``, the default unless ``solver.sense`` says
    otherwise): loss = F_sigma(theta) - <theta, y>, gradient y_sigma(theta) - y.  For a
    minimizing one (shortest paths, assignments): loss = <theta, y> - F_sigma(theta),
    gradient y - y_sigma(theta).  The loss omits the y-dependent constant that would
    make it nonnegative; it is minimized in theta exactly when y_sigma(theta) = y.

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
                          control_variate=control_variate, seed=seed, event_ndim=event_ndim)
    return FenchelYoungLoss(layer, s)


# ----------------------------------------------------------------------------- shared helpers


def check_samples(Y, layer: PerturbedLayer, theta_shape: tuple, n_rows: int) -> tuple:
    """Validate the stacked solver output; return its event shape."""
    batch = tuple(theta_shape[: len(theta_shape) - layer.event_ndim])
    lead = (n_rows,) + batch
    if tuple(Y.shape[: len(lead)]) != lead:
        raise ValueError(
            f"the solver must keep the leading (sample, *batch) axes {lead} of its input; "
            f"it returned shape {tuple(Y.shape)}.  Set event_ndim if the solver treats more "
            f"trailing axes as one problem")
    out_event = tuple(Y.shape[len(lead):])
    if layer.output == "value" and out_event != tuple(theta_shape[len(batch):]):
        raise ValueError(
            f"perturbed_max / fenchel_young_loss need a solver whose output has theta's event "
            f"shape {tuple(theta_shape[len(batch):])} (a linear objective <y, theta>); got "
            f"{out_event}")
    return out_event


def _perturbed_numpy(layer: PerturbedLayer, theta: np.ndarray):
    """Forward-only estimate on numpy arrays (no gradient), noise from the layer's seed."""
    rng = np.random.default_rng(layer.seed)
    shape = (layer.num_samples,) + theta.shape
    if layer.noise == "gumbel":
        Z = -np.log(rng.standard_exponential(shape))
    else:
        Z = rng.standard_normal(shape)
    P = theta + layer.sigma * Z.astype(theta.dtype)
    Y = np.asarray(layer.solver(P), dtype=theta.dtype)
    check_samples(Y, layer, theta.shape, layer.num_samples)
    if layer.output == "mean":
        return Y.mean(axis=0)
    axes = tuple(range(Y.ndim - layer.event_ndim, Y.ndim))
    return (Y * P).sum(axis=axes).mean(axis=0)

