// qmatmul.cpp: y = x W^T + b with W kept as llama.cpp's quantized blocks, for bf16 rows on the CPU.
// Compiled at first use by model.py (torch.utils.cpp_extension.load, -march=native).
//
// The blocks (model.py's QLinear has the format): for output n and input k in group g = k / Gs,
//     W[n, k] = s[n, g] q[n, k] - m[n, g],   s = d[n, k / Gd] * scales[n, g],  m = dmin[n, k / Gd] * mins[n, g]
// q is 4-bit unsigned (Q4_K, Q4_1) or 8-bit signed (Q6_K, Q5_0, Q8_0), d and dmin float16, scales
// and mins 8-bit, so s and m are exact in float32. Each group's sum is taken on the integers and
// scaled once, as llama.cpp does:
//     y[r, n] = sum_g ( s[n, g] * sum_{k in g} q[n, k] x[r, k]  -  m[n, g] * sum_{k in g} x[r, k] )
// q and x are exact in bf16, so VDPBF16PS (x0 q0 + x1 q1 added to a float32 sum) needs no
// dequantised weights at all: the exact GGUF weights, in float32 sums, at 4.6 bits a weight.
//
// Layout, made once at load (model.py's `tile`): outputs go in tiles of 16. For tile t and input
// pair p (inputs 2p, 2p+1) the 32 values q form one 16-byte (4-bit) or 32-byte (8-bit) record:
// value j < 16 is output j / 2, input 2p + j % 2; value 16 + j the same for output 8 + j / 2 (4-bit:
// value j in byte j's low nibble, value 16 + j in its high nibble). Widened to 32 bf16 (one table
// lookup; Q8_0's full int8 range by conversion), lane i holds output i's pair, and one VDPBF16PS per row adds that pair's products to
// output i's group sum. scales, mins, d and dmin are stored (tiles, groups, 16): one vector a group.
//
// Each record is widened once per call and used by up to 8 rows held in registers, so a call of
// 8 rows reads the weights once, like a call of 1.
// Batch invariance: a row's sums run over k in one order with the same instructions whatever the
// number of rows, so its result does not depend on the rows beside it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <array>
#include <cstring>
#if defined(__AVX512BF16__) && !defined(QMATMUL_PORTABLE)
#include <immintrin.h>
#define QMATMUL_AVX512 1
#endif

namespace {

constexpr int TILE = 16, MAX_ROWS = 8;

struct Blocks {
    const uint8_t* q;          // records, tile after tile
    const uint8_t* scales;     // (tiles, K / Gs, TILE), uint8 (4-bit) or int8 (8-bit)
    const uint8_t* mins;       // same, uint8, 4-bit only
    const at::Half* d;         // (tiles, K / Gd, TILE)
    const at::Half* dmin;      // same, 4-bit only
    const float* xsum;         // (rows, K / Gs): each row's sum over each group
    int64_t K, Gs, Gd;
    bool narrow;               // 8-bit q all in [-32, 31] (Q6_K, Q5_0): widened by a 64-entry table
};

inline float bf16_float(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_bf16(float f) {                 // round to nearest even, as VCVTNEPS2BF16 does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#ifdef QMATMUL_AVX512
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

// M rows of x (bf16, row stride ldx) times tiles t .. t + T - 1, into y (row stride ldy).
// T tiles at once: a VDPBF16PS waits for the one before on its sum, so 10-16 sums are kept in
// flight (tiles_at_once). A sum's arithmetic is the same for any M and T.
template <int M, int T, bool FOUR>
void tile_rows(const Blocks& b, int64_t t, const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
               const float* xsum, const float* bias) {
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
                std::memcpy(&v, x + m * ldx + 2 * p, 4);
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
                if (FOUR) a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xsum[m * groups + g]), a);
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
#else
// The same sums in plain C++, for CPUs without AVX512-BF16 (and to check this file on them).
template <int M, int T, bool FOUR>
void tile_rows(const Blocks& b, int64_t t0, const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
               const float* xsum, const float* bias) {
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
                    const float x0 = bf16_float(x[m * ldx + 2 * p]), x1 = bf16_float(x[m * ldx + 2 * p + 1]);
                    for (int i = 0; i < TILE; i++) part[m][i] += w[i][0] * x0 + w[i][1] * x1;
                }
            }
            const int64_t gs = (t * groups + g) * TILE, gd = (t * (b.K / b.Gd) + g / per_d) * TILE;
            for (int i = 0; i < TILE; i++) {
                const float s = float(b.d[gd + i]) * float(FOUR ? b.scales[gs + i] : int8_t(b.scales[gs + i]));
                const float mn = FOUR ? float(b.dmin[gd + i]) * float(b.mins[gs + i]) : 0.f;
                for (int m = 0; m < M; m++) acc[m][i] += s * part[m][i] - (FOUR ? mn * xsum[m * groups + g] : 0.f);
            }
        }
        for (int m = 0; m < M; m++)
            for (int i = 0; i < TILE; i++)
                y[m * ldy + t * TILE + i] = float_bf16(acc[m][i] + (bias ? bias[t * TILE + i] : 0.f));
    }
}
#endif

