// CPU kernels over bf16 activations (fp32 accumulation), loaded by engine/cpu_kernels.py:
//   moe_forward:      Mixtral's expert block on one layer in one call: routing sort, both expert
//                     matmuls, SiLU-and-product, and the weighted sum of each token's experts;
//   linear:           y = x W^T for the dense projections (attention, LM head);
//   add_rms_norm:     the residual add and the RMSNorm after it, one pass over the rows;
//   decode_attention: one query token per sequence over its paged K/V, read in place;
//   rope_and_cache:   the rotary on q and k in place, and this step's K/V into the cache;
//   route:            Mixtral's routing (softmax, top-k, renormalised weights).
//
// One source, two builds (engine/cpu_kernels.py): with KERNELS_AMX, bf16 weight panels run on
// Intel AMX tiles (Sapphire Rapids and later); without it, on AVX512-BF16 (`vdpbf16ps`: AMD Zen 4
// and 5, Intel Sapphire Rapids and later; VBMI is needed too). fp8 (e4m3) weights run on
// AVX512-BF16 in both builds: each 64 weights are widened to bf16 in registers by two byte-table
// lookups, so a decode step streams one byte a weight.
//
// Why kernels of our own: per expert, oneDNN costs ~25 us a call, and the small ops between the
// calls run with cold caches. Here every thread streams one contiguous run of (expert, panel)
// tiles, all experts of the layer in one parallel region.
//
// Weights are pre-packed (engine/cpu_kernels.py) into tiles of 16 K pairs x 16 columns x 2
// (512 elements: 1 KiB in bf16, 512 B in fp8), AMX's B-tile layout. A panel is 4 tiles wide
// (64 output columns) and walks K in chunks of 32:
//   w13: panel p = w1 columns [32p, 32p+32) then w3 columns [32p, 32p+32), so SiLU(w1 x) * (w3 x)
//        is finished panel by panel;
//   w2 and dense weights: panel p = output columns [64p, 64p+64).
// An fp8 weight carries one fp32 scale per output column, packed in the panel's column order.
// Shapes: D % 64 == 0, I % 32 == 0; dense N % 64 == 0, K % 32 == 0.

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TILE_ELEMS 512  // elements in one 16 x 64-byte tile
#define PANEL_TILES 4
#define ROWS 16         // rows of one A / C tile: experts' rows are padded to multiples of it
#define BLOCK_ROWS 6    // AVX512 register block: 6 rows x 4 accumulators + 4 weights + 1 broadcast
#define FP8_DIRECT_ROWS 4  // fp8 register block: 4 x 4 accumulators, 4 weights, 4 tables
#define ATTN_MAX_HD 256    // decode attention: head dims up to this (multiples of 16)
#define ATTN_MAX_GROUP 16  // and up to this many query heads per KV head
#define STREAM_ROWS 8      // a panel's streaming costs about as much as this many rows' products
#define WIDE_CHUNKS 4   // K chunks of an fp8 panel widened at a time for many rows (16 KiB of bf16)

#ifdef KERNELS_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int enable_amx(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

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

static void release_tiles(void) { _tile_release(); }

// C tiles 0-3 = A [16 rows, K] (row stride lda elements) @ one bf16 panel (K / 32 chunks of 4 tiles).
static inline void amx_panel_product(const uint16_t *a, int64_t lda, const uint16_t *panel, int64_t k_chunks) {
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
#else
static int enable_amx(void) { return 0; }
static void configure_tiles(void) {}
static void release_tiles(void) {}
#endif

static inline uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// e4m3 magnitudes 0..127 as bf16 (exact: every e4m3 value is a bf16 value), split into their
// low and high bytes; filled once by kernels_init.
static uint8_t fp8_lo[128], fp8_hi[128];

static void fill_fp8_tables(void) {
    for (int c = 0; c < 128; ++c) {
        const int e = c >> 3, m = c & 7;  // subnormals (e = 0) are m * 2^-9
        const uint16_t b = to_bf16(e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9));
        fp8_lo[c] = (uint8_t)(b & 0xFF);
        fp8_hi[c] = (uint8_t)(b >> 8);
    }
}

// Fills the fp8 tables; with AMX, lets this process use tile data (Linux asks each process to
// opt in). 0 on success.
int kernels_init(void) {
    fill_fp8_tables();
    return enable_amx();
}

