/*
 * Pool-Adjacent-Violators (PAV) for the two isotonic problems behind soft sort/rank
 * (Blondel, Teboul, Berthet, Djolonga, ICML 2020), row by row over a C-contiguous
 * 2-D float32 or float64 buffer.  Every row gets its NON-INCREASING fit:
 *
 *   l2(y, w, out_v, out_block):  argmin_v sum_i w_i (v_i - y_i)^2,  w = None -> ones
 *                                block value = weighted mean of the block
 *   kl(y, w, out_v, out_block):  argmin_v sum_i exp(y_i - v_i) + exp(w_i) v_i
 *                                block value = logsumexp(y_B) - logsumexp(w_B)
 *
 * out_v has y's shape and format; out_block is int64 and receives, for every element,
 * the index of the first element of its block.  Arrays are read through the buffer
 * protocol only (no NumPy or torch headers), so the extension builds with gcc and the
 * Python headers alone.  Everything is validated before any element is touched; the
 * loops run without the GIL.  float32 input is accumulated in double.
 *
 * The algorithm keeps a stack of blocks (start, two accumulators, value); each element
 * is pushed once and popped at most once, so a row costs O(n).  The arithmetic and its
 * order match nonsmooth/solvers/_isotonic.py's fallback exactly.
 *
 * soft_forward / soft_backward fuse a whole soft sort/rank pass per call (radix sort of
 * the row, PAV on the sorted keys, output assembly; and the vector-Jacobian product):
 * see the section "fused soft sort/rank" below.  soft_forward scans its input for
 * NaN/inf and overflow before writing anything and reports them as a status.
 *
 * NaN/inf are rejected in Python before l2/kl are called.  Should one slip through, the
 * kernel still terminates in O(n): every comparison with NaN is false, so a NaN never
 * triggers a merge; the rows concerned come out with NaN (or inf) values in the
 * affected blocks.  Nothing is read or written outside the buffers either way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------ buffer checks */

enum { FMT_BAD = 0, FMT_F32, FMT_F64, FMT_I64 };

static int native_little_endian(void)
{
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* Decode a struct-module format string of a single native-layout scalar. */
static int decode_format(const char *fmt, Py_ssize_t itemsize)
{
    if (fmt == NULL) /* NULL means unsigned bytes */
        return FMT_BAD;
    if (*fmt == '@' || *fmt == '=')
        fmt++;
    else if (*fmt == '<' || *fmt == '>' || *fmt == '!') {
        int little = (*fmt == '<');
        if (little != native_little_endian())
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
    case 'q':
    case 'l':
        return itemsize == 8 ? FMT_I64 : FMT_BAD;
    default:
        return FMT_BAD;
    }
}

static const char *format_name(int f)
{
    switch (f) {
    case FMT_F32:
        return "float32";
    case FMT_F64:
        return "float64";
    case FMT_I64:
        return "int64";
    default:
        return "?";
    }
}

/*
 * Acquire `obj`'s buffer as `name`.  Strided/indirect requests are used so a
 * non-contiguous or read-only array gets OUR error message (naming the argument)
 * rather than a generic BufferError.  Returns the format code, or FMT_BAD with an
 * exception set (and no buffer held).
 */
static int get_array(PyObject *obj, Py_buffer *view, const char *name, int writable)
{
    /* Outputs are requested writable, as the protocol asks; a refusal is told apart
       from "not a buffer at all" by a second, read-only request. */
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_FULL : PyBUF_FULL_RO) != 0) {
        PyErr_Clear();
        if (writable && PyObject_GetBuffer(obj, view, PyBUF_FULL_RO) == 0) {
            PyBuffer_Release(view);
            PyErr_Format(PyExc_ValueError, "%s must be writable, got a read-only buffer",
                         name);
            return FMT_BAD;
        }
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must support the buffer protocol (a NumPy array), got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return FMT_BAD;
    }
    int fmt = decode_format(view->format, view->itemsize);
    if (fmt == FMT_BAD) {
        PyErr_Format(PyExc_TypeError,
                     "%s must hold native float32, float64 or int64 values, got format '%s'",
                     name, view->format ? view->format : "B");
        goto fail;
    }
    if (view->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D (rows, n), got %d dimensions",
                     name, view->ndim);
        goto fail;
    }
    if (view->suboffsets != NULL || !PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be C-contiguous; pass np.ascontiguousarray(%s)", name, name);
        goto fail;
    }
    if (writable && view->readonly) { /* an exporter that ignored PyBUF_WRITABLE */
        PyErr_Format(PyExc_ValueError, "%s must be writable, got a read-only buffer", name);
        goto fail;
    }
    return fmt;
fail:
    PyBuffer_Release(view);
    return FMT_BAD;
}

/* ------------------------------------------------------------------ kernels */

/* Per-call scratch: the block stack, sized for one row and reused across rows. */
typedef struct {
    Py_ssize_t *start;
    double *acc_a; /* L2: block mean;   KL: logsumexp(y_B) */
    double *acc_b; /* L2: block weight; KL: logsumexp(w_B) */
    double *value; /* KL: block value acc_a - acc_b (L2 uses acc_a) */
} Stack;

static inline double logaddexp(double a, double b)
{
    /* log(e^a + e^b) without overflow: max + log1p(exp(-|a - b|)). */
    return (a > b ? a : b) + log1p(exp(-fabs(a - b)));
}

/* Write every block's value and start over its elements; blocks are stack[0..top). */
#define DEFINE_FILL(NAME, T)                                                             \
    static void NAME(const Stack *stk, const double *values, Py_ssize_t top,             \
                     Py_ssize_t n, T *v, int64_t *blk)                                   \
    {                                                                                    \
        for (Py_ssize_t k = 0; k < top; k++) {                                           \
            const Py_ssize_t s = stk->start[k];                                          \
            const Py_ssize_t e = (k + 1 < top) ? stk->start[k + 1] : n;                  \
            const T val = (T)values[k];                                                  \
            for (Py_ssize_t j = s; j < e; j++) {                                         \
                v[j] = val;                                                              \
                blk[j] = (int64_t)s;                                                     \
            }                                                                            \
        }                                                                                \
    }

DEFINE_FILL(fill_f32, float)
DEFINE_FILL(fill_f64, double)

/*
 * L2 merge: the mean is updated as m_a + (m_b - m_a) * w_b / W, which is exact when
 * the means are equal and never forms a sum of values (|y| ~ 1e300 stays finite); the
 * convex form is used only when the difference itself overflows.
 */
