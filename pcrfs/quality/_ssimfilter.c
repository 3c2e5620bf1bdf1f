/* The SSIM window (a separable Gaussian, 11 taps) over the valid region, in float32.
 *
 * pcrfs.quality.search filters every decode it scores; in numpy that is a banded matrix
 * product, whose speed is OpenBLAS's sgemm kernel for the CPU it recognised: 4-6x slower
 * under its pre-AVX2 kernel sets (OPENBLAS_CORETYPE=Nehalem, an unrecognised CPU) than
 * under AVX-512 ones. Here the same filter is plain C that gcc vectorises (SSE2, the x86-64
 * baseline, and AVX2 where the CPU has it: CLONES below), so its cost depends on no BLAS,
 * and it does 6 multiplications and 10 additions per pixel and pass where the banded
 * product does 26 multiply-adds (most of them on zeros).
 *
 * filter_valid(a, taps, out): a float32 (c, H, W), taps float32 (n,), out float32
 * (c, H-n+1, W-n+1), all C-contiguous, out writable and apart from a. Each output row:
 * the vertical pass into a row buffer (W wide, from the n input rows under it), then
 * the horizontal pass from that buffer, so the working set is n+2 rows (cache-resident).
 * Symmetric taps (the Gaussian's) are folded: t_k (x_k + x_{n-1-k}) halves the
 * multiplications. Every lane computes the same expression in the same order and
 * fp-contraction is off (setup.py), so the result is the same with or without SIMD.
 *
 * Arguments are taken through the buffer protocol (no numpy headers needed to build) and
 * checked; a wrong one raises TypeError/ValueError. The GIL is released while filtering:
 * convert scores images from several threads at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TAPS 64 /* the SSIM window is 11; anything far larger is a caller's mistake */

/* On x86-64 Linux (glibc's ifunc) gcc also compiles the loops for AVX2 and picks a copy when
 * the module loads: 1.6x faster where the CPU has it (measured on the 11-tap window). AVX2
 * without FMA and no contraction: both copies compute the same floats, bit for bit. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* tmp[x] = sum_k t[k] rows[k][x], the rows being base + k*stride, x in [0, w) */
CLONES static void vertical(const float *restrict base, Py_ssize_t stride, const float *restrict t, int n,
                     int symmetric, float *restrict tmp, Py_ssize_t w)
{
    Py_ssize_t x;
    int k;
    if (symmetric && n == 11) { /* the SSIM window: fully unrolled, one pass over tmp */
        const float *r0 = base, *r1 = base + stride, *r2 = base + 2 * stride, *r3 = base + 3 * stride,
                    *r4 = base + 4 * stride, *r5 = base + 5 * stride, *r6 = base + 6 * stride,
                    *r7 = base + 7 * stride, *r8 = base + 8 * stride, *r9 = base + 9 * stride,
                    *r10 = base + 10 * stride;
        const float t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3], t4 = t[4], t5 = t[5];
        for (x = 0; x < w; x++)
            tmp[x] = t5 * r5[x] + t0 * (r0[x] + r10[x]) + t1 * (r1[x] + r9[x]) + t2 * (r2[x] + r8[x])
                     + t3 * (r3[x] + r7[x]) + t4 * (r4[x] + r6[x]);
        return;
    }
    if (symmetric) { /* folded pairs, a pass over tmp each */
        const int half = n / 2;
        if (n % 2) {
            const float tc = t[half], *rc = base + half * stride;
            for (x = 0; x < w; x++) tmp[x] = tc * rc[x];
        } else {
            memset(tmp, 0, (size_t)w * sizeof(float));
        }
        for (k = half - 1; k >= 0; k--) {
            const float tk = t[k], *p = base + k * stride, *q = base + (n - 1 - k) * stride;
            for (x = 0; x < w; x++) tmp[x] += tk * (p[x] + q[x]);
        }
        return;
    }
    {
        const float t0 = t[0];
        for (x = 0; x < w; x++) tmp[x] = t0 * base[x];
    }
    for (k = 1; k < n; k++) {
        const float tk = t[k], *p = base + k * stride;
        for (x = 0; x < w; x++) tmp[x] += tk * p[x];
    }
}

/* out[j] = sum_k t[k] row[j+k], j in [0, m2) */
CLONES static void horizontal(const float *restrict row, const float *restrict t, int n, int symmetric,
                       float *restrict out, Py_ssize_t m2)
{
    Py_ssize_t j;
    int k;
    if (symmetric && n == 11) {
        const float t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3], t4 = t[4], t5 = t[5];
        for (j = 0; j < m2; j++) {
            const float *r = row + j;
            out[j] = t5 * r[5] + t0 * (r[0] + r[10]) + t1 * (r[1] + r[9]) + t2 * (r[2] + r[8])
                     + t3 * (r[3] + r[7]) + t4 * (r[4] + r[6]);
        }
        return;
    }
    if (symmetric) {
        const int half = n / 2;
        if (n % 2) {
            const float tc = t[half];
            for (j = 0; j < m2; j++) out[j] = tc * row[j + half];
        } else {
            memset(out, 0, (size_t)m2 * sizeof(float));
        }
        for (k = half - 1; k >= 0; k--) {
            const float tk = t[k];
            const float *p = row + k, *q = row + (n - 1 - k);
            for (j = 0; j < m2; j++) out[j] += tk * (p[j] + q[j]);
        }
        return;
    }
    {
        const float t0 = t[0];
        for (j = 0; j < m2; j++) out[j] = t0 * row[j];
    }
    for (k = 1; k < n; k++) {
        const float tk = t[k], *p = row + k;
        for (j = 0; j < m2; j++) out[j] += tk * p[j];
    }
}

