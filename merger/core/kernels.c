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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KR_F32 = 0, KR_BF16 = 1, KR_F16 = 2 };

#define CHUNK 2048
#define MAX_MODELS 16
/* magnitude histograms use the top bits of |x| as float32: sign bit clear, 15 bits left */
#define KEY_SHIFT 16
#define N_BINS (1 << 15)

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

/* out = sum_j w[j] * x_j, divided by `divisor` when it is not 0. Returns non-finite count. */
int64_t kr_linear(int64_t n, int k, const void *const *src, int in_dtype, const float *w,
                  float divisor, void *dst, int out_dtype)
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

/* Radix-select histograms of the keys of |x_j - base| (magnitude_key), for the models with
 * count[j] != NULL:
 * edge[j] < 0: count the high 15 bits of each key (count[j] has 1 << 15 entries);
 * edge[j] >= 0: count the low 16 bits of the keys whose high bits equal edge[j] (1 << 16). */
void kr_tv_histogram(int64_t n, int k, const void *base, const void *const *src, int dtype,
                     uint32_t *const *count, const int32_t *edge)
{
    float b[CHUNK], x[CHUNK];
    uint32_t key[CHUNK];
    for (int64_t off = 0; off < n; off += CHUNK) {
        int64_t m = n - off < CHUNK ? n - off : CHUNK;
        load_f32(b, base, off, m, dtype);
        for (int j = 0; j < k; j++) {
            if (count[j] == NULL)
                continue;
            load_f32(x, src[j], off, m, dtype);
            for (int64_t i = 0; i < m; i++)
                key[i] = magnitude_key(x[i] - b[i]);
            uint32_t *c = count[j];
            if (edge[j] < 0) {
                for (int64_t i = 0; i < m; i++)
                    c[key[i] >> 16]++;
            } else {
                const uint32_t high = (uint32_t)edge[j];
                for (int64_t i = 0; i < m; i++)
                    if ((key[i] >> 16) == high)
                        c[key[i] & 0xffffu]++;
            }
        }
    }
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
