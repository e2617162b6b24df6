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
 * The moments may be stored as bfloat16 (half the bytes of the two moments, a third of the
 * pass): they are widened to float32 as they are read, updated in float32 and rounded to the
 * nearest bfloat16 (ties to even, as torch's conversion) as they are written back.
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
#include <immintrin.h>
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

static inline float widen(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to the nearest bfloat16, ties to even; a NaN stays a (quiet) NaN. */
static inline uint16_t narrow(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)rounded;
}

/* No FMA from here to the end of the merges: `out += alpha * p` then rounds the same way in an
 * update's folded merge and in merge_rows on every instruction set, so a merge made on its own equals
 * the folded one bit for bit (a resumed run, whose first step cannot take a folded merge, is exact). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* AdamW on one span of one row with gradient gscale * g: p <- decay * p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),
 * after m <- m + (1 - b1)(g - m) and v <- b2 v + (1 - b2) g^2; then out += next_alpha * p (out may be NULL). */
CLONES static void update_span(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                               float gscale, Py_ssize_t len, float decay, const Hyper *hp, float next_alpha,
                               float *restrict out) {
    const float c1 = 1.0f - hp->b1, b2 = hp->b2, c2 = 1.0f - hp->b2;
    const float step_size = hp->step_size, inv = hp->inv_bc2_sqrt, eps = hp->eps;
    if (out) {
        for (Py_ssize_t i = 0; i < len; i++) {
            const float gi = gscale * g[i], mi = m[i] + c1 * (gi - m[i]), vi = b2 * v[i] + c2 * gi * gi;
            const float pi = p[i] * decay - step_size * mi / (sqrtf(vi) * inv + eps);
            m[i] = mi, v[i] = vi, p[i] = pi;
            out[i] += next_alpha * pi;
        }
    } else {
        for (Py_ssize_t i = 0; i < len; i++) {
            const float gi = gscale * g[i], mi = m[i] + c1 * (gi - m[i]), vi = b2 * v[i] + c2 * gi * gi;
            m[i] = mi, v[i] = vi;
            p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv + eps);
        }
    }
}

/* The same update with bfloat16 moments (two loops, as above: a branch inside would stop vectorisation). */
CLONES static void update_span_bf16(float *restrict p, uint16_t *restrict m, uint16_t *restrict v,
                                    const float *restrict g, float gscale, Py_ssize_t len, float decay,
                                    const Hyper *hp, float next_alpha, float *restrict out) {
    const float c1 = 1.0f - hp->b1, b2 = hp->b2, c2 = 1.0f - hp->b2;
    const float step_size = hp->step_size, inv = hp->inv_bc2_sqrt, eps = hp->eps;
#define UPDATE_BF16(i)                                                                                            \
    const float gi = gscale * g[i], m0 = widen(m[i]), mi = m0 + c1 * (gi - m0), vi = b2 * widen(v[i]) + c2 * gi * gi;     \
    const float pi = p[i] * decay - step_size * mi / (sqrtf(vi) * inv + eps);                                    \
    m[i] = narrow(mi), v[i] = narrow(vi), p[i] = pi
    if (out) {
        for (Py_ssize_t i = 0; i < len; i++) {
            UPDATE_BF16(i);
            out[i] += next_alpha * pi;
        }
    } else {
        for (Py_ssize_t i = 0; i < len; i++) {
            UPDATE_BF16(i);
        }
    }
#undef UPDATE_BF16
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define HAVE_AVX512_BF16_SPAN 1

/* narrow() on 16 lanes: round to nearest even, a NaN keeps its top bits and becomes quiet. */
__attribute__((target("avx512f,avx512bw"))) static inline __m256i narrow16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

__attribute__((target("avx512f,avx512bw"))) static inline __m512 widen16(const uint16_t *b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)b)), 16));
}

