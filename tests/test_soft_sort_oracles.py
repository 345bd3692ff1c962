"""The independent oracles for soft sort/rank, and tests of the oracles themselves.

The projections live in ``nonsmooth.reports._permutahedron_oracle`` (the report runs the
same checks) and share no code with the solver: every block structure of the sorted order
is enumerated and the feasible candidate whose Frank-Wolfe gap vanishes is returned
(exact rationals for L2, 60+ digits for KL). Here they are checked against things that
share none of *their* assumptions:

* brute force over every face of the permutahedron (all ordered set partitions, not only
  the contiguous blocks of the sorted order), in float64;
* closed forms at n = 2, where P(w) is a segment;
* vertices (far-apart z), interior points, the limits eps -> 0 and eps -> infinity, the
  sum and range invariants, random feasible points that never do better;
* the certificate: a perturbed optimum has a positive gap, an infeasible point an
  infinite one, and a broken candidate generator makes the oracle raise.
"""
import itertools
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import rankdata

from nonsmooth.reports import _permutahedron_oracle as po
from nonsmooth.reports._permutahedron_oracle import fw_gap, oracle, project_kl, project_l2
from nonsmooth.reports._suite_sort import fd_jacobian  # noqa: F401  (re-exported)


def soft_rank_oracle(x, reg, eps, direction="ascending"):
    return oracle("rank", x, reg, eps, direction)


def soft_sort_oracle(x, reg, eps, direction="ascending"):
    return oracle("sort", x, reg, eps, direction)


# --------------------------------------------------------------------------- brute force


def _ordered_partitions(n):
    items = list(range(n))

    def rec(rest):
        if not rest:
            yield []
            return
        for size in range(1, len(rest) + 1):
            for block in itertools.combinations(rest, size):
                for tail in rec([i for i in rest if i not in block]):
                    yield [list(block)] + tail
    return list(rec(items))


def _in_permutahedron(mu, w, tol):
    top_mu = np.cumsum(np.sort(mu)[::-1])
    top_w = np.cumsum(np.sort(w)[::-1])
    return np.all(top_mu <= top_w + tol) and abs(top_mu[-1] - top_w[-1]) <= tol


def brute_force(z, w, kind):
    """min over every face F of P(w) of the objective's minimiser on aff(F), if feasible.

    Faces of P(w) (w distinct) are the ordered set partitions (B_1, ..., B_m): on F the
    first k blocks carry the k largest |B_1| + ... + |B_k| entries of w. The projection
    lies in the relative interior of one face and minimises the objective on its affine
    hull, so the feasible face minimiser of least objective is the projection.
    """
    z, w = np.asarray(z, float), np.asarray(w, float)
    w_desc = np.sort(w)[::-1]
    best, best_f = None, np.inf
    for blocks in _ordered_partitions(len(z)):
        mu = np.empty_like(z)
        pos = 0
        for b in blocks:
            mass = w_desc[pos:pos + len(b)].sum()
            pos += len(b)
            if kind == "l2":
                mu[b] = z[b] - (z[b].sum() - mass) / len(b)
            else:
                mu[b] = np.exp(z[b] - logsumexp(z[b])) * mass
        if not _in_permutahedron(mu, w, 1e-9 * (1 + np.abs(w).sum())):
            continue
        f = (0.5 * np.sum((mu - z) ** 2) if kind == "l2"
             else np.sum(mu * (np.log(mu) - z) - mu + np.exp(z)))
        if f < best_f:
            best, best_f = mu, f
    return best


