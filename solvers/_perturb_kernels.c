/*
 * Fused perturbed-optimizer kernels (module nonsmooth.solvers._perturb_c).
 *
 * For the built-in solvers (argmax one-hot, top-k mask, hard rank, sort permutation)
 * and theta of shape (B, d), these kernels estimate, with N samples of noise Z,
 *
 *   forward:  mean_b = (1/N) sum_i y*(theta_b + sigma Z_ib)
 *             value_b = (1/N) sum_i <y*(theta_b + sigma Z_ib), theta_b + sigma Z_ib>
 *   vjp:      grad_b = (1/(N sigma)) sum_i <y_ib - y0_b, g_b> score_ib
 *   jvp:      tan_b  = (1/(N sigma)) sum_i (y_ib - y0_b) <score_ib, v_b>
 *
 * (Berthet et al., NeurIPS 2020), with score = grad nu(Z): Z for normal noise and
 * 1 - exp(-Z) = 1 - E for Gumbel noise Z = -log E, E = -log U; y0 = y*(theta) with the
 * control variate, else 0.  The noise is never stored: each sample is regenerated from
 * a counter-based generator, so memory is O(B d) whatever N, and the backward passes
 * regenerate exactly the forward's samples.
 *
 * Generator: Philox-4x32-10 (Salmon et al., SC 2011) with key = the 64-bit seed
 * (low word k0, high word k1) and counter (c0, c1, c2, c3) = (j / 4, row, sample,
 * row >> 32); element (sample i, row b, column j) takes word j % 4.  Word for word the
 * same as triton.language.philox(seed, c0, c1, c2, c3), so a Triton kernel with the same
 * counters draws the same integers.  A word w becomes a uniform U in (0, 1), exactly:
 * float64: (w + 1/2) 2^-32; float32: ((w >> 9) + 1/2) 2^-23.  Gumbel: E = -log U,
 * Z = -log E.  Normal (Box-Muller): words (w0, w1) of a pair of columns give
 * R = sqrt(-2 log U(w0)) and Z = (R cos a, R sin a) with a = 2 pi (w1 + 1/2) 2^-32
 * (float32: from the top 24 bits of w1).
 *
 * log, sin and cos are straight-line polynomial code (no libm call per element) that
 * gcc vectorizes: log within 1 ulp of the correctly rounded value over the ranges used
 * (tests/test_fused.py checks it against long double), sin/cos by Taylor polynomials on
 * [-pi/4, pi/4] after an exact quadrant reduction on the integer word.  The file is
 * compiled without floating-point contraction (-std=c99), so the float arithmetic is
 * the IEEE sequence written here, the same one the Triton kernels run.
 *
 * Arrays come through the buffer protocol only (no NumPy or torch headers); every
 * argument is validated before any element is written; theta is scanned for NaN/inf
 * and for sigma * |Z| overflowing its dtype (a status, nothing written); the loops run
 * without the GIL, over row ranges in up to n_threads POSIX threads (each row is
 * computed by one thread in sample order, so the result does not depend on the thread
 * count), in chunks of samples between which the GIL is taken back to check for
 * KeyboardInterrupt.
 *
 * This file includes itself twice (T = float, then T = double) for the typed kernels.
 */
#ifndef PERTURB_TEMPLATE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(_WIN32)
#include <pthread.h>
#define HAVE_PTHREADS 1
#else
#define HAVE_PTHREADS 0
#endif

/* x86-64 Linux with gcc: AVX2 / AVX-512 clones of the hot loops, picked at load time.
   No FMA is enabled, so every clone performs the same IEEE operations. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

enum { SOLVER_ARGMAX = 0, SOLVER_TOPK = 1, SOLVER_RANK = 2, SOLVER_SORTPERM = 3 };
enum { MODE_FWD = 0, MODE_VJP = 1, MODE_JVP = 2 };
enum { NOISE_GUMBEL = 0, NOISE_NORMAL = 1 };
enum { FMT_BAD = 0, FMT_F32, FMT_F64, FMT_U32 };

/* |Z| never exceeds this (Gumbel: -log(-log(1 - 2^-33)) < 22.9, normal: sqrt(2 * 22.2)). */
#define NOISE_BOUND 24.0

/* ------------------------------------------------------------------ buffers */

static int native_little_endian(void)
{
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

static int decode_format(const char *fmt, Py_ssize_t itemsize)
{
    if (fmt == NULL)
        return FMT_BAD;
    if (*fmt == '@' || *fmt == '=')
        fmt++;
    else if (*fmt == '<' || *fmt == '>' || *fmt == '!') {
        if ((*fmt == '<') != native_little_endian())
            return FMT_BAD;
        fmt++;
    }
    if (fmt[0] == '\0' || fmt[1] != '\0')
        return FMT_BAD;
    switch (fmt[0]) {
    case 'f':
        return itemsize == 4 ? FMT_F32 : FMT_BAD;
    case 'd':
        return itemsize == 8 ? FMT_F64 : FMT_BAD;
    case 'I':
    case 'L':
        return itemsize == 4 ? FMT_U32 : FMT_BAD;
    default:
        return FMT_BAD;
    }
}

static const char *format_name(int f)
{
    return f == FMT_F32 ? "float32" : f == FMT_F64 ? "float64" : f == FMT_U32 ? "uint32" : "?";
}

/*
 * Acquire `obj` as `name`: C-contiguous, ndim dimensions, format `want` (FMT_BAD: f32 or
 * f64), shape[k] == dims[k] where dims[k] >= 0.  Returns the format, or FMT_BAD with an
 * exception set and nothing held.
 */
static int acquire(PyObject *obj, Py_buffer *view, const char *name, int writable, int want,
                   int ndim, const Py_ssize_t *dims)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_FULL : PyBUF_FULL_RO) != 0) {
        PyErr_Clear();
        if (writable && PyObject_GetBuffer(obj, view, PyBUF_FULL_RO) == 0) {
            PyBuffer_Release(view);
            PyErr_Format(PyExc_ValueError, "%s must be writable, got a read-only buffer", name);
            return FMT_BAD;
        }
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must support the buffer protocol (a NumPy array), got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return FMT_BAD;
    }
    int fmt = decode_format(view->format, view->itemsize);
    if (fmt == FMT_BAD || (want != FMT_BAD && fmt != want) ||
        (want == FMT_BAD && fmt != FMT_F32 && fmt != FMT_F64)) {
        PyErr_Format(PyExc_TypeError, "%s must hold native %s values, got format '%s'", name,
                     want == FMT_BAD ? "float32 or float64" : format_name(want),
                     view->format ? view->format : "B");
        goto fail;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D, got %d dimensions", name, ndim,
                     view->ndim);
        goto fail;
    }
    if (view->suboffsets != NULL || !PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous; pass np.ascontiguousarray(%s)",
                     name, name);
        goto fail;
    }
    if (writable && view->readonly) {
        PyErr_Format(PyExc_ValueError, "%s must be writable, got a read-only buffer", name);
        goto fail;
    }
    for (int k = 0; k < ndim; k++)
        if (dims && dims[k] >= 0 && view->shape[k] != dims[k]) {
            PyErr_Format(PyExc_ValueError, "%s has shape[%d] = %zd, expected %zd", name, k,
                         view->shape[k], dims[k]);
            goto fail;
        }
    return fmt;
fail:
    PyBuffer_Release(view);
    return FMT_BAD;
}

/* ------------------------------------------------------------------ Philox-4x32-10 */

#define PH_M0 0xD2511F53u
#define PH_M1 0xCD9E8D57u
#define PH_W0 0x9E3779B9u
#define PH_W1 0xBB67AE85u

static inline void philox_block(uint32_t x[4], uint32_t k0, uint32_t k1)
{
    uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
    for (int r = 0; r < 10; r++) {
        const uint64_t p0 = (uint64_t)PH_M0 * x0;
        const uint64_t p1 = (uint64_t)PH_M1 * x2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1 ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ x3 ^ k1;
        x1 = (uint32_t)p1;
        x3 = (uint32_t)p0;
        x0 = n0;
        x2 = n2;
        k0 += PH_W0;
        k1 += PH_W1;
    }
    x[0] = x0;
    x[1] = x1;
    x[2] = x2;
    x[3] = x3;
}

/*
 * The words of SBLK consecutive samples i0 .. i0 + SBLK - 1 of one row, column-major:
 * counter (g, c1, i0 + s, c3), word t goes to out[(4 g + t) * SBLK + s].  Vector lanes
 * run over the samples, so each word vector is stored as it is; the AVX2 / AVX-512
 * versions (chosen at import) compute exactly the scalar function.
 */
#define SBLK 16