#define DEFINE_L2(NAME, T, FILL)                                                         \
    static void NAME(const T *y, const T *w, T *v, int64_t *blk, Py_ssize_t rows,        \
                     Py_ssize_t n, Stack *stk)                                           \
    {                                                                                    \
        Py_ssize_t *st = stk->start;                                                     \
        double *mean = stk->acc_a, *wt = stk->acc_b;                                     \
        for (Py_ssize_t r = 0; r < rows; r++) {                                          \
            const T *yr = y + r * n;                                                     \
            const T *wr = w ? w + r * n : NULL;                                          \
            Py_ssize_t top = 0;                                                          \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                double m = (double)yr[i];                                                \
                double ww = wr ? (double)wr[i] : 1.0;                                    \
                Py_ssize_t s = i;                                                        \
                while (top > 0 && mean[top - 1] <= m) {                                  \
                    top--;                                                               \
                    const double ma = mean[top], wa = wt[top];                           \
                    const double total = wa + ww;                                        \
                    const double d = m - ma;                                             \
                    s = st[top];                                                         \
                    if (isinf(d))                                                        \
                        m = ma * (wa / total) + m * (ww / total);                        \
                    else                                                                 \
                        m = ma + d * (ww / total);                                       \
                    ww = total;                                                          \
                }                                                                        \
                st[top] = s;                                                             \
                mean[top] = m;                                                           \
                wt[top] = ww;                                                            \
                top++;                                                                   \
            }                                                                            \
            FILL(stk, mean, top, n, v + r * n, blk + r * n);                             \
        }                                                                                \
    }

#define DEFINE_KL(NAME, T, FILL)                                                         \
    static void NAME(const T *y, const T *w, T *v, int64_t *blk, Py_ssize_t rows,        \
                     Py_ssize_t n, Stack *stk)                                           \
    {                                                                                    \
        Py_ssize_t *st = stk->start;                                                     \
        double *ly = stk->acc_a, *lw = stk->acc_b, *val = stk->value;                    \
        for (Py_ssize_t r = 0; r < rows; r++) {                                          \
            const T *yr = y + r * n;                                                     \
            const T *wr = w + r * n;                                                     \
            Py_ssize_t top = 0;                                                          \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                double a = (double)yr[i];                                                \
                double b = (double)wr[i];                                                \
                double x = a - b;                                                        \
                Py_ssize_t s = i;                                                        \
                while (top > 0 && val[top - 1] <= x) {                                   \
                    top--;                                                               \
                    s = st[top];                                                         \
                    a = logaddexp(ly[top], a);                                           \
                    b = logaddexp(lw[top], b);                                           \
                    x = a - b;                                                           \
                }                                                                        \
                st[top] = s;                                                             \
                ly[top] = a;                                                             \
                lw[top] = b;                                                             \
                val[top] = x;                                                            \
                top++;                                                                   \
            }                                                                            \
            FILL(stk, val, top, n, v + r * n, blk + r * n);                              \
        }                                                                                \
    }

DEFINE_L2(l2_f32, float, fill_f32)
DEFINE_L2(l2_f64, double, fill_f64)
DEFINE_KL(kl_f32, float, fill_f32)
DEFINE_KL(kl_f64, double, fill_f64)

/* ------------------------------------------------------------------ fused soft sort/rank
 *
 * One call per forward and one per backward of soft sort/rank (see _soft_sort_core.py
 * for the maths): for every row, sort, isotonic pass and output assembly; for the
 * backward, the block-wise vector-Jacobian product.  The Python layer then pays one
 * call instead of a dozen NumPy passes and temporaries.
 */

/* IEEE order as unsigned order: flip every bit of negatives, the sign bit of the rest. */
static inline uint64_t key_f64(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof b);
    return b ^ ((uint64_t)((int64_t)b >> 63) | UINT64_C(0x8000000000000000));
}

static inline uint64_t key_f32(float f)
{
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return (uint64_t)(b ^ ((uint32_t)((int32_t)b >> 31) | UINT32_C(0x80000000)));
}

/*
 * Stable LSD radix sort of (key, idx) pairs on bytes [lo, hi) of the keys, one byte per
 * pass; a pass whose byte is the same for every key is skipped.  Returns the index
 * buffer that holds the result and sets *keys to its keys.  Radix beats comparison
 * sorts here because it does no data-dependent branching.
 */
static uint32_t *radix_pass(uint64_t *ka, uint32_t *ia, uint64_t *kb, uint32_t *ib,
                            Py_ssize_t n, int lo, int hi, uint64_t **keys)
{
    uint32_t hist[8][256];
    memset(hist, 0, sizeof hist);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k = ka[i];
        for (int b = lo; b < hi; b++)
            hist[b][(k >> (8 * b)) & 255]++;
    }
    uint64_t *ks = ka, *kd = kb;
    uint32_t *is = ia, *id = ib;
    for (int b = lo; b < hi; b++) {
        uint32_t *h = hist[b];
        if (h[(ks[0] >> (8 * b)) & 255] == (uint32_t)n)
            continue;
        uint32_t sum = 0;
        for (int d = 0; d < 256; d++) {
            uint32_t c = h[d];
            h[d] = sum;
            sum += c;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t k = ks[i];
            uint32_t p = h[(k >> (8 * b)) & 255]++;
            kd[p] = k;
            id[p] = is[i];
        }
        uint64_t *tk = ks;
        ks = kd;
        kd = tk;
        uint32_t *ti = is;
        is = id;
        id = ti;
    }
    *keys = ks;
    return is;
}

typedef struct {
    uint64_t *ka, *kb;
    uint32_t *ia, *ib;
    Py_ssize_t *start;
    double *acc_a, *acc_b; /* per block: mean offset from its first key (L2) or exp sum */
    double *u;             /* the row's signed inputs +-x, sorted descending */
    double *ex;            /* KL: exp(u_j - u_0) of the row */
    double gq;    /* KL sort: q = exp(-1 / eps) */
    double *gpow; /* gpow[L] = q^(L-1), gsum[L] = sum_{k<L} q^k, filled up to glen */
    double *gsum;
    Py_ssize_t glen;
} Work;

/* Stable LSD radix sort of packed (key bits << 32 | index) words on bytes [lo, 8). */
static uint64_t *radix_packed(uint64_t *a, uint64_t *b, Py_ssize_t n, int lo)
{
    uint32_t hist[8][256];
    memset(hist[lo], 0, sizeof(uint32_t) * 256 * (size_t)(8 - lo));
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t k = a[i];
        for (int d = lo; d < 8; d++)
            hist[d][(k >> (8 * d)) & 255]++;
    }
    for (int d = lo; d < 8; d++) {
        uint32_t *h = hist[d];
        if (h[(a[0] >> (8 * d)) & 255] == (uint32_t)n)
            continue;
        uint32_t sum = 0;
        for (int c = 0; c < 256; c++) {
            const uint32_t t = h[c];
            h[c] = sum;
            sum += t;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint64_t k = a[i];
            b[h[(k >> (8 * d)) & 255]++] = k;
        }
        uint64_t *t = a;
        a = b;
        b = t;
    }
    return a;
}

