/* Fused merge kernel: out = base + sum_j alpha[j] * rows[j], in one pass over the stored bytes.
 *
 * PyTorch's CPU backend has no float16 x float16 -> float32 product, so merging a float16
 * archive through torch means converting every expert row to float32 first (a write and a
 * re-read of twice the bytes) and then a GEMM. Here each 16-bit row is widened in registers
 * as it is read, four rows are added per pass over an output block that stays in L2, and so
 * the archive's bytes are read exactly once. Inputs may be float32, float16 or bfloat16; the
 * output and the accumulation are float32.
 *
 * Python calls it with raw data pointers (soe_sdk/fused.py checks shapes, dtypes and devices
 * first). The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SOE_X86 1
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

/* Columns per block: the float32 output block (64 KB) stays in L2 while every row adds into it;
 * shorter blocks cut the rows' reads into runs too short for the hardware prefetcher. */
#define BLOCK 16384
#define GROUP 4 /* rows per pass over a block: the block is loaded and stored once per four rows */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise the mantissa */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf / nan */
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static size_t item_size(int dtype) { return dtype == DT_F32 ? 4 : 2; }

static float load_scalar(const void *src, int dtype, Py_ssize_t i) {
    if (dtype == DT_F16) return half_to_float(((const uint16_t *)src)[i]);
    if (dtype == DT_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)src)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const float *)src)[i];
}

/* One instruction set's two loops over columns [0, len):
 *   set:  acc[i] = src[i]                       (the base row)
 *   add4: acc[i] += sum_k a[k] * src[k][i]      (GROUP rows at once) */
typedef struct {
    const char *name;
    void (*set)(float *acc, const void *src, int dtype, Py_ssize_t len);
    void (*add4)(float *acc, const void *const *src, int dtype, const float *a, Py_ssize_t len);
} Kernel;

static void set_scalar(float *acc, const void *src, int dtype, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) acc[i] = load_scalar(src, dtype, i);
}

static void add4_scalar(float *acc, const void *const *src, int dtype, const float *a, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) {
        float r = acc[i];
        for (int k = 0; k < GROUP; k++) r += a[k] * load_scalar(src[k], dtype, i);
        acc[i] = r;
    }
}

static const Kernel SCALAR = {"scalar", set_scalar, add4_scalar};

#ifdef SOE_X86
/* The same two loops for each SIMD width. HALF: the integer vector holding WIDTH 16-bit values;
 * LOAD_HALF, CVTPH (float16 -> float32), WIDEN (uint16 -> uint32), SHIFT, CAST: its intrinsics. */
