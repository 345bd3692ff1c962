"""Batched fixed-point solvers for torch: Picard, Anderson, limited-memory Broyden, GMRES.

Every sample converges on its own residual: once a sample meets the tolerance it is frozen
(its iterate stops changing) and the loop ends when no sample is left.  The code is written
out-of-place (``torch.where``, no in-place writes) so the same loop can be differentiated
for ``backward="unroll"``.

States may be one tensor or a tuple/list of tensors (``StatePacking``): the solvers work on
one ``(batch, n)`` tensor in a *working dtype* -- the widest of the states' dtypes, and at
least float32, so bfloat16/float16 states are iterated, mixed and measured in float32
while ``f`` itself still sees (and computes in) the state's own dtype.
"""
from __future__ import annotations

import numpy as np
import torch

from ._info import SolveInfo
from ._options import SolverOptions

_LOW = (torch.float16, torch.bfloat16)


def to_numpy(t) -> np.ndarray:
    """A tensor's values as NumPy, also for tensors wrapped by ``torch.func`` transforms
    (which have no data pointer to hand to ``.numpy()``)."""
    t = t.detach()
    try:
        return t.cpu().numpy()
    except (RuntimeError, TypeError):
        return np.asarray(t.cpu().tolist())


def no_forward_ad():
    """Context that stops forward-mode AD from tangent-tracing the solver's iterations (the
    implicit layer supplies its own tangent rule)."""
    import torch.autograd.forward_ad as fwAD

    setter = getattr(fwAD, "_set_fwd_grad_enabled", None)
    if setter is None:  # pragma: no cover - older torch: the tangents are dropped by detach() instead
        import contextlib

        return contextlib.nullcontext()
    return setter(False)


_VMAP = ("{name} is batched by torch.func.vmap (or jacfwd/jacrev/hessian, which vmap): the solvers stop each "
         "sample on its own residual, which vmap cannot trace. The layers are batched already (leading axis); "
         "for Jacobians use torch.autograd.functional.jacobian (vectorize=False), loop torch.func.vjp/jvp over "
         "basis vectors, or use the jax layer (nonsmooth.implicit.deq), which composes with vmap.")


def _check_leaf(z, name):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a tuple of them); got {type(z).__name__}")
    if not torch.is_floating_point(z):
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64); got {z.dtype}")
    if z.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(z.shape)}); a fixed point needs at least one entry")
    if _is_vmapped(z):
        raise ValueError(_VMAP.format(name=name))
    if not bool(torch.isfinite(z.detach()).all()):
        flat = torch.flatten(z.detach())
        bad = flat[~torch.isfinite(flat)][:3].tolist()
        raise ValueError(f"{name} contains NaN/inf (e.g. {bad}); start the solve from finite values")


def _is_vmapped(t) -> bool:
    if torch.compiler.is_compiling():  # compiled graphs hold no functorch wrappers to look through
        return False
    try:
        from torch._C._functorch import is_batchedtensor, get_unwrapped, is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover
        return False
    while True:
        if is_batchedtensor(t):
            return True
        if not is_functorch_wrapped_tensor(t):
            return False
        t = get_unwrapped(t)


