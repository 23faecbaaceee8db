// Helpers shared by signround.cpp and block_ops.cpp: 16-bit values to fp32 and back, and bf16 AVX-512
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

}  // namespace hubtool_simd
