"""Pool-Adjacent-Violators in Triton: soft sort/rank of CUDA tensors without a host trip.

Imported only for CUDA tensors (and by the tests, under ``TRITON_INTERPRET=1``).  One
program per row runs the sequential PAV stack (O(n) per row, rows in parallel) in
float64, exactly as ``_pav.c`` does, so block partitions and values match the C kernel:

* :func:`soft_forward_l2` -- the whole L2 soft sort / soft rank forward: the sort
  (``torch.sort``, stable: ties lower index first), the sorted coordinates ``y`` taken
  relative to the row's first key (so ties stay tied and pooling is decided on small
  numbers at any ``|x| / eps``, as in the C kernel, which anchors each block), the PAV
  pass, and the output assembly ``w + (y - v)`` (singleton blocks return ``w`` exactly)
  with the closed form for pooled soft-sort blocks when ``n / eps`` dwarfs the values.
  Values agree with the C kernel to rounding (the two anchor differently).  Returns
  ``(out, perm, block)`` for the existing device backward (``_soft_sort_torch``).
* :func:`iso_kl_rows` -- the KL isotonic step alone (block value
  ``logsumexp(s_B) - logsumexp(w_B)``, merges by ``logaddexp``; its exp/log are the
  device's, not libm's, so blocks whose values tie to the last bit may pool differently
  from the C kernel, with the same values to rounding), the building block of
  KL soft sort/rank; how it is assembled into the KL operator follows
  ``_soft_sort_core`` (being changed to the paper's ``exp(P_E(z, log rho))``), so KL
  tensors still take the host path.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _soft_sort_core as _core


def available() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@triton.jit
def _soft_l2_kernel(u_ptr, y_ptr, perm_ptr, resolve_ptr, eps_ptr, out_ptr, blk_ptr,
                    st_ptr, mean_ptr, wt_ptr, n, RANK: tl.constexpr, DESC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    # --- PAV, non-increasing fit of y, in float64 (the C kernel's merge formula)
    top = 0
    for i in range(0, n):
        m = tl.load(y_ptr + base + i).to(tl.float64)
        ww = m * 0.0 + 1.0
        s = i
        prev = tl.load(mean_ptr + base + top - 1, mask=top > 0, other=0.0)
        go = (top > 0) & (prev <= m)
        while go:
            top -= 1
            ma = tl.load(mean_ptr + base + top)
            wa = tl.load(wt_ptr + base + top)
            total = wa + ww
            d = m - ma
            s = tl.load(st_ptr + base + top)
            # m_a + (m_b - m_a) w_b / W; the convex form only when the difference overflows
            m = tl.where(tl.abs(d) == float("inf"), ma * (wa / total) + m * (ww / total),
                         ma + d * (ww / total))
            ww = total
            prev = tl.load(mean_ptr + base + top - 1, mask=top > 0, other=0.0)
            go = (top > 0) & (prev <= m)
        tl.store(st_ptr + base + top, s)
        tl.store(mean_ptr + base + top, m)
        tl.store(wt_ptr + base + top, ww)
        top += 1
    # --- assembly: w + (y - v) in the input's dtype, or the pooled-sort closed form
    resolve = tl.load(resolve_ptr + row) != 0
    eps = tl.load(eps_ptr)
    for k in range(0, top):
        s = tl.load(st_ptr + base + k)
        e = tl.load(st_ptr + base + k + 1, mask=k + 1 < top, other=0)
        e = tl.where(k + 1 < top, e, n)
        y0 = tl.load(y_ptr + base + s)
        vk = tl.load(mean_ptr + base + k).to(y0.dtype)
        L = e - s
        closed = resolve & (L > 1)
        total = tl.load(mean_ptr + base + k) * 0.0
        if closed:
            for j in range(s, e):
                total += tl.load(u_ptr + base + j).to(tl.float64)
        mean_u = total / L.to(tl.float64)
        for j in range(s, e):
            yj = tl.load(y_ptr + base + j)
            if RANK:
                w = (n - j).to(yj.dtype)
            else:
                w = tl.load(u_ptr + base + j)
            r = (yj - vk) + w
            if closed:
                r = (mean_u + ((L - 1).to(tl.float64) / 2.0 - (j - s).to(tl.float64)) / eps
                     ).to(yj.dtype)
            tl.store(blk_ptr + base + j, s.to(tl.int64))
            if RANK:
                tl.store(out_ptr + base + tl.load(perm_ptr + base + j), r)
            else:
                if DESC:
                    tl.store(out_ptr + base + j, r)
                else:
                    tl.store(out_ptr + base + j, -r)


def _check(x2: torch.Tensor, *, op: str, strength: float) -> None:
    """NaN/inf and overflow, with the messages of the host path (host sync only on error)."""
    if x2.numel() == 0:
        return
    finite = torch.isfinite(x2)
    if not bool(finite.all()):
        _core.check_finite_rows(x2.detach().cpu().numpy())  # raises the detailed error
    max_abs = float(x2.detach().abs().max())
    _core.check_scale(max_abs, x2.shape[-1], x2.detach().cpu().numpy().dtype, op=op,
                      strength=strength)


def soft_forward_l2(x: torch.Tensor, *, rank: bool, strength: float, descending: bool):
    """L2 soft rank / soft sort of every row of ``x`` on its device: ``(out, perm, block)``."""
    n = x.shape[-1]
    x2 = x.detach().reshape(-1, n).contiguous()
    op = "rank" if rank else "sort"
    _check(x2, op=op, strength=strength)
    B = x2.shape[0]
    dtype, dev = x2.dtype, x2.device
    a = _core.alpha(op, strength, descending)
    desc = a > 0
    perm = torch.sort(x2, dim=-1, descending=desc, stable=True).indices
    xp = x2.gather(-1, perm)
    u = xp if a == 1.0 else xp * torch.tensor(a, dtype=dtype, device=dev)
    rho = torch.arange(n, 0, -1, dtype=dtype, device=dev)
    # Anchor the keys at the row's first sorted key: PAV is shift-equivariant, y - v does not
    # change, and differences of close keys are exact, so ties stay tied and pooling is
    # decided on the small numbers at any |x| / eps (x / eps - rho would cancel).
    # (in float64: the difference of two float32 keys can overflow float32)
    x64 = xp.to(torch.float64)
    ua = (x64 - x64[:, :1]) * a
    rho64 = rho.to(torch.float64)
    y = (ua - rho64) if rank else (rho64 / strength - ua)
    if not rank and n > 1:
        spread = torch.maximum(u[:, 0].abs(), u[:, -1].abs()).to(torch.float64)
        resolve = (n / strength > 16.0 * spread).to(torch.int32)
    else:
        resolve = torch.zeros(B, dtype=torch.int32, device=dev)
    out = torch.empty_like(x2)
    block = torch.empty((B, n), dtype=torch.int64, device=dev)
    if B:
        st = torch.empty((B, n), dtype=torch.int32, device=dev)
        mean = torch.empty((B, n), dtype=torch.float64, device=dev)
        wt = torch.empty((B, n), dtype=torch.float64, device=dev)
        eps = torch.tensor([strength], dtype=torch.float64, device=dev)
        _soft_l2_kernel[(B,)](u.contiguous(), y.contiguous(), perm, resolve, eps, out, block,
                              st, mean, wt, n, RANK=rank, DESC=desc, enable_fp_fusion=False)
    return out.reshape(x.shape), perm.reshape(x.shape), block.reshape(x.shape)


# ----------------------------------------------------------------------------- KL building block


@triton.jit
def _logaddexp(a, b):
    """max + log1p(exp(-|a - b|)), log1p by log(u) x / (u - 1), u = 1 + x (exact to an ulp)."""
    mx = tl.maximum(a, b)
    x = tl.exp(-tl.abs(a - b))
    u = 1.0 + x
    um1 = tl.where(u == 1.0, 1.0, u - 1.0)
    lp = tl.where(u == 1.0, x, tl.log(u) * x / um1)
    return mx + lp


@triton.jit
def _iso_kl_kernel(y_ptr, w_ptr, v_ptr, blk_ptr, st_ptr, la_ptr, lb_ptr, val_ptr, n):
    """argmin_v sum exp(y - v) + exp(w) v, non-increasing; block value
    logsumexp(y_B) - logsumexp(w_B) (the C kernel's kl, merge for merge)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    top = 0
    for i in range(0, n):
        a = tl.load(y_ptr + base + i).to(tl.float64)
        b = tl.load(w_ptr + base + i).to(tl.float64)
        x = a - b
        s = i
        prev = tl.load(val_ptr + base + top - 1, mask=top > 0, other=0.0)
        go = (top > 0) & (prev <= x)
        while go:
            top -= 1
            s = tl.load(st_ptr + base + top)
            a = _logaddexp(tl.load(la_ptr + base + top), a)
            b = _logaddexp(tl.load(lb_ptr + base + top), b)
            x = a - b
            prev = tl.load(val_ptr + base + top - 1, mask=top > 0, other=0.0)
            go = (top > 0) & (prev <= x)
        tl.store(st_ptr + base + top, s)
        tl.store(la_ptr + base + top, a)
        tl.store(lb_ptr + base + top, b)
        tl.store(val_ptr + base + top, x)
        top += 1
    for k in range(0, top):
        s = tl.load(st_ptr + base + k)
        e = tl.load(st_ptr + base + k + 1, mask=k + 1 < top, other=0)
        e = tl.where(k + 1 < top, e, n)
        vk = tl.load(val_ptr + base + k)
        for j in range(s, e):
            tl.store(v_ptr + base + j, vk.to(v_ptr.dtype.element_ty))
            tl.store(blk_ptr + base + j, s.to(tl.int64))


def iso_kl_rows(y: torch.Tensor, w: torch.Tensor):
    """KL isotonic regression of every row (non-increasing): ``(v, block)`` on y's device."""
    if y.shape != w.shape or y.dtype != w.dtype or y.ndim != 2:
        raise ValueError(f"y and w must be 2-D of one shape and dtype, got {tuple(y.shape)} "
                         f"{y.dtype} and {tuple(w.shape)} {w.dtype}")
    B, n = y.shape
    v = torch.empty_like(y)
    block = torch.empty((B, n), dtype=torch.int64, device=y.device)
    if B and n:
        st = torch.empty((B, n), dtype=torch.int32, device=y.device)
        la = torch.empty((B, n), dtype=torch.float64, device=y.device)
        lb, val = torch.empty_like(la), torch.empty_like(la)
        _iso_kl_kernel[(B,)](y.contiguous(), w.contiguous(), v, block, st, la, lb, val, n,
                             enable_fp_fusion=False)
    return v, block


__all__ = ["available", "iso_kl_rows", "soft_forward_l2"]
