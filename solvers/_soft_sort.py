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


def _dispatch(values, op, fn, regularization, regularization_strength, direction):
    kind = _framework(values)
    strength = _core.check_options(regularization, regularization_strength, direction)
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


def soft_sort(values, *, regularization: str = "l2", regularization_strength: float = 1.0,
              direction: str = "ascending"):
    """Differentiable sort along the last axis (Blondel et al., ICML 2020).

    The projection of ``rho / eps`` (``rho = (n, ..., 1)``) onto the permutahedron of
    ``values``: Euclidean for ``regularization="l2"`` (the output keeps the sum of
    ``values``), entropic for ``"kl"``. A strength ``eps > 0`` with ``eps * gap < 1``
    for every gap between neighbouring sorted values returns the hard sort exactly;
    large values pull the output towards the mean (L2) or the log-mean-exp (KL). Any number of leading batch axes.
    Returns the input's array type: NumPy, torch (a differentiable
    ``torch.ops.nonsmooth.soft_sort_rank`` custom op) or jax (``custom_jvp``).
    float16/bfloat16 are computed in float32. CUDA tensors make a host round trip for
    the sort and the isotonic pass; the backward runs on the device.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import soft_sort
        >>> soft_sort(np.array([3.0, 1.0, 2.0]), regularization_strength=0.1)
        array([1., 2., 3.])
        >>> soft_sort(np.array([3.0, 1.0, 2.0]), regularization_strength=2.0)
        array([1.5, 2. , 2.5])
    """
    return _dispatch(values, "sort", "soft_sort", regularization, regularization_strength,
                     direction)


def soft_rank(values, *, regularization: str = "l2", regularization_strength: float = 1.0,
              direction: str = "ascending"):
    """Differentiable ranks along the last axis (rank 1 = smallest when ascending).

    The projection of ``values / eps`` onto the permutahedron of ``(n, ..., 1)``
    (Euclidean for ``"l2"``, entropic for ``"kl"``). L2 ranks always sum to
    ``n (n + 1) / 2`` (KL: ``exp(ranks)`` sums to ``e + ... + e^n``); ``eps`` below the
    smallest gap between distinct values gives the hard ranks exactly, large ``eps``
    gives ``(n + 1) / 2`` everywhere (L2). Tied values get equal ranks (L2: the average
    rank). Same array types, batching, dtypes and device notes as
    :func:`soft_sort`.

    Example:
        >>> import numpy as np
        >>> from nonsmooth.solvers import soft_rank
        >>> soft_rank(np.array([3.0, 1.0, 2.0]), regularization_strength=0.1)
        array([3., 1., 2.])
        >>> soft_rank(np.array([[3.0, 1.0, 2.0]]), direction="descending",
        ...           regularization_strength=0.1)
        array([[1., 3., 2.]])
    """
    return _dispatch(values, "rank", "soft_rank", regularization, regularization_strength,
                     direction)
