"""Report suite: the ReLU'(0) bifurcation study (Bertoin et al., NeurIPS 2021).

How often does backprop's parameter gradient depend on the value chosen for ReLU'(0),
per dtype, over random initialisations of a small MLP, and what a plane section of
the bifurcation zone looks like.
"""
from __future__ import annotations

import time

from ._suite import Check, Figure, SuiteResult, Table

NAME = "bifurcation"
TITLE = "ReLU'(0): when backprop depends on the derivative chosen at 0"


def _rate_rows(study, label: str) -> list:
    return [[label, r.dtype, r.precision, f"{r.n_bifurcating}/{r.n_inits}", round(r.rate, 4),
             f"[{r.ci_low:.3f}, {r.ci_high:.3f}]", round(r.zero_rate, 4),
             round(r.mean_zero_preactivations, 3), round(r.bifurcating_batch_fraction, 5)]
            for r in study.rates]


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    from nonsmooth.conservative._bifurcation import bifurcation_study, bifurcation_zone

    say = progress or (lambda message: None)
    start = time.perf_counter()
    n_inits = 6 if quick else 40
    depth, width = (2, 64) if quick else (3, 128)
    say(f"bifurcation: study depth={depth} width={width} n_inits={n_inits} (float16 native)")
    native = bifurcation_study(depth=depth, width=width, batch_size=128, n_inits=n_inits,
                               dataset="digits", seed=0)
    acc_depth, acc_width, acc_inits = (1, 32, 4) if quick else (2, 64, 16)
    say(f"bifurcation: float16 summed term by term, depth={acc_depth} width={acc_width}")
    accumulate = bifurcation_study(depth=acc_depth, width=acc_width, batch_size=128, n_inits=acc_inits,
                                   dtypes=("float16", "float32", "float64"), float16="accumulate",
                                   dataset="digits", seed=0)
    studies = [("digits, torch float16", native), ("digits, float16 term by term", accumulate)]
    if not quick:
        say("bifurcation: mnist_like study")
        studies.append(("mnist_like, torch float16", bifurcation_study(
            depth=depth, width=width, batch_size=128, n_inits=n_inits // 2, dataset="mnist_like",
            n_samples=2048, seed=0)))
    say("bifurcation: plane section of the zone")
    zone = bifurcation_zone(depth=1, width=16 if quick else 32, batch_size=128, dtype="float16",
                            float16="accumulate", resolution=13 if quick else 31, radius=8.0,
                            n_batches=1 if quick else 2, seed=0)

    checks = []
    for label, study in studies:
        r64 = study._row("float64")
        checks.append(Check(
            f"float64 never bifurcates ({label})", r64.n_bifurcating == 0,
            f"{r64.n_bifurcating}/{r64.n_inits} float64 initialisations bifurcate "
            f"(95% upper bound {r64.ci_high:.3f}); exact zeros per pass {r64.mean_zero_preactivations:.3f}.",
            {"n_bifurcating": r64.n_bifurcating, "n_inits": r64.n_inits, "ci_high": r64.ci_high},
        ))
        rates = {r.dtype: r.rate for r in study.rates}
        ordered = rates["float16"] >= rates["float32"] >= rates["float64"]
        checks.append(Check(
            f"lower precision bifurcates at least as often ({label})", ordered,
            "rates " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()),
            dict(rates),
        ))
        needs_zero = all(r.n_bifurcating <= r.n_with_zero for r in study.rates)
        checks.append(Check(
            f"every bifurcation sits on an exact zero pre-activation ({label})", needs_zero,
            "; ".join(f"{r.dtype}: {r.n_bifurcating} bifurcating, {r.n_with_zero} with exact zeros"
                      for r in study.rates),
            {r.dtype: [r.n_bifurcating, r.n_with_zero] for r in study.rates},
        ))
    r16 = accumulate._row("float16")
    checks.append(Check(
        "float16 summed term by term makes the choice matter", r16.n_bifurcating > 0,
        f"{r16.n_bifurcating}/{r16.n_inits} initialisations bifurcate when every float16 product and "
        f"sum is rounded ({r16.mean_zero_preactivations:.2f} exact zeros per pass).",
        {"rate": r16.rate, "ci_low": r16.ci_low, "ci_high": r16.ci_high},
    ))

    columns = ["study", "dtype", "float16 arithmetic", "bifurcating", "rate", "95% CI (Wilson)",
               "inits with exact zeros", "exact zeros per pass", "bifurcating batch fraction"]
    rows = [row for label, study in studies for row in _rate_rows(study, label)]
    tables = [Table(
        "Fraction of random initialisations in the bifurcation set",
        columns, rows,
        note=(f"MLP of depth {depth}, width {width} (term-by-term float16: depth {acc_depth}, width "
              f"{acc_width}), batch 128, one pass over the data, PyTorch default init; torch "
              f"{native.torch_version} on {native.device}. 'native' uses torch's own float16 kernels; "
              "'float16-accumulate' rounds every product and every partial sum to float16."),
    )]
    def ci(study):
        return [[r.ci_low, r.ci_high] for r in study.rates]

    figures = [
        Figure("Fraction of random initialisations whose gradient depends on ReLU'(0)", "bar",
               [r.dtype for r in native.rates],
               {"torch float16 kernels": [r.rate for r in native.rates],
                "float16 term by term": [r.rate for r in accumulate.rates]},
               xlabel="dtype", ylabel="fraction of initialisations", headline=True,
               errors={"torch float16 kernels": ci(native), "float16 term by term": ci(accumulate)},
               caption=f"One pass over digits in minibatches of 128; bars: rate, whiskers: 95% Wilson "
                       f"intervals ({native.rates[0].n_inits} and {accumulate.rates[0].n_inits} initialisations). "
                       f"float64: {native._row('float64').n_bifurcating}/{native._row('float64').n_inits} "
                       f"bifurcate; float16 term by term: {r16.n_bifurcating}/{r16.n_inits}."),
        Figure(f"Bifurcation zone: a plane section of parameter space ({zone.dtype}, term by term)", "image",
               list(zone.a_values), {"z": [list(row) for row in zone.grid]},
               xlabel="a (ulps of each parameter)", ylabel="b (ulps of each parameter)",
               y=list(zone.b_values), levels={0: "same gradient", 1: "bifurcates"},
               caption=f"Parameters theta0 + a u + b v on a {len(zone.b_values)} x {len(zone.a_values)} grid; "
                       f"a cell bifurcates when ReLU'(0) = 0 and = 1 give different gradients on the first "
                       f"{zone.n_batches} minibatch(es). {zone.fraction:.1%} of the cells bifurcate."),
    ]
    summary = (f"float64: {native._row('float64').rate:.2f}, float32: {native._row('float32').rate:.2f}, "
               f"float16 (torch kernels): {native._row('float16').rate:.2f}, float16 term by term: "
               f"{r16.rate:.2f} of initialisations bifurcate; {zone.fraction:.2%} of the plane-section "
               f"cells bifurcate.")
    return SuiteResult(NAME, TITLE, checks, tables, figures, summary,
                       seconds=time.perf_counter() - start)
