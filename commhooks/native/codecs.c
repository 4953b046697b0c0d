/* Fused CPU kernels for the quantizers: error-feedback compensation, quantization, bit
 * packing and the new residual in two passes over the gradient, and decoding straight to
 * fp32 (optionally accumulating, for all-gather aggregation).
 *
 * Compiled on first use by commhooks/native/__init__.py (plain C, no torch headers) and called
 * through ctypes. Built with -ffp-contract=off so that every float expression rounds exactly
 * as the equivalent torch ops do: the deterministic codecs' payloads are byte-identical to the
 * torch path's (scales from reductions aside, which sum in double here; QSGD and TernGrad draw
 * their own rounding noise), and the residual is exactly c - decode(code).
 *
 * Threads: a persistent pool over contiguous ranges; reductions go through fixed work items,
 * so results do not depend on the thread count.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* Built without -march=native, so that one cached library serves every CPU of a cluster: the
 * file is compiled once per x86-64 level (-march=x86-64-v4, -v3 and the baseline) with
 * CH_LEVEL naming the level, each exported ch_* function getting the suffix _<level>, and
 * linked into one library; ch_cpu_level() says which level this CPU runs, and the loader binds
 * that level's functions. Elsewhere it is compiled once, CH_LEVEL the baseline's name. The
 * levels give identical results: no flag here lets the compiler change a float operation.
 * The loader reads each exported function's ctypes signature from its definition, written
 * `<type> CH(ch_<name>)(<parameters>) {` at the start of a line (commhooks.native.signatures):
 * keep exported definitions in that form, their types among those it knows. */
#define CH_CAT2(a, b) a##_##b
#define CH_CAT(a, b) CH_CAT2(a, b)
#define CH(name) CH_CAT(name, CH_LEVEL)

#if defined(CH_PROBE)
/* The highest level the CPU (and the OS, for the vector registers) supports: 4, 3, else 1. */
int ch_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 4;
    if (__builtin_cpu_supports("x86-64-v3")) return 3;
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    /* the features the compilers name everywhere; CPUs with these have the rest of the level */
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
    if (v4) return 4;
    if (v3) return 3;
#endif
    return 1;
}
#endif

#define MAX_THREADS 64
#define BLOCK 65536 /* elements per reduction work item */

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
} job_t;

/* ---- the thread pool --------------------------------------------------------------------- */
/* Workers are started lazily, the first time a call wants them, and then wait on a condition
 * variable for the next batch, so a call costs a wake-up rather than thread creations. One
 * batch runs at a time (pool_use): codecs called from two threads at once take turns, each
 * with the same fixed split of work, so outputs do not depend on who ran what. A child of
 * fork() has none of its parent's workers, so the pool starts again empty there. */

static pthread_mutex_t pool_use = PTHREAD_MUTEX_INITIALIZER; /* held for a whole batch */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;  /* guards the fields below */
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static int pool_workers;          /* started; worker w runs job w (1..pool_workers) */
static unsigned long pool_gen;    /* bumped once per batch */
static unsigned long pool_seen[MAX_THREADS]; /* the batch each worker starts after */
static const job_t *pool_jobs;
static int pool_k;                /* jobs in the batch, job 0 the caller's */
static int pool_left;             /* worker jobs of the batch not yet finished */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_after_fork(void) {
    static const pthread_mutex_t m0 = PTHREAD_MUTEX_INITIALIZER;
    static const pthread_cond_t c0 = PTHREAD_COND_INITIALIZER;
    pool_use = m0;
    pool_mu = m0;
    pool_go = c0;
    pool_done = c0;
    pool_workers = 0;
    pool_left = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void *pool_main(void *arg) {
    int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool_mu);
    unsigned long seen = pool_seen[id];
    for (;;) {
        while (pool_gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_gen;
        if (id < pool_k) {
            job_t j = pool_jobs[id];
            pthread_mutex_unlock(&pool_mu);
            j.fn(j.ctx, j.begin, j.end);
            pthread_mutex_lock(&pool_mu);
            if (--pool_left == 0) pthread_cond_signal(&pool_done);
        }
    }
    return NULL;
}

/* Runs jobs[0..k) with jobs[0] on the calling thread; jobs no worker could be started for run
 * here too. */
static void pool_run(const job_t *jobs, int k) {
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool_use);
    pthread_mutex_lock(&pool_mu);
    while (pool_workers < k - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        int id = pool_workers + 1, ok = 0;
        pool_seen[id] = pool_gen;
        if (pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&tid, &attr, pool_main, (void *)(intptr_t)id) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!ok) break; /* no more threads to be had: the caller does the rest */
        pool_workers = id;
    }
    int served = k - 1 < pool_workers ? k : pool_workers + 1;
    pool_jobs = jobs;
    pool_k = served;
    pool_left = served - 1;
    pool_gen++;
    pthread_cond_broadcast(&pool_go);
    pthread_mutex_unlock(&pool_mu);
    jobs[0].fn(jobs[0].ctx, jobs[0].begin, jobs[0].end);
    for (int t = served; t < k; t++) jobs[t].fn(jobs[t].ctx, jobs[t].begin, jobs[t].end);
    pthread_mutex_lock(&pool_mu);
    while (pool_left) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&pool_use);
}

/* Split [0, n) into at most nthreads ranges whose starts are multiples of align; below
 * 2^17 elements of work (`elements`, whatever the unit of n) threads cost more than they save. */
static void parallel_for(int64_t n, int64_t align, int64_t elements, int nthreads, range_fn fn,
                         void *ctx) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1 || elements < (int64_t)1 << 17) nthreads = 1;
    if (nthreads == 1) {
        fn(ctx, 0, n);
        return;
    }
    job_t jobs[MAX_THREADS];
    int64_t per = (n + nthreads - 1) / nthreads;
    per = (per + align - 1) / align * align;
    int k = 0;
    for (int64_t b = 0; b < n && k < nthreads; b += per, k++) {
        jobs[k].fn = fn;
        jobs[k].ctx = ctx;
        jobs[k].begin = b;
        jobs[k].end = b + per < n ? b + per : n;
    }
    if (k == 1)
        fn(ctx, 0, n);
    else
        pool_run(jobs, k);
}

/* ---- pass 1: per-chunk statistics of c = g + e ------------------------------------------ */

typedef struct {
    const float *g, *e;
    int64_t n, chunk, sub; /* sub: work items per chunk */
    double *sum;           /* per item: sum |c| */
    double *sq;            /* per item: sum c^2 (NULL: not wanted) */
    float *lo, *hi;        /* per item: min c, max c (NULL: not wanted) */
    float *amax;           /* per item: max |c| */
    int signed_sum;        /* sums of d = c - pivot instead of |c|; squares of d */
    float pivot;           /* 0 unless signed_sum */
} stats_t;

#define LANES 16
#define SUB 4096 /* float partial sums stay within a few ulps over this many elements */