/* update_span_bf16 on 16 lanes at a time, the same operations in the same order (no FMA: see above). */
__attribute__((target("avx512f,avx512bw"))) static void update_span_bf16_avx512(
        float *restrict p, uint16_t *restrict m, uint16_t *restrict v, const float *restrict g, float gscale,
        Py_ssize_t len, float decay, const Hyper *hp, float next_alpha, float *restrict out) {
    const __m512 c1 = _mm512_set1_ps(1.0f - hp->b1), b2 = _mm512_set1_ps(hp->b2), c2 = _mm512_set1_ps(1.0f - hp->b2);
    const __m512 step = _mm512_set1_ps(hp->step_size), inv = _mm512_set1_ps(hp->inv_bc2_sqrt);
    const __m512 eps = _mm512_set1_ps(hp->eps), dec = _mm512_set1_ps(decay), gs = _mm512_set1_ps(gscale);
    const __m512 next = _mm512_set1_ps(next_alpha);
    Py_ssize_t i = 0;
    for (; i + 16 <= len; i += 16) {
        const __m512 gi = _mm512_mul_ps(gs, _mm512_loadu_ps(g + i)), m0 = widen16(m + i);
        const __m512 mi = _mm512_add_ps(m0, _mm512_mul_ps(c1, _mm512_sub_ps(gi, m0)));
        const __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, widen16(v + i)), _mm512_mul_ps(_mm512_mul_ps(c2, gi), gi));
        const __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv), eps);
        const __m512 pi = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), dec),
                                        _mm512_div_ps(_mm512_mul_ps(step, mi), den));
        _mm256_storeu_si256((__m256i *)(m + i), narrow16(mi));
        _mm256_storeu_si256((__m256i *)(v + i), narrow16(vi));
        _mm512_storeu_ps(p + i, pi);
        if (out) _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), _mm512_mul_ps(next, pi)));
    }
    if (i < len) /* the tail: the scalar loop, the same arithmetic */
        update_span_bf16(p + i, m + i, v + i, g + i, gscale, len - i, decay, hp, next_alpha, out ? out + i : NULL);
}
#endif

/* out[0, len) += a * row[i]: the folded merge's arithmetic, so a merge made here equals one folded into an update. */
CLONES static void accumulate_span(float *restrict out, const float *restrict row, float a, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) out[i] += a * row[i];
}

#pragma GCC pop_options

static PyObject *merge_rows(PyObject *self, PyObject *args) {
    unsigned long long p_p, alpha_p, base_p, out_p;
    Py_ssize_t n, row_stride, lo, hi;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnnnKKK", &p_p, &n, &row_stride, &lo, &hi, &alpha_p, &base_p, &out_p)) return NULL;
    if (n < 0 || lo < 0 || hi < lo) {
        PyErr_SetString(PyExc_ValueError, "merge_rows: negative size or empty column range");
        return NULL;
    }
    const float *p = (const float *)(uintptr_t)p_p, *alpha = (const float *)(uintptr_t)alpha_p;
    const float *base = (const float *)(uintptr_t)base_p;
    float *out = (float *)(uintptr_t)out_p;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c0 = lo; c0 < hi; c0 += BLOCK) { /* the blocks and row order of update_rows */
        const Py_ssize_t len = c0 + BLOCK < hi ? BLOCK : hi - c0;
        memcpy(out + c0, base + c0, (size_t)len * sizeof(float));
        for (Py_ssize_t j = 0; j < n; j++) accumulate_span(out + c0, p + (size_t)j * (size_t)row_stride + (size_t)c0, alpha[j], len);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *update_rows(PyObject *self, PyObject *args) {
    unsigned long long p_p, m_p, v_p, g_p, a_p, next_p, base_p, out_p;
    Py_ssize_t n, row_stride, lo, hi, decay_end, micro, g_stride;
    int bf16_moments;
    float decay, b1, b2, eps, step_size, inv_bc2_sqrt;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKpnnnnnKnnKffffffKKK", &p_p, &m_p, &v_p, &bf16_moments, &n, &row_stride, &lo, &hi, &decay_end,
                          &g_p, &micro, &g_stride, &a_p, &decay, &b1, &b2, &eps, &step_size, &inv_bc2_sqrt, &next_p,
                          &base_p, &out_p))
        return NULL;
    if (n < 0 || lo < 0 || hi < lo || micro < 1) {
        PyErr_SetString(PyExc_ValueError, "update_rows: negative size, empty column range or no micro-batch");
        return NULL;
    }
    float *p = (float *)(uintptr_t)p_p;
    char *m = (char *)(uintptr_t)m_p, *v = (char *)(uintptr_t)v_p; /* float32 or bfloat16 */
    const size_t item = bf16_moments ? 2 : 4;
    const float *g = (const float *)(uintptr_t)g_p, *a = (const float *)(uintptr_t)a_p;
    const float *next_alpha = (const float *)(uintptr_t)next_p, *base = (const float *)(uintptr_t)base_p;
    float *out = (float *)(uintptr_t)out_p; /* NULL unless the next merge is folded in */
    const Hyper hp = {b1, b2, step_size, inv_bc2_sqrt, eps};
