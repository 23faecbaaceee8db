// hubtool CPU int4 x float matmul: y (M, N) = x (M, K) @ W^T, W int4 with per-group scales (and zeros).
//
// Weight layout (built once at load time by hubtool/kernels/cpu/__init__.py, never saved):
//   packed  uint8 (NB, K/2, 64): blocks of 64 output columns; for each pair of input rows (k, k+1) 64 bytes
//           hold the 128 nibbles of 4 tiles x 16 columns x 2 rows, in the order that one 64-byte load,
//           two shifts, two ternary-logic ops and four byte unpacks turn into four registers of bf16
//           pairs: tile t, 32-bit lane c holds (W[16t+c, k], W[16t+c, k+1]).
//   scales  fp16  (NB, K/G, 64) and, when asymmetric, zeros uint8 (NB, K/G, 64) holding the zero point z.
// A code q is decoded as the bf16 number v = 1 + q/16 (exponent 0x3F8, q in the top mantissa bits), so
// each group contributes  s * sum_k (q - z) x_k = 16 s * sum_k v x_k - (16 + z) s * sum_k x_k : the dot
// product runs on exact values and the correction uses a per-group sum of the activations.
//
// Paths, chosen by cpuid at run time (functions carry per-function target attributes):
//   3 avx512_bf16 : vdpbf16ps (32 multiply-adds per instruction) on bf16 activations; fp16/fp32
//                   activations become int16 codes per group and run vpdpwssd (VNNI, also 32 per
//                   instruction; error <= group absmax / 65534 per value), or with act = 1 (or no VNNI)
//                   two bf16 rows hi + lo (exact for fp16, ~2^-17 for fp32) at twice the work
//   2 avx512      : fp32 activations (any input dtype), FMA on fp32
//   1 avx2        : fp32 activations, 256-bit FMA
//   0 scalar      : portable C++
// Work is split over blocks of 64 columns (at::parallel_for). Rows are processed in chunks of 32; inside a
// chunk, each weight group (4 KiB of codes for G = 128) is decoded in registers once per pass of 4 rows
// (4 rows x 4 tiles = 16 accumulators; two sets at 1-2 rows, to shorten dependency chains) and stays in
// L1 between passes; a software prefetch runs 4 KiB ahead of the stream. Decoding into an L1 buffer once
// for all rows was measured slower on Zen 4: four 64-byte stores per 64-byte load cost more than the
// nine register ops that re-decode. (The AVX2 path keeps the buffer: with 16 registers it needs it.)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define HT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace hubtool_cpu {

constexpr int NB = 64;      // columns per block
constexpr int TILES = 4;    // 16-column tiles per block
constexpr int MC = 32;      // rows per chunk
constexpr int ROWS_MAX = 5;  // rows per register-resident pass (5 x 4 tiles = 20 accumulators)
static int g_rows = 4;      // rows per pass, bf16 path (tuning knob: hubtool::int4_cpu_tune)
static int g_rows_f32 = 4;  // rows per pass, fp32 path
static int g_pf = 4096;     // software prefetch distance in bytes (0: none)
static int g_rows_i16 = 2;  // rows per pass, int16 path (2 rows use two accumulator sets: measured fastest)

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

struct Problem {
  const uint8_t* packed;
  const c10::Half* scales;
  const uint8_t* zeros;  // null: symmetric (z = 8)
  int64_t K, G, P, NG, NBLK, N, M;
  const void* x;    // bf16 (M, K) for the bf16 path, int16 (M, K) for the int16 path, fp32 (M, K) otherwise
  const float* xs;  // (M, NG) per-group sums of the activations as used
  const float* xsc = nullptr;  // (M, NG) int16 path: the scale of each row's group (x ~ xsc * int16)
};

// Decode one column block / group into per-tile scale coefficients: s16 = 16 s, corr = -(16 + z) s.
static inline void coefs_scalar(const Problem& pb, int64_t b, int64_t g, int c, float& s16, float& corr) {
  const int64_t off = (b * pb.NG + g) * NB + c;
  const float s = static_cast<float>(pb.scales[off]);
  const float z = pb.zeros ? static_cast<float>(pb.zeros[off]) : 8.f;
  s16 = 16.f * s;
  corr = -(16.f + z) * s;
}

// ---------------------------------------------------------------------------------------------- scalar
// Word j of tile r for pair p comes from byte 16*(j/8) + j%8 + 8*(r%2), nibble r/2.
static void decode_group_scalar(const uint8_t* src, int P, float* buf /* [P][4][32] */) {
  for (int p = 0; p < P; ++p) {
    const uint8_t* s = src + 64 * p;
    for (int r = 0; r < TILES; ++r) {
      for (int j = 0; j < 32; ++j) {
        const int byte = 16 * (j / 8) + (j % 8) + 8 * (r % 2);
        const int q = (s[byte] >> (4 * (r / 2))) & 0xF;
        buf[(p * TILES + r) * 32 + j] = 1.f + q / 16.f;
      }
    }
  }
}

