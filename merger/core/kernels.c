/* Fused CPU merge kernels: one pass over the inputs per method step.
 *
 * The torch reference in methods.py runs each step as a separate op over a block (convert,
 * multiply, add, compare, convert back), so every element crosses the cache several times.
 * Here each element is loaded from the (memory-mapped) shard once per pass, converted to
 * float32 in a small buffer, combined, rounded to the output dtype and stored, and the
 * output is checked for NaN/Inf on the way out. Arithmetic is float32 in the same order as
 * the reference, so the two agree to rounding.
 *
 * Single-threaded by design: the engine merges different tensors on different threads, and
 * ctypes releases the GIL for the duration of a call. Built at run time by kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KR_F32 = 0, KR_BF16 = 1, KR_F16 = 2 };

#define CHUNK 2048

/* The radix select's key layout is the torch reference's (methods.py: KEY_SHIFT, HIGH_BINS);
 * kernels.py passes it in as -D defines, so it is written down once. Magnitude keys are |x|
 * as float32 bits, sign bit clear: the high 31 - KR_KEY_SHIFT bits pick a bin. */
#if !defined(KR_KEY_SHIFT) || !defined(KR_HIGH_BINS)
#error "build kernels.c through merger/core/kernels.py, which passes -DKR_KEY_SHIFT and -DKR_HIGH_BINS"
#endif
_Static_assert(KR_HIGH_BINS == 1 << (31 - KR_KEY_SHIFT), "KR_HIGH_BINS covers the high key bits");
#define KR_LOW_MASK ((1u << KR_KEY_SHIFT) - 1u)

static void load_f32(float *dst, const void *src, int64_t off, int64_t m, int dtype)
{
    if (dtype == KR_F32) {
        memcpy(dst, (const float *)src + off, (size_t)m * sizeof(float));
    } else if (dtype == KR_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < m; i++)
            d[i] = (uint32_t)s[i] << 16;
    } else {
#ifdef KR_HAVE_F16
        const _Float16 *s = (const _Float16 *)src + off;
        for (int64_t i = 0; i < m; i++)
            dst[i] = (float)s[i];
#endif
    }
}

/* Round to the output dtype (nearest even, as torch) and count non-finite results. */
static int64_t store_f32(void *dst, int64_t off, const float *src, int64_t m, int dtype)
{
    int64_t bad = 0;
    if (dtype == KR_F32) {
        const uint32_t *s = (const uint32_t *)src;
        for (int64_t i = 0; i < m; i++)
            bad += (s[i] & 0x7f800000u) == 0x7f800000u;
        memcpy((float *)dst + off, src, (size_t)m * sizeof(float));
    } else if (dtype == KR_BF16) {
        const uint32_t *s = (const uint32_t *)src;
        uint16_t *d = (uint16_t *)dst + off;
        for (int64_t i = 0; i < m; i++) {
            uint32_t u = s[i];
            int is_nan = (u & 0x7fffffffu) > 0x7f800000u;
            uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            r = is_nan ? (uint16_t)0x7fc0 : r;
            d[i] = r;
            bad += (r & 0x7f80u) == 0x7f80u;
        }
    } else {
#ifdef KR_HAVE_F16
        _Float16 *d = (_Float16 *)dst + off;
        for (int64_t i = 0; i < m; i++) {
            d[i] = (_Float16)src[i];
            uint16_t r;
            memcpy(&r, &d[i], sizeof(r));
            bad += (r & 0x7c00u) == 0x7c00u;
        }
#endif
    }
    return bad;
}

/* |d| as its float32 bit pattern: ordered as the magnitudes are (the radix-select key). */
static inline uint32_t magnitude_key(float d)
{
    uint32_t u;
    memcpy(&u, &d, sizeof(u));
    return u & 0x7fffffffu;
}

int kr_has_f16(void)
{
#ifdef KR_HAVE_F16
    return 1;
#else
    return 0;
#endif
}

/* out = sum_j w[j] * x_j, divided by `divisor` when it is not 0. Returns non-finite count.
 * With `fused`, each step is one fused multiply-add, as torch's addcmul_ (mergekit's linear). */
int64_t kr_linear(int64_t n, int k, const void *const *src, int in_dtype, const float *w,
                  float divisor, void *dst, int out_dtype, int fused)
{
    float acc[CHUNK], x[CHUNK];
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        for (int64_t i = 0; i < m; i++)
            acc[i] = 0.0f;
        for (int j = 0; j < k; j++) {
            load_f32(x, src[j], off, m, in_dtype);
            const float wj = w[j];
            if (fused)
                for (int64_t i = 0; i < m; i++)
                    acc[i] = fmaf(x[i], wj, acc[i]);
            else
                for (int64_t i = 0; i < m; i++)
                    acc[i] += wj * x[i];
        }
        if (divisor != 0.0f)
            for (int64_t i = 0; i < m; i++)
                acc[i] /= divisor;
        bad += store_f32(dst, off, acc, m, out_dtype);
    }
    return bad;
}

/* |a|^2, |b|^2 and a.b, float32 products summed per chunk, chunks summed in float64. */
void kr_dots(int64_t n, const void *a, const void *b, int dtype, double *out)
{
    float x[CHUNK], y[CHUNK];
    double aa = 0, bb = 0, ab = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_f32(x, a, off, m, dtype);
        load_f32(y, b, off, m, dtype);
        float saa[16] = {0}, sbb[16] = {0}, sab[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= m; i += 16)
            for (int l = 0; l < 16; l++) {
                saa[l] += x[i + l] * x[i + l];
                sbb[l] += y[i + l] * y[i + l];
                sab[l] += x[i + l] * y[i + l];
            }
        for (; i < m; i++) {
            saa[0] += x[i] * x[i];
            sbb[0] += y[i] * y[i];
            sab[0] += x[i] * y[i];
        }
        for (int l = 0; l < 16; l++) {
            aa += saa[l];
            bb += sbb[l];
            ab += sab[l];
        }
    }
    out[0] = aa;
    out[1] = bb;
    out[2] = ab;
}

/* Kernels that round to a compute dtype `cdt` are written once (always inlined) and
 * instantiated per compute dtype (KR_BY_CDT), so that the rounding is branch-free and the
 * loops vectorize. */
#define KR_INLINE static inline __attribute__((always_inline))

KR_INLINE float rnd(float x, int cdt)
{
    if (cdt == KR_BF16) {
        uint32_t u, r;
        memcpy(&u, &x, sizeof(u));
        r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        r = (u & 0x7fffffffu) > 0x7f800000u ? u : r; /* NaN stays NaN */
        memcpy(&x, &r, sizeof(x));
        return x;
    }
#ifdef KR_HAVE_F16
    if (cdt == KR_F16)
        return (float)(_Float16)x;
#endif
    return x;
}

KR_INLINE void load_c(float *dst, const void *src, int64_t off, int64_t m, int dtype, int cdt);

/* the exported kernels: one instance per compute dtype */
#ifdef KR_HAVE_F16
#define KR_BY_CDT(call)                                                                      \
    switch (cdt) {                                                                           \
    case KR_BF16: call(KR_BF16); break;                                                      \
    case KR_F16: call(KR_F16); break;                                                        \
    default: call(KR_F32); break;                                                            \
    }
#else
#define KR_BY_CDT(call)                                                                      \
    switch (cdt) {                                                                           \
    case KR_BF16: call(KR_BF16); break;                                                      \
    default: call(KR_F32); break;                                                            \
    }
#endif