static void philox_samples_scalar(uint32_t *restrict out, Py_ssize_t G, uint32_t i0,
                                  uint32_t c1, uint32_t c3, uint32_t k0, uint32_t k1)
{
    for (Py_ssize_t g = 0; g < G; g++)
        for (int s = 0; s < SBLK; s++) {
            uint32_t x[4] = {(uint32_t)g, c1, i0 + (uint32_t)s, c3};
            philox_block(x, k0, k1);
            for (int t = 0; t < 4; t++)
                out[(4 * g + t) * SBLK + s] = x[t];
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_SIMD 1

/* lo, hi 32 bits of the eight products x * m (m in every 32-bit lane) */
__attribute__((target("avx2"))) static inline void mulhilo_avx2(__m256i x, __m256i m,
                                                                 __m256i *lo, __m256i *hi)
{
    const __m256i pe = _mm256_mul_epu32(x, m);                        /* even lanes */
    const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m); /* odd lanes */
    *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

__attribute__((target("avx2"))) static void philox_samples_avx2(
    uint32_t *restrict out, Py_ssize_t G, uint32_t i0, uint32_t c1, uint32_t c3, uint32_t k0,
    uint32_t k1)
{
    const __m256i m0 = _mm256_set1_epi32((int)PH_M0), m1 = _mm256_set1_epi32((int)PH_M1);
    for (int s0 = 0; s0 < SBLK; s0 += 8) {
        const __m256i ctr2 = _mm256_add_epi32(_mm256_set1_epi32((int)(i0 + (uint32_t)s0)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (Py_ssize_t g = 0; g < G; g++) {
            __m256i x0 = _mm256_set1_epi32((int)(uint32_t)g), x1 = _mm256_set1_epi32((int)c1);
            __m256i x2 = ctr2, x3 = _mm256_set1_epi32((int)c3);
            uint32_t a = k0, b = k1;
            for (int r = 0; r < 10; r++) {
                __m256i lo0, hi0, lo1, hi1;
                mulhilo_avx2(x0, m0, &lo0, &hi0);
                mulhilo_avx2(x2, m1, &lo1, &hi1);
                x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32((int)a));
                x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32((int)b));
                x1 = lo1;
                x3 = lo0;
                a += PH_W0;
                b += PH_W1;
            }
            uint32_t *o = out + 4 * g * SBLK + s0;
            _mm256_storeu_si256((__m256i *)(o), x0);
            _mm256_storeu_si256((__m256i *)(o + SBLK), x1);
            _mm256_storeu_si256((__m256i *)(o + 2 * SBLK), x2);
            _mm256_storeu_si256((__m256i *)(o + 3 * SBLK), x3);
        }
    }
}

__attribute__((target("avx512f"))) static void philox_samples_avx512(
    uint32_t *restrict out, Py_ssize_t G, uint32_t i0, uint32_t c1, uint32_t c3, uint32_t k0,
    uint32_t k1)
{
    const __m512i m0 = _mm512_set1_epi32((int)PH_M0), m1 = _mm512_set1_epi32((int)PH_M1);
    const __m512i ctr2 = _mm512_add_epi32(
        _mm512_set1_epi32((int)i0),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (Py_ssize_t g = 0; g < G; g++) {
        __m512i x0 = _mm512_set1_epi32((int)(uint32_t)g), x1 = _mm512_set1_epi32((int)c1);
        __m512i x2 = ctr2, x3 = _mm512_set1_epi32((int)c3);
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; r++) {
            const __m512i pe0 = _mm512_mul_epu32(x0, m0);
            const __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m0);
            const __m512i pe1 = _mm512_mul_epu32(x2, m1);
            const __m512i po1 = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m1);
            const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, pe0, _mm512_slli_epi64(po0, 32));
            const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe0, 32), po0);
            const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, pe1, _mm512_slli_epi64(po1, 32));
            const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe1, 32), po1);
            /* 0x96: three-way xor */
            x0 = _mm512_ternarylogic_epi32(hi1, x1, _mm512_set1_epi32((int)a), 0x96);
            x2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32((int)b), 0x96);
            x1 = lo1;
            x3 = lo0;
            a += PH_W0;
            b += PH_W1;
        }
        uint32_t *o = out + 4 * g * SBLK;
        _mm512_storeu_si512((void *)(o), x0);
        _mm512_storeu_si512((void *)(o + SBLK), x1);
        _mm512_storeu_si512((void *)(o + 2 * SBLK), x2);
        _mm512_storeu_si512((void *)(o + 3 * SBLK), x3);
    }
}
#else
#define HAVE_X86_SIMD 0
#endif

typedef void (*philox_fn)(uint32_t *, Py_ssize_t, uint32_t, uint32_t, uint32_t, uint32_t,
                          uint32_t);
static philox_fn philox_samples = philox_samples_scalar;
static const char *philox_isa = "scalar";

static void pick_philox(void)
{
#if HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        philox_samples = philox_samples_avx512;
        philox_isa = "avx512f";
    }
    else if (__builtin_cpu_supports("avx2")) {
        philox_samples = philox_samples_avx2;
        philox_isa = "avx2";
    }
#endif
}

/* ------------------------------------------------------------------ elementwise math */

/* Uniforms in (0, 1), exact (the products are exact scalings of small integers). */
static inline double uniform_f64(uint32_t w)
{
    /* signed conversion (vectorizes on AVX2), then the 2^31 back: w + 1/2, exactly */
    return ((double)(int32_t)(w ^ 0x80000000u) + 2147483648.5) * 0x1p-32;
}

static inline float uniform_f32(uint32_t w)
{
    return ((float)(int32_t)(w >> 9) + 0.5f) * 0x1p-23f;
}

/*
 * log x for a positive normal x.  x = 2^e m with m in [sqrt(1/2), sqrt(2)), found by
 * subtracting the bit pattern of sqrt(1/2); with f = m - 1 and s = f / (2 + f),
 * log(1 + f) = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + R)), R = sum_k 2 s^(2k) / (2k + 1),
 * which keeps the rounding of the leading terms below half an ulp; R is its Taylor
 * series, truncated where the next term is below 2^-60 (float: 2^-28) of the result.
 * e ln 2 is added in two parts (ln2_hi has trailing zero bits, so e * ln2_hi is exact).
 */
static inline double vlog_f64(double x)
{
    uint64_t ix;
    memcpy(&ix, &x, sizeof ix);
    const int64_t t = (int64_t)(ix - 0x3FE6A09E667F3BCDull);
    const int64_t e = t >> 52; /* arithmetic: floor */
    const uint64_t im = ix - ((uint64_t)e << 52);
    double m;
    memcpy(&m, &im, sizeof m);
    /* e as a double without an int64 -> double conversion (none in AVX2): add it to the
       mantissa of 1.5 * 2^52 and subtract that again; exact for |e| < 2^51. */
    const uint64_t eb = 0x4338000000000000ull + (uint64_t)e;
    double ed;
    memcpy(&ed, &eb, sizeof ed);
    ed -= 6755399441055744.0;
    const double f = m - 1.0;
    const double s = f / (2.0 + f);
    const double z = s * s;
    double R = 2.0 / 19.0;
    R = R * z + 2.0 / 17.0;
    R = R * z + 2.0 / 15.0;
    R = R * z + 2.0 / 13.0;
    R = R * z + 2.0 / 11.0;
    R = R * z + 2.0 / 9.0;
    R = R * z + 2.0 / 7.0;
    R = R * z + 2.0 / 5.0;
    R = R * z + 2.0 / 3.0;
    R = R * z;
    const double hfsq = 0.5 * f * f;
    return ed * 6.93147180369123816490e-01 -
           ((hfsq - (s * (hfsq + R) + ed * 1.90821492927058770002e-10)) - f);
}

static inline float vlog_f32(float x)
{
    uint32_t ix;
    memcpy(&ix, &x, sizeof ix);
    const int32_t t = (int32_t)(ix - 0x3F3504F3u);
    const int32_t e = t >> 23;
    const uint32_t im = ix - ((uint32_t)e << 23);
    float m;
    memcpy(&m, &im, sizeof m);
    const float ef = (float)e;
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s;
    float R = 2.0f / 9.0f;
    R = R * z + 2.0f / 7.0f;
    R = R * z + 2.0f / 5.0f;
    R = R * z + 2.0f / 3.0f;
    R = R * z;
    const float hfsq = 0.5f * f * f;
    return ef * 0.693145751953125f - ((hfsq - (s * (hfsq + R) + ef * 1.428606765330187e-06f)) - f);
}

/*
 * exp(x) for 0 <= x <= 600 (float: 60); the caller guarantees the range.  x = k ln 2 + r
 * with |r| <= ln2 / 2 (k by the 1.5 * 2^52 rounding trick, whose bits also hold k for the
 * exponent field), e^r by its Taylor series to r^13 (float: r^7), truncation below
 * 2^-57 (2^-27) relative.
 */
