"""What a fixed-point or root solve reports: per-sample convergence, steps, residuals.

Framework-free: torch solves convert their statistics to NumPy at the end; jax solves
keep jax arrays (``SolveInfo`` is registered as a pytree by the jax adapter, so it can
leave a ``jit``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class ConvergenceError(RuntimeError):
    """A solve did not reach its tolerance and ``on_failure="raise"`` was asked for."""


class ConvergenceWarning(RuntimeWarning):
    """A solve did not reach its tolerance (``on_failure="warn"``, the default)."""


# machine epsilon of the 16-bit float types (float32 is the solver's own working precision for them)
_LOW_PRECISION_EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Statistics of one batched solve; every array has one entry per sample.

    Fields:
        method, stop, tol: the solver options the solve ran with.
        converged: bool per sample; ``residual <= tol`` (or ``abs_residual <= atol``).
        steps: evaluations of the map per sample until it converged (``max_iter`` if not).
        residual: the residual the stopping rule used (``rel_residual`` or ``abs_residual``).
        rel_residual: ``|f(z) - z| / |f(z)|`` per sample (root form: ``|F(z)| / |z - F(z)|``).
        abs_residual: ``|f(z) - z|`` (root form: ``|F(z)|``), Euclidean norm per sample.
        history: stopping residual per iteration, shape ``(iterations, batch)``; entries after
            a sample converged repeat its final value (jax pads the unused iterations with NaN).
        abs_history, rel_history: the absolute and relative residuals per iteration, same layout.
        best_returned: per sample, True where the solve failed and the iterate with the
            smallest residual was returned instead of the last one.
        nonfinite: True when a NaN/inf iterate stopped the solve (jax under ``jit``; eager
            solves raise ``FloatingPointError`` instead).
        trajectory_steps, trajectory: the iterations asked for with ``trajectory=`` and the
            states after that many steps (a sample that stopped earlier contributes its final
            state).  From ``fixed_point`` they are plain values; from the implicit layers each
            is differentiable through ``correction_steps`` damped steps of ``f`` (the
            fixed-point-correction loss of Bai et al. 2022).  Empty when not asked for.

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import fixed_point
        >>> z, info = fixed_point(lambda z: 0.5 * z + 1.0, torch.zeros(3, 1, dtype=torch.float64))
        >>> bool(info.converged.all()), round(float(z[0, 0]), 6)
        (True, 2.0)
    """

    method: str
    stop: str
    tol: float
    converged: Any
    steps: Any
    residual: Any
    rel_residual: Any
    abs_residual: Any
    history: Any
    best_returned: Any
    nonfinite: Any = False
    abs_history: Any = None
    rel_history: Any = None
    trajectory: Any = ()
    trajectory_steps: tuple = ()
    state_dtype: str = ""

    @property
    def all_converged(self) -> bool:
        return bool(_np(self.converged).all())

    @property
    def max_steps(self) -> int:
        steps = _np(self.steps)
        return int(steps.max()) if steps.size else 0

    def explain(self) -> str:
        conv = _np(self.converged).reshape(-1)
        steps = _np(self.steps).reshape(-1)
        res = _np(self.residual).reshape(-1)
        n = conv.size
        lines = [
            f"{self.method} solve, stop={self.stop!r}, tol={self.tol:g}: "
            f"{int(conv.sum())}/{n} samples converged; steps min/median/max = "
            f"{int(steps.min()) if n else 0}/{int(np.median(steps)) if n else 0}/{int(steps.max()) if n else 0}; "
            f"largest {self.stop} residual {float(res.max()) if n else 0.0:.3g}."
        ]
        if bool(_np(self.nonfinite)):
            lines.append("A NaN/inf iterate stopped the solve; the returned values are the last finite iterates.")
        failed = np.flatnonzero(~conv)
        if failed.size:
            shown = ", ".join(f"#{i} ({res[i]:.3g})" for i in failed[:8])
            more = "" if failed.size <= 8 else f" and {failed.size - 8} more"
            lines.append(
                f"Not converged: samples {shown}{more}; for these the iterate with the smallest residual "
                "was returned. Raise max_iter, try method='anderson' or a smaller beta (damping), "
                "or check that the map is a contraction."
            )
            eps = _LOW_PRECISION_EPS.get(self.state_dtype)
            if eps is not None and self.tol < 4 * eps:
                lines.append(
                    f"The state is {self.state_dtype}: f is evaluated in {self.state_dtype}, whose resolution "
                    f"({eps:.1e}) limits the residual; tol={self.tol:g} is below what it can reach. Use "
                    f"tol >= {4 * eps:.0e} (or a float32 state)."
                )
            small = _np(self.abs_residual).reshape(-1)[failed]
            rel = _np(self.rel_residual).reshape(-1)[failed]
            if self.stop == "rel" and np.any((small < 1e-6) & (rel > self.tol)):
                lines.append(
                    "Some failed samples have a tiny absolute residual: the solution is near zero, "
                    "where a relative tolerance cannot be met; use stop='abs' or atol=..."
                )
        return "\n".join(lines)

    def to_json(self) -> dict:
        def clean(a):
            a = _np(a)
            if a.dtype.kind == "f":
                return [None if not np.isfinite(v) else float(v) for v in a.reshape(-1)] if a.ndim <= 1 else \
                    [[None if not np.isfinite(v) else float(v) for v in row] for row in a.reshape(a.shape[0], -1)]
            return a.tolist()

        return {
            "method": self.method,
            "stop": self.stop,
            "tol": float(self.tol),
            "converged": clean(self.converged),
            "steps": clean(self.steps),
            "residual": clean(self.residual),
            "rel_residual": clean(self.rel_residual),
            "abs_residual": clean(self.abs_residual),
            "history": clean(self.history),
            "abs_history": None if self.abs_history is None else clean(self.abs_history),
            "rel_history": None if self.rel_history is None else clean(self.rel_history),
            "trajectory_steps": list(self.trajectory_steps),
            "best_returned": clean(self.best_returned),
            "nonfinite": bool(_np(self.nonfinite)),
            "explanation": self.explain(),
        }

    def __repr__(self) -> str:  # the arrays can be long; the summary is what people read
        return f"SolveInfo({self.explain().splitlines()[0]})"