static void stats_range(void *arg, int64_t i0, int64_t i1) {
    stats_t *s = (stats_t *)arg;
    const float *g = s->g, *e = s->e;
    const int sgn = s->signed_sum;
    const float pv = s->pivot;
    for (int64_t it = i0; it < i1; it++) {
        int64_t c = it / s->sub, b = it % s->sub;
        int64_t start = c * s->chunk + b * BLOCK;
        int64_t stop = c * s->chunk + (b + 1) * BLOCK;
        int64_t cend = (c + 1) * s->chunk;
        if (stop > cend) stop = cend;
        if (stop > s->n) stop = s->n;
        double sum = 0.0, sq = 0.0;
        float am[LANES], lo[LANES], hi[LANES];
        for (int l = 0; l < LANES; l++) {
            am[l] = 0.0f;
            lo[l] = INFINITY;
            hi[l] = -INFINITY;
        }
        /* Independent lanes let the compiler vectorize without reassociating anything. */
        for (int64_t a = start; a < stop; a += SUB) {
            int64_t z = a + SUB < stop ? a + SUB : stop;
            float ps[LANES] = {0}, p2[LANES] = {0};
            int64_t i = a;
            for (; i + LANES <= z; i += LANES)
                for (int l = 0; l < LANES; l++) {
                    float v = e ? g[i + l] + e[i + l] : g[i + l];
                    float m = fabsf(v);
                    float d = v - pv; /* v itself when pv is 0 */
                    ps[l] += sgn ? d : m;
                    p2[l] += d * d; /* inf past |d| ~ 1.8e19: the caller checks */
                    am[l] = m > am[l] ? m : am[l];
                    lo[l] = v < lo[l] ? v : lo[l];
                    hi[l] = v > hi[l] ? v : hi[l];
                }
            for (; i < z; i++) {
                float v = e ? g[i] + e[i] : g[i];
                float m = fabsf(v);
                float d = v - pv;
                ps[0] += sgn ? d : m;
                p2[0] += d * d;
                am[0] = m > am[0] ? m : am[0];
                lo[0] = v < lo[0] ? v : lo[0];
                hi[0] = v > hi[0] ? v : hi[0];
            }
            for (int l = 0; l < LANES; l++) {
                sum += (double)ps[l];
                sq += (double)p2[l];
            }
        }
        float amax = 0.0f, l0 = INFINITY, h0 = -INFINITY;
        for (int l = 0; l < LANES; l++) {
            amax = am[l] > amax ? am[l] : amax;
            l0 = lo[l] < l0 ? lo[l] : l0;
            h0 = hi[l] > h0 ? hi[l] : h0;
        }
        /* A NaN never wins a comparison, so the sum is what reveals it. */
        s->sum[it] = sum;
        if (s->sq) s->sq[it] = sq;
        s->amax[it] = amax;
        if (s->lo) {
            s->lo[it] = l0;
            s->hi[it] = h0;
        }
    }
}

/* Per-chunk sum |c| and, when asked for, sum c^2 (both as double), min and max of c; with
 * signed_sum, sums of d = c - pivot and of d^2 instead (a pivot near the mean keeps
 * E[d^2] - E[d]^2 from cancelling). scratch holds ch_stats_items() doubles. Returns the sum
 * over the whole tensor (non-finite iff some c is, either way) and writes max |c| to
 * *amax_out. */
double CH(ch_chunk_stats)(const float *g, const float *e, int64_t n, int64_t chunk, double *sums,
                      double *sumsq, float *lo, float *hi, float *amax_out, double *scratch,
                      int signed_sum, float pivot, int nthreads) {
    int64_t nchunks = (n + chunk - 1) / chunk;
    int64_t sub = (chunk + BLOCK - 1) / BLOCK;
    int64_t items = nchunks * sub;
    float *fl = (float *)(scratch + 2 * items); /* amax, lo, hi per item */
    double *sq = sumsq ? scratch + items : NULL;
    stats_t s = {g, e, n, chunk, sub, scratch, sq, NULL, NULL, fl, signed_sum,
                 signed_sum ? pivot : 0.0f};
    if (lo) {
        s.lo = fl + items;
        s.hi = fl + 2 * items;
    }
    parallel_for(items, 1, n, nthreads, stats_range, &s);
    double total = 0.0;
    float amax = 0.0f;
    for (int64_t c = 0; c < nchunks; c++) {
        double cs = 0.0, c2 = 0.0;
        float clo = INFINITY, chi = -INFINITY;
        for (int64_t b = 0; b < sub; b++) {
            int64_t it = c * sub + b;
            if (c * chunk + b * BLOCK >= n) break;
            cs += s.sum[it];
            if (sumsq) c2 += s.sq[it];
            amax = s.amax[it] > amax ? s.amax[it] : amax;
            if (lo) {
                clo = s.lo[it] < clo ? s.lo[it] : clo;
                chi = s.hi[it] > chi ? s.hi[it] : chi;
            }
        }
        sums[c] = cs;
        if (sumsq) sumsq[c] = c2;
        if (lo) {
            lo[c] = clo;
            hi[c] = chi;
        }
        total += cs;
    }
    *amax_out = amax;
    return total;
}

/* Scratch doubles ch_chunk_stats needs. */
int64_t CH(ch_stats_items)(int64_t n, int64_t chunk) {
    int64_t nchunks = (n + chunk - 1) / chunk;
    int64_t items = nchunks * ((chunk + BLOCK - 1) / BLOCK);
    return 4 * items; /* sum, sumsq (doubles); amax, lo, hi (floats) */
}

/* ---- bit packing helpers ------------------------------------------------------------------ */

/* Codes beyond the last multiple of 8 go as a bit matrix (commhooks.coding.bitpack). */
static void pack_tail(const uint8_t *codes, int count, int bits, uint8_t *out) {
    memset(out, 0, (size_t)((count * bits + 7) / 8));
    for (int t = 0; t < count; t++)
        for (int b = 0; b < bits; b++) {
            int pos = t * bits + b;
            out[pos / 8] |= (uint8_t)(((codes[t] >> b) & 1) << (pos % 8));
        }
}

static int unpack_tail_code(const uint8_t *in, int t, int bits) {
    int code = 0;
    for (int b = 0; b < bits; b++) {
        int pos = t * bits + b;
        code |= ((in[pos / 8] >> (pos % 8)) & 1) << b;
    }
    return code;
}

/* ---- shared by the codecs ---------------------------------------------------------------- */

/* Elements go in blocks: a vectorizable loop computes codes (one byte each) and the residual,
 * then the codes are packed. A block lies inside one chunk, so it has one scale; chunk sizes
 * that are not multiples of 8 fall back to per-element packing (see *_slow). */
#define BLK 512
#define PACK8 0x0102040810204080ULL   /* eight 0/1 bytes -> one byte, byte j -> bit j */
#define SPREAD8 0x0101010101010101ULL /* one byte -> eight copies */
#define BITSEL 0x8040201008040201ULL  /* byte lane j keeps bit j */

typedef struct {
    const float *g;
    float *e; /* residual, updated in place (NULL: no error feedback) */
    int64_t n, chunk;
    const float *scale, *step; /* sign: scale; uniform: lo (as scale) and step */
    int bits;
    uint8_t *data;
    float *out;
    int accumulate;
    int stochastic; /* uniform: floor(q + u) instead of the nearest level */
    uint32_t s0, s1;
    /* Table mode (non-uniform levels), when mids is set: scale is max|c| per chunk, the code
     * is 2 * level + sign, and it decodes to +-levels[level] * scale. */
    const float *mids, *levels; /* levels[nlev], sorted from 0 to 1; mids[nlev - 1] */
    int nlev;
} codec_t;

static void pack_codes(const uint8_t *codes, int64_t m, int bits, uint8_t *dst) {
    switch (bits) {
    case 8:
        memcpy(dst, codes, (size_t)m);
        break;
    case 4:
        for (int64_t k = 0; k < m / 2; k++) dst[k] = (uint8_t)(codes[2 * k] | codes[2 * k + 1] << 4);
        break;
    case 2:
        for (int64_t k = 0; k < m / 4; k++)
            dst[k] = (uint8_t)(codes[4 * k] | codes[4 * k + 1] << 2 | codes[4 * k + 2] << 4 |
                               codes[4 * k + 3] << 6);
        break;
    default:
        for (int64_t k = 0; k < m / 8; k++) {
            uint64_t x;
            memcpy(&x, codes + 8 * k, 8);
            dst[k] = (uint8_t)((x * PACK8) >> 56);
        }
    }
}

static void unpack_codes(const uint8_t *src, int64_t m, int bits, uint8_t *codes) {
    switch (bits) {
    case 8:
        memcpy(codes, src, (size_t)m);
        break;
    case 4:
        for (int64_t k = 0; k < m / 2; k++) {
            codes[2 * k] = src[k] & 15;
            codes[2 * k + 1] = src[k] >> 4;
        }
        break;
    case 2:
        for (int64_t k = 0; k < m / 4; k++)
            for (int j = 0; j < 4; j++) codes[4 * k + j] = (src[k] >> (2 * j)) & 3;
        break;
    default:
        for (int64_t k = 0; k < m / 8; k++) {
            uint64_t x = ((src[k] * SPREAD8) & BITSEL);
            for (int j = 0; j < 8; j++) codes[8 * k + j] = ((x >> (8 * j)) & 0xff) != 0;
        }
    }
}

/* Calls seg(ctx, a, b, chunk index) for the pieces of [i0, min(i1, body)) that share a chunk,
 * when every chunk boundary is a multiple of 8; returns 0 (nothing done) otherwise. */
