"""Stage 5, verdict: what the analysis allows the audit to claim, and in which words.

Contract (what each verdict needs):

* ``SMOOTH``: no site active, and float64 central differences agree with the Jacobian.
* ``CLARKE``: AD within ``ad_tol`` (scaled) of the hull of proven B-subdifferential elements.
* ``SPURIOUS``: AD outside that hull and the set is exact (the piece stage's contract), or f
  is differentiable at x and AD differs from its Jacobian, or AD is not finite where f is
  locally Lipschitz.  In a dtype other than float64, a kink that the user's arithmetic is
  near but not at makes it ``UNDECIDED`` instead.
* ``NOT_LIPSCHITZ``: branch limits differ beyond float64 rounding, or difference quotients
  blow up at a non-Lipschitz point.
* ``UNDECIDED``: everything else, always with AD's Jacobian when AD ran.
"""
from __future__ import annotations

import math

import numpy as np

from . import _forward as F
from ._certificate import fd_gap, hull_distance, min_norm_element, sampling_hint, smooth_jacobian
from ._continuity import nonlipschitz_evidence
from ._elements import distinct
from ._problem import versions
from ._result import ActiveKink, Audit, Verdict, fmt_clarke


def active_kinks(P, sites: dict) -> tuple:
    out = []
    for (ni, _), s in sorted(sites.items(), key=lambda kv: kv[0][0]):
        node = P.graph.nodes[ni]
        out.append(ActiveKink(node.origin or node.rule, node.describe(), fmt_clarke(s.clarke), s.text, s.kind))
    return tuple(out)


def undecided(P, reason, ad=None, **kw) -> Audit:
    return Audit(
        verdict=Verdict.UNDECIDED,
        ad_jacobian=ad,
        selection_jacobians=kw.get("sel", np.zeros((0,))),
        b_subdifferential=kw.get("b", np.zeros((0,))),
        exact=False,
        bifurcation=kw.get("bif", False),
        active_kinks=kw.get("kinks", ()),
        min_norm=None,
        framework=P.framework,
        versions=versions(P),
        reason=reason,
        dtype=P.dtype,
        engine_jacobian=kw.get("J0"),
    )


def near_kink_note(P) -> str:
    if P.eps >= 1e-15 and P.dtype != "float64":
        tol = math.sqrt(P.eps)
        interp = F.Interpreter(P.graph, P.be, P.xs64, kink_tol=tol, shadow=P.shadow, flush=P.interp.flush)
        interp.run(F.LexPolicy(), P.tangents(None))
        P.interp.run(F.LexPolicy(), [None] * len(P.xs64))
        if set(interp.sites_seen) - set(P.interp.sites_seen):
            return (f"AD ran in {P.dtype}, where some primitive is within {tol:.1g} of a kink that neither float64 "
                    "nor the user's arithmetic puts exactly at it; audit with kink_tol to treat it as active, or "
                    "in float64.")
    return ""