typedef struct {
    __m512i lo0, lo1, hi0, hi1;
} fp8_tables;

static inline fp8_tables load_fp8_tables(void) {
    fp8_tables t = {_mm512_loadu_si512(fp8_lo), _mm512_loadu_si512(fp8_lo + 64), _mm512_loadu_si512(fp8_hi),
                    _mm512_loadu_si512(fp8_hi + 64)};
    return t;
}

// 64 e4m3 bytes -> two vectors of 32 exact bf16 values, in 6 instructions: each byte's low 7 bits
// look up the bf16 value's low and high byte (two 128-entry tables, vpermi2b), the sign joins the
// high byte, and the bytes interleave into words. Interleaving works within 128-bit lanes, so the
// packer stores each pair of 32-weight vectors (a, b) as a0-7 b0-7 a8-15 b8-15 ... a24-31 b24-31.
static inline __attribute__((always_inline)) void widen_fp8(const uint8_t *p, const fp8_tables *t, __m512i *a,
                                                           __m512i *b) {
    const __m512i x = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_permutex2var_epi8(t->lo0, x, t->lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t->hi0, x, t->hi1), x,
                                                 _mm512_set1_epi8((char)0x80), 0xF8);  // hi | (x & 0x80)
    *a = _mm512_unpacklo_epi8(lo, hi);
    *b = _mm512_unpackhi_epi8(lo, hi);
}

// c[i][0..63] (row stride ldc) = a[i] (row stride lda) @ one panel, for mb <= BLOCK_ROWS rows, on
// AVX512-BF16: each K pair of 64 columns is 4 weight vectors, each row's pair one broadcast.
// `fp8`: the panel holds e4m3 bytes, widened on the fly; `accumulate`: add to c instead of
// overwriting it; with `scale`, the columns are multiplied by it at the end.
static inline __attribute__((always_inline)) void block_product(const uint16_t *a, int64_t lda, const int mb,
                                                               const void *panel, const int fp8, int64_t k_chunks,
                                                               const int accumulate, const float *scale, float *c,
                                                               int64_t ldc) {
    __m512 acc[BLOCK_ROWS][PANEL_TILES];
    for (int i = 0; i < mb; ++i)
        for (int s = 0; s < PANEL_TILES; ++s)
            acc[i][s] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * s) : _mm512_setzero_ps();
    const fp8_tables tables = fp8 ? load_fp8_tables() : (fp8_tables){0};
    for (int64_t kc = 0; kc < k_chunks; ++kc) {
        const int64_t chunk = kc * PANEL_TILES * TILE_ELEMS;
        for (int r = 0; r < 16; ++r) {
            __m512i w[PANEL_TILES];
            if (fp8) {  // fp8 panels: per K pair, 128 contiguous bytes (fp8_panels in cpu_kernels.py)
                const uint8_t *q = (const uint8_t *)panel + chunk + r * 128;
                _mm_prefetch((const char *)q + 2 * PANEL_TILES * TILE_ELEMS, _MM_HINT_T0);
                _mm_prefetch((const char *)q + 2 * PANEL_TILES * TILE_ELEMS + 64, _MM_HINT_T0);
                widen_fp8(q, &tables, &w[0], &w[1]);
                widen_fp8(q + 64, &tables, &w[2], &w[3]);
            } else {
                for (int s = 0; s < PANEL_TILES; ++s) {
                    const uint16_t *at = (const uint16_t *)panel + chunk + s * TILE_ELEMS + r * 32;
                    // One prefetch a cache line, two chunks ahead, for weights streamed from memory.
                    if (!accumulate) _mm_prefetch((const char *)(at + 2 * PANEL_TILES * TILE_ELEMS), _MM_HINT_T0);
                    w[s] = _mm512_loadu_si512(at);
                }
            }
            for (int i = 0; i < mb; ++i) {
                int32_t pair;
                memcpy(&pair, a + i * lda + kc * 32 + 2 * r, 4);
                const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                for (int s = 0; s < PANEL_TILES; ++s) acc[i][s] = _mm512_dpbf16_ps(acc[i][s], xb, (__m512bh)w[s]);
            }
        }
    }
    for (int i = 0; i < mb; ++i)
        for (int s = 0; s < PANEL_TILES; ++s) {
            const __m512 v = scale ? _mm512_mul_ps(acc[i][s], _mm512_loadu_ps(scale + 16 * s)) : acc[i][s];
            _mm512_storeu_ps(c + i * ldc + 16 * s, v);
        }
}