typedef void (*seg_fn)(codec_t *c, int64_t a, int64_t b, int64_t chunk_index);

static int for_segments(codec_t *c, int64_t i0, int64_t i1, seg_fn seg) {
    int64_t n = c->n, chunk = c->chunk, body = n - n % 8;
    if (!(chunk % 8 == 0 || chunk >= n)) return 0;
    int64_t end = i1 < body ? i1 : body;
    for (int64_t a = i0; a < end;) {
        int64_t ci = a / chunk;
        int64_t b = (ci + 1) * chunk < end ? (ci + 1) * chunk : end;
        for (int64_t s = a; s < b; s += BLK) seg(c, s, s + BLK < b ? s + BLK : b, ci);
        a = b;
    }
    return 1;
}

/* A counter-based generator: element i of a call draws hash(i, seed), so threads need no
 * shared state and a call is reproducible from its 64-bit seed (drawn from the compressor's
 * private torch generator). One round of lowbias32 (C. Wellons), a bijection with low bias,
 * over the seeded counter: enough for rounding noise, and half the work of two rounds, which
 * this compute-bound loop feels. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline float uniform01(int64_t i, uint32_t s0, uint32_t s1) {
    uint32_t x = ((uint32_t)i ^ s0) + ((uint32_t)((uint64_t)i >> 32) ^ s1) * 0x9E3779B9U;
    return (float)(mix32(x) >> 8) * (1.0f / 16777216.0f); /* 24 bits: exact in a float, < 1 */
}

/* ---- sign ------------------------------------------------------------------------------- */

static inline float sign_value(float v, float sc) { return v >= 0.0f ? sc : -sc; }

static void sign_enc_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    uint8_t codes[BLK];
    const float *g = c->g + a;
    float *e = c->e ? c->e + a : NULL;
    float sc = c->scale[ci];
    int64_t m = b - a;
    if (e) {
        for (int64_t j = 0; j < m; j++) {
            float v = g[j] + e[j];
            codes[j] = v >= 0.0f;
            e[j] = v - sign_value(v, sc);
        }
    } else {
        for (int64_t j = 0; j < m; j++) codes[j] = g[j] >= 0.0f;
    }
    pack_codes(codes, m, 1, c->data + a / 8);
}

static void sign_encode_range(void *arg, int64_t i0, int64_t i1) {
    codec_t *s = (codec_t *)arg;
    const float *g = s->g;
    float *e = s->e;
    int64_t n = s->n, chunk = s->chunk, body = n - n % 8;
    int64_t from = i1; /* where the per-element loop starts */
    if (for_segments(s, i0, i1, sign_enc_seg))
        from = i1 < body ? i1 : body;
    else
        from = i0;
    /* per element: chunks not aligned to bytes, and the tail (a bit matrix, which for one bit
     * is laid out as plain bytes) */
    for (int64_t k = from; k < i1; k++) {
        float sc = s->scale[k / chunk];
        float v = e ? g[k] + e[k] : g[k];
        uint8_t bit = v >= 0.0f;
        if (e) e[k] = v - sign_value(v, sc);
        if (k % 8 == 0) s->data[k / 8] = 0;
        s->data[k / 8] |= (uint8_t)(bit << (k % 8));
    }
}

/* Sign bits of c = g + e (1 for c >= 0) and, with e, the residual e = c - (+-scale). */
void CH(ch_sign_encode)(const float *g, float *e, int64_t n, int64_t chunk, const float *scale,
                    uint8_t *bits, int nthreads) {
    codec_t s = {g, e, n, chunk, scale, NULL, 1, bits, NULL, 0, 0, 0, 0};
    parallel_for(n, 8, n, nthreads, sign_encode_range, &s);
}

static void sign_dec_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    int64_t m = b - a;
    float sc = c->scale[ci], *out = c->out + a;
    const uint8_t *src = c->data + a / 8;
    /* Straight from bits to floats, eight lanes a byte (no byte-per-code detour). */
    if (c->accumulate)
        for (int64_t k = 0; k < m / 8; k++) {
            unsigned x = src[k];
            for (int j = 0; j < 8; j++) out[8 * k + j] += (x >> j) & 1 ? sc : -sc;
        }
    else
        for (int64_t k = 0; k < m / 8; k++) {
            unsigned x = src[k];
            for (int j = 0; j < 8; j++) out[8 * k + j] = (x >> j) & 1 ? sc : -sc;
        }
}

static void sign_decode_range(void *arg, int64_t i0, int64_t i1) {
    codec_t *s = (codec_t *)arg;
    int64_t n = s->n, chunk = s->chunk, body = n - n % 8;
    int64_t from = i0;
    if (for_segments(s, i0, i1, sign_dec_seg)) from = i1 < body ? i1 : body;
    for (int64_t k = from; k < i1; k++) {
        float sc = s->scale[k / chunk];
        float v = (s->data[k / 8] >> (k % 8)) & 1 ? sc : -sc;
        s->out[k] = s->accumulate ? s->out[k] + v : v;
    }
}

/* Decode sign bits to +-scale. */
void CH(ch_sign_decode)(const uint8_t *bits, int64_t n, int64_t chunk, const float *scale, float *out,
                    int accumulate, int nthreads) {
    codec_t s = {NULL, NULL, n, chunk, scale, NULL, 1, (uint8_t *)bits, out, accumulate, 0, 0, 0};
    parallel_for(n, 8, n, nthreads, sign_decode_range, &s);
}

/* ---- uniform (min-max) ------------------------------------------------------------------ */

static inline float unif_level(float v, float lo, float step, float top) {
    float q = (v - lo) / step;
    q = q == q ? q : 0.0f; /* 0/0 in a constant chunk */
    q = nearbyintf(q);
    return q < 0.0f ? 0.0f : (q > top ? top : q);
}

/* Stochastic rounding: level l + 1 with probability q - l, as the torch path's floor(q + u);
 * +-inf (a subnormal step) clamps as its nan_to_num does. */
static inline float unif_level_st(float v, float lo, float step, float top, float u) {
    float q = (v - lo) / step;
    q = q == q ? q : 0.0f;
    q = floorf(q + u);
    return q < 0.0f ? 0.0f : (q > top ? top : q);
}

static inline float unif_code(const codec_t *c, int64_t i, float v, float lo, float step,
                              float top) {
    if (c->stochastic) return unif_level_st(v, lo, step, top, uniform01(i, c->s0, c->s1));
    return unif_level(v, lo, step, top);
}

/* Table mode: the index of the nearest level to u = |v| / s (a count of the midpoints below
 * u, as torch.searchsorted(mids, u): ties round down), its code and its decoded value. */
static inline int table_code(const codec_t *c, float v, float s, float *val) {
    float u = fabsf(v) / s;
    u = u == u ? (u > 1.0f ? 1.0f : u) : 0.0f; /* 0/0: an all-zero chunk */
    int k = 0;
    for (int t = 0; t < c->nlev - 1; t++) k += c->mids[t] < u;
    int neg = v < 0.0f && k > 0; /* level 0 has no sign */
    float mag = c->levels[k];
    *val = (neg ? -mag : mag) * s;
    return 2 * k + neg;
}

static inline float table_value(const codec_t *c, int code, float s) {
    float mag = c->levels[code >> 1];
    return ((code & 1) ? -mag : mag) * s;
}

/* One element's code, and in *val what it decodes to, in either mode. */
static inline int code_of(const codec_t *c, int64_t i, float v, int64_t ci, float *val) {
    if (c->mids) return table_code(c, v, c->scale[ci], val);
    float lo = c->scale[ci], step = c->step[ci];
    float q = unif_code(c, i, v, lo, step, (float)((1 << c->bits) - 1));
    *val = q * step + lo;
    return (int)q;
}

static inline float value_of(const codec_t *c, int code, int64_t ci) {
    if (c->mids) return table_value(c, code, c->scale[ci]);
    return (float)code * c->step[ci] + c->scale[ci];
}

/* The level count is a compile-time constant per instance and the tables are copied to locals
 * (no aliasing with e), so the compare loops unroll into selects and the element loop
 * vectorizes; the last level whose midpoint lies below u wins, which is levels[k] exactly. */