static inline double vexp_f64(double x)
{
    const double shift = 6755399441055744.0;
    double kd = x * 1.4426950408889634074 + shift;
    uint64_t ki;
    memcpy(&ki, &kd, sizeof ki);
    kd -= shift;
    const double r = (x - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
    double q = 1.0 / 6227020800.0;
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    const uint64_t sb = (ki + 1023) << 52;
    double scale;
    memcpy(&scale, &sb, sizeof scale);
    return q * scale;
}

static inline float vexp_f32(float x)
{
    const float shift = 12582912.0f; /* 1.5 * 2^23 */
    float kd = x * 1.44269504088896341f + shift;
    uint32_t ki;
    memcpy(&ki, &kd, sizeof ki);
    kd -= shift;
    const float r = (x - kd * 0.693145751953125f) - kd * 1.428606765330187e-06f;
    float q = 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const uint32_t sb = (ki + 127u) << 23;
    float scale;
    memcpy(&scale, &sb, sizeof scale);
    return q * scale;
}

/* Largest (max theta - min theta) / sigma of a row that takes the Gumbel ratio scores. */
#define RATIO_LIMIT_F64 600.0
#define RATIO_LIMIT_F32 60.0f

/*
 * cos and sin of 2 pi (w + 1/2) / 2^32.  Adding 2^29 moves the quadrant boundaries to
 * the octant midpoints: then w + 1/2 = 2^30 (q + r) with q the top two bits and r in
 * [-1/2, 1/2), exactly, so the angle is pi/2 q + a with |a| = |pi/2 r| <= pi/4, and
 * (cos, sin) is (c, s) rotated by q quarter turns.  Taylor series to a^17 / a^18
 * (float: a^9 / a^10), truncation below 2^-60 (2^-30) relative.
 */
static inline void sincos_f64(uint32_t w, double *co, double *si)
{
    const uint32_t t = w + 0x20000000u;
    const uint32_t q = t >> 30;
    const int32_t rem = (int32_t)(t & 0x3FFFFFFFu) - 0x20000000;
    const double a = (((double)rem + 0.5) * 0x1p-30) * 1.5707963267948966;
    const double a2 = a * a;
    double sn = 1.0 / 355687428096000.0;            /* 1/17! */
    sn = -sn * a2 + 1.0 / 1307674368000.0;          /* 1/15! */
    sn = sn * a2 - 1.0 / 6227020800.0;              /* 1/13! */
    sn = sn * a2 + 1.0 / 39916800.0;                /* 1/11! */
    sn = sn * a2 - 1.0 / 362880.0;                  /* 1/9!  */
    sn = sn * a2 + 1.0 / 5040.0;                    /* 1/7!  */
    sn = sn * a2 - 1.0 / 120.0;                     /* 1/5!  */
    sn = sn * a2 + 1.0 / 6.0;                       /* 1/3!  */
    sn = a - a * a2 * sn;
    double cs = 1.0 / 6402373705728000.0;           /* 1/18! */
    cs = -cs * a2 + 1.0 / 20922789888000.0;         /* 1/16! */
    cs = cs * a2 - 1.0 / 87178291200.0;             /* 1/14! */
    cs = cs * a2 + 1.0 / 479001600.0;               /* 1/12! */
    cs = cs * a2 - 1.0 / 3628800.0;                 /* 1/10! */
    cs = cs * a2 + 1.0 / 40320.0;                   /* 1/8!  */
    cs = cs * a2 - 1.0 / 720.0;                     /* 1/6!  */
    cs = cs * a2 + 1.0 / 24.0;                      /* 1/4!  */
    cs = cs * a2 - 0.5;
    cs = 1.0 + a2 * cs;
    const double c = (q & 1u) ? sn : cs;
    const double s = (q & 1u) ? cs : sn;
    *co = ((q + 1u) & 2u) ? -c : c;
    *si = (q & 2u) ? -s : s;
}

static inline void sincos_f32(uint32_t w, float *co, float *si)
{
    const uint32_t t = ((w >> 8) + 0x200000u) & 0xFFFFFFu;
    const uint32_t q = t >> 22;
    const int32_t rem = (int32_t)(t & 0x3FFFFFu) - 0x200000;
    const float a = (((float)rem + 0.5f) * 0x1p-22f) * 1.57079632679489662f;
    const float a2 = a * a;
    float sn = 1.0f / 362880.0f;
    sn = -sn * a2 + 1.0f / 5040.0f;
    sn = sn * a2 - 1.0f / 120.0f;
    sn = sn * a2 + 1.0f / 6.0f;
    sn = a - a * a2 * sn;
    float cs = 1.0f / 3628800.0f;
    cs = -cs * a2 + 1.0f / 40320.0f;
    cs = cs * a2 - 1.0f / 720.0f;
    cs = cs * a2 + 1.0f / 24.0f;
    cs = cs * a2 - 0.5f;
    cs = 1.0f + a2 * cs;
    const float c = (q & 1u) ? sn : cs;
    const float s = (q & 1u) ? cs : sn;
    *co = ((q + 1u) & 2u) ? -c : c;
    *si = (q & 2u) ? -s : s;
}

/* sqrt as one instruction (the module is built with -fno-math-errno). */
static inline double vsqrt_f64(double x)
{
    return __builtin_sqrt(x);
}

static inline float vsqrt_f32(float x)
{
    return __builtin_sqrtf(x);
}

/* Order-preserving unsigned keys of finite values (-0 is made +0 first). */
static inline uint64_t okey_f64(double x)
{
    x += 0.0;
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u ^ ((uint64_t)((int64_t)u >> 63) | 0x8000000000000000ull);
}

static inline uint64_t okey_f32(float x)
{
    x += 0.0f;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint64_t)(u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u));
}

/* ------------------------------------------------------------------ problem and scratch */

typedef struct {
    int fmt, mode, solver, gumbel, cv, want_value;
    Py_ssize_t B, d, G, N, k, V; /* G = ceil(d / 4) Philox blocks per row, V tangents */
    Py_ssize_t lout, laux;      /* per-row lengths of the output and of the tangents */
    double sigma;
    uint32_t k0, k1;
    const void *theta;
    const void *aux; /* g (vjp, (V, B, lout)) or v (jvp, (V, B, d)) */
    double *acc;     /* (V, B, lacc) accumulators */
    double *acc2;    /* (V, B): value sum (fwd), sum of w (vjp), sum of t (jvp) */
    Py_ssize_t lacc;
} Problem;

/* Per-thread scratch, O(d) (O(SBLK d) for the sample blocks). Blocks are column-major:
   element (column j, sample s) at [j * SBLK + s]. */
typedef struct {
    uint32_t *words; /* SBLK x 4G Philox words */
    void *z, *e;     /* SBLK x 4G: Z and (Gumbel) E, in the row's type */
    void *p;         /* SBLK x 4G: scores (theta + sigma Z, or -E r for Gumbel) */
    void *row;       /* d: one sample's scores, contiguous */
    void *r;         /* d: exp((max theta - theta_j) / sigma), the Gumbel ratio weights */
    void *topv;      /* d + 1: the top-k buffer's values */
    uint64_t *key;   /* d: sort keys */
    uint32_t *perm, *perm0, *tmp, *pos, *pos0; /* d each (tmp: 2d) */
    int32_t *kidx;   /* SBLK: argmax of each sample of a block */
    double *wt, *wt0;  /* d each: the solver output's weights (sample, control variate) */
    double *w, *tv;  /* V x SBLK: per-sample vjp weights, jvp products */
    double *w0, *vsum; /* V each: control-variate weights, sums of v (jvp, Gumbel) */
    double *accl;    /* d x SBLK: per-lane vjp sums (V == 1) */
} Scratch;

static void scratch_free(Scratch *s)
{
    PyMem_RawFree(s->words);
    PyMem_RawFree(s->z);
    PyMem_RawFree(s->key);
    PyMem_RawFree(s->perm);
    PyMem_RawFree(s->wt);
    memset(s, 0, sizeof *s);
}

static int scratch_alloc(Scratch *s, const Problem *pb)
{
    memset(s, 0, sizeof *s);
    const size_t n4 = 4 * (size_t)pb->G, d = (size_t)pb->d, nb = SBLK * n4;
    const size_t V = (size_t)pb->V;
    const size_t item = pb->fmt == FMT_F64 ? sizeof(double) : sizeof(float);
    const size_t nacc = (pb->mode == MODE_VJP && pb->V == 1) ? SBLK * d : 0;
    s->words = PyMem_RawMalloc(nb * sizeof(uint32_t));
    s->z = PyMem_RawMalloc((3 * nb + 3 * d + 1) * item);
    s->key = PyMem_RawMalloc(d * sizeof(uint64_t));
    s->perm = PyMem_RawMalloc((6 * d + SBLK) * sizeof(uint32_t));
    s->wt = PyMem_RawMalloc((2 * d + 2 * V * SBLK + 2 * V + nacc) * sizeof(double));
    if (!s->words || !s->z || !s->key || !s->perm || !s->wt) {
        scratch_free(s);
        return -1;
    }
    char *t = (char *)s->z;
    s->e = t + nb * item;
    s->p = t + 2 * nb * item;
    s->row = t + 3 * nb * item;
    s->r = t + (3 * nb + d) * item;
    s->topv = t + (3 * nb + 2 * d) * item;
    s->perm0 = s->perm + d;
    s->tmp = s->perm + 2 * d; /* 2d words: a uint64 merge buffer for sort_packed */
    s->pos = s->perm + 4 * d;
    s->pos0 = s->perm + 5 * d;
    s->kidx = (int32_t *)(s->perm + 6 * d);
    s->wt0 = s->wt + d;
    s->w = s->wt + 2 * d;
    s->tv = s->w + V * SBLK;
    s->w0 = s->tv + V * SBLK;
    s->vsum = s->w0 + V;
    s->accl = nacc ? s->vsum + V : NULL;
    return 0;
}

/* ------------------------------------------------------------------ sorting */

/* (key, index) order: the order of the values, ties by lower index. */
#define LESS(a, b) (key[a] < key[b] || (key[a] == key[b] && (a) < (b)))

