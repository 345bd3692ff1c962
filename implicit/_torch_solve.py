"""Batched fixed-point solvers for torch: Picard, Anderson, limited-memory Broyden, GMRES.

Every sample converges on its own residual: once a sample meets the tolerance it is frozen
(its iterate stops changing) and the loop ends when no sample is left.  The code is written
out-of-place (``torch.where``, no in-place writes) so the same loop can be differentiated
for ``backward="unroll"``.
"""
from __future__ import annotations

import numpy as np
import torch

from ._info import SolveInfo
from ._options import SolverOptions


def check_state(z0, name: str = "z0") -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(z0).__name__}")
    if not torch.is_floating_point(z0):
        raise TypeError(f"{name} must have a floating dtype (float32/float64); got {z0.dtype}")
    if z0.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(z0.shape)}); a fixed point needs at least one entry")
    if not bool(torch.isfinite(z0).all()):
        bad = torch.flatten(z0.detach())[~torch.isfinite(torch.flatten(z0.detach()))][:3].tolist()
        raise ValueError(f"{name} contains NaN/inf (e.g. {bad}); start the solve from finite values")


def _layout(z0, batched):
    if batched is None:
        batched = z0.ndim >= 2
    batch = z0.shape[0] if batched else 1
    return batched, batch


def solve(f, z0, opts: SolverOptions, *, batched=None, what: str = "fixed_point",
          state_name: str = "z0"):
    """Iterate ``z <- f(z)`` with ``opts.method`` until each sample's residual meets ``opts.tol``.

    Returns ``(z, SolveInfo)`` without applying ``opts.on_failure`` (callers do).  Runs under
    whatever grad mode the caller set, so it can be differentiated (unroll).
    """
    check_state(z0, state_name)
    batched, batch = _layout(z0, batched)
    shape = z0.shape
    dtype = z0.dtype
    tiny = torch.finfo(dtype).tiny

    def fmap(zf):
        out = f(zf.reshape(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor shaped like z0 {tuple(shape)}; got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"f must return the shape of z0 {tuple(shape)}; got {tuple(out.shape)}")
        return out.reshape(batch, -1).to(dtype)

    z = z0.reshape(batch, -1)
    device = z.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_res = torch.full((batch,), float("inf"), dtype=dtype, device=device)
    best_z = z
    fin_res = torch.full((batch,), float("nan"), dtype=dtype, device=device)
    fin_abs = fin_res
    fin_rel = fin_res
    history = []
    hist_dg, hist_dx, hist_u, hist_v = [], [], [], []
    z_prev = g_prev = None
    mem = opts.broyden_memory

    def apply_h(x):  # Broyden's inverse-Jacobian estimate, H0 = -beta I
        out = -opts.beta * x
        for u, v in zip(hist_u, hist_v):
            out = out + u * (v * x).sum(1, keepdim=True)
        return out

    def apply_ht(x):
        out = -opts.beta * x
        for u, v in zip(hist_u, hist_v):
            out = out + v * (u * x).sum(1, keepdim=True)
        return out

    for k in range(opts.max_iter):
        fz = fmap(z)
        finite = torch.isfinite(fz).all(1)
        if not bool(finite.all()):
            bad = torch.flatten(torch.nonzero(~finite)).tolist()
            last = fin_res[bad[0]].item() if k else float("nan")
            raise FloatingPointError(
                f"{what}: f returned NaN/inf at iteration {k + 1} for sample(s) {bad[:8]} "
                f"(last finite residual {last:.3g}). The iteration is diverging or f is undefined there: "
                "lower beta (damping), use method='picard', or check that the map is a contraction."
            )
        g = fz - z
        absr = torch.linalg.vector_norm(g, dim=1)
        rel = absr / (torch.linalg.vector_norm(fz, dim=1) + tiny)
        res = rel if opts.stop == "rel" else absr
        fin_res = torch.where(active, res, fin_res)
        fin_abs = torch.where(active, absr, fin_abs)
        fin_rel = torch.where(active, rel, fin_rel)
        history.append(fin_res.detach())
        improved = active & (res < best_res)
        best_res = torch.where(improved, res, best_res)
        best_z = torch.where(improved[:, None], fz, best_z)
        done = active & ((res <= opts.tol) | (absr <= opts.atol))
        steps = torch.where(active, torch.full_like(steps, k + 1), steps)
        active = active & ~done
        if not bool(active.any()):
            z = torch.where(done[:, None], fz, z)
            break

        if opts.method == "picard":
            z_next = z + opts.beta * g
        elif opts.method == "anderson":
            if z_prev is not None:
                hist_dg.append(g - g_prev)
                hist_dx.append(z - z_prev)
                if len(hist_dg) > opts.m:
                    hist_dg.pop(0)
                    hist_dx.pop(0)
            z_prev, g_prev = z, g
            if not hist_dg:
                z_next = z + opts.beta * g
            else:
                dG = torch.stack(hist_dg, 1)
                dX = torch.stack(hist_dx, 1)
                # Normal equations of min |g - dG^T gamma| in float64 (h x h, h <= m); the
                # Tikhonov term is scaled to the residual differences, so it neither
                # vanishes nor dominates as the residuals shrink.
                gram = (dG @ dG.transpose(1, 2)).double()
                rhs = (dG @ g.unsqueeze(-1)).double()
                scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1)
                eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=device)
                gram = gram + (opts.lam * scale + 1e-300)[:, None, None] * eye
                gamma = torch.linalg.solve(gram, rhs).to(dtype)
                z_next = z + opts.beta * g - ((dX + opts.beta * dG).transpose(1, 2) @ gamma).squeeze(-1)
                ok = torch.isfinite(z_next).all(1, keepdim=True)
                z_next = torch.where(ok, z_next, z + opts.beta * g)
        else:  # broyden
            if z_prev is not None:
                s = z - z_prev
                y = g - g_prev
                hy = apply_h(y)
                denom = (s * hy).sum(1, keepdim=True)
                scale = torch.linalg.vector_norm(s, dim=1, keepdim=True) * torch.linalg.vector_norm(hy, dim=1, keepdim=True)
                ok = denom.abs() > 1e-12 * scale + tiny
                u = torch.where(ok, (s - hy) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(s))
                v = apply_ht(s)
                hist_u.append(u)
                hist_v.append(v)
                if len(hist_u) > mem:
                    hist_u.pop(0)
                    hist_v.pop(0)
            z_prev, g_prev = z, g
            z_next = z - apply_h(g)
            ok = torch.isfinite(z_next).all(1, keepdim=True)
            z_next = torch.where(ok, z_next, z + opts.beta * g)
        z = torch.where(active[:, None], z_next, torch.where(done[:, None], fz, z))

    converged = ~active
    z = torch.where(active[:, None], best_z, z)
    info = SolveInfo(
        method=opts.method,
        stop=opts.stop,
        tol=float(opts.tol),
        converged=converged.cpu().numpy(),
        steps=steps.cpu().numpy(),
        residual=fin_res.detach().cpu().numpy(),
        rel_residual=fin_rel.detach().cpu().numpy(),
        abs_residual=fin_abs.detach().cpu().numpy(),
        history=torch.stack(history).cpu().numpy(),
        best_returned=active.cpu().numpy(),
        nonfinite=False,
    )
    return z.reshape(shape), info