#define TABLE_ENC_LOOP(NL, EF)                                                                 \
    for (int64_t j = 0; j < m; j++) {                                                          \
        float v = (EF) ? g[j] + e[j] : g[j];                                                   \
        float u = fabsf(v) / s;                                                                \
        u = u == u ? (u > 1.0f ? 1.0f : u) : 0.0f;                                             \
        int k = 0;                                                                             \
        float mag = lev[0];                                                                    \
        for (int t = 0; t < (NL) - 1; t++) {                                                   \
            int below = mid[t] < u;                                                            \
            k += below;                                                                        \
            mag = below ? lev[t + 1] : mag;                                                    \
        }                                                                                      \
        int neg = v < 0.0f && k > 0;                                                           \
        codes[j] = (uint8_t)(2 * k + neg);                                                     \
        if (EF) e[j] = v - (neg ? -mag : mag) * s;                                             \
    }

/* Separate loops with and without e: a test of e inside one keeps it from vectorizing. */
#define TABLE_ENC(NL)                                                                          \
    if (e) {                                                                                   \
        TABLE_ENC_LOOP(NL, 1)                                                                  \
    } else {                                                                                   \
        TABLE_ENC_LOOP(NL, 0)                                                                  \
    }

static void table_enc_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    uint8_t codes[BLK];
    float mid[128], lev[128];
    const float *g = c->g + a;
    float *e = c->e ? c->e + a : NULL;
    float s = c->scale[ci];
    int64_t m = b - a;
    memcpy(mid, c->mids, (size_t)(c->nlev - 1) * sizeof(float));
    memcpy(lev, c->levels, (size_t)c->nlev * sizeof(float));
    switch (c->nlev) {
    case 2:
        TABLE_ENC(2)
        break;
    case 8:
        TABLE_ENC(8)
        break;
    case 128:
        TABLE_ENC(128)
        break;
    default:
        TABLE_ENC(c->nlev)
    }
    pack_codes(codes, m, c->bits, c->data + a / 8 * c->bits);
}

/* Decoding looks each symbol's signed level up in a table of 2 * nlev (a gather the compiler
 * vectorizes; negating a level is exact, so this is table_value's result). */
static void table_dec_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    uint8_t codes[BLK];
    float val[256];
    float *out = c->out + a;
    float s = c->scale[ci];
    int64_t m = b - a;
    for (int k = 0; k < c->nlev; k++) {
        val[2 * k] = c->levels[k];
        val[2 * k + 1] = -c->levels[k];
    }
    unpack_codes(c->data + a / 8 * c->bits, m, c->bits, codes);
    if (c->accumulate)
        for (int64_t j = 0; j < m; j++) out[j] += val[codes[j]] * s;
    else
        for (int64_t j = 0; j < m; j++) out[j] = val[codes[j]] * s;
}

static void unif_enc_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    uint8_t codes[BLK];
    const float *g = c->g + a;
    float *e = c->e ? c->e + a : NULL;
    float lo = c->scale[ci], step = c->step[ci], top = (float)((1 << c->bits) - 1);
    int64_t m = b - a;
    if (c->stochastic) {
        uint32_t s0 = c->s0, s1 = c->s1;
        for (int64_t j = 0; j < m; j++) {
            float v = e ? g[j] + e[j] : g[j];
            float q = unif_level_st(v, lo, step, top, uniform01(a + j, s0, s1));
            codes[j] = (uint8_t)q;
            if (e) e[j] = v - (q * step + lo);
        }
    } else if (e) {
        for (int64_t j = 0; j < m; j++) {
            float v = g[j] + e[j];
            float q = unif_level(v, lo, step, top);
            codes[j] = (uint8_t)q;
            e[j] = v - (q * step + lo);
        }
    } else {
        for (int64_t j = 0; j < m; j++) codes[j] = (uint8_t)unif_level(g[j], lo, step, top);
    }
    pack_codes(codes, m, c->bits, c->data + a / 8 * c->bits);
}

static void unif_encode_range(void *arg, int64_t i0, int64_t i1) {
    codec_t *u = (codec_t *)arg;
    const float *g = u->g;
    float *e = u->e;
    int bits = u->bits;
    int64_t n = u->n, chunk = u->chunk, body = n - n % 8;
    int64_t end = i1 < body ? i1 : body;
    float val;
    if (!for_segments(u, i0, i1, u->mids ? table_enc_seg : unif_enc_seg)) {
        uint8_t codes[8];
        for (int64_t i = i0; i < end; i += 8) {
            for (int j = 0; j < 8; j++) {
                float v = e ? g[i + j] + e[i + j] : g[i + j];
                codes[j] = (uint8_t)code_of(u, i + j, v, (i + j) / chunk, &val);
                if (e) e[i + j] = v - val;
            }
            pack_codes(codes, 8, bits, u->data + i / 8 * bits);
        }
    }
    if (i1 == n && body < n) {
        uint8_t codes[8];
        for (int64_t k = body; k < n; k++) {
            float v = e ? g[k] + e[k] : g[k];
            codes[k - body] = (uint8_t)code_of(u, k, v, k / chunk, &val);
            if (e) e[k] = v - val;
        }
        pack_tail(codes, (int)(n - body), bits, u->data + body / 8 * bits);
    }
}

/* Codes of c = g + e on 2**bits levels per chunk (bits 1, 2, 4 or 8), nearest or (stochastic)
 * randomly rounded with noise from seed (s0, s1), packed as commhooks.coding.bitpack.pack_bits
 * does; with e, the residual e = c - (code*step + lo). */
void CH(ch_uniform_encode)(const float *g, float *e, int64_t n, int64_t chunk, const float *lo,
                       const float *step, int bits, uint8_t *data, int stochastic, uint32_t s0,
                       uint32_t s1, int nthreads) {
    codec_t u = {g, e, n, chunk, lo, step, bits, data, NULL, 0, stochastic, s0, s1};
    parallel_for(n, 8, n, nthreads, unif_encode_range, &u);
}

static void unif_dec_seg(codec_t *c, int64_t a, int64_t b, int64_t ci) {
    uint8_t codes[BLK];
    int64_t m = b - a;
    float *out = c->out + a;
    unpack_codes(c->data + a / 8 * c->bits, m, c->bits, codes);
    float lo = c->scale[ci], step = c->step[ci];
    if (c->accumulate)
        for (int64_t j = 0; j < m; j++) out[j] += (float)codes[j] * step + lo;
    else
        for (int64_t j = 0; j < m; j++) out[j] = (float)codes[j] * step + lo;
}

static void unif_decode_range(void *arg, int64_t i0, int64_t i1) {
    codec_t *u = (codec_t *)arg;
    int bits = u->bits;
    int64_t n = u->n, chunk = u->chunk, body = n - n % 8;
    int64_t end = i1 < body ? i1 : body;
    seg_fn seg = u->mids ? table_dec_seg : unif_dec_seg;
    int64_t from = for_segments(u, i0, i1, seg) ? (end > i0 ? end : i0) : i0;
    uint8_t codes[8];
    for (int64_t i = from; i < i1; i++) {
        int64_t ci = i / chunk;
        int code;
        if (i < body) {
            unpack_codes(u->data + i / 8 * bits, 8, bits, codes);
            code = codes[i % 8];
        } else {
            code = unpack_tail_code(u->data + body / 8 * bits, (int)(i - body), bits);
        }
        float v = value_of(u, code, ci);
        u->out[i] = u->accumulate ? u->out[i] + v : v;
    }
}

/* Decode min-max codes to code*step + lo per chunk. */
void CH(ch_uniform_decode)(const uint8_t *data, int64_t n, int64_t chunk, const float *lo,
                       const float *step, int bits, float *out, int accumulate, int nthreads) {
    codec_t u = {NULL, NULL, n, chunk, lo, step, bits, (uint8_t *)data, out, accumulate, 0, 0, 0};
    parallel_for(n, 8, n, nthreads, unif_decode_range, &u);
}

/* Non-uniform levels: codes 2 * level + sign of c = g + e with per-chunk scale max|c|, the
 * nearest of nlev sorted levels (midpoints given, as the torch path computes them), packed as
 * pack_bits(.., bits) for bits 2, 4 or 8; with e, the residual c - decode(code). */