static void block_scalar(const Problem& pb, int64_t b, int64_t m0, int mc, float* out) {
  const float* x = static_cast<const float*>(pb.x);
  std::vector<float> buf(static_cast<size_t>(pb.P) * TILES * 32);
  float acc[NB];
  for (int64_t g = 0; g < pb.NG; ++g) {
    decode_group_scalar(pb.packed + (b * pb.P * pb.NG + g * pb.P) * 64, static_cast<int>(pb.P), buf.data());
    for (int m = 0; m < mc; ++m) {
      const float* xr = x + (m0 + m) * pb.K + g * pb.G;
      std::fill(acc, acc + NB, 0.f);
      for (int p = 0; p < pb.P; ++p) {
        const float x0 = xr[2 * p], x1 = xr[2 * p + 1];
        for (int t = 0; t < TILES; ++t) {
          const float* w = buf.data() + (p * TILES + t) * 32;
          for (int c = 0; c < 16; ++c) acc[16 * t + c] += w[2 * c] * x0 + w[2 * c + 1] * x1;
        }
      }
      const float xsum = pb.xs[(m0 + m) * pb.NG + g];
      for (int c = 0; c < NB; ++c) {
        float s16, corr;
        coefs_scalar(pb, b, g, c, s16, corr);
        out[m * NB + c] += s16 * acc[c] + corr * xsum;
      }
    }
  }
}

#ifdef HT_X86
// ------------------------------------------------------------------------------------------ AVX-512
#define TGT_512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

TGT_512 static INL void decode4_512(const uint8_t* src, __m512i z[4]) {
  const __m512i m78 = _mm512_set1_epi8(0x78), m80 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i c3f = _mm512_set1_epi8(0x3F);
  const __m512i v = _mm512_loadu_si512(src);
  // (a & 0x78) | 0x80 in one ternary-logic op: truth table 0xEA.
  const __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 3), m78, m80, 0xEA);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 1), m78, m80, 0xEA);
  z[0] = _mm512_unpacklo_epi8(lo, c3f);
  z[1] = _mm512_unpackhi_epi8(lo, c3f);
  z[2] = _mm512_unpacklo_epi8(hi, c3f);
  z[3] = _mm512_unpackhi_epi8(hi, c3f);
}

TGT_512 static INL void coefs_512(const Problem& pb, int64_t b, int64_t g, int t, __m512& s16, __m512& corr) {
  const int64_t off = (b * pb.NG + g) * NB + 16 * t;
  const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb.scales + off)));
  __m512 z = _mm512_set1_ps(8.f);
  if (pb.zeros) {
    z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb.zeros + off))));
  }
  s16 = _mm512_mul_ps(s, _mm512_set1_ps(16.f));
  corr = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_set1_ps(-16.f), z));
}

template <int MB, int T>
TGT_512 static INL void epilogue_512(const Problem& pb, int64_t b, int64_t g, int t0, const float* xs, float* out,
                                     __m512 (&acc)[MB][T]) {
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    __m512 s16, corr;
    coefs_512(pb, b, g, t0 + t, s16, corr);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      float* o = out + m * NB + 16 * (t0 + t);
      __m512 v = _mm512_fmadd_ps(acc[m][t], s16, _mm512_loadu_ps(o));
      v = _mm512_fmadd_ps(_mm512_set1_ps(xs[m * pb.NG]), corr, v);
      _mm512_storeu_ps(o, v);
    }
  }
}

// One pair of input rows for MB rows x 4 tiles: decode 64 bytes, one vdpbf16ps per row and tile.
template <int MB>
TGT_BF16 static INL void step_bf16(const uint8_t* src, const uint16_t* xg, int64_t ldx, int p, __m512 (&acc)[MB][TILES]) {
  if (g_pf) _mm_prefetch(reinterpret_cast<const char*>(src + 64 * p + g_pf), _MM_HINT_T0);
  __m512i w[TILES];
  decode4_512(src + 64 * p, w);
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    int32_t xv;
    std::memcpy(&xv, xg + m * ldx + 2 * p, 4);
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(xv);
#pragma GCC unroll 4
    for (int t = 0; t < TILES; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], (__m512bh)w[t], xb);
  }
}

