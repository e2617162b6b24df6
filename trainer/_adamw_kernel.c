/* AdamW over the expert bank in one pass, with the next step's merge folded in.
 *
 * The bank's gradient is never materialised: row j of it is sum_m A[m, j] * G[m], one
 * (alpha, dTheta) pair per micro-batch (trainer/optim.py, ExpertGrad). Through PyTorch each
 * row is first written to a buffer and then read back by the fused AdamW kernel, and the next
 * step's merge Theta = S + alpha' E reads the whole bank once more. Here a block of columns
 * of G stays in L1/L2 while every expert row's gradient is formed in registers, its
 * parameters and moments are updated, and (optionally) alpha'_j times the new row is added
 * into the next Theta: the bank, m and v are each read and written exactly once per step.
 *
 * The loops are plain C; they are built for AVX-512, AVX2 and baseline x86-64 and the best
 * one is picked at load time (target_clones), so one wheel runs on any x86-64 CPU. sqrtf
 * vectorises because the extension is compiled with -fno-math-errno (pyproject.toml).
 *
 * Python calls it with raw data pointers, one column range per thread (trainer/fused_adamw.py
 * checks shapes, dtypes and devices first). The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* Columns per block: G's block (16 KB per micro-batch) and the gradient row stay in L1/L2. */
#ifndef BLOCK
#define BLOCK 4096
#endif

typedef struct {
    float b1, b2, step_size, inv_bc2_sqrt, eps;
} Hyper;

/* grad[0, len) = sum_m a[m * n] * G[m * g_stride + i] */
CLONES static void form_gradient(float *restrict grad, const float *restrict g, Py_ssize_t g_stride,
                                 const float *a, Py_ssize_t n, Py_ssize_t micro, Py_ssize_t len) {
    const float a0 = a[0];
    for (Py_ssize_t i = 0; i < len; i++) grad[i] = a0 * g[i];
    for (Py_ssize_t k = 1; k < micro; k++) {
        const float ak = a[k * n];
        const float *restrict gk = g + k * g_stride;
        for (Py_ssize_t i = 0; i < len; i++) grad[i] += ak * gk[i];
    }
}

/* AdamW on one span of one row: p <- decay * p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),
 * after m <- m + (1 - b1)(g - m) and v <- b2 v + (1 - b2) g^2; then out += next_alpha * p (out may be NULL). */
CLONES static void update_span(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                               Py_ssize_t len, float decay, const Hyper *hp, float next_alpha, float *restrict out) {
    const float c1 = 1.0f - hp->b1, b2 = hp->b2, c2 = 1.0f - hp->b2;
    const float step_size = hp->step_size, inv = hp->inv_bc2_sqrt, eps = hp->eps;
    if (out) {
        for (Py_ssize_t i = 0; i < len; i++) {
            const float gi = g[i], mi = m[i] + c1 * (gi - m[i]), vi = b2 * v[i] + c2 * gi * gi;
            const float pi = p[i] * decay - step_size * mi / (sqrtf(vi) * inv + eps);
            m[i] = mi, v[i] = vi, p[i] = pi;
            out[i] += next_alpha * pi;
        }
    } else {
        for (Py_ssize_t i = 0; i < len; i++) {
            const float gi = g[i], mi = m[i] + c1 * (gi - m[i]), vi = b2 * v[i] + c2 * gi * gi;
            m[i] = mi, v[i] = vi;
            p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv + eps);
        }
    }
}

static PyObject *update_rows(PyObject *self, PyObject *args) {
    unsigned long long p_p, m_p, v_p, g_p, a_p, next_p, base_p, out_p;
    Py_ssize_t n, row_stride, lo, hi, decay_end, micro, g_stride;
    float decay, b1, b2, eps, step_size, inv_bc2_sqrt;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnnnnKnnKffffffKKK", &p_p, &m_p, &v_p, &n, &row_stride, &lo, &hi, &decay_end,
                          &g_p, &micro, &g_stride, &a_p, &decay, &b1, &b2, &eps, &step_size, &inv_bc2_sqrt, &next_p,
                          &base_p, &out_p))
        return NULL;
    if (n < 0 || lo < 0 || hi < lo || micro < 1) {
        PyErr_SetString(PyExc_ValueError, "update_rows: negative size, empty column range or no micro-batch");
        return NULL;
    }
    float *p = (float *)(uintptr_t)p_p, *m = (float *)(uintptr_t)m_p, *v = (float *)(uintptr_t)v_p;
    const float *g = (const float *)(uintptr_t)g_p, *a = (const float *)(uintptr_t)a_p;
    const float *next_alpha = (const float *)(uintptr_t)next_p, *base = (const float *)(uintptr_t)base_p;
    float *out = (float *)(uintptr_t)out_p; /* NULL unless the next merge is folded in */
    const Hyper hp = {b1, b2, step_size, inv_bc2_sqrt, eps};
    float *grad = PyMem_RawMalloc(BLOCK * sizeof(float));
    if (grad == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c0 = lo; c0 < hi; c0 += BLOCK) {
        const Py_ssize_t len = c0 + BLOCK < hi ? BLOCK : hi - c0;
        Py_ssize_t decayed = decay_end - c0; /* columns [0, decay_end) of every row are decayed */
        decayed = decayed < 0 ? 0 : (decayed > len ? len : decayed);
        if (out) memcpy(out + c0, base + c0, (size_t)len * sizeof(float));
        for (Py_ssize_t j = 0; j < n; j++) {
            form_gradient(grad, g + c0, g_stride, a + j, n, micro, len);
            const size_t at = (size_t)j * (size_t)row_stride + (size_t)c0;
            const float next = out ? next_alpha[j] : 0.0f;
            update_span(p + at, m + at, v + at, grad, decayed, decay, &hp, next, out ? out + c0 : NULL);
            update_span(p + at + decayed, m + at + decayed, v + at + decayed, grad + decayed, len - decayed, 1.0f, &hp,
                        next, out ? out + c0 + decayed : NULL);
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(grad);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"update_rows", update_rows, METH_VARARGS,
     "update_rows(p, m, v, n, row_stride, lo, hi, decay_end, G, micro, g_stride, A, decay, beta1, beta2, eps, "
     "step_size, inv_bc2_sqrt, next_alpha, base, out): AdamW on columns [lo, hi) of the n rows of p/m/v with "
     "gradient rows A[:, j] @ G (A: [micro, n], G: [micro, g_stride]); columns < decay_end are multiplied by "
     "`decay` first; with out != 0, out[lo:hi] = base[lo:hi] + next_alpha @ p_new[:, lo:hi]. Raw float32 pointers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_adamw_kernel",
                                    "Fused expert AdamW kernel (trainer/fused_adamw.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__adamw_kernel(void) { return PyModule_Create(&module); }
