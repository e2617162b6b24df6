/* Fused merge kernel: out = base + sum_j alpha[j] * rows[j], in one pass over the stored bytes.
 *
 * PyTorch's CPU backend has no float16 x float16 -> float32 product, so merging a float16
 * archive through torch means converting every expert row to float32 first (a write and a
 * re-read of twice the bytes) and then a GEMM. Here each 16-bit row is widened in registers
 * as it is read, four rows are added per pass over an output block that stays in L2, and so
 * the archive's bytes are read exactly once. Inputs may be float32, float16 or bfloat16; the
 * output and the accumulation are float32.
 *
 * combine_release() is the same merge for parameters too large to keep mapped: it hands the
 * pages of a file mapping back to the OS as it moves past them (Soup's low_memory merges).
 *
 * Python calls it with raw data pointers (soe_sdk/fused.py checks shapes, dtypes and devices
 * first). The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <pthread.h>
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

/* acc[0, len) += sum_{j in [first, end)} alpha[j] * rows[j][lo + i], GROUP rows per pass over acc;
 * `zeros` (at least len elements) pads the last group. */
static void add_rows(const Kernel *k, float *acc, const char *rows, size_t row_bytes, int dtype, Py_ssize_t lo,
                     const float *alpha, Py_ssize_t first, Py_ssize_t end, const float *zeros, Py_ssize_t len) {
    const size_t item = item_size(dtype);
    for (Py_ssize_t j = first; j < end; j += GROUP) {
        const void *src[GROUP];
        float a[GROUP];
        for (int g = 0; g < GROUP; g++) {
            int real = j + g < end;
            src[g] = real ? (const void *)(rows + (size_t)(j + g) * row_bytes + (size_t)lo * item) : zeros;
            a[g] = real ? alpha[j + g] : 0.0f;
        }
        k->add4(acc, src, dtype, a, len);
    }
}

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
        add_rows(k, out + lo, rows, row_bytes, rows_dtype, lo, alpha, 0, m, zeros, len);
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
 * its next granule, and each row's granules left behind are dropped before it reads on, so each
 * row has at most one granule mapped at any moment, even when all rows cross together.
 *
 * With several threads the rows are split between them, not the columns: every row is still
 * read by one thread only and has one granule mapped, so the resident memory does not grow with
 * the threads. Thread 0 writes base + its rows into the output block; every other thread writes
 * the combination of its rows into a block of its own (two, alternating), which thread 0 adds
 * into the output once all threads have finished that block. */
#define RELEASE_BLOCK 65536 /* columns per block: 256 KB of float32 output, still within L2 */
#define MAX_THREADS 4

typedef struct {
    float *out;
    const char *base, *rows;
    const float *alpha;
    int base_dtype, rows_dtype;
    Py_ssize_t n, m, threads;
    size_t row_bytes;
    uintptr_t map_lo, map_hi;
    uintptr_t *start;    /* per stream (0: the base row, 1 + j: expert row j): its first byte */
    size_t *size;        /* and its element size */
    uintptr_t *dropped;  /* how far its pages were dropped */
    float *partial;      /* threads - 1 workers x 2 alternating blocks of RELEASE_BLOCK floats */
#ifdef __linux__
    pthread_barrier_t barrier;
    pthread_mutex_t gate_lock; /* workers wait at the gate until all of them were started */
    pthread_cond_t gate;
    int gate_state;            /* 0: wait, 1: go, -1: not all started, return at once */
#endif
} ReleaseJob;

/* The next block [lo, cut): at most RELEASE_BLOCK columns, ending where the first stream enters
 * a new granule. Every thread computes the same cuts from the same inputs. */
static Py_ssize_t next_cut(const ReleaseJob *job, Py_ssize_t lo) {
    Py_ssize_t hi = lo + RELEASE_BLOCK < job->n ? lo + RELEASE_BLOCK : job->n;
    for (Py_ssize_t s = job->base ? 0 : 1; s <= job->m; s++) {
        uintptr_t next = (job->start[s] + (size_t)lo * job->size[s]) / GRANULE * GRANULE + GRANULE;
        Py_ssize_t cross = (Py_ssize_t)((next - job->start[s] + job->size[s] - 1) / job->size[s]);
        if (cross < hi) hi = cross; /* always > lo: `next` lies beyond column lo */
    }
    return hi;
}