// block_product over `rows` rows, in register blocks of up to BLOCK_ROWS rows (FP8_DIRECT_ROWS
// when fp8 weights are widened in registers).
static inline __attribute__((always_inline)) void row_blocks(const uint16_t *a, int64_t lda, int64_t rows,
                                                            const void *panel, const int fp8, int64_t k_chunks,
                                                            const int accumulate, const float *scale, float *c,
                                                            int64_t ldc) {
    const int64_t step = fp8 ? FP8_DIRECT_ROWS : BLOCK_ROWS;
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const uint16_t *ar = a + r0 * lda;
        float *cr = c + r0 * ldc;
        switch (rows - r0 < step ? rows - r0 : step) {
#define BLOCK_CASE(n) \
    case n: block_product(ar, lda, n, panel, fp8, k_chunks, accumulate, scale, cr, ldc); break;
            BLOCK_CASE(1)
            BLOCK_CASE(2)
            BLOCK_CASE(3)
            BLOCK_CASE(4)
            BLOCK_CASE(5)
            BLOCK_CASE(6)
#undef BLOCK_CASE
        }
    }
}

// c[r][0..63] (row stride ldc floats) = a[r] (row stride lda) @ one panel of 64 output columns,
// for r < rows <= ROWS, times the 64 column `scale`s when given. The panel holds e4m3 bytes when
// `fp8`, else bf16. The AMX path reads and writes all ROWS rows: a and c must have them (the
// callers pad).
//
// NOTE: fp8 rows that fit one register block widen each weight vector on the fly, at the speed
// memory streams it. More rows would widen every weight once per block (measured slower than
// bf16 from 16 rows on), so the panel is widened WIDE_CHUNKS K chunks at a time into an L1-sized
// buffer that every row block then reads, accumulating into c.
static inline void panel_product(const uint16_t *a, int64_t lda, int64_t rows, const void *panel, int fp8,
                                 const float *scale, int64_t k_chunks, float *c, int64_t ldc) {
    if (!fp8) {
#ifdef KERNELS_AMX
        amx_panel_product(a, lda, (const uint16_t *)panel, k_chunks);
        _tile_stored(0, c, ldc * 4);
        _tile_stored(1, c + 16, ldc * 4);
        _tile_stored(2, c + 32, ldc * 4);
        _tile_stored(3, c + 48, ldc * 4);
#else
        row_blocks(a, lda, rows, panel, 0, k_chunks, 0, NULL, c, ldc);
#endif
        return;
    }
    if (rows <= FP8_DIRECT_ROWS) {
        row_blocks(a, lda, rows, panel, 1, k_chunks, 0, scale, c, ldc);
        return;
    }
    const fp8_tables tables = load_fp8_tables();
    uint16_t wide[WIDE_CHUNKS * PANEL_TILES * TILE_ELEMS] __attribute__((aligned(64)));  // 16 KiB, bf16 tiles
    for (int64_t kc0 = 0; kc0 < k_chunks; kc0 += WIDE_CHUNKS) {
        const int64_t n = k_chunks - kc0 < WIDE_CHUNKS ? k_chunks - kc0 : WIDE_CHUNKS;
        const uint8_t *src = (const uint8_t *)panel + kc0 * PANEL_TILES * TILE_ELEMS;
        for (int64_t kc = 0; kc < n; ++kc)
            for (int r = 0; r < 16; ++r) {
                const uint8_t *q = src + kc * PANEL_TILES * TILE_ELEMS + r * 128;
                // The next group's bytes arrive while this group's row blocks compute.
                _mm_prefetch((const char *)q + WIDE_CHUNKS * PANEL_TILES * TILE_ELEMS, _MM_HINT_T0);
                _mm_prefetch((const char *)q + WIDE_CHUNKS * PANEL_TILES * TILE_ELEMS + 64, _MM_HINT_T0);
                __m512i w[PANEL_TILES];
                widen_fp8(q, &tables, &w[0], &w[1]);
                widen_fp8(q + 64, &tables, &w[2], &w[3]);
                for (int s = 0; s < PANEL_TILES; ++s)
                    _mm512_storeu_si512(wide + (kc * PANEL_TILES + s) * TILE_ELEMS + r * 32, w[s]);
            }
        const float *last = kc0 + n == k_chunks ? scale : NULL;
        if (kc0 == 0)
            row_blocks(a, lda, rows, wide, 0, n, 0, last, c, ldc);
        else
            row_blocks(a + kc0 * 32, lda, rows, wide, 0, n, 1, last, c, ldc);
    }
}