class StatePacking:
    """One tensor or a tuple/list of tensors <-> one ``(batch, n)`` tensor in the working dtype.

    Batched (``batched=None``: every leaf has ``ndim >= 2``): the leading axis indexes samples
    and must agree across leaves; each sample is one row.  Unbatched: one row in all.
    """

    def __init__(self, z0, batched=None, name: str = "z0"):
        self.is_tuple = isinstance(z0, (tuple, list))
        self.container = type(z0) if self.is_tuple else None
        leaves = list(z0) if self.is_tuple else [z0]
        if not leaves:
            raise ValueError(f"{name} is an empty {type(z0).__name__}; give a tensor or a tuple of tensors")
        for i, leaf in enumerate(leaves):
            _check_leaf(leaf, f"{name}[{i}]" if self.is_tuple else name)
        if len({leaf.device for leaf in leaves}) > 1:
            raise ValueError(f"{name}: all state tensors must be on one device; got "
                             f"{[str(leaf.device) for leaf in leaves]}")
        if batched is None:
            batched = all(leaf.ndim >= 2 for leaf in leaves)
        if batched:
            if any(leaf.ndim < 1 for leaf in leaves):
                raise ValueError(f"{name}: batched=True needs a leading batch axis on every state tensor; got "
                                 f"shapes {[tuple(leaf.shape) for leaf in leaves]}")
            sizes = {leaf.shape[0] for leaf in leaves}
            if len(sizes) > 1:
                raise ValueError(f"{name}: the state tensors disagree on the batch size (leading axis): "
                                 f"{[tuple(leaf.shape) for leaf in leaves]}")
        self.batched = bool(batched)
        self.batch = leaves[0].shape[0] if self.batched else 1
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [leaf.numel() // self.batch for leaf in leaves]
        work = self.dtypes[0]
        for dt in self.dtypes[1:]:
            work = torch.promote_types(work, dt)
        self.dtype = torch.float32 if work in _LOW else work
        self.device = leaves[0].device
        self.state_dtype = ",".join(sorted({str(dt).replace("torch.", "") for dt in self.dtypes}))
        self.name = name

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def leaves(self, z):
        return list(z) if self.is_tuple else [z]

    def pack(self, z, what: str = "f"):
        """Flatten a state (or ``f``'s output, checked against the state's structure)."""
        if self.is_tuple:
            if not isinstance(z, (tuple, list)) or len(z) != len(self.shapes):
                raise TypeError(f"{what} must return a tuple of {len(self.shapes)} tensors like {self.name}; got "
                                f"{type(z).__name__}" + (f" of length {len(z)}" if isinstance(z, (tuple, list)) else ""))
            parts = list(z)
        else:
            parts = [z]
        flat = []
        for i, (part, shape) in enumerate(zip(parts, self.shapes)):
            label = f"{what}[{i}]" if self.is_tuple else what
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"{label} must return a torch.Tensor shaped like {self.name} {shape}; got "
                                f"{type(part).__name__}")
            if tuple(part.shape) != shape:
                raise ValueError(f"{label} must return the shape of {self.name} {shape}; got {tuple(part.shape)}")
            flat.append(part.reshape(self.batch, -1).to(self.dtype))
        return flat[0] if len(flat) == 1 else torch.cat(flat, 1)

    def unpack(self, flat):
        """The state (each tensor in its own dtype and shape) from its ``(batch, n)`` form."""
        if len(self.shapes) == 1:
            out = [flat.reshape(self.shapes[0]).to(self.dtypes[0])]
        else:
            out = [part.reshape(shape).to(dt) for part, shape, dt in
                   zip(torch.split(flat, self.sizes, 1), self.shapes, self.dtypes)]
        return self.container(out) if self.is_tuple else out[0]

    def wrap(self, f):
        """``f`` on states -> a map on ``(batch, n)`` tensors."""
        return lambda flat: self.pack(f(self.unpack(flat)))


def check_state(z0, name: str = "z0", batched=None) -> StatePacking:
    return StatePacking(z0, batched, name)


def solve(f, z0, opts: SolverOptions, *, batched=None, what: str = "fixed_point", state_name: str = "z0",
          trajectory: tuple = ()):
    """Iterate ``z <- f(z)`` on a state (tensor or tuple of tensors); returns ``(z, SolveInfo)``
    with ``z`` and ``info.trajectory`` in the state's structure."""
    pk = StatePacking(z0, batched, state_name)
    z, info = solve_flat(pk.wrap(f), pk.pack(z0, state_name), opts, what=what, trajectory=trajectory,
                         state_dtype=pk.state_dtype)
    if trajectory:
        info = _replace(info, trajectory=tuple(pk.unpack(s) for s in info.trajectory))
    return pk.unpack(z), info


def _replace(info, **changes):
    import dataclasses

    return dataclasses.replace(info, **changes)