void CH(ch_table_encode)(const float *g, float *e, int64_t n, int64_t chunk, const float *scale,
                     const float *mids, const float *levels, int nlev, int bits, uint8_t *data,
                     int nthreads) {
    codec_t u = {g, e, n, chunk, scale, NULL, bits, data, NULL, 0, 0, 0, 0, mids, levels, nlev};
    parallel_for(n, 8, n, nthreads, unif_encode_range, &u);
}

/* Decode to +-levels[code >> 1] * scale per chunk. */
void CH(ch_table_decode)(const uint8_t *data, int64_t n, int64_t chunk, const float *scale,
                     const float *mids, const float *levels, int nlev, int bits, float *out,
                     int accumulate, int nthreads) {
    codec_t u = {NULL, NULL, n, chunk, scale, NULL, bits, (uint8_t *)data, out, accumulate,
                 0, 0, 0, mids, levels, nlev};
    parallel_for(n, 8, n, nthreads, unif_decode_range, &u);
}

/* ---- stochastic quantizers: QSGD and TernGrad ------------------------------------------- */

#define SBLK 480 /* a multiple of 8 and of every radix group size (2..5) */

typedef struct {
    int kind; /* 0: QSGD, 1: ternary (TernGrad), 2: a deterministic grid (adaptive) */
    const float *g;
    float *e;
    int64_t n, chunk;
    const float *norm; /* per chunk: QSGD's norm, ternary's scale; grid: {mid, half step} */
    int levels;        /* s; the symbol is level * sign + s, in 0..2s; grid: top code */
    int bits, radix;   /* packing: bits per symbol (1, 2, 4, 8), or radix symbols per byte */
    int alphabet;
    uint8_t *data;
    float *out;
    int accumulate;
    uint32_t s0, s1;
} stoch_t;

/* Bit widths split into planes of 8, 4, 2 and 1 bits, low bits first (bitpack._planes). */
static int planes_of(int bits, int *off, int *wid) {
    static const int widths[4] = {8, 4, 2, 1};
    int k = 0, o = 0;
    for (int t = 0; t < 4; t++)
        while (bits - o >= widths[t]) {
            off[k] = o;
            wid[k++] = widths[t];
            o += widths[t];
        }
    return k;
}

/* Pack the codes of elements [b, b + m). Radix: groups of `radix` a byte. Bits: the first
 * `body` (n rounded down to 8) elements plane by plane, each plane a contiguous run of bytes,
 * then the rest as a bit matrix, as commhooks.coding.bitpack.pack_bits lays them out. */
/* Ternary's radix-5 bytes, c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4, by one multiply per byte: with
 * every code <= 2, each byte lane of x * TERN_MUL below lane 5 stays under 256, so no carry
 * reaches lane 4, which holds the sum. codes must be zero from m to m + 7. */
#define TERN_MUL 0x0103091B51ULL /* lanes 81, 27, 9, 3, 1 */

static void pack_ternary(const uint8_t *codes, int64_t m, uint8_t *dst) {
    for (int64_t k = 0; k < (m + 4) / 5; k++) {
        uint64_t x;
        memcpy(&x, codes + 5 * k, 8);
        dst[k] = (uint8_t)(((x & 0xFFFFFFFFFFULL) * TERN_MUL) >> 32);
    }
}

static void pack_block(const stoch_t *s, uint8_t *codes, int64_t b, int64_t m) {
    if (s->radix == 5 && s->alphabet == 3) {
        memset(codes + m, 0, 8);
        pack_ternary(codes, m, s->data + b / 5);
        return;
    }
    if (s->radix) {
        int r = s->radix;
        uint8_t *dst = s->data + b / r;
        for (int64_t k = 0; k < (m + r - 1) / r; k++) {
            int v = 0;
            for (int j = r - 1; j >= 0; j--) {
                int64_t at = k * r + j;
                v = v * s->alphabet + (at < m ? codes[at] : 0); /* zero padding, as torch's */
            }
            dst[k] = (uint8_t)v;
        }
        return;
    }
    int64_t body = s->n - s->n % 8;
    int64_t whole = b + m <= body ? m : body - b;
    int off[8], wid[8], np = planes_of(s->bits, off, wid);
    uint8_t plane[SBLK];
    int64_t base = 0;
    for (int p = 0; p < np; p++) {
        const uint8_t *src = codes;
        if (np > 1) {
            for (int64_t j = 0; j < whole; j++)
                plane[j] = (uint8_t)((codes[j] >> off[p]) & ((1 << wid[p]) - 1));
            src = plane;
        }
        pack_codes(src, whole, wid[p], s->data + base + b / 8 * wid[p]);
        base += body / 8 * wid[p];
    }
    if (whole < m) pack_tail(codes + whole, (int)(m - whole), s->bits, s->data + base);
}

static void unpack_block(const stoch_t *s, const uint8_t *table, int64_t b, int64_t m,
                         uint8_t *codes) {
    if (s->radix == 5 && s->alphabet == 3) {
        /* table rows are 8 bytes (5 codes, 3 zeros); the extra 3 land in codes' slack or
         * are overwritten by the next row */
        const uint8_t *src = s->data + b / 5;
        for (int64_t k = 0; k < (m + 4) / 5; k++) memcpy(codes + 5 * k, table + 8 * src[k], 8);
        return;
    }
    if (s->radix) {
        int r = s->radix;
        const uint8_t *src = s->data + b / r;
        for (int64_t k = 0; k < (m + r - 1) / r; k++)
            for (int j = 0; j < r && k * r + j < m; j++) codes[k * r + j] = table[src[k] * r + j];
        return;
    }
    int64_t body = s->n - s->n % 8;
    int64_t whole = b + m <= body ? m : body - b;
    int off[8], wid[8], np = planes_of(s->bits, off, wid);
    uint8_t plane[SBLK];
    int64_t base = 0;
    for (int p = 0; p < np; p++) {
        uint8_t *dst = np > 1 ? plane : codes;
        unpack_codes(s->data + base + b / 8 * wid[p], whole, wid[p], dst);
        if (np > 1) {
            if (p == 0) memset(codes, 0, (size_t)whole);
            for (int64_t j = 0; j < whole; j++) codes[j] |= (uint8_t)(plane[j] << off[p]);
        }
        base += body / 8 * wid[p];
    }
    for (int64_t t = whole; t < m; t++)
        codes[t] = (uint8_t)unpack_tail_code(s->data + base, (int)(b + t - body), s->bits);
}

/* One chunk's piece [a, z) of a block starting at b; `kind` and `has_e` are constants at
 * every call site, so each combination compiles to its own branch-free loop. */
static inline __attribute__((always_inline)) void stoch_piece(const stoch_t *s, int64_t a,
                                                              int64_t z, int64_t b,
                                                              uint8_t *codes, int kind,
                                                              int has_e) {
    const float *g = s->g;
    float *e = s->e;
    if (kind == 2) {
        /* Code k of a grid decodes to mid + (2k - top) * half, by one fused multiply-add as
         * torch.addcmul rounds it; k is round(((v - mid) / half + top) / 2), clamped, with
         * NaN to 0 as the torch path's nan_to_num (its infinities clamp alike). */
        float mid = s->norm[0], half = s->norm[1], top = (float)s->levels;
        for (int64_t i = a; i < z; i++) {
            float v = has_e ? g[i] + e[i] : g[i];
            float q = ((v - mid) / half + top) * 0.5f;
            q = nearbyintf(q == q ? q : 0.0f);
            q = q < 0.0f ? 0.0f : (q > top ? top : q);
            codes[i - b] = (uint8_t)q;
            if (has_e) e[i] = v - fmaf(2.0f * q - top, half, mid);
        }
        return;
    }
    float lv_s = (float)s->levels;
    float nrm = s->norm[a / s->chunk], step = nrm / lv_s;
    /* r = |v| * (s / norm): a multiply instead of a divide; the residual below is exact
     * whatever symbol the noise picks, and r stays clamped to [0, s]. */
    float inv = lv_s / nrm;
    for (int64_t i = a; i < z; i++) {
        float v = has_e ? g[i] + e[i] : g[i];
        float r = fabsf(v) * inv;
        r = r == r ? r : 0.0f; /* 0/0 in an all-zero chunk */
        r = r < 0.0f ? 0.0f : (r > lv_s ? lv_s : r);
        float u = uniform01(i, s->s0, s->s1), lv;
        if (kind == 0) {
            lv = floorf(r + u);
            lv = lv > lv_s ? lv_s : lv;
        } else {
            lv = u < r ? 1.0f : 0.0f;
        }
        float sym = (v < 0.0f ? -lv : lv) + lv_s;
        codes[i - b] = (uint8_t)sym;
        if (has_e) e[i] = v - (sym - lv_s) * step;
    }
}