/* Sort perm by key (a strict total order), starting from a nearly sorted perm: insertion
   with a budget of shifts, then a bottom-up merge sort.  Returns nothing; perm sorted. */
static void sort_perm(uint32_t *restrict perm, uint32_t *restrict tmp, const uint64_t *key,
                      Py_ssize_t d)
{
    Py_ssize_t budget = 16 * d;
    Py_ssize_t i = 1;
    for (; i < d; i++) {
        const uint32_t v = perm[i];
        Py_ssize_t j = i;
        while (j > 0 && LESS(v, perm[j - 1])) {
            perm[j] = perm[j - 1];
            j--;
        }
        perm[j] = v;
        budget -= i - j;
        if (budget < 0)
            break;
    }
    if (i >= d)
        return;
    /* Merge sort, runs of width 1, 2, 4, ... (the partial insertion result is just input). */
    uint32_t *src = perm, *dst = tmp;
    for (Py_ssize_t width = 1; width < d; width *= 2) {
        for (Py_ssize_t lo = 0; lo < d; lo += 2 * width) {
            Py_ssize_t mid = lo + width < d ? lo + width : d;
            Py_ssize_t hi = lo + 2 * width < d ? lo + 2 * width : d;
            Py_ssize_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                dst[o++] = LESS(src[b], src[a]) ? src[b++] : src[a++];
            while (a < mid)
                dst[o++] = src[a++];
            while (b < hi)
                dst[o++] = src[b++];
        }
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != perm)
        memcpy(perm, src, (size_t)d * sizeof(uint32_t));
}
#undef LESS

/* Sort distinct 64-bit words, nearly sorted: insertion with a budget of shifts, then a
   bottom-up merge sort (tmp: d words of scratch). */
static void sort_packed(uint64_t *restrict a, uint64_t *restrict tmp, Py_ssize_t d)
{
    Py_ssize_t budget = 16 * d, i = 1;
    for (; i < d; i++) {
        const uint64_t v = a[i];
        Py_ssize_t j = i;
        while (j > 0 && v < a[j - 1]) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
        budget -= i - j;
        if (budget < 0)
            break;
    }
    if (i >= d)
        return;
    uint64_t *src = a, *dst = tmp;
    for (Py_ssize_t width = 1; width < d; width *= 2) {
        for (Py_ssize_t lo = 0; lo < d; lo += 2 * width) {
            const Py_ssize_t mid = lo + width < d ? lo + width : d;
            const Py_ssize_t hi = lo + 2 * width < d ? lo + 2 * width : d;
            Py_ssize_t x = lo, y = mid, o = lo;
            while (x < mid && y < hi)
                dst[o++] = src[y] < src[x] ? src[y++] : src[x++];
            while (x < mid)
                dst[o++] = src[x++];
            while (y < hi)
                dst[o++] = src[y++];
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, (size_t)d * sizeof(uint64_t));
}

/* ------------------------------------------------------------------ typed kernels */

/* GCC vectors of SBLK elements (one per sample of a block), lowered to AVX-512, AVX2 or
   SSE2 registers by each clone. */
typedef float vf32x16 __attribute__((vector_size(64)));
typedef int32_t vi32x16 __attribute__((vector_size(64)));
typedef double vf64x16 __attribute__((vector_size(128)));
typedef int64_t vi64x16 __attribute__((vector_size(128)));

#define PERTURB_TEMPLATE
#define T float
#define VT vf32x16
#define VI vi32x16
#define SFX(name) name##_f32
#define OKEY okey_f32
#define RATIO_LIMIT RATIO_LIMIT_F32
#include "_perturb_kernels.c"
#undef T
#undef VT
#undef VI
#undef SFX
#undef OKEY
#undef RATIO_LIMIT
#define T double
#define VT vf64x16
#define VI vi64x16
#define SFX(name) name##_f64
#define OKEY okey_f64
#define RATIO_LIMIT RATIO_LIMIT_F64
#include "_perturb_kernels.c"
#undef T
#undef VT
#undef VI
#undef SFX
#undef OKEY
#undef RATIO_LIMIT
#undef PERTURB_TEMPLATE

/* ------------------------------------------------------------------ driver */

typedef struct {
    const Problem *pb;
    Py_ssize_t r0, r1;
    uint32_t i0, i1;
    Scratch *sc;
} Task;

static void *run_task(void *arg)
{
    Task *t = (Task *)arg;
    for (Py_ssize_t b = t->r0; b < t->r1; b++) {
        if (t->pb->fmt == FMT_F64)
            row_chunk_f64(t->pb, t->sc, b, t->i0, t->i1);
        else
            row_chunk_f32(t->pb, t->sc, b, t->i0, t->i1);
    }
    return NULL;
}

/* Run samples [i0, i1) of every row on `nt` threads (rows split in contiguous ranges). */
static void run_chunk(const Problem *pb, Scratch *sc, Task *tasks, int nt, uint32_t i0,
                      uint32_t i1)
{
    for (int t = 0; t < nt; t++) {
        tasks[t].pb = pb;
        tasks[t].r0 = pb->B * t / nt;
        tasks[t].r1 = pb->B * (t + 1) / nt;
        tasks[t].i0 = i0;
        tasks[t].i1 = i1;
        tasks[t].sc = &sc[t];
    }
#if HAVE_PTHREADS
    pthread_t th[64];
    int started[64] = {0};
    for (int t = 1; t < nt; t++)
        started[t] = pthread_create(&th[t], NULL, run_task, &tasks[t]) == 0;
    run_task(&tasks[0]);
    for (int t = 1; t < nt; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            run_task(&tasks[t]); /* could not start a thread: do its rows here */
    }
#else
    for (int t = 0; t < nt; t++)
        run_task(&tasks[t]);
#endif
}

static int parse_key(PyObject *obj, uint32_t *k0, uint32_t *k1)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "key must be an int in [0, 2**64), got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "key must be an int in [0, 2**64), got %R", obj);
        return -1;
    }
    *k0 = (uint32_t)(v & 0xFFFFFFFFull);
    *k1 = (uint32_t)(v >> 32);
    return 0;
}

/*
 * run(mode, theta, aux, out, value, key, n_samples, sigma, noise, solver, k,
 *     control_variate, n_threads) -> status
 */
