"""Public soft sort and soft rank: dispatch on the array type (NumPy, torch, jax).

The NumPy path lives here; torch and jax adapters are imported only when their arrays
come in, so importing :mod:`nonsmooth.solvers` loads neither framework.
"""
from __future__ import annotations

import sys

import numpy as np

from . import _soft_sort_core as _core

__all__ = ["soft_sort", "soft_rank"]


def _framework(values) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(values, jax.Array):
        return "jax"
    if isinstance(values, (np.ndarray, np.generic)):
        return "numpy"
    raise TypeError(
        "values must be a NumPy array, a torch.Tensor or a jax.Array, got "
        f"{type(values).__name__}; wrap lists with np.asarray(values, dtype=float)"
    )


def _numpy_compute_dtype(dtype: np.dtype, fn: str):
    if dtype in (np.float32, np.float64):
        return dtype
    if dtype == np.float16 or dtype.name == "bfloat16":
        return np.dtype(np.float32)  # half precision is too coarse for the sort keys
    raise TypeError(
        f"{fn} needs floating-point values, got dtype {dtype}; convert first, e.g. "
        "values.astype(np.float64)"
    )


def _numpy(values, op: str, fn: str, regularization, strength, direction):
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError(f"{fn}: values must have at least one axis, got a scalar {values!r}")
    n = values.shape[-1]
    if n == 0:
        raise ValueError(f"{fn}: values must not be empty along the last axis, got shape "
                         f"{values.shape}")
    work = _numpy_compute_dtype(values.dtype, fn)
    x2 = np.ascontiguousarray(values, dtype=work).reshape(-1, n)
    out, _, _ = _core.forward_checked(x2, op=op, regularization=regularization,
                                      strength=strength, descending=direction == "descending")
    return out.reshape(values.shape).astype(values.dtype, copy=False)


_adapters = {}  # framework -> entry point, imported on first use (an import costs ~1 us)


def _positional_error(fn: str, args: tuple) -> TypeError:
    """Options passed positionally: torchsort's order is (regularization, strength),
    fast-soft-sort's (direction, strength, regularization), so a positional call means
    different things to their users. Refuse it and spell out the keyword call."""
    named = {}
    for arg in args:
        low = arg.lower() if isinstance(arg, str) else None
        if low in _core.REGULARIZATIONS and "regularization" not in named:
            named["regularization"] = low
        elif low in _core.DIRECTIONS and "direction" not in named:
            named["direction"] = low
        elif (isinstance(arg, (int, float)) and not isinstance(arg, bool)
              and "regularization_strength" not in named):
            named["regularization_strength"] = arg
        else:
            named = None
            break
    if named:
        call = ", ".join(f"{k}={v!r}" for k, v in named.items())
    else:
        call = "regularization='l2', regularization_strength=1.0, direction='ascending'"
    return TypeError(
        f"{fn} takes its options by keyword only, got {len(args)} positional "
        f"({', '.join(repr(a) for a in args)}); torchsort and fast-soft-sort order them "
        f"differently, so write {fn}(values, {call})")


def _dispatch(values, args, op, fn, regularization, regularization_strength, direction):
    if args:
        raise _positional_error(fn, args)
    kind = _framework(values)
    regularization, strength, direction = _core.check_options(
        regularization, regularization_strength, direction)
    if kind == "numpy":
        return _numpy(values, op, fn, regularization, strength, direction)
    if kind == "torch":
        entry = _adapters.get("torch")
        if entry is None:
            from ._soft_sort_torch import soft_sort_rank_torch as entry

            _adapters["torch"] = entry
        return entry(values, op=op, fn=fn, regularization=regularization,
                     strength=strength, descending=direction == "descending")
    from ._soft_sort_jax import soft_sort_rank_jax

    return soft_sort_rank_jax(values, op=op, fn=fn, regularization=regularization,
                              strength=strength, descending=direction == "descending")


def soft_sort(values, *args, regularization: str = "l2", regularization_strength: float = 1.0,
              direction: str = "ascending"):
    """Differentiable sort along the last axis (Blondel et al., ICML 2020).

    The projection of ``rho / eps`` (``rho = (n, ..., 1)``) onto the permutahedron of
    ``values``: Euclidean for ``regularization="l2"`` (the output keeps the sum of
    ``values``), entropic for ``"kl"`` (``log`` of the KL projection of ``e^{rho/eps}``
    onto the permutahedron of ``e^values``). The output lies between ``min(values)`` and
    ``max(values)``. A strength ``eps > 0`` with ``eps * gap < 1`` for every gap between
    neighbouring sorted values returns the hard sort exactly; large values pull the
    output towards the mean (L2) or the log-mean-exp (KL). Any number of leading batch
    axes. Options are keyword-only and case-insensitive (``"KL"``, ``"DESCENDING"``).

    Returns the input's array type: NumPy, torch (a differentiable
    ``torch.ops.nonsmooth.soft_sort_rank`` custom op) or jax (``custom_jvp``).
    float16/bfloat16 are computed in float32; everything inside is float64, so ties stay
    exactly tied at any ``|values| / eps``. CUDA tensors make a host round trip for the
    sort and the isotonic pass; the backward runs on the device.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import soft_sort
        >>> soft_sort(np.array([3.0, 1.0, 2.0]), regularization_strength=0.1)
        array([1., 2., 3.])
        >>> soft_sort(np.array([3.0, 1.0, 2.0]), regularization_strength=2.0)
        array([1.5, 2. , 2.5])
    """
    return _dispatch(values, args, "sort", "soft_sort", regularization,
                     regularization_strength, direction)


def soft_rank(values, *args, regularization: str = "l2", regularization_strength: float = 1.0,
              direction: str = "ascending"):
    """Differentiable ranks along the last axis (rank 1 = smallest when ascending).

    With ``z = values / eps`` (``-values / eps`` descending) and ``rho = (n, ..., 1)``:
    ``"l2"`` is the Euclidean projection of ``z`` onto the permutahedron of ``rho``;
    ``"kl"`` is the paper's entropic soft rank ``argmin_{mu in P(rho)} KL(mu, e^z)``
    ``= exp(P_E(z, log rho))``, the operator of fast-soft-sort and torchsort. Both lie in
    the permutahedron: entries in ``[1, n]`` summing to ``n (n + 1) / 2``, ``(n + 1) / 2``
    everywhere for large ``eps``. The hard ranks come out exactly once
    ``eps < gap`` (L2) or ``eps < gap / log((k + 1) / k)`` (KL, ``k`` the lower rank) for
    every gap between neighbouring sorted values; ``eps`` below the smallest gap is
    enough for both. Tied values get exactly equal ranks at any ``|values| / eps`` (in
    the hard limit the average rank). Same array types, batching, dtypes, device notes
    and keyword-only, case-insensitive options as :func:`soft_sort`.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import soft_rank
        >>> soft_rank(np.array([3.0, 1.0, 2.0]), regularization_strength=0.1)
        array([3., 1., 2.])
        >>> soft_rank(np.array([[3.0, 1.0, 2.0]]), direction="descending",
        ...           regularization_strength=0.1)
        array([[1., 3., 2.]])
        >>> soft_rank(np.array([3.0, 3.0, 1.0]), regularization="KL")
        array([2.5, 2.5, 1. ])
    """
    return _dispatch(values, args, "rank", "soft_rank", regularization,
                     regularization_strength, direction)
