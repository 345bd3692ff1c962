"""Implicit layers: fixed-point and root solvers, implicit differentiation, invertibility checks.

Solvers and implicit differentiation work on torch tensors and jax arrays alike (the array
type of ``z0`` picks the backend):

- ``fixed_point``, ``root``: batched Picard / Anderson / Broyden solves returning ``SolveInfo``
  (per-iteration residuals, optional trajectory of states); tensor, tuple or pytree states.
- ``implicit_fixed_point``, ``implicit_root``: differentiable solutions with backward modes
  ``implicit``, ``phantom``, ``jfb``, ``unroll``; forward mode in both frameworks, exact second
  derivatives in jax; ``jacobian_regularization`` (Bai et al. 2021).
- ``DEQ``, ``EquilibriumCell``, ``ImplicitModel`` (torch ``nn.Module``); ``deq``, ``implicit_model``
  (jax, pure functions); ``project_rows_l1``, ``pf_eigenvalue`` (well-posedness).
- ``check_invertibility``, ``implicit_jacobian_set``, ``audit_implicit``: the nonsmooth implicit
  function theorem (Bolte, Le, Pauwels, Silveti-Falls 2021): is *every* element of the
  conservative Jacobian of ``F`` in ``z`` invertible, and what set does the solution map's
  Jacobian lie in.

Importing this package imports neither torch nor jax.
"""
from __future__ import annotations

import importlib as _importlib

from ._api import (
    fixed_point,
    implicit_fixed_point,
    implicit_root,
    jacobian_regularization,
    project_rows_l1,
    root,
)
from ._info import ConvergenceError, ConvergenceWarning, ImplicitStats, SolveInfo
from ._invertibility import (
    ElementwiseLayer,
    Invertibility,
    JacobianSet,
    check_invertibility,
    implicit_jacobian_set,
)
from ._audit import ImplicitAudit, audit_implicit

_LAZY = {
    "DEQ": "._torch_implicit",
    "EquilibriumCell": "._torch_implicit",
    "ImplicitModel": "._torch_implicit",
    "deq": "._jax_implicit",
    "implicit_model": "._jax_implicit",
}

__all__ = [
    "fixed_point",
    "root",
    "implicit_fixed_point",
    "implicit_root",
    "jacobian_regularization",
    "SolveInfo",
    "ImplicitStats",
    "ConvergenceError",
    "ConvergenceWarning",
    "ElementwiseLayer",
    "Invertibility",
    "JacobianSet",
    "check_invertibility",
    "implicit_jacobian_set",
    "ImplicitAudit",
    "audit_implicit",
    "pf_eigenvalue",
    "project_rows_l1",
    *_LAZY,
]


def pf_eigenvalue(A) -> float:
    """Perron-Frobenius eigenvalue of ``|A|`` (numpy, torch or jax matrix), computed in float64.

    Example:
        >>> import numpy as np
        >>> round(pf_eigenvalue(np.array([[0.0, -0.5], [0.5, 0.0]])), 12)
        0.5
    """
    from ._invertibility import pf_eigenvalue as _pf

    return _pf(A)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'nonsmooth.implicit' has no attribute {name!r}")
