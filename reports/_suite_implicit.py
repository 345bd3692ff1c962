"""Report suite: implicit layers -- gradients of DEQs and implicit models against float64
finite differences and the exact conservative Jacobian set, invertibility verdicts
(including y + |y| - x = 0, where AD returns a finite number although no implicit function
theorem applies), failure reporting, and the solvers' residual curves."""
from __future__ import annotations

import math
import time
import warnings

from ._suite import Check, Figure, SuiteResult, Table


def _say(progress, msg):
    if progress is not None:
        progress(msg)


def certified_fixed_point(W, U, x, *, tol: float = 1e-14):
    """z* = tanh(z* W^T + x U^T) in float64 NumPy, to a certified accuracy ``tol``.

    The map is a contraction with constant q = ||W||_2 < 1 (tanh is 1-Lipschitz), so
    Picard iteration converges and ||z_k - z*|| <= q / (1 - q) ||z_k - z_{k-1}|| bounds the
    error of every iterate.  The loop stops when that bound is below ``tol``; Banach's
    theorem fixes in advance how many steps that takes, so it cannot stall at a limit.
    Independent of ``nonsmooth.implicit`` (no shared code).
    """
    import numpy as np

    W, U, x = (np.asarray(a, dtype=np.float64) for a in (W, U, x))
    q = float(np.linalg.norm(W, 2))
    if not q < 1:
        raise ValueError(f"oracle: ||W||_2 = {q} is not < 1, so the map is not a contraction")
    drive = x @ U.T
    z = np.zeros((x.shape[0], W.shape[0]))
    z_next = np.tanh(z @ W.T + drive)
    first = float(np.linalg.norm(z_next - z))
    if q == 0.0:  # a constant map: one step is exact
        return z_next
    steps = 1 + max(0, math.ceil(math.log(tol * (1 - q) / max(first, 1e-300)) / math.log(q))) if first else 1
    for _ in range(steps + 50):  # the a-priori count, plus slack for rounding
        z, z_next = z_next, np.tanh(z_next @ W.T + drive)
        if q / (1 - q) * float(np.linalg.norm(z_next - z)) <= tol:
            return z_next
    raise RuntimeError(f"oracle: Picard on a contraction (q = {q:.3f}) missed {tol:g} after {steps + 50} steps: "
                       "floating-point stagnation above the tolerance")


def _fd_check(torch, implicit_fixed_point):
    g = torch.Generator().manual_seed(0)
    n, p, batch = 6, 3, 3
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(n, p, generator=g, dtype=torch.float64)
    x = torch.randn(batch, p, generator=g, dtype=torch.float64)
    cot = torch.randn(batch, n, generator=g, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ W.T + x @ U.T)

    def value(xx):
        # The finite-difference reference solves the fixed point independently, to a certified
        # accuracy (an iterative solver that could stop at max_iter must not be the reference).
        z = certified_fixed_point(W.numpy(), U.numpy(), xx.numpy())
        return float((z * cot.numpy()).sum())

    h = 1e-6
    fd = torch.zeros_like(x)
    for i in range(batch):
        for j in range(p):
            e = torch.zeros_like(x)
            e[i, j] = h
            fd[i, j] = (value(x + e) - value(x - e)) / (2 * h)
    errors = {}
    for mode in ("implicit", "unroll", "phantom", "jfb"):
        xg = x.clone().requires_grad_(True)
        z, _ = implicit_fixed_point(f, torch.zeros(batch, n, dtype=torch.float64), xg, backward=mode, tol=1e-12,
                                    max_iter=500)
        (z * cot).sum().backward()
        errors[mode] = float((xg.grad - fd).abs().max() / fd.abs().max())
    return errors