/* A float32 C-contiguous buffer of ``ndim`` dimensions, or -1 with the error set. */
static int get_float_buffer(PyObject *obj, Py_buffer *b, int ndim, int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a %sC-contiguous float32 array", name,
                     writable ? "writable " : "");
        return -1;
    }
    /* numpy's float32 is "f" (possibly with a byte-order prefix for the native order) */
    const char *f = b->format ? b->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') {
        f++;
    }
    if (b->itemsize != 4 || strcmp(f, "f") != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be float32 (buffer format '%s')", name,
                     b->format ? b->format : "B");
        PyBuffer_Release(b);
        return -1;
    }
    if (b->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, has %d", name, ndim, b->ndim);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *filter_valid(PyObject *self, PyObject *args)
{
    PyObject *a_obj, *t_obj, *o_obj;
    Py_buffer a, t, o;
    if (!PyArg_ParseTuple(args, "OOO:filter_valid", &a_obj, &t_obj, &o_obj)) return NULL;
    if (get_float_buffer(a_obj, &a, 3, 0, "a") < 0) return NULL;
    if (get_float_buffer(t_obj, &t, 1, 0, "taps") < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    if (get_float_buffer(o_obj, &o, 3, 1, "out") < 0) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&t);
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t c = a.shape[0], h = a.shape[1], w = a.shape[2], n = t.shape[0];
    if (n < 1 || n > MAX_TAPS) {
        PyErr_Format(PyExc_ValueError, "taps must number 1 to %d, got %zd", MAX_TAPS, n);
        goto done;
    }
    if (h < n || w < n) {
        PyErr_Format(PyExc_ValueError, "images of %zd x %zd are smaller than the %zd-tap window", h, w, n);
        goto done;
    }
    const Py_ssize_t m = h - n + 1, m2 = w - n + 1;
    if (o.shape[0] != c || o.shape[1] != m || o.shape[2] != m2) {
        PyErr_Format(PyExc_ValueError, "out must be (%zd, %zd, %zd) for a of (%zd, %zd, %zd) and %zd taps, is "
                     "(%zd, %zd, %zd)", c, m, m2, c, h, w, n, o.shape[0], o.shape[1], o.shape[2]);
        goto done;
    }
    {   /* in place would read rows already overwritten */
        const char *a0 = a.buf, *a1 = (const char *)a.buf + a.len, *o0 = o.buf, *o1 = (const char *)o.buf + o.len;
        if (a.len && o.len && a0 < o1 && o0 < a1) {
            PyErr_SetString(PyExc_ValueError, "out overlaps a");
            goto done;
        }
    }
    float taps[MAX_TAPS];
    memcpy(taps, t.buf, (size_t)n * sizeof(float));
    int symmetric = 1;
    for (Py_ssize_t k = 0; k < n / 2; k++)
        if (taps[k] != taps[n - 1 - k]) symmetric = 0;
    float *tmp = malloc((size_t)w * sizeof(float));
    if (!tmp) {
        PyErr_NoMemory();
        goto done;
    }
    const float *src = a.buf;
    float *dst = o.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t ci = 0; ci < c; ci++) {
        const float *img = src + ci * h * w;
        float *res = dst + ci * m * m2;
        for (Py_ssize_t i = 0; i < m; i++) {
            vertical(img + i * w, w, taps, (int)n, symmetric, tmp, w);
            horizontal(tmp, taps, (int)n, symmetric, res + i * m2, m2);
        }
    }
    Py_END_ALLOW_THREADS
    free(tmp);
    Py_INCREF(o_obj);
    result = o_obj;
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&t);
    PyBuffer_Release(&o);
    return result;
}

static PyMethodDef methods[] = {
    {"filter_valid", filter_valid, METH_VARARGS,
     "filter_valid(a, taps, out) -> out: the separable window ``taps`` over the valid region of each image "
     "of a (float32 (c, H, W)) into out (float32 (c, H-n+1, W-n+1)); all C-contiguous."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pcrfs.quality._ssimfilter",
    "The SSIM window over the valid region in compiled float32 (pcrfs.quality.search's filter).", -1, methods,
};

PyMODINIT_FUNC PyInit__ssimfilter(void) { return PyModule_Create(&module); }