static void stoch_encode_range(void *arg, int64_t i0, int64_t i1) {
    stoch_t *s = (stoch_t *)arg;
    uint8_t codes[SBLK + 8]; /* slack: ternary packing moves 8 bytes at a time */
    for (int64_t b = i0; b < i1; b += SBLK) {
        int64_t m = b + SBLK < i1 ? SBLK : i1 - b;
        for (int64_t a = b; a < b + m;) {
            int64_t ci = a / s->chunk;
            int64_t z = (ci + 1) * s->chunk < b + m ? (ci + 1) * s->chunk : b + m;
            if (s->kind == 0)
                s->e ? stoch_piece(s, a, z, b, codes, 0, 1) : stoch_piece(s, a, z, b, codes, 0, 0);
            else if (s->kind == 1)
                s->e ? stoch_piece(s, a, z, b, codes, 1, 1) : stoch_piece(s, a, z, b, codes, 1, 0);
            else
                s->e ? stoch_piece(s, a, z, b, codes, 2, 1) : stoch_piece(s, a, z, b, codes, 2, 0);
            a = z;
        }
        pack_block(s, codes, b, m);
    }
}

/* Stochastic symbols of c = g + e per chunk (kind 2: grid codes, chunk = n) and, with e, the
 * residual c - decode(symbol). */
void CH(ch_stoch_encode)(int kind, const float *g, float *e, int64_t n, int64_t chunk, const float *norm,
                     int levels, int bits, int radix, int alphabet, uint8_t *data, uint32_t s0,
                     uint32_t s1, int nthreads) {
    stoch_t s = {kind, g, e, n, chunk, norm, levels, bits, radix, alphabet, data, NULL, 0, s0, s1};
    parallel_for(n, SBLK, n, nthreads, stoch_encode_range, &s);
}

typedef struct {
    stoch_t *s;
    const uint8_t *table;
} stoch_dec_t;

static void stoch_decode_range(void *arg, int64_t i0, int64_t i1) {
    stoch_dec_t *d = (stoch_dec_t *)arg;
    stoch_t *s = d->s;
    uint8_t codes[SBLK + 8]; /* slack: ternary packing moves 8 bytes at a time */
    float lv_s = (float)s->levels;
    for (int64_t b = i0; b < i1; b += SBLK) {
        int64_t m = b + SBLK < i1 ? SBLK : i1 - b;
        unpack_block(s, d->table, b, m, codes);
        for (int64_t a = b; a < b + m;) {
            int64_t ci = a / s->chunk;
            int64_t z = (ci + 1) * s->chunk < b + m ? (ci + 1) * s->chunk : b + m;
            float *out = s->out;
            if (s->kind == 2) {
                float mid = s->norm[0], half = s->norm[1], top = lv_s;
                for (int64_t i = a; i < z; i++) {
                    float v = fmaf(2.0f * (float)codes[i - b] - top, half, mid);
                    out[i] = s->accumulate ? out[i] + v : v;
                }
                a = z;
                continue;
            }
            float step = s->norm[ci] / lv_s;
            if (s->accumulate)
                for (int64_t i = a; i < z; i++) out[i] += ((float)codes[i - b] - lv_s) * step;
            else
                for (int64_t i = a; i < z; i++) out[i] = ((float)codes[i - b] - lv_s) * step;
            a = z;
        }
    }
}

/* Decode symbols to (symbol - s) * norm / s per chunk (kind 2: grid values), added into out
 * with accumulate. */
void CH(ch_stoch_decode)(int kind, const uint8_t *data, int64_t n, int64_t chunk, const float *norm,
                     int levels, int bits, int radix, int alphabet, float *out, int accumulate,
                     int nthreads) {
    stoch_t s = {kind, NULL, NULL, n, chunk, norm, levels, bits, radix, alphabet, (uint8_t *)data,
                 out, accumulate, 0, 0};
    uint8_t table[256 * 8];
    int row = radix == 5 && alphabet == 3 ? 8 : radix; /* see unpack_block */
    memset(table, 0, sizeof table);
    if (radix)
        for (int v = 0; v < 256; v++) {
            int rest = v;
            for (int j = 0; j < radix; j++) {
                table[v * row + j] = (uint8_t)(rest % alphabet);
                rest /= alphabet;
            }
        }
    stoch_dec_t d = {&s, table};
    parallel_for(n, SBLK, n, nthreads, stoch_decode_range, &d);
}

/* ---- sparsification: the elements at or above a threshold ------------------------------ */

/* One pass over c = g + e collects the positions (ascending) and values of every element with
 * !(|c| < t), so NaN is collected as top-k's torch path collects it. Each slot scans a
 * contiguous range into its own growing buffer; ch_select_take concatenates them in order.
 * Nothing is written to g or e: a caller that finds a non-finite c still holds its residual. */

#define SEL_SLOTS MAX_THREADS

typedef struct {
    const float *g, *e;
    float t;
    int64_t n, per;
    int64_t *idx[SEL_SLOTS];
    float *val[SEL_SLOTS];
    int64_t cnt[SEL_SLOTS], cap[SEL_SLOTS];
    int nonfinite[SEL_SLOTS], failed[SEL_SLOTS];
    int slots;
} select_t;

static int sel_grow(select_t *s, int k) {
    int64_t cap = s->cap[k] ? 2 * s->cap[k] : 4096;
    int64_t *ni = (int64_t *)realloc(s->idx[k], (size_t)cap * sizeof(int64_t));
    if (ni) s->idx[k] = ni;
    float *nv = ni ? (float *)realloc(s->val[k], (size_t)cap * sizeof(float)) : NULL;
    if (nv) s->val[k] = nv;
    if (!ni || !nv) return 0;
    s->cap[k] = cap;
    return 1;
}

static void select_range(void *arg, int64_t k0, int64_t k1) {
    select_t *s = (select_t *)arg;
    for (int64_t k = k0; k < k1; k++) {
        int64_t a = k * s->per, z = a + s->per < s->n ? a + s->per : s->n;
        const float *g = s->g, *e = s->e;
        float t = s->t;
        int bad = 0;
        for (int64_t i0 = a; i0 < z; i0 += BLK) {
            int64_t i1 = i0 + BLK < z ? i0 + BLK : z;
            /* A vectorizable test of the block first: most blocks hold no candidate. */
            int any = 0;
            for (int64_t i = i0; i < i1; i++) {
                float v = e ? g[i] + e[i] : g[i];
                any |= !(fabsf(v) < t);
            }
            if (!any) continue;
            for (int64_t i = i0; i < i1; i++) {
                float v = e ? g[i] + e[i] : g[i];
                float m = fabsf(v);
                if (m < t) continue;
                bad |= !(m <= 3.4028234663852886e38f);
                if (s->cnt[k] == s->cap[k] && !sel_grow(s, (int)k)) {
                    s->failed[k] = 1;
                    return;
                }
                s->idx[k][s->cnt[k]] = i;
                s->val[k][s->cnt[k]++] = v;
            }
        }
        s->nonfinite[k] = bad;
    }
}

/* Collect; returns the number of elements found (-1: out of memory) and a handle that
 * ch_select_take must consume. *finite: whether every collected c is finite (an element below
 * t is finite by the comparison). */
