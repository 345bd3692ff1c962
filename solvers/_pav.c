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
 * NaN/inf are rejected in Python before this is called.  Should one slip through, the
 * kernel still terminates in O(n): every comparison with NaN is false, so a NaN never
 * triggers a merge; the rows concerned come out with NaN (or inf) values in the
 * affected blocks.  Nothing is read or written outside the buffers either way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
