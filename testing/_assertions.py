"""Assertion helpers for gradient audits in tests.

- :func:`assert_ad_is_clarke` — the framework's reverse-mode output at ``x`` lies in the
  Clarke Jacobian (engine verdict SMOOTH or CLARKE);
- :func:`assert_no_bifurcation` — AD's output does not depend on the derivative chosen at
  the active kinks;
- :func:`assert_matches_fd_off_kinks` — AD agrees with float64 central differences
  along every coordinate whose difference step crosses no kink (no engine needed).

A failure raises ``AssertionError`` carrying the engine's explanation and a
runnable reproducer: the function rebuilt (imported, or from its own ``lambda``/``def``
source with the arrays and scalars it captures written out exactly), the inputs printed
exactly with ``float.hex``, their dtype, the framework and the call.  Every check is also reported to the sinks of
``nonsmooth.testing._record`` (the pytest plugin's ``--nonsmooth-json``).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np

from . import _record

__all__ = [
    "DEFAULT_TOLERANCES",
    "FDCheck",
    "assert_ad_is_clarke",
    "assert_matches_fd_off_kinks",
    "assert_no_bifurcation",
]

# (rtol, atol) by the dtype AD ran in, in the spirit of torch.autograd.gradcheck and
# jax.test_util.check_grads: a few hundred ulps of the dtype, never tighter than FD's own error.
DEFAULT_TOLERANCES = {
    "float64": (1e-6, 1e-8),
    "float32": (2e-3, 1e-4),
    "bfloat16": (1e-1, 1e-1),
    "float16": (3e-2, 1e-2),
}


# ----------------------------------------------------------------------------- inputs
def _framework(x) -> str:
    module = type(x).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("jax") or module.startswith("jaxlib"):
        return "jax"
    raise TypeError(
        f"x must be a torch tensor or a jax array (or a tuple of them), got {type(x).__module__}."
        f"{type(x).__name__}; convert NumPy input with torch.from_numpy(x) or jnp.asarray(x)"
    )


def _leaves(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


def _to_numpy64(a) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().to(dtype=__import__("torch").float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _check_inputs(x, name: str = "x") -> tuple[str, list]:
    leaves = _leaves(x)
    if not leaves:
        raise ValueError(f"{name} is an empty {type(x).__name__}; give an array or a tuple of arrays")
    frameworks = {_framework(a) for a in leaves}
    if len(frameworks) > 1:
        raise TypeError(f"{name} mixes frameworks {sorted(frameworks)}; give all torch or all jax arrays")
    for k, a in enumerate(leaves):
        label = name if len(leaves) == 1 else f"{name}[{k}]"
        dt = _dtype_name(a)
        if dt not in DEFAULT_TOLERANCES:
            raise TypeError(f"{label} has dtype {dt!r}; gradients need a float dtype "
                            f"({', '.join(DEFAULT_TOLERANCES)})")
        values = _to_numpy64(a)
        if values.size == 0:
            raise ValueError(f"{label} is empty (shape {tuple(values.shape)}); nothing to differentiate")
        if not np.all(np.isfinite(values)):
            bad = values[~np.isfinite(values)].reshape(-1)[0]
            raise ValueError(f"{label} holds {bad!r}; audits need finite inputs")
    return frameworks.pop(), leaves


# ----------------------------------------------------------------------------- reproducers
from ._reproduce import reproducer  # noqa: E402  (Python that rebuilds f and x; see its contract)


def _function_name(f) -> str:
    module = getattr(f, "__module__", "?")
    return f"{module}:{getattr(f, '__qualname__', repr(f))}"


def _x_record(x) -> dict:
    leaves = _leaves(x)
    return {
        "x_hex": [np.vectorize(lambda v: float(v).hex(), otypes=[object])(_to_numpy64(a)).tolist()
                  for a in leaves],
        "dtype": [_dtype_name(a) for a in leaves],
        "shape": [list(_to_numpy64(a).shape) for a in leaves],
    }


# ----------------------------------------------------------------------------- engine helpers
def _audit(f, x, options: dict):
    try:
        from nonsmooth.conservative import audit
    except ImportError as err:
        raise ImportError(
            "assert_ad_is_clarke / assert_no_bifurcation need the conservative engine "
            f"(nonsmooth.conservative.audit), which failed to import: {err}"
        ) from err
    return audit(f, x, **options)


def _verdict_name(result) -> str:
    v = getattr(result, "verdict", None)
    return getattr(v, "name", None) or str(v).split(".")[-1]


def _audit_json(result):
    try:
        return result.to_json()
    except Exception as err:  # noqa: BLE001 - the log must not hide the assertion
        return {"to_json_error": f"{type(err).__name__}: {err}"}


def assert_ad_is_clarke(f, x, *, allow_undecided: bool = False, **audit_options):
    """Assert that reverse-mode AD of ``f`` at ``x`` returns an element of the Clarke
    Jacobian (engine verdict ``SMOOTH`` or ``CLARKE``).  Returns the ``Audit``.

    ``SPURIOUS`` and ``NOT_LIPSCHITZ`` fail; ``UNDECIDED`` fails unless
    ``allow_undecided``.  ``audit_options`` (``kink_tol``, ``exact_budget``,
    ``n_directions``, ``seed``) go to ``nonsmooth.conservative.audit``.

    Example:
        >>> import torch
        >>> assert_ad_is_clarke(torch.abs, torch.tensor([0.0, 2.0]))  # doctest: +SKIP
    """
    framework, _ = _check_inputs(x)
    result = _audit(f, x, audit_options)
    verdict = _verdict_name(result)
    ok = verdict in ("SMOOTH", "CLARKE") or (allow_undecided and verdict == "UNDECIDED")
    _record.emit({"helper": "assert_ad_is_clarke", "passed": ok, "framework": framework,
                  "function": _function_name(f), "verdict": verdict, "audit": _audit_json(result),
                  **_x_record(x)})
    if not ok:
        raise AssertionError(
            f"AD of {_function_name(f)} at x is not certified to be in the Clarke Jacobian: "
            f"verdict {verdict}.\n\n{result.explain()}\n\n"
            + reproducer("assert_ad_is_clarke", f, x, framework, allow_undecided=allow_undecided or None,
                         **audit_options)
        )
    return result


def assert_no_bifurcation(f, x, **audit_options):
    """Assert that AD's output at ``x`` is the same for every admissible derivative
    choice at the active kinks (relu'(0) in {0, 1}, tie-breaking, ...).  Returns the
    ``Audit``.

    Example:
        >>> import torch
        >>> assert_no_bifurcation(torch.relu, torch.tensor([1.0, -2.0]))  # doctest: +SKIP
    """
    framework, _ = _check_inputs(x)
    result = _audit(f, x, audit_options)
    bifurcation = bool(getattr(result, "bifurcation"))
    _record.emit({"helper": "assert_no_bifurcation", "passed": not bifurcation, "framework": framework,
                  "function": _function_name(f), "verdict": _verdict_name(result),
                  "bifurcation": bifurcation, "audit": _audit_json(result), **_x_record(x)})
    if bifurcation:
        raise AssertionError(
            f"AD of {_function_name(f)} at x bifurcates: its output changes with the derivative "
            f"chosen at the active kink(s).\n\n{result.explain()}\n\n"
            + reproducer("assert_no_bifurcation", f, x, framework, **audit_options)
        )
    return result


# ----------------------------------------------------------------------------- finite differences
@dataclasses.dataclass(frozen=True)
class FDCheck:
    """AD against float64 central differences, per input coordinate.

    ``checked`` are the flat input coordinates compared; ``skipped`` maps the others to
    why (a kink within the step, a non-finite value).  ``max_abs_error`` and
    ``max_rel_error`` are over the checked columns.
    """

    framework: str
    dtype: str
    rtol: float
    atol: float
    step: float
    checked: tuple
    skipped: dict
    max_abs_error: float
    max_rel_error: float
    ad_jacobian: tuple
    fd_jacobian: tuple
    passed: bool

    def explain(self) -> str:
        skip = "; ".join(f"coordinate {k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"AD ({self.framework}, {self.dtype}) vs float64 central differences (relative step "
                f"{self.step:.2g}): {len(self.checked)} coordinate(s) checked, max abs error "
                f"{self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} (rtol {self.rtol:g}, "
                f"atol {self.atol:g}); skipped: {skip}.")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["skipped"] = {str(k): v for k, v in self.skipped.items()}
        out["explanation"] = self.explain()
        return json.loads(json.dumps(out, default=float))


def _evaluate_flat(f, leaves, framework, flat64: np.ndarray, shapes, dtype64: bool):
    """f at the flat float64 point, as a flat float64 NumPy array (and its dtype)."""
    parts, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) if shape else 1
        parts.append(flat64[offset:offset + size].reshape(shape))
        offset += size
    if framework == "torch":
        import torch

        args = [torch.tensor(p, dtype=torch.float64) for p in parts]
        with torch.no_grad():
            y = f(*args) if len(leaves) > 1 else f(args[0])
        return y.detach().to(torch.float64).numpy().reshape(-1), str(y.dtype).replace("torch.", "")
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        args = [jnp.asarray(p, dtype=jnp.float64) for p in parts]
        y = f(*args) if len(leaves) > 1 else f(args[0])
        return np.asarray(y, dtype=np.float64).reshape(-1), str(y.dtype)


def _ad_jacobian(f, leaves, framework) -> np.ndarray:
    """Reverse-mode Jacobian (outputs x flat inputs) in the inputs' own dtype."""
    if framework == "torch":
        import torch

        args = [a.detach().clone().requires_grad_(True) for a in leaves]
        y = f(*args) if len(leaves) > 1 else f(args[0])
        flat = y.reshape(-1)
        rows = []
        for i in range(flat.numel()):
            grads = torch.autograd.grad(flat[i], args, retain_graph=True, allow_unused=True)
            rows.append(np.concatenate([
                (np.zeros(a.numel()) if g is None else g.detach().to(torch.float64).reshape(-1).numpy())
                for a, g in zip(args, grads)]))
        return np.array(rows, dtype=np.float64).reshape(flat.numel(), -1)
    import jax

    x64 = any(_dtype_name(a) == "float64" for a in leaves)
    ctx = jax.enable_x64(True) if x64 else _null()
    with ctx:
        if len(leaves) > 1:
            jac = jax.jacrev(lambda *a: f(*a).reshape(-1), argnums=tuple(range(len(leaves))))(*leaves)
            return np.concatenate([np.asarray(j, dtype=np.float64).reshape(np.asarray(j).shape[0], -1)
                                   for j in jac], axis=1)
        j = np.asarray(jax.jacrev(lambda a: f(a).reshape(-1))(leaves[0]), dtype=np.float64)
        return j.reshape(j.shape[0], -1)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def assert_matches_fd_off_kinks(f, x, *, rtol: float | None = None, atol: float | None = None,
                                step: float | None = None, min_checked: int = 0) -> FDCheck:
    """Assert that AD of ``f`` at ``x`` matches float64 central differences along every
    coordinate whose difference step crosses no kink.  Needs no engine.

    For coordinate i the second difference ``f(x+h e_i) - 2f(x) + f(x-h e_i)`` is
    measured at ``h`` and ``h/4``: a smooth function's shrinks like ``h``, a kink within
    ``h/4`` keeps it from shrinking and the coordinate is skipped (listed in the result);
    the others are compared at step ``h/4``.  Tolerances default to
    ``DEFAULT_TOLERANCES[dtype]``.  ``x`` is a torch tensor or a jax array (or a tuple,
    then ``f(*x)``).  Returns the :class:`FDCheck`.

    Example:
        >>> import torch
        >>> r = assert_matches_fd_off_kinks(torch.abs, torch.tensor([0.0, 2.0]))  # doctest: +SKIP
        >>> r.checked, list(r.skipped)  # doctest: +SKIP
        ((1,), [0])
    """
    framework, leaves = _check_inputs(x)
    dtypes = [_dtype_name(a) for a in leaves]
    worst = max(dtypes, key=lambda d: DEFAULT_TOLERANCES[d][0])
    d_rtol, d_atol = DEFAULT_TOLERANCES[worst]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not isinstance(min_checked, int) or isinstance(min_checked, bool) or min_checked < 0:
        raise ValueError(f"min_checked must be an int >= 0, got {min_checked!r}")
    shapes = [tuple(_to_numpy64(a).shape) for a in leaves]
    x64 = np.concatenate([_to_numpy64(a).reshape(-1) for a in leaves])
    f0, out_dtype = _evaluate_flat(f, leaves, framework, x64, shapes, True)
    eps = float(np.finfo(out_dtype if out_dtype in ("float16", "float32", "float64") else "float64").eps)
    if step is None:
        step = eps ** (1 / 3)
    elif isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 < step < 1):
        raise ValueError(f"step must be a relative step in (0, 1), got {step!r}")
    ad = _ad_jacobian(f, leaves, framework)
    n = x64.size
    fd = np.full((f0.size, n), np.nan)
    checked, skipped = [], {}
    for i in range(n):
        h = step * max(1.0, abs(x64[i]))
        vals = {}
        for s in (h, -h, h / 4, -h / 4):
            xp = x64.copy()
            xp[i] += s
            vals[s] = _evaluate_flat(f, leaves, framework, xp, shapes, True)[0]
        if not all(np.all(np.isfinite(v)) for v in vals.values()) or not np.all(np.isfinite(f0)):
            skipped[i] = "f is not finite within the step"
            continue
        scale = np.maximum.reduce([np.abs(f0)] + [np.abs(v) for v in vals.values()])
        gap_h = np.abs(vals[h] - 2 * f0 + vals[-h]) / h
        gap_q = np.abs(vals[h / 4] - 2 * f0 + vals[-h / 4]) / (h / 4)
        # rounding noise of the second difference: of f's values, and of x_i + h itself (which
        # moves f by slope * eps * |x_i| -- it dominates where f cancels to ~0)
        slope = np.abs(vals[h] - vals[-h]) / (2 * h)
        noise = 400 * eps * (scale + slope * abs(x64[i])) / h
        kinked = (gap_h > noise) & (gap_q > 0.5 * gap_h)
        if np.any(kinked):
            j = int(np.argmax(np.where(kinked, gap_q, -1)))
            skipped[i] = (f"kink within the step |h| <= {h / 4:.3g}: one-sided slopes of output {j} "
                          f"differ by {gap_q[j]:.3g}")
            continue
        fd[:, i] = (vals[h / 4] - vals[-h / 4]) / (h / 2)
        checked.append(i)
    cols = np.array(checked, dtype=int)
    if cols.size:
        err = np.abs(ad[:, cols] - fd[:, cols])
        tol_ok = err <= atol + rtol * np.abs(fd[:, cols])
        max_abs = float(err.max(initial=0.0))
        rel = err / np.maximum(np.abs(fd[:, cols]), np.finfo(np.float64).tiny)
        max_rel = float(rel.max(initial=0.0))
    else:
        tol_ok = np.ones((0, 0), bool)
        max_abs = max_rel = 0.0
    ok = bool(np.all(tol_ok)) and len(checked) >= min_checked
    result = FDCheck(framework=framework, dtype=worst, rtol=float(rtol), atol=float(atol), step=float(step),
                     checked=tuple(checked), skipped=skipped, max_abs_error=max_abs,
                     max_rel_error=max_rel, ad_jacobian=tuple(map(tuple, ad.tolist())),
                     fd_jacobian=tuple(map(tuple, fd.tolist())), passed=ok)
    _record.emit({"helper": "assert_matches_fd_off_kinks", "passed": ok, "framework": framework,
                  "function": _function_name(f), "check": result.to_json(), **_x_record(x)})
    if not ok:
        lines = [f"AD of {_function_name(f)} does not match float64 central differences off kinks.",
                 result.explain()]
        if len(checked) < min_checked:
            lines.append(f"Only {len(checked)} coordinate(s) were free of kinks; min_checked={min_checked}.")
        bad = np.argwhere(~tol_ok)
        for r, c in bad[:8]:
            col = int(cols[c])
            lines.append(f"  d out[{int(r)}] / d x[{col}]: AD {float(ad[r, col])!r}, FD {float(fd[r, col])!r}")
        if len(bad) > 8:
            lines.append(f"  ... and {len(bad) - 8} more")
        lines.append("")
        lines.append(reproducer("assert_matches_fd_off_kinks", f, x, framework, rtol=rtol, atol=atol))
        raise AssertionError("\n".join(lines))
    return result
