// qmatmul.cpp: y = x W^T + b with W kept as llama.cpp's quantized blocks, for bf16 rows on the CPU.
// Compiled at first use by linears.py (torch.utils.cpp_extension.load, -march=native).
//
// The blocks (QLinear has the format): for output n and input k in group g = k / Gs,
//     W[n, k] = s[n, g] q[n, k] - m[n, g],   s = d[n, k / Gd] * scales[n, g],  m = dmin[n, k / Gd] * mins[n, g]
// q is 4-bit unsigned (Q4_K, Q4_1) or 8-bit signed (Q6_K, Q5_0, Q8_0), d and dmin float16, scales
// and mins 8-bit, so s and m are exact in float32. Each group's sum is taken on the integers and
// scaled once, as llama.cpp does:
//     y[r, n] = sum_g ( s[n, g] * sum_{k in g} q[n, k] x[r, k]  -  m[n, g] * sum_{k in g} x[r, k] )
//
// Three paths, chosen when compiled (`activations` says which numerics ran):
//  - AVX512-BF16 ("bf16"): q and x are exact in bf16, so VDPBF16PS (x0 q0 + x1 q1 added to a
//    float32 sum) needs no dequantised weights: the exact GGUF weights times the exact bf16 x.
//  - AVX2 ("int8", every x86-64 CPU of the last decade): x is quantized per row and per QGROUP
//    inputs as llama.cpp quantizes activations (its Q8_0): dx = max|x| / 127, xq = round(x / dx),
//    so y = (dx xq) W^T. VPMADDUBSW multiplies 32 unsigned bytes (4-bit q, or |q| with x's sign
//    flipped by q's) by 32 signed ones and adds pairs into 16-bit sums: 32 multiply-adds an
//    instruction, exact in integers, against 8 for a float32 FMA. m's term takes dx sum xq.
//  - plain C++ ("bf16"), for any other CPU, the same sums as the AVX512 path.
//
// Layout, made once at load (linears.py's `tile`): outputs go in tiles of 16, and a record holds
// `record_inputs` n side-by-side inputs of each (2 for the bf16 paths, whose VDPBF16PS takes a
// pair; 4 for int8, whose VPMADDWD adds two pairs). For tile t and inputs nr .. nr + n - 1 the 16 n
// values q form one record of 8n bytes (4-bit) or 16n (8-bit): value n i + j < 8 n is output i,
// input nr + j; value 8 n + n i + j the same for output 8 + i (4-bit: value v < 8 n in byte v's
// low nibble, value 8 n + v in its high nibble). So an output's n inputs sit side by side, which
// is what the multiply-add instructions take.
// scales, mins, d and dmin are stored (tiles, groups, 16): one vector a group.
//
// Each record is widened once per call and used by up to MAX_ROWS rows held in registers, so a
// call of several rows reads the weights once, like a call of 1.
// Batch invariance: a row's sums run over k in one order with the same instructions whatever the
// number of rows (integer sums are exact in any order; x is quantized row by row), so its result
// does not depend on the rows beside it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__) && !defined(QMATMUL_PORTABLE) && !defined(QMATMUL_AVX2)
#include <immintrin.h>
#define QMATMUL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(QMATMUL_PORTABLE)
#include <immintrin.h>
#define QMATMUL_INT8 1
#endif

