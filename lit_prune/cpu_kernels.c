/* lit_prune's CPU kernels for the TF histogram mask update (built at first use by cpu_kernels.py).
 *
 * Two passes over float32 weights, batched over every weight of a model and split across threads:
 *
 *   lp_histogram_bins: for each weight, the bin j of TF r1.11-r1.13's histogram rule (nbins
 *     equal-width bins over [0, max |w|], j = #{i : C_i < K}).  A sample of the weight predicts j;
 *     one pass counts #{|w| < e_i} at the float32 edges e_i of a window of bins around it, which
 *     confirms j exactly (or moves the window and counts again).
 *   lp_mask_zero: mask = |w| > cut (or >= cut), pruned weights set to +0.0, kept count per weight.
 *
 * |w| is compared through its bits: for non-negative floats the int32 order of the bit patterns is
 * the float order, so every comparison is an exact integer compare the compiler vectorises.  Float
 * arithmetic is IEEE float32 (built with -ffp-contract=off), as TF's float32 ops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LP_EDGES 8         /* edges counted per weight and pass (count_block holds them in registers) */
#define LP_CHUNK 4096      /* elements per inner block (16 KiB of float32: stays in L1) */
#define LP_SAMPLE_RUN 64   /* the sample: runs of 64 elements, one every `stride` */
#define LP_SAMPLE_MIN 4096 /* ... so that it holds at least this many elements, or 1/64 of the weight */
#define LP_MAX_THREADS 64
#define LP_ABS 0x7fffffffu

typedef struct {
    int64_t nweights;
    const int64_t *ptrs;    /* weight data pointers */
    const int64_t *sizes;   /* elements per weight */
    const int64_t *starts;  /* prefix sums of sizes (nweights + 1) */
    int64_t begin, end;     /* this thread's share of the concatenated element range */
    /* counting */
    const int32_t *edges;   /* nweights * LP_EDGES edge bit patterns (INT32_MAX = count all) */
    const uint8_t *active;  /* weights still searching */
    int64_t *counts;        /* this thread's nweights * LP_EDGES counts */
    /* masking */
    const int32_t *cuts;    /* keep |w| bits > cut */
    const int64_t *masks;   /* bool mask pointers */
    int zero;               /* also set pruned weights to 0 */
    int64_t *kept;          /* this thread's nweights kept counts */
} lp_job;

static void count_block(const uint32_t *b, int64_t n, const int32_t *edges, int64_t *acc) {
    /* Each |w| is loaded once and compared with the eight edges held in registers. */
    const int32_t e0 = edges[0], e1 = edges[1], e2 = edges[2], e3 = edges[3];
    const int32_t e4 = edges[4], e5 = edges[5], e6 = edges[6], e7 = edges[7];
    for (int64_t s = 0; s < n; s += LP_CHUNK) {
        int64_t len = n - s < LP_CHUNK ? n - s : LP_CHUNK;
        const uint32_t *x = b + s;
        int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
        for (int64_t i = 0; i < len; i++) {
            int32_t a = (int32_t)(x[i] & LP_ABS);
            c0 += a < e0;
            c1 += a < e1;
            c2 += a < e2;
            c3 += a < e3;
            c4 += a < e4;
            c5 += a < e5;
            c6 += a < e6;
            c7 += a < e7;
        }
        acc[0] += c0;
        acc[1] += c1;
        acc[2] += c2;
        acc[3] += c3;
        acc[4] += c4;
        acc[5] += c5;
        acc[6] += c6;
        acc[7] += c7;
    }
}

#ifdef __AVX2__
#include <immintrin.h>
static uint64_t lp_byte_masks[256]; /* 8 bits -> 8 bytes of 0/1 */
__attribute__((constructor)) static void init_byte_masks(void) {
    for (int bits = 0; bits < 256; bits++) {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) v |= (uint64_t)((bits >> k) & 1) << (8 * k);
        lp_byte_masks[bits] = v;
    }
}
#endif