/* Radix-select histograms of the keys of |x_j - base| (magnitude_key; the inputs and the
 * difference rounded to the compute dtype `cdt` as torch rounds them), for the models with
 * count[j] != NULL:
 * edge[j] < 0: count the high bits of each key (count[j] has KR_HIGH_BINS entries);
 * edge[j] >= 0: count the low KR_KEY_SHIFT bits of the keys whose high bits equal edge[j]
 * (count[j] has 1 << KR_KEY_SHIFT entries). */
KR_INLINE void tv_histogram_(int64_t n, int k, const void *base, const void *const *src, int dtype,
                             uint32_t *const *count, const int32_t *edge, int cdt)
{
    float b[CHUNK], x[CHUNK];
    uint32_t key[CHUNK];
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(b, base, off, m, dtype, cdt);
        for (int j = 0; j < k; j++) {
            if (count[j] == NULL)
                continue;
            load_c(x, src[j], off, m, dtype, cdt);
            for (int64_t i = 0; i < m; i++)
                key[i] = magnitude_key(rnd(x[i] - b[i], cdt));
            uint32_t *c = count[j];
            if (edge[j] < 0) {
                for (int64_t i = 0; i < m; i++)
                    c[key[i] >> KR_KEY_SHIFT]++;
            } else {
                const uint32_t high = (uint32_t)edge[j];
                for (int64_t i = 0; i < m; i++)
                    if ((key[i] >> KR_KEY_SHIFT) == high)
                        c[key[i] & KR_LOW_MASK]++;
            }
        }
    }
}

void kr_tv_histogram(int64_t n, int k, const void *base, const void *const *src, int dtype,
                     uint32_t *const *count, const int32_t *edge, int cdt)
{
#define KR_CALL(c) tv_histogram_(n, k, base, src, dtype, count, edge, c)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
}

/* DARE's rescale: per model with draws[j], the L1 norm of its task vector before (before[j])
 * and after (after[j]) dropping the entries whose draw is not below keep_below[j]; added to
 * the given sums (float32 per chunk, float64 across chunks). With bits[j] (zeroed, one bit per
 * element of the whole tensor; this call starts at element `first`) the keep mask is stored,
 * so the merge pass needs no second round of draws. */
void kr_tv_l1(int64_t n, int k, const void *base, const void *const *src, int dtype,
              const float *const *draws, const float *keep_below, double *before, double *after,
              uint8_t *const *bits, int64_t first)
{
    float b[CHUNK], x[CHUNK];
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_f32(b, base, off, m, dtype);
        for (int j = 0; j < k; j++) {
            if (draws[j] == NULL)
                continue;
            load_f32(x, src[j], off, m, dtype);
            const float *r = draws[j] + off;
            const float p = keep_below[j];
            float all[16] = {0}, kept[16] = {0};
            int64_t i = 0;
            for (; i + 16 <= m; i += 16)
                for (int l = 0; l < 16; l++) {
                    float a = x[i + l] - b[i + l];
                    a = a < 0 ? -a : a;
                    all[l] += a;
                    kept[l] += r[i + l] < p ? a : 0.0f;
                }
            for (; i < m; i++) {
                float a = x[i] - b[i];
                a = a < 0 ? -a : a;
                all[0] += a;
                kept[0] += r[i] < p ? a : 0.0f;
            }
            for (int l = 0; l < 16; l++) {
                before[j] += all[l];
                after[j] += kept[l];
            }
            if (bits != NULL && bits[j] != NULL) { /* the keep mask, for the merge pass */
                uint8_t *out = bits[j];
                int64_t i = 0;
                if (((first + off) & 7) == 0) /* whole bytes, built in a register */
                    for (; i + 8 <= m; i += 8) {
                        unsigned v = 0;
                        for (int t = 0; t < 8; t++)
                            v |= (unsigned)(r[i + t] < p) << t;
                        out[(first + off + i) >> 3] = (uint8_t)v;
                    }
                for (; i < m; i++) {
                    int64_t at = first + off + i;
                    out[at >> 3] |= (uint8_t)((r[i] < p) << (at & 7));
                }
            }
        }
    }
}

/* The task-vector merge of base + k models, one pass.
 *
 * Per model j, entries are trimmed by magnitude when trim[j]: those whose key (as in
 * kr_tv_histogram) is above threshold[j] are kept, and of those equal to it the first
 * quota[j] in index order (quota[j] is decremented as they are used); otherwise every entry
 * is kept; where draws[j] is given (DARE), entries are kept where draws[j][i] < keep_below[j]
 * (or where bit `first + i` of bits[j] is set) and the kept ones scaled by scale[j]. The kept deltas are weighted; with `consensus` only entries agreeing with the sign
 * of their sum are mixed (TIES), and `normalize` divides by the weights of the contributing
 * models (with consensus) or by `divisor` (without). Returns the non-finite count, or -1
 * when the chunk buffers cannot be allocated.
 */
int64_t kr_tv_merge(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                    const float *w, const uint8_t *trim, const uint32_t *threshold,
                    int64_t *quota, const float *const *draws, const uint8_t *const *bits,
                    int64_t first, const float *keep_below, const float *scale, int consensus,
                    int normalize, float divisor, float lambda, void *dst, int out_dtype)
{
    float b[CHUNK], x[CHUNK], mixed[CHUNK], total[CHUNK], wsum[CHUNK];
    /* on the heap: k chunks would not fit small thread stacks (musl's are 128 KiB) */
    float (*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k > 0 ? k : 1));
    if (d == NULL)
        return -1;
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_f32(b, base, off, m, in_dtype);
        for (int j = 0; j < k; j++) {
            float *dj = d[j];
            load_f32(x, src[j], off, m, in_dtype);
            const float wj = w[j];
            if (bits != NULL && bits[j] != NULL) { /* DARE with a stored keep mask */
                const uint8_t *mask = bits[j];
                const float sj = scale[j];
                float *keep = mixed; /* free until the mixing below */
                for (int64_t i = 0; i < m; i++) {
                    int64_t at = first + off + i;
                    keep[i] = (float)((mask[at >> 3] >> (at & 7)) & 1);
                }
                for (int64_t i = 0; i < m; i++)
                    dj[i] = (((x[i] - b[i]) * keep[i]) * sj) * wj;
                continue;
            }
            if (draws != NULL && draws[j] != NULL) { /* DARE: keep where the draw < density */
                const float *r = draws[j] + off;
                const float p = keep_below[j], sj = scale[j];
                for (int64_t i = 0; i < m; i++)
                    dj[i] = (((x[i] - b[i]) * (r[i] < p ? 1.0f : 0.0f)) * sj) * wj;
                continue;
            }
            if (!trim[j]) {
                for (int64_t i = 0; i < m; i++)
                    dj[i] = (x[i] - b[i]) * wj;
                continue;
            }
            const uint32_t edge = threshold[j];
            int64_t equal = 0;
            for (int64_t i = 0; i < m; i++) {
                float delta = x[i] - b[i];
                uint32_t u = magnitude_key(delta);
                dj[i] = (delta * (u > edge ? 1.0f : 0.0f)) * wj;
                equal += u == edge;
            }
            if (equal && quota[j] > 0) { /* ties at the threshold: the first ones, in order */
                for (int64_t i = 0; i < m && quota[j] > 0; i++) {
                    float delta = x[i] - b[i];
                    if (magnitude_key(delta) == edge) {
                        dj[i] = (delta * 1.0f) * wj;
                        quota[j]--;
                    }
                }
            }
        }
        if (consensus) {
            for (int64_t i = 0; i < m; i++)
                total[i] = 0.0f;
            for (int j = 0; j < k; j++)
                for (int64_t i = 0; i < m; i++)
                    total[i] += d[j][i];
            for (int64_t i = 0; i < m; i++) {
                mixed[i] = 0.0f;
                wsum[i] = 0.0f;
            }
            for (int j = 0; j < k; j++) {
                const float wj = w[j];
                for (int64_t i = 0; i < m; i++) {
                    float v = d[j][i];
                    float elected = total[i] >= 0.0f ? 1.0f : -1.0f;
                    float sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
                    float agree = sign == elected ? 1.0f : 0.0f;
                    mixed[i] += v * agree;
                    wsum[i] += wj * agree;
                }
            }
            if (normalize)
                for (int64_t i = 0; i < m; i++)
                    mixed[i] /= (wsum[i] == 0.0f ? 1.0f : wsum[i]);
        } else {
            for (int64_t i = 0; i < m; i++)
                mixed[i] = 0.0f;
            for (int j = 0; j < k; j++)
                for (int64_t i = 0; i < m; i++)
                    mixed[i] += d[j][i];
            if (normalize)
                for (int64_t i = 0; i < m; i++)
                    mixed[i] /= divisor;
        }
        if (lambda != 1.0f)
            for (int64_t i = 0; i < m; i++)
                mixed[i] *= lambda;
        for (int64_t i = 0; i < m; i++)
            mixed[i] += b[i];
        bad += store_f32(dst, off, mixed, m, out_dtype);
    }
    free(d);
    return bad;
}

