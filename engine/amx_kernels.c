// CPU kernels on Intel AMX tiles (bf16 in, fp32 accumulation), loaded by engine/amx.py:
//   amx_moe_forward: Mixtral's expert block on one layer in one call: routing sort, both expert
//                    matmuls, SiLU-and-product, and the weighted sum of each token's experts;
//   amx_linear:      y = x W^T for the dense projections (attention, LM head);
//   add_rms_norm:    the residual add and the RMSNorm after it, one pass over the rows;
//   decode_attention: one query token per sequence over its paged K/V, read in place.
//
// Why a kernel of our own: per expert, oneDNN costs ~25 us a call and streams at most ~24 GB/s,
// and the small ops between the calls run with cold caches. Here every thread streams one
// contiguous run of (expert, panel) tiles, all experts of the layer in one parallel region.
//
// Weights are pre-packed (engine/amx_moe.py) into AMX B tiles: 16 rows of K pairs x 16 columns
// x 2, 1 KiB each. A panel is 4 tiles wide (64 output columns) and walks K in chunks of 32:
//   w13: panel p = w1 columns [32p, 32p+32) then w3 columns [32p, 32p+32), so SiLU(w1 x) * (w3 x)
//        is finished in registers, panel by panel;
//   w2 and dense weights: panel p = output columns [64p, 64p+64).
// Shapes: D % 64 == 0, I % 32 == 0; dense N % 64 == 0, K % 32 == 0.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ELEMS 512  // bf16 elements in one 16 x 64-byte tile
#define PANEL_TILES 4
#define ROWS 16         // rows of one A / C tile

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

// Lets this process use AMX tile data (Linux asks each process to opt in). 0 on success.
int amx_moe_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 7; ++t) {  // 0-3: C (fp32 16 x 16), 4: A, 5-6: B
        cfg.rows[t] = ROWS;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static inline uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// C tiles 0-3 = A [16 rows, K] (row stride lda elements) @ one panel (K / 32 chunks of 4 tiles).
static inline void panel_product(const uint16_t *a, int64_t lda, const uint16_t *panel, int64_t k_chunks) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < k_chunks; ++kc) {
        const uint16_t *b = panel + kc * PANEL_TILES * TILE_ELEMS;
        _mm_prefetch((const char *)(b + 8 * PANEL_TILES * TILE_ELEMS), _MM_HINT_T0);
        _tile_loadd(4, a + kc * 32, lda * 2);
        _tile_loadd(5, b, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, b + TILE_ELEMS, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, b + 2 * TILE_ELEMS, 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, b + 3 * TILE_ELEMS, 64);
        _tile_dpbf16ps(3, 4, 6);
    }
}

// Each thread's share [begin, end) of n equal tasks.
static inline void share(int64_t n, int64_t *begin, int64_t *end) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *begin = n * t / nt;
    *end = n * (t + 1) / nt;
}

// out [T, D] bf16 = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), on num_threads threads.
// Scratch, sized by the caller for R = T * k + E * 15 rows: xs [R, D] bf16, act [R, I] bf16,
// y [R, D] fp32, slot_of [T * k] int32.
void amx_moe_forward(
    const uint16_t *x, const int64_t *ids, const float *weights, int64_t T, int64_t k, int64_t E, int64_t D,
    int64_t I, int64_t num_threads, const uint16_t *w13, const uint16_t *w2, uint16_t *out, uint16_t *xs, uint16_t *act, float *y,
    int32_t *slot_of) {
    // Counting sort of (token, choice) pairs by expert; each expert's rows start on a 16-row
    // boundary so an A tile never spans two experts.
    int64_t count[E], start[E + 1], fill[E];
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < T * k; ++i) count[ids[i]]++;
    start[0] = 0;
    for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + (count[e] + ROWS - 1) / ROWS * ROWS;
    memcpy(fill, start, sizeof fill);
    for (int64_t i = 0; i < T * k; ++i) slot_of[i] = (int32_t)fill[ids[i]]++;
    // Tasks: (expert, panel) pairs over active experts, in weight order.
    int64_t active[E], n_active = 0;
    for (int64_t e = 0; e < E; ++e)
        if (count[e]) active[n_active++] = e;
    const int64_t p13 = I / 32, kc13 = D / 32, p2 = D / 64, kc2 = I / 32;
    const int64_t panel13 = kc13 * PANEL_TILES * TILE_ELEMS, panel2 = kc2 * PANEL_TILES * TILE_ELEMS;

