/* lit_prune's CPU kernels for the TF histogram mask update (built at first use by cpu_kernels.py).
 *
 * Two passes over float32 weights, batched over every weight of a model and split across threads:
 *
 *   lp_histogram_bins: for each weight, the bin j of TF r1.11-r1.13's histogram rule (nbins
 *     equal-width bins over [0, max |w|], j = #{i : C_i < K}).  A sample of the weight predicts j;
 *     one pass counts #{|w| < e_i} at the float32 edges e_i of a window of bins around it, which
 *     confirms j exactly (or moves the window and counts again).
 *   lp_mask_zero: mask = |w| > cut, pruned weights set to +0.0 (only cache lines holding a
 *     non-zero weight to prune are written back), kept count per weight.
 *
 * |w| is compared through its bits: for non-negative floats the int32 order of the bit patterns is
 * the float order, so every comparison is an exact integer compare (auto-vectorised, or AVX2
 * intrinsics for the mask pass).  Float arithmetic is IEEE float32 (built with -ffp-contract=off),
 * as TF's float32 ops.
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

/* The sample: runs of LP_SAMPLE_RUN elements spread over the weight, binned into hist[nbins] with a
 * reciprocal multiply (a prediction need not be exact; the counts are).  Returns its size. */
static int64_t sample_histogram(const uint32_t *b, int64_t n, float max_value, int64_t nbins, int64_t *hist) {
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
    return taken;
}

/* The search state of one weight: j lies in (below, above], with C_below < K <= C_above known; the
 * next pass counts C at window[0 .. LP_EDGES - 1]. */
typedef struct {
    int64_t below, above, c_below, c_above;
    int64_t window[LP_EDGES];
} lp_search;

/* The bin where the sample's cumulative count within (below, above] reaches `rank`. */
static int64_t sample_bin(const lp_search *st, const int64_t *hist, double rank) {
    double seen = 0.0;
    int64_t bin = st->below + 1;
    while (bin < st->above && seen + (double)hist[bin] < rank) seen += (double)hist[bin++];
    return bin;
}

/* Fill window[] with LP_EDGES bins inside (below, above) where the sample puts the K-th score.
 * The sample's rank +- 3 standard deviations falls in bins [lo, hi]: a window that fits covers
 * them; a wider spread gets a window centred on the sample's own bin, except when the sample is
 * bimodal (weights zeroed by the last update at lo, a gap, then the rest): then half the window
 * goes to lo and half to the first filled bins above the gap, as the counts are flat in between. */
static void place_window(lp_search *st, const int64_t *hist, int64_t k) {
    int64_t in_range = 0;
    for (int64_t i = st->below + 1; i <= st->above; i++) in_range += hist[i];
    double frac = (double)(k - st->c_below) / (double)(st->c_above - st->c_below);
    int64_t lo, mid, hi;
    if (in_range == 0) { /* the sample saw none of these bins: interpolate */
        lo = mid = hi = st->below + 1 + (int64_t)(frac * (double)(st->above - st->below - 1));
    } else {
        double rank = frac * (double)in_range;
        double spread = 3.0 * sqrt(rank * (1.0 - frac)) + 1.0;
        lo = sample_bin(st, hist, rank - spread);
        mid = sample_bin(st, hist, rank);
        hi = sample_bin(st, hist, rank + spread);
    }
    int64_t starts[2] = {0, 0}, sizes[2] = {LP_EDGES, 0};
    int64_t next = lo + 1;
    while (next < hi && hist[next] == 0) next++;
    if (hi - lo < LP_EDGES) {
        starts[0] = lo - (LP_EDGES - 1 - (hi - lo)) / 2;
    } else if (next - lo > 2) { /* bimodal: lo - 1 .. lo + 2 and next - 1 .. next + 2 */
        starts[0] = lo - 1;
        starts[1] = next - 1;
        sizes[0] = sizes[1] = LP_EDGES / 2;
    } else {
        starts[0] = mid - LP_EDGES / 2 + 1;
    }
    int n = 0;
    for (int r = 0; r < 2; r++) {
        int64_t start = starts[r];
        if (start > st->above - sizes[r]) start = st->above - sizes[r];
        if (start < st->below + 1) start = st->below + 1;
        if (n > 0 && start <= st->window[n - 1]) start = st->window[n - 1] + 1; /* keep bins ascending */
        for (int64_t i = 0; i < sizes[r]; i++) st->window[n++] = start + i;
    }
}