int64_t CH(ch_select)(const float *g, const float *e, int64_t n, float t, void **handle, int *finite,
                  int nthreads) {
    select_t *s = (select_t *)calloc(1, sizeof(select_t));
    *handle = s;
    if (!s) return -1;
    int slots = nthreads < 1 ? 1 : (nthreads > SEL_SLOTS ? SEL_SLOTS : nthreads);
    s->g = g;
    s->e = e;
    s->t = t;
    s->n = n;
    s->slots = slots;
    s->per = (n + slots - 1) / slots;
    parallel_for(slots, 1, n, nthreads, select_range, s);
    int64_t total = 0;
    int ok = 1, fin = 1;
    for (int k = 0; k < slots; k++) {
        total += s->cnt[k];
        ok &= !s->failed[k];
        fin &= !s->nonfinite[k];
    }
    *finite = fin;
    return ok ? total : -1;
}

/* Copy the collected positions and values out in ascending order (either may be NULL) and
 * free the handle. */
void CH(ch_select_take)(void *handle, int64_t *idx, float *val) {
    select_t *s = (select_t *)handle;
    if (!s) return;
    int64_t at = 0;
    for (int k = 0; k < s->slots; k++) {
        if (idx && s->cnt[k]) memcpy(idx + at, s->idx[k], (size_t)s->cnt[k] * sizeof(int64_t));
        if (val && s->cnt[k]) memcpy(val + at, s->val[k], (size_t)s->cnt[k] * sizeof(float));
        at += s->cnt[k];
        free(s->idx[k]);
        free(s->val[k]);
    }
    free(s);
}

/* ---- half-precision casts (fp16 / bf16) with error feedback ------------------------------ */
/* Wire h = half((g + e) * s); residual e = ((g + e) - float(h) / s) * decay; decode
 * float(h) / s. The same float operations, in the same order, as the torch path (a
 * SingleRoundExchange with prescale s, then ErrorFeedback's c - sent). Encoding writes only h,
 * so an exchange abandoned after it leaves the residual as it was. fp16 needs _Float16 (GCC 12,
 * clang) or F16C; ch_cast_fp16() says whether this build has either. */
int CH(ch_cast_fp16)(void) {
#if defined(__FLT16_MAX__) || defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    /* Round to nearest even, as torch; a NaN whose payload sits in the low bits would round
     * to inf, so NaN is torch's quiet NaN. */
    uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return v != v ? (uint16_t)0x7FC0 : r;
}

static inline float bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline uint16_t f16_bits(float v) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#elif defined(__FLT16_MAX__)
    _Float16 x = (_Float16)v;
    uint16_t b;
    memcpy(&b, &x, 2);
    return b;
#else
    (void)v;
    return 0; /* unreachable: ch_cast_fp16() is 0 and the caller keeps the torch path */
#endif
}

static inline float f16_value(uint16_t b) {
#if defined(__F16C__)
    return _cvtsh_ss(b);
#elif defined(__FLT16_MAX__)
    _Float16 x;
    memcpy(&x, &b, 2);
    return (float)x;
#else
    (void)b;
    return 0.0f;
#endif
}

typedef struct {
    const float *g;
    float *e;
    uint16_t *h;
    float *out;
    float s, decay;
    int bf16;
    int bad; /* any h non-finite; written only with 1 */
} cast_t;

/* Lanes of 8 for F16C's 8-wide conversions; bf16 is integer work the compiler vectorizes. */
static void cast_encode_range(void *arg, int64_t i0, int64_t i1) {
    cast_t *k = (cast_t *)arg;
    const float *g = k->g, *e = k->e;
    uint16_t *h = k->h;
    const float s = k->s;
    const uint16_t mask = k->bf16 ? 0x7F80 : 0x7C00; /* all-ones exponent: inf or NaN */
    int bad = 0;
    int64_t i = i0;
    if (k->bf16) {
        /* bf16 has fp32's range, so a finite h can still decode past it once divided by s
         * (c near FLT_MAX over several ranks): that residual would not be finite either. */
        for (; i < i1; i++) {
            uint16_t q = bf16_bits((e ? g[i] + e[i] : g[i]) * s);
            h[i] = q;
            bad |= (q & mask) == mask || !(fabsf(bf16_value(q) / s) <= FLT_MAX);
        }
    }
#if defined(__F16C__)
    else {
        const __m256 vs = _mm256_set1_ps(s);
        const __m128i vm = _mm_set1_epi16((short)mask);
        __m128i acc = _mm_setzero_si128();
        for (; i + 8 <= i1; i += 8) {
            __m256 c = _mm256_loadu_ps(g + i);
            if (e) c = _mm256_add_ps(c, _mm256_loadu_ps(e + i));
            __m128i q = _mm256_cvtps_ph(_mm256_mul_ps(c, vs), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i *)(h + i), q);
            acc = _mm_or_si128(acc, _mm_cmpeq_epi16(_mm_and_si128(q, vm), vm));
        }
        bad |= !_mm_testz_si128(acc, acc);
    }
#endif
    for (; i < i1; i++) {
        uint16_t q = f16_bits((e ? g[i] + e[i] : g[i]) * s);
        h[i] = q;
        bad |= (q & mask) == mask;
    }
    if (bad) __atomic_store_n(&k->bad, 1, __ATOMIC_RELAXED);
}

/* Returns 1 if every h, and every h / s, is finite (so is the residual then). */
int CH(ch_cast_encode)(const float *g, const float *e, int64_t n, float s, int bf16, uint16_t *h,
                   int nthreads) {
    cast_t k = {g, NULL, h, NULL, s, 1.0f, bf16, 0};
    k.e = (float *)e;
    parallel_for(n, 64, n, nthreads, cast_encode_range, &k);
    return !k.bad;
}

static void cast_residual_range(void *arg, int64_t i0, int64_t i1) {
    cast_t *k = (cast_t *)arg;
    const float *g = k->g;
    float *e = k->e;
    const uint16_t *h = k->h;
    const float s = k->s, decay = k->decay;
    int64_t i = i0;
    if (k->bf16) {
        for (; i < i1; i++) e[i] = ((g[i] + e[i]) - bf16_value(h[i]) / s) * decay;
        return;
    }
#if defined(__F16C__)
    const __m256 vs = _mm256_set1_ps(s), vd = _mm256_set1_ps(decay);
    for (; i + 8 <= i1; i += 8) {
        __m256 c = _mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(e + i));
        __m256 sent = _mm256_div_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), vs);
        _mm256_storeu_ps(e + i, _mm256_mul_ps(_mm256_sub_ps(c, sent), vd));
    }
#endif
    for (; i < i1; i++) e[i] = ((g[i] + e[i]) - f16_value(h[i]) / s) * decay;
}

/* e = ((g + e) - float(h) / s) * decay: the new residual, from the h ch_cast_encode wrote. */
void CH(ch_cast_residual)(const float *g, float *e, int64_t n, float s, int bf16, const uint16_t *h,
                      float decay, int nthreads) {
    cast_t k = {g, e, (uint16_t *)h, NULL, s, decay, bf16, 0};
    parallel_for(n, 64, n, nthreads, cast_residual_range, &k);
}

static void cast_decode_range(void *arg, int64_t i0, int64_t i1) {
    cast_t *k = (cast_t *)arg;
    const uint16_t *h = k->h;
    float *out = k->out;
    const float s = k->s, w = k->decay; /* decay holds the divisor here */
    int64_t i = i0;
    if (k->bf16) {
        for (; i < i1; i++) out[i] = bf16_value(h[i]) / s / w;
        return;
    }
#if defined(__F16C__)
    const __m256 vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(w);
    for (; i + 8 <= i1; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i)));
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_div_ps(v, vs), vw));
    }
#endif
    for (; i < i1; i++) out[i] = f16_value(h[i]) / s / w;
}

/* out = float(h) / s / w: the decoded sum, and the transport's mean when w is the world size
 * (two divisions, as the torch ops round them; w = 1 leaves the first unchanged). */
void CH(ch_cast_decode)(const uint16_t *h, int64_t n, float s, float w, int bf16, float *out,
                    int nthreads) {
    cast_t k = {NULL, NULL, (uint16_t *)h, out, s, w, bf16, 0};
    parallel_for(n, 64, n, nthreads, cast_decode_range, &k);
}

/* ---- shared-scale symmetric codes (uniform, shared_scale=True) -------------------------- */
/* As commhooks.compressors.uniform's torch path: per chunk a step s = absmax / L agreed by a
 * MAX all-reduce; code = clamp(round_half_even(nan_to_num(c / s)), -L, L) in int8/16/32; the
 * codes are summed by an all-reduce and decode to float(code) * s. Work runs chunk by chunk,
 * so every inner loop has one step and vectorizes. */

