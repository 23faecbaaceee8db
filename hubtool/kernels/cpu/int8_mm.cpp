// hubtool CPU int8-weight matmul for small M: y (M, N) = (x (M, K) @ q^T) * scale[None, :] (+ bias),
// q int8 (N, K) symmetric codes, scale fp32 (N,) per output row.
//
// Made for a quantized lm_head at a decode step (Gemma 3 270M: 262144 x 640, 168 MB of codes read once
// per token; Llama-3.2-3B: 128256 x 3072). At M = 1..4 the product is a stream over q, as in dense_mm.cpp:
// each row of q is read once, where it lies, widened in registers and multiplied into every row of x; the
// work is split over contiguous ranges of rows of q (at::parallel_for), so each thread streams one region.
//
// Paths, chosen by cpuid at run time (per-function target attributes), all accumulating in fp32:
//   2 avx512      : codes int8 -> int32 -> fp32 (vpmovsxbd + vcvtdq2ps), x converted to fp32 once, FMA on
//                   16 lanes; level 3 (avx512_bf16) runs this path too
//   1 avx2        : the same on 8 lanes
//   0 scalar      : portable C++
// No vdpbf16ps path: the codes are exact in bf16, but turning them into bf16 takes the same two
// conversions per 16 codes plus a vcvtne2ps2bf16 per 32, and such a path (bf16 x, q held in L2, one
// thread) measured 1.5-2x slower than FMA at M = 1..4.
// A tile is NR rows of q x MR rows of x (NR x MR accumulators), summed horizontally eight at a time; the
// tail of K (K % 16 or % 32) uses masked loads (AVX2: a zero-padded copy of the last < 8 codes), so any K
// works. Each sum s is finished as s * scale[n] + bias[n] in fp32 and rounded once to x's dtype. Rows of
// q ahead of the tile are prefetched in software, once per 64 bytes.

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
#define HQ_X86 1
#include <immintrin.h>
#endif

namespace hubtool_cpu {
int64_t cpu_isa();  // int4_mm.cpp: the best ISA level of this CPU, probed once
}

namespace hubtool_int8 {

using hubtool_simd::hsum8x8;
using hubtool_simd::hsum_512;

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
constexpr int MR_MAX = 4;  // rows of x per tile
// Software prefetch (to L1) of the rows of q this many rows ahead of the tile (0: none; tuning knob
// hubtool::int8_cpu_tune).
static int g_pf_rows = 16;

#define HQ_PREFETCH_ROWS(Q, LDQ, NR, K)                                                     \
  if (g_pf_rows) {                                                                          \
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)                                    \
      _mm_prefetch(reinterpret_cast<const char*>(Q + (r + g_pf_rows) * LDQ + K), _MM_HINT_T0); \
  }

struct Job {
  const int8_t* q;  // (N, K) codes, row stride ldq
  int64_t ldq, N, K, M;
  const float* x;  // (M, K) fp32, contiguous
};

// ------------------------------------------------------------------------------------------- scalar
static void tile_scalar(const Job& j, int64_t n0, int nr, int64_t m0, int mr, float* out /* [mr][nr] */) {
  const float* x = j.x;
  for (int m = 0; m < mr; ++m) {
    for (int r = 0; r < nr; ++r) {
      const int8_t* q = j.q + (n0 + r) * j.ldq;
      float s = 0.f;
      for (int64_t k = 0; k < j.K; ++k) s += static_cast<float>(q[k]) * x[(m0 + m) * j.K + k];
      out[m * nr + r] = s;
    }
  }
}

#ifdef HQ_X86
#define TGT_512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

// ------------------------------------------------------------------------------ horizontal sums
// The sums of `count` 8-lane vectors into out[0..count).
TGT_AVX2 static INL void hsum_256(const __m256* v, int count, float* out) {
  int i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, hsum8x8(v + i));
  for (; i < count; ++i) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v[i]), _mm256_extractf128_ps(v[i], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[i] = _mm_cvtss_f32(s);
  }
}

// ------------------------------------------------------------------------------ avx512 (fp32 FMA)
// 16 codes (16 bytes at p, or the bytes of `mask`) as 16 fp32 values.
TGT_512 static INL __m512 codes16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
TGT_512 static INL __m512 codes16_masked(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

template <int NR, int MR>
TGT_512 static INL void step_f32_512(const int8_t* q, int64_t ldq, const float* x, int64_t K, int64_t k,
                                     __m512 (&acc)[MR][NR]) {
  __m512 qv[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) qv[r] = codes16(q + r * ldq + k);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(qv[r], xv, acc[m][r]);
  }
}