// Each thread's share [begin, end) of n equal tasks.
static inline void share(int64_t n, int64_t *begin, int64_t *end) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *begin = n * t / nt;
    *end = n * (t + 1) / nt;
}

// The first (expert, panel) task, expert-major, at or after `cost` units of work, where one panel of
// expert e costs count[e] + STREAM_ROWS: its rows' products plus streaming the panel in.
static int64_t task_at(int64_t cost, const int64_t *active, int64_t n_active, const int64_t *count, int64_t panels) {
    int64_t acc = 0;
    for (int64_t i = 0; i < n_active; ++i) {
        const int64_t c = count[active[i]] + STREAM_ROWS;
        if (cost < acc + panels * c) return i * panels + (cost - acc + c / 2) / c;
        acc += panels * c;
    }
    return n_active * panels;
}

// One thread's planned share of a phase's tasks, alone on its cache line: tasks [next, end) are
// claimed one at a time, by their owner first.
typedef struct {
    int64_t next, end;
    char pad[48];
} Share;

// Plans nt threads' shares of the (expert, panel) tasks, balanced by cost. NOTE: not an equal count
// of tasks: routing is uneven, and a thread holding the busiest expert's panels would leave the
// others waiting. Tasks stay in weight order, so each thread streams contiguous memory.
static void plan_tasks(const int64_t *active, int64_t n_active, const int64_t *count, int64_t panels, int64_t nt,
                       Share *shares) {
    int64_t total = 0;
    for (int64_t i = 0; i < n_active; ++i) total += panels * (count[active[i]] + STREAM_ROWS);
    for (int64_t t = 0; t < nt; ++t) {
        shares[t].next = task_at(total * t / nt, active, n_active, count, panels);
        shares[t].end = task_at(total * (t + 1) / nt, active, n_active, count, panels);
    }
}

// Plans nt threads' equal shares of n tasks.
static void plan_equal(int64_t n, int64_t nt, Share *shares) {
    for (int64_t t = 0; t < nt; ++t) {
        shares[t].next = n * t / nt;
        shares[t].end = n * (t + 1) / nt;
    }
}

// The next task of the calling thread's share, else of the first other share with tasks left; -1
// when none is. NOTE: a static split makes every thread wait at the phase's end for one the OS took
// off its core (on a host whose cores also run the serving processes, a wake-up of a few ms each
// step); claiming lets the others finish its tasks. The owner still takes its own in order, so the
// weight streams stay contiguous while no thread falls behind.
static int64_t claim(Share *shares, int64_t nt) {
    const int64_t t = omp_get_thread_num();
    for (int64_t i = 0; i < nt; ++i) {
        Share *s = &shares[(t + i) % nt];
        int64_t task;
#pragma omp atomic capture
        task = s->next++;
        if (task < s->end) return task;
    }
    return -1;
}