/*
 * The row's order: indices sorting the keys ascending, ties by index, into wk->ia.
 * Most rows are settled by a radix sort of one word per element (the top 32 key bits
 * and the index), on only as many top bytes as separate n random keys, then an
 * insertion pass on the full keys, which is O(n) when the top bytes already order
 * almost everything.  Rows where it is not (many keys sharing their top bits) are
 * redone with a full radix sort of (key, index) pairs, so the worst case stays O(n).
 */
#define DEFINE_SORT_ROW(NAME, T, KEY, NBYTES)                                            \
    static const uint32_t *NAME(const T *x, Py_ssize_t n, int desc, Work *wk)            \
    {                                                                                    \
        const uint64_t flip = desc ? ~UINT64_C(0) : 0;                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                             \
            const uint64_t k = KEY(x[i]) ^ flip;                                         \
            const uint64_t hi = NBYTES == 8 ? (k >> 32) : (k & UINT64_C(0xffffffff));   \
            wk->ka[i] = (hi << 32) | (uint64_t)i;                                        \
        }                                                                                \
        int bits = 10;                                                                   \
        while (bits < 32 && ((Py_ssize_t)1 << (bits - 10)) < n)                          \
            bits++;                                                                      \
        uint64_t *p = radix_packed(wk->ka, wk->kb, n, 8 - (bits + 7) / 8);               \
        Py_ssize_t budget = 4 * n + 64;                                                  \
        for (Py_ssize_t i = 1; i < n && budget >= 0; i++) {                              \
            const uint64_t v = p[i];                                                     \
            const uint64_t kv = NBYTES == 8 ? KEY(x[(uint32_t)v]) ^ flip : 0;            \
            Py_ssize_t j = i;                                                            \
            while (j > 0) {                                                              \
                const uint64_t w = p[j - 1];                                             \
                int greater;                                                             \
                if (NBYTES == 4 || (w >> 32) != (v >> 32))                               \
                    greater = w > v;                                                     \
                else {                                                                   \
                    const uint64_t kw = KEY(x[(uint32_t)w]) ^ flip;                      \
                    greater = kw > kv || (kw == kv && (uint32_t)w > (uint32_t)v);        \
                }                                                                        \
                if (!greater)                                                            \
                    break;                                                               \
                p[j] = w;                                                                \
                j--;                                                                     \
            }                                                                            \
            p[j] = v;                                                                    \
            budget -= i - j;                                                             \
        }                                                                                \
        if (budget >= 0) {                                                               \
            for (Py_ssize_t i = 0; i < n; i++)                                           \
                wk->ia[i] = (uint32_t)p[i];                                              \
            return wk->ia;                                                               \
        }                                                                                \
        /* Too many keys share their top bits: sort (full key, index) pairs. */         \
        for (Py_ssize_t i = 0; i < n; i++) {                                             \
            wk->ka[i] = KEY(x[i]) ^ flip;                                                \
            wk->ia[i] = (uint32_t)i;                                                     \
        }                                                                                \
        uint64_t *keys;                                                                  \
        return radix_pass(wk->ka, wk->ia, wk->kb, wk->ib, n, 0, NBYTES, &keys);          \
    }

DEFINE_SORT_ROW(sort_row_f64, double, key_f64, 8)
DEFINE_SORT_ROW(sort_row_f32, float, key_f32, 4)

/*
 * exp(x) for -700 <= x <= 0 (the caller guarantees the range, so no overflow, underflow
 * or NaN handling): x = k ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^13
 * (truncation < 1e-17 relative), 2^k from the exponent bits.  Straight-line and
 * branch-free so a loop of it vectorizes, unlike calls to libm's exp; within 2 ulp.
 */
