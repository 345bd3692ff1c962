"""Framework-free pieces of the surrogate backward layers: options, checks, messages.

Contract: imports neither torch nor jax nor any dispatcher; the public layers
(``_surrogate_backward``) and the adapters (``_surrogate_backward_torch``,
``_surrogate_backward_jax``) depend on it.

Neither surrogate is the derivative of anything the forward pass computes: identity with
projection (Sahoo et al. 2023) returns +-P(g), blackbox (Vlastelica et al. 2020) a
difference quotient of the solver.  Both are defined only as a backward pass (a surrogate
VJP, nonlinear in g for blackbox and the "norm"/"std" projections), so the layers raise on
forward-mode differentiation and on second derivatives instead of returning numbers that
would look like derivatives.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ._combinatorial_common import check_batched, solver_info, solver_name

PROJECTIONS = (None, "mean", "norm", "std")

NO_SECOND_ORDER = (
    "second derivatives through identity_backward / blackbox_backward are not defined: "
    "their backward pass is a surrogate direction, not the derivative of a function, so it "
    "has no derivative of its own.  Differentiate the loss only once through these layers "
    "(or use perturbed / fenchel_young_loss, whose second derivatives are estimated)")
NO_FORWARD_MODE = (
    "identity_backward / blackbox_backward define a surrogate backward pass only (nonlinear "
    "in the incoming gradient for blackbox and the 'norm'/'std' projections), so forward-mode "
    "differentiation (jvp, jacfwd, forward AD, hessian) is not available; use reverse mode")


@dataclasses.dataclass(frozen=True, eq=False)
class SurrogateSpec:
    """A solver with a surrogate backward pass; ``method`` is "identity" or "blackbox"."""

    solver: Callable
    method: str
    projection: str | None
    lambda_: float
    sense: str
    event_ndim: int
    batched: bool | None = None
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def make_identity(solver, *, projection, sense, event_ndim, batched) -> SurrogateSpec:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be None, 'mean', 'norm' or 'std', got {projection!r}")
    nd, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    return SurrogateSpec(solver, "identity", projection, 0.0, s, nd, _batched(solver, batched))


def make_blackbox(solver, *, lambda_, sense, event_ndim, batched) -> SurrogateSpec:
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) \
            or not math.isfinite(lambda_) or lambda_ <= 0:
        raise ValueError(f"lambda_ must be a finite number > 0, got {lambda_!r}")
    nd, s = solver_info(solver, event_ndim=event_ndim, sense=sense)
    return SurrogateSpec(solver, "blackbox", None, float(lambda_), s, nd,
                         _batched(solver, batched))


def _batched(solver, batched):
    check_batched(batched)
    if batched is None and getattr(solver, "batched", None) is True:
        return True
    return batched


def check_output(y_shape, theta_shape, spec: SurrogateSpec):
    if tuple(y_shape) != tuple(theta_shape):
        raise ValueError(
            f"{spec.method}_backward needs a solver whose output has its input's shape "
            f"{tuple(theta_shape)} (costs and solutions live in the same space); got "
            f"{tuple(y_shape)}")


def explain(spec: SurrogateSpec) -> str:
    if spec.method == "identity":
        sign = "+" if spec.sense == "max" else "-"
        return (f"forward: the solver; backward: {sign}P(g) with P = "
                f"{spec.projection or 'identity'} (identity with projection)")
    if spec.sense == "min":
        rule = f"(y(w + {spec.lambda_} g) - y(w)) / {spec.lambda_}"
    else:
        rule = f"(y(t) - y(t - {spec.lambda_} g)) / {spec.lambda_}"
    return f"forward: the solver; backward: {rule} (blackbox differentiation)"


def to_json(spec: SurrogateSpec) -> dict:
    return {"solver": solver_name(spec.solver), "method": spec.method,
            "projection": spec.projection, "lambda_": spec.lambda_, "sense": spec.sense,
            "event_ndim": spec.event_ndim, "batched": spec.batched}