namespace {

constexpr int TILE = 16, QGROUP = 32;     // QGROUP: inputs an int8 activation scale covers (llama.cpp's Q8_0)

struct Blocks {
    const uint8_t* q;          // records, tile after tile
    const uint8_t* scales;     // (tiles, K / Gs, TILE), uint8 (4-bit) or int8 (8-bit)
    const uint8_t* mins;       // same, uint8, 4-bit only
    const at::Half* d;         // (tiles, K / Gd, TILE)
    const at::Half* dmin;      // same, 4-bit only
    int64_t K, Gs, Gd;
    bool narrow;               // 8-bit q all in [-32, 31] (Q6_K, Q5_0)
};

struct Rows {                  // the inputs of a call's rows, from its first: row m at m * K
    const uint16_t* x;         // bf16
    const int8_t* xq;          // int8 path: round(x / dx)
    const float* dx;           // int8 path: (rows, K / QGROUP)
    const float* xsum;         // (rows, K / Gs): each row's sum over each group (4-bit only)
};

inline float bf16_float(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_bf16(float f) {                 // round to nearest even, as VCVTNEPS2BF16 does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#if defined(QMATMUL_AVX512)
constexpr int MAX_ROWS = 8;
constexpr int tiles_at_once(int rows, bool) { return rows <= 2 ? 8 : rows <= 4 ? 4 : 2; }   // 10-16 sums in flight

inline __m512 ps16(const uint8_t* p, bool sign) {             // 16 bytes -> 16 float32
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(sign ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
}

inline __m512 ph16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __m512i bf16_table(int lo) {                           // word j: bf16(lo + j), j < 32
    alignas(64) uint16_t t[32];
    for (int j = 0; j < 32; j++) t[j] = float_bf16(float(lo + j));
    return _mm512_load_si512(t);
}

// M rows of x (bf16) times tiles t .. t + T - 1, into y (row stride ldy).
// T tiles at once: a VDPBF16PS waits for the one before on its sum, so 10-16 sums are kept in
// flight (tiles_at_once). A sum's arithmetic is the same for any M and T.
template <int M, int T, bool FOUR>
void tile_rows(const Blocks& b, int64_t t, const Rows& in, uint16_t* y, int64_t ldy, const float* bias) {
    __m512 part[T][M];                         // the group's sums, in registers
    alignas(64) float acc[T][M][TILE] = {};    // the row's sums, touched once a group: they may live in L1
    const __m512i lo = bf16_table(0), hi = bf16_table(-32);
    const __m512i four = _mm512_inserti64x4(lo, _mm512_castsi512_si256(lo), 1);   // 0..15 twice: q + 16 reads q
    const int64_t groups = b.K / b.Gs, pairs = b.Gs / 2, per_d = b.Gd / b.Gs, record = FOUR ? 16 : 32;
    const int64_t stride = (b.K / 2) * record;                                                // bytes of one tile
    const uint8_t* q = b.q + t * stride;
    for (int64_t g = 0; g < groups; g++) {
        #pragma GCC unroll 8
        for (int u = 0; u < T; u++)
            for (int m = 0; m < M; m++) part[u][m] = _mm512_setzero_ps();
        for (int64_t p = g * pairs; p < (g + 1) * pairs; p++, q += record) {
            __m512i pair[M];
            #pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                int32_t v;
                std::memcpy(&v, in.x + m * b.K + 2 * p, 4);
                pair[m] = _mm512_set1_epi32(v);
            }
            #pragma GCC unroll 8
            for (int u = 0; u < T; u++) {
                __m512i w;                                           // 32 bf16 q, lane i: output i's pair
                if (FOUR) {
                    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + u * stride)));
                    w = _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), four);
                } else if (b.narrow) {                               // low 6 bits of q: 0..31 -> lo, -32..-1 -> hi
                    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + u * stride)));
                    w = _mm512_permutex2var_epi16(lo, v, hi);
                } else {
                    w = (__m512i)_mm512_cvtne2ps_pbh(ps16(q + u * stride + 16, true), ps16(q + u * stride, true));
                }
                #pragma GCC unroll 8
                for (int m = 0; m < M; m++) part[u][m] = _mm512_dpbf16_ps(part[u][m], (__m512bh)w, (__m512bh)pair[m]);
            }
        }
        #pragma GCC unroll 8
        for (int u = 0; u < T; u++) {                                // acc += s * part - m * sum of x
            const int64_t gs = ((t + u) * groups + g) * TILE, gd = ((t + u) * (b.K / b.Gd) + g / per_d) * TILE;
            const __m512 s = _mm512_mul_ps(ph16(b.d + gd), ps16(b.scales + gs, !FOUR));
            const __m512 mn = FOUR ? _mm512_mul_ps(ph16(b.dmin + gd), ps16(b.mins + gs, false)) : s;
            #pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 a = _mm512_fmadd_ps(s, part[u][m], _mm512_load_ps(acc[u][m]));
                if (FOUR) a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(in.xsum[m * groups + g]), a);
                _mm512_store_ps(acc[u][m], a);
            }
        }
    }
    for (int u = 0; u < T; u++) {
        const __m512 b16 = bias ? _mm512_loadu_ps(bias + (t + u) * TILE) : _mm512_setzero_ps();
        for (int m = 0; m < M; m++)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy + (t + u) * TILE),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc[u][m]), b16)));
    }
}
#elif defined(QMATMUL_INT8)
constexpr int MAX_ROWS = 4;                    // rows held in registers (AVX2 has 16 of them)
constexpr int tiles_at_once(int rows, bool four) { return rows == 1 ? (four ? 4 : 2) : rows == 2 ? 2 : 1; }