/* ---- exact-dtype kernels: mergekit's torch operations, in the compute dtype ----------------
 *
 * A torch op on bf16 (f16) tensors computes in float32 and rounds its result to bf16 (f16);
 * `rnd` is that rounding for the compute dtype `cdt` (nothing for float32). Each kernel below
 * is the chain of ops of one mergekit method, each followed by `rnd`, in mergekit's order, so
 * the results are torch's bits (tests/merger/core/test_kernels.py holds them to the reference).
 * A sum over the models (torch's reduction over dim 0 of a [k, n] tensor) accumulates in float
 * in model order from 0 and rounds once, as torch does. A Python scalar enters a bf16/f16 op as
 * torch takes it: in float32 for mul and div (the reciprocal of `s / x` too), rounded to the
 * tensor's dtype first for add, sub and comparisons.
 */

/* load m elements as float, rounded to the compute dtype (as `tensor.to(cdt)` first) */
KR_INLINE void load_c(float *dst, const void *src, int64_t off, int64_t m, int dtype, int cdt)
{
    load_f32(dst, src, off, m, dtype);
    if (cdt != KR_F32 && cdt != dtype)
        for (int64_t i = 0; i < m; i++)
            dst[i] = rnd(dst[i], cdt);
}

/* passthrough: x (has_scale == 0) or x * scale */
KR_INLINE int64_t scale_(int64_t n, const void *src, int in_dtype, int has_scale, float scale, int cdt,
                         void *dst, int out_dtype)
{
    float x[CHUNK];
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(x, src, off, m, in_dtype, cdt);
        if (has_scale)
            for (int64_t i = 0; i < m; i++)
                x[i] = rnd(x[i] * scale, cdt);
        bad += store_f32(dst, off, x, m, out_dtype);
    }
    return bad;
}

int64_t kr_scale(int64_t n, const void *src, int in_dtype, int has_scale, float scale, int cdt,
                 void *dst, int out_dtype)
{
    int64_t result = 0;
#define KR_CALL(c) result = scale_(n, src, in_dtype, has_scale, scale, c, dst, out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* nearswap: w = clamp(t / clamp(|a - b|, min=1e-6), 0, 1); w * b + (1 - w) * a.
 * torch computes `t / x` as reciprocal(x) * t. */
KR_INLINE int64_t nearswap_(int64_t n, const void *base, const void *other, int in_dtype, float t,
                            int cdt, void *dst, int out_dtype)
{
    float a[CHUNK], b[CHUNK];
    const float floor_ = rnd(1e-6f, cdt);
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(a, base, off, m, in_dtype, cdt);
        load_c(b, other, off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++) {
            float d = rnd(a[i] - b[i], cdt);
            d = d < 0 ? -d : d;
            float c = d < floor_ ? floor_ : d; /* NaN stays NaN */
            float w = rnd(rnd(1.0f / c, cdt) * t, cdt);
            w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
            float p = rnd(w * b[i], cdt);
            float q = rnd(rnd(1.0f - w, cdt) * a[i], cdt);
            a[i] = rnd(p + q, cdt);
        }
        bad += store_f32(dst, off, a, m, out_dtype);
    }
    return bad;
}

int64_t kr_nearswap(int64_t n, const void *base, const void *other, int in_dtype, float t,
                    int cdt, void *dst, int out_dtype)
{
    int64_t result = 0;
#define KR_CALL(c) result = nearswap_(n, base, other, in_dtype, t, c, dst, out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* RAM: d_j = x_j - base; entries with |d_j| > eps (eps in the compute dtype) count; where one
 * model counts, its entry (RAM+: times lam[j], in float32), where several do, each counting
 * entry / count; summed over the models; base + that. With lam the sum is float32 (torch
 * promotes to the float32 factors), else rounded to the compute dtype. */
KR_INLINE int64_t ram_(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                       float eps, const float *lam, int cdt, void *dst, int out_dtype)
{
    float b[CHUNK], acc[CHUNK];
    float (*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k > 0 ? k : 1));
    int32_t *count = malloc(sizeof(int32_t) * CHUNK);
    if (d == NULL || count == NULL) {
        free(d);
        free(count);
        return -1;
    }
    const float e = rnd(eps, cdt);
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(b, base, off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++)
            count[i] = 0;
        for (int j = 0; j < k; j++) {
            load_c(d[j], src[j], off, m, in_dtype, cdt);
            for (int64_t i = 0; i < m; i++) {
                float v = rnd(d[j][i] - b[i], cdt);
                float a = v < 0 ? -v : v;
                int nz = a > e;
                d[j][i] = v * (float)nz;
                count[i] += nz;
            }
        }
        for (int64_t i = 0; i < m; i++)
            acc[i] = 0.0f;
        for (int j = 0; j < k; j++) {
            for (int64_t i = 0; i < m; i++) {
                float kept = d[j][i];
                float unique = kept * (float)(count[i] == 1);
                float shared = rnd((kept * (float)(count[i] > 1)) / (float)(count[i] > 1 ? count[i] : 1), cdt);
                float term = lam != NULL ? unique * lam[j] + shared : rnd(unique + shared, cdt);
                acc[i] += term;
            }
        }
        for (int64_t i = 0; i < m; i++)
            acc[i] = lam != NULL ? b[i] + acc[i] : rnd(b[i] + rnd(acc[i], cdt), cdt);
        bad += store_f32(dst, off, acc, m, out_dtype);
    }
    free(d);
    free(count);
    return bad;
}