/* mask = |w| > cut; with zero, pruned weights become +0.0, but a group of 8 weights is stored back
 * only when it holds a non-zero weight to prune: weights zeroed before are not rewritten, so an
 * update that prunes a little more than the last one writes little. */
static int64_t mask_block(uint32_t *b, uint8_t *m, int64_t n, int32_t cut, int zero) {
    int64_t kept = 0;
    int64_t i = 0;
#ifdef __AVX2__
    const __m256i abs_bits = _mm256_set1_epi32((int32_t)LP_ABS), cuts = _mm256_set1_epi32(cut);
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(b + i));
        __m256i a = _mm256_and_si256(x, abs_bits);
        __m256i keep = _mm256_cmpgt_epi32(a, cuts);
        int bits = _mm256_movemask_ps(_mm256_castsi256_ps(keep));
        memcpy(m + i, &lp_byte_masks[bits], 8);
        kept += __builtin_popcount((unsigned)bits);
        if (zero && !_mm256_testc_si256(keep, a)) /* some pruned lane is non-zero */
            _mm256_storeu_si256((__m256i *)(b + i), _mm256_and_si256(x, keep));
    }
#endif
    for (; i < n; i++) {
        uint8_t keep = (int32_t)(b[i] & LP_ABS) > cut;
        m[i] = keep;
        kept += keep;
        if (zero && !keep) b[i] = 0u;
    }
    return kept;
}

/* Run fn over [lo, hi) of weight w for each weight overlapping the job's range. */
static void *run_job(void *arg, int counting) {
    lp_job *job = (lp_job *)arg;
    for (int64_t w = 0; w < job->nweights; w++) {
        int64_t lo = job->starts[w], hi = job->starts[w + 1];
        if (hi <= job->begin || lo >= job->end) continue;
        if (counting && !job->active[w]) continue;
        int64_t a = (lo > job->begin ? lo : job->begin) - lo;
        int64_t z = (hi < job->end ? hi : job->end) - lo;
        uint32_t *data = (uint32_t *)(intptr_t)job->ptrs[w];
        if (counting) {
            count_block(data + a, z - a, job->edges + w * LP_EDGES, job->counts + w * LP_EDGES);
        } else {
            uint8_t *mask = (uint8_t *)(intptr_t)job->masks[w];
            job->kept[w] += mask_block(data + a, mask + a, z - a, job->cuts[w], job->zero);
        }
    }
    return NULL;
}

static void *count_job(void *arg) { return run_job(arg, 1); }
static void *mask_job(void *arg) { return run_job(arg, 0); }

/* Split the concatenated elements into `nthreads` shares run in parallel; each
 * thread accumulates into its own `stride` int64 slots of `acc` (counts or kept).  Returns the
 * number of threads used. */
static int parallel(const lp_job *base, int nthreads, int counting, int64_t *acc, int64_t stride, lp_job *jobs) {
    int64_t total = base->starts[base->nweights];
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > LP_MAX_THREADS) nt = LP_MAX_THREADS;
    if (total < ((int64_t)1 << 16) * nt) nt = (int)(total >> 16) + 1; /* >= 64 Ki elements per thread */
    if (nt > nthreads && nthreads >= 1) nt = nthreads;
    void *(*fn)(void *) = counting ? count_job : mask_job;
    memset(acc, 0, sizeof(int64_t) * (size_t)nt * stride);
    for (int t = 0; t < nt; t++) {
        jobs[t] = *base;
        jobs[t].begin = total * t / nt;
        jobs[t].end = total * (t + 1) / nt;
        if (counting) jobs[t].counts = acc + (size_t)t * stride;
        else jobs[t].kept = acc + (size_t)t * stride;
    }
    /* OpenMP from the libgomp that torch has loaded: its (already spinning) threads run the shares. */
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) fn(&jobs[t]);
    return nt;
}

