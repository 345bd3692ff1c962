"""``nonsmooth bench pav``: the PAV isotonic kernel against the sort it follows and SciPy.

Soft sort/rank cost one sort plus one PAV pass, so the sort is the floor: PAV should cost
a fraction of ``numpy.argsort`` on the same rows.  For each shape and dtype this times,
interleaved in one process on one thread: the C kernel (L2 and KL), ``pav_rows`` with its
input validation, ``numpy.argsort`` and ``scipy.optimize.isotonic_regression`` in a loop
over rows (SciPy has no batched form).  The pure-NumPy fallback is ~100x slower, so it is
timed in its own interleaved round, again next to the C kernel, argsort and SciPy, with
fewer repeats.  Inputs are standard-normal rows (non-increasing fit, so random rows pool
into many blocks of varied sizes).
"""
from __future__ import annotations

import numpy as np

from ._suite import Table
from ._timing import fmt_seconds, interleaved, single_thread

COLUMNS = ["shape", "dtype", "candidate", "median", "/ numpy.argsort", "/ scipy (row loop)",
           "/ PAV C (l2)"]


def _fmt(cells, widths=(12, 8, 32, 10, 15, 18, 12)) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def _candidates(y, w, *, fallback: bool):
    import scipy.optimize as so

    from nonsmooth.solvers import _isotonic

    cands = {
        "PAV C (l2)": lambda: _isotonic._pav_rows_c(y, None, kind="l2"),
        "numpy.argsort": lambda: np.argsort(y, axis=-1),
        "scipy (row loop)": lambda: [so.isotonic_regression(r, increasing=False) for r in y],
    }
    if fallback:
        cands["PAV NumPy fallback (l2)"] = lambda: _isotonic._pav_rows_numpy(y, None, kind="l2")
    else:
        cands["PAV C (kl)"] = lambda: _isotonic._pav_rows_c(y, w, kind="kl")
        cands["pav_rows (l2, validated)"] = lambda: _isotonic.pav_rows(y)
    return cands


def _rows(shape, dtype, times, names):
    out = []
    for name in names:
        t = times[name]
        out.append([f"{shape[0]}x{shape[1]}", dtype, name, fmt_seconds(t),
                    round(t / times["numpy.argsort"], 3),
                    round(t / times["scipy (row loop)"], 3),
                    round(t / times["PAV C (l2)"], 3)])
    return out


def run(*, quick: bool = False, out=print) -> list[Table]:
    """Time the PAV kernel against ``numpy.argsort`` and SciPy's isotonic regression.

    Example:
        >>> from nonsmooth.reports._bench_pav import run
        >>> tables = run(quick=True, out=lambda s: None)   # doctest: +SKIP
        >>> tables[0].columns[:3]                          # doctest: +SKIP
        ['shape', 'dtype', 'candidate']
    """
    from nonsmooth.solvers import pav_backend

    single_thread()
    shapes = ((128, 1000),) if quick else ((128, 1000), (32, 100_000))
    backend = pav_backend()
    out(f"PAV backend in use: {backend}; one thread; standard-normal rows; "
        "ratios are median time / baseline median, measured interleaved in this process")
    if backend != "c":
        out("C extension not built: the 'PAV C' rows are skipped; reinstall with gcc "
            "to measure them")
        return []
    out(_fmt(COLUMNS))
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        big = shape[0] * shape[1] > 1_000_000
        for dtype in ("float64", "float32"):
            y = rng.standard_normal(shape).astype(dtype)
            w = rng.standard_normal(shape).astype(dtype)
            main = _candidates(y, w, fallback=False)
            times = interleaved(main, repeats=5 if (quick or big) else 15)
            new = _rows(shape, dtype, times, list(main))
            # The fallback round: C, argsort and SciPy again, so every ratio in the
            # fallback's row comes from the round it was measured in.
            slow = _candidates(y, w, fallback=True)
            slow_times = interleaved(slow, repeats=2 if big else 3, warmup=1)
            new += _rows(shape, dtype, slow_times, ["PAV NumPy fallback (l2)"])
            for r in new:
                out(_fmt(r))
            rows += new
    note = ("PAV = non-increasing isotonic fit of every row (O(n) per row). The fallback row's "
            "ratios come from its own interleaved round with fewer repeats. Target: PAV C (l2) "
            "well under numpy.argsort (the sort is the floor of soft sort/rank).")
    out(note)
    return [Table(title="PAV isotonic regression: C kernel vs NumPy fallback, argsort, SciPy",
                  columns=COLUMNS, rows=rows, note=note)]