static PyObject *py_run(PyObject *self, PyObject *args)
{
    (void)self;
    int mode, noise, solver, cv, n_threads;
    PyObject *tho, *auxo, *outo, *valo, *keyo;
    Py_ssize_t N, k;
    double sigma;
    if (!PyArg_ParseTuple(args, "iOOOOOndiinpi:run", &mode, &tho, &auxo, &outo, &valo, &keyo,
                          &N, &sigma, &noise, &solver, &k, &cv, &n_threads))
        return NULL;
    if (mode < MODE_FWD || mode > MODE_JVP) {
        PyErr_Format(PyExc_ValueError, "mode must be 0 (forward), 1 (vjp) or 2 (jvp), got %d",
                     mode);
        return NULL;
    }
    if (solver < SOLVER_ARGMAX || solver > SOLVER_SORTPERM) {
        PyErr_Format(PyExc_ValueError, "solver must be 0..3, got %d", solver);
        return NULL;
    }
    if (noise != NOISE_GUMBEL && noise != NOISE_NORMAL) {
        PyErr_Format(PyExc_ValueError, "noise must be 0 (gumbel) or 1 (normal), got %d", noise);
        return NULL;
    }
    if (!(sigma > 0.0) || !isfinite(sigma)) {
        PyErr_Format(PyExc_ValueError, "sigma must be a finite number > 0, got %R",
                     PyTuple_GET_ITEM(args, 7));
        return NULL;
    }
    if (N < 1 || (unsigned long long)N > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError,
                     "n_samples must be in [1, 2**32) (the sample index is one Philox "
                     "counter word), got %zd", N);
        return NULL;
    }
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
        return NULL;
    }
    uint32_t k0, k1;
    if (parse_key(keyo, &k0, &k1) < 0)
        return NULL;

    Problem pb;
    memset(&pb, 0, sizeof pb);
    Py_buffer tb, ab, ob, vb;
    int held_t = 0, held_a = 0, held_o = 0, held_v = 0;
    PyObject *result = NULL;
    Scratch sc[64];
    Task tasks[64];
    int n_sc = 0;

    pb.fmt = acquire(tho, &tb, "theta", 0, FMT_BAD, 2, NULL);
    if (pb.fmt == FMT_BAD)
        return NULL;
    held_t = 1;
    pb.B = tb.shape[0];
    pb.d = tb.shape[1];
    if (pb.d < 1) {
        PyErr_SetString(PyExc_ValueError, "theta must have at least one column");
        goto done;
    }
    if (pb.d > 0x7FFFFFFF || (pb.B >> 62) != 0) {
        PyErr_Format(PyExc_ValueError, "theta of shape (%zd, %zd) is too large", pb.B, pb.d);
        goto done;
    }
    if (solver == SOLVER_SORTPERM && pb.d > 46340) {
        PyErr_Format(PyExc_ValueError, "sort_permutation rows of length %zd are too long", pb.d);
        goto done;
    }
    if (solver == SOLVER_TOPK && (k < 1 || k > pb.d)) {
        PyErr_Format(PyExc_ValueError, "k must be in [1, %zd], got %zd", pb.d, k);
        goto done;
    }
    pb.mode = mode;
    pb.solver = solver;
    pb.gumbel = noise == NOISE_GUMBEL;
    pb.cv = cv;
    pb.N = N;
    pb.k = solver == SOLVER_TOPK ? k : solver == SOLVER_ARGMAX ? 1 : pb.d;
    pb.sigma = sigma;
    pb.k0 = k0;
    pb.k1 = k1;
    pb.G = (pb.d + 3) / 4;
    pb.theta = tb.buf;
    pb.lout = solver == SOLVER_SORTPERM ? pb.d * pb.d : pb.d;
    pb.V = 1;
    if (mode == MODE_FWD) {
        if (auxo != Py_None) {
            PyErr_SetString(PyExc_ValueError, "aux must be None for the forward pass");
            goto done;
        }
        if (outo != Py_None) {
            const Py_ssize_t dims[2] = {pb.B, pb.lout};
            if (acquire(outo, &ob, "out", 1, pb.fmt, 2, dims) == FMT_BAD)
                goto done;
            held_o = 1;
        }
        if (valo != Py_None) {
            if (solver == SOLVER_SORTPERM) {
                PyErr_SetString(PyExc_ValueError,
                                "value needs a solver whose output has theta's shape; "
                                "sort_permutation's has one more axis");
                goto done;
            }
            const Py_ssize_t dims[1] = {pb.B};
            if (acquire(valo, &vb, "value", 1, pb.fmt, 1, dims) == FMT_BAD)
                goto done;
            held_v = 1;
            pb.want_value = 1;
        }
        pb.lacc = pb.lout;
    }
    else {
        if (valo != Py_None) {
            PyErr_SetString(PyExc_ValueError, "value must be None for vjp and jvp");
            goto done;
        }
        /* vjp: aux = g (V, B, lout) -> out (V, B, d); jvp: aux = v (V, B, d) -> out (V, B, lout) */
        pb.laux = mode == MODE_VJP ? pb.lout : pb.d;
        const Py_ssize_t la = pb.laux, lo = mode == MODE_VJP ? pb.d : pb.lout;
        {
            const Py_ssize_t dims[3] = {-1, pb.B, la};
            if (acquire(auxo, &ab, mode == MODE_VJP ? "g" : "v", 0, pb.fmt, 3, dims) == FMT_BAD)
                goto done;
            held_a = 1;
        }
        pb.V = ab.shape[0];
        pb.aux = ab.buf;
        {
            const Py_ssize_t dims[3] = {pb.V, pb.B, lo};
            if (acquire(outo, &ob, "out", 1, pb.fmt, 3, dims) == FMT_BAD)
                goto done;
            held_o = 1;
        }
        pb.lacc = lo;
    }
    if (pb.B == 0 || pb.V == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }
    {
        /* accumulators: (V, B, lacc) + (V, B), checked for size_t overflow */
        const size_t VB = (size_t)pb.V * (size_t)pb.B;
        if ((size_t)pb.lacc > ((size_t)PY_SSIZE_T_MAX / sizeof(double) - 1) / VB) {
            PyErr_SetString(PyExc_MemoryError, "the accumulators would not fit in memory");
            goto done;
        }
        pb.acc = PyMem_RawCalloc(VB * ((size_t)pb.lacc + 1), sizeof(double));
        if (!pb.acc) {
            PyErr_NoMemory();
            goto done;
        }
        pb.acc2 = pb.acc + VB * (size_t)pb.lacc;
    }
    int nt = n_threads < 64 ? n_threads : 64;
    if (nt > pb.B)
        nt = (int)pb.B;
    /* A thread for fewer than ~2^16 element-samples per chunk costs more than it saves. */
    for (n_sc = 0; n_sc < nt; n_sc++)
        if (scratch_alloc(&sc[n_sc], &pb) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    {
        int status = 0;
        const Py_ssize_t total = pb.B * pb.d;
        Py_BEGIN_ALLOW_THREADS
        /* Validate theta before anything is written: finite, and theta + sigma Z finite. */
        double max_abs = 0.0;
        if (pb.fmt == FMT_F64) {
            const double *x = (const double *)tb.buf;
            for (Py_ssize_t i = 0; i < total; i++) {
                const double a = fabs(x[i]);
                max_abs = a > max_abs ? a : max_abs;
                if (!(a <= DBL_MAX)) {
                    status = 1;
                    break;
                }
            }
        }
        else {
            const float *x = (const float *)tb.buf;
            for (Py_ssize_t i = 0; i < total; i++) {
                const double a = fabs((double)x[i]);
                max_abs = a > max_abs ? a : max_abs;
                if (!(a <= FLT_MAX)) {
                    status = 1;
                    break;
                }
            }
        }
        if (status == 0) {
            /* room for the sums of up to d terms of rank * value in double, and for
               theta + sigma Z in theta's dtype */
            const double limit = pb.fmt == FMT_F64 ? DBL_MAX / (4.0 * (double)pb.d * (double)pb.d)
                                                   : (double)FLT_MAX / 4.0;
            if (!(max_abs + sigma * NOISE_BOUND < limit))
                status = 2;
        }
        Py_END_ALLOW_THREADS
        if (status != 0) {
            result = PyLong_FromLong(status);
            goto done;
        }
    }
    {
        /* Chunks of ~2^22 element-samples: each takes milliseconds, then Ctrl-C is checked. */
        const double per = (double)pb.B * (double)pb.d * (double)(pb.V < 8 ? 1 : pb.V / 8);
        Py_ssize_t chunk = (Py_ssize_t)(4194304.0 / (per > 1.0 ? per : 1.0));
        chunk = (chunk / SBLK + 1) * SBLK; /* whole blocks of samples */
        for (Py_ssize_t i0 = 0; i0 < N; i0 += chunk) {
            const Py_ssize_t i1 = i0 + chunk < N ? i0 + chunk : N;
            Py_BEGIN_ALLOW_THREADS
            run_chunk(&pb, sc, tasks, nt, (uint32_t)i0, (uint32_t)i1);
            Py_END_ALLOW_THREADS
            if (i1 < N && PyErr_CheckSignals() < 0)
                goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (pb.fmt == FMT_F64)
        finish_f64(&pb, held_o ? ob.buf : NULL, held_v ? vb.buf : NULL);
    else
        finish_f32(&pb, held_o ? ob.buf : NULL, held_v ? vb.buf : NULL);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(0);
done:
    for (int t = 0; t < n_sc; t++)
        scratch_free(&sc[t]);
    PyMem_RawFree(pb.acc);
    if (held_v)
        PyBuffer_Release(&vb);
    if (held_o)
        PyBuffer_Release(&ob);
    if (held_a)
        PyBuffer_Release(&ab);
    if (held_t)
        PyBuffer_Release(&tb);
    return result;
}

/* noise(z, e, key, noise) -> None: z (N, B, d) gets Z; e (same shape, Gumbel only, or
   None) gets E = -log U.  The samples every kernel above draws. */
static PyObject *py_noise(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *zo, *eo, *keyo;
    int noise;
    if (!PyArg_ParseTuple(args, "OOOi:noise", &zo, &eo, &keyo, &noise))
        return NULL;
    if (noise != NOISE_GUMBEL && noise != NOISE_NORMAL) {
        PyErr_Format(PyExc_ValueError, "noise must be 0 (gumbel) or 1 (normal), got %d", noise);
        return NULL;
    }
    uint32_t k0, k1;
    if (parse_key(keyo, &k0, &k1) < 0)
        return NULL;
    Py_buffer zb, eb;
    int fmt = acquire(zo, &zb, "z", 1, FMT_BAD, 3, NULL);
    if (fmt == FMT_BAD)
        return NULL;
    int held_e = 0;
    PyObject *result = NULL;
    Scratch sc;
    int held_sc = 0;
    if (eo != Py_None) {
        if (noise != NOISE_GUMBEL) {
            PyErr_SetString(PyExc_ValueError, "e is only defined for Gumbel noise");
            goto done;
        }
        const Py_ssize_t dims[3] = {zb.shape[0], zb.shape[1], zb.shape[2]};
        if (acquire(eo, &eb, "e", 1, fmt, 3, dims) == FMT_BAD)
            goto done;
        held_e = 1;
    }
    if ((unsigned long long)zb.shape[0] > 0xFFFFFFFFull || zb.shape[2] > 0x7FFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "z is too large (N < 2**32 samples, d < 2**31)");
        goto done;
    }
    {
        Problem pb;
        memset(&pb, 0, sizeof pb);
        pb.fmt = fmt;
        pb.gumbel = noise == NOISE_GUMBEL;
        pb.B = zb.shape[1];
        pb.d = zb.shape[2];
        pb.mode = MODE_FWD;
        pb.G = (pb.d + 3) / 4;
        pb.V = 1;
        pb.k0 = k0;
        pb.k1 = k1;
        const Py_ssize_t N = zb.shape[0];
        if (pb.d == 0 || pb.B == 0 || N == 0) {
            Py_INCREF(Py_None);
            result = Py_None;
            goto done;
        }
        if (scratch_alloc(&sc, &pb) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        held_sc = 1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i0 = 0; i0 < N; i0 += SBLK)
            for (Py_ssize_t b = 0; b < pb.B; b++) {
                if (fmt == FMT_F64)
                    draw_f64(&pb, &sc, (uint32_t)i0, (uint64_t)b, 1);
                else
                    draw_f32(&pb, &sc, (uint32_t)i0, (uint64_t)b, 1);
                for (Py_ssize_t s = 0; s < SBLK && i0 + s < N; s++) {
                    const size_t off = ((size_t)(i0 + s) * (size_t)pb.B + (size_t)b) * (size_t)pb.d;
                    for (Py_ssize_t j = 0; j < pb.d; j++) {
                        const size_t src = (size_t)j * SBLK + (size_t)s;
                        if (fmt == FMT_F64) {
                            ((double *)zb.buf)[off + j] = ((double *)sc.z)[src];
                            if (held_e)
                                ((double *)eb.buf)[off + j] = ((double *)sc.e)[src];
                        }
                        else {
                            ((float *)zb.buf)[off + j] = ((float *)sc.z)[src];
                            if (held_e)
                                ((float *)eb.buf)[off + j] = ((float *)sc.e)[src];
                        }
                    }
                }
            }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (held_sc)
        scratch_free(&sc);
    if (held_e)
        PyBuffer_Release(&eb);
    PyBuffer_Release(&zb);
    return result;
}

/* philox(key, ctr, out): out[n] = Philox-4x32-10(ctr[n]) for (n, 4) uint32 arrays. */
static PyObject *py_philox(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *keyo, *co, *oo;
    if (!PyArg_ParseTuple(args, "OOO:philox", &keyo, &co, &oo))
        return NULL;
    uint32_t k0, k1;
    if (parse_key(keyo, &k0, &k1) < 0)
        return NULL;
    Py_buffer cb, ob;
    const Py_ssize_t d4[2] = {-1, 4};
    if (acquire(co, &cb, "ctr", 0, FMT_U32, 2, d4) == FMT_BAD)
        return NULL;
    const Py_ssize_t dims[2] = {cb.shape[0], 4};
    if (acquire(oo, &ob, "out", 1, FMT_U32, 2, dims) == FMT_BAD) {
        PyBuffer_Release(&cb);
        return NULL;
    }
    const uint32_t *c = (const uint32_t *)cb.buf;
    uint32_t *o = (uint32_t *)ob.buf;
    for (Py_ssize_t n = 0; n < cb.shape[0]; n++) {
        uint32_t x[4] = {c[4 * n], c[4 * n + 1], c[4 * n + 2], c[4 * n + 3]};
        philox_block(x, k0, k1);
        memcpy(o + 4 * n, x, sizeof x);
    }
    PyBuffer_Release(&ob);
    PyBuffer_Release(&cb);
    Py_RETURN_NONE;
}

/* math(which, x, out): the elementwise kernels, for tests.  which 0: log of positive
   normal x; which 1: cos, 2: sin of 2 pi (w + 1/2) / 2^32 for uint32 words x; 3: exp of
   x in [0, 600] (float32: [0, 60]). */
static PyObject *py_math(PyObject *self, PyObject *args)
{
    (void)self;
    int which;
    PyObject *xo, *oo;
    if (!PyArg_ParseTuple(args, "iOO:math", &which, &xo, &oo))
        return NULL;
    if (which < 0 || which > 3) {
        PyErr_Format(PyExc_ValueError,
                     "which must be 0 (log), 1 (cos), 2 (sin) or 3 (exp), got %d", which);
        return NULL;
    }
    Py_buffer xb, ob;
    const int real = which == 0 || which == 3;
    if (acquire(xo, &xb, "x", 0, real ? FMT_BAD : FMT_U32, 1, NULL) == FMT_BAD)
        return NULL;
    const Py_ssize_t n = xb.shape[0];
    const Py_ssize_t dims[1] = {n};
    int fo = acquire(oo, &ob, "out", 1, FMT_BAD, 1, dims);
    if (fo == FMT_BAD) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    int fx = decode_format(xb.format, xb.itemsize);
    if (real && fx != fo) {
        PyErr_SetString(PyExc_TypeError, "out must have x's dtype");
        goto fail;
    }
    if (real) {
        for (Py_ssize_t i = 0; i < n; i++) {
            const double v = fx == FMT_F64 ? ((double *)xb.buf)[i] : (double)((float *)xb.buf)[i];
            const double lo = which == 3 ? 0.0 : fx == FMT_F64 ? DBL_MIN : (double)FLT_MIN;
            const double hi = which == 3 ? (fx == FMT_F64 ? RATIO_LIMIT_F64 : RATIO_LIMIT_F32)
                                         : fx == FMT_F64 ? DBL_MAX : (double)FLT_MAX;
            if (!(v >= lo && v <= hi)) {
                PyObject *bad = PyFloat_FromDouble(v);
                if (bad) {
                    PyErr_Format(PyExc_ValueError, "x must hold %s, got %R at index %zd",
                                 which == 3 ? "numbers in [0, the ratio limit]"
                                            : "positive normal numbers", bad, i);
                    Py_DECREF(bad);
                }
                goto fail;
            }
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (fx == FMT_F64)
                ((double *)ob.buf)[i] = which == 3 ? vexp_f64(((double *)xb.buf)[i])
                                                   : vlog_f64(((double *)xb.buf)[i]);
            else
                ((float *)ob.buf)[i] = which == 3 ? vexp_f32(((float *)xb.buf)[i])
                                                  : vlog_f32(((float *)xb.buf)[i]);
        }
    }
    else {
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint32_t w = ((uint32_t *)xb.buf)[i];
            if (fo == FMT_F64) {
                double c, s;
                sincos_f64(w, &c, &s);
                ((double *)ob.buf)[i] = which == 1 ? c : s;
            }
            else {
                float c, s;
                sincos_f32(w, &c, &s);
                ((float *)ob.buf)[i] = which == 1 ? c : s;
            }
        }
    }
    PyBuffer_Release(&ob);
    PyBuffer_Release(&xb);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&ob);
    PyBuffer_Release(&xb);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", py_run, METH_VARARGS,
     "run(mode, theta, aux, out, value, key, n_samples, sigma, noise, solver, k,\n"
     "    control_variate, n_threads) -> status\n--\n\n"
     "Fused perturbed estimate over the rows of theta (B, d), C-contiguous float32/64.\n"
     "mode 0 (forward): out (B, L) = mean solver output or None, value (B,) = mean\n"
     "<y, theta + sigma Z> or None. mode 1 (vjp): aux = g (V, B, L), out (V, B, d).\n"
     "mode 2 (jvp): aux = v (V, B, d), out (V, B, L). L = d, or d*d for sort_permutation.\n"
     "noise 0 gumbel, 1 normal; solver 0 argmax, 1 top-k, 2 hard rank, 3 sort\n"
     "permutation. Returns 0, or 1 (theta holds NaN/inf), 2 (theta + sigma Z would\n"
     "overflow) with nothing written."},
    {"noise", py_noise, METH_VARARGS,
     "noise(z, e, key, noise)\n--\n\nThe samples the kernels draw: z (N, B, d) gets Z, e gets\n"
     "E = -log U (Gumbel; or None)."},
    {"philox", py_philox, METH_VARARGS,
     "philox(key, ctr, out)\n--\n\nPhilox-4x32-10 of each (n, 4) uint32 counter, key a 64-bit int."},
    {"math", py_math, METH_VARARGS,
     "math(which, x, out)\n--\n\nElementwise kernels for tests: 0 log, 1 cos, 2 sin of\n"
     "2 pi (w + 1/2) / 2^32 (x uint32; out float32 or float64), 3 exp on [0, 600]\n"
     "(float32: [0, 60])."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_perturb_c",
    "Fused perturbed-optimizer kernels (Philox noise regenerated, never stored).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__perturb_c(void)
{
    pick_philox();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "HAVE_PTHREADS", HAVE_PTHREADS) < 0 ||
              PyModule_AddStringConstant(m, "PHILOX_ISA", philox_isa) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#else /* ================================================= PERTURB_TEMPLATE: typed code */

/* Noise of samples i0 .. i0 + SBLK - 1 of row b, column-major blocks: E = -log U
   (Gumbel) in sc->e, and Z in sc->z when need_z (normal noise always). */
CLONES
static void SFX(draw)(const Problem *pb, Scratch *sc, uint32_t i0, uint64_t b, int need_z)
{
    const Py_ssize_t n = SBLK * 4 * pb->G;
    const uint32_t *restrict w = sc->words;
    T *restrict z = (T *)sc->z;
    T *restrict e = (T *)sc->e;
    philox_samples(sc->words, pb->G, i0, (uint32_t)b, (uint32_t)(b >> 32), pb->k0, pb->k1);
    if (pb->gumbel) {
        for (Py_ssize_t j = 0; j < n; j++)
            e[j] = -SFX(vlog)(SFX(uniform)(w[j]));
        if (need_z)
            for (Py_ssize_t j = 0; j < n; j++)
                z[j] = -SFX(vlog)(e[j]);
    }
    else {
        /* columns 2q, 2q + 1 of a sample: R from word 2q, the angle from word 2q + 1 */
        for (Py_ssize_t q = 0; q < 2 * pb->G; q++) {
            const uint32_t *restrict w0 = w + 2 * q * SBLK, *restrict w1 = w0 + SBLK;
            T *restrict z0 = z + 2 * q * SBLK, *restrict z1 = z0 + SBLK;
            for (int s = 0; s < SBLK; s++) {
                const T r = SFX(vsqrt)(-2 * SFX(vlog)(SFX(uniform)(w0[s])));
                T c, si;
                SFX(sincos)(w1[s], &c, &si);
                z0[s] = r * c;
                z1[s] = r * si;
            }
        }
    }
}

/* Block scores: theta + sigma Z, or -E r (Gumbel ratio scores, see row_chunk). */
CLONES
static void SFX(scores)(T *restrict p, const T *restrict src, const T *restrict coef, T sig,
                        Py_ssize_t d, int ratio)
{
    if (ratio)
        for (Py_ssize_t j = 0; j < d; j++)
            for (int s = 0; s < SBLK; s++)
                p[j * SBLK + s] = -(src[j * SBLK + s] * coef[j]);
    else
        for (Py_ssize_t j = 0; j < d; j++)
            for (int s = 0; s < SBLK; s++)
                p[j * SBLK + s] = coef[j] + sig * src[j * SBLK + s];
}

/*
 * First index of the maximum score of every sample of a block, scores computed on the
 * fly as in SFX(scores).  Vertical: one lane per sample, a running maximum over the
 * columns by compare and bit-select (strict >, so the first maximum stays); two
 * interleaved chains (even and odd columns) hide the compare latency, and are merged
 * preferring the lower index on equal values.
 */
CLONES
static void SFX(argmax_block)(const T *restrict src, const T *restrict coef, T sig,
                              Py_ssize_t d, int ratio, int32_t *restrict out)
{
    VT m0, m1;
    VI i0 = {0}, i1 = {0}, c0 = {0}, c1, two;
    for (int s = 0; s < SBLK; s++) {
        c1[s] = 1;
        i1[s] = 1;
        two[s] = 2;
    }
#define SCORE(x, j)                                                                      \
    do {                                                                                 \
        const T *q_ = src + (j) * SBLK;                                                  \
        if (ratio)                                                                       \
            for (int s = 0; s < SBLK; s++)                                               \
                (x)[s] = -(q_[s] * coef[j]);                                             \
        else                                                                             \
            for (int s = 0; s < SBLK; s++)                                               \
                (x)[s] = coef[j] + sig * q_[s];                                          \
    } while (0)
    SCORE(m0, 0);
    if (d == 1) {
        for (int s = 0; s < SBLK; s++)
            out[s] = 0;
        return;
    }
    SCORE(m1, 1);
    Py_ssize_t j = 2;
    for (; j + 1 < d; j += 2) {
        VT x0, x1;
        SCORE(x0, j);
        SCORE(x1, j + 1);
        c0 += two;
        c1 += two;
        const VI g0 = x0 > m0, g1 = x1 > m1;
        m0 = (VT)(((VI)x0 & g0) | ((VI)m0 & ~g0));
        i0 = (c0 & g0) | (i0 & ~g0);
        m1 = (VT)(((VI)x1 & g1) | ((VI)m1 & ~g1));
        i1 = (c1 & g1) | (i1 & ~g1);
    }
    if (j < d) {
        VT x0;
        SCORE(x0, j);
        c0 += two;
        const VI g0 = x0 > m0;
        m0 = (VT)(((VI)x0 & g0) | ((VI)m0 & ~g0));
        i0 = (c0 & g0) | (i0 & ~g0);
    }
#undef SCORE
    const VI take1 = (m1 > m0) | ((m1 == m0) & (i1 < i0));
    const VI ix = (i1 & take1) | (i0 & ~take1);
    for (int s = 0; s < SBLK; s++)
        out[s] = (int32_t)ix[s];
}

/* acc[j, s] += w[s] score[j, s] over a block (per-lane float64 sums of the vjp). */
CLONES
static void SFX(lanes_acc)(double *restrict acc, const double *restrict w,
                           const T *restrict score, Py_ssize_t d)
{
    for (Py_ssize_t j = 0; j < d; j++)
        for (int s = 0; s < SBLK; s++)
            acc[j * SBLK + s] += w[s] * (double)score[j * SBLK + s];
}

/* acc[j] += sum_s w[s] score[j, s] (vjp with several cotangents). */
static void SFX(flush_dot)(double *restrict acc, const double *restrict w,
                           const T *restrict score, Py_ssize_t d)
{
    for (Py_ssize_t j = 0; j < d; j++) {
        double t = 0.0;
        for (int s = 0; s < SBLK; s++)
            t += w[s] * (double)score[j * SBLK + s];
        acc[j] += t;
    }
}

/* t[s] = sum_j v[j] score[j, s] in float64 (the jvp's per-sample products). */
CLONES
static void SFX(dot_block)(double *restrict t, const T *restrict v, const T *restrict score,
                           Py_ssize_t d)
{
    for (int s = 0; s < SBLK; s++)
        t[s] = 0.0;
    for (Py_ssize_t j = 0; j < d; j++)
        for (int s = 0; s < SBLK; s++)
            t[s] += (double)v[j] * (double)score[j * SBLK + s];
}

/* The solver on one row of scores p[j * ps] (ps: the stride of a block column); its
   output as L (position, weight) pairs: argmax: (index, 1); top-k: k (index, 1); rank:
   (column, rank); sort permutation: (p d + column, 1) for each sorted position p. */
static Py_ssize_t SFX(solve_row)(const Problem *pb, Scratch *sc, const T *restrict p,
                                 Py_ssize_t ps, uint32_t *restrict pos, double *restrict wt)
{
    const Py_ssize_t d = pb->d;
    switch (pb->solver) {
    case SOLVER_ARGMAX: {
        Py_ssize_t bi = 0;
        for (Py_ssize_t j = 1; j < d; j++)
            if (p[j * ps] > p[bi * ps])
                bi = j;
        pos[0] = (uint32_t)bi;
        wt[0] = 1.0;
        return 1;
    }
    case SOLVER_TOPK: {
        /* the k largest, ties lowest index first: a buffer sorted by (value desc, index
           asc).  Columns are visited in theta's descending order, so the buffer fills
           with (nearly) the winners and later columns rarely enter. */
        const Py_ssize_t k = pb->k;
        T *restrict v = (T *)sc->topv;
        const uint32_t *order = sc->perm0;
        Py_ssize_t n = 0;
        for (Py_ssize_t q0 = d - 1; q0 >= 0; q0--) {
            const uint32_t j = order[q0];
            const T x = p[j * ps];
            if (n == k && !(x > v[k - 1] || (x == v[k - 1] && j < pos[k - 1])))
                continue;
            Py_ssize_t q = n < k ? n : k - 1;
            while (q > 0 && (x > v[q - 1] || (x == v[q - 1] && j < pos[q - 1]))) {
                v[q] = v[q - 1];
                pos[q] = pos[q - 1];
                q--;
            }
            v[q] = x;
            pos[q] = j;
            if (n < k)
                n++;
        }
        for (Py_ssize_t q = 0; q < k; q++)
            wt[q] = 1.0;
        return k;
    }
    default: {
        /* ascending order, ties lower index first; start from theta's order */
        uint64_t *restrict key = sc->key;
        if (sizeof(T) == 4) {
            /* float32: (32-bit key, index) packed in one word, sorted directly */
            for (Py_ssize_t q = 0; q < d; q++) {
                const uint32_t j = sc->perm0[q];
                key[q] = (OKEY(p[j * ps]) << 32) | j;
            }
            sort_packed(key, (uint64_t *)sc->tmp, d);
            for (Py_ssize_t q = 0; q < d; q++)
                sc->perm[q] = (uint32_t)key[q];
        }
        else {
            for (Py_ssize_t j = 0; j < d; j++)
                key[j] = OKEY(p[j * ps]);
            memcpy(sc->perm, sc->perm0, (size_t)d * sizeof(uint32_t));
            sort_perm(sc->perm, sc->tmp, key, d);
        }
        if (pb->solver == SOLVER_RANK)
            for (Py_ssize_t q = 0; q < d; q++) {
                pos[q] = sc->perm[q];
                wt[q] = (double)(q + 1);
            }
        else
            for (Py_ssize_t q = 0; q < d; q++) {
                pos[q] = (uint32_t)(q * d + sc->perm[q]);
                wt[q] = 1.0;
            }
        return d;
    }
    }
}

/*
 * Samples [i0, i1) of row b (i0 a multiple of SBLK), added to the row's accumulators.
 *
 * Gumbel rows are scored by -E_j r_j, r_j = exp((max theta - theta_j) / sigma), rather
 * than theta_j + sigma Z_j = theta_j - sigma log E_j: (theta_j - max theta) / sigma -
 * log E_j = -log(E_j r_j) orders the coordinates the same way, and saves the second log
 * per element.  Rows with (max - min) / sigma above RATIO_LIMIT, where r would overflow
 * or lose the order of far-apart coordinates, are scored by theta + sigma Z.
 */
static void SFX(row_chunk)(const Problem *pb, Scratch *sc, Py_ssize_t b, uint32_t i0,
                           uint32_t i1)
{
    const Py_ssize_t d = pb->d, V = pb->V, B = pb->B, lacc = pb->lacc;
    const T *theta = (const T *)pb->theta + b * d;
    const T sig = (T)pb->sigma;
    if (pb->solver != SOLVER_ARGMAX) {
        /* theta's own order: the insertion sort of each sample starts from it, top-k
           visits the columns in its reverse */
        uint64_t *key = sc->key;
        for (Py_ssize_t j = 0; j < d; j++) {
            key[j] = OKEY(theta[j]);
            sc->perm0[j] = (uint32_t)j;
        }
        sort_perm(sc->perm0, sc->tmp, key, d);
    }
    int ratio = 0;
    T *restrict r = (T *)sc->r;
    if (pb->gumbel) {
        T tmax = theta[0], tmin = theta[0];
        for (Py_ssize_t j = 1; j < d; j++) {
            tmax = theta[j] > tmax ? theta[j] : tmax;
            tmin = theta[j] < tmin ? theta[j] : tmin;
        }
        ratio = (tmax - tmin) / sig <= RATIO_LIMIT;
        if (ratio)
            for (Py_ssize_t j = 0; j < d; j++)
                r[j] = SFX(vexp)((tmax - theta[j]) / sig);
    }
    const T *coef = ratio ? r : theta;
    const int value = pb->mode == MODE_FWD && pb->want_value;
    /* Z itself: for normal noise, for rows without ratio scores, and for a rank's value
       (every coordinate); argmax and top-k values take the log of E per winner. */
    const int need_z = !pb->gumbel || !ratio || (value && pb->solver == SOLVER_RANK);
    Py_ssize_t L0 = 0;
    if (pb->cv && pb->mode != MODE_FWD) {
        L0 = SFX(solve_row)(pb, sc, theta, 1, sc->pos0, sc->wt0);
        if (pb->mode == MODE_VJP)
            for (Py_ssize_t v = 0; v < V; v++) {
                const T *g = (const T *)pb->aux + (v * B + b) * pb->laux;
                double w0 = 0.0;
                for (Py_ssize_t q = 0; q < L0; q++)
                    w0 += sc->wt0[q] * (double)g[sc->pos0[q]];
                sc->w0[v] = w0;
            }
    }
    if (pb->mode == MODE_JVP && pb->gumbel)
        for (Py_ssize_t v = 0; v < V; v++) {
            const T *vv = (const T *)pb->aux + (v * B + b) * d;
            double t = 0.0;
            for (Py_ssize_t j = 0; j < d; j++)
                t += (double)vv[j];
            sc->vsum[v] = t;
        }
    const int lanes = pb->mode == MODE_VJP && V == 1;
    if (lanes)
        memset(sc->accl, 0, (size_t)d * SBLK * sizeof(double));
    uint32_t one_pos[1];
    double one_wt[1] = {1.0};

    for (uint32_t ib = i0; ib < i1; ib += SBLK) {
        const int ns = i1 - ib < SBLK ? (int)(i1 - ib) : SBLK;
        SFX(draw)(pb, sc, ib, (uint64_t)b, need_z);
        const T *restrict z = (const T *)sc->z;
        const T *restrict e = (const T *)sc->e;
        const T *restrict score = pb->gumbel ? e : z; /* grad nu(Z) = 1 - E or Z */
        const T *restrict src = ratio ? e : z;
        const T *restrict p = (const T *)sc->p;
        if (pb->solver == SOLVER_ARGMAX)
            SFX(argmax_block)(src, coef, sig, d, ratio, sc->kidx);
        else
            SFX(scores)((T *)sc->p, src, coef, sig, d, ratio);
        if (pb->mode == MODE_JVP)
            for (Py_ssize_t v = 0; v < V; v++) {
                double *t = sc->tv + v * SBLK;
                SFX(dot_block)(t, (const T *)pb->aux + (v * B + b) * d, score, d);
                if (pb->gumbel)
                    for (int s = 0; s < SBLK; s++)
                        t[s] = sc->vsum[v] - t[s];
            }
        for (int s = 0; s < SBLK; s++) {
            if (s >= ns) { /* samples past the chunk: weight 0 in the block sums */
                if (pb->mode == MODE_VJP)
                    for (Py_ssize_t v = 0; v < V; v++)
                        sc->w[v * SBLK + s] = 0.0;
                continue;
            }
            const uint32_t *pos;
            const double *wt;
            Py_ssize_t L;
            if (pb->solver == SOLVER_ARGMAX) {
                one_pos[0] = (uint32_t)sc->kidx[s];
                pos = one_pos;
                wt = one_wt;
                L = 1;
            }
            else {
                L = SFX(solve_row)(pb, sc, p + s, SBLK, sc->pos, sc->wt);
                pos = sc->pos;
                wt = sc->wt;
            }
            if (pb->mode == MODE_FWD) {
                double *acc = pb->acc + b * lacc;
                for (Py_ssize_t q = 0; q < L; q++)
                    acc[pos[q]] += wt[q];
                if (value) {
                    /* <y, theta + sigma Z>, theta + sigma Z rounded as in the stacked path */
                    double val = 0.0;
                    for (Py_ssize_t q = 0; q < L; q++) {
                        const Py_ssize_t c = pos[q], at = c * SBLK + s;
                        const T pc = !ratio ? (pb->solver == SOLVER_ARGMAX
                                                   ? theta[c] + sig * z[at] : p[at])
                                            : theta[c] + sig * (need_z ? z[at]
                                                                       : -SFX(vlog)(e[at]));
                        val += wt[q] * (double)pc;
                    }
                    pb->acc2[b] += val;
                }
            }
            else if (pb->mode == MODE_VJP) {
                for (Py_ssize_t v = 0; v < V; v++) {
                    const T *g = (const T *)pb->aux + (v * B + b) * pb->laux;
                    double w = 0.0;
                    for (Py_ssize_t q = 0; q < L; q++)
                        w += wt[q] * (double)g[pos[q]];
                    sc->w[v * SBLK + s] = pb->cv ? w - sc->w0[v] : w;
                }
            }
            else {
                for (Py_ssize_t v = 0; v < V; v++) {
                    const double t = sc->tv[v * SBLK + s];
                    double *acc = pb->acc + (v * B + b) * lacc;
                    for (Py_ssize_t q = 0; q < L; q++)
                        acc[pos[q]] += wt[q] * t;
                    pb->acc2[v * B + b] += t;
                }
            }
        }
        if (pb->mode == MODE_VJP) {
            /* sum_s w_s score_s; Gumbel: score = 1 - E, finished as W - sum w E */
            for (Py_ssize_t v = 0; v < V; v++) {
                const double *w = sc->w + v * SBLK;
                double W = 0.0;
                for (int s = 0; s < SBLK; s++)
                    W += w[s];
                pb->acc2[v * B + b] += W;
                if (lanes)
                    SFX(lanes_acc)(sc->accl, w, score, d);
                else
                    SFX(flush_dot)(pb->acc + (v * B + b) * lacc, w, score, d);
            }
        }
    }
    if (lanes) {
        double *acc = pb->acc + b * lacc;
        for (Py_ssize_t j = 0; j < d; j++) {
            double t = 0.0;
            for (int s = 0; s < SBLK; s++)
                t += sc->accl[j * SBLK + s];
            acc[j] += t;
        }
    }
    if (pb->cv && pb->mode == MODE_JVP && i1 == (uint32_t)pb->N) {
        /* subtract y0 * (sum of t), once, after the row's last sample */
        for (Py_ssize_t v = 0; v < V; v++) {
            double *acc = pb->acc + (v * B + b) * lacc;
            const double t = pb->acc2[v * B + b];
            for (Py_ssize_t q = 0; q < L0; q++)
                acc[sc->pos0[q]] -= sc->wt0[q] * t;
        }
    }
}

/* Accumulators -> outputs in theta's dtype. */
static void SFX(finish)(const Problem *pb, void *out, void *value)
{
    const Py_ssize_t VB = pb->V * pb->B, lacc = pb->lacc, d = pb->d;
    const T n = (T)pb->N;
    if (pb->mode == MODE_FWD) {
        if (out)
            for (Py_ssize_t i = 0; i < VB * lacc; i++)
                ((T *)out)[i] = (T)pb->acc[i] / n; /* integer sums: exact in T */
        if (value)
            for (Py_ssize_t b = 0; b < pb->B; b++)
                ((T *)value)[b] = (T)(pb->acc2[b] / (double)pb->N);
        return;
    }
    const double scale = 1.0 / ((double)pb->N * pb->sigma);
    if (pb->mode == MODE_VJP) {
        for (Py_ssize_t r = 0; r < VB; r++) {
            const double *acc = pb->acc + r * lacc;
            const double W = pb->acc2[r];
            T *o = (T *)out + r * d;
            for (Py_ssize_t j = 0; j < d; j++)
                o[j] = (T)((pb->gumbel ? W - acc[j] : acc[j]) * scale);
        }
        return;
    }
    for (Py_ssize_t i = 0; i < VB * lacc; i++)
        ((T *)out)[i] = (T)(pb->acc[i] * scale);
}

#endif /* PERTURB_TEMPLATE */