#ifdef HAVE_AVX512_BF16_SPAN
    const int use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    const int use_avx512 = 0;
#endif
    float *grad = PyMem_RawMalloc(BLOCK * sizeof(float));
    if (grad == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c0 = lo; c0 < hi; c0 += BLOCK) {
        const Py_ssize_t len = c0 + BLOCK < hi ? BLOCK : hi - c0;
        Py_ssize_t decayed = decay_end - c0; /* columns [0, decay_end) of every row are decayed */
        decayed = decayed < 0 ? 0 : (decayed > len ? len : decayed);
        if (out) memcpy(out + c0, base + c0, (size_t)len * sizeof(float));
        for (Py_ssize_t j = 0; j < n; j++) {
            /* one micro-batch: the row's gradient is a[j] * G, scaled in registers (no buffer pass) */
            const float *row_g = micro == 1 ? g + c0 : grad;
            const float gscale = micro == 1 ? a[j] : 1.0f;
            if (micro > 1) form_gradient(grad, g + c0, g_stride, a + j, n, micro, len);
            const size_t at = (size_t)j * (size_t)row_stride + (size_t)c0;
            const float next = out ? next_alpha[j] : 0.0f;
            for (int part = 0; part < 2; part++) { /* the decayed columns, then the rest */
                const Py_ssize_t from = part ? decayed : 0, span = part ? len - decayed : decayed;
                const size_t k = at + (size_t)from;
                float *o = out ? out + c0 + from : NULL;
                if (bf16_moments && use_avx512)
                    update_span_bf16_avx512(p + k, (uint16_t *)(m + item * k), (uint16_t *)(v + item * k),
                                            row_g + from, gscale, span, part ? 1.0f : decay, &hp, next, o);
                else if (bf16_moments)
                    update_span_bf16(p + k, (uint16_t *)(m + item * k), (uint16_t *)(v + item * k), row_g + from,
                                     gscale, span, part ? 1.0f : decay, &hp, next, o);
                else
                    update_span(p + k, (float *)(m + item * k), (float *)(v + item * k), row_g + from, gscale,
                                span, part ? 1.0f : decay, &hp, next, o);
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(grad);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"update_rows", update_rows, METH_VARARGS,
     "update_rows(p, m, v, bf16_moments, n, row_stride, lo, hi, decay_end, G, micro, g_stride, A, decay, beta1, beta2, eps, "
     "step_size, inv_bc2_sqrt, next_alpha, base, out): AdamW on columns [lo, hi) of the n rows of p/m/v with "
     "gradient rows A[:, j] @ G (A: [micro, n], G: [micro, g_stride]); columns < decay_end are multiplied by "
     "`decay` first; with out != 0, out[lo:hi] = base[lo:hi] + next_alpha @ p_new[:, lo:hi]. Raw pointers: float32, "
     "and m, v bfloat16 when bf16_moments is true."},
    {"merge_rows", merge_rows, METH_VARARGS,
     "merge_rows(p, n, row_stride, lo, hi, alpha, base, out): out[lo:hi] = base[lo:hi] + alpha @ p[:, lo:hi], "
     "with the arithmetic of update_rows' folded merge (raw float32 pointers)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_adamw_kernel",
                                    "Fused expert AdamW kernel (trainer/fused_adamw.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__adamw_kernel(void) { return PyModule_Create(&module); }