// bf16 activations, weights of group g decoded in registers (all 4 tiles), MB rows from m0. With one or
// two rows, two accumulator sets (even and odd pairs) halve the vdpbf16ps dependency chains.
// The loop over the input-row pairs of group g shared by the bf16 and int16 paths (a macro, because each
// path's function carries its own target attributes): NS accumulator sets of MB rows x 4 tiles, zeroed by
// ZERO(); STEP<MB> decodes one 64-byte pair and multiplies it into a set.
#define HT_PAIR_LOOP(ACC_T, ZERO, X_T, STEP)                                          \
  constexpr int NS = MB <= 2 ? 2 : 1;                                                \
  ACC_T acc[NS][MB][TILES];                                                           \
  _Pragma("GCC unroll 16") for (int s = 0; s < NS; ++s)                              \
    for (int m = 0; m < MB; ++m)                                                      \
      for (int t = 0; t < TILES; ++t) acc[s][m][t] = ZERO();                          \
  const X_T* xg = static_cast<const X_T*>(pb.x) + m0 * pb.K + g * pb.G;               \
  const uint8_t* sg = pb.packed + (b * pb.NG + g) * pb.P * 64;                        \
  int p = 0;                                                                          \
  for (; p + NS <= pb.P; p += NS) {                                                   \
    _Pragma("GCC unroll 2") for (int s = 0; s < NS; ++s) STEP<MB>(sg, xg, pb.K, p + s, acc[s]); \
  }                                                                                   \
  for (; p < pb.P; ++p) STEP<MB>(sg, xg, pb.K, p, acc[0]);

template <int MB>
TGT_BF16 static void direct_bf16(const Problem& pb, int64_t b, int64_t g, int64_t m0, float* out) {
  HT_PAIR_LOOP(__m512, _mm512_setzero_ps, uint16_t, step_bf16)
  if (NS == 2) {
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < TILES; ++t) acc[0][m][t] = _mm512_add_ps(acc[0][m][t], acc[NS - 1][m][t]);
  }
  epilogue_512<MB, TILES>(pb, b, g, 0, pb.xs + m0 * pb.NG + g, out, acc[0]);
}

// fp32 activations: a bf16 pair (v_k, v_k+1) widens to two fp32 vectors by a shift and a mask.
template <int MB, int T>
TGT_512 static INL void fma_pair_512(const __m512i (&w)[T], const float* xg, int64_t ldx, int p,
                                     __m512 (&acc)[MB][T], __m512 (&acc_odd)[MB][T]) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 we[T], wo[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    we[t] = _mm512_castsi512_ps(_mm512_slli_epi32(w[t], 16));
    wo[t] = _mm512_castsi512_ps(_mm512_and_si512(w[t], hi_mask));
  }
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    const __m512 x0 = _mm512_set1_ps(xg[m * ldx + 2 * p]);
    const __m512 x1 = _mm512_set1_ps(xg[m * ldx + 2 * p + 1]);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      acc[m][t] = _mm512_fmadd_ps(we[t], x0, acc[m][t]);
      acc_odd[m][t] = _mm512_fmadd_ps(wo[t], x1, acc_odd[m][t]);
    }
  }
}

// fp32 activations. With one or two rows the even and odd FMAs go to separate accumulators (shorter
// chains); with more rows there are enough independent accumulators and they share one.
template <int MB>
TGT_512 static void direct_f32(const Problem& pb, int64_t b, int64_t g, int64_t m0, float* out) {
  constexpr int NS = MB <= 2 ? 2 : 1;
  __m512 acc[NS][MB][TILES];
#pragma GCC unroll 16
  for (int s = 0; s < NS; ++s)
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < TILES; ++t) acc[s][m][t] = _mm512_setzero_ps();
  const float* xg = static_cast<const float*>(pb.x) + m0 * pb.K + g * pb.G;
  const uint8_t* sg = pb.packed + (b * pb.NG + g) * pb.P * 64;
  for (int p = 0; p < pb.P; ++p) {
    if (g_pf) _mm_prefetch(reinterpret_cast<const char*>(sg + 64 * p + g_pf), _MM_HINT_T0);
    __m512i w[TILES];
    decode4_512(sg + 64 * p, w);
    fma_pair_512<MB, TILES>(w, xg, pb.K, p, acc[0], acc[NS - 1]);
  }
  if (NS == 2) {
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < TILES; ++t) acc[0][m][t] = _mm512_add_ps(acc[0][m][t], acc[NS - 1][m][t]);
  }
  epilogue_512<MB, TILES>(pb, b, g, 0, pb.xs + m0 * pb.NG + g, out, acc[0]);
}