using TileFn = void (*)(const Blocks&, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, const float*, const float*);

constexpr int tiles_at_once(int rows) { return rows <= 2 ? 8 : rows <= 4 ? 4 : 2; }   // 10-16 sums in flight
constexpr int BLOCK = 8;                               // tiles whose weights stay in cache across a long x

template <bool FOUR, bool ONE, int... M>               // [M - 1]: M rows, tiles_at_once(M) tiles (ONE: 1)
constexpr std::array<TileFn, sizeof...(M)> table(std::integer_sequence<int, M...>) {
    return {tile_rows<M + 1, ONE ? 1 : tiles_at_once(M + 1), FOUR>...};
}

}  // namespace

// x (rows, K) bf16 -> (rows, N) bf16. mins and dmin are empty for 8-bit blocks.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                      torch::Tensor d, torch::Tensor dmin, bool narrow, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: (rows, K) contiguous bf16");
    const bool four = mins.numel() > 0;
    const int64_t rows = x.size(0), K = x.size(1), tiles = q.size(0), N = tiles * TILE;
    TORCH_CHECK(K % 2 == 0 && q.size(1) == K / 2, "blocks of ", 2 * q.size(1), " inputs do not fit x's ", K);
    const int64_t Gs = K / scales.size(1), Gd = K / d.size(1);
    TORCH_CHECK(Gs % 2 == 0 && Gd % Gs == 0 && K % Gd == 0, "group sizes ", Gs, ", ", Gd, " do not divide ", K);
    // each row's sum over each group (4-bit only), in one fixed order: a row's alone
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    auto xsum = torch::zeros({four ? rows : 0, K / Gs}, x.options().dtype(torch::kFloat32));
    float* xs = xsum.data_ptr<float>();
    for (int64_t r = 0; r < xsum.size(0); r++)
        for (int64_t k = 0; k < Gs; k++)
            for (int64_t g = 0; g < K / Gs; g++) xs[r * (K / Gs) + g] += bf16_float(xp[r * K + g * Gs + k]);
    Blocks b{q.data_ptr<uint8_t>(), reinterpret_cast<const uint8_t*>(scales.data_ptr()),
             four ? mins.data_ptr<uint8_t>() : nullptr, d.data_ptr<at::Half>(), four ? dmin.data_ptr<at::Half>() : nullptr,
             xs, K, Gs, Gd, narrow};
    torch::Tensor bias32 = bias ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
    const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
    auto y = torch::empty({rows, N}, x.options());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    using Rows = std::make_integer_sequence<int, MAX_ROWS>;
    static const auto many4 = table<true, false>(Rows{}), one4 = table<true, true>(Rows{});
    static const auto many8 = table<false, false>(Rows{}), one8 = table<false, true>(Rows{});
    const auto& many = four ? many4 : many8;
    const auto& one = four ? one4 : one8;
    at::parallel_for(0, tiles, BLOCK, [&](int64_t t0, int64_t t1) {
        for (int64_t block = t0; block < t1; block += BLOCK) {
            const int64_t end = std::min<int64_t>(block + BLOCK, t1);
            for (int64_t r = 0; r < rows; r += MAX_ROWS) {
                const int64_t m = std::min<int64_t>(MAX_ROWS, rows - r), step = tiles_at_once(m);
                const float* sums = xs + (four ? r * (K / Gs) : 0);
                int64_t t = block;
                for (; t + step <= end; t += step) many[m - 1](b, t, xp + r * K, K, yp + r * N, N, sums, bp);
                for (; t < end; t++) one[m - 1](b, t, xp + r * K, K, yp + r * N, N, sums, bp);
            }
        }
    });
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("qmatmul", &qmatmul, "y = x W^T + b, W as quantized blocks in 16-output tiles");
}