inline __m256 ps8(const uint8_t* p, bool sign) {              // 8 bytes -> 8 float32
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(sign ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

inline __m256 ph8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

using i16 = int16_t __attribute__((vector_size(32)));       // 16 lanes of 16 bits

inline __m256i by_lane(const uint8_t* p, bool sign) {      // 8 bytes -> 16-bit lanes 2i, 2i + 1 = p[i]
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m256i w = sign ? _mm256_and_si256(_mm256_cvtepi8_epi32(v), _mm256_set1_epi32(0xffff)) : _mm256_cvtepu8_epi32(v);
    return _mm256_or_si256(w, _mm256_slli_epi32(w, 16));
}

// M rows of xq times tiles t .. t + T - 1, into y (row stride ldy). A record is a quad of inputs
// (4r .. 4r + 3) of the tile's 16 outputs, byte 4i + j output i's input 4r + j (4-bit: 32 bytes,
// outputs 8-15 in the high nibbles; 8-bit: 64 bytes, outputs 0-7 then 8-15). So a row's quad,
// broadcast to every 32-bit lane, meets an output's 4 weights in one lane: VPMADDUBSW gives
// 16-bit lanes q0 x0 + q1 x1 and q2 x2 + q3 x3 (8-bit: |q| times x with q's sign). Those are
// added in 16 bits while they cannot overflow (|q x| <= 15 * 127: a group of 32; |q| <= 32: 4
// quads; else 1), then VPMADDWD times the group's scales adds a lane pair into an output's
// 32-bit sum, sc sum q x, exact; it is scaled by d dx in float32 once a group.
template <int M, int T, bool FOUR>
void tile_rows(const Blocks& b, int64_t t, const Rows& in, uint16_t* y, int64_t ldy, const float* bias) {
    alignas(32) float acc[T][M][TILE] = {};    // the row's sums, touched once a group
    const int64_t groups = b.K / b.Gs, quads = b.Gs / 4;
    const int d_shift = __builtin_ctzll(b.Gd / b.Gs), x_shift = __builtin_ctzll(QGROUP / b.Gs);   // g >> d_shift: g's d
    const int64_t record = FOUR ? 32 : 64, stride = (b.K / 4) * record;
    const int64_t chunk = std::min<int64_t>(quads, FOUR ? 8 : b.narrow ? 4 : 1);   // quads summed in 16 bits
    const __m256i nibble = _mm256_set1_epi8(15);
    const uint8_t* q = b.q + t * stride;
    for (int64_t g = 0; g < groups; g++) {
        __m256i sum[T][M][2];                                        // 32-bit: outputs 0-7, 8-15
        #pragma GCC unroll 4
        for (int u = 0; u < T; u++)
            for (int m = 0; m < M; m++) sum[u][m][0] = sum[u][m][1] = _mm256_setzero_si256();
        for (int64_t r = g * quads; r < (g + 1) * quads;) {
            i16 part[T][M][2] = {};                                  // (+=: GCC keeps each sum in one register)
            for (int64_t c = 0; c < chunk; c++, r++, q += record) {
                #pragma GCC unroll 4
                for (int u = 0; u < T; u++) {
                    const uint8_t* w = q + u * stride;
                    __m256i v[2];                                    // outputs 0-7, 8-15
                    if (FOUR) {
                        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
                        v[0] = _mm256_and_si256(a, nibble);
                        v[1] = _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble);
                    } else {
                        v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
                        v[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
                    }
                    #pragma GCC unroll 4
                    for (int m = 0; m < M; m++) {
                        int32_t quad;
                        std::memcpy(&quad, in.xq + m * b.K + 4 * r, 4);
                        const __m256i xs = _mm256_set1_epi32(quad);
                        for (int h = 0; h < 2; h++)
                            part[u][m][h] += (i16)(FOUR ? _mm256_maddubs_epi16(v[h], xs)
                                : _mm256_maddubs_epi16(_mm256_abs_epi8(v[h]), _mm256_sign_epi8(xs, v[h])));
                    }
                }
            }
            #pragma GCC unroll 4
            for (int u = 0; u < T; u++)
                for (int h = 0; h < 2; h++) {
                    const __m256i sc = by_lane(b.scales + ((t + u) * groups + g) * TILE + 8 * h, !FOUR);
                    for (int m = 0; m < M; m++)
                        sum[u][m][h] = _mm256_add_epi32(sum[u][m][h], _mm256_madd_epi16((__m256i)part[u][m][h], sc));
                }
        }
        #pragma GCC unroll 4
        for (int u = 0; u < T; u++) {                                 // acc += d dx sum - m dx sum xq
            const int64_t gs = ((t + u) * groups + g) * TILE, gd = ((t + u) * (b.K / b.Gd) + (g >> d_shift)) * TILE;
            for (int h = 0; h < 2; h++) {
                const __m256 d = ph8(b.d + gd + 8 * h);
                const __m256 mn = FOUR ? _mm256_mul_ps(ph8(b.dmin + gd + 8 * h), ps8(b.mins + gs + 8 * h, false)) : d;
                #pragma GCC unroll 4
                for (int m = 0; m < M; m++) {
                    const __m256 dx = _mm256_mul_ps(d, _mm256_set1_ps(in.dx[m * (b.K / QGROUP) + (g >> x_shift)]));
                    __m256 a = _mm256_fmadd_ps(dx, _mm256_cvtepi32_ps(sum[u][m][h]), _mm256_load_ps(acc[u][m] + 8 * h));
                    if (FOUR) a = _mm256_fnmadd_ps(mn, _mm256_set1_ps(in.xsum[m * groups + g]), a);
                    _mm256_store_ps(acc[u][m] + 8 * h, a);
                }
            }
        }
    }
    for (int u = 0; u < T; u++)
        for (int m = 0; m < M; m++)
            for (int i = 0; i < TILE; i++)
                y[m * ldy + (t + u) * TILE + i] = float_bf16(acc[u][m][i] + (bias ? bias[(t + u) * TILE + i] : 0.f));
}
#else
// The same sums as the AVX512 path in plain C++, for CPUs without AVX512-BF16 or AVX2 (and to check this file on them).
constexpr int MAX_ROWS = 8;
constexpr int tiles_at_once(int, bool) { return 1; }

template <int M, int T, bool FOUR>
void tile_rows(const Blocks& b, int64_t t0, const Rows& in, uint16_t* y, int64_t ldy, const float* bias) {
    const int64_t groups = b.K / b.Gs, pairs = b.Gs / 2, per_d = b.Gd / b.Gs, record = FOUR ? 16 : 32;
    for (int64_t t = t0; t < t0 + T; t++) {
        float acc[M][TILE] = {};
        const uint8_t* q = b.q + t * (b.K / 2) * record;
        for (int64_t g = 0; g < groups; g++) {
            float part[M][TILE] = {};
            for (int64_t p = g * pairs; p < (g + 1) * pairs; p++, q += record) {
                float w[TILE][2];
                for (int j = 0; j < 2 * TILE; j++)
                    w[(j % TILE) / 2 + (j < TILE ? 0 : TILE / 2)][j % 2] =
                        FOUR ? float((q[j % TILE] >> (j < TILE ? 0 : 4)) & 15) : float(int8_t(q[j]));
                for (int m = 0; m < M; m++) {
                    const float x0 = bf16_float(in.x[m * b.K + 2 * p]), x1 = bf16_float(in.x[m * b.K + 2 * p + 1]);
                    for (int i = 0; i < TILE; i++) part[m][i] += w[i][0] * x0 + w[i][1] * x1;
                }
            }
            const int64_t gs = (t * groups + g) * TILE, gd = (t * (b.K / b.Gd) + g / per_d) * TILE;
            for (int i = 0; i < TILE; i++) {
                const float s = float(b.d[gd + i]) * float(FOUR ? b.scales[gs + i] : int8_t(b.scales[gs + i]));
                const float mn = FOUR ? float(b.dmin[gd + i]) * float(b.mins[gs + i]) : 0.f;
                for (int m = 0; m < M; m++) acc[m][i] += s * part[m][i] - (FOUR ? mn * in.xsum[m * groups + g] : 0.f);
            }
        }
        for (int m = 0; m < M; m++)
            for (int i = 0; i < TILE; i++)
                y[m * ldy + t * TILE + i] = float_bf16(acc[m][i] + (bias ? bias[t * TILE + i] : 0.f));
    }
}
#endif

#ifdef QMATMUL_INT8
constexpr bool INT8 = true;
#else
constexpr bool INT8 = false;
#endif

using TileFn = void (*)(const Blocks&, int64_t, const Rows&, uint16_t*, int64_t, const float*);

constexpr int BLOCK = 8;                               // tiles whose weights stay in cache across a long x

template <bool FOUR, bool ONE, int... M>               // [M - 1]: M rows, tiles_at_once(M) tiles (ONE: 1)
constexpr std::array<TileFn, sizeof...(M)> table(std::integer_sequence<int, M...>) {
    return {tile_rows<M + 1, ONE ? 1 : tiles_at_once(M + 1, FOUR), FOUR>...};
}

struct Prepared {               // a call's rows as its path reads them (kept per thread: no allocation a call)
    std::vector<int8_t> xq;     // int8 path: round(x / dx)
    std::vector<float> dx;      // int8 path: (rows, K / QGROUP)
    std::vector<float> xsum;    // (rows, K / Gs), 4-bit only
};

// Each row's inputs as the path reads them: int8 (xq, dx: per QGROUP inputs) where it runs, and
// each row's sum over each weight group (4-bit only: m's term), all row by row.
void prepare_rows(const uint16_t* x, int64_t rows, int64_t K, int64_t Gs, bool four, Prepared& out) {
    out.xq.resize(INT8 ? rows * K : 0);
    out.dx.resize(INT8 ? rows * (K / QGROUP) : 0);
    out.xsum.assign(four ? rows * (K / Gs) : 0, 0.f);
    int8_t* q = out.xq.data();
    float *d = out.dx.data(), *s = out.xsum.data();
    for (int64_t r = 0; r < rows; r++) {
        if (INT8)
            for (int64_t a = 0; a < K / QGROUP; a++) {
                const uint16_t* v = x + r * K + a * QGROUP;
                float amax = 0.f;
                for (int k = 0; k < QGROUP; k++) amax = std::max(amax, std::fabs(bf16_float(v[k])));
                const float scale = amax > 0.f ? 127.f / amax : 0.f;
                d[r * (K / QGROUP) + a] = amax / 127.f;
                for (int k = 0; k < QGROUP; k++) q[r * K + a * QGROUP + k] = int8_t(std::nearbyint(bf16_float(v[k]) * scale));
            }
        if (four)
            for (int64_t g = 0; g < K / Gs; g++) {
                float sum = 0.f;
                int32_t isum = 0;
                for (int64_t k = g * Gs; k < (g + 1) * Gs; k++) {
                    if (INT8) isum += q[r * K + k];
                    else sum += bf16_float(x[r * K + k]);
                }
                s[r * (K / Gs) + g] = INT8 ? d[r * (K / QGROUP) + g * Gs / QGROUP] * float(isum) : sum;
            }
    }
}

}  // namespace

// x (..., K) bf16 -> (..., N) bf16, its rows taken alone. mins and dmin are empty for 8-bit blocks.
torch::Tensor qmatmul(torch::Tensor input, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                      torch::Tensor d, torch::Tensor dmin, bool narrow, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == torch::kBFloat16, "x: (..., K) bf16");
    const auto x = input.reshape({-1, input.size(-1)}).contiguous();     // rows
    const bool four = mins.numel() > 0;
    const int64_t rows = x.size(0), K = x.size(1), tiles = q.size(0), N = tiles * TILE;
    TORCH_CHECK(K % 2 == 0 && q.size(1) == K / 2, "blocks of ", 2 * q.size(1), " inputs do not fit x's ", K);
    const int64_t Gs = K / scales.size(1), Gd = K / d.size(1);
    TORCH_CHECK(Gs % 8 == 0 && Gd % Gs == 0 && K % Gd == 0, "group sizes ", Gs, ", ", Gd, " do not divide ", K);
    TORCH_CHECK(!INT8 || (QGROUP % Gs == 0 && K % QGROUP == 0 && (Gd / Gs & (Gd / Gs - 1)) == 0),
                "int8 activations need groups of at most ", QGROUP, " inputs in super-blocks of 2^n groups, not ",
                Gs, ", ", Gd);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    thread_local Prepared per_thread;
    Prepared& in_rows = per_thread;                    // this thread's: the workers below read it too
    prepare_rows(xp, rows, K, Gs, four, in_rows);
    Blocks b{q.data_ptr<uint8_t>(), reinterpret_cast<const uint8_t*>(scales.data_ptr()),
             four ? mins.data_ptr<uint8_t>() : nullptr, d.data_ptr<at::Half>(), four ? dmin.data_ptr<at::Half>() : nullptr,
             K, Gs, Gd, narrow};
    torch::Tensor bias32 = bias ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
    const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
    auto shape = input.sizes().vec();
    shape.back() = N;
    auto y = torch::empty(shape, x.options());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    using Many = std::make_integer_sequence<int, MAX_ROWS>;
    static const auto many4 = table<true, false>(Many{}), one4 = table<true, true>(Many{});
    static const auto many8 = table<false, false>(Many{}), one8 = table<false, true>(Many{});
    const auto& many = four ? many4 : many8;
    const auto& one = four ? one4 : one8;
    at::parallel_for(0, tiles, BLOCK, [&](int64_t t0, int64_t t1) {
        for (int64_t block = t0; block < t1; block += BLOCK) {
            const int64_t end = std::min<int64_t>(block + BLOCK, t1);
            for (int64_t r = 0; r < rows; r += MAX_ROWS) {
                const int64_t m = std::min<int64_t>(MAX_ROWS, rows - r), step = tiles_at_once(m, four);
                const Rows in{xp + r * K, INT8 ? in_rows.xq.data() + r * K : nullptr,
                              INT8 ? in_rows.dx.data() + r * (K / QGROUP) : nullptr,
                              four ? in_rows.xsum.data() + r * (K / Gs) : nullptr};
                int64_t t = block;
                for (; t + step <= end; t += step) many[m - 1](b, t, in, yp + r * N, N, bp);
                for (; t < end; t++) one[m - 1](b, t, in, yp + r * N, N, bp);
            }
        }
    });
    return y;
}