// fp16/fp32 activations -> rows (hi, lo) of bf16 for the vdpbf16ps path, plus their per-group sums.
template <bool HALF>
TGT_BF16 static void split_rows_bf16(const void* xv, int64_t M, int64_t K, int64_t G, uint16_t* out, float* xs) {
  const int64_t NG = K / G;
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* hi_row = out + (2 * m) * K;
    uint16_t* lo_row = out + (2 * m + 1) * K;
    for (int64_t g = 0; g < NG; ++g) {
      __m512 sh = _mm512_setzero_ps(), sl = _mm512_setzero_ps();
      int64_t k = g * G;
      const int64_t end = k + G;
      for (; k + 16 <= end; k += 16) {
        __m512 v;
        if (HALF) {
          v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(xv) + m * K + k)));
        } else {
          v = _mm512_loadu_ps(static_cast<const float*>(xv) + m * K + k);
        }
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
        const __m512 lf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(l), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_row + k), h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo_row + k), l);
        sh = _mm512_add_ps(sh, hf);
        sl = _mm512_add_ps(sl, lf);
      }
      float th = _mm512_reduce_add_ps(sh), tl = _mm512_reduce_add_ps(sl);
      for (; k < end; ++k) {
        const float v = HALF ? static_cast<float>(static_cast<const c10::Half*>(xv)[m * K + k])
                             : static_cast<const float*>(xv)[m * K + k];
        const c10::BFloat16 h(v), l(v - static_cast<float>(h));
        hi_row[k] = h.x;
        lo_row[k] = l.x;
        th += static_cast<float>(h);
        tl += static_cast<float>(l);
      }
      xs[(2 * m) * NG + g] = th;
      xs[(2 * m + 1) * NG + g] = tl;
    }
  }
}

// ------------------------------------------------------------------------- fp16/fp32 through int16 VNNI
// fp16/fp32 activations at bf16 speed: each row's group of G values becomes int16 codes with one fp32
// scale (absmax / 32767, so |x - x^| <= absmax / 65534 per value), the weight nibbles become int16 words
// (same layout as the bf16 decode, high byte 0), and vpdpwssd does 32 multiply-adds per instruction, as
// vdpbf16ps does. The int32 sums are exact (|sum| <= 2 * 15 * 32767 * G/2 < 2^31 for G <= 4096); the
// group then adds  s * xsc * sum_k q x^_k - z s * sum_k x^_k  to the output.
#define TGT_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
constexpr int64_t I16_MAX_GROUP = 4096;

TGT_VNNI static INL void decode4_i16(const uint8_t* src, __m512i z[4]) {
  const __m512i m0f = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i v = _mm512_loadu_si512(src);
  const __m512i lo = _mm512_and_si512(v, m0f);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
  z[0] = _mm512_unpacklo_epi8(lo, zero);
  z[1] = _mm512_unpackhi_epi8(lo, zero);
  z[2] = _mm512_unpacklo_epi8(hi, zero);
  z[3] = _mm512_unpackhi_epi8(hi, zero);
}

template <int MB>
TGT_VNNI static INL void step_i16(const uint8_t* src, const int16_t* xg, int64_t ldx, int p, __m512i (&acc)[MB][TILES]) {
  if (g_pf) _mm_prefetch(reinterpret_cast<const char*>(src + 64 * p + g_pf), _MM_HINT_T0);
  __m512i w[TILES];
  decode4_i16(src + 64 * p, w);
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    int32_t xv;
    std::memcpy(&xv, xg + m * ldx + 2 * p, 4);
    const __m512i xb = _mm512_set1_epi32(xv);
#pragma GCC unroll 4
    for (int t = 0; t < TILES; ++t) acc[m][t] = _mm512_dpwssd_epi32(acc[m][t], w[t], xb);
  }
}

template <int MB>
TGT_VNNI static void direct_i16(const Problem& pb, int64_t b, int64_t g, int64_t m0, float* out) {
  HT_PAIR_LOOP(__m512i, _mm512_setzero_si512, int16_t, step_i16)
#pragma GCC unroll 4
  for (int t = 0; t < TILES; ++t) {
    const int64_t off = (b * pb.NG + g) * NB + 16 * t;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb.scales + off)));
    __m512 z = _mm512_set1_ps(8.f);
    if (pb.zeros) {
      z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb.zeros + off))));
    }
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      __m512i a = acc[0][m][t];
      if (NS == 2) a = _mm512_add_epi32(a, acc[NS - 1][m][t]);
      const int64_t r = (m0 + m) * pb.NG + g;
      float* o = out + m * NB + 16 * t;
      // o += s * (xsc * sum q x^  -  z * sum x^)
      const __m512 d = _mm512_fnmadd_ps(z, _mm512_set1_ps(pb.xs[r]), _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(pb.xsc[r])));
      _mm512_storeu_ps(o, _mm512_fmadd_ps(d, s, _mm512_loadu_ps(o)));
    }
  }
}

