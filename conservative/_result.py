"""Result types of the engine: :class:`Verdict`, :class:`ActiveKink`, :class:`ClarkeSet`
and :class:`Audit`.  Plain data: frozen dataclasses with ``to_json()`` and ``explain()``.

The verdicts mean exactly this (the contract; ``explain()`` says which case applied):

* ``SMOOTH``: no nonsmooth primitive is at a kink; AD equals the Jacobian of f, which the
  engine checked against float64 central differences.
* ``CLARKE``: AD lies in the convex hull of B-subdifferential elements the engine *proved*
  to be elements (each is the gradient of a piece whose region has interior arbitrarily
  close to x), hence in the Clarke Jacobian.
* ``SPURIOUS``: certified outside the Clarke Jacobian.  Only claimed when the set of
  elements is exact (see :class:`ClarkeSet`), or at a point where f is differentiable.
* ``NOT_LIPSCHITZ``: f jumps at x by more than float64 rounding can explain, or a
  difference quotient grows without bound.
* ``UNDECIDED``: anything else, with the reason.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math

import numpy as np

from ._lp import hull_residual, min_norm_point

__all__ = ["Verdict", "ActiveKink", "ClarkeSet", "Audit"]


class Verdict(str, enum.Enum):
    """The audit's conclusion about AD's output at ``x``."""

    SMOOTH = "SMOOTH"  # no kink active; AD equals the Jacobian (checked by central differences)
    CLARKE = "CLARKE"  # AD lies in the convex hull of B-subdifferential elements found
    SPURIOUS = "SPURIOUS"  # certified: AD is outside the Clarke Jacobian
    NOT_LIPSCHITZ = "NOT_LIPSCHITZ"  # f is discontinuous or non-Lipschitz at x
    UNDECIDED = "UNDECIDED"  # budget or capability exceeded; see ``reason``


@dataclasses.dataclass(frozen=True)
class ActiveKink:
    """One nonsmooth primitive sitting at a kink at ``x``."""

    primitive: str  # registry rule name, e.g. "relu"
    location: str  # where in the trace, e.g. "relu_1 = aten.relu.default(mv_1)"
    clarke: str  # the primitive's local Clarke set there, e.g. "[0, 1]"
    detail: str  # which element and value
    kind: str  # "kink" | "jump" | "tie" | "compare" | "group" | "nonlipschitz" | "norm" | "unsupported"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fmt_clarke(c) -> str:
    if isinstance(c, tuple) and len(c) == 2 and all(isinstance(v, (int, float)) for v in c):
        return f"[{c[0]:.6g}, {c[1]:.6g}]"
    return str(c)


@dataclasses.dataclass(frozen=True)
class ClarkeSet:
    """B-subdifferential elements found at ``x``; their convex hull approximates (or, when
    ``exact``, equals) the Clarke Jacobian.  ``vertices`` has shape (m, out, in).
    ``basis`` says why the set is exact, or why it may not be.

    >>> import numpy as np
    >>> C = ClarkeSet(np.array([[[0.0]], [[1.0]]]), True)
    >>> C.contains(np.array([[0.5]])), C.contains(np.array([[2.0]]))
    (True, False)
    """

    vertices: np.ndarray
    exact: bool
    basis: str = ""
    structure: object = None  # a Minkowski-sum description when the set has too many vertices to list

    def contains(self, J, tol: float = 1e-7) -> bool:
        """Whether ``J`` (out x in) lies in the convex hull, up to ``tol`` (max-norm)."""
        J = np.asarray(J, dtype=np.float64)
        if self.structure is not None:
            return bool(self.structure.distance(J.reshape(self.vertices.shape[1:])) <= tol)
        if len(self.vertices) == 0:
            return False
        if not np.all(np.isfinite(J)):
            return False
        if J.size != self.vertices[0].size:
            raise ValueError(f"J must have shape {self.vertices.shape[1:]}, got {J.shape}")
        res, _ = hull_residual(self.vertices.reshape(len(self.vertices), -1), J.reshape(-1))
        return bool(res <= tol)

    def min_norm(self) -> np.ndarray:
        """The min-Frobenius-norm element of the hull (the steepest-descent certificate)."""
        z, _ = min_norm_point(self.vertices.reshape(len(self.vertices), -1))
        return z.reshape(self.vertices.shape[1:])

    def to_json(self) -> dict:
        return {"vertices": self.vertices.tolist(), "exact": self.exact, "basis": self.basis}

    def explain(self) -> str:
        kind = "exactly the Clarke Jacobian" if self.exact else "an inner approximation of the Clarke Jacobian"
        basis = f" ({self.basis})" if self.basis else ""
        return f"{len(self.vertices)} B-subdifferential element(s); their convex hull is {kind}{basis}."


@dataclasses.dataclass(frozen=True)
class Audit:
    """The result of :func:`audit`.  Arrays are float64 NumPy, Jacobians out x in.

    ``bifurcation`` is True when AD's output depends on the derivative *convention* of a
    primitive (one value of relu'(0), one tie rule for max, ... shared by every site of
    that primitive, as a framework setting would change it); ``convention_jacobians``
    holds the distinct Jacobians those conventions give.  ``selection_jacobians`` holds
    the distinct Jacobians of independent per-kink vertex choices (a finer, different
    count).  ``exact_basis`` names the condition under which ``exact`` holds, or why
    the set may be incomplete.
    """

    verdict: Verdict
    ad_jacobian: np.ndarray | None
    selection_jacobians: np.ndarray
    b_subdifferential: np.ndarray
    exact: bool
    bifurcation: bool
    active_kinks: tuple
    min_norm: np.ndarray | None
    framework: str
    versions: dict
    reason: str
    dtype: str = "float64"
    engine_jacobian: np.ndarray | None = None  # Jacobian of the LD piece along the identity
    hull_distance: float | None = None  # max-norm distance of AD to the hull of b_subdifferential
    notes: tuple = ()
    convention_jacobians: np.ndarray | None = None
    exact_basis: str = ""
    ad_mode: str = "reverse"  # "forward" where reverse mode cannot run (jax's while_loop); see notes
    monte_carlo: dict | None = None  # perturbed layers: reference, standard errors, z-score (_layer_perturbed.py)

    def explain(self) -> str:
        v = self.verdict
        n_k = len(self.active_kinks)
        parts = []
        if v is Verdict.SMOOTH:
            parts.append("No nonsmooth primitive sits at a kink at this point, so f is differentiable "
                         "here and AD returned its Jacobian (checked against float64 central differences).")
        elif v is Verdict.CLARKE:
            parts.append(f"{n_k} nonsmooth primitive site(s) sit at a kink. AD's output lies in the convex "
                         f"hull of {len(self.b_subdifferential)} B-subdifferential element(s), so it is an "
                         "element of the Clarke Jacobian.")
        elif v is Verdict.SPURIOUS:
            parts.append("AD's output is NOT in the Clarke Jacobian, and this is certified.")
        elif v is Verdict.NOT_LIPSCHITZ:
            parts.append("f is not Lipschitz (or not continuous) at this point, so no Clarke Jacobian exists; "
                         "whatever AD returned is not a generalized derivative.")
        else:
            parts.append("The audit could not decide.")
        if self.ad_mode != "reverse":
            parts.append(f"The framework's reverse mode cannot differentiate f here, so 'AD' above is its "
                         f"{self.ad_mode} mode (see the notes).")
        reason = " ".join(self.reason.split())
        if reason:
            parts.append(reason if reason.endswith(".") else reason + ".")
        if self.bifurcation:
            n_conv = 0 if self.convention_jacobians is None else len(self.convention_jacobians)
            parts.append(f"The AD output depends on the derivative convention of a primitive (one value per "
                         f"primitive, as a framework setting would choose it): {n_conv} different Jacobians.")
        if len(self.selection_jacobians) > 1:
            parts.append(f"Independent per-kink choices give {len(self.selection_jacobians)} different "
                         "selection Jacobians.")
        if n_k:
            shown = "; ".join(f"{k.detail} [{k.location}], local Clarke set {k.clarke}" for k in self.active_kinks[:5])
            more = f" (and {n_k - 5} more)" if n_k > 5 else ""
            parts.append(f"Active kinks: {shown}{more}.")
        if v not in (Verdict.SMOOTH, Verdict.NOT_LIPSCHITZ) and n_k:
            if self.exact:
                parts.append("The piece enumeration was complete" + (f": {self.exact_basis}." if self.exact_basis else "."))
            else:
                parts.append("The piece enumeration was not complete (the hull found is an inner approximation"
                             + (f": {self.exact_basis})." if self.exact_basis else ")."))
        parts.extend(n for n in self.notes if n)
        if self.monte_carlo is not None and self.monte_carlo.get("z_score") is not None:
            mc = self.monte_carlo
            parts.append(f"Monte Carlo check: reference {mc['reference']}; AD at {mc['z_score']:.2f} standard errors "
                         f"(threshold {mc['threshold']:.2f}; largest standard error "
                         f"{float(np.max(mc['standard_error'])) if np.size(mc['standard_error']) else 0.0:.3g}, "
                         f"{mc['simulated_runs']} simulated draws of the estimator).")
        ver = ", ".join(f"{k} {val}" for k, val in self.versions.items())
        parts.append(f"({self.framework}; {ver}; input dtype {self.dtype})")
        return " ".join(parts)

    def to_json(self) -> dict:
        def arr(a):
            return None if a is None else _finite_or_none(np.asarray(a, dtype=np.float64).tolist())

        d = {
            "verdict": self.verdict.value,
            "ad_jacobian": arr(self.ad_jacobian),
            "selection_jacobians": arr(self.selection_jacobians),
            "convention_jacobians": arr(self.convention_jacobians),
            "b_subdifferential": arr(self.b_subdifferential),
            "exact": self.exact,
            "exact_basis": self.exact_basis,
            "ad_mode": self.ad_mode,
            "bifurcation": self.bifurcation,
            "active_kinks": [k.to_json() for k in self.active_kinks],
            "min_norm": arr(self.min_norm),
            "framework": self.framework,
            "versions": dict(self.versions),
            "reason": self.reason,
            "dtype": self.dtype,
            "engine_jacobian": arr(self.engine_jacobian),
            "hull_distance": self.hull_distance,
            "notes": list(self.notes),
            "monte_carlo": None if self.monte_carlo is None else {
                k: (arr(v) if isinstance(v, np.ndarray) else v) for k, v in self.monte_carlo.items()},
            "explanation": self.explain(),
        }
        return json.loads(json.dumps(_finite_or_none(d), default=str))


def _finite_or_none(obj):
    """JSON has no NaN/inf: non-finite numbers become null (text is left alone)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj
