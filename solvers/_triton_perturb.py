"""Triton kernels of the fused perturbed layers (CUDA tensors; the CPU runs the C kernel).

Imported only for CUDA tensors (and by the tests, under ``TRITON_INTERPRET=1``), so a
CPU-only install never imports triton.  The contract is the C kernel's
(``_perturb_kernels.c``): the same Philox-4x32-10 counters (``tl.philox`` is that
generator, word for word), the same uniforms, the same polynomial log / exp / sin / cos
written with the same IEEE operations (``div_rn``/``sqrt_rn`` in float32, kernels launched
with ``enable_fp_fusion=False`` so no multiply-add is contracted; the interpreter runs
them as numpy does), the same Gumbel ratio scores and the same tie rules, so the same
key gives the same samples, bit for bit, and the same solver outputs.  Sums over samples
are taken in another order than on the CPU (per program, then over programs), so means
of integer outputs agree exactly and float sums to rounding.

One program per (row, chunk of samples): the row's theta stays in registers and each
sample's noise is generated, scored, solved and accumulated without leaving them;
memory is O(chunks x B x d).  Forward (mean, value) and the score-function vjp.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SOLVER_CODE = {"argmax": 0, "topk": 1, "rank": 2, "sortperm": 3}
_RATIO_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def available() -> bool:
    """True when the kernels can run: a CUDA device, or the interpreter."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


# ----------------------------------------------------------------------------- math


