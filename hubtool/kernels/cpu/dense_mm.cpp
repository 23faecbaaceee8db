// hubtool CPU dense matmul for small M: y (M, N) = x (M, K) @ W^T (+ bias), W bf16 or fp16 (N, K).
//
// Made for the 16-bit linears that stay in an int4 model, the lm_head above all (Gemma 3 270M: 262144 x 640,
// 335 MB of bf16 read once per decoded token). At M = 1..8 such a product is a stream over W: each row of W
// is read once, from its place (no repacked copy, so a head tied to the embedding does not double), and
// multiplied into every row of x while it sits in registers; the work is split over contiguous ranges of
// rows of W (at::parallel_for), so each thread streams one region.
//
// Paths, chosen by cpuid at run time (per-function target attributes), all accumulating in fp32:
//   3 avx512_bf16 : bf16 W and bf16 x, M <= 2: vdpbf16ps (products of two bf16 are exact in fp32)
//   2 avx512      : every other case (fp16 W, fp16/fp32 x, M >= 3): W widened to fp32, x converted to
//                   fp32 once, FMA on 16 lanes
//   1 avx2        : the same on 8 lanes
//   0 scalar      : portable C++
// A tile is NR rows of W x MR rows of x (NR x MR accumulators); per tile the accumulators are summed
// horizontally eight at a time (a transpose-and-add of 8 vectors instead of 8 separate reductions). The
// tail of K (K % 32 or % 16) uses masked loads, so any K works; the output is rounded once to x's dtype.
// Rows of W ahead of the tile are prefetched in software. At M >= 6 the multiply work of these paths
// reaches the time of the reads and torch's matmul is as fast (runtime.dense sends M > 4 to torch);
// AMX tiles would lift that limit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#define HD_X86 1
#include <immintrin.h>
#endif

namespace hubtool_cpu {
int64_t cpu_isa();  // int4_mm.cpp: the best ISA level of this CPU, probed once
}

namespace hubtool_dense {

using hubtool_simd::hsum8x8;
using hubtool_simd::hsum_512;
using hubtool_simd::to_f;

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
constexpr int MR_MAX = 4;  // rows of x per tile
// Software prefetch (to L1) of the rows of W this many rows ahead of the tile (0: none; tuning knob
// hubtool::dense_cpu_tune). Measured on the Gemma 3 head at M = 1: +20-30% over the hardware prefetchers
// alone; 8 to 64 rows ahead are within noise of each other, non-temporal hints were much slower.
static int g_pf_rows = 16;

#define HD_PREFETCH_ROWS(W, LDW, NR, K)                                                     \
  if (g_pf_rows) {                                                                          \
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)                                    \
      _mm_prefetch(reinterpret_cast<const char*>(W + (r + g_pf_rows) * LDW + K), _MM_HINT_T0); \
  }

struct Job {
  const uint16_t* w;  // (N, K) bf16 or fp16 bits, row stride ldw
  int64_t ldw, N, K, M;
  const void* x;  // (M, K) bf16 (vdpbf16ps path) or fp32 (every other path), contiguous
  bool half;      // W holds fp16 (else bf16)
};

// ------------------------------------------------------------------------------------------- scalar
inline float w_at(const Job& j, int64_t n, int64_t k) {
  const uint16_t b = j.w[n * j.ldw + k];
  if (j.half) return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  return to_f(c10::BFloat16(b, c10::BFloat16::from_bits()));
}

static void tile_scalar(const Job& j, int64_t n0, int nr, int64_t m0, int mr, float* out /* [mr][nr] */) {
  const float* x = static_cast<const float*>(j.x);
  for (int m = 0; m < mr; ++m) {
    for (int r = 0; r < nr; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < j.K; ++k) s += w_at(j, n0 + r, k) * x[(m0 + m) * j.K + k];
      out[m * nr + r] = s;
    }
  }
}

#ifdef HD_X86
#define TGT_512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

// ------------------------------------------------------------------------------ horizontal sums
TGT_AVX2 static INL float hsum_256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ------------------------------------------------------------------------- avx512_bf16 (bf16 x bf16)
template <int NR, int MR>
TGT_BF16 static void tile_bf16(const Job& j, int64_t n0, int64_t m0, float* out /* [MR][NR] */) {
  __m512 acc[MR][NR];
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* w = j.w + n0 * j.ldw;
  const uint16_t* x = static_cast<const uint16_t*>(j.x) + m0 * j.K;
  const int64_t K = j.K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
    HD_PREFETCH_ROWS(w, j.ldw, NR, k)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * j.ldw + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * j.ldw + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], xv);
    }
  }
  hsum_512(&acc[0][0], MR * NR, out);
}