def solve_flat(fmap, z, opts: SolverOptions, *, what: str = "fixed_point", trajectory: tuple = (),
               state_dtype: str = ""):
    """Iterate ``z <- fmap(z)`` on ``(batch, n)`` tensors until each row's residual meets ``opts.tol``.

    Returns ``(z, SolveInfo)`` without applying ``opts.on_failure`` (callers do).  Runs under
    whatever grad mode the caller set, so it can be differentiated (unroll).
    ``trajectory``: iteration numbers whose iterates are recorded (detached) in the info.
    """
    batch = z.shape[0]
    dtype = z.dtype
    tiny = torch.finfo(dtype).tiny
    device = z.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_res = torch.full((batch,), float("inf"), dtype=dtype, device=device)
    best_z = z
    fin_res = torch.full((batch,), float("nan"), dtype=dtype, device=device)
    fin_abs = fin_res
    fin_rel = fin_res
    history = []  # (3, batch) per step: stopping, absolute and relative residual
    recorded = {}
    want = set(trajectory)
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

    beta = opts.beta
    stop_rel = opts.stop == "rel"
    eye_cache = {}
    for k in range(opts.max_iter):
        fz = fmap(z)
        g = fz - z
        absr = torch.linalg.vector_norm(g, dim=1)
        fzn = torch.linalg.vector_norm(fz, dim=1)
        # z is finite, so a NaN/inf anywhere in f(z) shows in |f(z) - z|: one small check per step
        if not bool(torch.isfinite(absr).all()):
            finite = torch.isfinite(absr)
            bad = torch.flatten(torch.nonzero(~finite)).tolist()
            last = fin_res[bad[0]].item() if k else float("nan")
            raise FloatingPointError(
                f"{what}: f returned NaN/inf at iteration {k + 1} for sample(s) {bad[:8]} "
                f"(last finite residual {last:.3g}). The iteration is diverging or f is undefined there: "
                "lower beta (damping), use method='picard', or check that the map is a contraction."
            )
        rel = absr / (fzn + tiny)
        res = rel if stop_rel else absr
        fin_res = torch.where(active, res, fin_res)
        fin_abs = torch.where(active, absr, fin_abs)
        fin_rel = torch.where(active, rel, fin_rel)
        history.append(torch.stack((fin_res, fin_abs, fin_rel)).detach())
        improved = active & (res < best_res)
        best_res = torch.where(improved, res, best_res)
        best_z = torch.where(improved[:, None], fz, best_z)
        done = active & ((res <= opts.tol) | (absr <= opts.atol)) if opts.atol > 0 else active & (res <= opts.tol)
        steps = torch.where(active, k + 1, steps)
        active = active & ~done
        if not bool(active.any()):
            z = torch.where(done[:, None], fz, z)
            break

        if opts.method == "picard":
            z_next = fz if beta == 1.0 else z + beta * g
        elif opts.method == "anderson":
            if z_prev is not None:
                hist_dg.append(g - g_prev)
                hist_dx.append(z - z_prev)
                if len(hist_dg) > opts.m:
                    hist_dg.pop(0)
                    hist_dx.pop(0)
            z_prev, g_prev = z, g
            picard = fz if beta == 1.0 else z + beta * g
            if not hist_dg:
                z_next = picard
            else:
                dG = torch.stack(hist_dg, 1)
                dX = torch.stack(hist_dx, 1)
                # Normal equations of min |g - dG^T gamma| in float64 (h x h, h <= m); the
                # Tikhonov term is scaled to the residual differences, so it neither
                # vanishes nor dominates as the residuals shrink.
                gram = torch.bmm(dG, dG.transpose(1, 2))
                rhs = torch.bmm(dG, g.unsqueeze(-1))
                if dtype != torch.float64:
                    gram, rhs = gram.double(), rhs.double()
                h = gram.shape[-1]
                eye = eye_cache.get(h)
                if eye is None:
                    eye = eye_cache[h] = torch.eye(h, dtype=torch.float64, device=device)
                scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1)
                gram = torch.addcmul(gram, (opts.lam * scale + 1e-300)[:, None, None], eye)
                gamma = torch.linalg.solve(gram, rhs)
                if dtype != torch.float64:
                    gamma = gamma.to(dtype)
                step = torch.bmm((dX + dG if beta == 1.0 else dX + beta * dG).transpose(1, 2), gamma).squeeze(-1)
                # a singular mixing system gives NaN gamma: fall back to the plain step for that row
                z_next = torch.where(torch.isfinite(gamma).all(1), picard - step, picard)
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
        if k + 1 in want:
            recorded[k + 1] = z.detach()

    converged = ~active
    z = torch.where(active[:, None], best_z, z)
    traj = tuple(recorded.get(s, z.detach()) for s in trajectory)
    hist = to_numpy(torch.stack(history))
    info = SolveInfo(
        method=opts.method,
        stop=opts.stop,
        tol=float(opts.tol),
        converged=to_numpy(converged),
        steps=to_numpy(steps),
        residual=to_numpy(fin_res),
        rel_residual=to_numpy(fin_rel),
        abs_residual=to_numpy(fin_abs),
        history=hist[:, 0],
        best_returned=to_numpy(active),
        nonfinite=False,
        abs_history=hist[:, 1],
        rel_history=hist[:, 2],
        trajectory=traj,
        trajectory_steps=tuple(trajectory),
        state_dtype=state_dtype,
    )
    return z, info