def verdict(P, A, ad: np.ndarray, ad_tol: float, rng, seed: int) -> Audit:
    kinks = active_kinks(P, A.sites)
    sel = np.stack(distinct(A.sel)) if A.sel else np.zeros((0, P.n_out, P.n_in))
    conv = np.stack(distinct(A.conv)) if A.conv else np.zeros((0, P.n_out, P.n_in))
    B = [b for b in distinct(A.b_elems) if np.all(np.isfinite(b))]
    Barr = np.stack(B) + 0.0 if B else np.zeros((0, P.n_out, P.n_in))  # + 0.0: no -0 entries
    common = dict(ad_jacobian=ad, selection_jacobians=sel, b_subdifferential=Barr, bifurcation=len(conv) > 1,
                  active_kinks=kinks, framework=P.framework, versions=versions(P), dtype=P.dtype,
                  engine_jacobian=A.J0, convention_jacobians=conv, exact_basis=A.exact_basis)
    nonfinite_ad = not np.all(np.isfinite(ad))
    ad_note = "AD returned NaN/inf entries, which are never a generalized derivative." if nonfinite_ad else ""
    notes = tuple(A.notes)

    def audit_(v, **kw):
        kw.setdefault("notes", notes)
        return Audit(v, **{**common, **kw})

    if P.graph.unsupported:
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None,
                      reason=f"unsupported primitive(s) in the trace: {', '.join(sorted(set(P.graph.unsupported)))}; "
                             "the engine does not know their kinks, so it makes no claim.",
                      notes=notes + ((ad_note,) if ad_note else ()))

    kinds = {s.kind for s in A.sites.values()}
    if not np.all(np.isfinite(A.out0)):
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None,
                      reason="f(x) is not finite (a pole or a domain boundary): there is nothing to differentiate.")
    # ---------- discontinuity / non-Lipschitz
    if A.discontinuous:
        return audit_(Verdict.NOT_LIPSCHITZ, exact=A.exact, min_norm=None, reason=A.discontinuous,
                      notes=notes + ((ad_note,) if ad_note else ()))
    if "nonlipschitz" in kinds:
        ev = nonlipschitz_evidence(P, A.out0, rng)
        if ev:
            return audit_(Verdict.NOT_LIPSCHITZ, exact=False, min_norm=None,
                          reason=f"a non-Lipschitz point is active and {ev}.",
                          notes=notes + ((ad_note,) if ad_note else ()))
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None,
                      reason="a primitive with an infinite slope (sqrt, fractional power) sits at its singular point, "
                             "but f's difference quotients stay bounded there (its argument vanishes to second order, "
                             "e.g. sqrt(x**2)): whether f is Lipschitz is decided beyond first order."
                             + (" " + ad_note if ad_note else ""))
    if "unsupported" in kinds:
        bad = [s.text for s in A.sites.values() if s.kind == "unsupported"]
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None, reason=f"unsupported kink: {bad[0]}")
    if A.continuity == "unsure":
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None,
                      reason="whether f is continuous at x is not settled: " + (A.notes[-1] if A.notes else ""),
                      notes=())
    if kinds & {"jump", "compare"} and not A.exact and any(s.kind == "jump" for s in A.sites.values()):
        return audit_(Verdict.UNDECIDED, exact=False, min_norm=None,
                      reason="a jump primitive sits at its jump but continuity could not be settled: " + A.exact_basis)

    # ---------- smooth point
    if not A.sites:
        return _smooth(P, A, ad, ad_tol, rng, common, nonfinite_ad, ad_note)

    # ---------- many kinks in one layer: membership in the Minkowski sum
    if A.box is not None:
        res = A.box.distance(ad) if not nonfinite_ad else math.inf
        scale = 1.0 + float(np.max(np.abs(Barr)))
        if res <= ad_tol * scale:
            return audit_(Verdict.CLARKE, exact=True, hull_distance=res, min_norm=None, reason="")
        return audit_(Verdict.SPURIOUS, exact=True, hull_distance=res, min_norm=None,
                      reason=f"AD lies at max-norm distance {res:.3g} from the Clarke Jacobian; certified because "
                             f"{A.exact_basis}. " + ad_note)

    # ---------- at a kink: hull membership
    if not B:
        return audit_(Verdict.UNDECIDED, exact=A.exact, min_norm=None,
                      reason="no B-subdifferential element could be certified at this point. " + A.exact_basis)
    res = hull_distance(Barr, ad)
    mn = min_norm_element(Barr)
    scale = 1.0 + float(np.max(np.abs(Barr)))
    if res <= ad_tol * scale:
        return audit_(Verdict.CLARKE, exact=A.exact, hull_distance=res, min_norm=mn,
                      reason="" if A.exact else A.exact_basis)
    lipschitz_program = not (kinds & {"jump", "nonlipschitz", "unsupported"})
    if A.exact or (nonfinite_ad and lipschitz_program):
        near = near_kink_note(P)
        if near and not nonfinite_ad:
            return audit_(Verdict.UNDECIDED, exact=A.exact, hull_distance=res, reason=near, min_norm=mn)
        why = (f"every essentially active piece was enumerated ({A.exact_basis})" if A.exact
               else "f is locally Lipschitz here and AD is not finite")
        return audit_(Verdict.SPURIOUS, exact=A.exact, hull_distance=res, min_norm=mn,
                      reason=f"AD lies at max-norm distance {res:.3g} from the Clarke Jacobian; certified because {why}. "
                             + ad_note)
    hint = sampling_hint(P, Barr, ad, ad_tol, seed)
    return audit_(Verdict.UNDECIDED, exact=False, hull_distance=res, min_norm=mn,
                  reason=(f"AD is not in the hull of the {len(B)} B-subdifferential element(s) found (distance "
                          f"{res:.3g}), but the set may be incomplete: {A.exact_basis}.").strip(),
                  notes=notes + ((hint,) if hint else ()))


