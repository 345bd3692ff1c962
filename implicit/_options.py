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


def check_trajectory(trajectory, max_iter: int) -> tuple:
    """``trajectory=`` as a sorted tuple of distinct iteration numbers in ``[1, max_iter]``.

    An int ``n`` asks for ``n`` iterations spread evenly up to ``max_iter`` (torchdeq's
    ``n_states``); a sequence names them (torchdeq's ``indexing``)."""
    if trajectory is None:
        return ()
    if isinstance(trajectory, bool):
        raise TypeError(f"trajectory must be None, an int or a sequence of ints; got {trajectory!r}")
    if isinstance(trajectory, int):
        if not 1 <= trajectory <= max_iter:
            raise ValueError(f"trajectory={trajectory!r} asks for that many states; it must be in "
                             f"[1, max_iter={max_iter}]")
        return tuple(sorted({max(1, round(max_iter * (i + 1) / trajectory)) for i in range(trajectory)}))
    try:
        steps = list(trajectory)
    except TypeError:
        raise TypeError(f"trajectory must be None, an int or a sequence of ints; got {trajectory!r}") from None
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= max_iter]
    if bad or not steps:
        raise ValueError(f"trajectory={trajectory!r}: iteration numbers must be ints in [1, max_iter={max_iter}]"
                         + (f"; bad: {bad!r}" if bad else "; got none"))
    return tuple(sorted(set(steps)))


def check_correction(steps, damping):
    _positive_int("correction_steps", steps)
    _positive_float("correction_damping", damping)
    if damping > 1:
        raise ValueError(f"correction_damping must be in (0, 1]; got {damping!r}")


def check_state_shape(state_shape):
    """``state_shape``: one per-sample shape (ints >= 1) or, for tuple states, a tuple of them.
    Returns a tuple of ints, a tuple of such tuples, or None."""
    if state_shape is None:
        return None

    def is_seq(v):
        return isinstance(v, (tuple, list)) or type(v).__name__ == "Size"

    def one(shape):
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not is_seq(shape) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            return None
        return tuple(int(d) for d in shape)

    if is_seq(state_shape) and state_shape and all(is_seq(s) for s in state_shape):
        shapes = tuple(one(s) for s in state_shape)
        if all(s is not None for s in shapes):
            return shapes
    else:
        shape = one(state_shape)
        if shape is not None:
            return shape
    raise ValueError(f"state_shape must be the per-sample shape of z, a tuple of ints >= 1 (e.g. (64,)), or a "
                     f"tuple of such shapes for a tuple state; got {state_shape!r}")


def framework_of(x, name: str = "z0") -> str:
    """'torch' or 'jax' for a torch tensor / jax array, without importing either."""
    from nonsmooth._frameworks import array_framework

    if isinstance(x, (tuple, list)) and x:  # a tuple state: its first leaf decides
        return framework_of(x[0], f"{name}[0]")
    if isinstance(x, dict) and x:
        return framework_of(next(iter(x.values())), name)
    framework = array_framework(x)
    if framework in ("torch", "jax"):
        return framework
    raise TypeError(
        f"{name} must be a torch.Tensor or a jax.Array; got {type(x).__module__}.{type(x).__name__}. "
        "Wrap NumPy data with torch.as_tensor(...) or jax.numpy.asarray(...)."
    )
