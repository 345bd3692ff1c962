"""The nonsmooth implicit function theorem, checked: is every ``A`` in the conservative
Jacobian of ``F`` with respect to ``z`` invertible, and what set does ``dz*/dtheta`` lie in?

Exact for equilibrium layers ``F(z, x) = z - act(W z + U x + b)`` with an elementwise
``act``: ``d_z F = I - diag(s) W`` where ``s`` ranges over the box of local Clarke intervals
(a point where ``act`` is smooth, an interval at an active kink).  ``det(I - diag(s) W)`` is
affine in each ``s_i`` (it scales row ``i``), so its extremes over the box sit at vertices:
every matrix of the box is invertible iff all vertex determinants are nonzero with one
sign.  A sign change between two vertices certifies a singular matrix between them.
Past ``max_kinks`` active kinks the vertices are sampled and the sufficient conditions
``L |W|_2 < 1`` and ``L lambda_pf(|W|) < 1`` (``L`` the largest slope) decide.

General callables ``F(z, theta)`` use Jacobians sampled around ``z`` (and the AD Jacobian
at ``z``); their verdicts are evidence, marked ``exact=False``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

import numpy as np

class _Act:
    def __init__(self, name: str):
        self.name = name
        slope = None
        if isinstance(name, str) and name.startswith("leaky_relu"):
            slope = float(name.split(":")[1]) if ":" in name else 0.01
        if name == "relu":
            self.kinks = [(0.0, 0.0, 1.0)]
            self.value = lambda t: np.maximum(t, 0.0)
            self.deriv = lambda t: (t > 0).astype(float)
        elif slope is not None:
            self.kinks = [(0.0, min(slope, 1.0), max(slope, 1.0))]
            self.value = lambda t: np.where(t > 0, t, slope * t)
            self.deriv = lambda t: np.where(t > 0, 1.0, slope)
        elif name == "abs":
            self.kinks = [(0.0, -1.0, 1.0)]
            self.value = np.abs
            self.deriv = np.sign
        elif name == "hardtanh":
            self.kinks = [(-1.0, 0.0, 1.0), (1.0, 0.0, 1.0)]
            self.value = lambda t: np.clip(t, -1.0, 1.0)
            self.deriv = lambda t: ((t > -1) & (t < 1)).astype(float)
        elif name == "tanh":
            self.kinks = []
            self.value = np.tanh
            self.deriv = lambda t: 1.0 - np.tanh(t) ** 2
        elif name == "identity":
            self.kinks = []
            self.value = lambda t: t
            self.deriv = lambda t: np.ones_like(t)
        else:
            raise ValueError(f"activation must be one of relu, leaky_relu[:slope], abs, hardtanh, tanh, identity; "
                             f"got {name!r}")
        ends = [abs(v) for _, lo, hi in self.kinks for v in (lo, hi)]
        self.lipschitz = max(ends) if ends else 1.0  # tanh and identity are 1-Lipschitz

    def box(self, pre: np.ndarray, kink_tol: float):
        """Per coordinate: (lo, hi, active) with lo == hi == derivative where smooth."""
        d = self.deriv(pre)
        lo = d.copy()
        hi = d.copy()
        active = np.zeros(pre.shape, bool)
        for at, klo, khi in self.kinks:
            hit = np.abs(pre - at) <= kink_tol
            lo = np.where(hit, klo, lo)
            hi = np.where(hit, khi, hi)
            active |= hit
        return lo, hi, active


def _as_np(x, name):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN/inf")
    return a


@dataclasses.dataclass(frozen=True)
class ElementwiseLayer:
    """``F(z, x) = z - act(W z + U x + b)``: the equilibrium condition of a DEQ cell or an
    El Ghaoui implicit model, for one sample (``z`` of shape ``(n,)``, ``x`` of shape ``(p,)``).

    Example:
        >>> import numpy as np
        >>> layer = ElementwiseLayer(np.array([[0.5]]), activation="relu")
        >>> layer(np.array([0.0]), None)
        array([0.])
    """

    W: Any
    U: Any = None
    b: Any = None
    activation: str = "relu"

    def __post_init__(self):
        W = _as_np(self.W, "W")
        if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
            raise ValueError(f"W must be a non-empty square matrix; got shape {W.shape}")
        object.__setattr__(self, "W", W)
        U = _as_np(self.U, "U")
        if U is not None and (U.ndim != 2 or U.shape[0] != W.shape[0]):
            raise ValueError(f"U must have shape ({W.shape[0]}, p); got {U.shape}")
        object.__setattr__(self, "U", U)
        b = _as_np(self.b, "b")
        if b is not None and b.shape != (W.shape[0],):
            raise ValueError(f"b must have shape ({W.shape[0]},); got {b.shape}")
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "_act", _Act(self.activation))

    @property
    def n(self) -> int:
        return self.W.shape[0]

    def preactivation(self, z, x=None):
        z = _as_np(z, "z")
        if z.shape != (self.n,):
            raise ValueError(f"z must have shape ({self.n},) (one sample); got {z.shape}")
        pre = self.W @ z
        if self.U is not None:
            x = _as_np(x, "x")
            if x is None or x.shape != (self.U.shape[1],):
                raise ValueError(f"x must have shape ({self.U.shape[1]},); got {None if x is None else x.shape}")
            pre = pre + self.U @ x
        if self.b is not None:
            pre = pre + self.b
        return pre

    def __call__(self, z, x=None):
        return _as_np(z, "z") - self._act.value(self.preactivation(z, x))


@dataclasses.dataclass(frozen=True)
class Invertibility:
    """Whether every ``A`` in the conservative Jacobian ``d_z F`` at ``(z, theta)`` is invertible.

    ``invertible``: True, False, or None (undecided within the budget).  ``exact``: the answer
    is a certificate (vertex enumeration or a determinant sign change), not sampled evidence.
    ``sigma_min``: smallest singular value found, at the selection ``attained_at``
    ({kink index: derivative chosen}).  ``ad_sigma_min``: the same for the matrix autodiff
    returns at ``z`` (general callables), which can be far from singular when the set is not.
    ``sufficient``: {condition: {"value", "holds"}}.
    """

    invertible: bool | None
    exact: bool
    method: str
    sigma_min: float
    attained_at: dict
    n_active_kinks: int | None
    n_checked: int
    ad_sigma_min: float | None
    sufficient: dict
    reason: str

    def explain(self) -> str:
        head = {True: "INVERTIBLE", False: "NOT INVERTIBLE", None: "UNDECIDED"}[self.invertible]
        kind = "certified" if self.exact else "evidence only"
        lines = [f"{head} ({kind}; {self.method}, {self.n_checked} matrices checked): {self.reason}"]
        lines.append(f"smallest singular value found: {self.sigma_min:.3g}"
                     + (f" at selection {self.attained_at}" if self.attained_at else ""))
        if self.ad_sigma_min is not None:
            lines.append(f"the matrix autodiff picks has smallest singular value {self.ad_sigma_min:.3g}"
                         + (" -- AD returns a finite derivative although the theorem does not apply"
                            if self.invertible is False and self.ad_sigma_min > 1e-8 else ""))
        for name, c in self.sufficient.items():
            lines.append(f"sufficient condition {name}: value {c['value']:.4g}, {'holds' if c['holds'] else 'fails'}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["attained_at"] = {str(k): float(v) for k, v in self.attained_at.items()}
        d["explanation"] = self.explain()
        return json.loads(json.dumps(d, default=float))


def pf_eigenvalue(A) -> float:
    M = np.abs(_as_np(A, "A"))
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"A must be a square matrix; got shape {M.shape}")
    return float(np.max(np.abs(np.linalg.eigvals(M)))) if M.size else 0.0


def _structure(F):
    if isinstance(F, ElementwiseLayer):
        return F
    for obj in (F, getattr(F, "f", None)):
        if obj is not None and callable(getattr(obj, "structure", None)):
            return obj.structure()
    return None


def _sign_and_sigma(mats, max_svd):
    sign, logdet = np.linalg.slogdet(mats)
    order = np.argsort(logdet)
    pick = order[:max_svd]
    sig = np.full(len(mats), np.inf)
    for start in range(0, len(pick), 64):
        idx = pick[start:start + 64]
        sig[idx] = np.linalg.svd(mats[idx], compute_uv=False)[:, -1]
    return sign, logdet, sig


def _vertices(lo, hi, active, max_count, rng):
    idx = np.flatnonzero(active & (lo != hi))
    k = idx.size
    if 2 ** k <= max_count:
        choices = np.array(list(itertools.product((0, 1), repeat=k)), dtype=bool).reshape(2 ** k, k)
        exact = True
    else:
        choices = rng.integers(0, 2, size=(max_count, k)).astype(bool)
        exact = False
    S = np.repeat(lo[None, :], len(choices), 0)
    S[:, idx] = np.where(choices, hi[idx][None, :], lo[idx][None, :])
    return idx, S, exact


def _check_structured(layer: ElementwiseLayer, z, x, *, max_kinks, kink_tol, max_svd, seed):
    pre = layer.preactivation(z, x)
    lo, hi, active = layer._act.box(pre, kink_tol)
    n = layer.n
    W = layer.W
    L = layer._act.lipschitz
    norm2 = float(np.linalg.norm(W, 2))
    pf = pf_eigenvalue(W)
    sufficient = {
        "L*|W|_2 < 1": {"value": L * norm2, "holds": bool(L * norm2 < 1)},
        "L*lambda_pf(|W|) < 1": {"value": L * pf, "holds": bool(L * pf < 1)},
    }
    rng = np.random.default_rng(seed)
    idx, S, exact = _vertices(lo, hi, active, 2 ** max_kinks, rng)
    mats = np.eye(n)[None] - S[:, :, None] * W[None]
    sign, logdet, sig = _sign_and_sigma(mats, max_svd)
    j = int(np.argmin(sig))
    attained = {int(i): float(S[j, i]) for i in idx}
    scale = max(1.0, L * norm2)
    singular = (sign == 0) | (sig <= n * np.finfo(float).eps * scale)
    k_active = int(active.sum())
    if singular.any():
        j = int(np.flatnonzero(singular)[0])
        attained = {int(i): float(S[j, i]) for i in idx}
        return Invertibility(False, True, "vertex selections", float(sig.min()), attained, k_active, len(S), None,
                             sufficient, "a selection of the conservative Jacobian is singular")
    if np.unique(sign).size > 1:
        a, b = int(np.flatnonzero(sign > 0)[0]), int(np.flatnonzero(sign < 0)[0])
        diff = {int(i): (float(S[a, i]), float(S[b, i])) for i in idx if S[a, i] != S[b, i]}
        return Invertibility(False, True, "determinant sign change", float(sig.min()), attained, k_active, len(S),
                             None, sufficient,
                             f"det(I - diag(s)W) changes sign between two selections (kinks {diff}); a singular "
                             "matrix lies between them in the conservative Jacobian")
    if exact:
        why = ("no active kink: the Jacobian is unique and invertible" if idx.size == 0 else
               f"all {len(S)} vertex selections over {idx.size} active kinks have determinants of one sign, "
               "so every matrix of the box is invertible")
        return Invertibility(True, True, "vertex enumeration", float(sig.min()), attained, k_active, len(S), None,
                             sufficient, why)
    if any(c["holds"] for c in sufficient.values()):
        names = ", ".join(k for k, c in sufficient.items() if c["holds"])
        return Invertibility(True, True, "sufficient condition", float(sig.min()), attained, k_active, len(S), None,
                             sufficient, f"{idx.size} active kinks exceed max_kinks={max_kinks}; {names} holds")
    return Invertibility(None, False, "sampled vertices", float(sig.min()), attained, k_active, len(S), None,
                         sufficient, f"{idx.size} active kinks exceed max_kinks={max_kinks}; {len(S)} sampled "
                         "vertices agree in sign but no sufficient condition holds. Raise max_kinks.")


def _framework(z):
    from nonsmooth._frameworks import array_framework

    return array_framework(z) or "numpy"


def _jacobian_fn(F, z, theta):
    """Returns (jac(z_np) -> (n, n) matrix of d_z F, value(z_np)) in float64."""
    fw = _framework(z)
    shape = tuple(np.shape(z))
    if fw == "torch":
        import torch

        th = theta.detach().double() if isinstance(theta, torch.Tensor) else theta

        def g(v):
            return F(v.reshape(shape), th).reshape(-1)

        def jac(v):
            t = torch.as_tensor(v, dtype=torch.float64)
            return torch.func.jacrev(g)(t).detach().numpy()

        return jac
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        # float64 only when the user enabled x64; otherwise float32 with jax's own precision
        jf = jax.jit(jax.jacrev(lambda u: jnp.reshape(F(u.reshape(shape), theta), (-1,))))

        def jac(v):
            return np.asarray(jf(jnp.asarray(v)), float)

        return jac

    def jac(v):
        v = np.asarray(v, float)
        n = v.size
        h = 1e-7 * max(1.0, float(np.abs(v).max()))
        cols = []
        for i in range(n):
            e = np.zeros(n)
            e[i] = h
            cols.append((np.asarray(F((v + e).reshape(shape), theta), float).reshape(-1)
                         - np.asarray(F((v - e).reshape(shape), theta), float).reshape(-1)) / (2 * h))
        return np.stack(cols, 1)

    return jac


def _engine_vertices(F, z, theta, n):
    """B-subdifferential elements of z -> F(z, theta) from the conservative engine, or a reason why not."""
    if _framework(z) == "numpy":
        return None, False, "the conservative engine traces torch/jax programs only"
    try:
        from nonsmooth.conservative import clarke_jacobian
    except ImportError as e:
        return None, False, f"conservative engine unavailable ({e})"
    try:
        C = clarke_jacobian(lambda u: F(u, theta), z)
    except Exception as e:  # the engine explains what it cannot trace; fall back to sampling
        return None, False, f"engine could not analyse F ({type(e).__name__}: {str(e)[:160]})"
    V = np.asarray(C.vertices, float)
    if V.size == 0:
        return None, False, "engine returned no Jacobian"
    return V.reshape(V.shape[0], n, n), bool(C.exact), ""


def _hull_verdict(mats, exact, method, ad_sigma, note):
    n = mats.shape[1]
    sign, _ = np.linalg.slogdet(mats)
    sig = np.linalg.svd(mats, compute_uv=False)[:, -1]
    j = int(np.argmin(sig))
    scale = max(1.0, float(np.abs(mats).max()))
    tiny = n * np.finfo(float).eps * scale
    sufficient = {}
    base = dict(attained_at={"element": j} if len(mats) > 1 else {}, n_active_kinks=None, n_checked=len(mats),
                ad_sigma_min=ad_sigma, sufficient=sufficient)
    if (sig <= tiny).any() or (sign == 0).any():
        return Invertibility(False, exact or method.startswith("Clarke"), method, float(sig.min()), reason=(
            f"element #{j} of {len(mats)} is singular: the conservative Jacobian contains a singular matrix{note}"),
            **base)
    if np.unique(sign).size > 1:
        return Invertibility(False, exact or method.startswith("Clarke"), method, float(sig.min()), reason=(
            f"elements have determinants of both signs: a singular matrix lies in their convex hull{note}"), **base)
    if len(mats) == 1:
        return Invertibility(True, exact, method, float(sig.min()), reason=(
            f"F is smooth at z (a single Jacobian) and that Jacobian is invertible{note}"), **base)
    center = mats.mean(0)
    spread = max(float(np.linalg.norm(M - center, 2)) for M in mats)
    s_center = float(np.linalg.svd(center, compute_uv=False)[-1])
    sufficient["sigma_min(center) > max |J_i - center|_2"] = {"value": s_center - spread,
                                                              "holds": bool(s_center > spread)}
    if s_center > spread:
        return Invertibility(True, exact, method, float(sig.min()), reason=(
            f"{len(mats)} distinct elements; every matrix of their convex hull is within {spread:.3g} of their "
            f"mean, whose smallest singular value is {s_center:.3g}{note}"), **base)
    return Invertibility(None, False, method, float(sig.min()), reason=(
        f"{len(mats)} distinct elements share a determinant sign, but their hull is not certified "
        f"invertible{note}"), **base)


def _check_general(F, z, theta, *, n_samples, radius, seed, use_engine=True):
    z_np = _as_np(z, "z").reshape(-1)
    n = z_np.size
    jac = _jacobian_fn(F, z, theta)
    J_ad = np.asarray(jac(z_np), float)
    if J_ad.shape != (n, n):
        raise ValueError(f"F(z, theta) must return an array shaped like z ({n} entries); its Jacobian is {J_ad.shape}")
    ad_sigma = float(np.linalg.svd(J_ad, compute_uv=False)[-1])
    note = ""
    if use_engine:
        V, exact, why = _engine_vertices(F, z, theta, n)
        if V is not None:
            return _hull_verdict(V, exact, "Clarke Jacobian (conservative engine)", ad_sigma, "")
        note = f" ({why}; sampled instead)"
    rng = np.random.default_rng(seed)
    dirs = [np.eye(n)[i] * s for i in range(min(n, 32)) for s in (1.0, -1.0)]
    dirs += list(rng.normal(size=(n_samples, n)))
    r = radius * max(1.0, float(np.abs(z_np).max()))
    mats = [J_ad] + [np.asarray(jac(z_np + r * d / np.linalg.norm(d)), float) for d in dirs]
    mats = np.stack(mats)
    uniq = [mats[0]]
    for M in mats[1:]:
        if all(np.abs(M - U).max() > 1e-9 * (1 + np.abs(U).max()) for U in uniq):
            uniq.append(M)
    mats = np.stack(uniq)
    return _hull_verdict(mats, False, "sampled Jacobians", ad_sigma,
                         f" (Jacobians sampled within {r:.1e} of z){note}")


def check_invertibility(F, z, theta=None, *, max_kinks: int = 12, kink_tol: float = 0.0, max_svd: int = 256,
                        n_samples: int = 16, radius: float = 1e-6, seed: int = 0,
                        use_engine: bool = True) -> Invertibility:
    """Check the hypothesis of the nonsmooth implicit function theorem at ``(z, theta)``.

    ``F`` is an ``ElementwiseLayer`` (or a layer with ``structure()``: ``EquilibriumCell``,
    ``ImplicitModel``, a ``DEQ`` around an ``EquilibriumCell``), checked exactly over the vertex
    selections of its active kinks (``|pre - kink| <= kink_tol``), or any callable
    ``F(z, theta)`` with torch or jax arrays, checked on the B-subdifferential elements the
    conservative engine (``nonsmooth.conservative.clarke_jacobian``) finds -- a singular element
    or a determinant sign change is a certificate -- or, where the engine cannot trace ``F``
    (or ``use_engine=False``, or NumPy), on Jacobians sampled within ``radius`` of ``z``
    (``exact=False``).  ``z`` is one sample.

    Example:
        >>> import torch
        >>> F = lambda y, x: y + torch.abs(y) - x   # d_y F = [0, 2] at y = 0
        >>> r = check_invertibility(F, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        >>> r.invertible, r.ad_sigma_min > 0
        (False, True)
    """
    if not isinstance(max_kinks, int) or isinstance(max_kinks, bool) or not 0 <= max_kinks <= 20:
        raise ValueError(f"max_kinks must be an integer in [0, 20]; got {max_kinks!r}")
    if not (isinstance(kink_tol, (int, float)) and math.isfinite(kink_tol) and kink_tol >= 0):
        raise ValueError(f"kink_tol must be a finite number >= 0; got {kink_tol!r}")
    layer = _structure(F)
    if layer is not None:
        zz = _as_np(z, "z")
        xx = _as_np(theta, "theta")
        if zz.ndim == 2 and zz.shape[0] == 1:
            zz = zz[0]
            xx = None if xx is None else xx.reshape(-1)
        return _check_structured(layer, zz, xx, max_kinks=max_kinks, kink_tol=kink_tol, max_svd=max_svd, seed=seed)
    if not callable(F):
        raise TypeError(f"F must be callable F(z, theta) or an ElementwiseLayer; got {type(F).__name__}")
    return _check_general(F, z, theta, n_samples=n_samples, radius=radius, seed=seed, use_engine=use_engine)


@dataclasses.dataclass(frozen=True)
class JacobianSet:
    """The conservative Jacobian of the solution map ``theta -> z*``: ``{-A^-1 B}`` over the
    selections ``[A B]`` of ``F``'s conservative Jacobian.

    ``matrices``: ``(k, n, p)``, one per vertex selection (``selections``: derivative chosen at
    each active kink); ``exact``: every vertex was enumerated (structured layers).
    For structured layers ``contains_vjp(g, v)`` decides exactly, by linear programs over
    the sign patterns of the adjoint, whether ``v = g^T (-A^-1 B)`` for some selection in the
    whole box (not only its vertices).
    """

    matrices: Any
    selections: list
    active: list
    exact: bool
    layer: Any = None
    z: Any = None
    x: Any = None
    kink_tol: float = 0.0

    def vjps(self, g) -> np.ndarray:
        return np.einsum("n,knp->kp", np.asarray(g, float), self.matrices)

    def contains_vjp(self, g, v, *, tol: float = 1e-6) -> tuple[bool, float]:
        """Is ``v = g^T dz*/dx`` for some selection of the box?  Returns ``(inside, distance)``
        with ``distance`` the smallest sup-norm gap (relative to ``1 + |v|_inf``)."""
        if self.layer is None:
            raise TypeError("contains_vjp needs a structured layer; use vjps() and a hull test for general F")
        return _vjp_membership(self.layer, self.z, self.x, np.asarray(g, float), np.asarray(v, float),
                               self.kink_tol, tol)

    def to_json(self) -> dict:
        return {"matrices": np.asarray(self.matrices).tolist(), "selections": self.selections,
                "active": self.active, "exact": self.exact}

    def explain(self) -> str:
        k = len(self.selections)
        return (f"{k} vertex selection(s) over {len(self.active)} active kink(s)"
                f"{'' if self.exact else ' (sampled)'}; Jacobians of shape {np.asarray(self.matrices).shape[1:]}")


def implicit_jacobian_set(F, z, theta=None, *, max_kinks: int = 12, kink_tol: float = 0.0, n_samples: int = 16,
                          radius: float = 1e-6, seed: int = 0) -> JacobianSet:
    """``{-A^-1 B}`` over the conservative selections of ``F`` at ``(z, theta)``.

    For an ``ElementwiseLayer`` (or a layer with ``structure()``) the matrices are
    ``(I - diag(s) W)^-1 diag(s) U`` over the vertex selections ``s`` (the Jacobian of ``z*``
    with respect to the input ``x``).  For a callable ``F(z, theta)`` they come from Jacobians
    sampled within ``radius`` of ``(z, theta)`` (``exact=False``).

    Example:
        >>> import numpy as np
        >>> layer = ElementwiseLayer(np.array([[0.5]]), U=np.array([[1.0]]), activation="relu")
        >>> S = implicit_jacobian_set(layer, np.array([0.0]), np.array([0.0]))
        >>> sorted(float(M[0, 0]) for M in S.matrices)   # relu'(0) in {0, 1}: 0 and 1 / (1 - 0.5)
        [0.0, 2.0]
    """
    layer = _structure(F)
    if layer is not None:
        zz = _as_np(z, "z").reshape(-1)
        xx = None if theta is None else _as_np(theta, "theta").reshape(-1)
        if layer.U is None:
            raise ValueError("the layer has no input matrix U: there is no parameter to differentiate")
        pre = layer.preactivation(zz, xx)
        lo, hi, active = layer._act.box(pre, kink_tol)
        idx, S, exact = _vertices(lo, hi, active, 2 ** max_kinks, np.random.default_rng(seed))
        n = layer.n
        mats = []
        for s in S:
            A = np.eye(n) - s[:, None] * layer.W
            mats.append(np.linalg.solve(A, s[:, None] * layer.U))
        sels = [{int(i): float(s[i]) for i in idx} for s in S]
        return JacobianSet(np.stack(mats), sels, [int(i) for i in idx], exact, layer, zz, xx, kink_tol)
    if not callable(F):
        raise TypeError(f"F must be callable F(z, theta) or an ElementwiseLayer; got {type(F).__name__}")
    z_np = _as_np(z, "z").reshape(-1)
    t_np = _as_np(theta, "theta").reshape(-1)
    n, p = z_np.size, t_np.size
    fw = _framework(z)

    def joint(v):
        zz, tt = v[:n].reshape(np.shape(z)), v[n:].reshape(np.shape(theta))
        return F(zz, tt)

    if fw == "torch":
        import torch

        def jac(v):
            t = torch.as_tensor(v, dtype=torch.float64)
            return torch.func.jacrev(lambda u: joint(u).reshape(-1))(t).detach().numpy()
    elif fw == "jax":
        import jax
        import jax.numpy as jnp

        jf = jax.jit(jax.jacrev(lambda u: jnp.reshape(joint(u), (-1,))))

        def jac(v):
            return np.asarray(jf(jnp.asarray(v)), float)
    else:
        jac = _jacobian_fn(lambda v, _: np.asarray(joint(v), float), np.concatenate([z_np, t_np]), None)
    v0 = np.concatenate([z_np, t_np])
    rng = np.random.default_rng(seed)
    dirs = [np.zeros(n + p)] + [np.eye(n + p)[i] * s for i in range(min(n + p, 32)) for s in (1.0, -1.0)]
    dirs += list(rng.normal(size=(n_samples, n + p)))
    r = radius * max(1.0, float(np.abs(v0).max()))
    mats, sels = [], []
    for d in dirs:
        nd = np.linalg.norm(d)
        J = np.asarray(jac(v0 + (r * d / nd if nd else 0.0)), float)
        A, B = J[:, :n], J[:, n:]
        if np.linalg.svd(A, compute_uv=False)[-1] <= n * np.finfo(float).eps * max(1.0, np.abs(A).max()):
            continue
        M = -np.linalg.solve(A, B)
        if all(np.abs(M - X).max() > 1e-9 * (1 + np.abs(X).max()) for X in mats):
            mats.append(M)
            sels.append({"direction": int(len(sels))})
    if not mats:
        raise ValueError("every sampled d_z F is singular: the solution map has no conservative Jacobian here "
                         "(check_invertibility explains)")
    return JacobianSet(np.stack(mats), sels, [], False)


def _vjp_membership(layer, z, x, g, v, kink_tol, tol):
    """Exact test of ``v = U^T w`` with ``w_i = s_i (g + W^T w)_i``, ``s`` in the Clarke box.

    Inactive coordinates give linear equalities; an active one gives ``lo c <= w <= hi c``
    (``c = (g + W^T w)_i >= 0``) or the reversed pair (``c <= 0``): one LP per sign pattern.
    """
    from scipy.optimize import linprog

    pre = layer.preactivation(z, x)
    lo, hi, active = layer._act.box(pre, kink_tol)
    n = layer.n
    W, U = layer.W, layer.U
    p = U.shape[1]
    act = np.flatnonzero(active & (lo != hi))
    fixed = np.setdiff1d(np.arange(n), act)
    # variables: w (n), t (1); minimize t with |U^T w - v| <= t
    C = np.eye(n) - lo[:, None] * W.T  # row i: w_i - s_i (W^T w)_i = s_i g_i for fixed s_i = lo_i
    A_eq = np.hstack([C[fixed], np.zeros((fixed.size, 1))])
    b_eq = lo[fixed] * g[fixed]
    Ut = U.T
    A_fit = np.vstack([np.hstack([Ut, -np.ones((p, 1))]), np.hstack([-Ut, -np.ones((p, 1))])])
    b_fit = np.concatenate([v, -v])
    best = math.inf
    scale = 1.0 + float(np.abs(v).max())
    for signs in itertools.product((1.0, -1.0), repeat=act.size):
        rows, rhs = [A_fit], [b_fit]
        for sgn, i in zip(signs, act):
            c_row = np.concatenate([W.T[i], [0.0]])  # c_i = g_i + (W^T w)_i
            e = np.zeros(n + 1)
            e[i] = 1.0
            # sign: -sgn * c_i <= 0
            rows.append(-sgn * c_row[None])
            rhs.append(np.array([sgn * g[i]]))
            lo_b, hi_b = (lo[i], hi[i]) if sgn > 0 else (hi[i], lo[i])
            # lo_b * c_i <= w_i  <=>  lo_b*(W^T w)_i - w_i <= -lo_b g_i
            rows.append((lo_b * c_row - e)[None])
            rhs.append(np.array([-lo_b * g[i]]))
            # w_i <= hi_b * c_i
            rows.append((e - hi_b * c_row)[None])
            rhs.append(np.array([hi_b * g[i]]))
        cost = np.zeros(n + 1)
        cost[-1] = 1.0
        res = linprog(cost, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs),
                      A_eq=A_eq if fixed.size else None, b_eq=b_eq if fixed.size else None,
                      bounds=[(None, None)] * n + [(0, None)], method="highs")
        if res.status == 0:
            best = min(best, float(res.x[-1]) / scale)
            if best <= tol:
                return True, best
    return best <= tol, best