// One (row, group) of fp16/fp32 activations -> int16 codes; returns the scale, sets the sum of x^.
template <bool HALF>
TGT_VNNI static float quantize_group_i16(const void* xv, int64_t off, int64_t G, int16_t* out, float* xsum) {
  const uint16_t* h = static_cast<const uint16_t*>(xv) + off;
  const float* f = static_cast<const float*>(xv) + off;
  const int64_t gv = (G / 16) * 16;  // vector part; the rest (G not a multiple of 16) is scalar
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < gv; k += 16) {
    const __m512 v = HALF ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + k))) : _mm512_loadu_ps(f + k);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  float amax = _mm512_reduce_max_ps(vmax);
  auto at = [&](int64_t k) { return HALF ? static_cast<float>(c10::Half(h[k], c10::Half::from_bits())) : f[k]; };
  for (int64_t k = gv; k < G; ++k) amax = std::max(amax, std::fabs(at(k)));
  const float scale = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lim = _mm512_set1_epi32(32767), nlim = _mm512_set1_epi32(-32767);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = 0; k < gv; k += 16) {
    const __m512 v = HALF ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + k))) : _mm512_loadu_ps(f + k);
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i c = _mm512_max_epi32(_mm512_min_epi32(q, lim), nlim);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(c));
    vsum = _mm512_add_epi32(vsum, c);
  }
  int32_t sum = _mm512_reduce_add_epi32(vsum);
  for (int64_t k = gv; k < G; ++k) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(at(k) * inv));
    const int16_t c = static_cast<int16_t>(std::min(32767, std::max(-32767, q)));
    out[k] = c;
    sum += c;
  }
  *xsum = static_cast<float>(sum) * scale;
  return scale;
}

// fp16/fp32 rows -> int16 codes, per (row, group) scale and sum of the dequantized values.
template <bool HALF>
static void quantize_rows_i16(const void* xv, int64_t M, int64_t K, int64_t G, int16_t* out, float* xsc, float* xs) {
  const int64_t NG = K / G;
  at::parallel_for(0, M * NG, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t off = (i / NG) * K + (i % NG) * G;
      xsc[i] = quantize_group_i16<HALF>(xv, off, G, out + off, xs + i);
    }
  });
}

static void block_i16(const Problem& pb, int64_t b, int64_t m0, int mc, float* out) {
  for (int64_t g = 0; g < pb.NG; ++g) {
    for (int m = 0; m < mc; m += g_rows_i16) {
      const int mb = std::min(g_rows_i16, mc - m);
#define HT_CALL(MB) direct_i16<MB>(pb, b, g, m0 + m, out + m * NB)
      switch (mb) {
        case 1: HT_CALL(1); break;
        case 2: HT_CALL(2); break;
        case 3: HT_CALL(3); break;
        case 4: HT_CALL(4); break;
        default: HT_CALL(5); break;
      }
#undef HT_CALL
    }
  }
}

// ------------------------------------------------------------------------------------------- AVX2
// Same layout: the 64 bytes split into two 128-bit-lane pairs, so 256-bit unpacks give the two halves
// (columns 0-7 and 8-15) of each tile.
TGT_AVX2 static void decode_group_avx2(const uint8_t* src, int P, uint16_t* buf) {
  const __m256i m78 = _mm256_set1_epi8(0x78), m80 = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i c3f = _mm256_set1_epi8(0x3F);
  for (int p = 0; p < P; ++p) {
    __m256i* d = reinterpret_cast<__m256i*>(buf + p * TILES * 32);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * p + 32 * h));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(v, 3), m78), m80);
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 1), m78), m80);
      _mm256_store_si256(d + 0 + h, _mm256_unpacklo_epi8(lo, c3f));
      _mm256_store_si256(d + 2 + h, _mm256_unpackhi_epi8(lo, c3f));
      _mm256_store_si256(d + 4 + h, _mm256_unpacklo_epi8(hi, c3f));
      _mm256_store_si256(d + 6 + h, _mm256_unpackhi_epi8(hi, c3f));
    }
  }
}

// MB rows x 2 half-tiles (16 columns: tile t).
template <int MB>
TGT_AVX2 static void micro_avx2(const Problem& pb, int64_t b, int64_t g, int64_t m0, int t, const uint16_t* buf,
                                float* out) {
  const float* xg = static_cast<const float*>(pb.x) + m0 * pb.K + g * pb.G;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[MB][2];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int p = 0; p < pb.P; ++p) {
    __m256 we[2], wo[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + (p * TILES + t) * 32 + 16 * h));
      we[h] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      wo[h] = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m256 x0 = _mm256_set1_ps(xg[m * pb.K + 2 * p]), x1 = _mm256_set1_ps(xg[m * pb.K + 2 * p + 1]);
      for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_fmadd_ps(wo[h], x1, _mm256_fmadd_ps(we[h], x0, acc[m][h]));
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t off = (b * pb.NG + g) * NB + 16 * t + 8 * h;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb.scales + off)));
    __m256 z = _mm256_set1_ps(8.f);
    if (pb.zeros) {
      z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb.zeros + off))));
    }
    const __m256 s16 = _mm256_mul_ps(s, _mm256_set1_ps(16.f));
    const __m256 corr = _mm256_mul_ps(s, _mm256_sub_ps(_mm256_set1_ps(-16.f), z));
    for (int m = 0; m < MB; ++m) {
      float* o = out + m * NB + 16 * t + 8 * h;
      __m256 v = _mm256_fmadd_ps(acc[m][h], s16, _mm256_loadu_ps(o));
      v = _mm256_fmadd_ps(_mm256_set1_ps(pb.xs[(m0 + m) * pb.NG + g]), corr, v);
      _mm256_storeu_ps(o, v);
    }
  }
}