/* First row and end of thread t's share of the m expert rows (whole groups of four where possible). */
static void rows_of(const ReleaseJob *job, Py_ssize_t t, Py_ssize_t *first, Py_ssize_t *end) {
    Py_ssize_t groups = (job->m + GROUP - 1) / GROUP;
    Py_ssize_t lo = groups * t / job->threads * GROUP, hi = groups * (t + 1) / job->threads * GROUP;
    *first = lo < job->m ? lo : job->m;
    *end = hi < job->m ? hi : job->m;
}

/* Drop stream s's granules wholly behind column `col` (only the thread that reads s calls this). */
static void drop_behind(ReleaseJob *job, Py_ssize_t s, Py_ssize_t col) {
    uintptr_t done = (job->start[s] + (size_t)col * job->size[s]) / GRANULE * GRANULE;
    if (done > job->dropped[s]) {
        drop_pages(job->dropped[s], done, job->map_lo, job->map_hi);
        job->dropped[s] = done;
    }
}

static void release_worker(ReleaseJob *job, Py_ssize_t t) {
    static const float zeros[RELEASE_BLOCK];
    const Kernel *k = kernel;
    Py_ssize_t first, end;
    rows_of(job, t, &first, &end);
    Py_ssize_t parity = 0;
    for (Py_ssize_t lo = 0, hi; lo < job->n; lo = hi, parity ^= 1) {
        hi = next_cut(job, lo);
        Py_ssize_t len = hi - lo;
        float *dest = t == 0 ? job->out + lo : job->partial + ((t - 1) * 2 + parity) * RELEASE_BLOCK;
        if (t == 0 && job->base)
            k->set(dest, job->base + (size_t)lo * item_size(job->base_dtype), job->base_dtype, len);
        else if (t > 0)
            memset(dest, 0, (size_t)len * sizeof *dest);
        add_rows(k, dest, job->rows, job->row_bytes, job->rows_dtype, lo, job->alpha, first, end, zeros, len);
        if (t == 0 && job->base) drop_behind(job, 0, hi); /* the base row is thread 0's */
        for (Py_ssize_t j = first; j < end; j++) drop_behind(job, 1 + j, hi);
#ifdef __linux__
        if (job->threads > 1) {
            pthread_barrier_wait(&job->barrier); /* every thread has finished block [lo, hi) */
            if (t == 0) { /* add the other threads' blocks; they fill their other block meanwhile */
                const void *src[GROUP] = {zeros, zeros, zeros, zeros};
                float unit[GROUP] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (Py_ssize_t w = 1; w < job->threads; w++) {
                    src[w - 1] = job->partial + ((w - 1) * 2 + parity) * RELEASE_BLOCK;
                    unit[w - 1] = 1.0f;
                }
                k->add4(job->out + lo, src, DT_F32, unit, len);
            }
        }
#endif
    }
}

#ifdef __linux__
typedef struct {
    ReleaseJob *job;
    Py_ssize_t t;
} WorkerArgs;

static void *release_thread(void *arg) {
    WorkerArgs *w = (WorkerArgs *)arg;
    ReleaseJob *job = w->job;
    pthread_mutex_lock(&job->gate_lock);
    while (job->gate_state == 0) pthread_cond_wait(&job->gate, &job->gate_lock);
    int go = job->gate_state > 0;
    pthread_mutex_unlock(&job->gate_lock);
    if (go) release_worker(job, w->t);
    return NULL;
}

static void open_gate(ReleaseJob *job, int state) {
    pthread_mutex_lock(&job->gate_lock);
    job->gate_state = state;
    pthread_cond_broadcast(&job->gate);
    pthread_mutex_unlock(&job->gate_lock);
}
#endif

static PyObject *combine_release(PyObject *self, PyObject *args) {
    unsigned long long out_p, base_p, rows_p, alpha_p, map_lo, map_hi;
    Py_ssize_t n, row_stride, m, threads;
    int base_dtype, rows_dtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKiKinnKKKn", &out_p, &n, &base_p, &base_dtype, &rows_p, &rows_dtype, &row_stride,
                          &m, &alpha_p, &map_lo, &map_hi, &threads))
        return NULL;
    if (n < 0 || m < 0 || base_dtype < DT_F32 || base_dtype > DT_BF16 || rows_dtype < DT_F32 || rows_dtype > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "combine_release: negative size or unknown dtype code");
        return NULL;
    }