typedef struct {
    const float *g;
    float *e;
    int64_t n, chunk;
    const float *step;
    float *amax;  /* per chunk (absmax) */
    void *codes;  /* int8/16/32, by width */
    int width;
    float level, decay, divisor;
    float *out;
} symm_t;

static void symm_absmax_range(void *arg, int64_t c0, int64_t c1) {
    symm_t *k = (symm_t *)arg;
    const float *g = k->g, *e = k->e;
    for (int64_t ci = c0; ci < c1; ci++) {
        int64_t a = ci * k->chunk, b = a + k->chunk < k->n ? a + k->chunk : k->n;
        float m = 0.0f; /* the zero padding of a last, short chunk cannot raise it */
        int nan = 0;
        for (int64_t i = a; i < b; i++) {
            float v = fabsf(e ? g[i] + e[i] : g[i]);
            m = v > m ? v : m;
            nan |= v != v;
        }
        /* NaN goes on the wire as +inf: a MAX keeps it, and the step decodes non-finite. */
        k->amax[ci] = nan ? INFINITY : m;
    }
}

/* absmax[ci] = max |g + e| over chunk ci (+inf where some element is NaN). */
void CH(ch_symm_absmax)(const float *g, const float *e, int64_t n, int64_t chunk, float *absmax,
                    int nthreads) {
    symm_t k = {g, (float *)e, n, chunk, NULL, absmax, NULL, 0, 0.0f, 1.0f, 1.0f, NULL};
    int64_t nchunks = (n + chunk - 1) / chunk;
    parallel_for(nchunks, 1, n, nthreads, symm_absmax_range, &k);
}

static inline float symm_code(float v, float s, float level) {
    float q = v / s;
    q = q == q ? nearbyintf(q) : 0.0f; /* 0/0 (an all-zero chunk) and inf/inf */
    return q < -level ? -level : (q > level ? level : q);
}

#define SYMM_CODES(T)                                                                          \
    do {                                                                                       \
        T *out = (T *)k->codes;                                                                \
        for (int64_t i = a; i < b; i++) out[i] = (T)symm_code(e ? g[i] + e[i] : g[i], s, L);   \
    } while (0)

static void symm_encode_range(void *arg, int64_t c0, int64_t c1) {
    symm_t *k = (symm_t *)arg;
    const float *g = k->g, *e = k->e;
    const float L = k->level;
    for (int64_t ci = c0; ci < c1; ci++) {
        int64_t a = ci * k->chunk, b = a + k->chunk < k->n ? a + k->chunk : k->n;
        const float s = k->step[ci];
        if (k->width == 1) SYMM_CODES(int8_t);
        else if (k->width == 2) SYMM_CODES(int16_t);
        else SYMM_CODES(int32_t);
    }
}

/* codes = the symmetric codes of g + e with per-chunk step (width bytes each); writes nothing
 * else. */
void CH(ch_symm_encode)(const float *g, const float *e, int64_t n, int64_t chunk, const float *step,
                    float level, void *codes, int width, int nthreads) {
    symm_t k = {g, (float *)e, n, chunk, step, NULL, codes, width, level, 1.0f, 1.0f, NULL};
    int64_t nchunks = (n + chunk - 1) / chunk;
    parallel_for(nchunks, 1, n, nthreads, symm_encode_range, &k);
}

#define SYMM_RESIDUAL(T)                                                                       \
    do {                                                                                       \
        const T *q = (const T *)k->codes;                                                      \
        for (int64_t i = a; i < b; i++) e[i] = ((g[i] + e[i]) - (float)q[i] * s) * d;          \
    } while (0)

static void symm_residual_range(void *arg, int64_t c0, int64_t c1) {
    symm_t *k = (symm_t *)arg;
    const float *g = k->g;
    float *e = k->e;
    const float d = k->decay;
    for (int64_t ci = c0; ci < c1; ci++) {
        int64_t a = ci * k->chunk, b = a + k->chunk < k->n ? a + k->chunk : k->n;
        const float s = k->step[ci];
        if (k->width == 1) SYMM_RESIDUAL(int8_t);
        else if (k->width == 2) SYMM_RESIDUAL(int16_t);
        else SYMM_RESIDUAL(int32_t);
    }
}

/* e = ((g + e) - float(code) * step) * decay in place: the new residual of ch_symm_encode's
 * codes (g and e as they were when it ran). */
void CH(ch_symm_residual)(const float *g, float *e, int64_t n, int64_t chunk, const float *step,
                      const void *codes, int width, float decay, int nthreads) {
    symm_t k = {g, e, n, chunk, step, NULL, (void *)codes, width, 0.0f, decay, 1.0f, NULL};
    int64_t nchunks = (n + chunk - 1) / chunk;
    parallel_for(nchunks, 1, n, nthreads, symm_residual_range, &k);
}

#define SYMM_DECODE(T)                                                                         \
    do {                                                                                       \
        const T *q = (const T *)k->codes;                                                      \
        for (int64_t i = a; i < b; i++) out[i] = ((float)q[i] * s) / w;                        \
    } while (0)

static void symm_decode_range(void *arg, int64_t c0, int64_t c1) {
    symm_t *k = (symm_t *)arg;
    float *out = k->out;
    const float w = k->divisor;
    for (int64_t ci = c0; ci < c1; ci++) {
        int64_t a = ci * k->chunk, b = a + k->chunk < k->n ? a + k->chunk : k->n;
        const float s = k->step[ci];
        if (k->width == 1) SYMM_DECODE(int8_t);
        else if (k->width == 2) SYMM_DECODE(int16_t);
        else SYMM_DECODE(int32_t);
    }
}

/* out = (float(code) * step) / divisor: two roundings, as the torch ops make them. */
void CH(ch_symm_decode)(const void *codes, int width, int64_t n, int64_t chunk, const float *step,
                    float divisor, float *out, int nthreads) {
    symm_t k = {NULL, NULL, n, chunk, step, NULL, (void *)codes, width, 0.0f, 1.0f, divisor, out};
    int64_t nchunks = (n + chunk - 1) / chunk;
    parallel_for(nchunks, 1, n, nthreads, symm_decode_range, &k);
}

/* ---- sparse index codes: LEB128 varints of the gaps ------------------------------------ */
/* As commhooks.coding.indices' delta form: gap = idx[i] - idx[i-1] - 1 (idx[-1] = -1), 7 bits
 * a byte, low group first, the top bit set on every byte but a gap's last; at most 5 bytes a
 * gap (gaps below 2^35), as the torch path writes them. Sequential: a byte's position depends
 * on every gap before it, and one pass at a byte or two an index is memory speed anyway. */

/* Writes the code of k sorted indices to out (room for 5 k bytes); returns its length. */
int64_t CH(ch_varint_encode)(const int64_t *idx, int64_t k, uint8_t *out) {
    int64_t at = 0, prev = -1;
    for (int64_t i = 0; i < k; i++) {
        int64_t gap = idx[i] - prev - 1; /* signed, as torch's: unsorted input codes alike */
        prev = idx[i];
        for (int j = 0; j < 5; j++) {
            int more = j < 4 && gap >= (int64_t)1 << (7 * (j + 1));
            out[at++] = (uint8_t)(((gap >> (7 * j)) & 0x7F) | (more ? 0x80 : 0));
            if (!more) break;
        }
    }
    return at;
}

/* Decodes nbytes of code into idx (room for nbytes indices); returns the count, or -1 when the
 * last varint is cut off or a gap runs past 9 bytes (no index that long fits 64 bits). */
int64_t CH(ch_varint_decode)(const uint8_t *in, int64_t nbytes, int64_t *idx) {
    int64_t k = 0, prev = -1;
    uint64_t gap = 0;
    int shift = 0;
    for (int64_t p = 0; p < nbytes; p++) {
        if (shift > 56) return -1;
        gap |= (uint64_t)(in[p] & 0x7F) << shift;
        if (in[p] & 0x80) {
            shift += 7;
            continue;
        }
        prev = prev + (int64_t)gap + 1;
        idx[k++] = prev;
        gap = 0;
        shift = 0;
    }
    return shift ? -1 : k;
}