// ------------------------------------------------------------------------------ per-ISA block drivers
#define HT_DISPATCH4(mb, CALL) \
  switch (mb) {                 \
    case 1: CALL(1); break;     \
    case 2: CALL(2); break;     \
    case 3: CALL(3); break;     \
    default: CALL(4); break;    \
  }

#define HT_DISPATCH5(mb, CALL) \
  switch (mb) {                 \
    case 1: CALL(1); break;     \
    case 2: CALL(2); break;     \
    case 3: CALL(3); break;     \
    case 4: CALL(4); break;     \
    default: CALL(5); break;    \
  }

// Each group of each column block is decoded once per R rows (R = g_rows, at most 5: 5 x 4 accumulators);
// the group's 4 KiB of codes stay in L1 between row chunks.
static void block_bf16(const Problem& pb, int64_t b, int64_t m0, int mc, float* out) {
  for (int64_t g = 0; g < pb.NG; ++g) {
    for (int m = 0; m < mc; m += g_rows) {
      const int mb = std::min(g_rows, mc - m);
#define HT_CALL(MB) direct_bf16<MB>(pb, b, g, m0 + m, out + m * NB)
      HT_DISPATCH5(mb, HT_CALL)
#undef HT_CALL
    }
  }
}

static void block_f32_512(const Problem& pb, int64_t b, int64_t m0, int mc, float* out) {
  for (int64_t g = 0; g < pb.NG; ++g) {
    for (int m = 0; m < mc; m += g_rows_f32) {
      const int mb = std::min(g_rows_f32, mc - m);
#define HT_CALL(MB) direct_f32<MB>(pb, b, g, m0 + m, out + m * NB)
      HT_DISPATCH5(mb, HT_CALL)
#undef HT_CALL
    }
  }
}

static void block_avx2(const Problem& pb, int64_t b, int64_t m0, int mc, float* out, uint16_t* buf) {
  for (int64_t g = 0; g < pb.NG; ++g) {
    decode_group_avx2(pb.packed + (b * pb.NG + g) * pb.P * 64, static_cast<int>(pb.P), buf);
    for (int m = 0; m < mc; m += 4) {
      const int mb = std::min(4, mc - m);
      for (int t = 0; t < TILES; ++t) {
#define HT_CALL(MB) micro_avx2<MB>(pb, b, g, m0 + m, t, buf, out + m * NB)
        HT_DISPATCH4(mb, HT_CALL)
#undef HT_CALL
      }
    }
  }
}

static int detect_isa_impl() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return SCALAR;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return SCALAR;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 0x6) != 0x6) return SCALAR;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return SCALAR;
  const bool avx2 = b & (1u << 5);
  const bool a512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)) &&
                    (xlo & 0xE0) == 0xE0;
  if (a512) {
    unsigned a1 = 0, b1, c1, d1;
    __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    return (a1 & (1u << 5)) ? AVX512_BF16 : AVX512;
  }
  return (avx2 && fma && f16c) ? AVX2 : SCALAR;
}

static bool has_vnni_impl() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return c & (1u << 11);
}

// Probed once, like the ISA level: cpuid is slow (a VM exit under a hypervisor) and the op calls this.
static bool has_vnni() {
  static const bool vnni = has_vnni_impl();
  return vnni;
}
#endif  // HT_X86

static int detect_isa() {
#ifdef HT_X86
  static const int isa = detect_isa_impl();
  return isa;
#else
  return SCALAR;
#endif
}