def _modes_checks(torch, DEQ, EquilibriumCell):
    """gradcheck with defaults, forward mode vs central differences, bfloat16 vs float32."""
    import torch.autograd.forward_ad as fwAD

    out = []
    torch.manual_seed(0)
    layer = DEQ(EquilibriumCell(3, 5, activation="tanh", dtype=torch.float64), state_shape=(5,), tol=1e-12)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    try:
        ok, why = bool(torch.autograd.gradcheck(layer, (x,), check_forward_ad=True)), "passed"
    except Exception as err:  # noqa: BLE001 - the report shows the failure
        ok, why = False, f"{type(err).__name__}: {str(err)[:200]}"
    out.append(Check("torch DEQ passes torch.autograd.gradcheck (default tolerances, forward and reverse mode)",
                     ok, why, {"passed": float(ok)}))
    t = torch.randn(2, 3, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x.detach(), t))).tangent
    with torch.no_grad():
        h = 1e-6
        xd = x.detach()
        fd = (layer(xd + h * t) - layer(xd - h * t)) / (2 * h)
    err = float((tangent - fd).abs().max() / fd.abs().max())
    out.append(Check("torch DEQ forward mode (implicit tangent) matches float64 central differences", err < 1e-6,
                     f"relative max error {err:.1e}", {"error": err}))
    torch.manual_seed(1)
    cell = EquilibriumCell(8, 32, activation="tanh", init_scale=0.6)
    xs = torch.randn(16, 8)
    z32 = DEQ(cell, state_shape=(32,), tol=1e-6)(xs).detach()
    import copy

    low = DEQ(copy.deepcopy(cell), state_shape=(32,), tol=2e-2).to(torch.bfloat16)
    zb = low(xs.to(torch.bfloat16)).detach().float()
    rel = float((zb - z32).abs().max() / z32.abs().max())
    conv = low.last_stats.forward.all_converged
    out.append(Check("bfloat16 DEQ (f in bfloat16, solver in float32) agrees with float32 within bfloat16 resolution",
                     rel < 4e-2 and conv, f"relative max difference {rel:.1e}; converged {conv} at tol 2e-2",
                     {"difference": rel}))
    return out