static inline double exp_nonpos(double x)
{
    const double shift = 6755399441055744.0; /* 1.5 * 2^52: rounds to an integer */
    double kd = x * 1.4426950408889634074 + shift;
    uint64_t ki;
    memcpy(&ki, &kd, sizeof ki);
    kd -= shift;
    /* ln 2 split so that kd * LN2_HI is exact for |k| < 2^20 */
    const double r = (x - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const uint64_t sbits = (ki + 1023) << 52;
    double scale;
    memcpy(&scale, &sbits, sizeof scale);
    return p * scale;
}

/* e[j] = exp((v[j] - v[0]) / eps) (rank) or exp(v[j] - v[0]) (sort) for v descending
   with a spread of at most 700 after scaling.  On x86-64 Linux an AVX2 clone (picked at
   load time) runs the same IEEE operations four lanes wide; without FMA contraction
   (-std=c99) its results are bit-identical to the SSE2 one. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void exp_from_max(double *restrict e, const double *restrict v, Py_ssize_t n,
                         int rank, double eps)
{
    const double v0 = v[0];
    if (rank)
        for (Py_ssize_t j = 0; j < n; j++)
            e[j] = exp_nonpos((v[j] - v0) / eps);
    else
        for (Py_ssize_t j = 0; j < n; j++)
            e[j] = exp_nonpos(v[j] - v0);
}

/* Sum of exp over a block of length L of an arithmetic sequence with step -d, relative
   to its first term: sum_{k<L} q^k, q = exp(-d); extended on demand, shared by rows. */
static inline double geo_sum(Work *wk, Py_ssize_t L)
{
    while (wk->glen < L) {
        Py_ssize_t k = ++wk->glen;
        wk->gpow[k] = (k == 1) ? 1.0 : wk->gpow[k - 1] * wk->gq;
        wk->gsum[k] = (k == 1) ? 1.0 : wk->gsum[k - 1] + wk->gpow[k];
    }
    return wk->gsum[L];
}

static const double LOG1P_64THS[65] = {
    0.0, 0.015504186535965254, 0.030771658666753687,
    0.0458095360312942, 0.06062462181643484, 0.07522342123758753,
    0.08961215868968714, 0.10379679368164356, 0.11778303565638346,
    0.13157635778871926, 0.1451820098444979, 0.15860503017663857,
    0.17185025692665923, 0.184922338494012, 0.19782574332991987,
    0.21056476910734964, 0.22314355131420976, 0.2355660713127669,
    0.24783616390458124, 0.25995752443692605, 0.27193371548364176,
    0.2837681731306446, 0.2954642128938359, 0.3070250352949119,
    0.3184537311185346, 0.329753286372468, 0.3409265869705932,
    0.3519764231571782, 0.3629054936893685, 0.37371640979358406,
    0.38441169891033206, 0.394993808240869, 0.4054651081081644,
    0.415827895143711, 0.42608439531090003, 0.43623676677491807,
    0.44628710262841953, 0.45623743348158763, 0.46608972992459924,
    0.4758459048699639, 0.48550781578170077, 0.4950772667978515,
    0.5045560107523953, 0.5139457511022343, 0.5232481437645479,
    0.5324647988694718, 0.5415972824327444, 0.5506471179526623,
    0.5596157879354227, 0.5685047353526687, 0.5773153650348236,
    0.5860490450035782, 0.5947071077466928, 0.6032908514380843,
    0.6118015411059929, 0.6202404097518576, 0.6286086594223741,
    0.6369074622370692, 0.6451379613735847, 0.6533012720127457,
    0.661398482245365, 0.6694306539426292, 0.6773988235918061,
    0.6853040030989194, 0.6931471805599453};

/* Bounds lo <= log(p) <= hi for a positive normal p, from its exponent and the top 6
   bits of its fraction (width < 0.0156, widened far above the rounding involved). */
static inline void log_bounds(double p, double *lo, double *hi)
{
    uint64_t bits;
    memcpy(&bits, &p, sizeof bits);
    const double el = (double)((int)((bits >> 52) & 0x7ff) - 1023) * 0.69314718055994530942;
    const unsigned k = (unsigned)((bits >> 46) & 63);
    *lo = el + LOG1P_64THS[k] - 1e-9;
    *hi = el + LOG1P_64THS[k + 1] + 1e-9;
}

/*
 * Is  d <= log(p / q)?  p and q are positive normal doubles (products of a block's data
 * sum, at least e^-600, and an arithmetic-side sum, at least 1), so log(p) - log(q) is
 * bracketed from their bit patterns (no division, no log); only a d inside the bracket
 * (width < 0.032) costs a log.
 */
static inline int le_log_ratio(double d, double p, double q)
{
    double plo, phi, qlo, qhi;
    log_bounds(p, &plo, &phi);
    log_bounds(q, &qlo, &qhi);
    if (d <= plo - qhi)
        return 1;
    if (d > phi - qlo)
        return 0;
    return d <= log(p / q);
}

/* sum_{j=a}^{a+L-1} rho_j with rho_j = n - j: the arithmetic side of KL soft rank. */
static inline double rho_sum(Py_ssize_t n, Py_ssize_t a, Py_ssize_t L)
{
    return (double)L * (double)(n - a) - 0.5 * (double)L * (double)(L - 1);
}

/* The difference of two keys, u_a - u_b, from the signed inputs v = +-x sorted
   descending: (v_a - v_b) / eps (rank) or v_a - v_b (sort).  Differences of nearby inputs
   are exact (Sterbenz), so the keys' differences are accurate to an ulp *of the
   difference* at any |x| / eps; x / eps itself is never formed.  A difference that
   overflows (|x| near DBL_MAX, eps > 8) is rescaled first. */
static inline double kdiff(const double *v, Py_ssize_t a, Py_ssize_t b, int rank, double eps)
{
    const double d = v[a] - v[b];
    if (!rank)
        return d;
    return isinf(d) ? v[a] / eps - v[b] / eps : d / eps;
}

static inline double clamp(double v, double lo, double hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/*
 * Forward for one row.  u = keys sorted descending (x / eps for rank, x for sort, with
 * the direction's sign); in sorted coordinates the fitted vector s and the target w are
 * rank: s = u, w = rho (L2) or log rho (KL);  sort: s = rho / eps, w = u.  PAV finds the
 * blocks of the non-increasing fit v = iso(s - w) (L2) or iso_kl(s, w) (KL); the output
 * is s - v per block (KL rank: exp(s - v), the paper's operator, in P(rho)).
 *
 * Cancellation-free: u is never formed, only key differences u_a - u_b = (v_a - v_b)/eps
 * (kdiff), exact to an ulp of the difference.  A block is anchored at its first key md
 * and keeps its data relative to it -- the mean offset m (L2) or sum exp(u - md) (KL) --
 * while the arithmetic side (rho, log rho or rho / eps) is a closed form in the block's
 * start and length.  Two adjacent blocks are compared through md1 - md2 against
 * closed-form differences of the arithmetic side; nothing forms s - w.  So ties pool
 * and stay exactly tied, and singletons return w exactly, at any |x| / eps.  The output
 * of a pooled block is a closed form too:
 *   L2 rank  r_j = (n - c) + (u_j - md) - m          (c: the block's centre index)
 *   L2 sort  o_j = (md + m) + (c - j) / eps
 *   KL rank  r_j = S_B exp(u_j - md) / sum_B exp(u - md),  S_B = sum_B rho
 *   KL sort  o_j = md + log sum_B exp(u - md) - (j - a) / eps - log G(L),
 *            G(L) = sum_{k<L} e^{-k/eps}
 * and is clamped to [1, n] (rank) or [u_{n-1}, u_0] (sort), which the exact values
 * satisfy, so rounding never leaves the permutahedron.
 *
 * KL pooling: when the row's keys spread under 600, all exps are taken once against
 * the row's max (a vectorized loop) and a merge is an addition; wider rows take one exp
 * per merge against the absorbing block's anchor.  le_log_ratio compares without a log
 * unless the two values are within 0.032.  `pw` (optional) receives each element's
 * softmax weight within its block, for the backward.
 */
#define DEFINE_SOFT_ROW(NAME, T, SORT)                                                   \
    static void NAME(const T *x, T *out, int64_t *perm, int64_t *blk, Py_ssize_t n,      \
                     int rank, int kl, double eps, double a, Work *wk, double *pw)       \
    {                                                                                    \
        const int desc = a > 0; /* sort x descending to get v (and u) descending */      \
        const uint32_t *idx = SORT(x, n, desc, wk);                                      \
        double *v = wk->u; /* the signed inputs +-x, sorted descending */                \
        for (Py_ssize_t i = 0; i < n; i++) {                                             \
            const uint32_t p = idx[i];                                                   \
            perm[i] = (int64_t)p;                                                        \
            v[i] = desc ? (double)x[p] : -(double)x[p];                                  \
        }                                                                                \
        Py_ssize_t *st = wk->start;                                                      \
        double *ms = wk->acc_b;                                                          \
        Py_ssize_t top = 0;                                                              \
        const int shared = kl && kdiff(v, 0, n - 1, rank, eps) < 600.0;                  \
        double *E = wk->ex;                                                              \
        if (!kl) {                                                                       \
            /* ms: mean of u - u_start over the block.  D = mean_1(u) - mean_2(u);       \
               merge when D <= (L1 + L2) / 2 (rank) or (L1 + L2) / (2 eps) <= D (sort). */ \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                double m = 0.0;                                                          \
                Py_ssize_t s = i;                                                        \
                while (top > 0) {                                                        \
                    const Py_ssize_t s1 = st[top - 1];                                   \
                    const double L = (double)(i + 1 - s1);                               \
                    const double D = kdiff(v, s1, s, rank, eps) + (ms[top - 1] - m);     \
                    if (rank ? !(D <= 0.5 * L) : !(0.5 * L / eps <= D))                  \
                        break;                                                           \
                    top--;                                                               \
                    m = ms[top] - D * ((double)(i + 1 - s) / L);                         \
                    s = s1;                                                              \
                }                                                                        \
                st[top] = s;                                                             \
                ms[top] = m;                                                             \
                top++;                                                                   \
            }                                                                            \
        }                                                                                \
        else if (shared) {                                                               \
            /* E_j = exp(u_j - u_0) in (e^-600, 1], taken in one dependency-free loop;   \
               every block is anchored at u_0 and ms holds its sum of E. */             \
            exp_from_max(E, v, n, rank, eps);                                            \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                double sd = E[i];                                                        \
                Py_ssize_t s = i;                                                        \
                while (top > 0) {                                                        \
                    const Py_ssize_t s1 = st[top - 1];                                   \
                    const Py_ssize_t L1 = s - s1, L2 = i + 1 - s;                        \
                    int merge;                                                           \
                    if (rank) /* sd2 S1 >= sd1 S2 */                                     \
                        merge = ms[top - 1] * rho_sum(n, s, L2) <= sd * rho_sum(n, s1, L1); \
                    else                                                                 \
                        merge = le_log_ratio((double)L1 / eps, geo_sum(wk, L2) * ms[top - 1], \
                                             geo_sum(wk, L1) * sd);                      \
                    if (!merge)                                                          \
                        break;                                                           \
                    top--;                                                               \
                    sd += ms[top];                                                       \
                    s = s1;                                                              \
                }                                                                        \
                st[top] = s;                                                             \
                ms[top] = sd;                                                            \
                top++;                                                                   \
            }                                                                            \
        }                                                                                \
        else {                                                                           \
            /* anchored at the block's first key; ms: sum exp(u - u_start) (>= 1). */   \
            for (Py_ssize_t i = 0; i < n; i++) {                                         \
                double sd = 1.0;                                                         \
                Py_ssize_t s = i;                                                        \
                while (top > 0) {                                                        \
                    const Py_ssize_t s1 = st[top - 1];                                   \
                    const Py_ssize_t L1 = s - s1, L2 = i + 1 - s;                        \
                    const double dm = kdiff(v, s1, s, rank, eps); /* >= 0 */             \
                    int merge;                                                           \
                    if (rank)                                                            \
                        merge = le_log_ratio(dm, sd * rho_sum(n, s1, L1),                \
                                             ms[top - 1] * rho_sum(n, s, L2));           \
                    else                                                                 \
                        merge = le_log_ratio((double)L1 / eps - dm,                      \
                                             geo_sum(wk, L2) * ms[top - 1],              \
                                             geo_sum(wk, L1) * sd);                      \
                    if (!merge)                                                          \
                        break;                                                           \
                    top--;                                                               \
                    sd = ms[top] + sd * exp(-dm);                                        \
                    s = s1;                                                              \
                }                                                                        \
                st[top] = s;                                                             \
                ms[top] = sd;                                                            \
                top++;                                                                   \
            }                                                                            \
        }                                                                                \
        const double lo = rank ? 1.0 : v[n - 1], hi = rank ? (double)n : v[0];           \
        const double lq1 = kl && !rank ? log(-expm1(-1.0 / eps)) : 0.0;                  \
        for (Py_ssize_t k = 0; k < top; k++) {                                           \
            const Py_ssize_t s = st[k];                                                  \
            const Py_ssize_t e = (k + 1 < top) ? st[k + 1] : n;                          \
            const Py_ssize_t L = e - s;                                                  \
            if (L == 1) { /* a singleton returns w exactly */                            \
                blk[s] = (int64_t)s;                                                     \
                if (pw)                                                                  \
                    pw[s] = 1.0;                                                         \
                if (rank)                                                                \
                    out[perm[s]] = (T)(n - s);                                           \
                else                                                                     \
                    out[s] = (T)(desc ? v[s] : -v[s]);                                   \
                continue;                                                                \
            }                                                                            \
            const double half = 0.5 * (double)(L - 1); /* c - s */                       \
            double base = 0.0, isd = 0.0;                                                \
            if (kl) {                                                                    \
                isd = 1.0 / ms[k];                                                       \
                if (rank)                                                                \
                    base = rho_sum(n, s, L) * isd;                                       \
                else                                                                     \
                    base = v[shared ? 0 : s] + log(ms[k])                                \
                           - (log(-expm1(-(double)L / eps)) - lq1);                      \
            }                                                                            \
            for (Py_ssize_t j = s; j < e; j++) {                                         \
                double r;                                                                \
                blk[j] = (int64_t)s;                                                     \
                if (!kl)                                                                 \
                    r = rank ? ((double)(n - s) - half) + (kdiff(v, j, s, 1, eps) - ms[k]) \
                             : (v[s] + ms[k]) + (half - (double)(j - s)) / eps;          \
                else {                                                                   \
                    double ej = 0.0;                                                     \
                    if (rank || pw)                                                      \
                        ej = shared ? E[j] : exp(kdiff(v, j, s, rank, eps));             \
                    if (pw)                                                              \
                        pw[j] = ej * isd;                                                \
                    r = rank ? base * ej : base - (double)(j - s) / eps;                 \
                }                                                                        \
                r = clamp(r, lo, hi);                                                    \
                if (rank)                                                                \
                    out[perm[j]] = (T)r;                                                 \
                else                                                                     \
                    out[j] = (T)(desc ? r : -r);                                         \
            }                                                                            \
        }                                                                                \
    }