@triton.jit
def _div(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a):
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _uniform(w, F64: tl.constexpr):
    """Philox word -> U in (0, 1), exactly as the C kernel."""
    if F64:
        x = (w ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.float64)
        return (x + 2147483648.5) * 2.3283064365386963e-10  # 2^-32
    else:
        return ((w >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23


@triton.jit
def _vlog(x):
    """log x for positive normal x: the C kernel's vlog_f32 / vlog_f64, operation for operation."""
    if x.dtype == tl.float64:
        ix = x.to(tl.uint64, bitcast=True)
        t = (ix - 0x3FE6A09E667F3BCD).to(tl.int64, bitcast=True)
        e = t >> 52
        m = (ix - (e.to(tl.uint64, bitcast=True) << 52)).to(tl.float64, bitcast=True)
        ed = (e.to(tl.uint64, bitcast=True) + 0x4338000000000000).to(tl.float64, bitcast=True)
        ed = ed - 6755399441055744.0
        f = m - 1.0
        s = f / (2.0 + f)
        z = s * s
        R = z * 0.0 + 2.0 / 19.0
        R = R * z + 2.0 / 17.0
        R = R * z + 2.0 / 15.0
        R = R * z + 2.0 / 13.0
        R = R * z + 2.0 / 11.0
        R = R * z + 2.0 / 9.0
        R = R * z + 2.0 / 7.0
        R = R * z + 2.0 / 5.0
        R = R * z + 2.0 / 3.0
        R = R * z
        hfsq = 0.5 * f * f
        return ed * 6.93147180369123816490e-01 - (
            (hfsq - (s * (hfsq + R) + ed * 1.90821492927058770002e-10)) - f)
    else:
        ix = x.to(tl.uint32, bitcast=True)
        t = (ix - 0x3F3504F3).to(tl.int32, bitcast=True)
        e = t >> 23
        m = (ix - (e.to(tl.uint32, bitcast=True) << 23)).to(tl.float32, bitcast=True)
        ef = e.to(tl.float32)
        f = m - 1.0
        s = tl.div_rn(f, 2.0 + f)
        z = s * s
        R = z * 0.0 + 0.2222222238779068  # float32(2/9)
        R = R * z + 0.2857142984867096  # float32(2/7)
        R = R * z + 0.4000000059604645  # float32(2/5)
        R = R * z + 0.6666666865348816  # float32(2/3)
        R = R * z
        hfsq = 0.5 * f * f
        return ef * 0.693145751953125 - ((hfsq - (s * (hfsq + R) + ef * 1.428606765330187e-06)) - f)


@triton.jit
def _vexp(x):
    """exp x for 0 <= x <= 600 (float32: 60): the C kernel's vexp, operation for operation."""
    if x.dtype == tl.float64:
        kd = x * 1.4426950408889634074 + 6755399441055744.0
        ki = kd.to(tl.uint64, bitcast=True)
        kd = kd - 6755399441055744.0
        r = (x - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10
        q = r * 0.0 + 1.0 / 6227020800.0
        q = q * r + 1.0 / 479001600.0
        q = q * r + 1.0 / 39916800.0
        q = q * r + 1.0 / 3628800.0
        q = q * r + 1.0 / 362880.0
        q = q * r + 1.0 / 40320.0
        q = q * r + 1.0 / 5040.0
        q = q * r + 1.0 / 720.0
        q = q * r + 1.0 / 120.0
        q = q * r + 1.0 / 24.0
        q = q * r + 1.0 / 6.0
        q = q * r + 0.5
        q = q * r + 1.0
        q = q * r + 1.0
        scale = ((ki + 1023) << 52).to(tl.float64, bitcast=True)
        return q * scale
    else:
        kd = x * 1.4426950408889634 + 12582912.0
        ki = kd.to(tl.uint32, bitcast=True)
        kd = kd - 12582912.0
        r = (x - kd * 0.693145751953125) - kd * 1.428606765330187e-06
        q = r * 0.0 + 0.00019841270113829523  # float32(1/5040)
        q = q * r + 0.0013888889225199819  # float32(1/720)
        q = q * r + 0.008333333767950535  # float32(1/120)
        q = q * r + 0.0416666679084301  # float32(1/24)
        q = q * r + 0.1666666716337204  # float32(1/6)
        q = q * r + 0.5
        q = q * r + 1.0
        q = q * r + 1.0
        scale = ((ki + 127) << 23).to(tl.float32, bitcast=True)
        return q * scale


@triton.jit
def _sincos(w, F64: tl.constexpr):
    """cos, sin of 2 pi (w + 1/2) / 2^32 (float32: from the top 24 bits), as the C kernel."""
    if F64:
        t = w + 0x20000000
        q = t >> 30
        rem = (t & 0x3FFFFFFF).to(tl.int32) - 0x20000000
        a = ((rem.to(tl.float64) + 0.5) * 9.313225746154785e-10) * 1.5707963267948966
        a2 = a * a
        sn = a2 * 0.0 + 1.0 / 355687428096000.0
        sn = -sn * a2 + 1.0 / 1307674368000.0
        sn = sn * a2 - 1.0 / 6227020800.0
        sn = sn * a2 + 1.0 / 39916800.0
        sn = sn * a2 - 1.0 / 362880.0
        sn = sn * a2 + 1.0 / 5040.0
        sn = sn * a2 - 1.0 / 120.0
        sn = sn * a2 + 1.0 / 6.0
        sn = a - a * a2 * sn
        cs = a2 * 0.0 + 1.0 / 6402373705728000.0
        cs = -cs * a2 + 1.0 / 20922789888000.0
        cs = cs * a2 - 1.0 / 87178291200.0
        cs = cs * a2 + 1.0 / 479001600.0
        cs = cs * a2 - 1.0 / 3628800.0
        cs = cs * a2 + 1.0 / 40320.0
        cs = cs * a2 - 1.0 / 720.0
        cs = cs * a2 + 1.0 / 24.0
        cs = cs * a2 - 0.5
        cs = 1.0 + a2 * cs
    else:
        t = ((w >> 8) + 0x200000) & 0xFFFFFF
        q = t >> 22
        rem = (t & 0x3FFFFF).to(tl.int32) - 0x200000
        a = ((rem.to(tl.float32) + 0.5) * 2.384185791015625e-07) * 1.5707963267948966
        a2 = a * a
        sn = a2 * 0.0 + 2.7557318844628753e-06  # float32(1/9!)
        sn = -sn * a2 + 0.00019841270113829523
        sn = sn * a2 - 0.008333333767950535
        sn = sn * a2 + 0.1666666716337204
        sn = a - a * a2 * sn
        cs = a2 * 0.0 + 2.755731998149713e-07  # float32(1/10!)
        cs = -cs * a2 + 2.4801587642286904e-05
        cs = cs * a2 - 0.0013888889225199819
        cs = cs * a2 + 0.0416666679084301
        cs = cs * a2 - 0.5
        cs = 1.0 + a2 * cs
    odd = (q & 1) != 0
    c = tl.where(odd, sn, cs)
    s = tl.where(odd, cs, sn)
    c = tl.where(((q + 1) & 2) != 0, -c, c)
    s = tl.where((q & 2) != 0, -s, s)
    return c, s


@triton.jit
def _words(seed, row, i, BLOCK_D: tl.constexpr):
    """Philox words of sample i, row `row`, columns 0 .. BLOCK_D - 1: word j % 4 of the
    counter (j // 4, row, i, 0)."""
    g = tl.arange(0, BLOCK_D // 4).to(tl.uint32)
    c1 = (g * 0 + row).to(tl.uint32)
    c2 = (g * 0 + i).to(tl.uint32)
    c3 = g * 0
    w0, w1, w2, w3 = tl.philox(seed, g, c1, c2, c3)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_D,))


@triton.jit
def _noise(w, GUMBEL: tl.constexpr, NEED_Z: tl.constexpr, F64: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """(E, Z) of one sample: Gumbel E = -log U and Z = -log E (when NEED_Z), or normal Z
    (E unused) by Box-Muller on column pairs."""
    if GUMBEL:
        e = -_vlog(_uniform(w, F64))
        if NEED_Z:
            z = -_vlog(e)
        else:
            z = e
    else:
        w_even, w_odd = tl.split(tl.reshape(w, (BLOCK_D // 2, 2)))
        r = _sqrt(-2.0 * _vlog(_uniform(w_even, F64)))
        c, s = _sincos(w_odd, F64)
        z = tl.reshape(tl.join(r * c, r * s), (BLOCK_D,))
        e = z
    return e, z


@triton.jit
def _okey32(x):
    """Order-preserving uint32 key of a float32 (-0 made +0)."""
    u = (x + 0.0).to(tl.uint32, bitcast=True)
    neg = (u >> 31) != 0
    return tl.where(neg, ~u, u | 0x80000000)


@triton.jit
def _ranks(s, cols, D, BLOCK_D: tl.constexpr):
    """Ascending ranks 1..D of s (ties: lower index first); padded columns rank after D."""
    if s.dtype == tl.float32:
        key = tl.where(cols < D, _okey32(s), 0xFFFFFFFF).to(tl.uint64)
        packed = (key << 32) | cols.to(tl.uint64)
        srt = tl.sort(packed)  # position p holds (key, column) of the p-th smallest
        inv = ((srt & 0xFFFFFFFF) << 32) | tl.arange(0, BLOCK_D).to(tl.uint64)
        return (tl.sort(inv) & 0xFFFFFFFF).to(tl.int32) + 1
    else:
        # float64: no room to pack the index next to the key; count pairwise (small d)
        si = tl.reshape(s, (BLOCK_D, 1))
        sj = tl.reshape(s, (1, BLOCK_D))
        ci = tl.reshape(cols, (BLOCK_D, 1))
        cj = tl.reshape(cols, (1, BLOCK_D))
        before = ((si < sj) | ((si == sj) & (ci < cj))) & (ci < D)
        return tl.sum(before.to(tl.int32), axis=0) + 1


@triton.jit
def _solve(s, cols, D, K, SOLVER: tl.constexpr, BLOCK_D: tl.constexpr):
    """The solver's output on scores s (padded with -inf) as a weight per column:
    argmax one-hot, top-k mask (ties lowest index first), or ascending ranks."""
    if SOLVER == 0:
        k = tl.argmax(s, axis=0, tie_break_left=True)
        return (cols == k).to(tl.int32)
    elif SOLVER == 1:
        srt = tl.sort(s, descending=True)
        kth = tl.sum(tl.where(tl.arange(0, BLOCK_D) == K - 1, srt, 0.0), axis=0)
        above = s > kth
        eq = (s == kth) & (cols < D)
        room = K - tl.sum(above.to(tl.int32), axis=0)
        take = eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= room)
        return (above | take).to(tl.int32)
    else:
        return _ranks(s, cols, D, BLOCK_D)


@triton.jit
def _perturb_kernel(theta_ptr, key_ptr, sigma_ptr, g_ptr, out_ptr, value_ptr, counts_ptr,
                    D, N, SAMPLES_PER_PROG, K,
                    SOLVER: tl.constexpr, GUMBEL: tl.constexpr, MODE: tl.constexpr,
                    CV: tl.constexpr, WANT_VALUE: tl.constexpr, F64: tl.constexpr,
                    RATIO_LIMIT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_rows = tl.num_programs(0)
    row64 = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    theta = tl.load(theta_ptr + row64 * D + cols, mask=inside, other=0.0)
    sig = tl.load(sigma_ptr)  # sigma in theta's dtype, as the C kernel rounds it
    seed = tl.load(key_ptr)
    neg_inf = -float("inf")
    # Gumbel ratio scores -E r when the row's spread keeps r = exp((max - theta) / sigma) finite
    tmax = tl.max(tl.where(inside, theta, neg_inf), axis=0)
    tmin = tl.min(tl.where(inside, theta, float("inf")), axis=0)
    if GUMBEL:
        ratio = _div(tmax - tmin, sig) <= RATIO_LIMIT
    else:
        ratio = tmax < neg_inf  # never
    r = _vexp(tl.where(inside, _div(tmax - theta, sig), 0.0))
    if MODE == 1:
        if SOLVER == 3:
            g_row = tl.zeros([BLOCK_D], dtype=theta.dtype)  # read per sample below
        else:
            g_row = tl.load(g_ptr + row64 * D + cols, mask=inside, other=0.0).to(theta.dtype)
        w0 = 0.0
        if CV:
            y0 = _solve(tl.where(inside, theta, neg_inf), cols, D, K, SOLVER, BLOCK_D)
            if SOLVER == 3:
                w0 = tl.sum(tl.load(g_ptr + row64 * D * D + (y0 - 1) * D + cols, mask=inside,
                                    other=0.0).to(tl.float64), axis=0)
            else:
                w0 = tl.sum(y0.to(tl.float64) * g_row.to(tl.float64), axis=0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float64)
        wsum = tl.sum(acc, axis=0)
    else:
        counts = tl.zeros([BLOCK_D], dtype=tl.int32)
        vsum = tl.sum(tl.zeros([BLOCK_D], dtype=tl.float64), axis=0)
    i0 = chunk * SAMPLES_PER_PROG
    i1 = tl.minimum(i0 + SAMPLES_PER_PROG, N)
    for i in range(i0, i1):
        w = _words(seed, row, i, BLOCK_D)
        if ratio:
            e, z = _noise(w, GUMBEL, False, F64, BLOCK_D)
            s = -(e * r)
        else:
            e, z = _noise(w, GUMBEL, True, F64, BLOCK_D)
            s = theta + sig * z
        s = tl.where(inside, s, neg_inf)
        y = _solve(s, cols, D, K, SOLVER, BLOCK_D)
        if MODE == 0:
            if SOLVER == 3:
                tl.atomic_add(counts_ptr + row64 * D * D + (y - 1) * D + cols,
                              tl.full([BLOCK_D], 1, tl.int32), mask=inside)
            else:
                counts += y
            if WANT_VALUE:
                if ratio:
                    p = theta + sig * -_vlog(e)
                else:
                    p = theta + sig * z
                vsum += tl.sum(tl.where(inside, y.to(tl.float64) * p.to(tl.float64), 0.0),
                               axis=0)
        else:
            if SOLVER == 3:
                wgt = tl.sum(tl.load(g_ptr + row64 * D * D + (y - 1) * D + cols, mask=inside,
                                     other=0.0).to(tl.float64), axis=0)
            else:
                wgt = tl.sum(y.to(tl.float64) * g_row.to(tl.float64), axis=0)
            if CV:
                wgt = wgt - w0
            acc += wgt * tl.where(inside, e, 0.0).to(tl.float64)
            wsum += wgt
    base = (chunk.to(tl.int64) * n_rows + row64) * D
    if MODE == 0:
        if SOLVER != 3:
            tl.store(counts_ptr + base + cols, counts, mask=inside)
        if WANT_VALUE:
            tl.store(value_ptr + chunk.to(tl.int64) * n_rows + row64, vsum)
    else:
        if GUMBEL:
            acc = wsum - acc  # score 1 - E
        tl.store(out_ptr + base + cols, acc, mask=inside)


@triton.jit
def _noise_kernel(key_ptr, z_ptr, e_ptr, B, D, GUMBEL: tl.constexpr, F64: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Z (and E) of sample program_id(1), row program_id(0): the samples every kernel draws."""
    row = tl.program_id(0)
    i = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = _words(tl.load(key_ptr), row, i, BLOCK_D)
    e, z = _noise(w, GUMBEL, True, F64, BLOCK_D)
    at = (i.to(tl.int64) * B + row) * D + cols
    tl.store(z_ptr + at, z, mask=inside)
    if GUMBEL:
        tl.store(e_ptr + at, e, mask=inside)


def noise(key: torch.Tensor, num_samples: int, shape, *, noise: str = "gumbel",
          dtype=torch.float32, device=None):
    """(Z, E) like :func:`nonsmooth.solvers._fused.noise`, drawn by the Triton kernel."""
    shape = tuple(int(x) for x in shape)
    d = shape[-1]
    B = math.prod(shape[:-1])
    Z = torch.empty((num_samples,) + shape, dtype=dtype, device=device)
    E = torch.empty_like(Z) if noise == "gumbel" else None
    if B and num_samples:
        _noise_kernel[(B, num_samples)](key.to(Z.device).reshape(1), Z, Z if E is None else E,
                                        B, d, GUMBEL=noise == "gumbel",
                                        F64=dtype == torch.float64,
                                        BLOCK_D=max(4, triton.next_power_of_2(d)),
                                        enable_fp_fusion=False)
    return Z, E


# Programs per row: enough (row, chunk) programs to fill a GPU; tests lower it, since the
# interpreter runs programs one by one.
TARGET_PROGRAMS = 1024


def _launch(theta, key, spec, *, mode, g=None, want_value=False):
    """Run the kernel; returns the per-chunk partials (counts / value or float64 grads)."""
    d = theta.shape[-1]
    rows = theta.reshape(-1, d).contiguous()
    B = rows.shape[0]
    BLOCK_D = max(4, triton.next_power_of_2(d))
    if spec.solver == "sortperm" or (spec.solver == "rank" and rows.dtype == torch.float64):
        if BLOCK_D > 256:
            raise NotImplementedError("the Triton kernels handle sort_permutation and float64 "
                                      "ranks for rows of at most 256 entries")
    N = spec.num_samples
    # enough programs to fill a GPU: split the samples of each row when rows are few
    chunks = max(1, min(N, math.ceil(TARGET_PROGRAMS / max(B, 1))))
    per = math.ceil(N / chunks)
    chunks = math.ceil(N / per)
    dev = rows.device
    key = key.to(dev).reshape(1)
    sigma = torch.full((1,), spec.sigma, dtype=rows.dtype, device=dev)
    f64 = rows.dtype == torch.float64
    if mode == 0:
        if spec.solver == "sortperm":
            counts = torch.zeros((B, d, d), dtype=torch.int32, device=dev)
        else:
            counts = torch.empty((chunks, B, d), dtype=torch.int32, device=dev)
        value = torch.empty((chunks, B), dtype=torch.float64, device=dev)
        out, gg = value, rows  # unused pointers
    else:
        counts = value = rows
        out = torch.empty((chunks, B, d), dtype=torch.float64, device=dev)
        gg = g.reshape(B, -1).contiguous().to(rows.dtype)
    if B > 0:
        _perturb_kernel[(B, chunks)](
            rows, key, sigma, gg, out, value, counts, d, N, per, max(spec.k, 1),
            SOLVER=SOLVER_CODE[spec.solver], GUMBEL=spec.noise == "gumbel", MODE=mode,
            CV=spec.control_variate, WANT_VALUE=want_value, F64=f64,
            RATIO_LIMIT=_RATIO_LIMIT[rows.dtype], BLOCK_D=BLOCK_D,
            enable_fp_fusion=False)
    return counts, value, out


def forward(theta: torch.Tensor, key: torch.Tensor, spec, *, want_value: bool):
    """(mean, value) like the C kernel's forward; value is zeros unless want_value."""
    d = theta.shape[-1]
    batch = tuple(theta.shape[:-1])
    counts, value, _ = _launch(theta, key, spec, mode=0, want_value=want_value)
    if spec.solver == "sortperm":
        total = counts
    else:
        total = counts.sum(0)  # integers: exact in any order
    mean = total.to(theta.dtype) / spec.num_samples
    event = spec.out_event(d)
    if want_value and spec.solver != "sortperm":
        val = (value.sum(0) / spec.num_samples).to(theta.dtype)
    else:
        val = theta.new_zeros(batch)
    return mean.reshape(batch + event), val.reshape(batch)


def vjp(theta: torch.Tensor, key: torch.Tensor, g: torch.Tensor, spec):
    """J^T g, the score-function estimator, regenerating the forward's samples."""
    _, _, out = _launch(theta, key, spec, mode=1, g=g)
    grad = out.sum(0) / (spec.num_samples * spec.sigma)
    return grad.to(theta.dtype).reshape(theta.shape)


__all__ = ["available", "forward", "noise", "vjp"]