#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float c[ROWS][64];
        int64_t b, e_;
        share(T * k, &b, &e_);
        for (int64_t i = b; i < e_; ++i) memcpy(xs + slot_of[i] * D, x + (i / k) * D, D * 2);
        share(E, &b, &e_);  // padding rows: zeros, so their (discarded) results stay finite
        for (int64_t e = b; e < e_; ++e)
            memset(xs + (start[e] + count[e]) * D, 0, (start[e + 1] - start[e] - count[e]) * D * 2);
#pragma omp barrier
        share(n_active * p13, &b, &e_);
        for (int64_t task = b; task < e_; ++task) {
            const int64_t e = active[task / p13], p = task % p13;
            const uint16_t *panel = w13 + (e * p13 + p) * panel13;
            for (int64_t r0 = start[e]; r0 < start[e] + count[e]; r0 += ROWS) {
                panel_product(xs + r0 * D, D, panel, kc13);
                _tile_stored(0, &c[0][0], 256);
                _tile_stored(1, &c[0][16], 256);
                _tile_stored(2, &c[0][32], 256);
                _tile_stored(3, &c[0][48], 256);
                const int64_t rows = start[e] + count[e] - r0 < ROWS ? start[e] + count[e] - r0 : ROWS;
                for (int64_t r = 0; r < ROWS; ++r) {
                    uint16_t *dst = act + (r0 + r) * I + p * 32;
                    if (r >= rows) {  // padding rows: zeros for the second matmul
                        memset(dst, 0, 64);
                        continue;
                    }
#pragma omp simd
                    for (int j = 0; j < 32; ++j) {
                        const float g = c[r][j];
                        dst[j] = to_bf16(g / (1.0f + expf(-g)) * c[r][32 + j]);
                    }
                }
            }
        }
#pragma omp barrier
        share(n_active * p2, &b, &e_);
        for (int64_t task = b; task < e_; ++task) {
            const int64_t e = active[task / p2], p = task % p2;
            const uint16_t *panel = w2 + (e * p2 + p) * panel2;
            for (int64_t r0 = start[e]; r0 < start[e] + count[e]; r0 += ROWS) {
                panel_product(act + r0 * I, I, panel, kc2);
                float *dst = y + r0 * D + p * 64;
                _tile_stored(0, dst, D * 4);
                _tile_stored(1, dst + 16, D * 4);
                _tile_stored(2, dst + 32, D * 4);
                _tile_stored(3, dst + 48, D * 4);
            }
        }
#pragma omp barrier
        share(T, &b, &e_);
        for (int64_t t = b; t < e_; ++t) {
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                float acc[64];
#pragma omp simd
                for (int j = 0; j < 64; ++j) acc[j] = 0.0f;
                for (int64_t j = 0; j < k; ++j) {
                    const float w = weights[t * k + j];
                    const float *src = y + (int64_t)slot_of[t * k + j] * D + d0;
#pragma omp simd
                    for (int c2 = 0; c2 < 64; ++c2) acc[c2] += w * src[c2];
                }
#pragma omp simd
                for (int j = 0; j < 64; ++j) out[t * D + d0 + j] = to_bf16(acc[j]);
            }
        }
        _tile_release();
    }
}

// out [T, N] (bf16, or fp32 when out_fp32) = x [T, K] @ W^T for W packed in panels of 64 output
// columns. Scratch xs [ceil(T / 16) * 16, K] bf16 holds x padded to whole tiles.
void amx_linear(const uint16_t *x, int64_t T, int64_t K, int64_t N, int64_t num_threads, const uint16_t *w,
                void *out, int64_t out_fp32, uint16_t *xs) {
    const int64_t padded = (T + ROWS - 1) / ROWS * ROWS, k_chunks = K / 32, panel = k_chunks * PANEL_TILES * TILE_ELEMS;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float c[ROWS][64];
        int64_t b, e_;
        share(padded, &b, &e_);
        for (int64_t r = b; r < e_; ++r) {
            if (r < T)
                memcpy(xs + r * K, x + r * K, K * 2);
            else
                memset(xs + r * K, 0, K * 2);
        }
#pragma omp barrier
        share(N / 64, &b, &e_);
        for (int64_t p = b; p < e_; ++p) {
            for (int64_t r0 = 0; r0 < T; r0 += ROWS) {
                panel_product(xs + r0 * K, K, w + p * panel, k_chunks);
                _tile_stored(0, &c[0][0], 256);
                _tile_stored(1, &c[0][16], 256);
                _tile_stored(2, &c[0][32], 256);
                _tile_stored(3, &c[0][48], 256);
                const int64_t rows = T - r0 < ROWS ? T - r0 : ROWS;
                for (int64_t r = 0; r < rows; ++r) {
                    if (out_fp32) {
                        memcpy((float *)out + (r0 + r) * N + p * 64, c[r], 256);
                    } else {
                        uint16_t *dst = (uint16_t *)out + (r0 + r) * N + p * 64;
#pragma omp simd
                        for (int j = 0; j < 64; ++j) dst[j] = to_bf16(c[r][j]);
                    }
                }
            }
        }
        _tile_release();
    }
}

