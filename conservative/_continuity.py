"""Is f continuous (and Lipschitz) at x?  Float-aware comparisons of branch limits.

At a jump primitive or a comparison that sits at its threshold, each essentially active
branch gives f a limit at x.  Two limits that differ by more than float64 rounding of the
values involved can explain mean f jumps; within rounding they are the same limit.

Contract: the rounding budget is ``R = ulp(M) * (1 + D)``, with ``M`` the largest magnitude
of any float value the program computes at x and ``D`` the number of float nodes (each
rounds once, by at most half an ulp of a value no larger than M, and the engine's own
float64 evaluation is the framework's).  Limits that differ by at most ``2 R`` are
*continuous within rounding*; more than ``16 R`` a *jump*; in between the engine does
not decide (``"unsure"``).  A jump of 1e-6 at values near 1e4 (5e5 ulps) is a jump.
"""
from __future__ import annotations

import numpy as np

from ._frozen import base_values
from ._lp import strictly_feasible

__all__ = ["branch_limits", "nonlipschitz_evidence", "rounding_budget"]

CONTINUOUS_ULPS = 2.0
JUMP_ULPS = 16.0


def rounding_budget(P) -> float:
    vals = base_values(P)
    M, D = 0.0, 0
    for node in P.graph.nodes:
        for o in node.outputs:
            if not o.is_float or o.id not in P.interp.live:
                continue
            D += 1
            a = np.asarray(P.be.asnumpy(vals[o.id]), dtype=np.float64)
            fin = a[np.isfinite(a)]
            if fin.size:
                M = max(M, float(np.max(np.abs(fin))))
    for t in P.xs64:
        a = np.abs(np.asarray(P.be.asnumpy(t), dtype=np.float64))
        if a.size:
            M = max(M, float(np.max(a)))
    if getattr(P.graph.nodes, "virtual", None) is not None:  # loop nodes: every iteration rounds (_loops)
        from ._loops import rounding_terms

        m_loop, d_loop = rounding_terms(P)
        M, D = max(M, m_loop), D + d_loop
    return float(np.spacing(max(M, np.finfo(np.float64).tiny))) * (1 + D)


def branch_limits(P, leaves) -> tuple[str, str]:
    """("continuous" | "jump" | "unsure", sentence) from certified, feasible leaves."""
    cands = [lf for lf in leaves if lf.certified]
    feas = [lf for lf in cands if strictly_feasible(lf.conds)[0]]
    if len(feas) < 2:
        return "continuous", ""
    R = rounding_budget(P)
    ref = feas[0].out
    worst = 0.0
    for lf in feas[1:]:
        if lf.out.shape != ref.shape:
            continue
        both = np.isfinite(lf.out) & np.isfinite(ref)
        if not np.array_equal(np.isfinite(lf.out), np.isfinite(ref)):
            return "jump", "f is finite along one branch and not along another at x: it is discontinuous there"
        gap = float(np.max(np.abs(lf.out[both] - ref[both]))) if both.any() else 0.0
        worst = max(worst, gap)
    if worst > JUMP_ULPS * R:
        return "jump", (f"f takes different limits at x along two branches (values differ by {worst:.3g}, "
                        f"{worst / R:.3g} times the float64 rounding budget {R:.2g} of this program): it is "
                        "discontinuous there")
    if worst > CONTINUOUS_ULPS * R:
        return "unsure", (f"the branch limits of f at x differ by {worst:.3g}, which is between {CONTINUOUS_ULPS:g} "
                          f"and {JUMP_ULPS:g} times the float64 rounding budget ({R:.2g}): the engine cannot tell a "
                          "tiny jump from rounding")
    return "continuous", ""


def nonlipschitz_evidence(P, out0: np.ndarray, rng) -> str:
    """Difference quotients of f that keep growing like t^(-1/2) as t -> 0 show f is not
    Lipschitz at x; returns a sentence with the numbers, or ''."""
    x = P.x_flat()
    n = x.size
    dirs = [np.eye(n)[i] * s for i in range(min(n, 8)) for s in (1.0, -1.0)]
    dirs += [rng.standard_normal(n) for _ in range(4)]
    ts = [1e-4, 1e-6, 1e-8, 1e-10]
    scale = 1.0 + float(np.max(np.abs(x)))
    for d in dirs:
        d = d / np.linalg.norm(d)
        qs = []
        for t in ts:
            with np.errstate(all="ignore"):
                ft = P.values_at(x + t * scale * d)
            if not np.all(np.isfinite(ft)):
                qs = []
                break
            qs.append(float(np.max(np.abs(ft - out0))) / (t * scale))
        if len(qs) == len(ts) and qs[0] > 0 and all(b > 5.0 * a for a, b in zip(qs, qs[1:])):
            return ("difference quotients |f(x + t d) - f(x)| / t grow without bound as t -> 0 "
                    f"({', '.join(f'{q:.3g}' for q in qs)} for t = 1e-4 .. 1e-10)")
    return ""

