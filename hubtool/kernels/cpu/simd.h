// Helpers shared by the CPU kernels (signround.cpp, block_ops.cpp, dense_mm.cpp, int8_mm.cpp): 16-bit values to fp32 and back, and bf16 AVX-512
// loads and stores (round to nearest even, as c10 does for finite values), in namespace hubtool_simd.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include <immintrin.h>

#define HT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace hubtool_simd {

inline float to_f(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(float x) { return x; }

inline bool has_avx512bw() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

HT_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
HT_AVX512 inline __m256i pack16(__m512 x) {  // to bf16, round to nearest even (finite values)
  const __m512i u = _mm512_castps_si512(x);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                       _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
      16);
  return _mm512_cvtepi32_epi16(r);
}
HT_AVX512 inline void store16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack16(x));
}
HT_AVX512 inline __m512 round16(__m512 x) {  // rounded to bf16 and back
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pack16(x)), 16));
}

// Horizontal sums for the small-M matmuls (dense_mm.cpp, int8_mm.cpp): eight 8-lane vectors -> one vector
// of their eight sums, and the sums of `count` 16-lane vectors into out[0..count).
#define HT_HSUM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HT_HSUM_512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

HT_HSUM_AVX2 inline __attribute__((always_inline)) __m256 hsum8x8(const __m256 h[8]) {
  const __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  // u0 = [s0 s1 s2 s3 (low 128 halves) | s0 s1 s2 s3 (high halves)], u1 likewise for 4..7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

HT_HSUM_512 inline __attribute__((always_inline)) void hsum_512(const __m512* v, int count, float* out) {
  int i = 0;
  for (; i + 8 <= count; i += 8) {
    __m256 h[8];
#pragma GCC unroll 8
    for (int e = 0; e < 8; ++e)
      h[e] = _mm256_add_ps(_mm512_castps512_ps256(v[i + e]), _mm512_extractf32x8_ps(v[i + e], 1));
    _mm256_storeu_ps(out + i, hsum8x8(h));
  }
  for (; i < count; ++i) out[i] = _mm512_reduce_add_ps(v[i]);
}

}  // namespace hubtool_simd

