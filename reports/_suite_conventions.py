"""Report suite: the kink conventions of torch and jax, measured live, side by side.

Each check re-derives a closed-form Clarke set here and asks whether the measurement was
judged right against it; what the frameworks *return* is a finding shown in the table,
not a pass/fail condition (conventions are choices and change between versions).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ._suite import Check, Figure, SuiteResult, Table

_FRAMEWORKS = ("torch", "jax")


def _measure(framework: str, progress):
    from nonsmooth.conservative._conventions import kink_conventions

    if progress:
        progress(f"measuring {framework} kink conventions")
    try:
        return kink_conventions(framework), ""
    except ImportError as err:
        return None, str(err)


def _scalar(row) -> float | None:
    a = row.ad_array() if row.available else None
    if a is None or a.size != 1:
        return None
    v = float(a.reshape(-1)[0])
    return v if math.isfinite(v) else None


def _pair_rows(kcs: dict) -> list[tuple]:
    """(rule, where, k, torch_row | None, jax_row | None), pairing the k-th spelling of each case."""
    keys: list[tuple] = []
    grouped: dict = {}
    for fw, kc in kcs.items():
        if kc is None:
            continue
        seen: dict = {}
        for r in kc.rows:
            k = (r.rule, r.where)
            i = seen.get(k, 0)
            seen[k] = i + 1
            key = (r.rule, r.where, i)
            if key not in grouped:
                grouped[key] = {}
                keys.append(key)
            grouped[key][fw] = r
    return [(k[0], k[1], k[2], grouped[k].get("torch"), grouped[k].get("jax")) for k in keys]


def _closed_form_checks(fw: str, kc) -> list[Check]:
    """Judgements the module made, redone here against Clarke sets derived by hand."""
    checks = []
    cases = {
        # spelling prefix -> (Clarke set as a membership test, min-norm element, description)
        "abs": (lambda v: -1 <= v <= 1, 0.0, "|x| at 0: [-1, 1]"),
        "relu": (lambda v: 0 <= v <= 1, 0.0, "relu at 0: [0, 1]"),
        "sqrt(x * x)": (lambda v: -1 <= v <= 1, 0.0, "sqrt(x^2) = |x| at 0: [-1, 1]"),
        "eq": (lambda v: v == 1, 1.0, "where(x == 0, 0, x) = x at 0: {1}"),
    }
    prefix = "torch." if fw == "torch" else "jnp."
    picks = {
        "abs": kc.row(f"{prefix}abs(x)"),
        "relu": kc.by_rule("relu"),
        "sqrt(x * x)": kc.row(f"{prefix}sqrt(x * x)"),
        "eq": kc.by_rule("eq")[0],
    }
    for key, (member, mn, desc) in cases.items():
        rows = picks[key] if isinstance(picks[key], list) else [picks[key]]
        ok = True
        numbers = {}
        for r in rows:
            a = r.ad_array()
            v = float(a.reshape(-1)[0])
            expect_in = bool(math.isfinite(v) and member(v))
            expect_min = bool(expect_in and v == mn)
            numbers[r.spelling] = {"ad": v, "in_clarke": r.in_clarke, "expected_in_clarke": expect_in,
                                   "is_min_norm": r.is_min_norm, "expected_min_norm": expect_min}
            ok &= (r.in_clarke == expect_in) and (r.is_min_norm == expect_min)
        checks.append(Check(f"{fw}: {desc} judged correctly", ok,
                            "; ".join(f"{s} -> {d['ad']:g} ({'in' if d['in_clarke'] else 'NOT in'} Clarke)"
                                      for s, d in numbers.items()), numbers))
    # selections: a tie of the max reduction; Clarke set conv{e_1, e_2} derived by hand.
    r = kc.by_rule("max")[0]
    g = r.ad_array().reshape(-1)
    expect = bool(np.all(g >= -1e-12) and abs(g.sum() - 1) < 1e-12 and g[0] == 0 and g[3] == 0)
    checks.append(Check(f"{fw}: max-reduction tie judged against conv{{e1, e2}}", r.in_clarke == expect,
                        f"{r.spelling} at {r.where} -> {r.ad_text()} ({r.behaviour})",
                        {"ad": g.tolist(), "in_clarke": r.in_clarke, "expected": expect}))
    return checks


def run(*, quick: bool = False, progress=None, frameworks=_FRAMEWORKS) -> SuiteResult:
    t0 = time.perf_counter()
    kcs = {}
    errors = {}
    for fw in frameworks:
        kcs[fw], err = _measure(fw, progress)
        if err:
            errors[fw] = err
    from nonsmooth.conservative import RULES

    checks = []
    for fw in frameworks:
        kc = kcs[fw]
        if kc is None:
            checks.append(Check(f"{fw}: installed", False, errors[fw], {}))
            continue
        covered = {r.rule for r in kc.rows}
        failed = [f"{r.spelling}: {r.note}" for r in kc.rows if r.available and r.ad_value is None]
        missing = sorted(set(RULES) - covered)
        unprobed = sorted({r.rule for r in kc.rows if r.spelling == "(no probe)"})
        checks.append(Check(
            f"{fw}: every registered primitive measured or reported not available",
            not missing and not failed and not unprobed,
            f"{len(kc.rows)} rows over {len(covered)} primitives; "
            f"not available: {sorted({r.rule for r in kc.rows if not r.available and r.spelling != '(no probe)'})}"
            + (f"; failed: {failed}" if failed else "") + (f"; no probe: {unprobed}" if unprobed else ""),
            {"rows": len(kc.rows), "primitives": len(covered), "missing": missing, "failed": failed,
             "unprobed": unprobed, "versions": kc.versions}))
        checks.extend(_closed_form_checks(fw, kc))

    table_rows = []
    labels, series = [], {f"{fw} AD": [] for fw in frameworks if kcs.get(fw)}
    clarke_ranges = []
    for rule, where, k, tr, jr in _pair_rows(kcs):
        ref = tr or jr
        cells = [rule, where, ref.clarke.describe()]
        for fw, r in (("torch", tr), ("jax", jr)):
            if fw not in frameworks or kcs.get(fw) is None:
                continue
            if r is None:
                cells += ["-", "-", "-"]
            else:
                judged = "n/a" if r.in_clarke is None else (
                    "min-norm" if r.is_min_norm else ("in" if r.in_clarke else "OUTSIDE"))
                cells += [r.spelling, r.ad_text(), judged]
        table_rows.append(cells)
        if ref.ad_shape in ((1, 1), ()) and ref.clarke.kind == "polytope":
            labels.append(f"{rule} @ {where.replace('x = ', '')}" + (f" #{k + 1}" if k else ""))
            for fw, r in (("torch", tr), ("jax", jr)):
                if f"{fw} AD" in series:
                    series[f"{fw} AD"].append(_scalar(r) if r is not None else None)
            V = np.array(ref.clarke.vertices).reshape(-1)
            clarke_ranges.append([float(V.min()), float(V.max())])
    columns = ["primitive", "at", "Clarke set"]
    for fw in frameworks:
        if kcs.get(fw) is not None:
            columns += [f"{fw} spelling", f"{fw} AD", f"{fw} judged"]
    versions = {k: v for kc in kcs.values() if kc for k, v in kc.versions.items()}
    tables = [Table("Kink conventions, torch vs jax (measured live)", columns, table_rows,
                    note="AD = what reverse mode returns at a point exactly on the kink or tie; judged = "
                         "against the local Clarke set (min-norm, in, OUTSIDE, n/a where no Clarke set exists). "
                         + ", ".join(f"{k} {v}" for k, v in versions.items()))]

    counts = {}
    for fw, kc in kcs.items():
        if kc is None:
            continue
        c = {"min-norm": 0, "in, not min-norm": 0, "outside": 0, "no Clarke set": 0, "not available": 0}
        for r in kc.rows:
            if not r.available:
                c["not available"] += 1
            elif r.in_clarke is None:
                c["no Clarke set"] += 1
            elif r.is_min_norm:
                c["min-norm"] += 1
            elif r.in_clarke:
                c["in, not min-norm"] += 1
            else:
                c["outside"] += 1
        counts[fw] = c
    figures = []
    if counts:
        cats = list(next(iter(counts.values())))
        figures.append(Figure("How AD values sit relative to the Clarke set", "bar", cats,
                              {fw: [c[k] for k in cats] for fw, c in counts.items()},
                              xlabel="AD value at the kink", ylabel="(spelling, kink) pairs",
                              headline=True,
                              caption="Every registered primitive, at each of its kinks, measured live: is "
                                      "the derivative reverse mode returns the minimum-norm element of the "
                                      "local Clarke set, another element, or outside it?"))
    figures.append(Figure("Derivative returned at elementwise kinks", "interval", labels, series,
                          xlabel="primitive @ kink", ylabel="derivative at the kink",
                          intervals={"Clarke set (by hand)": clarke_ranges},
                          caption="Grey: the local Clarke set; markers: what each framework's reverse mode "
                                  "returns exactly on the kink. A marker off the grey range lies outside the "
                                  "Clarke set; a missing marker means the framework returned NaN or inf there, "
                                  "or does not have the primitive."))
    summary_parts = []
    for fw, kc in kcs.items():
        if kc is None:
            summary_parts.append(f"{fw} not installed")
            continue
        c = counts[fw]
        summary_parts.append(f"{fw}: {c['outside']} values outside the Clarke set, {c['in, not min-norm']} Clarke "
                             f"but not min-norm, {c['min-norm']} min-norm")
    abs_vals = {fw: kc.by_rule("abs")[0].ad_text() for fw, kc in kcs.items() if kc}
    if abs_vals:
        summary_parts.append("abs'(0): " + ", ".join(f"{fw} {v}" for fw, v in abs_vals.items()))
    return SuiteResult(name="conventions", title="Kink conventions of torch and jax", checks=checks,
                       tables=tables, figures=figures, summary="; ".join(summary_parts) + ".",
                       seconds=time.perf_counter() - t0)