// ------------------------------------------------------------------------- avx512 (fp32 FMA)
template <bool HALF>
TGT_512 static INL __m512 widen16(__m256i h) {
  if (HALF) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int NR, int MR, bool HALF>
TGT_512 static void tile_f32_512(const Job& j, int64_t n0, int64_t m0, float* out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* w = j.w + n0 * j.ldw;
  const float* x = static_cast<const float*>(j.x) + m0 * j.K;
  const int64_t K = j.K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    if ((k & 31) == 0) HD_PREFETCH_ROWS(w, j.ldw, NR, k)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      wv[r] = widen16<HALF>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * j.ldw + k)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = widen16<HALF>(_mm256_maskz_loadu_epi16(mask, w + r * j.ldw + k));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  hsum_512(&acc[0][0], MR * NR, out);
}

// ------------------------------------------------------------------------------ avx2 (fp32 FMA)
template <bool HALF>
TGT_AVX2 static INL __m256 widen8(__m128i h) {
  if (HALF) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int NR, int MR, bool HALF>
TGT_AVX2 static void tile_f32_avx2(const Job& j, int64_t n0, int64_t m0, float* out) {
  __m256 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint16_t* w = j.w + n0 * j.ldw;
  const float* x = static_cast<const float*>(j.x) + m0 * j.K;
  const int64_t K = j.K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    if ((k & 31) == 0) HD_PREFETCH_ROWS(w, j.ldw, NR, k)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      wv[r] = widen8<HALF>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * j.ldw + k)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < NR; ++r) {
      float s = hsum_256(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += w_at(j, n0 + r, kk) * x[m * K + kk];
      out[m * NR + r] = s;
    }
  }
}
#endif  // HD_X86

// ------------------------------------------------------------------------------------ dispatch
// One tile of nr (<= 8) rows of W by mr (<= MR_MAX) rows of x, on ISA path `path`.
using TileFn = void (*)(const Job&, int64_t, int64_t, float*);

template <int NR>
static TileFn pick_tile(int path, bool half, int mr) {
#ifdef HD_X86
#define HD_MR(FN)                     \
  switch (mr) {                       \
    case 1: return &FN<NR, 1>;        \
    case 2: return &FN<NR, 2>;        \
    case 3: return &FN<NR, 3>;        \
    default: return &FN<NR, 4>;       \
  }
#define HD_MR_H(FN, H)                \
  switch (mr) {                       \
    case 1: return &FN<NR, 1, H>;     \
    case 2: return &FN<NR, 2, H>;     \
    case 3: return &FN<NR, 3, H>;     \
    default: return &FN<NR, 4, H>;    \
  }
  if (path == AVX512_BF16) HD_MR(tile_bf16)
  if (path == AVX512) {
    if (half) HD_MR_H(tile_f32_512, true)
    HD_MR_H(tile_f32_512, false)
  }
  if (path == AVX2) {
    if (half) HD_MR_H(tile_f32_avx2, true)
    HD_MR_H(tile_f32_avx2, false)
  }
#undef HD_MR
#undef HD_MR_H
#endif
  (void)path, (void)half, (void)mr;
  return nullptr;
}