def _smooth(P, A, ad, ad_tol, rng, common, nonfinite_ad, ad_note) -> Audit:
    if not nonfinite_ad and fd_gap(P, ad, rng) <= max(ad_tol, 1e-6):
        # AD agrees with float64 central differences along random directions; report
        # the engine's own Jacobian when it is cheap, else AD's (checked) one
        small = P.n_in * P.n_out <= 256
        J = smooth_jacobian(P) if small else ad
        if small and np.max(np.abs(J - ad)) > ad_tol * (1.0 + float(np.max(np.abs(J)))):
            J = None  # AD passed the difference check but the engine's Jacobian differs: decide below
        if J is not None:
            notes = () if small else ("The Jacobian reported is AD's, checked against float64 central differences.",)
            return Audit(Verdict.SMOOTH, exact=True, min_norm=J, reason="", hull_distance=0.0, notes=notes,
                         **{**common, "b_subdifferential": J[None], "selection_jacobians": J[None],
                            "convention_jacobians": J[None], "engine_jacobian": J if small else None})
    J = smooth_jacobian(P)
    common["engine_jacobian"] = J
    base = {**common, "b_subdifferential": J[None], "selection_jacobians": J[None], "convention_jacobians": J[None]}
    if not np.all(np.isfinite(J)):
        return undecided(P, "f's Jacobian is not finite at x (a pole or a domain boundary of a smooth "
                            "primitive).", ad, J0=J)
    gap = fd_gap(P, J, rng)
    if gap == math.inf:
        return undecided(P, "f is not finite on both sides of x (a domain boundary such as x**1.5 at 0): "
                            "it is not differentiable there in the usual sense.", ad, J0=J)
    note = ""
    if gap > 1e-5:
        h = 1e-6 * (1.0 + float(np.max(np.abs(P.x_flat()))))
        if not _kink_within(P, h):
            return undecided(P, f"the engine's Jacobian disagrees with float64 central differences (relative gap "
                                f"{gap:.2g}); f may not be smooth at x.", ad, J0=J)
        # x is off every kink (in float64 and in the framework's arithmetic), but a kink lies
        # within the difference step: the per-primitive derivative is the Jacobian here
        note = (f"A kink lies within {h:.1g} of x, closer than float64 central differences can resolve; the "
                "Jacobian is the primitives' own derivative at x, where each is differentiable.")
        base["notes"] = (note,)
    scale = 1.0 + float(np.max(np.abs(J)))
    dist = float(np.max(np.abs(ad - J))) if not nonfinite_ad else math.inf
    if dist <= ad_tol * scale:
        return Audit(Verdict.SMOOTH, exact=True, min_norm=J, reason="", hull_distance=dist, **base)
    near = near_kink_note(P)
    if near:
        return Audit(Verdict.UNDECIDED, exact=False, min_norm=J, reason=near, hull_distance=dist, **base)
    checked = (f"float64 central differences agree with its Jacobian to {gap:.1g}" if not note
               else "a kink is near but not at x")
    return Audit(Verdict.SPURIOUS, exact=True, min_norm=J, hull_distance=dist,
                 reason=(f"f is differentiable at x (no primitive at a kink; {checked}) but AD returned something "
                         f"else (max gap {dist:.3g}). " + ad_note).strip(), **base)


def _kink_within(P, h: float) -> bool:
    interp = F.Interpreter(P.graph, P.be, P.xs64, kink_tol=h, shadow=P.shadow, flush=P.interp.flush)
    interp.run(F.LexPolicy(), [None] * len(P.xs64))
    return bool(interp.sites_seen)
