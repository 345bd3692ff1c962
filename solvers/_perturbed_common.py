"""Framework-free pieces of the perturbed layers: options, noise laws, estimator formulas.

Contract: imports neither torch nor jax nor any dispatcher of ``nonsmooth.solvers``.  The
public layers (``_perturbed``) and the framework adapters (``_perturbed_torch``,
``_perturbed_jax``) both depend on this module; the adapters never import the dispatcher.

The estimator (Berthet et al. 2020, written as a likelihood ratio).  For a solver y*, noise
Z with density proportional to exp(-nu(z)) and samples u_i = theta0 + sigma Z_i drawn at the
point theta0 where the layer is called,

    w_i(theta) = p((u_i - theta) / sigma) / p((u_i - theta0) / sigma),
    y_hat(theta) = (1/N) sum_i w_i(theta) (y*(u_i) - b) + b,

is an unbiased estimate of y_sigma(theta) = E[y*(theta + sigma Z)] for *every* theta (b is
0, or y*(theta0) with the control variate, since E[w_i] = 1).  Its value at theta0 is the
plain sample mean and its derivatives of every order at theta0 are unbiased estimates of
those of y_sigma: the first is the familiar score-function estimator
(1/(N sigma)) sum_i (y_i - b) grad nu(Z_i)^T, the second adds the products of scores and
the Hessian of nu, and so on.  Both adapters differentiate exactly this function, so
Hessians (jax.hessian, torch double backward, torch.func.hessian) are right, not zero.

With d = (theta - theta0) / sigma (zero-valued, carrying the derivatives):

- Gumbel, nu(z) = z + exp(-z), stored E = exp(-Z):
  log w = sum_k [d_k - E_k (exp(d_k) - 1)],  grad_theta log w = (1 - E exp(d)) / sigma;
- normal, nu(z) = z^2 / 2, stored Z:
  log w = sum_k [Z_k d_k - d_k^2 / 2],        grad_theta log w = (Z - d) / sigma;
- a distribution object with ``log_prob`` (log-density up to a constant, elementwise):
  log w = sum_k [log_prob(Z_k - d_k) - log_prob(Z_k)], differentiated by the framework.

Both built-in forms factor so that the (N x batch x dim) work of a first-order pass is one
contraction, as cheap as the textbook estimator; the (batch x dim) factor exp(d) is what
carries the second and higher derivatives.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from ._combinatorial_common import check_batched, solver_info, solver_name

NOISES = ("gumbel", "normal")
EULER_GAMMA = 0.5772156649015329
# Largest |Z| the built-in samplers can return in any float dtype (Gumbel: -log(-log(1 - eps))
# is 37.4 in float64; normal draws stay below 9), with room to spare.  Used to check that
# theta + sigma Z cannot overflow.
Z_BOUND = 40.0
# sigma must leave this factor of head room below the dtype's largest value, both for
# sigma * Z and for the 1/sigma of the gradient (scores are O(Z_BOUND)).
SIGMA_HEADROOM = 2.0 ** 8


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseLaw:
    """Which noise a layer uses: ``kind`` is "gumbel", "normal" or "custom" (``obj``
    is then the user's distribution object, compared by identity: it need not be hashable)."""

    kind: str
    obj: object = None

    def __eq__(self, other):
        return isinstance(other, NoiseLaw) and self.kind == other.kind and self.obj is other.obj

    def __hash__(self):
        return hash((self.kind, id(self.obj)))

    @property
    def name(self) -> str:
        if self.kind != "custom":
            return self.kind
        return type(self.obj).__name__


def resolve_noise(noise) -> NoiseLaw:
    """A string among NOISES or a distribution object with ``sample`` and ``log_prob``.

    jax layers accept optax's / jaxopt's protocol (``sample(key, shape)``,
    ``log_prob(z)``); torch layers accept a scalar ``torch.distributions.Distribution``
    with an ``icdf`` (sampled by inversion, so the layer's seed still decides the noise).
    """
    if isinstance(noise, str):
        if noise not in NOISES:
            raise ValueError(f"noise must be 'gumbel', 'normal' or a distribution object with "
                             f"sample and log_prob methods, got {noise!r}")
        return NoiseLaw(noise)
    if callable(getattr(noise, "log_prob", None)) and callable(getattr(noise, "sample", None)):
        return NoiseLaw("custom", noise)
    raise ValueError(f"noise must be 'gumbel', 'normal' or a distribution object with sample "
                     f"and log_prob methods (e.g. optax.perturbations.Normal(), "
                     f"torch.distributions.Laplace(0., 1.)), got {noise!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class PerturbedSpec:
    """Everything an adapter needs to evaluate a perturbed layer (no behaviour of its own).

    ``output`` is "mean" (y_sigma) or "value" (F_sigma).  ``batched`` says whether the
    solver takes leading (sample, batch) axes (True), solves one instance per call (False,
    the adapters then vmap or loop it) or is unknown (None: probed once per event shape).
    """

    solver: Callable
    num_samples: int
    sigma: float
    noise: NoiseLaw
    control_variate: bool
    seed: int
    event_ndim: int
    output: str = "mean"
    batched: bool | None = None
    fused: bool | None = None  # None: the fused kernel when it applies; False: never; True: required
    # (framework, event shape, dtype) -> (batched, output event shape), filled on first use.
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        """Solver calls per problem: the samples, plus theta itself for the control variate."""
        return self.num_samples + int(self.control_variate)


def check_options(num_samples, sigma, noise, control_variate, seed, batched=None) -> NoiseLaw:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)) \
            or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    lo, hi = sigma_range(np.finfo(np.float64).max)
    if not lo <= sigma <= hi:
        raise ValueError(
            f"sigma={sigma!r} is outside [{lo:.3g}, {hi:.3g}], where the estimator stays finite "
            f"in float64 (theta + sigma Z must not overflow and the gradient divides by sigma)")
    law = resolve_noise(noise)
    if not isinstance(control_variate, bool):
        raise TypeError(f"control_variate must be True or False, got {control_variate!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 \
            or seed >= 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    check_batched(batched)
    return law


def sigma_range(dtype_max: float) -> tuple[float, float]:
    """The sigmas for which theta + sigma Z and the 1/sigma of the gradient stay finite."""
    return SIGMA_HEADROOM / dtype_max, dtype_max / SIGMA_HEADROOM


def check_sigma_for_dtype(sigma: float, dtype, dtype_max: float) -> None:
    """Raise if ``sigma`` is out of the finite range of the input's dtype (static check:
    it depends on the dtype only, so it runs under jit and torch.compile too)."""
    lo, hi = sigma_range(float(dtype_max))
    if not lo <= sigma <= hi:
        raise ValueError(
            f"sigma={sigma!r} is outside [{lo:.3g}, {hi:.3g}], the range where the perturbed "
            f"estimator stays finite in {dtype} (theta + sigma Z must not overflow, and the "
            f"gradient divides by sigma); rescale theta or compute in float64")


def check_theta_magnitude(max_abs_theta: float, sigma: float, dtype, dtype_max: float) -> None:
    """Eager check that theta + sigma Z cannot overflow (built-in noise: |Z| < Z_BOUND)."""
    if max_abs_theta + sigma * Z_BOUND > dtype_max:
        raise ValueError(
            f"theta + sigma Z would overflow {dtype}: max |theta| = {max_abs_theta:.3g}, "
            f"sigma = {sigma!r}; rescale theta or sigma")


def check_samples(Y_shape: tuple, spec: PerturbedSpec, theta_shape: tuple, n_rows: int) -> tuple:
    """Validate the stacked solver output's shape; return its event shape."""
    batch = tuple(theta_shape[: len(theta_shape) - spec.event_ndim])
    lead = (n_rows,) + batch
    if tuple(Y_shape[: len(lead)]) != lead:
        raise ValueError(
            f"the solver must keep the leading (sample, *batch) axes {lead} of its input; "
            f"it returned shape {tuple(Y_shape)}.  Set event_ndim if the solver treats more "
            f"trailing axes as one problem, or batched=False if it solves one instance per call")
    out_event = tuple(Y_shape[len(lead):])
    if spec.output == "value" and out_event != tuple(theta_shape[len(batch):]):
        raise ValueError(
            f"perturbed_max / fenchel_young_loss need a solver whose output has theta's event "
            f"shape {tuple(theta_shape[len(batch):])} (a linear objective <y, theta>); got "
            f"{out_event}")
    return out_event


def rng_seed(seed: int, counter: int) -> int:
    """64-bit seed of call number ``counter`` of a layer seeded with ``seed`` (splitmix64),
    so that consecutive calls get unrelated streams and a new layer replays them."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def make_spec(solver, *, num_samples, sigma, noise, control_variate, seed, event_ndim, output,
              batched, fused=None) -> PerturbedSpec:
    law = check_options(num_samples, sigma, noise, control_variate, seed, batched)
    if fused not in (None, True, False):
        raise TypeError(f"fused must be None (automatic), True or False, got {fused!r}")
    nd, _ = solver_info(solver, event_ndim=event_ndim)
    if batched is None and getattr(solver, "batched", None) is True:
        batched = True     # built-in solvers say so: no probe
    return PerturbedSpec(solver, int(num_samples), float(sigma), law, control_variate,
                         int(seed), nd, output, batched, fused)


def explain(spec: PerturbedSpec) -> str:
    what = "E[y*(theta + sigma Z)]" if spec.output == "mean" else \
        "E[<y*(theta + sigma Z), theta + sigma Z>]"
    cv = ", control variate y*(theta)" if spec.control_variate else ""
    how = "one stacked call" if spec.batched is not False else "per-instance (vmapped) calls"
    return (f"{what} with {spec.noise.name} Z, sigma={spec.sigma}, {spec.num_samples} samples in "
            f"{how} of {solver_name(spec.solver)}{cv}; derivatives of every order are those of "
            f"the likelihood-ratio estimator (first order: the score-function estimator)")


def to_json(spec: PerturbedSpec) -> dict:
    return {"solver": solver_name(spec.solver), "num_samples": spec.num_samples,
            "sigma": spec.sigma, "noise": spec.noise.name,
            "control_variate": spec.control_variate, "seed": spec.seed,
            "event_ndim": spec.event_ndim, "output": spec.output, "batched": spec.batched}