template <typename T>
static void store_tile(const float* acc, int nr, int mr, int64_t n0, int64_t m0, const float* bias, T* y,
                       int64_t N) {
  for (int m = 0; m < mr; ++m)
    for (int r = 0; r < nr; ++r)
      y[(m0 + m) * N + n0 + r] = static_cast<T>(acc[m * nr + r] + (bias ? bias[n0 + r] : 0.f));
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "hubtool::dense_mm_cpu: x (M, K) and w (N, K) must be 2-D");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "hubtool::dense_mm_cpu: CPU tensors only");
  const at::ScalarType xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kHalf || xt == at::kFloat,
              "hubtool::dense_mm_cpu: x must be bf16, fp16 or fp32");
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf, "hubtool::dense_mm_cpu: w must be bf16 or fp16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "hubtool::dense_mm_cpu: x has ", K, " columns, w ", w.size(1));
  // W is read where it lies (no copy): rows of contiguous values at any row stride.
  TORCH_CHECK(K == 0 || N == 0 || (w.stride(1) == 1 && w.stride(0) >= K),
              "hubtool::dense_mm_cpu: w's rows must be contiguous");
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                "hubtool::dense_mm_cpu: bias must be a CPU vector of N values");
    b32 = bias->to(at::kFloat).contiguous();
  }
  const int best = static_cast<int>(hubtool_cpu::cpu_isa());
  const int use = isa < 0 ? best : static_cast<int>(isa);
  TORCH_CHECK(use <= best, "hubtool::dense_mm_cpu: ISA level ", use, " requested, this CPU has ", best);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return b32.defined() ? b32.to(xt).unsqueeze(0).expand({M, N}).contiguous() : y.zero_();
  const bool half = wt == at::kHalf;
  // vdpbf16ps for bf16 x bf16 at M <= 2; from M = 3 up the FMA path (x widened to fp32, exact too) was
  // measured faster (a weight held in L2, one thread: 45 vs 52 us at M = 3, 98 vs 115 us at M = 8).
  const bool dp = use == AVX512_BF16 && !half && xt == at::kBFloat16 && M <= 2;
  const int path = (use == AVX512_BF16 && !dp) ? AVX512 : use;
  const at::Tensor xin = path == AVX512_BF16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  const Job job{reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), N, K, M, xin.data_ptr(), half};
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  // Rows of W per tile: 8 for one row of x (more independent accumulators), else 4 (4 x 4 accumulators).
  const int nr_main = (M == 1 && path != AVX2) ? 8 : 4;
  // At least ~256 KiB of W per task, so that small layers run on one thread without fork overhead.
  const int64_t grain = std::max<int64_t>(nr_main, (int64_t{1} << 17) / std::max<int64_t>(K, 1));
  // Tile functions for the row chunks of x: full chunks of MR_MAX rows, and the last, shorter one.
  const int mr_last = static_cast<int>((M - 1) % MR_MAX + 1);
  const TileFn main_fn[2] = {nr_main == 8 ? pick_tile<8>(path, half, MR_MAX) : pick_tile<4>(path, half, MR_MAX),
                             nr_main == 8 ? pick_tile<8>(path, half, mr_last) : pick_tile<4>(path, half, mr_last)};
  const TileFn tail_fn[2] = {pick_tile<1>(path, half, MR_MAX), pick_tile<1>(path, half, mr_last)};
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    float acc[8 * MR_MAX];
    for (int64_t n0 = r0; n0 < r1;) {
      const int nr = r1 - n0 >= nr_main ? nr_main : 1;
      // every row chunk of x in turn, while these nr rows of W stay in L1
      for (int64_t m0 = 0; m0 < M; m0 += MR_MAX) {
        const bool last = m0 + MR_MAX >= M;
        const int mr = last ? mr_last : MR_MAX;
        const TileFn fn = nr == nr_main ? main_fn[last] : tail_fn[last];
        if (fn) {
          fn(job, n0, m0, acc);
        } else {
          tile_scalar(job, n0, nr, m0, mr, acc);
        }
        if (xt == at::kBFloat16) {
          store_tile(acc, nr, mr, n0, m0, bp, y.data_ptr<c10::BFloat16>(), N);
        } else if (xt == at::kHalf) {
          store_tile(acc, nr, mr, n0, m0, bp, y.data_ptr<c10::Half>(), N);
        } else {
          store_tile(acc, nr, mr, n0, m0, bp, y.data_ptr<float>(), N);
        }
      }
      n0 += nr;
    }
  });
  return y;
}

// Sets the prefetch distance in rows of W (pf_rows >= 0; 0: none) and returns the previous one.
int64_t dense_tune(int64_t pf_rows) {
  const int64_t old = g_pf_rows;
  if (pf_rows >= 0) g_pf_rows = static_cast<int>(pf_rows);
  return old;
}

}  // namespace hubtool_dense

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def("dense_mm_cpu(Tensor x, Tensor w, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("dense_cpu_tune(int pf_rows) -> int", &hubtool_dense::dense_tune);
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) { m.impl("dense_mm_cpu", &hubtool_dense::dense_mm); }