#ifndef __linux__
    threads = 1;
#endif
    Py_ssize_t groups = (m + GROUP - 1) / GROUP;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > groups) threads = groups; /* every thread has a group of rows */
    if (threads < 1) threads = 1;
    ReleaseJob job;
    memset(&job, 0, sizeof job);
    job.out = (float *)(uintptr_t)out_p;
    job.base = (const char *)(uintptr_t)base_p;
    job.rows = (const char *)(uintptr_t)rows_p;
    job.alpha = (const float *)(uintptr_t)alpha_p;
    job.base_dtype = base_dtype;
    job.rows_dtype = rows_dtype;
    job.n = n;
    job.m = m;
    job.threads = threads;
    job.row_bytes = (size_t)row_stride * item_size(rows_dtype);
    job.map_lo = (uintptr_t)map_lo;
    job.map_hi = (uintptr_t)map_hi;
    size_t streams = (size_t)m + 1;
    job.start = PyMem_Malloc(streams * (2 * sizeof(uintptr_t) + sizeof(size_t)));
    job.partial = PyMem_Malloc((size_t)(threads - 1) * 2 * RELEASE_BLOCK * sizeof(float) + 1);
    if (job.start == NULL || job.partial == NULL) {
        PyMem_Free(job.start);
        PyMem_Free(job.partial);
        return PyErr_NoMemory();
    }
    job.dropped = job.start + streams;
    job.size = (size_t *)(job.dropped + streams);
    job.start[0] = job.base ? (uintptr_t)job.base : (uintptr_t)job.out; /* no base: out is added to, not dropped */
    job.size[0] = job.base ? item_size(base_dtype) : sizeof(float);
    for (Py_ssize_t j = 0; j < m; j++) {
        job.start[1 + j] = (uintptr_t)(job.rows + (size_t)j * job.row_bytes);
        job.size[1 + j] = item_size(rows_dtype);
    }
    for (size_t s = 0; s < streams; s++) job.dropped[s] = job.start[s] / GRANULE * GRANULE;
    Py_BEGIN_ALLOW_THREADS
#ifdef __linux__
    pthread_t workers[MAX_THREADS];
    WorkerArgs worker_args[MAX_THREADS];
    Py_ssize_t started = 1;
    if (threads > 1 && pthread_barrier_init(&job.barrier, NULL, (unsigned)threads) != 0) job.threads = threads = 1;
    if (threads > 1) {
        pthread_mutex_init(&job.gate_lock, NULL);
        pthread_cond_init(&job.gate, NULL);
        job.gate_state = 0;
        for (; started < threads; started++) {
            worker_args[started] = (WorkerArgs){&job, started};
            if (pthread_create(&workers[started], NULL, release_thread, &worker_args[started]) != 0) break;
        }
        open_gate(&job, started == threads ? 1 : -1);
        if (started < threads) { /* the barrier needs every thread: the started ones return, one thread merges */
            for (Py_ssize_t t = 1; t < started; t++) pthread_join(workers[t], NULL);
            pthread_barrier_destroy(&job.barrier);
            job.threads = 1;
            started = 1;
        }
    }
    release_worker(&job, 0);
    if (job.threads > 1) {
        for (Py_ssize_t t = 1; t < started; t++) pthread_join(workers[t], NULL);
        pthread_barrier_destroy(&job.barrier);
    }
    if (threads > 1) {
        pthread_cond_destroy(&job.gate);
        pthread_mutex_destroy(&job.gate_lock);
    }
#else
    release_worker(&job, 0);
#endif
    for (size_t s = job.base ? 0 : 1; s < streams; s++) { /* the last, partly read granule of every row */
        uintptr_t end = job.start[s] + (size_t)n * job.size[s];
        drop_pages(job.dropped[s], (end + GRANULE - 1) / GRANULE * GRANULE, job.map_lo, job.map_hi);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(job.start);
    PyMem_Free(job.partial);
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
     "combine_release(out, n, base, base_dtype, rows, rows_dtype, row_stride, m, alpha, map_lo, map_hi, threads): "
     "combine() (base 0: add to out) in one pass, dropping the pages of base and rows inside the file mapping [map_lo, map_hi) once "
     "read; the rows are split between up to `threads` threads."},
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