// out [T, D] bf16 = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), on num_threads threads.
// Weights are bf16, or e4m3 bytes when their scales are given (w13_scale [E, I/32, 64] in panel
// order, w2_scale [E, D]). Scratch, sized by the caller for R = T * k + E * 15 rows: xs [R, D]
// bf16, act [R, I] bf16, y [R, D] fp32, slot_of [T * k] int32. `delta13` (NULL: none), fp32
// [T * k, 2I] in (token, choice) order, is added to the first matmul before the activation (LoRA
// on w1 and w3: the gate rows, then the up rows); act and slot_of are left for the caller.
void moe_forward(const uint16_t *x, const int64_t *ids, const float *weights, int64_t T, int64_t k, int64_t E,
                 int64_t D, int64_t I, int64_t num_threads, const void *w13, const void *w2, const float *w13_scale,
                 const float *w2_scale, const float *delta13, uint16_t *out, uint16_t *xs, uint16_t *act, float *y,
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
    int32_t *pair_of = NULL;  // the (token, choice) pair of each row, where delta13 is read
    if (delta13) {
        pair_of = malloc(start[E] * sizeof *pair_of);
        for (int64_t i = 0; i < T * k; ++i) pair_of[slot_of[i]] = (int32_t)i;
    }
    // Tasks: (expert, panel) pairs over active experts, in weight order, shared by cost.
    int64_t active[E], n_active = 0;
    for (int64_t e = 0; e < E; ++e)
        if (count[e]) active[n_active++] = e;
    const int64_t p13 = I / 32, kc13 = D / 32, p2 = D / 64, kc2 = I / 32;
    const int64_t elem = w13_scale ? 1 : 2;  // bytes a weight
    const int64_t panel13 = kc13 * PANEL_TILES * TILE_ELEMS * elem, panel2 = kc2 * PANEL_TILES * TILE_ELEMS * elem;

    const int fp8 = w13_scale != NULL;
    Share shares13[num_threads], shares2[num_threads];  // planned for the team asked for; a smaller one claims the rest
    plan_tasks(active, n_active, count, p13, num_threads, shares13);
    plan_tasks(active, n_active, count, p2, num_threads, shares2);

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
        for (int64_t task; (task = claim(shares13, num_threads)) >= 0;) {
            const int64_t e = active[task / p13], p = task % p13;
            const float *scale = fp8 ? w13_scale + (e * p13 + p) * 64 : NULL;
            const uint8_t *panel = (const uint8_t *)w13 + (e * p13 + p) * panel13;
            for (int64_t r0 = start[e]; r0 < start[e] + count[e]; r0 += ROWS) {
                const int64_t rows = start[e] + count[e] - r0 < ROWS ? start[e] + count[e] - r0 : ROWS;
                panel_product(xs + r0 * D, D, rows, panel, fp8, scale, kc13, &c[0][0], 64);
                for (int64_t r = 0; r < ROWS; ++r) {
                    uint16_t *dst = act + (r0 + r) * I + p * 32;
                    if (r >= rows) {  // padding rows: zeros for the second matmul
                        memset(dst, 0, 64);
                        continue;
                    }
                    if (delta13) {
                        const float *d = delta13 + (int64_t)pair_of[r0 + r] * 2 * I + p * 32;
#pragma omp simd
                        for (int j = 0; j < 32; ++j) {
                            c[r][j] += d[j];
                            c[r][32 + j] += d[I + j];
                        }
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
        for (int64_t task; (task = claim(shares2, num_threads)) >= 0;) {
            const int64_t e = active[task / p2], p = task % p2;
            const float *scale = fp8 ? w2_scale + e * D + p * 64 : NULL;
            const uint8_t *panel = (const uint8_t *)w2 + (e * p2 + p) * panel2;
            for (int64_t r0 = start[e]; r0 < start[e] + count[e]; r0 += ROWS) {
                const int64_t rows = start[e] + count[e] - r0 < ROWS ? start[e] + count[e] - r0 : ROWS;
                panel_product(act + r0 * I, I, rows, panel, fp8, scale, kc2, y + r0 * D + p * 64, D);
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
        release_tiles();
    }
    free(pair_of);
}

// out [T, N] (bf16, or fp32 when out_fp32) = x [T, K] @ W^T for W packed in panels of 64 output
// columns: bf16, or e4m3 bytes with `scale` [N] (one per output column). Scratch
// xs [ceil(T / 16) * 16, K] bf16 holds x padded to whole tiles.
void linear(const uint16_t *x, int64_t T, int64_t K, int64_t N, int64_t num_threads, const void *w,
            const float *scale, void *out, int64_t out_fp32, uint16_t *xs) {
    const int64_t padded = (T + ROWS - 1) / ROWS * ROWS, k_chunks = K / 32;
    const int fp8 = scale != NULL;
    const int64_t panel = k_chunks * PANEL_TILES * TILE_ELEMS * (fp8 ? 1 : 2);  // bytes
    Share shares[num_threads];
    plan_equal(N / 64, num_threads, shares);
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
        for (int64_t p; (p = claim(shares, num_threads)) >= 0;) {
            const uint8_t *wp = (const uint8_t *)w + p * panel;
            for (int64_t r0 = 0; r0 < T; r0 += ROWS) {
                const int64_t rows = T - r0 < ROWS ? T - r0 : ROWS;
                panel_product(xs + r0 * K, K, rows, wp, fp8, fp8 ? scale + p * 64 : NULL, k_chunks, &c[0][0], 64);
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
        release_tiles();
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

static inline __m512 load_bf16x16(const uint16_t *p) {  // 16 bf16 -> fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define ATTN_CHUNK 32  // positions whose V rows stay in L1 while the G heads take turns over them
#define ATTN_PREFETCH 8  // K rows fetched this many positions ahead

// One (sequence, KV head) task of decode_attention. Always inlined with nv a literal for the
// common head dims, so the K row, a head's query and its accumulator live in registers.
// NOTE: the V pass runs head by head over chunks of ATTN_CHUNK positions (re-reading each V row
// from L1 G times) instead of row by row over all G heads: the latter keeps G * nv accumulators,
// more than the 32 registers, and spent most of its time storing them back to the stack.
static inline __attribute__((always_inline)) void attend(
    const int64_t nv, const int64_t G, const uint16_t *q, const uint16_t *k_base, const uint16_t *v_base,
    const int64_t *slots, const int64_t row_stride, const int64_t lo, const int64_t hi, const float scale,
    float *s, const int64_t L, uint16_t *out) {
    __m512 qf[ATTN_MAX_GROUP * ATTN_MAX_HD / 16];
    float mx[ATTN_MAX_GROUP], inv[ATTN_MAX_GROUP];
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t v = 0; v < nv; ++v) qf[g * nv + v] = _mm512_mul_ps(load_bf16x16(q + g * nv * 16 + 16 * v), _mm512_set1_ps(scale));
        mx[g] = -FLT_MAX;  // not -inf: -ffast-math assumes finite values
    }
    for (int64_t j = lo; j < hi; ++j) {  // scores: each K row read once for the G heads
        const uint16_t *kr = k_base + slots[j] * row_stride, *vr = v_base + slots[j] * row_stride;
        // Rows sit a KV-head stride apart in blocks scattered over the pool, which the hardware
        // prefetcher does not follow: fetch K a few rows ahead, and this V row for the V pass.
        const uint16_t *kn = k_base + slots[j + ATTN_PREFETCH < hi ? j + ATTN_PREFETCH : j] * row_stride;
        for (int64_t line = 0; line < nv * 32; line += 64) {
            _mm_prefetch((const char *)kn + line, _MM_HINT_T0);
            _mm_prefetch((const char *)vr + line, _MM_HINT_T1);
        }
        __m512 kf[ATTN_MAX_HD / 16];
        for (int64_t v = 0; v < nv; ++v) kf[v] = load_bf16x16(kr + 16 * v);
        for (int64_t g = 0; g < G; ++g) {
            __m512 dot = _mm512_mul_ps(qf[g * nv], kf[0]);
            for (int64_t v = 1; v < nv; ++v) dot = _mm512_fmadd_ps(qf[g * nv + v], kf[v], dot);
            const float d = _mm512_reduce_add_ps(dot);
            s[g * L + j] = d;
            mx[g] = d > mx[g] ? d : mx[g];
        }
    }
    for (int64_t g = 0; g < G; ++g) {  // exp over the row, vectorised (libmvec)
        float *sg = s + g * L, m = mx[g], sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = lo; j < hi; ++j) {
            sg[j] = expf(sg[j] - m);
            sum += sg[j];
        }
        inv[g] = 1.0f / sum;
    }
    __m512 *acc = qf;  // the queries are spent: their array holds the accumulators from here
    for (int64_t i = 0; i < G * nv; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t j0 = lo; j0 < hi; j0 += ATTN_CHUNK) {
        const int64_t j1 = j0 + ATTN_CHUNK < hi ? j0 + ATTN_CHUNK : hi;
        for (int64_t g = 0; g < G; ++g) {
            const float *sg = s + g * L;
            __m512 a[ATTN_MAX_HD / 16];
            for (int64_t v = 0; v < nv; ++v) a[v] = acc[g * nv + v];
            for (int64_t j = j0; j < j1; ++j) {
                const uint16_t *vr = v_base + slots[j] * row_stride;
                const __m512 p = _mm512_set1_ps(sg[j]);
                for (int64_t v = 0; v < nv; ++v) a[v] = _mm512_fmadd_ps(p, load_bf16x16(vr + 16 * v), a[v]);
            }
            for (int64_t v = 0; v < nv; ++v) acc[g * nv + v] = a[v];
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        uint16_t *o = out + g * nv * 16;
        for (int64_t v = 0; v < nv; ++v) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[g * nv + v], _mm512_set1_ps(inv[g])));
            for (int i = 0; i < 16; ++i) o[16 * v + i] = to_bf16(tmp[i]);
        }
    }
}

// out [B, H, hd] = softmax(q k^T / sqrt(hd)) v for one query token per sequence: row b attends to
// positions [first[b], last[b]] of its context, whose cache slots are slots[b, :] (K/V caches
// [S, KVH, hd]). The G = H / KVH query heads sharing a KV head are done together, so each K/V row
// is read from memory once. hd % 16 == 0, hd <= ATTN_MAX_HD, G <= ATTN_MAX_GROUP (the caller checks).
// Scratch: scores [num_threads, G, L] fp32.
void decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                      const int64_t *first, const int64_t *last, int64_t B, int64_t H, int64_t KVH, int64_t hd,
                      int64_t L, int64_t num_threads, float *scores, uint16_t *out) {
    const int64_t G = H / KVH, nv = hd / 16;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for num_threads(B * KVH < num_threads ? B * KVH : num_threads) schedule(static)
    for (int64_t task = 0; task < B * KVH; ++task) {
        const int64_t b = task / KVH, kvh = task % KVH, lo = first[b], hi = last[b] + 1;
        float *s = scores + (int64_t)omp_get_thread_num() * G * L;
        const uint16_t *qb = q + (b * H + kvh * G) * hd, *kb = k_cache + kvh * hd, *vb = v_cache + kvh * hd;
        const int64_t *sb = slots + b * L;
        uint16_t *ob = out + (b * H + kvh * G) * hd;
        switch (nv) {  // literal head dims: the compiler unrolls over them (see attend)
            case 4: attend(4, G, qb, kb, vb, sb, KVH * hd, lo, hi, scale, s, L, ob); break;
            case 8: attend(8, G, qb, kb, vb, sb, KVH * hd, lo, hi, scale, s, L, ob); break;
            default: attend(nv, G, qb, kb, vb, sb, KVH * hd, lo, hi, scale, s, L, ob);
        }
    }
}

// In place on qkv [T, H + 2 KVH, hd] bf16: rotates each token's H query and KVH key heads
// (half-split rotary, cos/sin [T, hd] bf16 whose two halves are equal), then copies its key and
// value heads into k_cache / v_cache [S, KVH, hd] at slots[t]. fp32 inside, one rounding.
void rope_and_cache(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots, int64_t T,
                    int64_t H, int64_t KVH, int64_t hd, int64_t num_threads, uint16_t *k_cache, uint16_t *v_cache) {
    const int64_t half = hd / 2, heads = H + 2 * KVH;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t *c = cos + t * hd, *s = sin + t * hd;
        uint16_t *row = qkv + t * heads * hd;
        for (int64_t h = 0; h < H + KVH; ++h) {
            uint16_t *x = row + h * hd;
#pragma omp simd
            for (int64_t d = 0; d < half; ++d) {
                const float x1 = bf16_to_float(x[d]), x2 = bf16_to_float(x[half + d]);
                const float cd = bf16_to_float(c[d]), sd = bf16_to_float(s[d]);
                x[d] = to_bf16(x1 * cd - x2 * sd);
                x[half + d] = to_bf16(x2 * cd + x1 * sd);
            }
        }
        memcpy(k_cache + slots[t] * KVH * hd, row + H * hd, KVH * hd * 2);
        memcpy(v_cache + slots[t] * KVH * hd, row + (H + KVH) * hd, KVH * hd * 2);
    }
}

// Mixtral's routing of x [T, D] bf16 by the router gate [E, D] fp32: softmax over the E logits,
// the k most likely experts (ties: the lower index), their probabilities renormalised to sum 1.
// ids [T, k] int64, weights [T, k] fp32.
void route(const uint16_t *x, const float *gate, int64_t T, int64_t D, int64_t E, int64_t k, int64_t num_threads,
           int64_t *ids, float *weights) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t *xt = x + t * D;
        float p[E], mx = -FLT_MAX, total = 0.0f;
        for (int64_t e = 0; e < E; ++e) {
            const float *g = gate + e * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += bf16_to_float(xt[d]) * g[d];
            p[e] = dot;
            mx = dot > mx ? dot : mx;
        }
        for (int64_t e = 0; e < E; ++e) {
            p[e] = expf(p[e] - mx);
            total += p[e];
        }
        float kept = 0.0f;
        bool taken[E];
        for (int64_t e = 0; e < E; ++e) taken[e] = false;
        for (int64_t j = 0; j < k; ++j) {  // selection: k is 1 to a few
            // NOTE: `best` starts at the first expert not taken, never at a sentinel: NaN logits
            // (a corrupt checkpoint) lose every comparison, and an id out of range would send the
            // expert kernel outside its weights; they yield valid ids and NaN weights instead.
            int64_t best = 0;
            while (taken[best]) ++best;
            for (int64_t e = best + 1; e < E; ++e)
                if (!taken[e] && p[e] > p[best]) best = e;
            taken[best] = true;
            ids[t * k + j] = best;
            weights[t * k + j] = p[best] / total;
            kept += p[best] / total;
        }
        for (int64_t j = 0; j < k; ++j) weights[t * k + j] /= kept;
    }
}