@pytest.mark.parametrize("kind", ["l2", "kl"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_oracle_matches_brute_force_over_every_face(kind, n):
    rng = np.random.default_rng(n + 10 * (kind == "kl"))
    for _ in range(6 if n < 5 else 3):
        z = rng.normal(size=n) * rng.choice([0.3, 1.0, 3.0])
        w = rng.normal(size=n) * 2 if kind == "l2" else np.exp(rng.normal(size=n))
        project = project_l2 if kind == "l2" else project_kl
        np.testing.assert_allclose(project(z, w), brute_force(z, w, kind), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- closed forms


def test_two_points_closed_forms_are_exact():
    # P(w) for n = 2 is the segment {(t, S - t): t in [min w, max w]}.
    rng = np.random.default_rng(1)
    for _ in range(20):
        z = rng.normal(size=2) * 3
        w = np.exp(rng.normal(size=2))
        lo, hi, total = w.min(), w.max(), w.sum()
        # L2: t* = clip((z1 - z2 + S) / 2), computed exactly in fractions
        zq, wq = [Fraction(v) for v in z], [Fraction(v) for v in w]
        t = min(max((zq[0] - zq[1] + wq[0] + wq[1]) / 2, min(wq)), max(wq))
        got = po.project_l2_certified(z, w).exact
        assert got == (t, wq[0] + wq[1] - t)
        # KL: t* = clip(S e^z1 / (e^z1 + e^z2))
        t = np.clip(total / (1 + np.exp(z[1] - z[0])), lo, hi)
        np.testing.assert_allclose(project_kl(z, w), [t, total - t], rtol=1e-15)


def test_l2_far_points_land_on_the_vertex_and_inside_points_stay():
    for n in (2, 3, 4, 6):
        z = np.random.default_rng(n).permutation(n) * 50.0
        w = np.arange(n, 0, -1.0)
        assert project_l2(z, w).tolist() == rankdata(z).tolist()
        assert project_kl(z, w).tolist() == rankdata(z).tolist()
    w = np.array([3.0, 2.0, 1.0])
    inside = np.array([2.25, 1.875, 1.875])  # sums to 6, partial sums below 3 and 5
    assert project_l2(inside, w).tolist() == inside.tolist()
    # KL(mu, e^z) = 0 at mu = e^z when e^z is in P(w): the projection is e^z itself
    np.testing.assert_allclose(project_kl(np.log(inside), w), inside, rtol=1e-15)


def test_soft_rank_limits_and_invariants():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 9):
        x = rng.normal(size=n)
        gap = np.min(np.diff(np.sort(x))) if n > 1 else 1.0
        for reg in ("l2", "kl"):
            for direction, key in (("ascending", x), ("descending", -x)):
                hard = oracle("rank", x, reg, gap / 4, direction)
                if reg == "l2":  # L2 is exactly hard below the min gap
                    assert hard.tolist() == rankdata(key).tolist()
                else:  # KL approaches it exponentially fast
                    np.testing.assert_allclose(hard, rankdata(key), atol=1e-3)
                flat = oracle("rank", x, reg, 1e9, direction)
                np.testing.assert_allclose(flat, (n + 1) / 2, atol=1e-7)
                for eps in (0.1, 1.0, 10.0):
                    r = oracle("rank", x, reg, eps, direction)
                    assert r.min() >= 1 - 1e-15 and r.max() <= n + 1e-15
                    assert r.sum() == pytest.approx(n * (n + 1) / 2, rel=1e-15)
                    # ranks follow the order of the keys
                    assert np.all(np.diff(r[np.argsort(key)]) >= -1e-15)


def test_soft_sort_limits_and_invariants():
    rng = np.random.default_rng(4)
    for n in (1, 3, 6):
        x = rng.normal(size=n) * 2
        max_gap = np.max(np.diff(np.sort(x))) if n > 1 else 1.0
        for direction, hard in (("ascending", np.sort(x)), ("descending", np.sort(x)[::-1])):
            l2 = oracle("sort", x, "l2", 0.5 / max_gap, direction)
            assert l2.tolist() == hard.tolist()
            kl = oracle("sort", x, "kl", 0.02 / max_gap, direction)
            np.testing.assert_allclose(kl, hard, atol=1e-6)
            np.testing.assert_allclose(oracle("sort", x, "l2", 1e9, direction), x.mean(),
                                       atol=1e-7)
            lme = logsumexp(x) - np.log(n) if direction == "descending" \
                else -(logsumexp(-x) - np.log(n))
            np.testing.assert_allclose(oracle("sort", x, "kl", 1e9, direction), lme, atol=1e-7)
            for reg in ("l2", "kl"):
                s = oracle("sort", x, reg, 0.7, direction)
                assert s.min() >= x.min() and s.max() <= x.max()
                if reg == "l2":
                    assert s.sum() == pytest.approx(x.sum(), abs=1e-12)


def test_kl_soft_rank_is_not_the_log_of_the_projection_onto_p_exp_rho():
    # The paper's KL rank lives in P(rho); the earlier operator (log of the projection
    # of e^z onto P(e^rho)) does not: its exponentials sum to e + ... + e^n instead.
    x = np.random.default_rng(5).normal(size=6)
    r = oracle("rank", x, "kl", 1.0)
    old = np.log(project_kl(x, np.exp(np.arange(6, 0, -1.0))))
    assert r.sum() == pytest.approx(21.0, rel=1e-15)
    assert abs(old.sum() - 21.0) > 0.1


# --------------------------------------------------------------------------- certificate


def test_random_feasible_points_never_beat_the_oracle():
    rng = np.random.default_rng(6)
    n = 4
    w = np.arange(n, 0, -1.0)
    vertices = np.array(list(itertools.permutations(w)))
    for kind in ("l2", "kl"):
        z = rng.normal(size=n)
        mu = project_l2(z, w) if kind == "l2" else project_kl(z, w)

        def f(m):
            return (0.5 * np.sum((m - z) ** 2, -1) if kind == "l2"
                    else np.sum(m * (np.log(m) - z) - m + np.exp(z), -1))
        lam = rng.dirichlet(np.ones(len(vertices)) * 0.3, size=4000)
        assert np.all(f(lam @ vertices) >= f(mu) - 1e-12)


def test_the_gap_certifies_optimality_and_rejects_perturbations():
    z = np.array([0.4, -1.0, 1.3, 0.2])
    w = np.array([4.0, 3.0, 2.0, 1.0])
    for kind, project in (("l2", project_l2), ("kl", project_kl)):
        mu = project(z, w)
        assert fw_gap(mu, z, w, kind) < 1e-14
        moved = mu + np.array([1e-3, -1e-3, 0.0, 0.0])  # still feasible, not optimal
        assert fw_gap(moved, z, w, kind) > 1e-7
        assert fw_gap(mu + 0.1, z, w, kind) == np.inf  # total mass changed: infeasible
    cert = po.project_kl_certified(z, w)
    assert 0 <= cert.gap < 1e-50 and cert.bound < 1e-20


def test_a_broken_candidate_generator_makes_the_oracle_raise(monkeypatch):
    # The certificate does not trust the enumeration: feed it wrong candidates.
    monkeypatch.setattr(po, "_l2_candidate",
                        lambda zs, w_desc, bounds: [v + 0 * k for k, v in enumerate(w_desc)])
    with pytest.raises(po.OracleError, match="Frank-Wolfe"):
        po.project_l2([0.3, -0.2, 1.0], [3.0, 2.0, 1.0])
    monkeypatch.setattr(po, "_kl_candidate",
                        lambda ezs, w_desc, bounds: [v * 0.999 for v in w_desc])
    with pytest.raises(po.OracleError):
        po.project_kl([0.3, -0.2, 1.0], [3.0, 2.0, 1.0])


def test_ties_and_huge_scales_are_exact():
    # L2 in rationals: ties at 1e300 stay tied, the projection is the average rank.
    r = oracle("rank", [1e300, 1e300, -1e300, 5.0], "l2", 1.0)
    assert r.tolist() == [3.5, 3.5, 1.0, 2.0]
    # x / eps is formed exactly: offsets (0, 2, 2, 10, 12) / 3 at 1e16 (where float64
    # rounds x / 3 to multiples of 0.5) pool into {12, 10} and {2, 2, 0}, by hand:
    for direction, sign in (("ascending", 1), ("descending", -1)):
        r = oracle("rank", sign * (1e16 + np.array([0.0, 2, 2, 10, 12])), "l2", 3.0, direction)
        want = [Fraction(14, 9), Fraction(20, 9), Fraction(20, 9), Fraction(25, 6),
                Fraction(29, 6)]
        assert r.tolist() == [float(v) for v in want]
    r = oracle("rank", [3.0, 3.0, 1.0], "kl", 1e-16)
    assert r.tolist() == [2.5, 2.5, 1.0]
    r = oracle("rank", [1e16] * 3, "kl", 1.0, "descending")
    assert r.tolist() == [2.0, 2.0, 2.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n <= 14"):
        project_l2(np.zeros(15), np.arange(15.0))
    with pytest.raises(ValueError, match="positive w"):
        project_kl([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="equal length"):
        project_l2([0.0], [1.0, 2.0])


def test_the_report_suite_passes_and_plots_the_rank_paths():
    from nonsmooth.reports._suite_sort import run

    result = run(quick=True, frameworks=())
    assert result.passed, [c for c in result.checks if not c.passed]
    names = " ".join(c.name for c in result.checks)
    assert "finite differences" in names and "projection" in names
    for check in result.checks:
        assert check.numbers, check.name
    fig = result.figures[0]
    assert fig.logx and len(fig.series) == 5
    # Along the strength axis the L2 ranks go from the hard ranks to (n + 1) / 2.
    first = [s[0] for s in fig.series.values()]
    last = [s[-1] for s in fig.series.values()]
    np.testing.assert_allclose(first, rankdata(np.array([0.3, -1.2, 2.0, 0.35, 1.1])),
                               atol=1e-9)
    np.testing.assert_allclose(last, 3.0, atol=0.1)
    # ... and so do the KL ranks (the paper's operator lives in P(rho) too).
    kl_last = [s[-1] for s in result.figures[1].series.values()]
    np.testing.assert_allclose(kl_last, 3.0, atol=0.1)
    result.to_json()


def test_the_full_report_suite_passes():
    # What `nonsmooth report` runs (about 7 s): every oracle call of the full suite.
    from nonsmooth.reports._suite_sort import run

    result = run(quick=False)
    assert result.passed, [c for c in result.checks if not c.passed]