DEFINE_SOFT_ROW(soft_row_f64, double, sort_row_f64)
DEFINE_SOFT_ROW(soft_row_f32, float, sort_row_f32)

/*
 * Backward for one row, sorted coordinates, g_j = g[perm_j] (rank) or g[j] (sort),
 * p = 1/|B| (L2) or the block softmax of u (KL), a = +-1/eps (rank):
 *   sort     dx[perm_j] = p_j sum_B g
 *   L2 rank  dx[perm_j] = a (g_j - sum_B p g)
 *   KL rank  dx[perm_j] = a S_B p_j (g_j - sum_B p g)   (J = a S_B (diag p - p p^T))
 * Singleton blocks need no reduction.  `e` is a row of scratch; `pw` the forward's
 * softmax weights (KL) or NULL.
 */
#define DEFINE_SOFT_VJP(NAME, T)                                                         \
    static void NAME(const T *x, const int64_t *perm, const int64_t *blk, const T *g,    \
                     T *dx, Py_ssize_t n, int rank, int kl, double eps, double a,        \
                     double *e, const double *pw)                                        \
    {                                                                                    \
        Py_ssize_t s = 0;                                                                \
        while (s < n) {                                                                  \
            Py_ssize_t end = s + 1;                                                      \
            while (end < n && blk[end] == blk[s])                                        \
                end++;                                                                   \
            if (end - s == 1) {                                                          \
                dx[perm[s]] = rank ? (T)0 : g[s];                                        \
                s = end;                                                                 \
                continue;                                                                \
            }                                                                            \
            const double *p = pw ? pw + s : NULL;                                        \
            if (kl && !p) {                                                              \
                /* e_j = exp(u_j - u_s) from input differences, as in the forward */    \
                const double sign = a > 0 ? 1.0 : -1.0;                                  \
                double z = 0.0;                                                          \
                for (Py_ssize_t j = s; j < end; j++) {                                   \
                    const double d = sign * ((double)x[perm[j]] - (double)x[perm[s]]);   \
                    e[j] = exp(rank ? (isinf(d) ? sign * (double)x[perm[j]] / eps        \
                                                  - sign * (double)x[perm[s]] / eps      \
                                                : d / eps)                               \
                                    : d);                                                \
                    z += e[j];                                                           \
                }                                                                        \
                const double iz = 1.0 / z;                                               \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    e[j] *= iz;                                                          \
                p = e + s;                                                               \
            }                                                                            \
            double sum = 0.0;                                                            \
            if (!rank) {                                                                 \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    sum += (double)g[j];                                                 \
                const double c = sum / (double)(end - s);                                \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    dx[perm[j]] = (T)(kl ? p[j - s] * sum : c);                          \
            }                                                                            \
            else if (!kl) {                                                              \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    sum += (double)g[perm[j]];                                           \
                const double c = sum / (double)(end - s);                                \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    dx[perm[j]] = (T)(a * ((double)g[perm[j]] - c));                     \
            }                                                                            \
            else {                                                                       \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    sum += p[j - s] * (double)g[perm[j]];                                \
                const double c = a * rho_sum(n, s, end - s);                             \
                for (Py_ssize_t j = s; j < end; j++)                                     \
                    dx[perm[j]] = (T)(c * p[j - s] * ((double)g[perm[j]] - sum));        \
            }                                                                            \
            s = end;                                                                     \
        }                                                                                \
    }