static inline float bf16_to_float(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// h [T, D] += delta (when given; rounded to bf16 as a bf16 add rounds), then
// normed [T, D] = h / sqrt(mean(h^2) + eps) * weight, in fp32 and rounded once.
void add_rms_norm(uint16_t *h, const uint16_t *delta, const uint16_t *weight, float eps, int64_t T, int64_t D,
                  int64_t num_threads, uint16_t *normed) {
#pragma omp parallel for num_threads(T < num_threads ? T : num_threads) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        uint16_t *row = h + t * D;
        float sum = 0.0f;
        if (delta) {
            const uint16_t *d = delta + t * D;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < D; ++j) {
                const uint16_t r = to_bf16(bf16_to_float(row[j]) + bf16_to_float(d[j]));
                row[j] = r;
                const float v = bf16_to_float(r);
                sum += v * v;
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < D; ++j) {
                const float v = bf16_to_float(row[j]);
                sum += v * v;
            }
        }
        const float inv = 1.0f / sqrtf(sum / (float)D + eps);
        uint16_t *out = normed + t * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) out[j] = to_bf16(bf16_to_float(row[j]) * inv * bf16_to_float(weight[j]));
    }
}

// out [B, H, hd] = softmax(q k^T / sqrt(hd)) v for one query token per sequence: row b attends to
// positions [first[b], last[b]] of its context, whose cache slots are slots[b, :] (K/V caches
// [S, KVH, hd]). The G = H / KVH query heads sharing a KV head are done together, so each K/V row
// is read once. Scratch: scores [num_threads, G, L] fp32.
void decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                      const int64_t *first, const int64_t *last, int64_t B, int64_t H, int64_t KVH, int64_t hd,
                      int64_t L, int64_t num_threads, float *scores, uint16_t *out) {
    const int64_t G = H / KVH;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for num_threads(B * KVH < num_threads ? B * KVH : num_threads) schedule(static)
    for (int64_t task = 0; task < B * KVH; ++task) {
        const int64_t b = task / KVH, kvh = task % KVH, lo = first[b], hi = last[b] + 1;
        float *s = scores + (int64_t)omp_get_thread_num() * G * L;
        float qf[G][hd], acc[G][hd], mx[G], denom[G];
        for (int64_t g = 0; g < G; ++g) {
            const uint16_t *qr = q + (b * H + kvh * G + g) * hd;
            for (int64_t d = 0; d < hd; ++d) qf[g][d] = bf16_to_float(qr[d]) * scale;
            mx[g] = -INFINITY;
            denom[g] = 0.0f;
            for (int64_t d = 0; d < hd; ++d) acc[g][d] = 0.0f;
        }
        for (int64_t j = lo; j < hi; ++j) {
            const uint16_t *kr = k_cache + (slots[b * L + j] * KVH + kvh) * hd;
            for (int64_t g = 0; g < G; ++g) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < hd; ++d) dot += qf[g][d] * bf16_to_float(kr[d]);
                s[g * L + j] = dot;
                mx[g] = dot > mx[g] ? dot : mx[g];
            }
        }
        for (int64_t j = lo; j < hi; ++j) {
            const uint16_t *vr = v_cache + (slots[b * L + j] * KVH + kvh) * hd;
            for (int64_t g = 0; g < G; ++g) {
                const float p = expf(s[g * L + j] - mx[g]);
                denom[g] += p;
#pragma omp simd
                for (int64_t d = 0; d < hd; ++d) acc[g][d] += p * bf16_to_float(vr[d]);
            }
        }
        for (int64_t g = 0; g < G; ++g) {
            uint16_t *o = out + (b * H + kvh * G + g) * hd;
            const float inv = 1.0f / denom[g];
            for (int64_t d = 0; d < hd; ++d) o[d] = to_bf16(acc[g][d] * inv);
        }
    }
}