int64_t kr_ram(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
               float eps, const float *lam, int cdt, void *dst, int out_dtype)
{
    int64_t result = 0;
#define KR_CALL(c) result = ram_(n, k, base, src, in_dtype, eps, lam, c, dst, out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* The task-vector merge in the compute dtype (mergekit's generalized task arithmetic, DELLA's
 * and SCE's mixes). Per model j: d = x_j - base; where keep[j] (a byte per element, of the
 * whole tensor; this call starts at element `first`) is given, d = d * keep and, with
 * has_ratio, d * ratio[j] (DELLA's rescale, in the compute dtype); then
 * mode 0 (weighted, mergekit's GTA): d * w[j]; with consensus, the entries agreeing with the
 *        sign of the sum of the weighted deltas, mixed and (normalize) divided by the sum of
 *        the agreeing weights (0 -> 1); without, the sum, divided by `divisor` (normalize);
 *        then times lambda;
 * TIES (trim[j], nullable): of d, the entries whose magnitude_key is above threshold[j] are
 *        kept, and of those equal to it the first quota[j] in index order (decremented), as in
 *        kr_tv_merge — before the weighting;
 * mode 1 (SCE): keep_all[] (a byte per element, nullable) selects entries for all models;
 *        signs elected on the unweighted sum; sum of d * (w * agree) over clamp(sum of
 *        w * agree, min=1e-6).
 * base + the mix. Returns the non-finite count, -1 when the buffers cannot be allocated. */
KR_INLINE int64_t tv_exact_(int64_t n, int k, const void *base, const void *const *src,
                            int in_dtype, const float *w, const uint8_t *const *keep,
                            const uint8_t *keep_all, int64_t first, int has_ratio,
                            const float *ratio, int mode, int consensus, int normalize,
                            float divisor, float lambda, int cdt, void *dst, int out_dtype,
                            const uint8_t *trim, const uint32_t *threshold, int64_t *quota)
{
    float b[CHUNK], mixed[CHUNK], total[CHUNK], wsum[CHUNK];
    float (*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k > 0 ? k : 1));
    if (d == NULL)
        return -1;
    const float clamp_min = rnd(1e-6f, cdt);
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(b, base, off, m, in_dtype, cdt);
        for (int j = 0; j < k; j++) {
            float *dj = d[j];
            load_c(dj, src[j], off, m, in_dtype, cdt);
            for (int64_t i = 0; i < m; i++)
                dj[i] = rnd(dj[i] - b[i], cdt);
            if (trim != NULL && trim[j]) {
                const uint32_t edge = threshold[j];
                float *factor = wsum; /* free until the mixing below */
                int64_t equal = 0;
                for (int64_t i = 0; i < m; i++) {
                    uint32_t u = magnitude_key(dj[i]);
                    factor[i] = u > edge ? 1.0f : 0.0f;
                    equal += u == edge;
                }
                for (int64_t i = 0; equal && i < m && quota[j] > 0; i++)
                    if (magnitude_key(dj[i]) == edge) { /* ties: the first ones, in order */
                        factor[i] = 1.0f;
                        quota[j]--;
                    }
                for (int64_t i = 0; i < m; i++)
                    dj[i] = dj[i] * factor[i];
            }
            if (keep != NULL && keep[j] != NULL) {
                const uint8_t *kj = keep[j] + first + off;
                for (int64_t i = 0; i < m; i++)
                    dj[i] = dj[i] * (float)kj[i];
                if (has_ratio) {
                    const float r = ratio[j];
                    for (int64_t i = 0; i < m; i++)
                        dj[i] = rnd(dj[i] * r, cdt);
                }
            }
            if (keep_all != NULL) {
                const uint8_t *ka = keep_all + first + off;
                for (int64_t i = 0; i < m; i++)
                    dj[i] = dj[i] * (float)ka[i];
            }
            if (mode == 0) {
                const float wj = w[j];
                for (int64_t i = 0; i < m; i++)
                    dj[i] = rnd(dj[i] * wj, cdt);
            }
        }
        if (mode == 1 || consensus) {
            for (int64_t i = 0; i < m; i++)
                total[i] = 0.0f;
            for (int j = 0; j < k; j++)
                for (int64_t i = 0; i < m; i++)
                    total[i] += d[j][i];
            for (int64_t i = 0; i < m; i++) {
                total[i] = rnd(total[i], cdt);
                mixed[i] = 0.0f;
                wsum[i] = 0.0f;
            }
            for (int j = 0; j < k; j++) {
                const float wj = w[j];
                for (int64_t i = 0; i < m; i++) {
                    float v = d[j][i];
                    float elected = total[i] >= 0.0f ? 1.0f : -1.0f;
                    float sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
                    float agree = sign == elected ? 1.0f : 0.0f;
                    if (mode == 1) {
                        float ew = wj * agree;
                        mixed[i] += rnd(v * ew, cdt);
                        wsum[i] += ew;
                    } else {
                        mixed[i] += v * agree;
                        wsum[i] += wj * agree;
                    }
                }
            }
            for (int64_t i = 0; i < m; i++) {
                float mx = rnd(mixed[i], cdt), ws = rnd(wsum[i], cdt);
                if (mode == 1) {
                    ws = ws < clamp_min ? clamp_min : ws;
                    mx = rnd(mx / ws, cdt);
                } else if (normalize) {
                    mx = rnd(mx / (ws == 0.0f ? 1.0f : ws), cdt);
                }
                mixed[i] = mx;
            }
        } else {
            for (int64_t i = 0; i < m; i++)
                mixed[i] = 0.0f;
            for (int j = 0; j < k; j++)
                for (int64_t i = 0; i < m; i++)
                    mixed[i] += d[j][i];
            for (int64_t i = 0; i < m; i++) {
                mixed[i] = rnd(mixed[i], cdt);
                if (normalize)
                    mixed[i] = rnd(mixed[i] / divisor, cdt);
            }
        }
        if (mode == 0 && lambda != 1.0f)
            for (int64_t i = 0; i < m; i++)
                mixed[i] = rnd(mixed[i] * lambda, cdt);
        for (int64_t i = 0; i < m; i++)
            mixed[i] = rnd(b[i] + mixed[i], cdt);
        bad += store_f32(dst, off, mixed, m, out_dtype);
    }
    free(d);
    return bad;
}