DEFINE_SOFT_VJP(soft_vjp_f64, double)
DEFINE_SOFT_VJP(soft_vjp_f32, float)

static double soft_alpha(int rank, double eps, int descending)
{
    const double sign = descending ? -1.0 : 1.0;
    return rank ? sign / eps : -sign;
}

/* Acquire a 2-D C-contiguous buffer of format `want` and shape (rows, n) (rows < 0:
   any).  Returns 0 with the buffer held, -1 with an exception set and nothing held. */
static int get_shaped(PyObject *obj, Py_buffer *view, const char *name, int writable,
                      int want, Py_ssize_t rows, Py_ssize_t n)
{
    int f = get_array(obj, view, name, writable);
    if (f == FMT_BAD)
        return -1;
    if (f != want) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name, format_name(want),
                     format_name(f));
        PyBuffer_Release(view);
        return -1;
    }
    if (rows >= 0 && (view->shape[0] != rows || view->shape[1] != n)) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd), got (%zd, %zd)",
                     name, rows, n, view->shape[0], view->shape[1]);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/*
 * soft_forward(x, out, perm, block, rank, kl, eps, descending, weights=None) -> status
 * status 0: done; 1: x holds NaN/inf; 2: the scaled keys would overflow float64.
 * On a nonzero status nothing has been written (the caller raises the detailed error).
 */
static PyObject *soft_forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *oo, *po, *bo, *wo = Py_None;
    int rank, kl, descending;
    double eps;
    if (!PyArg_ParseTuple(args, "OOOOppdp|O:soft_forward", &xo, &oo, &po, &bo, &rank, &kl,
                          &eps, &descending, &wo))
        return NULL;
    if (!(eps > 0.0) || !isfinite(eps) || !isfinite(1.0 / eps)) {
        PyErr_Format(PyExc_ValueError,
                     "eps must be finite and > 0 with a finite reciprocal, got %R",
                     PyTuple_GET_ITEM(args, 6));
        return NULL;
    }
    Py_buffer xb, ob, pb, bb, wb;
    int held = 0, held_w = 0;
    PyObject *result = NULL;
    Work wk;
    memset(&wk, 0, sizeof wk);
    int fx = get_array(xo, &xb, "x", 0);
    if (fx == FMT_BAD)
        return NULL;
    held = 1;
    if (fx != FMT_F32 && fx != FMT_F64) {
        PyErr_Format(PyExc_TypeError, "x must be float32 or float64, got %s",
                     format_name(fx));
        goto done;
    }
    const Py_ssize_t rows = xb.shape[0], n = xb.shape[1];
    if (get_shaped(oo, &ob, "out", 1, fx, rows, n) < 0)
        goto done;
    held = 2;
    if (get_shaped(po, &pb, "perm", 1, FMT_I64, rows, n) < 0)
        goto done;
    held = 3;
    if (get_shaped(bo, &bb, "block", 1, FMT_I64, rows, n) < 0)
        goto done;
    held = 4;
    if (wo != Py_None) {
        if (!kl) {
            PyErr_SetString(PyExc_ValueError, "weights are only computed for kl");
            goto done;
        }
        if (get_shaped(wo, &wb, "weights", 1, FMT_F64, rows, n) < 0)
            goto done;
        held_w = 1;
    }
    if (rows == 0 || n == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }
    if ((uint64_t)n >= UINT32_MAX || (size_t)n > ((size_t)PY_SSIZE_T_MAX) / 64) {
        PyErr_Format(PyExc_ValueError, "rows of length %zd are too long", n);
        goto done;
    }
    const size_t sz = (size_t)n;
    wk.ka = PyMem_RawMalloc(2 * sz * sizeof(uint64_t));
    wk.ia = PyMem_RawMalloc(2 * sz * sizeof(uint32_t));
    wk.start = PyMem_RawMalloc(sz * sizeof(Py_ssize_t));
    wk.acc_a = PyMem_RawMalloc(4 * sz * sizeof(double));
    wk.gpow = kl && !rank ? PyMem_RawMalloc(2 * (sz + 1) * sizeof(double)) : NULL;
    if (!wk.ka || !wk.ia || !wk.start || !wk.acc_a || (kl && !rank && !wk.gpow)) {
        PyErr_NoMemory();
        goto done;
    }
    wk.kb = wk.ka + sz;
    wk.ib = wk.ia + sz;
    wk.acc_b = wk.acc_a + sz;
    wk.u = wk.acc_a + 2 * sz;
    wk.ex = wk.acc_a + 3 * sz;
    if (kl && !rank) {
        wk.gsum = wk.gpow + (sz + 1);
        wk.gq = exp(-1.0 / eps); /* the arithmetic side rho / eps */
        wk.glen = 0;
    }
    {
        const double a = soft_alpha(rank, eps, descending);
        const Py_ssize_t total = rows * n;
        int status = 0;
        Py_BEGIN_ALLOW_THREADS
        /* Validate every value before any output is written. */
        double max_abs = 0.0;
        if (fx == FMT_F64) {
            const double *x = (const double *)xb.buf;
            for (Py_ssize_t i = 0; i < total; i++) {
                const double ax = fabs(x[i]);
                max_abs = ax > max_abs ? ax : max_abs;
                if (!(ax <= DBL_MAX)) {
                    status = 1;
                    break;
                }
            }
        }
        else {
            const float *x = (const float *)xb.buf;
            for (Py_ssize_t i = 0; i < total; i++) {
                const double ax = fabs((double)x[i]);
                max_abs = ax > max_abs ? ax : max_abs;
                if (!(ax <= FLT_MAX)) {
                    status = 1;
                    break;
                }
            }
        }
        if (status == 0) {
            /* keys are formed in double whatever x's dtype */
            const double limit = DBL_MAX / 8.0;
            const double scaled = rank ? max_abs / eps
                                       : fmax((double)n / eps, max_abs);
            if (!(scaled < limit))
                status = 2;
        }
        if (status == 0) {
            for (Py_ssize_t r = 0; r < rows; r++) {
                int64_t *p = (int64_t *)pb.buf + r * n;
                int64_t *b = (int64_t *)bb.buf + r * n;
                double *w = held_w ? (double *)wb.buf + r * n : NULL;
                if (fx == FMT_F64)
                    soft_row_f64((const double *)xb.buf + r * n, (double *)ob.buf + r * n,
                                 p, b, n, rank, kl, eps, a, &wk, w);
                else
                    soft_row_f32((const float *)xb.buf + r * n, (float *)ob.buf + r * n,
                                 p, b, n, rank, kl, eps, a, &wk, w);
            }
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromLong(status);
    }
done:
    PyMem_RawFree(wk.ka);
    PyMem_RawFree(wk.ia);
    PyMem_RawFree(wk.start);
    PyMem_RawFree(wk.acc_a);
    PyMem_RawFree(wk.gpow);
    if (held_w)
        PyBuffer_Release(&wb);
    if (held >= 4)
        PyBuffer_Release(&bb);
    if (held >= 3)
        PyBuffer_Release(&pb);
    if (held >= 2)
        PyBuffer_Release(&ob);
    PyBuffer_Release(&xb);
    return result;
}