def gmres(matvec, b, *, tol: float, max_iter: int, stop: str = "rel"):
    """Solve ``matvec(u) = b`` per row of the ``(batch, n)`` tensor ``b`` by GMRES (no restart,
    modified Gram-Schmidt).  ``matvec`` must act on each row separately.  Returns
    ``(u, SolveInfo)``; the relative residual is ``|b - A u| / |b|``.
    """
    batch, n = b.shape
    dtype = b.dtype
    bnorm = torch.linalg.vector_norm(b, dim=1)
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    basis = [b / safe[:, None]]
    cols = []  # Hessenberg columns, built out of place (works on tensors wrapped by torch.func)
    history = []
    y = torch.zeros(batch, 0, dtype=torch.float64, device=b.device)
    steps = torch.zeros(batch, dtype=torch.long, device=b.device)
    limit = min(max_iter, n)
    k_used = 0
    for k in range(limit):
        w = matvec(basis[k])
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError(f"gmres: the operator returned NaN/inf at iteration {k + 1}")
        hcol = []
        for j in range(k + 1):
            h = (w * basis[j]).sum(1)
            hcol.append(h.double())
            w = w - h[:, None] * basis[j]
        hn = torch.linalg.vector_norm(w, dim=1)
        hcol.append(hn.double())
        cols.append(torch.stack(hcol, 1))
        basis.append(w / torch.where(hn > 0, hn, torch.ones_like(hn))[:, None])
        e1 = torch.cat([bnorm.double()[:, None, None],
                        torch.zeros(batch, k + 1, 1, dtype=torch.float64, device=b.device)], 1)
        H = torch.stack([torch.nn.functional.pad(c, (0, k + 2 - c.shape[1])) for c in cols], 2)
        y = _lstsq(H, e1)
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
    true_res = torch.linalg.vector_norm(b - matvec(u), dim=1)
    rel = true_res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    final = rel if stop == "rel" else true_res
    converged = final <= tol
    steps = steps.clamp(min=1, max=k_used)
    hist = torch.stack(history) if history else torch.zeros((0, batch), dtype=dtype)
    info = SolveInfo(
        method="gmres",
        stop=stop,
        tol=float(tol),
        converged=to_numpy(converged),
        steps=to_numpy(steps),
        residual=to_numpy(final),
        rel_residual=to_numpy(rel),
        abs_residual=to_numpy(true_res),
        history=to_numpy(hist),
        best_returned=np.zeros(batch, dtype=bool),
        nonfinite=False,
    )
    return u, info


def _lstsq(H, e1):
    """Least squares for the small Hessenberg systems, on the CPU (batched lstsq is CPU-only
    for some drivers) and through QR, which also works on tensors wrapped by torch.func."""
    Q, R = torch.linalg.qr(H.cpu())
    rhs = Q.transpose(1, 2) @ e1.cpu()
    diag = torch.diagonal(R, dim1=1, dim2=2)
    # a breakdown (zero pivot) means the Krylov space is exhausted: the remaining components are 0
    safe = torch.where(diag.abs() > 0, diag, torch.ones_like(diag))
    R = R - torch.diag_embed(diag) + torch.diag_embed(safe)
    y = torch.linalg.solve_triangular(R, rhs, upper=True)
    return y.to(H.device)