int64_t kr_tv_exact(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                    const float *w, const uint8_t *const *keep, const uint8_t *keep_all,
                    int64_t first, int has_ratio, const float *ratio, int mode, int consensus,
                    int normalize, float divisor, float lambda, int cdt, void *dst,
                    int out_dtype, const uint8_t *trim, const uint32_t *threshold,
                    int64_t *quota)
{
    int64_t result = 0;
#define KR_CALL(c)                                                                           \
    result = tv_exact_(n, k, base, src, in_dtype, w, keep, keep_all, first, has_ratio, ratio, mode, \
                       consensus, normalize, divisor, lambda, c, dst, out_dtype, trim, threshold, \
                       quota)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* |v| as an unsigned key ordered as the magnitudes are (v already in the compute dtype) */
static inline uint32_t abs_key(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u & 0x7fffffffu;
}

/* DELLA's keep probabilities (mergekit's della_magprune, ranks of tied magnitudes in index
 * order): per row of `cols` entries of d = x - base (compute dtype), the rank r of |d| (0 for
 * the smallest), then in the work dtype `wdt`: rank = r + 1, rank_norm = clamp((rank - 1) /
 * (max_rank - 1), 0, 1), p = lowest + rank_norm * 2 * epsilon (lowest = density - epsilon,
 * rounded from double as torch rounds a Python scalar), stored into
 * `probs` (wdt). Also adds sum |d| over the tensor (float64) to *l1. A stable LSD radix sort
 * on 8-bit digits; `scratch` holds 3 * cols uint32. */
void kr_della_probs(int64_t rows, int64_t cols, const void *base, const void *src,
                    int in_dtype, int cdt, int wdt, float lowest, float epsilon, void *probs,
                    double *l1, uint32_t *scratch)
{
    float *b = malloc(sizeof(float) * (size_t)cols);
    float *x = malloc(sizeof(float) * (size_t)cols);
    float *p = malloc(sizeof(float) * (size_t)cols);
    float *by_rank = malloc(sizeof(float) * (size_t)cols);
    uint32_t *key = scratch, *idx = scratch + cols, *tmp = scratch + 2 * cols;
    if (b == NULL || x == NULL || p == NULL || by_rank == NULL) {
        free(b);
        free(x);
        free(p);
        free(by_rank);
        *l1 = -1.0;
        return;
    }
    const int digits = cdt == KR_F32 ? 4 : 2; /* bf16/f16 keys fit in 16 bits */
    const float min_rank = rnd(rnd(0.0f, wdt) + 1.0f, wdt);
    const float max_rank = rnd(rnd((float)(cols - 1), wdt) + 1.0f, wdt);
    const float span = rnd(max_rank - min_rank, wdt);
    const float low = rnd(lowest, wdt); /* torch adds a Python scalar in the tensor's dtype */
    for (int64_t pos = 0; pos < cols; pos++) { /* each rank's probability: once per call */
        float rank = rnd(rnd((float)pos, wdt) + 1.0f, wdt);
        float norm = rnd(rnd(rank - min_rank, wdt) / span, wdt);
        norm = norm < 0.0f ? 0.0f : (norm > 1.0f ? 1.0f : norm);
        by_rank[pos] = rnd(rnd(rnd(norm * 2.0f, wdt) * epsilon, wdt) + low, wdt);
    }
    double total = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        load_c(b, base, r * cols, cols, in_dtype, cdt);
        load_c(x, src, r * cols, cols, in_dtype, cdt);
        for (int64_t i = 0; i < cols; i++) {
            float d = rnd(x[i] - b[i], cdt);
            total += d < 0 ? -(double)d : (double)d;
            uint32_t k = abs_key(d);
            key[i] = cdt == KR_F32 ? k : k >> 16;
            if (cdt == KR_F16) { /* f16: order by the half's own bits */
#ifdef KR_HAVE_F16
                _Float16 h = (_Float16)(d < 0 ? -d : d);
                uint16_t hb;
                memcpy(&hb, &h, sizeof(hb));
                key[i] = hb;
#endif
            }
            idx[i] = (uint32_t)i;
        }
        for (int pass = 0; pass < digits; pass++) {
            uint32_t count[257] = {0};
            const int shift = 8 * pass;
            for (int64_t i = 0; i < cols; i++)
                count[((key[idx[i]] >> shift) & 0xffu) + 1]++;
            for (int c = 0; c < 256; c++)
                count[c + 1] += count[c];
            for (int64_t i = 0; i < cols; i++)
                tmp[count[(key[idx[i]] >> shift) & 0xffu]++] = idx[i];
            uint32_t *swap = idx;
            idx = tmp;
            tmp = swap;
        }
        for (int64_t pos = 0; pos < cols; pos++)
            p[idx[pos]] = by_rank[pos];
        store_f32(probs, r * cols, p, cols, wdt);
        if (idx != scratch + cols) { /* keep the buffers where they started */
            memcpy(scratch + cols, idx, sizeof(uint32_t) * (size_t)cols);
            idx = scratch + cols;
            tmp = scratch + 2 * cols;
        }
    }
    *l1 += total;
    free(b);
    free(x);
    free(p);
    free(by_rank);
}

/* sum |d * keep| of d = x - base (compute dtype), keep a byte per element, added to *l1 */
KR_INLINE void masked_l1_(int64_t n, const void *base, const void *src, int in_dtype, int cdt,
                  const uint8_t *keep, double *l1)
{
    float b[CHUNK], x[CHUNK];
    double total = 0.0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(b, base, off, m, in_dtype, cdt);
        load_c(x, src, off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++) {
            float d = rnd(x[i] - b[i], cdt) * (float)keep[off + i];
            total += d < 0 ? -(double)d : (double)d;
        }
    }
    *l1 += total;
}

void kr_masked_l1(int64_t n, const void *base, const void *src, int in_dtype, int cdt,
                  const uint8_t *keep, double *l1)
{
#define KR_CALL(c) masked_l1_(n, base, src, in_dtype, c, keep, l1)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
}

/* RAM+'s counts per model: entries with |x_j - base| > eps that no other model sets
 * (unique[j]) and that others set too (shared[j]); added to the given int64 counts. */
KR_INLINE void ram_counts_(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                           float eps, int cdt, int64_t *unique, int64_t *shared)
{
    float b[CHUNK], x[CHUNK];
    uint8_t *nz = malloc((size_t)CHUNK * (size_t)(k > 0 ? k : 1));
    int32_t count[CHUNK];
    if (nz == NULL)
        return;
    const float e = rnd(eps, cdt);
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_c(b, base, off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++)
            count[i] = 0;
        for (int j = 0; j < k; j++) {
            load_c(x, src[j], off, m, in_dtype, cdt);
            uint8_t *nj = nz + (size_t)j * CHUNK;
            for (int64_t i = 0; i < m; i++) {
                float v = rnd(x[i] - b[i], cdt);
                float a = v < 0 ? -v : v;
                nj[i] = a > e;
                count[i] += nj[i];
            }
        }
        for (int j = 0; j < k; j++) {
            const uint8_t *nj = nz + (size_t)j * CHUNK;
            int64_t u = 0, s = 0;
            for (int64_t i = 0; i < m; i++) {
                u += nj[i] & (count[i] == 1);
                s += nj[i] & (count[i] > 1);
            }
            unique[j] += u;
            shared[j] += s;
        }
    }
    free(nz);
}

void kr_ram_counts(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                   float eps, int cdt, int64_t *unique, int64_t *shared)
{
#define KR_CALL(c) ram_counts_(n, k, base, src, in_dtype, eps, c, unique, shared)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
}

/* SCE's selection variance of one element: torch.var(dim=0, unbiased=False) of the models'
 * task vectors, as torch computes it (Welford in float64), rounded to the compute dtype
 * (through float32, as torch casts a double); its float bits are the radix-select key. */
KR_INLINE uint32_t sce_var_key(const float *const *d, int k, int64_t i, int cdt)
{
    double mean = 0.0, m2 = 0.0;
    for (int j = 0; j < k; j++) {
        double x = d[j][i];
        double delta = x - mean;
        mean += delta / (double)(j + 1);
        m2 += delta * (x - mean);
    }
    float var = rnd((float)(m2 / (double)k), cdt);
    uint32_t u;
    memcpy(&u, &var, sizeof(u));
    return u & 0x7fffffffu;
}

KR_INLINE int sce_load(float (*d)[CHUNK], const float **rows, float *b, const void *base,
                    const void *const *src, int k, int64_t off, int64_t m, int in_dtype, int cdt)
{
    load_c(b, base, off, m, in_dtype, cdt);
    for (int j = 0; j < k; j++) {
        load_c(d[j], src[j], off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++)
            d[j][i] = rnd(d[j][i] - b[i], cdt);
        rows[j] = d[j];
    }
    return 0;
}

/* SCE's radix-select counts over the variances: edge < 0: the number of non-zero variances
 * (*nonzero) and the histogram of the keys' high bits (count has KR_HIGH_BINS entries);
 * edge >= 0: the histogram of the low bits of the keys whose high bits are edge. */