def gmres(matvec, rhs, *, tol: float, max_iter: int, stop: str = "rel", batched=None):
    """Solve ``matvec(u) = rhs`` per sample by GMRES (no restart, modified Gram-Schmidt).

    ``matvec`` must act on each sample separately.  Returns ``(u, SolveInfo)``; the relative
    residual is ``|rhs - A u| / |rhs|``.
    """
    batched, batch = _layout(rhs, batched)
    shape = rhs.shape
    dtype = rhs.dtype
    b = rhs.reshape(batch, -1)
    n = b.shape[1]
    bnorm = torch.linalg.vector_norm(b, dim=1)
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    basis = [b / safe[:, None]]
    hess = torch.zeros(batch, max_iter + 1, max_iter, dtype=torch.float64, device=b.device)
    history = []
    y = torch.zeros(batch, 0, dtype=torch.float64, device=b.device)
    steps = torch.zeros(batch, dtype=torch.long, device=b.device)
    res_abs = bnorm.double()
    limit = min(max_iter, n)
    k_used = 0
    for k in range(limit):
        w = matvec(basis[k].reshape(shape)).reshape(batch, -1)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError(f"gmres: the operator returned NaN/inf at iteration {k + 1}")
        for j in range(k + 1):
            h = (w * basis[j]).sum(1)
            hess[:, j, k] = h.double()
            w = w - h[:, None] * basis[j]
        hn = torch.linalg.vector_norm(w, dim=1)
        hess[:, k + 1, k] = hn.double()
        basis.append(w / torch.where(hn > 0, hn, torch.ones_like(hn))[:, None])
        e1 = torch.zeros(batch, k + 2, 1, dtype=torch.float64, device=b.device)
        e1[:, 0, 0] = bnorm.double()
        H = hess[:, : k + 2, : k + 1]
        y = torch.linalg.lstsq(H.cpu(), e1.cpu()).solution.to(b.device)
        res_abs = torch.linalg.vector_norm(e1 - H @ y, dim=(1, 2))
        res = res_abs / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)).double() if stop == "rel" else res_abs
        history.append(res.to(dtype))
        # aim below tol so the true residual, recomputed below, also meets it
        steps = torch.where(res > 0.5 * tol, torch.full_like(steps, k + 2), steps)
        k_used = k + 1
        if bool((res <= 0.5 * tol).all()) or bool((hn == 0).all()):
            break
    V = torch.stack(basis[:k_used], 1)  # (batch, k, n)
    u = (V.transpose(1, 2) @ y.to(dtype)).squeeze(-1) if k_used else torch.zeros_like(b)
    true_res = torch.linalg.vector_norm(b - matvec(u.reshape(shape)).reshape(batch, -1), dim=1)
    rel = true_res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    final = rel if stop == "rel" else true_res
    converged = final <= tol
    steps = steps.clamp(min=1, max=k_used)
    info = SolveInfo(
        method="gmres",
        stop=stop,
        tol=float(tol),
        converged=converged.cpu().numpy(),
        steps=steps.cpu().numpy(),
        residual=final.detach().cpu().numpy(),
        rel_residual=rel.detach().cpu().numpy(),
        abs_residual=true_res.detach().cpu().numpy(),
        history=torch.stack(history).cpu().numpy() if history else np.zeros((0, batch)),
        best_returned=np.zeros(batch, dtype=bool),
        nonfinite=False,
    )
    return u.reshape(shape), info