template <int NR, int MR>
TGT_512 static void tile_f32_512(const Job& j, int64_t n0, int64_t m0, float* out /* [MR][NR] */) {
  __m512 acc[MR][NR];
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* q = j.q + n0 * j.ldq;
  const float* x = j.x + m0 * j.K;
  const int64_t K = j.K, ldq = j.ldq;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    HQ_PREFETCH_ROWS(q, ldq, NR, k)
#pragma GCC unroll 4
    for (int s = 0; s < 64; s += 16) step_f32_512<NR, MR>(q, ldq, x, K, k + s, acc);
  }
  for (; k + 16 <= K; k += 16) step_f32_512<NR, MR>(q, ldq, x, K, k, acc);
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 qv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) qv[r] = codes16_masked(q + r * ldq + k, mask);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(qv[r], xv, acc[m][r]);
    }
  }
  hsum_512(&acc[0][0], MR * NR, out);
}

// ------------------------------------------------------------------------------ avx2 (fp32 FMA)
TGT_AVX2 static INL __m256 codes8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int NR, int MR>
TGT_AVX2 static INL void step_avx2(const int8_t* q, int64_t ldq, const float* x, int64_t K, int64_t k,
                                   __m256 (&acc)[MR][NR]) {
  __m256 qv[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) qv[r] = codes8(q + r * ldq + k);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(qv[r], xv, acc[m][r]);
  }
}

template <int NR, int MR>
TGT_AVX2 static void tile_f32_avx2(const Job& j, int64_t n0, int64_t m0, float* out /* [MR][NR] */) {
  __m256 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const int8_t* q = j.q + n0 * j.ldq;
  const float* x = j.x + m0 * j.K;
  const int64_t K = j.K, ldq = j.ldq;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    HQ_PREFETCH_ROWS(q, ldq, NR, k)
#pragma GCC unroll 8
    for (int s = 0; s < 64; s += 8) step_avx2<NR, MR>(q, ldq, x, K, k + s, acc);
  }
  for (; k + 8 <= K; k += 8) step_avx2<NR, MR>(q, ldq, x, K, k, acc);
  if (k < K) {
    // the last < 8 codes of each row through a zero-padded copy; x's lanes past K masked off
    const int t = static_cast<int>(K - k);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(t), lane);
    __m256 qv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      int8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, q + r * ldq + k, static_cast<size_t>(t));
      qv[r] = codes8(buf);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * K + k, mask);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(qv[r], xv, acc[m][r]);
    }
  }
  hsum_256(&acc[0][0], MR * NR, out);
}
#endif  // HQ_X86

// ------------------------------------------------------------------------------------ dispatch
// One tile of NR rows of q by mr (<= MR_MAX) rows of x, on ISA path `path`; null: the scalar tile.
using TileFn = void (*)(const Job&, int64_t, int64_t, float*);

template <int NR>
static TileFn pick_tile(int path, int mr) {
#ifdef HQ_X86
#define HQ_MR(FN)               \
  switch (mr) {                 \
    case 1: return &FN<NR, 1>;  \
    case 2: return &FN<NR, 2>;  \
    case 3: return &FN<NR, 3>;  \
    default: return &FN<NR, 4>; \
  }
  if (path == AVX512) HQ_MR(tile_f32_512)
  if (path == AVX2) HQ_MR(tile_f32_avx2)
#undef HQ_MR
#endif
  (void)path, (void)mr;
  return nullptr;
}

static TileFn pick(int nr, int path, int mr) {
  switch (nr) {
    case 8: return pick_tile<8>(path, mr);
    case 4: return pick_tile<4>(path, mr);
    case 2: return pick_tile<2>(path, mr);
    default: return pick_tile<1>(path, mr);
  }
}