// ---------------------------------------------------------------------------- few-query attention
// softmax(q k^T / sqrt(d)) v for the passes after the prompt's (a token, a chain, a tree): each
// query on its own, over the keys its mask row shows, in slot order, in float32: its scores, their
// max, then sum_s e^(score_s - max) v_s and the sum of those exponentials, one key after another.
// So a query's bits do not depend on the queries beside it (batch invariance), and a pass makes
// one call a layer where torch made ~20 (model.py's `attention` is the same math, in blocks).
// A work item is one kv head at one query position: key by key, its G query heads use the key
// (and then the value) while it is in cache, so a pass reads the cache once, not G times.
// q (B, H, T, d), k and v (B, nkv, S, d) with any strides but the last, mask (T, S) bool.
namespace {

using f8 = float __attribute__((vector_size(32)));     // 8 floats: an AVX register (two SSE ones, or scalars, elsewhere)
using i8 = int32_t __attribute__((vector_size(32)));

inline f8 load8(const float* p) { f8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// dot(q_g, k) for N queries q_g = q + g * stride: each in 8 running sums (lanes) added in one
// order, the same for any N; N chains at once keep the adder busy where one waits on itself.
template <int N>
inline void dots(const float* q, int64_t stride, const float* k, int64_t d, float* out) {
    f8 lane[N] = {};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const f8 ki = load8(k + i);
        for (int g = 0; g < N; g++) lane[g] += load8(q + g * stride + i) * ki;
    }
    for (int g = 0; g < N; g++) {
        const f8 l = lane[g];
        out[g] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for (int64_t r = i; r < d; r++) out[g] += q[g * stride + r] * k[r];
    }
}

inline float dot(const float* a, const float* b, int64_t d) { float s; dots<1>(a, 0, b, d, &s); return s; }

// e^x for 8 x <= 0: x = n ln2 + r with n = round(x / ln2) (adding 1.5 * 2^23 rounds), e^r by
// its Taylor series to r^7 (relative error < 2e-7 for |r| <= ln2 / 2), 2^n in a float's exponent.
inline f8 exp_negative(f8 x) {
    x = x < -87.f ? -87.f : x;
    const f8 n = (x * 1.44269504f + 12582912.f) - 12582912.f;
    const f8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;       // ln2 in two parts: n * the first is exact
    const f8 p = 1 + r * (1 + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r / 5040))))));
    return p * (f8)((__builtin_convertvector(n, i8) + 127) << 23);
}

}  // namespace

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
                k.stride(3) == 1 && v.stride(3) == 1 && mask.scalar_type() == torch::kBool, "attend: q (B,H,T,d), float32 k, v");
    const auto qf = q.to(torch::kFloat32).contiguous();
    const auto seen = mask.contiguous();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), S = k.size(2), KV = k.size(1), G = H / KV;
    TORCH_CHECK(seen.size(0) == T && seen.size(1) == S && H % KV == 0, "attend: mask (T, S), heads by kv heads");
    auto y = torch::zeros({B, H, T, d}, qf.options());
    const float *qp = qf.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    const bool* mp = seen.data_ptr<bool>();
    float* yp = y.data_ptr<float>();
    const float scale = 1.f / std::sqrt(float(d));
    const int64_t Sp = (S + 8) / 8 * 8;                           // a head's exponentials, padded to whole vectors
    at::parallel_for(0, B * KV * T, 1, [&](int64_t i0, int64_t i1) {
        std::vector<int64_t> keys(S);
        std::vector<float> score(G), sum(G), e(G * Sp);
        for (int64_t i = i0; i < i1; i++) {                       // kv head kv of batch b, at query position t
            const int64_t b = i / (KV * T), kv = i / T % KV, t = i % T, at = (b * H + kv * G) * T + t;
            const float *kb = kp + b * k.stride(0) + kv * k.stride(1), *vb = vp + b * v.stride(0) + kv * v.stride(1);
            const float* q0 = qp + at * d;                        // query head kv G + g: q0 + g T d
            float* y0 = yp + at * d;
            int64_t n = 0;
            for (int64_t s = 0; s < S; s++)                       // the keys row t sees, in slot order
                if (mp[t * S + s]) keys[n++] = s;
            for (int64_t j = 0; j < n; j++) {                     // scores, G heads a key
                const float* kj = kb + keys[j] * k.stride(2);
                int64_t g = 0;
                for (; g + 4 <= G; g += 4) dots<4>(q0 + g * T * d, T * d, kj, d, &score[g]);
                for (; g < G; g++) dots<1>(q0 + g * T * d, 0, kj, d, &score[g]);
                for (g = 0; g < G; g++) e[g * Sp + j] = score[g] * scale;
            }
            for (int64_t g = 0; g < G; g++) {                     // e^(score - max), and their sum
                float* eg = e.data() + g * Sp;
                const float top = n ? *std::max_element(eg, eg + n) : 0.f;     // (no key seen: 0 / 0, as before)
                for (int64_t j = 0; j < n; j += 8) store8(eg + j, exp_negative(load8(eg + j) - top));
                sum[g] = 0.f;
                for (int64_t j = 0; j < n; j++) sum[g] += eg[j];
            }
            for (int64_t j = 0; j < n; j++) {                     // sum_j e_j v_j, key after key
                const float* vj = vb + keys[j] * v.stride(2);
                for (int64_t g = 0; g < G; g++) {
                    float* out = y0 + g * T * d;
                    const float ej = e[g * Sp + j];
                    for (int64_t c = 0; c < d; c++) out[c] += ej * vj[c];
                }
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < d; c++) y0[g * T * d + c] /= sum[g];
        }
    });
    return y.to(q.scalar_type());
}