/* TF's bin of one score: min(floor(float32(nbins) * float32(x / max)), nbins - 1). */
static int64_t tf_bin(float x, float max_value, int64_t nbins) {
    float q = (float)nbins * (x / max_value);
    int64_t bin = (int64_t)floorf(q);
    return bin < nbins - 1 ? bin : nbins - 1;
}

static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* The smallest float32 x >= 0 whose TF bin is >= i (0 < i < nbins), as an int32 bit pattern. */
static int32_t bin_edge(float max_value, int64_t i, int64_t nbins) {
    float x = (float)((float)((double)i / (double)nbins) * max_value);
    while (x > 0.0f && tf_bin(x, max_value, nbins) >= i) x = from_bits(to_bits(x) - 1u);
    while (tf_bin(x, max_value, nbins) < i) x = from_bits(to_bits(x) + 1u);
    return (int32_t)to_bits(x);
}

/* C_{i-1} = #{x : bin(x) < i} is a count below edge e_i; e_0 counts nothing, e_nbins everything. */
static int32_t edge_or_sentinel(float max_value, int64_t i, int64_t nbins) {
    if (i <= 0) return INT32_MIN;
    if (i >= nbins) return INT32_MAX;
    return bin_edge(max_value, i, nbins);
}

/* Predict the threshold bin from a sample: runs of LP_SAMPLE_RUN elements spread over the weight.
 * The sample's bins use a reciprocal multiply (a prediction need not be exact; the count is). */
static int64_t predict_bin(const uint32_t *b, int64_t n, float max_value, int64_t k, int64_t nbins, int64_t *hist) {
    memset(hist, 0, sizeof(int64_t) * nbins);
    int64_t taken = 0;
    int64_t stride = n / LP_SAMPLE_MIN * LP_SAMPLE_RUN;
    stride = stride < LP_SAMPLE_RUN ? LP_SAMPLE_RUN : (stride > 64 * LP_SAMPLE_RUN ? 64 * LP_SAMPLE_RUN : stride);
    const float scale = (float)nbins / max_value, top = (float)(nbins - 1);
    int32_t idx[LP_SAMPLE_RUN];
    for (int64_t s = 0; s < n; s += stride) {
        int64_t len = n - s < LP_SAMPLE_RUN ? n - s : LP_SAMPLE_RUN;
        for (int64_t i = 0; i < len; i++) {
            float q = from_bits(b[s + i] & LP_ABS) * scale;
            idx[i] = (int32_t)(q < top ? q : top);
        }
        for (int64_t i = 0; i < len; i++) hist[idx[i]]++;
        taken += len;
    }
    double rank = (double)k * (double)taken / (double)n;
    int64_t below = 0, j = 0;
    while (j < nbins - 1 && (double)(below + hist[j]) < rank) below += hist[j++];
    return j;
}

/* For each weight w (float32, |w| with max maxima[w] > 0 and finite), the TF threshold bin
 * j = #{i : C_i < K} with K = targets[w] (1 <= K <= size), written to bins[w] (a float, as TF's j).
 * Returns the number of counting passes it took. */