/* soft_backward(x, perm, block, g, dx, rank, kl, eps, descending, weights=None) -> None */
static PyObject *soft_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *po, *bo, *go, *dxo, *wo = Py_None;
    int rank, kl, descending;
    double eps;
    if (!PyArg_ParseTuple(args, "OOOOOppdp|O:soft_backward", &xo, &po, &bo, &go, &dxo,
                          &rank, &kl, &eps, &descending, &wo))
        return NULL;
    if (!(eps > 0.0) || !isfinite(eps) || !isfinite(1.0 / eps)) {
        PyErr_Format(PyExc_ValueError,
                     "eps must be finite and > 0 with a finite reciprocal, got %R",
                     PyTuple_GET_ITEM(args, 7));
        return NULL;
    }
    Py_buffer xb, pb, bb, gb, db, wb;
    int held = 0, held_w = 0;
    PyObject *result = NULL;
    double *scratch = NULL;
    int fx = get_array(xo, &xb, "x", 0);
    if (fx == FMT_BAD)
        return NULL;
    held = 1;
    if (fx != FMT_F32 && fx != FMT_F64) {
        PyErr_Format(PyExc_TypeError, "x must be float32 or float64, got %s",
                     format_name(fx));
        goto done;
    }
    const Py_ssize_t rows = xb.shape[0], n = xb.shape[1];
    if (get_shaped(po, &pb, "perm", 0, FMT_I64, rows, n) < 0)
        goto done;
    held = 2;
    if (get_shaped(bo, &bb, "block", 0, FMT_I64, rows, n) < 0)
        goto done;
    held = 3;
    if (get_shaped(go, &gb, "g", 0, fx, rows, n) < 0)
        goto done;
    held = 4;
    if (get_shaped(dxo, &db, "dx", 1, fx, rows, n) < 0)
        goto done;
    held = 5;
    if (wo != Py_None) {
        if (!kl) {
            PyErr_SetString(PyExc_ValueError, "weights are only used for kl");
            goto done;
        }
        if (get_shaped(wo, &wb, "weights", 0, FMT_F64, rows, n) < 0)
            goto done;
        held_w = 1;
    }
    if (rows == 0 || n == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    if (kl) {
        scratch = PyMem_RawMalloc((size_t)n * sizeof(double));
        if (!scratch) {
            PyErr_NoMemory();
            goto done;
        }
    }
    {
        /* perm indexes x, g and dx: every entry must be a valid column. */
        const int64_t *perm = (const int64_t *)pb.buf;
        const Py_ssize_t total = rows * n;
        Py_ssize_t bad = -1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < total; i++)
            if (perm[i] < 0 || perm[i] >= n) {
                bad = i;
                break;
            }
        Py_END_ALLOW_THREADS
        if (bad >= 0) {
            PyErr_Format(PyExc_ValueError,
                         "perm must hold column indices in [0, %zd), got %lld at flat "
                         "position %zd", n, (long long)perm[bad], bad);
            goto done;
        }
    }
    {
        const double a = soft_alpha(rank, eps, descending);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const int64_t *p = (const int64_t *)pb.buf + r * n;
            const int64_t *b = (const int64_t *)bb.buf + r * n;
            const double *w = held_w ? (const double *)wb.buf + r * n : NULL;
            if (fx == FMT_F64)
                soft_vjp_f64((const double *)xb.buf + r * n, p, b,
                             (const double *)gb.buf + r * n, (double *)db.buf + r * n, n,
                             rank, kl, eps, a, scratch, w);
            else
                soft_vjp_f32((const float *)xb.buf + r * n, p, b,
                             (const float *)gb.buf + r * n, (float *)db.buf + r * n, n,
                             rank, kl, eps, a, scratch, w);
        }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_RawFree(scratch);
    if (held_w)
        PyBuffer_Release(&wb);
    if (held >= 5)
        PyBuffer_Release(&db);
    if (held >= 4)
        PyBuffer_Release(&gb);
    if (held >= 3)
        PyBuffer_Release(&bb);
    if (held >= 2)
        PyBuffer_Release(&pb);
    PyBuffer_Release(&xb);
    return result;
}

/* ------------------------------------------------------------------ entry point */