#define DEFINE_SIMD_KERNEL(ISA, TARGET, VEC, WIDTH, HALF, LOAD_HALF, CVTPH, WIDEN, SHIFT, CAST, LOADU, STOREU,   \
                           SET1, FMADD)                                                                        \
    __attribute__((target(TARGET))) static inline VEC load_##ISA(const void *src, int dtype, Py_ssize_t i) {  \
        if (dtype == DT_F16) return CVTPH(LOAD_HALF((const HALF *)((const uint16_t *)src + i)));            \
        if (dtype == DT_BF16) return CAST(SHIFT(WIDEN(LOAD_HALF((const HALF *)((const uint16_t *)src + i))), 16)); \
        return LOADU((const float *)src + i);                                                                \
    }                                                                                                        \
    __attribute__((target(TARGET))) static void set_##ISA(float *acc, const void *src, int dtype,             \
                                                          Py_ssize_t len) {                                    \
        Py_ssize_t i = 0;                                                                                    \
        for (; i + WIDTH <= len; i += WIDTH) STOREU(acc + i, load_##ISA(src, dtype, i));                     \
        set_scalar(acc + i, (const char *)src + i * item_size(dtype), dtype, len - i);                       \
    }                                                                                                        \
    __attribute__((target(TARGET))) static void add4_##ISA(float *acc, const void *const *src, int dtype,     \
                                                           const float *a, Py_ssize_t len) {                  \
        const VEC a0 = SET1(a[0]), a1 = SET1(a[1]), a2 = SET1(a[2]), a3 = SET1(a[3]);                        \
        Py_ssize_t i = 0;                                                                                    \
        for (; i + WIDTH <= len; i += WIDTH) {                                                               \
            VEC r = LOADU(acc + i);                                                                          \
            r = FMADD(a0, load_##ISA(src[0], dtype, i), r);                                                  \
            r = FMADD(a1, load_##ISA(src[1], dtype, i), r);                                                  \
            r = FMADD(a2, load_##ISA(src[2], dtype, i), r);                                                  \
            r = FMADD(a3, load_##ISA(src[3], dtype, i), r);                                                  \
            STOREU(acc + i, r);                                                                              \
        }                                                                                                    \
        const void *rest[GROUP];                                                                             \
        for (int k = 0; k < GROUP; k++) rest[k] = (const char *)src[k] + i * item_size(dtype);               \
        add4_scalar(acc + i, rest, dtype, a, len - i);                                                       \
    }

DEFINE_SIMD_KERNEL(avx512, "avx512f", __m512, 16, __m256i, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_cvtepu16_epi32,
                   _mm512_slli_epi32, _mm512_castsi512_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
                   _mm512_fmadd_ps)
DEFINE_SIMD_KERNEL(avx2, "avx2,fma,f16c", __m256, 8, __m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_cvtepu16_epi32,
                   _mm256_slli_epi32, _mm256_castsi256_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
                   _mm256_fmadd_ps)

static const Kernel AVX512 = {"avx512", set_avx512, add4_avx512};
static const Kernel AVX2 = {"avx2", set_avx2, add4_avx2};
#endif

static const Kernel *best_kernel(void) {
#ifdef SOE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return &AVX512;
    /* every x86 CPU with AVX2 and FMA also has F16C */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &AVX2;
#endif
    return &SCALAR;
}

static const Kernel *kernel = &SCALAR;

static PyObject *combine(PyObject *self, PyObject *args) {
    unsigned long long out_p, base_p, rows_p, alpha_p;
    Py_ssize_t n, row_stride, m;
    int base_dtype, rows_dtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKiKinnK", &out_p, &n, &base_p, &base_dtype, &rows_p, &rows_dtype, &row_stride,
                          &m, &alpha_p))
        return NULL;
    if (n < 0 || m < 0 || base_dtype < DT_F32 || base_dtype > DT_BF16 || rows_dtype < DT_F32 || rows_dtype > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "combine: negative size or unknown dtype code");
        return NULL;
    }
    float *out = (float *)(uintptr_t)out_p;
    const void *base = (const void *)(uintptr_t)base_p; /* NULL: accumulate into out as it is */
    const char *rows = (const char *)(uintptr_t)rows_p;
    const float *alpha = (const float *)(uintptr_t)alpha_p;
    const size_t item = item_size(rows_dtype), row_bytes = (size_t)row_stride * item;
    const Kernel *k = kernel;
    static const float zeros[BLOCK]; /* the rows that pad a last partial group: 0.0 in every dtype */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {
        Py_ssize_t len = lo + BLOCK < n ? BLOCK : n - lo;
        if (base) k->set(out + lo, (const char *)base + (size_t)lo * item_size(base_dtype), base_dtype, len);
        for (Py_ssize_t j = 0; j < m; j += GROUP) {
            const void *src[GROUP];
            float a[GROUP];
            for (int g = 0; g < GROUP; g++) {
                int real = j + g < m;
                src[g] = real ? (const void *)(rows + (size_t)(j + g) * row_bytes + (size_t)lo * item) : zeros;
                a[g] = real ? alpha[j + g] : 0.0f;
            }
            k->add4(out + lo, src, rows_dtype, a, len);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Page-cache folios of a file mapping are mapped whole (up to 2 MB, then by one page-table entry),
 * so pages are handed back in granules of that size. */
#define GRANULE ((uintptr_t)2 << 20)

/* Drop the page-table entries of [lo, hi) clamped to the file mapping [map_lo, map_hi): the OS page
 * cache keeps the data, and a later read faults it back in. Never touches memory outside the mapping. */
static void drop_pages(uintptr_t lo, uintptr_t hi, uintptr_t map_lo, uintptr_t map_hi) {
#ifdef __linux__
    if (lo < map_lo) lo = map_lo;
    if (hi > map_hi) hi = map_hi;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    (void)lo, (void)hi, (void)map_lo, (void)map_hi;
#endif
}

/* combine() over a whole parameter that lies in a file mapping, handing back each granule of the
 * base row and of every expert row as soon as the merge has moved past it. Every row is read
 * exactly once, in one pass, and no page is faulted twice. Blocks are cut where any row enters
 * its next granule, and the granules left behind are dropped before the next block is read, so
 * each row has at most one granule mapped at any moment, even when all rows cross together.
 * Single-threaded: more threads would each keep their own granules mapped. */
static PyObject *combine_release(PyObject *self, PyObject *args) {
    unsigned long long out_p, base_p, rows_p, alpha_p, map_lo, map_hi;
    Py_ssize_t n, row_stride, m;
    int base_dtype, rows_dtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKiKinnKKK", &out_p, &n, &base_p, &base_dtype, &rows_p, &rows_dtype, &row_stride,
                          &m, &alpha_p, &map_lo, &map_hi))
        return NULL;
    if (n < 0 || m < 0 || base_p == 0 || base_dtype < DT_F32 || base_dtype > DT_BF16 || rows_dtype < DT_F32 ||
        rows_dtype > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "combine_release: negative size, no base or unknown dtype code");
        return NULL;
    }
    float *out = (float *)(uintptr_t)out_p;
    const char *base = (const char *)(uintptr_t)base_p;
    const char *rows = (const char *)(uintptr_t)rows_p;
    const float *alpha = (const float *)(uintptr_t)alpha_p;
    const size_t item = item_size(rows_dtype), base_item = item_size(base_dtype);
    const size_t row_bytes = (size_t)row_stride * item;
    /* per stream (0: the base row, 1 + j: expert row j): its start address, how far its pages were
     * dropped, and the column at which it enters its next granule */
    uintptr_t *start = PyMem_Malloc(3 * (size_t)(m + 1) * sizeof *start);
    if (start == NULL) return PyErr_NoMemory();
    uintptr_t *dropped = start + m + 1, *cross = dropped + m + 1;
    start[0] = (uintptr_t)base;
    for (Py_ssize_t j = 0; j < m; j++) start[1 + j] = (uintptr_t)(rows + (size_t)j * row_bytes);
    for (Py_ssize_t s = 0; s <= m; s++) {
        size_t size = s ? item : base_item;
        dropped[s] = start[s] / GRANULE * GRANULE;
        cross[s] = (dropped[s] + GRANULE - start[s] + size - 1) / size;
    }
    const Kernel *k = kernel;
    static const float zeros[BLOCK];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t lo = 0, hi; lo < n; lo = hi) {
        hi = lo + BLOCK < n ? lo + BLOCK : n;
        for (Py_ssize_t s = 0; s <= m; s++)
            if ((Py_ssize_t)cross[s] > lo && (Py_ssize_t)cross[s] < hi) hi = (Py_ssize_t)cross[s];
        Py_ssize_t len = hi - lo;
        k->set(out + lo, base + (size_t)lo * base_item, base_dtype, len);
        for (Py_ssize_t j = 0; j < m; j += GROUP) {
            const void *src[GROUP];
            float a[GROUP];
            for (int g = 0; g < GROUP; g++) {
                int real = j + g < m;
                src[g] = real ? (const void *)(rows + (size_t)(j + g) * row_bytes + (size_t)lo * item) : zeros;
                a[g] = real ? alpha[j + g] : 0.0f;
            }
            k->add4(out + lo, src, rows_dtype, a, len);
        }
        for (Py_ssize_t s = 0; s <= m; s++) { /* granules wholly behind every row's read position */
            size_t size = s ? item : base_item;
            uintptr_t done = (start[s] + (size_t)hi * size) / GRANULE * GRANULE;
            if (done > dropped[s]) {
                drop_pages(dropped[s], done, (uintptr_t)map_lo, (uintptr_t)map_hi);
                dropped[s] = done;
            }
            if ((Py_ssize_t)cross[s] <= hi) /* entered a new granule: the next crossing lies beyond hi */
                cross[s] = (dropped[s] + GRANULE - start[s] + size - 1) / size;
        }
    }
    for (Py_ssize_t s = 0; s <= m; s++) { /* the last, partly read granule of every row */
        uintptr_t end = start[s] + (size_t)n * (s ? item : base_item);
        drop_pages(dropped[s], (end + GRANULE - 1) / GRANULE * GRANULE, (uintptr_t)map_lo, (uintptr_t)map_hi);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(start);
    Py_RETURN_NONE;
}

static PyObject *set_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const Kernel *chosen = NULL;
    if (strcmp(name, "best") == 0) chosen = best_kernel();
    if (strcmp(name, "scalar") == 0) chosen = &SCALAR;
#ifdef SOE_X86
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) chosen = &AVX2;
    if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) chosen = &AVX512;
#endif
    if (chosen == NULL) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU", name);
        return NULL;
    }
    kernel = chosen;
    return PyUnicode_FromString(kernel->name);
}

static PyObject *get_isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(kernel->name);
}

static PyMethodDef methods[] = {
    {"combine", combine, METH_VARARGS,
     "combine(out, n, base, base_dtype, rows, rows_dtype, row_stride, m, alpha): out[:n] = (base or out) + "
     "alpha[:m] @ rows, from raw data pointers (base 0: out itself); dtype codes 0 f32, 1 f16, 2 bf16."},
    {"combine_release", combine_release, METH_VARARGS,
     "combine_release(out, n, base, base_dtype, rows, rows_dtype, row_stride, m, alpha, map_lo, map_hi): combine() "
     "in one pass, dropping the pages of base and rows inside the file mapping [map_lo, map_hi) once read."},
    {"set_isa", set_isa, METH_VARARGS, "Use 'best', 'avx512', 'avx2' or 'scalar' code; returns the one in use."},
    {"isa", get_isa, METH_NOARGS, "The instruction set in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merge_kernel", "Fused merge kernel (soe_sdk/fused.py).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__merge_kernel(void) {
    kernel = best_kernel();
    return PyModule_Create(&module);
}