int64_t lp_histogram_bins(int64_t nweights, const int64_t *ptrs, const int64_t *sizes, const float *maxima,
                          const int64_t *targets, int64_t nbins, int nthreads, float *bins) {
    int64_t *starts = calloc(nweights + 1, sizeof(int64_t));
    int32_t *edges = calloc(nweights * LP_EDGES, sizeof(int32_t));
    int64_t *low = calloc(nweights, sizeof(int64_t));     /* first bin of each weight's window */
    uint8_t *active = calloc(nweights, 1);
    int64_t *hist = calloc(nbins, sizeof(int64_t));
    int64_t *counts = calloc((size_t)LP_MAX_THREADS * nweights * LP_EDGES, sizeof(int64_t));
    lp_job *jobs = calloc(LP_MAX_THREADS, sizeof(lp_job));
    int64_t passes = 0;
    if (!starts || !edges || !low || !active || !hist || !counts || !jobs) {
        passes = -1;
        goto done;
    }
    for (int64_t w = 0; w < nweights; w++) {
        starts[w + 1] = starts[w] + sizes[w];
        int64_t j = predict_bin((const uint32_t *)(intptr_t)ptrs[w], sizes[w], maxima[w], targets[w], nbins, hist);
        low[w] = j - LP_EDGES / 2; /* the window confirms bins j-3 .. j+3 */
        active[w] = 1;
    }
    int64_t remaining = nweights;
    while (remaining > 0) {
        for (int64_t w = 0; w < nweights; w++) {
            if (!active[w]) continue;
            /* edges e_{low+1} .. e_{low+8} give C_low .. C_{low+7}: bins low+1 .. low+7 can be confirmed */
            for (int k = 0; k < LP_EDGES; k++) edges[w * LP_EDGES + k] = edge_or_sentinel(maxima[w], low[w] + 1 + k, nbins);
        }
        lp_job base = {nweights, ptrs, sizes, starts, 0, 0, edges, active, NULL, NULL, NULL, 0, NULL};
        int nt = parallel(&base, nthreads, 1, counts, nweights * LP_EDGES, jobs);
        passes++;
        for (int64_t w = 0; w < nweights; w++) {
            if (!active[w]) continue;
            int64_t c[LP_EDGES] = {0};
            for (int t = 0; t < nt; t++)
                for (int k = 0; k < LP_EDGES; k++) c[k] += counts[((size_t)t * nweights + w) * LP_EDGES + k];
            /* c[k] = C_{low+k}; j = #{i : C_i < K} is the first i with C_i >= K */
            int64_t K = targets[w];
            if (c[0] >= K && low[w] >= 0) {
                low[w] -= LP_EDGES - 1; /* below the window (C_low >= K): move down */
                continue;
            }
            int found = 0;
            for (int k = 0; k < LP_EDGES; k++) {
                if (c[k] >= K) {
                    bins[w] = (float)(low[w] + k);
                    found = 1;
                    break;
                }
            }
            if (found) {
                active[w] = 0;
                remaining--;
            } else {
                low[w] += LP_EDGES - 1; /* above the window: move up */
            }
        }
    }
done:
    free(starts); free(edges); free(low); free(active); free(hist); free(counts); free(jobs);
    return passes;
}

/* mask[w] = |w| bits > cuts[w] for every weight; with zero, pruned elements of w become +0.0.
 * kept[w] receives the number of kept elements.  Returns 0, or -1 when out of memory. */
int lp_mask_zero(int64_t nweights, const int64_t *ptrs, const int64_t *sizes, const int32_t *cuts,
                 const int64_t *masks, int zero, int nthreads, int64_t *kept) {
    int64_t *starts = calloc(nweights + 1, sizeof(int64_t));
    int64_t *per_thread = calloc((size_t)LP_MAX_THREADS * nweights, sizeof(int64_t));
    lp_job *jobs = calloc(LP_MAX_THREADS, sizeof(lp_job));
    if (!starts || !per_thread || !jobs) {
        free(starts); free(per_thread); free(jobs);
        return -1;
    }
    for (int64_t w = 0; w < nweights; w++) starts[w + 1] = starts[w] + sizes[w];
    lp_job base = {nweights, ptrs, sizes, starts, 0, 0, NULL, NULL, NULL, cuts, masks, zero, NULL};
    int nt = parallel(&base, nthreads, 0, per_thread, nweights, jobs);
    for (int64_t w = 0; w < nweights; w++) {
        kept[w] = 0;
        for (int t = 0; t < nt; t++) kept[w] += per_thread[(size_t)t * nweights + w];
    }
    free(per_thread);
    free(jobs);
    free(starts);
    return 0;
}
