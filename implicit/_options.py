"""Validation of solver options, shared by the torch and jax solvers."""
from __future__ import annotations

import dataclasses
import math

METHODS = ("picard", "anderson", "broyden")
STOPS = ("rel", "abs")
ON_FAILURE = ("warn", "raise", "ignore")
BACKWARDS = ("implicit", "phantom", "jfb", "unroll")
BACKWARD_SOLVERS = ("anderson", "picard", "broyden", "gmres")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    method: str = "anderson"
    tol: float = 1e-6
    max_iter: int = 100
    m: int = 5
    beta: float = 1.0
    stop: str = "rel"
    atol: float = 0.0
    memory: int | None = None
    lam: float = 1e-8
    on_failure: str = "warn"

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("stop", self.stop, STOPS)
        _choice("on_failure", self.on_failure, ON_FAILURE)
        _positive_float("tol", self.tol)
        _positive_float("beta", self.beta)
        _nonneg_float("atol", self.atol)
        _nonneg_float("lam", self.lam)
        _positive_int("max_iter", self.max_iter)
        _positive_int("m", self.m)
        if self.memory is not None:
            _positive_int("memory", self.memory)

    @property
    def broyden_memory(self) -> int:
        return self.max_iter if self.memory is None else self.memory


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _nonneg_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_backward(backward, backward_solver, phantom_steps, phantom_damping):
    _choice("backward", backward, BACKWARDS)
    _choice("backward_solver", backward_solver, BACKWARD_SOLVERS)
    _positive_int("phantom_steps", phantom_steps)
    _positive_float("phantom_damping", phantom_damping)
    if phantom_damping > 1:
        raise ValueError(f"phantom_damping must be in (0, 1]; got {phantom_damping!r}")


def framework_of(x, name: str = "z0") -> str:
    """'torch' or 'jax' for a torch tensor / jax array, without importing either."""
    from nonsmooth._frameworks import array_framework

    framework = array_framework(x)
    if framework in ("torch", "jax"):
        return framework
    raise TypeError(
        f"{name} must be a torch.Tensor or a jax.Array; got {type(x).__module__}.{type(x).__name__}. "
        "Wrap NumPy data with torch.as_tensor(...) or jax.numpy.asarray(...)."
    )