static PyObject *run_pav(PyObject *args, int is_kl)
{
    PyObject *y_obj, *w_obj, *v_obj, *b_obj;
    if (!PyArg_ParseTuple(args, is_kl ? "OOOO:kl" : "OOOO:l2", &y_obj, &w_obj, &v_obj,
                          &b_obj))
        return NULL;
    const int has_w = (w_obj != Py_None);
    if (is_kl && !has_w) {
        PyErr_SetString(PyExc_TypeError, "w is required for kl (the target's log-weights)");
        return NULL;
    }

    Py_buffer yb, wb, vb, bb;
    int held_y = 0, held_w = 0, held_v = 0, held_b = 0;
    PyObject *result = NULL;
    Stack stk = {NULL, NULL, NULL, NULL};

    int fy = get_array(y_obj, &yb, "y", 0);
    if (fy == FMT_BAD)
        goto done;
    held_y = 1;
    if (fy != FMT_F32 && fy != FMT_F64) {
        PyErr_Format(PyExc_TypeError, "y must be float32 or float64, got %s",
                     format_name(fy));
        goto done;
    }
    const Py_ssize_t rows = yb.shape[0], n = yb.shape[1];

    if (has_w) {
        int fw = get_array(w_obj, &wb, "w", 0);
        if (fw == FMT_BAD)
            goto done;
        held_w = 1;
        if (fw != fy) {
            PyErr_Format(PyExc_TypeError, "w must have y's dtype %s, got %s",
                         format_name(fy), format_name(fw));
            goto done;
        }
        if (wb.shape[0] != rows || wb.shape[1] != n) {
            PyErr_Format(PyExc_ValueError, "w must have y's shape (%zd, %zd), got (%zd, %zd)",
                         rows, n, wb.shape[0], wb.shape[1]);
            goto done;
        }
    }

    int fv = get_array(v_obj, &vb, "out_v", 1);
    if (fv == FMT_BAD)
        goto done;
    held_v = 1;
    if (fv != fy) {
        PyErr_Format(PyExc_TypeError, "out_v must have y's dtype %s, got %s",
                     format_name(fy), format_name(fv));
        goto done;
    }
    if (vb.shape[0] != rows || vb.shape[1] != n) {
        PyErr_Format(PyExc_ValueError, "out_v must have y's shape (%zd, %zd), got (%zd, %zd)",
                     rows, n, vb.shape[0], vb.shape[1]);
        goto done;
    }

    int fb = get_array(b_obj, &bb, "out_block", 1);
    if (fb == FMT_BAD)
        goto done;
    held_b = 1;
    if (fb != FMT_I64) {
        PyErr_Format(PyExc_TypeError, "out_block must be int64, got %s", format_name(fb));
        goto done;
    }
    if (bb.shape[0] != rows || bb.shape[1] != n) {
        PyErr_Format(PyExc_ValueError,
                     "out_block must have y's shape (%zd, %zd), got (%zd, %zd)", rows, n,
                     bb.shape[0], bb.shape[1]);
        goto done;
    }

    if (rows == 0 || n == 0) { /* nothing to do; Python rejects empty input earlier */
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    if ((size_t)n > ((size_t)PY_SSIZE_T_MAX) / (4 * sizeof(double))) {
        PyErr_Format(PyExc_ValueError, "rows of length %zd are too long", n);
        goto done;
    }

    /* One block per element at most; allocated with the GIL held so failure can raise. */
    stk.start = PyMem_RawMalloc((size_t)n * sizeof(Py_ssize_t));
    stk.acc_a = PyMem_RawMalloc((size_t)n * sizeof(double));
    stk.acc_b = PyMem_RawMalloc((size_t)n * sizeof(double));
    stk.value = is_kl ? PyMem_RawMalloc((size_t)n * sizeof(double)) : NULL;
    if (!stk.start || !stk.acc_a || !stk.acc_b || (is_kl && !stk.value)) {
        PyErr_NoMemory();
        goto done;
    }

    {
        const void *yp = yb.buf;
        const void *wp = has_w ? wb.buf : NULL;
        void *vp = vb.buf;
        int64_t *bp = (int64_t *)bb.buf;
        Py_BEGIN_ALLOW_THREADS
        if (fy == FMT_F64) {
            if (is_kl)
                kl_f64((const double *)yp, (const double *)wp, (double *)vp, bp, rows, n, &stk);
            else
                l2_f64((const double *)yp, (const double *)wp, (double *)vp, bp, rows, n, &stk);
        }
        else {
            if (is_kl)
                kl_f32((const float *)yp, (const float *)wp, (float *)vp, bp, rows, n, &stk);
            else
                l2_f32((const float *)yp, (const float *)wp, (float *)vp, bp, rows, n, &stk);
        }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;

done:
    PyMem_RawFree(stk.start);
    PyMem_RawFree(stk.acc_a);
    PyMem_RawFree(stk.acc_b);
    PyMem_RawFree(stk.value);
    if (held_b)
        PyBuffer_Release(&bb);
    if (held_v)
        PyBuffer_Release(&vb);
    if (held_w)
        PyBuffer_Release(&wb);
    if (held_y)
        PyBuffer_Release(&yb);
    return result;
}

static PyObject *pav_l2(PyObject *self, PyObject *args)
{
    (void)self;
    return run_pav(args, 0);
}

static PyObject *pav_kl(PyObject *self, PyObject *args)
{
    (void)self;
    return run_pav(args, 1);
}

static PyMethodDef pav_methods[] = {
    {"l2", pav_l2, METH_VARARGS,
     "l2(y, w, out_v, out_block)\n--\n\n"
     "Non-increasing weighted least-squares isotonic fit of every row of y (2-D,\n"
     "C-contiguous float32/float64); w is None or positive weights like y. Writes the\n"
     "fit into out_v (y's dtype) and each element's block start into out_block (int64)."},
    {"kl", pav_kl, METH_VARARGS,
     "kl(y, w, out_v, out_block)\n--\n\n"
     "Non-increasing fit argmin sum exp(y - v) + exp(w) v of every row; block value\n"
     "logsumexp(y_B) - logsumexp(w_B), pooled in the log domain. Outputs as in l2."},
    {"soft_forward", soft_forward, METH_VARARGS,
     "soft_forward(x, out, perm, block, rank, kl, eps, descending, weights=None) -> status\n--\n\n"
     "Soft rank (rank=True) or soft sort of every row of x (2-D, C-contiguous float32/\n"
     "float64): sort, isotonic pass and output in one call. Writes out (x's dtype), the\n"
     "row-wise order perm and the block starts (int64). Returns 0, or 1 (x holds NaN/inf)\n"
     "or 2 (the scaled values overflow float64) with nothing written. For kl, a float64\n"
     "weights array receives each element's softmax weight within its block."},
    {"soft_backward", soft_backward, METH_VARARGS,
     "soft_backward(x, perm, block, g, dx, rank, kl, eps, descending, weights=None)\n--\n\n"
     "Vector-Jacobian product of soft_forward: writes J(x)^T g into dx (x's dtype).\n"
     "For kl, the forward's weights spare recomputing the block softmax."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pav_module = {
    PyModuleDef_HEAD_INIT,
    "_pav",
    "Pool-Adjacent-Violators kernels (L2 and KL) for nonsmooth.solvers.",
    -1,
    pav_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__pav(void)
{
    return PyModule_Create(&pav_module);
}