KR_INLINE int sce_counts_(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                          int cdt, int32_t edge, uint32_t *count, int64_t *nonzero)
{
    float b[CHUNK];
    const float *rows[64];
    float (*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k > 0 ? k : 1));
    if (d == NULL || k > 64) {
        free(d);
        return -1;
    }
    int64_t nz = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        sce_load(d, rows, b, base, src, k, off, m, in_dtype, cdt);
        for (int64_t i = 0; i < m; i++) {
            uint32_t key = sce_var_key(rows, k, i, cdt);
            if (edge < 0) {
                nz += key != 0;
                count[key >> KR_KEY_SHIFT]++;
            } else if ((key >> KR_KEY_SHIFT) == (uint32_t)edge) {
                count[key & KR_LOW_MASK]++;
            }
        }
    }
    if (nonzero != NULL)
        *nonzero += nz;
    free(d);
    return 0;
}

int kr_sce_counts(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                  int cdt, int32_t edge, uint32_t *count, int64_t *nonzero)
{
    int result = 0;
#define KR_CALL(c) result = sce_counts_(n, k, base, src, in_dtype, c, edge, count, nonzero)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* SCE's selection mask (a byte per element into keep): select 0 keeps all, 1 keeps nothing,
 * 2 keeps the variances above `threshold` and, of those equal to it, the first *quota in
 * index order; and the sum over elements of (d * keep)^2 per model (float64, the squares
 * rounded to the compute dtype) for the weights. */
KR_INLINE int sce_mask_(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                        int cdt, int select, uint32_t threshold, int64_t *quota, uint8_t *keep,
                        double *squares)
{
    float b[CHUNK];
    const float *rows[64];
    float (*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k > 0 ? k : 1));
    if (d == NULL || k > 64) {
        free(d);
        return -1;
    }
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        sce_load(d, rows, b, base, src, k, off, m, in_dtype, cdt);
        uint8_t *kp = keep + off;
        for (int64_t i = 0; i < m; i++) {
            uint8_t on = select == 0;
            if (select == 2) {
                uint32_t key = sce_var_key(rows, k, i, cdt);
                on = key > threshold;
                if (key == threshold && *quota > 0) {
                    on = 1;
                    (*quota)--;
                }
            }
            kp[i] = on;
        }
        for (int j = 0; j < k; j++) {
            double s = 0.0;
            for (int64_t i = 0; i < m; i++) {
                float v = d[j][i] * (float)kp[i];
                s += (double)rnd(v * v, cdt);
            }
            squares[j] += s;
        }
    }
    free(d);
    return 0;
}

int kr_sce_mask(int64_t n, int k, const void *base, const void *const *src, int in_dtype,
                int cdt, int select, uint32_t threshold, int64_t *quota, uint8_t *keep,
                double *squares)
{
    int result = 0;
#define KR_CALL(c)                                                                           \
    result = sce_mask_(n, k, base, src, in_dtype, c, select, threshold, quota, keep, squares)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return result;
}

/* nuslerp (flattened, or per row of `cols` entries). d_j = x_j - base (x_j without a base),
 * rounded to the compute dtype. The passes are written once (always inlined) and
 * instantiated per compute dtype, so that the rounding is branch-free and the loops vectorize.
 * Sums are in double, in 8 lanes (another order than torch's float32 sums: the same value
 * once rounded to a half-float compute dtype, the last float32 bit otherwise). */
KR_INLINE void nus_load(float *a0, float *a1, float *b, const void *base, const void *x0,
                        const void *x1, int64_t off, int64_t m, int in_dtype, int cdt)
{
    load_f32(a0, x0, off, m, in_dtype);
    load_f32(a1, x1, off, m, in_dtype);
    if (base != NULL)
        load_f32(b, base, off, m, in_dtype);
    if (cdt != KR_F32 && cdt != in_dtype) {
        for (int64_t i = 0; i < m; i++) {
            a0[i] = rnd(a0[i], cdt);
            a1[i] = rnd(a1[i], cdt);
        }
        if (base != NULL)
            for (int64_t i = 0; i < m; i++)
                b[i] = rnd(b[i], cdt);
    }
    if (base != NULL)
        for (int64_t i = 0; i < m; i++) {
            a0[i] = rnd(a0[i] - b[i], cdt);
            a1[i] = rnd(a1[i] - b[i], cdt);
        }
}

KR_INLINE double sum8(const float *x, int64_t m)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += (double)x[i + l];
    double s = 0.0;
    for (; i < m; i++)
        s += (double)x[i];
    for (int l = 0; l < 8; l++)
        s += acc[l];
    return s;
}

/* torch.norm's sum of squares on CPU (aten's vectorized last-dim norm, `norm_two_reduce_step`:
 * float32 in 8 lanes, element i of the row into lane i % 8 in order, for the first
 * `body` = n - n % vec elements (vec: 16 bf16 or 8 float32 values per vector); then
 * lane 0 + 1 + ... + 7; then the remaining elements one by one. Every square and every add
 * rounds to float32 (no fused multiply-add: -std=c11 contracts nothing). Its error grows with
 * the row (0.65% on a 58.7M-entry tensor), so a bf16 norm differs from the exact one's rounding
 * on large tensors: mergekit's norm is this one. `tn_add` takes squares `sq[0..m)` at position
 * `off` of the row (a multiple of 8). kernels.py checks this against torch.norm at load. */
typedef struct {
    float lane[8];
    float tail[16];
    int ntail;
} kr_tnorm;

KR_INLINE int64_t tn_body(int64_t n, int cdt)
{
    const int64_t vec = cdt == KR_F32 ? 8 : 16;
    return n - n % vec;
}

KR_INLINE void tn_add(kr_tnorm *a, const float *sq, int64_t off, int64_t m, int64_t body)
{
    int64_t mb = body - off < m ? body - off : m, i = 0;
    if (mb < 0)
        mb = 0;
    float lane[8];
    memcpy(lane, a->lane, sizeof(lane));
    for (; i + 8 <= mb; i += 8)
        for (int l = 0; l < 8; l++)
            lane[l] += sq[i + l];
    for (; i < mb; i++)
        lane[(off + i) & 7] += sq[i];
    memcpy(a->lane, lane, sizeof(lane));
    for (; i < m && a->ntail < 16; i++)
        a->tail[a->ntail++] = sq[i];
}

KR_INLINE float tn_sum(const kr_tnorm *a)
{
    float s = a->lane[0];
    for (int l = 1; l < 8; l++)
        s += a->lane[l];
    for (int t = 0; t < a->ntail; t++)
        s += a->tail[t];
    return s;
}

/* torch.norm of `n` floats as aten computes it on CPU (a probe for kernels.py: the check that
 * the installed torch sums as `tn_add` does). `cdt`: the dtype x is in (its vector width). */
double kr_torch_norm_sq(int64_t n, const float *x, int cdt)
{
    kr_tnorm a = {{0}, {0}, 0};
    int64_t body = tn_body(n, cdt);
    float sq[CHUNK];
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        for (int64_t i = 0; i < m; i++)
            sq[i] = x[off + i] * x[off + i];
        tn_add(&a, sq, off, m, body);
    }
    return tn_sum(&a);
}

KR_INLINE void nus_sq(int64_t rows, int64_t cols, const void *base, const void *x0,
                      const void *x1, int in_dtype, int cdt, double *sq0, double *sq1)
{
    float b[CHUNK], a0[CHUNK], a1[CHUNK];
    const int64_t body = tn_body(cols, cdt);
    for (int64_t r = 0; r < rows; r++) {
        kr_tnorm s0 = {{0}, {0}, 0}, s1 = {{0}, {0}, 0};
        for (int64_t c = 0; c < cols; c += CHUNK) {
            int64_t off = r * cols + c, m = cols - c < CHUNK ? cols - c : CHUNK;
            nus_load(a0, a1, b, base, x0, x1, off, m, in_dtype, cdt);
            for (int64_t i = 0; i < m; i++) {
                a0[i] = a0[i] * a0[i]; /* float32 squares, as torch.norm's */
                a1[i] = a1[i] * a1[i];
            }
            tn_add(&s0, a0, c, m, body);
            tn_add(&s1, a1, c, m, body);
        }
        sq0[r] = tn_sum(&s0);
        sq1[r] = tn_sum(&s1);
    }
}