def handle_failure(info: SolveInfo, on_failure: str, what: str = "solve") -> None:
    """Apply the ``on_failure`` policy to a finished (concrete) solve."""
    if on_failure == "ignore" or info.all_converged:
        return
    message = f"{what} did not converge.\n{info.explain()}"
    if on_failure == "raise":
        raise ConvergenceError(message)
    import warnings

    warnings.warn(message, ConvergenceWarning, stacklevel=4)


class ImplicitStats:
    """Forward and backward solve statistics of one implicit layer call.

    ``forward`` is known when the call returns; ``backward`` is filled in when the
    backward pass runs -- or a forward-mode tangent solve (``None`` before that, and for
    backward modes without a solve: ``phantom``, ``jfb``, ``unroll``).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import implicit_fixed_point
        >>> theta = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
        >>> z, stats = implicit_fixed_point(lambda z, t: t * z + 1.0, torch.zeros(1, 1, dtype=torch.float64), theta)
        >>> z.sum().backward()          # z* = 1 / (1 - theta), dz*/dtheta = 1 / (1 - theta)^2 = 4
        >>> round(theta.grad.item(), 4), stats.backward.all_converged
        (4.0, True)
    """

    __slots__ = ("forward", "backward_mode", "_backward")

    @property
    def trajectory(self):
        """The differentiable states at the iterations asked for with ``trajectory=`` (a tuple)."""
        return self.forward.trajectory

    def __init__(self, forward: SolveInfo, backward_mode: str):
        self.forward = forward
        self.backward_mode = backward_mode
        self._backward = None

    @property
    def backward(self):
        return self._backward

    def _record_backward(self, info: SolveInfo) -> None:
        self._backward = info

    def explain(self) -> str:
        text = f"forward: {self.forward.explain()}\nbackward ({self.backward_mode}): "
        if self._backward is None:
            text += "no backward solve recorded" + (
                " yet" if self.backward_mode == "implicit" else f" (mode {self.backward_mode!r} does not solve)")
        else:
            text += self._backward.explain()
        return text

    def to_json(self) -> dict:
        return {
            "forward": self.forward.to_json(),
            "backward_mode": self.backward_mode,
            "backward": None if self._backward is None else self._backward.to_json(),
        }

    def __repr__(self) -> str:
        return f"ImplicitStats(forward={self.forward!r}, backward={self._backward!r})"