/* For each weight w (float32, |w| with max maxima[w] > 0 and finite), the TF threshold bin
 * j = #{i : C_i < K} with K = targets[w] (1 <= K <= size), written to bins[w] (a float, as TF's j),
 * and, unless `bounds` is NULL, C_{j-1} and C_j (the scores in bins below j, and up to j) to
 * bounds[2w] and bounds[2w + 1].
 * Each counting pass narrows every unfinished weight's range of possible bins by a window of
 * LP_EDGES bins; a sample places the windows, so one pass is the rule and two are rare (e.g. when
 * the sample's share of already-zeroed weights is off).  Returns the number of passes, or -1 when
 * out of memory. */
int64_t lp_histogram_bins(int64_t nweights, const int64_t *ptrs, const int64_t *sizes, const float *maxima,
                          const int64_t *targets, int64_t nbins, int nthreads, float *bins,
                          int64_t *bounds) {
    int64_t *starts = calloc(nweights + 1, sizeof(int64_t));
    int32_t *edges = calloc(nweights * LP_EDGES, sizeof(int32_t));
    lp_search *search = calloc(nweights, sizeof(lp_search));
    uint8_t *active = calloc(nweights, 1);
    int64_t *hist = calloc((size_t)nweights * nbins, sizeof(int64_t));
    int64_t *counts = calloc((size_t)LP_MAX_THREADS * nweights * LP_EDGES, sizeof(int64_t));
    lp_job *jobs = calloc(LP_MAX_THREADS, sizeof(lp_job));
    int64_t passes = 0;
    if (!starts || !edges || !search || !active || !hist || !counts || !jobs) {
        passes = -1;
        goto done;
    }
    int64_t remaining = 0;
    for (int64_t w = 0; w < nweights; w++) {
        starts[w + 1] = starts[w] + sizes[w];
        int64_t *h = hist + (size_t)w * nbins;
        sample_histogram((const uint32_t *)(intptr_t)ptrs[w], sizes[w], maxima[w], nbins, h);
        lp_search st = {-1, nbins - 1, 0, sizes[w], {0}}; /* C_{-1} = 0, C_{nbins-1} = n */
        search[w] = st;
        if (nbins == 1) {
            bins[w] = 0.0f;
            if (bounds) bounds[2 * w] = 0, bounds[2 * w + 1] = sizes[w];
            continue;
        }
        place_window(&search[w], h, targets[w]);
        active[w] = 1;
        remaining++;
    }
    while (remaining > 0) {
        for (int64_t w = 0; w < nweights; w++) {
            if (!active[w]) continue;
            /* edge e_{i+1} counts C_i */
            for (int k = 0; k < LP_EDGES; k++)
                edges[w * LP_EDGES + k] = edge_or_sentinel(maxima[w], search[w].window[k] + 1, nbins);
        }
        lp_job base = {nweights, ptrs, sizes, starts, 0, 0, edges, active, NULL, NULL, NULL, 0, NULL};
        int nt = parallel(&base, nthreads, 1, counts, nweights * LP_EDGES, jobs);
        passes++;
        for (int64_t w = 0; w < nweights; w++) {
            if (!active[w]) continue;
            lp_search *st = &search[w];
            for (int k = 0; k < LP_EDGES; k++) { /* window bins ascend, and C with them */
                int64_t bin = st->window[k], c = 0;
                if (bin <= st->below || bin >= st->above) continue; /* outside the open range: known */
                for (int t = 0; t < nt; t++) c += counts[((size_t)t * nweights + w) * LP_EDGES + k];
                if (c < targets[w]) {
                    st->below = bin;
                    st->c_below = c;
                } else if (bin < st->above) {
                    st->above = bin;
                    st->c_above = c;
                }
            }
            if (st->above == st->below + 1) {
                bins[w] = (float)st->above;
                if (bounds) bounds[2 * w] = st->c_below, bounds[2 * w + 1] = st->c_above; /* C_{j-1}, C_j */
                active[w] = 0;
                remaining--;
            } else {
                place_window(st, hist + (size_t)w * nbins, targets[w]);
            }
        }
    }
done:
    free(starts); free(edges); free(search); free(active); free(hist); free(counts); free(jobs);
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

/* Copy every |w| whose bits lie in [lo[w], hi[w]) into out[w] (capacity[w] floats), for every weight,
 * in index order; found[w] receives how many there were (more than capacity: only capacity copied).
 * The exact threshold's last step: the scores of the one bin that holds it.  Each thread scans its
 * share of each weight, 64 elements at a time with a vectorised count, copying only from blocks
 * that hold a hit, into its own buffer; the buffers are joined in thread order.  Returns 0, or -1
 * when out of memory. */
int lp_gather_range(int64_t nweights, const int64_t *ptrs, const int64_t *sizes, const int32_t *lo,
                    const int32_t *hi, const int64_t *out, const int64_t *capacity, int nthreads, int64_t *found) {
    int nt = nthreads < 1 ? 1 : (nthreads > LP_MAX_THREADS ? LP_MAX_THREADS : nthreads);
    int64_t total_capacity = 0;
    for (int64_t w = 0; w < nweights; w++) total_capacity += capacity[w];
    uint32_t *local = malloc(sizeof(uint32_t) * (size_t)(total_capacity + 1) * nt);
    int64_t *taken = calloc((size_t)nt * nweights, sizeof(int64_t));
    if (!local || !taken) {
        free(local); free(taken);
        return -1;
    }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        uint32_t *buffer = local + (size_t)t * (total_capacity + 1);
        int64_t offset = 0;
        for (int64_t w = 0; w < nweights; w++) {
            const uint32_t *b = (const uint32_t *)(intptr_t)ptrs[w];
            int64_t begin = sizes[w] * t / nt, end = sizes[w] * (t + 1) / nt, n = 0;
            const int32_t low = lo[w], high = hi[w];
            for (int64_t s = begin; s < end; s += 64) {
                int64_t len = end - s < 64 ? end - s : 64;
                int32_t hits = 0;
                for (int64_t i = 0; i < len; i++) {
                    int32_t a = (int32_t)(b[s + i] & LP_ABS);
                    hits += (a >= low) & (a < high);
                }
                if (!hits) continue;
                for (int64_t i = 0; i < len; i++) {
                    int32_t a = (int32_t)(b[s + i] & LP_ABS);
                    if (a >= low && a < high && n < capacity[w]) buffer[offset + n++] = (uint32_t)a;
                    else if (a >= low && a < high) n++;
                }
            }
            taken[(size_t)t * nweights + w] = n;
            offset += capacity[w];
        }
    }
    int64_t offset = 0;
    for (int64_t w = 0; w < nweights; w++) {
        uint32_t *dst = (uint32_t *)(intptr_t)out[w];
        int64_t filled = 0;
        found[w] = 0;
        for (int t = 0; t < nt; t++) {
            int64_t n = taken[(size_t)t * nweights + w];
            int64_t copy = n < capacity[w] - filled ? n : capacity[w] - filled;
            if (copy > 0) memcpy(dst + filled, local + (size_t)t * (total_capacity + 1) + offset, sizeof(uint32_t) * copy);
            filled += copy;
            found[w] += n;
        }
        offset += capacity[w];
    }
    free(local);
    free(taken);
    return 0;
}

/* The edge bit patterns of bin j (0 <= j < nbins) under TF's binning of [0, max]: |w| bits in
 * [*lo, *hi) are the scores of bin j. */
void lp_bin_range(float max_value, int64_t j, int64_t nbins, int32_t *lo, int32_t *hi) {
    *lo = j <= 0 ? 0 : bin_edge(max_value, j, nbins);
    *hi = edge_or_sentinel(max_value, j + 1, nbins);
}