KR_INLINE void nus_dot(int64_t rows, int64_t cols, const void *base, const void *x0,
                       const void *x1, int in_dtype, int cdt, const float *n0, const float *n1,
                       double *dot)
{
    float b[CHUNK], a0[CHUNK], a1[CHUNK];
    for (int64_t r = 0; r < rows; r++) {
        double s = 0.0;
        const float m0 = n0[r], m1 = n1[r];
        for (int64_t c = 0; c < cols; c += CHUNK) {
            int64_t off = r * cols + c, m = cols - c < CHUNK ? cols - c : CHUNK;
            nus_load(a0, a1, b, base, x0, x1, off, m, in_dtype, cdt);
            for (int64_t i = 0; i < m; i++)
                a0[i] = rnd(rnd(a0[i] / m0, cdt) * rnd(a1[i] / m1, cdt), cdt);
            s += sum8(a0, m);
        }
        dot[r] = s;
    }
}

KR_INLINE int64_t nus_out(int64_t start, int64_t n, int64_t cols, const void *base,
                          const void *x0, const void *x1, int in_dtype, int cdt,
                          const uint8_t *colinear, const float *s0, const float *s1,
                          const float *st, float wa, float wb, void *dst, int out_dtype)
{
    float b[CHUNK], a0[CHUNK], a1[CHUNK];
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        nus_load(a0, a1, b, base, x0, x1, off, m, in_dtype, cdt);
        /* the rows this chunk touches, one segment each */
        for (int64_t i0 = 0; i0 < m;) {
            int64_t r = (start + off + i0) / cols;
            int64_t i1 = (r + 1) * cols - (start + off);
            i1 = i1 < m ? i1 : m;
            if (colinear[r]) {
                for (int64_t i = i0; i < i1; i++)
                    a0[i] = rnd(rnd(wa * a0[i], cdt) + rnd(wb * a1[i], cdt), cdt);
            } else {
                const float c0 = s0[r], c1 = s1[r], d = st[r];
                for (int64_t i = i0; i < i1; i++)
                    a0[i] = rnd(
                        rnd(rnd(c0 * a0[i], cdt) + rnd(c1 * a1[i], cdt), cdt) / d,
                        cdt);
            }
            i0 = i1;
        }
        if (base != NULL)
            for (int64_t i = 0; i < m; i++)
                a0[i] = rnd(b[i] + a0[i], cdt);
        bad += store_f32(dst, off, a0, m, out_dtype);
    }
    return bad;
}

void kr_nuslerp_sq(int64_t rows, int64_t cols, const void *base, const void *x0, const void *x1,
                   int in_dtype, int cdt, double *sq0, double *sq1)
{
#define KR_CALL(c) nus_sq(rows, cols, base, x0, x1, in_dtype, c, sq0, sq1)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
}

void kr_nuslerp_dot(int64_t rows, int64_t cols, const void *base, const void *x0, const void *x1,
                    int in_dtype, int cdt, const float *n0, const float *n1, double *dot)
{
#define KR_CALL(c) nus_dot(rows, cols, base, x0, x1, in_dtype, c, n0, n1, dot)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
}

/* elements [start, start + n) of the flat tensor: where colinear[row],
 * (1 - t) * d_0 + t * d_1 (Python scalars: float32 products), else
 * (s0[row] * d_0 + s1[row] * d_1) / st[row]; base + that. Returns the non-finite count. */
int64_t kr_nuslerp_out(int64_t start, int64_t n, int64_t cols, const void *base, const void *x0,
                       const void *x1, int in_dtype, int cdt, const uint8_t *colinear,
                       const float *s0, const float *s1, const float *st, float wa, float wb,
                       void *dst, int out_dtype)
{
    int64_t bad = 0;
#define KR_CALL(c)                                                                           \
    bad = nus_out(start, n, cols, base, x0, x1, in_dtype, c, colinear, s0, s1, st, wa, wb, dst, \
                  out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return bad;
}

/* multislerp, one pass per step (`stage`), each from the inputs: d_j = x_j - base (x_j without
 * a base) in the compute dtype, u_j = d_j / nrm[j] (nrm: the norms + eps).
 *   1: sums[j] = sum d_j^2                               (the norms)
 *   2: sums[0] = sum mean^2, mean = sum_j u_j * w[j]     (its norm `mn`)
 *   3: sums[j] = sum u_j * mu, mu = mean / mn            (the dots)
 *   4: sums[0] = sum tg^2, tg = sum_j (u_j - dots[j] * mu) * w[j]
 * (1, 2, 4: summed as torch.norm sums, `tn_add`; 3 in double: torch's .sum)
 *   5: out = (mu * cos_tn + tg * f) * scale (+ base)
 * Each product and difference rounds to the compute dtype as torch's does; a sum over the
 * models is float32 in model order (torch's sum over dim 0), a sum over the entries double
 * in 8 lanes. Returns the non-finite count (stage 5), -1 when out of memory. */
KR_INLINE int64_t ms_pass(int stage, int64_t n, int k, const void *base, const void *const *src,
                          int in_dtype, int cdt, const float *nrm, const float *w, float mn,
                          const float *dots, float cos_tn, float f, float scale, double *sums,
                          void *dst, int out_dtype)
{
    float(*d)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k + 4));
    kr_tnorm *nsq = calloc((size_t)k, sizeof(kr_tnorm)); /* the norms, as torch.norm sums */
    if (d == NULL || nsq == NULL) {
        free(d);
        free(nsq);
        return -1;
    }
    float *b = d[k], *acc = d[k + 1], *mu = d[k + 2], *tmp = d[k + 3];
    const int64_t body = tn_body(n, cdt);
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        int round_in = cdt != KR_F32 && cdt != in_dtype;
        if (base != NULL) {
            load_f32(b, base, off, m, in_dtype);
            if (round_in)
                for (int64_t i = 0; i < m; i++)
                    b[i] = rnd(b[i], cdt);
        }
        for (int j = 0; j < k; j++) {
            float *x = d[j];
            load_f32(x, src[j], off, m, in_dtype);
            if (round_in)
                for (int64_t i = 0; i < m; i++)
                    x[i] = rnd(x[i], cdt);
            if (base != NULL)
                for (int64_t i = 0; i < m; i++)
                    x[i] = rnd(x[i] - b[i], cdt);
            if (stage == 1) {
                for (int64_t i = 0; i < m; i++)
                    tmp[i] = x[i] * x[i];
                tn_add(&nsq[j], tmp, off, m, body);
            } else {
                const float s = nrm[j];
                for (int64_t i = 0; i < m; i++)
                    x[i] = rnd(x[i] / s, cdt);
            }
        }
        if (stage == 1)
            continue;
        for (int64_t i = 0; i < m; i++)
            acc[i] = rnd(d[0][i] * w[0], cdt);
        for (int j = 1; j < k; j++) {
            const float wj = w[j];
            for (int64_t i = 0; i < m; i++)
                acc[i] += rnd(d[j][i] * wj, cdt);
        }
        for (int64_t i = 0; i < m; i++)
            acc[i] = rnd(acc[i], cdt);
        if (stage == 2) {
            for (int64_t i = 0; i < m; i++)
                tmp[i] = acc[i] * acc[i];
            tn_add(&nsq[0], tmp, off, m, body);
            continue;
        }
        for (int64_t i = 0; i < m; i++)
            mu[i] = rnd(acc[i] / mn, cdt);
        if (stage == 3) {
            for (int j = 0; j < k; j++) {
                for (int64_t i = 0; i < m; i++)
                    tmp[i] = rnd(d[j][i] * mu[i], cdt);
                sums[j] += sum8(tmp, m);
            }
            continue;
        }
        for (int j = 0; j < k; j++) {
            const float dj = dots[j], wj = w[j];
            for (int64_t i = 0; i < m; i++) {
                float t = rnd(d[j][i] - rnd(dj * mu[i], cdt), cdt);
                float p = rnd(t * wj, cdt);
                acc[i] = j == 0 ? p : acc[i] + p;
            }
        }
        for (int64_t i = 0; i < m; i++)
            acc[i] = rnd(acc[i], cdt);
        if (stage == 4) {
            for (int64_t i = 0; i < m; i++)
                tmp[i] = acc[i] * acc[i];
            tn_add(&nsq[0], tmp, off, m, body);
            continue;
        }
        for (int64_t i = 0; i < m; i++) {
            float r = rnd(rnd(mu[i] * cos_tn, cdt) + rnd(acc[i] * f, cdt), cdt);
            r = rnd(r * scale, cdt);
            tmp[i] = base != NULL ? rnd(r + b[i], cdt) : r;
        }
        bad += store_f32(dst, off, tmp, m, out_dtype);
    }
    if (stage == 1 || stage == 2 || stage == 4)
        for (int j = 0; j < (stage == 1 ? k : 1); j++)
            sums[j] = tn_sum(&nsq[j]);
    free(d);
    free(nsq);
    return bad;
}

