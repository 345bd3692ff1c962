"""Report suite "proofs": every SymPy certificate of ``nonsmooth.proofs`` as one check."""
from __future__ import annotations

import time

from ._suite import Check, Figure, SuiteResult, Table

# The quick run: the whole rule table and the fast symbolic proofs (about 10 s on 2 cores);
# the full run adds the soft sort/rank KL cases and the perturbed-optimizer integrals.
QUICK = ("rule:*", "spurious_derivative", "relu_fixed_point_implicit", "path_conservativity",
         "soft_rank_l2_descending", "soft_sort_l2", "gumbel_argmax_is_softmax")


def _detail(cert, steps: int = 6) -> str:
    shown = [s for s in cert.derivation if not s.startswith("checked: ")][:steps]
    parts = [cert.statement]
    if shown:
        parts.append("Derivation: " + " | ".join(shown))
    if cert.failures:
        parts.append("FAILED: " + " | ".join(cert.failures))
    return "\n".join(parts)


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    """Check the certificates (a fast subset when ``quick``) and report one Check each."""
    from nonsmooth.proofs import check_all, get

    t0 = time.perf_counter()

    def tick(done, total, name):
        if progress is not None and name:
            progress(f"{done + 1}/{total} {name}")

    certs = check_all(list(QUICK) if quick else None, progress=tick)
    checks = [Check(name=c.name, passed=c.verified, detail=_detail(c),
                    numbers={"computed_checks": c.checks, "seconds": round(c.seconds, 4),
                             "failures": len(c.failures)})
              for c in certs]
    rows = [[c.name, "verified" if c.verified else "FAILED", c.checks, round(c.seconds, 3)] for c in certs]
    latex_rows = []
    for c in certs:
        proof = get(c.name)
        latex_rows.append([c.name, proof.latex, "; ".join(proof.assumptions)])
    tables = [
        Table(title="Certificates", columns=["proof", "verdict", "computed checks", "seconds"], rows=rows,
              note="Each certificate is computed with SymPy at report time; nothing is asserted by hand."),
        Table(title="Statements", columns=["proof", "LaTeX", "assumptions"], rows=latex_rows),
    ]
    failed = [c.name for c in certs if not c.verified]
    if failed:
        tables.append(Table(title="Failures", columns=["proof", "why"],
                            rows=[[c.name, " | ".join(c.failures)] for c in certs if not c.verified]))
    figures = [Figure(title="SymPy time per certificate", kind="bar", x=[c.name for c in certs],
                      series={"seconds": [max(round(c.seconds, 4), 1e-4) for c in certs]},
                      xlabel="certificate", ylabel="seconds (log scale)", logy=True,
                      caption="Each certificate is recomputed symbolically at report time; times under "
                              "0.1 ms are drawn at 0.1 ms.")]
    summary = (f"{len(certs) - len(failed)}/{len(certs)} certificates verified"
               + (f"; failed: {', '.join(failed)}" if failed else "")
               + (" (quick subset)" if quick else ""))
    return SuiteResult(name="proofs", title="Symbolic certificates (SymPy)", checks=checks, tables=tables,
                       figures=figures, summary=summary, seconds=time.perf_counter() - t0)