// ------------------------------------------------------------------------------------------ the op
// Rows of the fp32 block buffer into y; with split = 2 each output row is the sum of two buffer rows.
template <typename T>
static void store_rows(const float* out, int mc, int split, int64_t n0, int64_t n, T* y, int64_t ldy) {
  const int64_t cols = std::min<int64_t>(NB, n - n0);
  if (split == 2) {
    for (int m = 0; m < mc / 2; ++m)
      for (int64_t c = 0; c < cols; ++c)
        y[m * ldy + n0 + c] = static_cast<T>(out[2 * m * NB + c] + out[(2 * m + 1) * NB + c]);
    return;
  }
  for (int m = 0; m < mc; ++m)
    for (int64_t c = 0; c < cols; ++c) y[m * ldy + n0 + c] = static_cast<T>(out[m * NB + c]);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t n, int64_t isa, int64_t act) {
  TORCH_CHECK(x.dim() == 2, "hubtool::int4_mm_cpu: x must be 2-D (M, K)");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "hubtool::int4_mm_cpu: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "hubtool::int4_mm_cpu: packed must be contiguous uint8 (N/64, K/2, 64)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.is_contiguous(),
              "hubtool::int4_mm_cpu: scales must be contiguous fp16 (N/64, K/G, 64)");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "hubtool::int4_mm_cpu: x must be bf16/fp16/fp32");
  const int64_t M = x.size(0), K = x.size(1), G = group_size;
  TORCH_CHECK(G >= 2 && G % 2 == 0 && K % G == 0, "hubtool::int4_mm_cpu: bad group size");
  const int64_t NBLK = packed.size(0), NG = K / G;
  TORCH_CHECK(packed.size(1) == K / 2 && scales.size(0) == NBLK && scales.size(1) == NG && scales.size(2) == NB,
              "hubtool::int4_mm_cpu: packed/scales do not match x");
  TORCH_CHECK(n > 0 && n <= NBLK * NB, "hubtool::int4_mm_cpu: bad n");
  const uint8_t* zp = nullptr;
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() && zeros->is_contiguous(),
                "hubtool::int4_mm_cpu: zeros must be contiguous uint8 shaped like scales");
    zp = zeros->data_ptr<uint8_t>();
  }
  const int best = detect_isa();
  int use = isa < 0 ? best : static_cast<int>(isa);
  TORCH_CHECK(use <= best, "hubtool::int4_mm_cpu: ISA level ", use, " requested, this CPU has ", best);
  // bf16 activations run vdpbf16ps directly. fp16/fp32 activations on the same path are split into two
  // bf16 rows, hi = bf16(x) and lo = bf16(x - hi), whose results are summed: exact for fp16 (11-bit
  // mantissa <= 8 + 8 bits), about 2^-17 relative for fp32, at the cost of twice the rows. With
  // isa = avx512 forced they take the fp32 FMA path instead.
  // act = 0 (auto): on a CPU with VNNI, fp16/fp32 activations take the int16 path instead (bf16 speed,
  // |x - x^| <= group absmax / 65534); act = 1 keeps the exact hi/lo split.
  const bool bf16_path = use == AVX512_BF16;
#ifdef HT_X86
  const bool i16_path = bf16_path && dt != at::kBFloat16 && act == 0 && has_vnni() && G <= I16_MAX_GROUP;
#else
  const bool i16_path = false;