int64_t kr_multislerp(int stage, int64_t n, int k, const void *base, const void *const *src,
                      int in_dtype, int cdt, const float *nrm, const float *w, float mn,
                      const float *dots, float cos_tn, float f, float scale, double *sums,
                      void *dst, int out_dtype)
{
    int64_t bad = 0;
#define KR_CALL(c)                                                                           \
    bad = ms_pass(stage, n, k, base, src, in_dtype, c, nrm, w, mn, dots, cos_tn, f, scale, sums, \
                  dst, out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return bad;
}

/* model_stock, pass 1: per row of `cols` entries (one row: the flattened tensor), with
 * o_j = x_j - base in the compute dtype: sq[r * k + j] = sum o_j^2 and, for the pairs a < b in
 * order, dot[r * pairs + p] = sum o_a * o_b (each product rounded, as torch's). -1: no memory. */
KR_INLINE int ms_stock_sums(int64_t rows, int64_t cols, int k, const void *base,
                            const void *const *src, int in_dtype, int cdt, double *sq, double *dot)
{
    float(*o)[CHUNK] = malloc(sizeof(float[CHUNK]) * (size_t)(k + 2));
    if (o == NULL)
        return -1;
    kr_tnorm *nsq = calloc((size_t)k, sizeof(kr_tnorm)); /* as torch.norm sums */
    if (nsq == NULL) {
        free(o);
        return -1;
    }
    float *b = o[k], *tmp = o[k + 1];
    int pairs = k * (k - 1) / 2;
    int round_in = cdt != KR_F32 && cdt != in_dtype;
    const int64_t body = tn_body(cols, cdt);
    for (int64_t r = 0; r < rows; r++) {
        memset(nsq, 0, sizeof(kr_tnorm) * (size_t)k);
        for (int64_t c = 0; c < cols; c += CHUNK) {
            int64_t off = r * cols + c, m = cols - c < CHUNK ? cols - c : CHUNK;
            load_f32(b, base, off, m, in_dtype);
            if (round_in)
                for (int64_t i = 0; i < m; i++)
                    b[i] = rnd(b[i], cdt);
            for (int j = 0; j < k; j++) {
                load_f32(o[j], src[j], off, m, in_dtype);
                if (round_in)
                    for (int64_t i = 0; i < m; i++)
                        o[j][i] = rnd(o[j][i], cdt);
                for (int64_t i = 0; i < m; i++) {
                    o[j][i] = rnd(o[j][i] - b[i], cdt);
                    tmp[i] = o[j][i] * o[j][i];
                }
                tn_add(&nsq[j], tmp, c, m, body);
            }
            int p = 0;
            for (int a = 0; a < k; a++)
                for (int bb = a + 1; bb < k; bb++, p++) {
                    for (int64_t i = 0; i < m; i++)
                        tmp[i] = rnd(o[a][i] * o[bb][i], cdt);
                    dot[r * pairs + p] += sum8(tmp, m);
                }
        }
        for (int j = 0; j < k; j++)
            sq[r * k + j] = tn_sum(&nsq[j]);
    }
    free(o);
    free(nsq);
    return 0;
}

/* model_stock, pass 2, elements [start, start + n): t[row] * (sum_j x_j / k) + u[row] * base,
 * u = 1 - t (the sum of the models in model order, as Python's sum(), each step rounded). */
KR_INLINE int64_t ms_stock_out(int64_t start, int64_t n, int64_t cols, int k, const void *base,
                               const void *const *src, int in_dtype, int cdt, const float *t,
                               const float *u, void *dst, int out_dtype)
{
    float b[CHUNK], acc[CHUNK], x[CHUNK];
    int round_in = cdt != KR_F32 && cdt != in_dtype;
    const float count = (float)k;
    int64_t bad = 0;
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_f32(b, base, off, m, in_dtype);
        load_f32(acc, src[0], off, m, in_dtype);
        if (round_in)
            for (int64_t i = 0; i < m; i++) {
                b[i] = rnd(b[i], cdt);
                acc[i] = rnd(acc[i], cdt);
            }
        for (int j = 1; j < k; j++) {
            load_f32(x, src[j], off, m, in_dtype);
            if (round_in)
                for (int64_t i = 0; i < m; i++)
                    x[i] = rnd(x[i], cdt);
            for (int64_t i = 0; i < m; i++)
                acc[i] = rnd(acc[i] + x[i], cdt);
        }
        for (int64_t i0 = 0; i0 < m;) {
            int64_t r = (start + off + i0) / cols;
            int64_t i1 = (r + 1) * cols - (start + off);
            i1 = i1 < m ? i1 : m;
            const float tr = t[r], ur = u[r];
            for (int64_t i = i0; i < i1; i++) {
                float avg = rnd(acc[i] / count, cdt);
                acc[i] = rnd(rnd(tr * avg, cdt) + rnd(ur * b[i], cdt), cdt);
            }
            i0 = i1;
        }
        bad += store_f32(dst, off, acc, m, out_dtype);
    }
    return bad;
}

int kr_model_stock_sums(int64_t rows, int64_t cols, int k, const void *base,
                        const void *const *src, int in_dtype, int cdt, double *sq, double *dot)
{
    int rc = 0;
#define KR_CALL(c) rc = ms_stock_sums(rows, cols, k, base, src, in_dtype, c, sq, dot)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return rc;
}

int64_t kr_model_stock_out(int64_t start, int64_t n, int64_t cols, int k, const void *base,
                           const void *const *src, int in_dtype, int cdt, const float *t,
                           const float *u, void *dst, int out_dtype)
{
    int64_t bad = 0;
#define KR_CALL(c) bad = ms_stock_out(start, n, cols, k, base, src, in_dtype, c, t, u, dst, out_dtype)
    KR_BY_CDT(KR_CALL)
#undef KR_CALL
    return bad;
}