// ---------------------------------------------------------------------------- row-wise ops
// A one-token pass makes ~90 of these; torch spends 20-70 us on each (several small ops, a
// parallel region), this file a few. model.py's torch code is their definition; each row here
// alone, its sums in one order, so a row's bits do not depend on the rows beside it.

// RMSNorm of bf16 rows: bf16(bf16(x / sqrt(mean(x^2) + eps)) * w), mean(x^2) summed in float32.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    const int64_t d = x.size(-1);
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 && w.numel() == d,
                "rms_norm: bf16 x (..., d), bf16 w (d)");
    const auto xc = x.contiguous(), wc = w.contiguous();
    auto y = torch::empty_like(xc);
    const uint16_t *xp = reinterpret_cast<const uint16_t*>(xc.data_ptr()), *wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, xc.numel() / d, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> v(d);
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t k = 0; k < d; k++) v[k] = bf16_float(xp[r * d + k]);
            const float scale = 1.f / std::sqrt(dot(v.data(), v.data(), d) / float(d) + float(eps));
            for (int64_t k = 0; k < d; k++)
                yp[r * d + k] = float_bf16(bf16_float(float_bf16(v[k] * scale)) * bf16_float(wp[k]));
        }
    });
    return y;
}

// RoPE (model.py's apply_rope): bf16 x (B, H, T, d), cos and sin (B, 1, T, d), sin's first half
// negated: bf16(bf16(x cos) + bf16(roll(x, d/2) sin)), as torch rounds each of its three ops.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kBFloat16 && cos.scalar_type() == torch::kBFloat16 &&
                sin.scalar_type() == torch::kBFloat16 && cos.numel() == x.size(0) * x.size(2) * x.size(3) &&
                sin.numel() == cos.numel(), "rope: bf16 x (B, H, T, d), cos and sin (B, 1, T, d)");
    const auto xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
    auto y = torch::empty_like(xc);
    const int64_t H = x.size(1), T = x.size(2), d = x.size(3);
    const uint16_t *xp = reinterpret_cast<const uint16_t*>(xc.data_ptr()), *cp = reinterpret_cast<const uint16_t*>(cc.data_ptr()),
                   *sp = reinterpret_cast<const uint16_t*>(sc.data_ptr());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, xc.numel() / d, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {                      // row r: (b, h, t), its angles (b, t)
            const uint16_t *v = xp + r * d, *c = cp + (r / (H * T) * T + r % T) * d, *s = sp + (c - cp);
            for (int64_t k = 0; k < d; k++) {
                const uint16_t turn = v[k < d / 2 ? k + d / 2 : k - d / 2];
                yp[r * d + k] = float_bf16(bf16_float(float_bf16(bf16_float(v[k]) * bf16_float(c[k]))) +
                                           bf16_float(float_bf16(bf16_float(turn) * bf16_float(s[k]))));
            }
        }
    });
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("qmatmul", &qmatmul, "y = x W^T + b, W as quantized blocks in 16-output tiles");
    m.def("attend", &attend, "softmax(q k^T / sqrt(d)) v, each query alone over its mask row's keys, in slot order");
    m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows, each alone");
    m.def("rope", &rope, "rotary position embedding of bf16 rows, each alone");
    m.attr("activations") = INT8 ? "int8" : "bf16";
    m.attr("record_inputs") = INT8 ? 4 : 2;
}