// LoRA of a batch of rows, each with its own adapter group: for row t with g = index[t] >= 0,
// h = A[g] x[t] (A [G, nR, K]), then for module j, the columns [c_j, c_j + size_j) of out take
// out[t, c] += sum_r h[jR + r] * BT[g, r, c] (BT [G, R, N], B transposed so these rows are contiguous).
// Weights and x bf16, sums fp32; out [T, N] bf16, or fp32 when out_fp32. Rows of group -1 are
// left as they are. Scratch h [T, nR] fp32.
void lora_add(const uint16_t *x, int64_t T, int64_t K, const int64_t *index, const uint16_t *a, int64_t nR,
              const uint16_t *bt, int64_t R, int64_t N, const int64_t *splits, int64_t n_splits, void *out,
              int64_t out_fp32, int64_t num_threads, float *h) {
#pragma omp parallel num_threads(num_threads)
    {
        int64_t b, e_;
        share(T * nR, &b, &e_);  // shrink: one (row, A row) dot product per task
        for (int64_t task = b; task < e_; ++task) {
            const int64_t t = task / nR, i = task % nR, g = index[t];
            if (g < 0) continue;
            const uint16_t *ar = a + (g * nR + i) * K, *xr = x + t * K;
            __m512 acc = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(load_bf16x16(ar + k), load_bf16x16(xr + k), acc);
            float sum = _mm512_reduce_add_ps(acc);
            for (; k < K; ++k) sum += bf16_to_float(ar[k]) * bf16_to_float(xr[k]);
            h[t * nR + i] = sum;
        }
#pragma omp barrier
        const int64_t blocks = (N + 63) / 64;
        share(T * blocks, &b, &e_);  // expand: 64 output columns of one row per task
        for (int64_t task = b; task < e_; ++task) {
            const int64_t t = task / blocks, c0 = task % blocks * 64, g = index[t];
            if (g < 0) continue;
            int64_t start = 0;
            for (int64_t j = 0; j < n_splits; start += splits[j++]) {
                const int64_t lo = c0 > start ? c0 : start, end = start + splits[j];
                const int64_t hi = c0 + 64 < end ? c0 + 64 : end;
                const float *hj = h + t * nR + j * R;
                for (int64_t c = lo; c < hi; c += 16) {
                    const __mmask16 m = hi - c >= 16 ? 0xFFFF : (__mmask16)((1u << (hi - c)) - 1);
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t r = 0; r < R; ++r) {
                        const __m256i raw = _mm256_maskz_loadu_epi16(m, bt + (g * R + r) * N + c);
                        const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(hj[r]), w, acc);
                    }
                    if (out_fp32) {
                        float *dst = (float *)out + t * N + c;
                        _mm512_mask_storeu_ps(dst, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), acc));
                    } else {
                        float sums[16];
                        _mm512_storeu_ps(sums, acc);
                        uint16_t *dst = (uint16_t *)out + t * N + c;
                        for (int64_t q = 0; q < hi - c && q < 16; ++q) dst[q] = to_bf16(bf16_to_float(dst[q]) + sums[q]);
                    }
                }
            }
        }
    }
}
