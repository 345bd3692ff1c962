"""Report suite: the engine's verdicts on the classic cases, judged by closed-form math.

For every case the Clarke Jacobian is written down by hand here (or "none" where the
function is not Lipschitz), AD is measured directly with the framework, and the verdict
that math predicts follows: SMOOTH when the function is differentiable and AD equals the
analytic Jacobian, CLARKE when AD is in the hand-derived set, SPURIOUS when it is not,
NOT_LIPSCHITZ when no Clarke Jacobian exists.  A check passes when ``audit`` gives that
verdict and records the same AD output.  Membership in the hand-written Clarke set is
decided by an exact distance to the convex hull (a finite enumeration of faces, no solver
with an iteration limit).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ._suite import Check, Figure, SuiteResult, Table, inputs

_FRAMEWORKS = ("torch", "jax")


@dataclasses.dataclass(frozen=True)
class _Case:
    name: str
    point: tuple
    torch_fn: Callable
    jax_fn: Callable
    clarke: str                      # "none", "analytic", or "polytope"
    vertices: Callable | None        # () -> list of (out, in) arrays, or the analytic Jacobian
    why: str
    full_only: bool = False


def _cases(torch, jax, jnp) -> list[_Case]:
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((8, 4)) / 2
    b1 = rng.standard_normal(8) / 2
    W2 = rng.standard_normal((3, 8)) / 3
    x_mlp = tuple(rng.standard_normal(4).tolist())

    def analytic_mlp():
        h = np.tanh(W1 @ np.array(x_mlp) + b1)
        return [W2 @ np.diag(1 - h ** 2) @ W1]

    # float64 parameters made once, outside the traced call; .to is a no-op on float64 inputs
    tparams = tuple(torch.from_numpy(a) for a in (W1, b1, W2)) if torch is not None else ()

    def t_mlp(x):
        tW1, tb1, tW2 = (p.to(x.dtype) for p in tparams)
        return tW2 @ torch.tanh(tW1 @ x + tb1)

    def j_mlp(x):
        return jnp.asarray(W2, x.dtype) @ jnp.tanh(jnp.asarray(W1, x.dtype) @ x + jnp.asarray(b1, x.dtype))

    e = np.eye(4)
    sort_pt = (3.0, 1.0, 3.0, 2.0)
    return [
        _Case("relu(x) - relu(-x) at 0", (0.0,),
              lambda x: torch.relu(x) - torch.relu(-x), lambda x: jax.nn.relu(x) - jax.nn.relu(-x),
              "polytope", lambda: [np.array([[1.0]])],
              "relu(x) - relu(-x) = x, so the Clarke Jacobian is {1}"),
        _Case("abs at 0", (0.0,), lambda x: torch.abs(x), lambda x: jnp.abs(x),
              "polytope", lambda: [np.array([[-1.0]]), np.array([[1.0]])],
              "|x| has slopes -1 and 1 on either side of 0: Clarke Jacobian [-1, 1]"),
        _Case("smooth tanh MLP 4-8-3 at a generic point", x_mlp, t_mlp, j_mlp, "analytic", analytic_mlp,
              "tanh is smooth: the Jacobian is W2 diag(1 - tanh^2) W1"),
        _Case("sqrt at 0", (0.0,), lambda x: torch.sqrt(x), lambda x: jnp.sqrt(x), "none", None,
              "sqrt has infinite slope at 0: not Lipschitz, no Clarke Jacobian"),
        _Case("floor at 1", (1.0,), lambda x: torch.floor(x), lambda x: jnp.floor(x), "none", None,
              "floor jumps at 1: not continuous, no Clarke Jacobian"),
        _Case("max reduction with a tie", (1.0, 3.0, 3.0, 2.0), lambda x: torch.max(x), lambda x: jnp.max(x),
              "polytope", lambda: [e[1:2], e[2:3]],
              "max(x) at x = (1, 3, 3, 2): either tied entry can be the max, Clarke set conv{e2, e3}"),
        _Case("sort with a tie", sort_pt, lambda x: torch.sort(x).values, lambda x: jnp.sort(x),
              "polytope", lambda: [e[[1, 3, 0, 2]], e[[1, 3, 2, 0]]],
              "sort at (3, 1, 3, 2): the two permutations that order the tied 3s, Clarke set their hull"),
        _Case("relu(x) + relu(-x) at 0", (0.0,),
              lambda x: torch.relu(x) + torch.relu(-x), lambda x: jax.nn.relu(x) + jax.nn.relu(-x),
              "polytope", lambda: [np.array([[-1.0]]), np.array([[1.0]])],
              "relu(x) + relu(-x) = |x|: Clarke Jacobian [-1, 1]", full_only=True),
        _Case("elementwise maximum tie", (2.0, 2.0), lambda x: torch.maximum(x[0], x[1]),
              lambda x: jnp.maximum(x[0], x[1]), "polytope", lambda: [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])],
              "max(a, b) at a = b: Clarke set conv{(1, 0), (0, 1)}", full_only=True),
    ]


def hull_distance(V: list, J: np.ndarray) -> float:
    """Exact Euclidean distance from ``J`` to the convex hull of the matrices ``V``.

    Enumerates every subset of vertices, projects ``J`` on its affine hull and keeps the
    projections whose barycentric weights are all >= 0: the nearest point of the hull is
    one of them (it lies in the relative interior of a face).  A finite enumeration, so no
    iteration limit can stop it early; the classic cases here have at most 2 vertices.
    """
    from itertools import combinations

    P = np.array([np.asarray(v, dtype=np.float64).reshape(-1) for v in V])
    t = np.asarray(J, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(t)):
        return float("inf")
    if len(P) > 12:
        raise ValueError(f"hull_distance enumerates 2^k subsets; k = {len(P)} vertices is too many")
    best = float("inf")
    for m in range(1, len(P) + 1):
        for subset in combinations(range(len(P)), m):
            base = P[subset[0]]
            D = (P[list(subset[1:])] - base).T
            mu = np.linalg.lstsq(D, t - base, rcond=None)[0] if m > 1 else np.zeros(0)
            weights = np.concatenate([[1.0 - mu.sum()], mu])
            if np.all(weights >= -1e-12):
                best = min(best, float(np.linalg.norm(base + (D @ mu if m > 1 else 0.0) - t)))
    return best


def _in_hull(V: list, J: np.ndarray, tol: float = 1e-7) -> bool:
    return hull_distance(V, J) <= tol


def _expected(case: _Case, ad: np.ndarray) -> str:
    if case.clarke == "none":
        return "NOT_LIPSCHITZ"
    V = case.vertices()
    if case.clarke == "analytic":
        return "SMOOTH" if np.allclose(ad.reshape(-1), V[0].reshape(-1), atol=1e-6) else "SPURIOUS"
    return "CLARKE" if _in_hull(V, ad) else "SPURIOUS"


def _measure_ad(framework, fn, point, torch, jax, jnp) -> np.ndarray:
    n = len(point)
    if framework == "torch":
        x = torch.tensor(point[0] if n == 1 else list(point), dtype=torch.float64)
        J = torch.autograd.functional.jacobian(fn, x).numpy()
    else:
        with jax.enable_x64(True):
            J = np.asarray(jax.jacrev(fn)(jnp.asarray(point[0] if n == 1 else list(point), dtype=jnp.float64)))
    return np.asarray(J, dtype=np.float64).reshape(-1, n)


def run(*, quick: bool = False, progress=None, frameworks=_FRAMEWORKS) -> SuiteResult:
    t0 = time.perf_counter()
    from nonsmooth.conservative import audit

    mods = {}
    try:
        import torch

        mods["torch"] = torch
    except ImportError:
        torch = None
    try:
        import jax
        import jax.numpy as jnp

        mods["jax"] = jax
    except ImportError:
        jax = jnp = None
    checks, rows = [], []
    labels: list = []
    missing = [fw for fw in frameworks if fw not in mods]
    frameworks = tuple(fw for fw in frameworks if fw in mods)
    if not frameworks:
        return SuiteResult(name="engine", title="Engine showcase", checks=[Check(
            "torch or jax installed", False, f"none of {missing} is importable: pip install 'nonsmooth[torch]'", {})],
            seconds=time.perf_counter() - t0)
    seconds = {fw: [] for fw in frameworks}
    cases = _cases(torch, jax, jnp)
    for case in cases:
        if case.full_only and quick:
            continue
        labels.append(case.name)
        for fw in frameworks:
            if progress:
                progress(f"{fw}: {case.name}")
            fn = case.torch_fn if fw == "torch" else case.jax_fn
            with inputs(framework=fw, case=case.name, point=list(case.point), step="AD and the closed form"):
                ad = _measure_ad(fw, fn, case.point, torch, jax, jnp)
                expected = _expected(case, ad)
            if fw == "torch":
                x = torch.tensor(case.point[0] if len(case.point) == 1 else list(case.point), dtype=torch.float64)
            else:
                with jax.enable_x64(True):
                    x = jnp.asarray(case.point[0] if len(case.point) == 1 else list(case.point), dtype=jnp.float64)
            t1 = time.perf_counter()
            try:
                a = audit(fn, x)
            except Exception as err:
                seconds[fw].append(None)
                checks.append(Check(f"{fw}: {case.name} -> {expected}", False,
                                    f"audit raised {type(err).__name__}: {err}", {"expected": expected}))
                rows.append([case.name, fw, expected, "error", "", "", ""])
                continue
            seconds[fw].append(time.perf_counter() - t1)
            got = a.verdict.name
            ad_engine = None if a.ad_jacobian is None else np.asarray(a.ad_jacobian, dtype=np.float64)
            same_ad = bool(ad_engine is not None and ad_engine.size == ad.size)
            if same_ad:
                ad_engine = ad_engine.reshape(ad.shape)
                same_ad = bool(np.array_equal(np.isnan(ad_engine), np.isnan(ad))
                               and np.allclose(np.nan_to_num(ad_engine), np.nan_to_num(ad), atol=1e-9))
            passed = got == expected and same_ad
            numbers = {"expected": expected, "verdict": got, "ad_measured": ad.tolist(),
                       "ad_audit": None if ad_engine is None else ad_engine.tolist(),
                       "reason": getattr(a, "reason", ""), "exact": bool(a.exact),
                       "bifurcation": bool(a.bifurcation), "seconds": seconds[fw][-1]}
            if a.min_norm is not None:
                numbers["min_norm"] = np.asarray(a.min_norm, dtype=np.float64).tolist()
            checks.append(Check(f"{fw}: {case.name} -> {expected}", passed,
                                f"{case.why}; AD returned {np.round(ad, 6).tolist()}. Engine: "
                                + a.explain(), numbers))
            rows.append([case.name, fw, expected, got, str(np.round(ad, 6).tolist()), bool(a.exact),
                         bool(a.bifurcation)])
    table = Table("Engine verdicts on the classic cases", ["case", "framework", "math predicts", "audit says",
                                                            "AD returned", "exact", "bifurcation"], rows,
                  note="'math predicts' comes from a Clarke set written down by hand and AD measured directly.")
    figures = [Figure("Seconds per audit", "bar", labels, {fw: s for fw, s in seconds.items()},
                      xlabel="case", ylabel="seconds per audit (log scale)", logy=True,
                      caption="Wall time of one audit() call per classic case, tracing included; "
                              "the verdicts themselves are in the table below.")]
    n_pass = sum(c.passed for c in checks)
    return SuiteResult(name="engine", title="Engine showcase: verdicts against closed-form math", checks=checks,
                       tables=[table], figures=figures,
                       summary=f"{n_pass}/{len(checks)} verdicts match the closed-form prediction."
                               + (f" Not installed, so not run: {', '.join(missing)}." if missing else ""),
                       seconds=time.perf_counter() - t0)