#endif
  const int split = (bf16_path && dt != at::kBFloat16 && !i16_path) ? 2 : 1;
  at::Tensor xin, xsc;
  const int64_t MV = M * split;  // rows the kernel computes
  at::Tensor xs = at::empty({MV, NG}, x.options().dtype(at::kFloat));
  if (i16_path) {
#ifdef HT_X86
    const at::Tensor xc = x.contiguous();
    xin = at::empty({M, K}, x.options().dtype(at::kShort));
    xsc = at::empty({M, NG}, x.options().dtype(at::kFloat));
    if (dt == at::kHalf) {
      quantize_rows_i16<true>(xc.data_ptr(), M, K, G, xin.data_ptr<int16_t>(), xsc.data_ptr<float>(), xs.data_ptr<float>());
    } else {
      quantize_rows_i16<false>(xc.data_ptr(), M, K, G, xin.data_ptr<int16_t>(), xsc.data_ptr<float>(), xs.data_ptr<float>());
    }
#endif
  } else if (!bf16_path) {
    xin = x.to(at::kFloat).contiguous();
  } else if (split == 1) {
    xin = x.contiguous();
  } else {
    xin = at::empty({MV, K}, x.options().dtype(at::kBFloat16));
#ifdef HT_X86
    const at::Tensor xc = x.contiguous();
    if (dt == at::kHalf) {
      split_rows_bf16<true>(xc.data_ptr(), M, K, G, reinterpret_cast<uint16_t*>(xin.data_ptr()), xs.data_ptr<float>());
    } else {
      split_rows_bf16<false>(xc.data_ptr(), M, K, G, reinterpret_cast<uint16_t*>(xin.data_ptr()), xs.data_ptr<float>());
    }
#endif
  }
  if (split == 1 && !i16_path) {
    float* xsp = xs.data_ptr<float>();
    if (bf16_path) {
      const c10::BFloat16* xp = xin.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < MV * NG; ++i) {
        float s = 0.f;
        for (int64_t k = 0; k < G; ++k) s += static_cast<float>(xp[i * G + k]);
        xsp[i] = s;
      }
    } else {
      const float* xp = xin.data_ptr<float>();
      for (int64_t i = 0; i < MV * NG; ++i) {
        float s = 0.f;
        for (int64_t k = 0; k < G; ++k) s += xp[i * G + k];
        xsp[i] = s;
      }
    }
  }
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  Problem pb{packed.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), zp, K, G, G / 2, NG, NBLK, n, MV,
             xin.data_ptr(), xs.data_ptr<float>(), i16_path ? xsc.data_ptr<float>() : nullptr};

  at::parallel_for(0, NBLK, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[MC * NB];
    std::vector<uint16_t, std::allocator<uint16_t>> raw(static_cast<size_t>(pb.P) * TILES * 32 + 64);
    uint16_t* buf = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < MV; m0 += MC) {  // MC is even: hi/lo row pairs never straddle chunks
        const int mc = static_cast<int>(std::min<int64_t>(MC, MV - m0));
        std::fill(out, out + mc * NB, 0.f);
        switch (use) {
#ifdef HT_X86
          case AVX512_BF16:
            if (i16_path) {
              block_i16(pb, b, m0, mc, out);
            } else {
              block_bf16(pb, b, m0, mc, out);
            }
            break;
          case AVX512: block_f32_512(pb, b, m0, mc, out); break;
          case AVX2: block_avx2(pb, b, m0, mc, out, buf); break;
#endif
          default: block_scalar(pb, b, m0, mc, out); break;
        }
        const int64_t r0 = m0 / split;
        if (dt == at::kBFloat16) {
          store_rows(out, mc, split, b * NB, n, y.data_ptr<c10::BFloat16>() + r0 * n, n);
        } else if (dt == at::kHalf) {
          store_rows(out, mc, split, b * NB, n, y.data_ptr<c10::Half>() + r0 * n, n);
        } else {
          store_rows(out, mc, split, b * NB, n, y.data_ptr<float>() + r0 * n, n);
        }
      }
    }
  });
  return y;
}

#ifdef HT_X86
TGT_512 static uint64_t read_range_512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  uint64_t r = static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3))));
  for (; i < n; ++i) r ^= p[i];
  return r;
}
#endif

// Streaming read of a byte tensor over all threads (for measuring DRAM read bandwidth): returns a checksum.
int64_t mem_read(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous(), "mem_read: contiguous uint8");
  const uint8_t* p = t.data_ptr<uint8_t>();
  const int64_t n = t.numel(), chunk = 1 << 20;
  std::vector<uint64_t> part(static_cast<size_t>((n + chunk - 1) / chunk), 0);
  const bool v512 = detect_isa() >= AVX512;
  at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t len = std::min(chunk, n - c * chunk);
      uint64_t r = 0;
#ifdef HT_X86
      if (v512) {
        r = read_range_512(p + c * chunk, len);
      } else
#endif
      {
        for (int64_t i = 0; i < len; ++i) r += p[c * chunk + i];
      }
      part[static_cast<size_t>(c)] = r;
    }
  });
  uint64_t r = 0;
  for (uint64_t v : part) r ^= v;
  return static_cast<int64_t>(r);
}

int64_t cpu_isa() { return detect_isa(); }

int64_t cpu_tune(int64_t rows, int64_t rows_f32, int64_t pf) {
  const int64_t old = g_rows * 10 + g_rows_f32;
  if (pf >= 0) g_pf = static_cast<int>(pf);
  if (rows >= 1) g_rows = static_cast<int>(std::min<int64_t>(rows, ROWS_MAX));
  if (rows_f32 >= 1) g_rows_f32 = static_cast<int>(std::min<int64_t>(rows_f32, ROWS_MAX));
  return old;
}

int64_t cpu_has_vnni() {
#ifdef HT_X86
  return has_vnni() ? 1 : 0;
#else
  return 0;
#endif
}

}  // namespace hubtool_cpu

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def("int4_mm_cpu(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int group_size, int n, int isa=-1, int act=0) -> Tensor");
  m.def("int4_cpu_isa() -> int", &hubtool_cpu::cpu_isa);
  m.def("int4_cpu_has_vnni() -> int", &hubtool_cpu::cpu_has_vnni);
  m.def("int4_cpu_tune(int rows, int rows_f32, int pf) -> int", &hubtool_cpu::cpu_tune);
  m.def("mem_read(Tensor t) -> int", &hubtool_cpu::mem_read);
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) { m.impl("int4_mm_cpu", &hubtool_cpu::int4_mm); }