template <typename T>
static void store_tile(const float* acc, int nr, int mr, int64_t n0, int64_t m0, const float* scale,
                       const float* bias, T* y, int64_t N) {
  for (int m = 0; m < mr; ++m)
    for (int r = 0; r < nr; ++r) {
      const float b = bias ? bias[n0 + r] : 0.f;
      y[(m0 + m) * N + n0 + r] = static_cast<T>(acc[m * nr + r] * scale[n0 + r] + b);
    }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const std::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2, "hubtool::int8_mm_cpu: x (M, K) and q (N, K) must be 2-D");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "hubtool::int8_mm_cpu: CPU tensors only");
  const at::ScalarType xt = x.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kHalf || xt == at::kFloat,
              "hubtool::int8_mm_cpu: x must be bf16, fp16 or fp32");
  TORCH_CHECK(q.scalar_type() == at::kChar, "hubtool::int8_mm_cpu: q must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K, "hubtool::int8_mm_cpu: x has ", K, " columns, q ", q.size(1));
  // q is read where it lies (no copy): rows of contiguous codes at any row stride.
  TORCH_CHECK(K == 0 || N == 0 || (q.stride(1) == 1 && q.stride(0) >= K),
              "hubtool::int8_mm_cpu: q's rows must be contiguous");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && at::isFloatingType(scale.scalar_type()),
              "hubtool::int8_mm_cpu: scale must be a float vector of N values");
  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu() &&
                    at::isFloatingType(bias->scalar_type()),
                "hubtool::int8_mm_cpu: bias must be a CPU float vector of N values");
    b32 = bias->to(at::kFloat).contiguous();
  }
  const int best = static_cast<int>(hubtool_cpu::cpu_isa());
  const int use = isa < 0 ? best : static_cast<int>(isa);
  TORCH_CHECK(use <= best, "hubtool::int8_mm_cpu: ISA level ", use, " requested, this CPU has ", best);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return b32.defined() ? b32.to(xt).unsqueeze(0).expand({M, N}).contiguous() : y.zero_();
  const int path = use == AVX512_BF16 ? AVX512 : use;  // no vdpbf16ps path (see the top of the file)
  const at::Tensor xin = x.to(at::kFloat).contiguous();
  const Job job{q.data_ptr<int8_t>(), q.stride(0), N, K, M, xin.data_ptr<float>()};
  const float* sp = s32.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  // Rows of q per tile: 8 at M = 1 (more independent accumulators), else 4 (4 x 4 accumulators); AVX2
  // (16 registers) 4 at M <= 2, else 2.
  const int nr_main = path == AVX2 ? (M <= 2 ? 4 : 2) : (M == 1 ? 8 : 4);
  // At least ~128 KiB of q per task, so that small layers run on one thread without fork overhead.
  const int64_t grain = std::max<int64_t>(nr_main, (int64_t{1} << 17) / std::max<int64_t>(K, 1));
  // Tile functions for the row chunks of x: full chunks of MR_MAX rows, and the last, shorter one.
  const int mr_last = static_cast<int>((M - 1) % MR_MAX + 1);
  const TileFn main_fn[2] = {pick(nr_main, path, MR_MAX), pick(nr_main, path, mr_last)};
  const TileFn tail_fn[2] = {pick(1, path, MR_MAX), pick(1, path, mr_last)};
  void* yp = y.data_ptr();
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    float acc[8 * MR_MAX];
    for (int64_t n0 = r0; n0 < r1;) {
      const int nr = r1 - n0 >= nr_main ? nr_main : 1;
      // every row chunk of x in turn, while these nr rows of q stay in L1
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
          store_tile(acc, nr, mr, n0, m0, sp, bp, static_cast<c10::BFloat16*>(yp), N);
        } else if (xt == at::kHalf) {
          store_tile(acc, nr, mr, n0, m0, sp, bp, static_cast<c10::Half*>(yp), N);
        } else {
          store_tile(acc, nr, mr, n0, m0, sp, bp, static_cast<float*>(yp), N);
        }
      }
      n0 += nr;
    }
  });
  return y;
}

// Sets the prefetch distance in rows of q (pf_rows >= 0; 0: none) and returns the previous one.
int64_t int8_tune(int64_t pf_rows) {
  const int64_t old = g_pf_rows;
  if (pf_rows >= 0) g_pf_rows = static_cast<int>(pf_rows);
  return old;
}

}  // namespace hubtool_int8

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def("int8_mm_cpu(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("int8_cpu_tune(int pf_rows) -> int", &hubtool_int8::int8_tune);
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) { m.impl("int8_mm_cpu", &hubtool_int8::int8_mm); }