def _jax_hessian_check():
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from nonsmooth.implicit import deq
    except ImportError as e:
        return Check("jax deq second derivatives match finite differences", True, f"skipped: {e}", {})
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 4))
    W = 0.7 * W / np.linalg.norm(W, 2)
    x = rng.normal(size=(2, 4))

    def solve_np(W):
        z = np.zeros((2, 4))
        for _ in range(5000):
            z = np.tanh(z @ W.T + x)
        return float(np.sum(z ** 2))

    with jax.enable_x64(True):
        layer = deq(lambda p, z, x: jnp.tanh(z @ p.T + x), tol=1e-13, stop="abs", max_iter=500)
        H = np.asarray(jax.jit(jax.hessian(lambda W: jnp.sum(layer(W, jnp.asarray(x)) ** 2)))(jnp.asarray(W)))
    h, errs = 1e-4, []
    for (i, j), (k, m) in (((0, 1), (2, 3)), ((1, 1), (1, 1)), ((3, 0), (0, 2))):
        E1, E2 = np.zeros_like(W), np.zeros_like(W)
        E1[i, j], E2[k, m] = h, h
        fd = (solve_np(W + E1 + E2) - solve_np(W + E1 - E2) - solve_np(W - E1 + E2) + solve_np(W - E1 - E2)) / (4 * h * h)
        errs.append(abs(H[i, j, k, m] - fd) / max(abs(fd), 1e-3))
    err = float(max(errs))
    return Check("jax deq second derivatives (jax.hessian, implicit function theorem applied twice) match float64 "
                 "finite differences", err < 1e-4, f"relative max error {err:.1e} over 3 entries", {"error": err})


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    t0 = time.perf_counter()
    import torch

    from nonsmooth.implicit import (
        DEQ,
        ConvergenceWarning,
        ElementwiseLayer,
        EquilibriumCell,
        ImplicitModel,
        audit_implicit,
        check_invertibility,
        fixed_point,
        implicit_fixed_point,
        implicit_jacobian_set,
    )

    checks, tables, figures = [], [], []

    _say(progress, "implicit: gradients vs float64 finite differences")
    errs = _fd_check(torch, implicit_fixed_point)
    checks.append(Check("implicit and unrolled gradients match float64 finite differences (smooth DEQ)",
                        errs["implicit"] < 1e-6 and errs["unroll"] < 1e-6,
                        f"relative max error: implicit {errs['implicit']:.1e}, unroll {errs['unroll']:.1e}",
                        {k: v for k, v in errs.items()}))
    checks.append(Check("approximate backward modes are visibly approximate (phantom, jfb)",
                        errs["jfb"] > 1e-3 and errs["phantom"] > 1e-6,
                        f"relative max error: phantom {errs['phantom']:.1e}, jfb {errs['jfb']:.1e}",
                        {"phantom": errs["phantom"], "jfb": errs["jfb"]}))

    _say(progress, "implicit: gradcheck, forward mode, bfloat16")
    checks.extend(_modes_checks(torch, DEQ, EquilibriumCell))

    _say(progress, "implicit: audits of a ReLU DEQ")
    torch.manual_seed(0)
    cell = EquilibriumCell(4, 10, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer = DEQ(cell, state_shape=(10,), tol=1e-11)
    audit_rows = []
    a = audit_implicit(layer, x, max_samples=1 if quick else 3)
    verdict = a.to_json()["verdict"]
    checks.append(Check("ReLU DEQ away from kinks: implicit gradient audited SMOOTH", verdict == "SMOOTH", a.reason,
                        {"gap_unroll": max(s["gap_unroll"] for s in a.samples),
                         "gap_fd": max(s["gap_fd"] for s in a.samples)}))
    audit_rows.append(["ReLU DEQ, random inputs, implicit", verdict, a.reason])
    jfb = DEQ(cell, state_shape=(10,), tol=1e-11, backward="jfb")
    aj = audit_implicit(jfb, x, max_samples=1)
    checks.append(Check("Jacobian-free backprop is flagged SPURIOUS by the audit", aj.to_json()["verdict"] == "SPURIOUS",
                        aj.reason, {"set_distance": aj.samples[0]["set_distance"]}))
    audit_rows.append(["ReLU DEQ, jfb backward", aj.to_json()["verdict"], aj.reason])
    with torch.no_grad():
        z = layer(x[:1])
        pre = cell.preactivation(z, x[:1])[0]
        j = int(torch.argmin(pre))
        cell.b[j] -= pre[j]  # an inactive unit moved onto its kink: the fixed point is unchanged
    ak = audit_implicit(layer, x[:1], kink_tol=1e-9)
    s0 = ak.samples[0]
    checks.append(Check("ReLU DEQ on a kink: implicit gradient lies in the exact conservative Jacobian set (CLARKE)",
                        ak.to_json()["verdict"] == "CLARKE", ak.reason,
                        {"active_kinks": s0["n_active_kinks"], "set_distance": s0["set_distance"]}))
    audit_rows.append(["ReLU DEQ, one unit on its kink", ak.to_json()["verdict"], ak.reason])

    _say(progress, "implicit: invertibility verdicts")
    inv_rows = []
    F = lambda y, x: y + torch.abs(y) - x  # noqa: E731
    # full run: certified on the conservative engine's Clarke Jacobian; quick run: sampled Jacobians
    r = check_invertibility(F, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                            use_engine=not quick)
    checks.append(Check("y + |y| - x = 0 at 0 is NOT invertible although AD returns a finite derivative",
                        r.invertible is False and r.ad_sigma_min is not None and r.ad_sigma_min > 0.5
                        and (quick or r.exact), f"{r.method}: {r.reason}",
                        {"sigma_min": r.sigma_min, "ad_sigma_min": r.ad_sigma_min, "certified": r.exact}))
    inv_rows.append(["y + |y| - x at y = 0 (torch callable)", str(r.invertible), r.method, f"{r.sigma_min:.3g}",
                     f"{r.ad_sigma_min:.3g}"])
    lay = ElementwiseLayer([[-1.0]], U=[[0.0]], activation="abs")
    r2 = check_invertibility(lay, [0.0], [0.0])
    checks.append(Check("y - |-y| (same case as a structured layer): certified singular selection",
                        r2.invertible is False and r2.exact, r2.reason, {"attained_at": r2.attained_at}))
    inv_rows.append(["y - |-y| at 0 (structured)", str(r2.invertible), r2.method, f"{r2.sigma_min:.3g}", "-"])
    r3 = check_invertibility(ElementwiseLayer([[2.0]], activation="relu"), [0.0], None)
    checks.append(Check("z - relu(2z) at 0: both vertices invertible, their hull is not -- flagged",
                        r3.invertible is False and r3.method == "determinant sign change", r3.reason,
                        {"sigma_min_vertices": r3.sigma_min}))
    inv_rows.append(["z - relu(2 z) at 0", str(r3.invertible), r3.method, f"{r3.sigma_min:.3g}", "-"])
    S = implicit_jacobian_set(ElementwiseLayer([[0.5]], U=[[1.0]], activation="relu"), [0.0], [0.0])
    vals = sorted(float(M[0, 0]) for M in S.matrices)
    checks.append(Check("z = relu(z/2 + x) at x = 0: implicit Jacobian set has vertices {0, 2} (closed form)",
                        abs(vals[0]) < 1e-12 and abs(vals[1] - 2.0) < 1e-12, f"vertices {vals}", {"vertices": vals}))

    _say(progress, "implicit: El Ghaoui implicit model")
    torch.manual_seed(1)
    model = ImplicitModel(4, 16, 3, kappa=0.9, dtype=torch.float64, tol=1e-10)
    with torch.no_grad():
        model.A.mul_(10.0)
    before = model.pf_eigenvalue()
    model.project_()
    after = model.pf_eigenvalue()
    u = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        xs = model.state(u)
    ri = check_invertibility(model, xs[0], u[0])
    checks.append(Check("implicit model: projection restores lambda_pf(|A|) < 1 and the state equation is invertible",
                        before > 1 > after and ri.invertible is True, ri.reason,
                        {"pf_before": before, "pf_after": after,
                         "inf_norm_after": float(model.A.detach().abs().sum(1).max())}))
    inv_rows.append(["implicit model state (after projection)", str(ri.invertible), ri.method, f"{ri.sigma_min:.3g}",
                     "-"])

    _say(progress, "implicit: failures are reported")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = fixed_point(lambda z: 0.999 * z + 1.0, torch.zeros(2, 1, dtype=torch.float64), method="picard",
                              max_iter=10)
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    try:
        fixed_point(lambda z: 3.0 * z + 1.0, torch.ones(1, 1, dtype=torch.float64), method="picard", max_iter=10 ** 5)
        nan_error = False
    except FloatingPointError:
        nan_error = True
    checks.append(Check("non-convergence warns, divergence to inf raises", warned and nan_error and
                        not info.all_converged, "ConvergenceWarning on a slow map; FloatingPointError on z -> 3z + 1",
                        {"warned": warned, "nan_error": nan_error}))

    _say(progress, "implicit: residual curves")
    width, batch = (64, 16) if quick else (256, 64)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(width, width, generator=g, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    Ux = torch.randn(batch, width, generator=g, dtype=torch.float64)
    series, steps_row = {}, []
    for method in ("picard", "anderson", "broyden"):
        _, info = fixed_point(lambda z: torch.relu(z @ W.T + Ux), torch.zeros(batch, width, dtype=torch.float64),
                              method=method, tol=1e-10, max_iter=200, on_failure="ignore")
        series[method] = [float(v) for v in info.history.max(1)]
        steps_row.append([method, int(info.max_steps), f"{float(info.residual.max()):.2e}",
                          f"{int(info.converged.sum())}/{batch}"])
    length = max(len(v) for v in series.values())
    series = {k: v + [None] * (length - len(v)) for k, v in series.items()}
    figures.append(Figure(title=f"ReLU DEQ residual (max over batch of {batch}), width {width}", kind="line",
                          x=list(range(1, length + 1)), series=series, xlabel="iteration",
                          ylabel="relative residual (max over batch)", logy=True,
                          reference={"tolerance 1e-10": 1e-10},
                          caption="Residual of z = relu(W z + U x) per iteration, ||W||_2 = 0.9; steps to "
                                  "the tolerance: " + ", ".join(f"{r[0]} {r[1]}" for r in steps_row) + "."))
    tables.append(Table("Solver steps to relative tolerance 1e-10 (ReLU DEQ)", ["method", "max steps",
                        "largest residual", "converged"], steps_row))
    tables.append(Table("Audits of implicit layers", ["layer", "verdict", "reason"], audit_rows))
    tables.append(Table("Invertibility (nonsmooth implicit function theorem)",
                        ["equation", "invertible", "method", "smallest singular value", "AD's matrix"], inv_rows))

    if not quick:
        _say(progress, "implicit: jax second derivatives")
        checks.append(_jax_hessian_check())
        _say(progress, "implicit: jax vs torch")
        try:
            import jax
            import numpy as np

            from nonsmooth.implicit import deq

            with jax.enable_x64(True):
                Wn, Un = W[:16, :16].numpy() * 2, Ux[:4, :16].numpy()
                Wt = torch.tensor(Wn, requires_grad=True)
                zt = DEQ(lambda z, x: torch.relu(z @ Wt.T + x), state_shape=(16,), tol=1e-12)(torch.tensor(Un))
                zt.sum().backward()
                layer_j = deq(lambda p, z, x: jax.nn.relu(z @ p.T + x), tol=1e-12)
                gj = jax.grad(lambda p: layer_j(p, jax.numpy.asarray(Un)).sum())(jax.numpy.asarray(Wn))
                err = float(np.abs(np.asarray(gj) - Wt.grad.numpy()).max() / np.abs(Wt.grad.numpy()).max())
            checks.append(Check("jax and torch implicit gradients agree (ReLU DEQ, float64)", err < 1e-8,
                                f"relative max difference {err:.1e}", {"difference": err}))
        except ImportError as e:
            checks.append(Check("jax and torch implicit gradients agree", True, f"skipped: {e}", {}))

    passed = sum(c.passed for c in checks)
    return SuiteResult(
        name="implicit",
        title="Implicit layers: gradients, invertibility, solvers",
        checks=checks,
        tables=tables,
        figures=figures,
        summary=(f"{passed}/{len(checks)} checks passed. Implicit gradients match float64 finite differences to "
                 f"{errs['implicit']:.0e}; y + |y| - x = 0 at 0 is flagged non-invertible although AD returns a finite "
                 "derivative."),
        seconds=time.perf_counter() - t0,
    )


