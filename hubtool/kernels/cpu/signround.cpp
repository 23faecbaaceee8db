// SignRound's fake quantization, fused (one pass forward, one pass backward) for block tuning on the CPU.
//
// The same arithmetic as TunedLinear.forward_into / backward_from in hubtool/quant/signround.py, which
// stay the reference (and run on other devices):
//   forward:  x = round_half_even(w / s + v) + z; inside = lo <= x <= hi; x = clamp(x, lo, hi);
//             q = x (int8); out = (x - z) * s, rounded to the model dtype
//   backward: per group sums of g * inside * w, g * q, g and g * inside (float), and the SignSGD step
//             v = clamp(v - lr * sign(g * inside) * sign(s), -0.5, 0.5)
//   sym_scale / sym_clip_step: the symmetric scale from alpha and beta, and their SignSGD step from the
//             group sums (one pass each instead of a dozen small torch ops per linear and iteration)
// Per element the results are the reference's bit for bit (IEEE division, round half to even, the same
// fp32 products); the group sums add in another order (they feed only the signs of alpha/beta steps).
// bf16 runs written-out AVX-512 when the CPU has AVX-512BW; everything else runs a plain C++ loop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "simd.h"

namespace {

using namespace hubtool_simd;

inline void store(float x, c10::BFloat16* o) {  // round to nearest even, as c10 (the values are finite)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  o->x = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline void store(float x, c10::Half* o) { *o = c10::Half(x); }
inline void store(float x, float* o) { *o = x; }

// round half to even for |x| < 2^22 (adding 1.5 * 2^23 leaves a float spacing of 1), as torch.round
inline float round_even(float x) {
  const float magic = 12582912.0f;
  return std::fabs(x) < 4194304.0f ? (x + magic) - magic : x;
}

// One group of G weights, plain C++ (fp16, fp32, and bf16 without AVX-512BW): the fake weight, the codes
// and where the clamp passes the gradient.
template <typename T>
void fwd_group(const T* w, const float* v, float sc, float zz, float lo, float hi, int64_t g, T* out, int8_t* q,
               bool* inside) {
  for (int64_t i = 0; i < g; ++i) {
    float x = round_even(to_f(w[i]) / sc + v[i]) + zz;
    inside[i] = (x >= lo) & (x <= hi);
    x = std::min(std::max(x, lo), hi);
    q[i] = static_cast<int8_t>(x);
    store((x - zz) * sc, out + i);
  }
}

// One group: the four sums (16 partial sums each, in the order of the AVX-512 path) and the step of V.
// ``grad(i)`` is dL/dW of the group's i-th weight (a 16-bit value, or an int32 dot product times its scales).
template <typename T, typename Grad>
void bwd_group(Grad grad, const bool* ip, const T* wp, const int8_t* qp, float up, int64_t g, float* v,
               float* sums) {
  constexpr int L = 16;
  float aw[L] = {}, aq[L] = {}, as[L] = {}, ai[L] = {};
  for (int64_t i = 0; i < g; i += L) {
    for (int j = 0; j < L; ++j) {
      const float gf = grad(i + j);
      const float gm = static_cast<float>(ip[i + j]) * gf;
      aw[j] += gm * to_f(wp[i + j]);
      aq[j] += gf * static_cast<float>(qp[i + j]);
      as[j] += gf;
      ai[j] += gm;
      const float sg = static_cast<float>(gm > 0.f) - static_cast<float>(gm < 0.f);
      v[i + j] = std::min(std::max(v[i + j] - up * sg, -0.5f), 0.5f);
    }
  }
  float r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
  for (int j = 0; j < L; ++j) r0 += aw[j], r1 += aq[j], r2 += as[j], r3 += ai[j];
  sums[0] = r0, sums[1] = r1, sums[2] = r2, sums[3] = r3;
}

// dL/dW sixteen at a time for the AVX-512 path: a bf16 gradient, or int32 dot products times their scales.
struct Bf16Grad {
  const c10::BFloat16* p;
  HT_AVX512 __m512 operator()(int64_t i) const { return load16(p + i); }
};
struct I32Grad {
  const int32_t* acc;  // the group's int32 sums
  const float* col;    // the input's scale per column of the group
  float row;           // the output gradient's scale of this row
  HT_AVX512 __m512 operator()(int64_t i) const {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i));
    return _mm512_mul_ps(a, _mm512_mul_ps(_mm512_set1_ps(row), _mm512_loadu_ps(col + i)));
  }
};

// bf16 weights with AVX-512 written out (the compiler keeps the loops above scalar): 16 weights per step.
template <typename Grad>
HT_AVX512 void bwd_group_bf16_avx512(
    Grad grad, const bool* ip, const c10::BFloat16* wp, const int8_t* qp, float up, int64_t g, float* v,
    float* sums) {
  __m512 aw = _mm512_setzero_ps(), aq = _mm512_setzero_ps(), as = _mm512_setzero_ps(), ai = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps(), upv = _mm512_set1_ps(up);
  const __m512 lo = _mm512_set1_ps(-0.5f), hi = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < g; i += 16) {
    const __m512 gf = grad(i), wf = load16(wp + i);
    const __m128i in8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ip + i));
    const __mmask16 in = _mm_test_epi8_mask(in8, in8);
    const __m512 gm = _mm512_maskz_mov_ps(in, gf);
    const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + i))));
    aw = _mm512_add_ps(aw, _mm512_mul_ps(gm, wf));
    aq = _mm512_add_ps(aq, _mm512_mul_ps(gf, qf));
    as = _mm512_add_ps(as, gf);
    ai = _mm512_add_ps(ai, gm);
    __m512 vv = _mm512_loadu_ps(v + i);
    vv = _mm512_mask_sub_ps(vv, _mm512_cmp_ps_mask(gm, zero, _CMP_GT_OQ), vv, upv);  // v - lr * sign(s)
    vv = _mm512_mask_add_ps(vv, _mm512_cmp_ps_mask(gm, zero, _CMP_LT_OQ), vv, upv);  // v + lr * sign(s)
    _mm512_storeu_ps(v + i, _mm512_min_ps(_mm512_max_ps(vv, lo), hi));
  }
  sums[0] = _mm512_reduce_add_ps(aw), sums[1] = _mm512_reduce_add_ps(aq);
  sums[2] = _mm512_reduce_add_ps(as), sums[3] = _mm512_reduce_add_ps(ai);
}

HT_AVX512 void fwd_group_bf16_avx512(
    const c10::BFloat16* w, const float* v, float sc, float zz, float lo, float hi, int64_t g, c10::BFloat16* out,
    int8_t* q, bool* inside) {
  const __m512 s = _mm512_set1_ps(sc), z = _mm512_set1_ps(zz), l = _mm512_set1_ps(lo), h = _mm512_set1_ps(hi);
  for (int64_t i = 0; i < g; i += 16) {
    __m512 x = _mm512_add_ps(_mm512_div_ps(load16(w + i), s), _mm512_loadu_ps(v + i));
    x = _mm512_add_ps(_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    const __mmask16 in = _mm512_cmp_ps_mask(x, l, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, h, _CMP_LE_OQ);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(inside + i), _mm_maskz_mov_epi8(in, _mm_set1_epi8(1)));
    x = _mm512_min_ps(_mm512_max_ps(x, l), h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x)));
    store16(out + i, _mm512_mul_ps(_mm512_sub_ps(x, z), s));
  }
}

template <typename T>
void fwd_impl(const at::Tensor& w, const at::Tensor& v, const at::Tensor& s, const at::Tensor& z, float lo,
              float hi, at::Tensor& out, at::Tensor& q, at::Tensor& inside) {
  const int64_t g = w.size(2);
  const T* wp = w.data_ptr<T>();
  const float* vp = v.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  T* op = out.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  bool* ip = inside.data_ptr<bool>();
  const bool fast = has_avx512bw() && g % 16 == 0;
  at::parallel_for(0, w.size(0) * w.size(1), 16, [&](int64_t b, int64_t e) {
    for (int64_t grp = b; grp < e; ++grp) {
      const int64_t o = grp * g;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (fast) {
          fwd_group_bf16_avx512(wp + o, vp + o, sp[grp], zp[grp], lo, hi, g, op + o, qp + o, ip + o);
          continue;
        }
      }
      fwd_group(wp + o, vp + o, sp[grp], zp[grp], lo, hi, g, op + o, qp + o, ip + o);
    }
  });
}

// The backward over all groups. With ``acc`` (int32, N x K) the gradient is acc[n, k] * row[n] * col[k]
// (an int8 matmul's result and its scales); otherwise ``grad`` (the weight's dtype) is.
template <typename T>
void bwd_impl(const at::Tensor& grad, const at::Tensor* acc, const float* row, const float* col,
              const at::Tensor& inside, const at::Tensor& w, const at::Tensor& q, const at::Tensor& s, at::Tensor& v,
              float lr, at::Tensor& sums) {
  const int64_t g = w.size(2), ng = w.size(1), total = w.size(0) * ng;
  const T* gp = acc ? nullptr : grad.data_ptr<T>();
  const int32_t* ap = acc ? acc->data_ptr<int32_t>() : nullptr;
  const bool* ip = inside.data_ptr<bool>();
  const T* wp = w.data_ptr<T>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* out = sums.data_ptr<float>();  // (4, groups): g*inside*w, g*q, g, g*inside
  const bool fast = has_avx512bw();
  at::parallel_for(0, total, 16, [&](int64_t b, int64_t e) {
    for (int64_t grp = b; grp < e; ++grp) {
      const int64_t o = grp * g;
      const float up = lr * (static_cast<float>(sp[grp] > 0.f) - static_cast<float>(sp[grp] < 0.f));
      float four[4];
      if (ap) {
        const int32_t* a = ap + o;
        const float* c = col + (grp % ng) * g;
        const float r = row[grp / ng];
        bool done = false;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (fast) bwd_group_bf16_avx512(I32Grad{a, c, r}, ip + o, wp + o, qp + o, up, g, vp + o, four), done = true;
        }
        if (!done) {
          auto gl = [&](int64_t i) { return static_cast<float>(a[i]) * (r * c[i]); };
          bwd_group(gl, ip + o, wp + o, qp + o, up, g, vp + o, four);
        }
      } else {
        bool done = false;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (fast) bwd_group_bf16_avx512(Bf16Grad{gp + o}, ip + o, wp + o, qp + o, up, g, vp + o, four), done = true;
        }
        if (!done) {
          const T* gg = gp + o;
          bwd_group([&](int64_t i) { return to_f(gg[i]); }, ip + o, wp + o, qp + o, up, g, vp + o, four);
        }
      }
      for (int k = 0; k < 4; ++k) out[k * total + grp] = four[k];
    }
  });
}

// Per-column symmetric int8: scale[c] = max_t |x[t, c]| / 127, q = round_half_even(x / scale) (0 where the
// column is all zero). Columns are split over the threads; each thread reads its columns row by row.
template <typename T>
void quant_cols_plain(const T* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1, int8_t* q, float* scale) {
  for (int64_t c = c0; c < c1; ++c) scale[c] = 0.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c1; ++c) scale[c] = std::max(scale[c], std::fabs(to_f(x[r * cols + c])));
  for (int64_t c = c0; c < c1; ++c) scale[c] /= 127.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c1; ++c) {
      const float inv = scale[c] > 0.f ? 1.f / scale[c] : 0.f;
      q[r * cols + c] = static_cast<int8_t>(std::nearbyint(to_f(x[r * cols + c]) * inv));
    }
}

// The bf16 AVX-512 path streams rows: each thread takes a block of rows for the column maxima (kept per
// block, then reduced), and again for the codes; reading whole rows in order is what the memory system does best.
HT_AVX512 void col_max_bf16(const c10::BFloat16* x, int64_t r0, int64_t r1, int64_t cols, float* m) {
  for (int64_t c = 0; c < cols; c += 16) _mm512_storeu_ps(m + c, _mm512_setzero_ps());
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < cols; c += 16)
      _mm512_storeu_ps(m + c, _mm512_max_ps(_mm512_loadu_ps(m + c), _mm512_abs_ps(load16(x + r * cols + c))));
}

HT_AVX512 void codes_bf16(const c10::BFloat16* x, int64_t r0, int64_t r1, int64_t cols, const float* inv, int8_t* q) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 y = _mm512_mul_ps(load16(x + r * cols + c), _mm512_loadu_ps(inv + c));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * cols + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(y)));
    }
}

void quant_cols_bf16_rows(const c10::BFloat16* x, int64_t rows, int64_t cols, int8_t* q, float* scale) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
  std::vector<float> part(blocks * cols);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) col_max_bf16(x, rows * t / blocks, rows * (t + 1) / blocks, cols, &part[t * cols]);
  });
  std::vector<float> inv(cols);
  for (int64_t c = 0; c < cols; ++c) {
    float m = 0.f;
    for (int64_t t = 0; t < blocks; ++t) m = std::max(m, part[t * cols + c]);
    scale[c] = m / 127.f;
    inv[c] = scale[c] > 0.f ? 1.f / scale[c] : 0.f;
  }
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) { codes_bf16(x, b, e, cols, inv.data(), q); });
}

template <typename T>
void quant_cols_impl(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* xp = x.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512bw() && cols % 16 == 0) return quant_cols_bf16_rows(xp, rows, cols, qp, sp);
  }
  at::parallel_for(0, cols, 16, [&](int64_t b, int64_t e) { quant_cols_plain(xp, rows, cols, b, e, qp, sp); });
}

void check(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, name, " has the wrong dtype");
}

void signround_fwd(const at::Tensor& w, const at::Tensor& v, const at::Tensor& s, const at::Tensor& z, double lo,
                   double hi, at::Tensor out, at::Tensor q, at::Tensor inside) {
  const auto dt = w.scalar_type();
  check(w, dt, "w"), check(v, at::kFloat, "v"), check(s, at::kFloat, "s"), check(z, at::kFloat, "z");
  check(out, dt, "out"), check(q, at::kChar, "q"), check(inside, at::kBool, "inside");
  TORCH_CHECK(w.dim() == 3 && v.sizes() == w.sizes() && q.sizes() == w.sizes() && inside.sizes() == w.sizes(),
              "w, v, q, inside must be (N, K/G, G)");
  TORCH_CHECK(out.numel() == w.numel() && s.numel() == w.size(0) * w.size(1) && z.numel() == s.numel(),
              "out must hold N*K values and s, z one per group");
  const float l = static_cast<float>(lo), h = static_cast<float>(hi);
  if (dt == at::kBFloat16) {
    fwd_impl<c10::BFloat16>(w, v, s, z, l, h, out, q, inside);
  } else if (dt == at::kHalf) {
    fwd_impl<c10::Half>(w, v, s, z, l, h, out, q, inside);
  } else {
    TORCH_CHECK(dt == at::kFloat, "signround_fwd: bf16, fp16 or fp32 weights");
    fwd_impl<float>(w, v, s, z, l, h, out, q, inside);
  }
}

void check_bwd(const at::Tensor& inside, const at::Tensor& w, const at::Tensor& q, const at::Tensor& s,
               const at::Tensor& v) {
  const auto dt = w.scalar_type();
  check(inside, at::kBool, "inside"), check(w, dt, "w"), check(q, at::kChar, "q");
  check(s, at::kFloat, "s"), check(v, at::kFloat, "v");
  TORCH_CHECK(w.dim() == 3 && w.size(2) % 16 == 0, "w must be (N, K/G, G) with G a multiple of 16");
  TORCH_CHECK(inside.sizes() == w.sizes() && q.sizes() == w.sizes() && v.sizes() == w.sizes() &&
                  s.numel() == w.size(0) * w.size(1),
              "inside, q, v must match w and s have one value per group");
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "signround_bwd: bf16, fp16 or fp32 weights");
}

template <typename... A>
void bwd_dispatch(at::ScalarType dt, A&&... args) {
  if (dt == at::kBFloat16) {
    bwd_impl<c10::BFloat16>(args...);
  } else if (dt == at::kHalf) {
    bwd_impl<c10::Half>(args...);
  } else {
    bwd_impl<float>(args...);
  }
}

at::Tensor signround_bwd(const at::Tensor& grad, const at::Tensor& inside, const at::Tensor& w, const at::Tensor& q,
                         const at::Tensor& s, at::Tensor v, double lr) {
  check_bwd(inside, w, q, s, v);
  check(grad, w.scalar_type(), "grad");
  TORCH_CHECK(grad.numel() == w.numel(), "grad must hold N*K values");
  auto sums = at::empty({4, w.size(0), w.size(1)}, w.options().dtype(at::kFloat));
  bwd_dispatch(w.scalar_type(), grad, nullptr, nullptr, nullptr, inside, w, q, s, v, static_cast<float>(lr), sums);
  return sums;
}

// The same with dL/dW = acc * row[:, None] * col[None, :] (acc: the int32 product of int8 codes).
at::Tensor signround_bwd_i32(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                             const at::Tensor& inside, const at::Tensor& w, const at::Tensor& q, const at::Tensor& s,
                             at::Tensor v, double lr) {
  check_bwd(inside, w, q, s, v);
  check(acc, at::kInt, "acc"), check(row, at::kFloat, "row"), check(col, at::kFloat, "col");
  TORCH_CHECK(acc.numel() == w.numel() && row.numel() == w.size(0) && col.numel() == w.size(1) * w.size(2),
              "acc must hold N*K values, row N and col K");
  auto sums = at::empty({4, w.size(0), w.size(1)}, w.options().dtype(at::kFloat));
  bwd_dispatch(w.scalar_type(), acc, &acc, row.data_ptr<float>(), col.data_ptr<float>(), inside, w, q, s, v,
               static_cast<float>(lr), sums);
  return sums;
}

std::tuple<at::Tensor, at::Tensor> quantize_cols_i8(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous 2-d CPU tensor");
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  const auto dt = x.scalar_type();
  if (dt == at::kBFloat16) {
    quant_cols_impl<c10::BFloat16>(x, q, scale);
  } else if (dt == at::kHalf) {
    quant_cols_impl<c10::Half>(x, q, scale);
  } else {
    TORCH_CHECK(dt == at::kFloat, "quantize_cols_i8: bf16, fp16 or fp32");
    quant_cols_impl<float>(x, q, scale);
  }
  return {q, scale};
}

// The weight error of clipped RTN for the clipping search (hubtool/quant/optrtn.py), the same arithmetic
// as its torch code: e = w - (clamp(round_half_even(w / s) + z, lo, hi) - z) * s, written transposed as
// (G#, N, G) for the batched product with the per-group X^T X blocks.
HT_AVX512 void clip_error_avx512(const float* w, float sc, float zz,
                                                                            float lo, float hi, int64_t g, float* e) {
  const __m512 s = _mm512_set1_ps(sc), z = _mm512_set1_ps(zz), l = _mm512_set1_ps(lo), h = _mm512_set1_ps(hi);
  for (int64_t i = 0; i < g; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    __m512 x = _mm512_roundscale_ps(_mm512_div_ps(wv, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(x, z), l), h);
    _mm512_storeu_ps(e + i, _mm512_sub_ps(wv, _mm512_mul_ps(_mm512_sub_ps(x, z), s)));
  }
}

at::Tensor clip_error(const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, double lo, double hi) {
  check(w, at::kFloat, "w"), check(s, at::kFloat, "s"), check(z, at::kFloat, "z");
  TORCH_CHECK(w.dim() == 3 && s.numel() == w.size(0) * w.size(1) && z.numel() == s.numel(),
              "w must be (N, K/G, G) and s, z one per group");
  const int64_t n = w.size(0), ng = w.size(1), g = w.size(2);
  auto e = at::empty({ng, n, g}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  const float l = static_cast<float>(lo), h = static_cast<float>(hi);
  const bool fast = has_avx512bw() && g % 16 == 0;
  at::parallel_for(0, n * ng, 16, [&](int64_t b, int64_t end) {
    for (int64_t grp = b; grp < end; ++grp) {
      const int64_t row = grp / ng, col = grp % ng;
      const float* wr = wp + grp * g;
      float* er = ep + (col * n + row) * g;
      if (fast) {
        clip_error_avx512(wr, sp[grp], zp[grp], l, h, g, er);
        continue;
      }
      for (int64_t i = 0; i < g; ++i) {
        float x = std::min(std::max(round_even(wr[i] / sp[grp]) + zp[grp], l), h);
        er[i] = wr[i] - (x - zp[grp]) * sp[grp];
      }
    }
  });
  return e;
}

// Symmetric scales from the clipping, as signround.sym_scale: a = wmin * alpha, b = wmax * beta, sel = -a >= b,
// s = fp16(where(sel, a, b) / -half), at least fp16's smallest normal in magnitude (the sign of the unrounded
// value). One pass instead of a dozen torch ops per linear and step.
constexpr float kFp16Tiny = 6.103515625e-05f;

void check_groups(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check(t, at::kFloat, name);
  TORCH_CHECK(t.numel() == like.numel(), name, " must hold one value per group");
}

std::tuple<at::Tensor, at::Tensor> sym_scale(const at::Tensor& wmin, const at::Tensor& wmax, const at::Tensor& alpha,
                                             const at::Tensor& beta, int64_t half) {
  check(wmin, at::kFloat, "wmin"), check_groups(wmax, wmin, "wmax");
  check_groups(alpha, wmin, "alpha"), check_groups(beta, wmin, "beta");
  auto s = at::empty_like(wmin);
  auto sel = at::empty(wmin.sizes(), wmin.options().dtype(at::kBool));
  const float *mn = wmin.data_ptr<float>(), *mx = wmax.data_ptr<float>();
  const float *al = alpha.data_ptr<float>(), *be = beta.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  bool* cp = sel.data_ptr<bool>();
  const float d = -static_cast<float>(half);
  at::parallel_for(0, wmin.numel(), 4096, [&](int64_t b0, int64_t e0) {
    for (int64_t i = b0; i < e0; ++i) {
      const float a = mn[i] * al[i], b = mx[i] * be[i];
      const bool c = -a >= b;
      const float m = (c ? a : b) / d;
      float r = static_cast<float>(c10::Half(m));
      if (std::fabs(r) < kFp16Tiny) r = m < 0.f ? -kFp16Tiny : kFp16Tiny;
      sp[i] = r, cp[i] = c;
    }
  });
  return {s, sel};
}

// The SignSGD step of alpha and beta for symmetric scales from the backward's group sums (TunedLinear.
// backward_from): ds = sum(g q) - sum(g inside w) / s, d max = ds / -half, alpha steps on sign(d max * wmin)
// where the negative end set the scale, beta on sign(d max * wmax) elsewhere; both kept in [0, 1].
void sym_clip_step(const at::Tensor& sums, const at::Tensor& s, const at::Tensor& sel, const at::Tensor& wmin,
                   const at::Tensor& wmax, at::Tensor alpha, at::Tensor beta, int64_t half, double lr) {
  check(s, at::kFloat, "s"), check(sel, at::kBool, "sel"), check(sums, at::kFloat, "sums");
  check_groups(wmin, s, "wmin"), check_groups(wmax, s, "wmax");
  check_groups(alpha, s, "alpha"), check_groups(beta, s, "beta");
  TORCH_CHECK(sel.numel() == s.numel() && sums.numel() >= 2 * s.numel(), "sums must be (4, groups)");
  const int64_t n = s.numel();
  const float *gw = sums.data_ptr<float>(), *gq = gw + n, *sp = s.data_ptr<float>();
  const float *mn = wmin.data_ptr<float>(), *mx = wmax.data_ptr<float>();
  const bool* cp = sel.data_ptr<bool>();
  float *al = alpha.data_ptr<float>(), *be = beta.data_ptr<float>();
  const float d = -static_cast<float>(half), step = static_cast<float>(lr);
  auto sign = [](float x) { return static_cast<float>(x > 0.f) - static_cast<float>(x < 0.f); };
  at::parallel_for(0, n, 4096, [&](int64_t b0, int64_t e0) {
    for (int64_t i = b0; i < e0; ++i) {
      const float dmax = (gq[i] - gw[i] / sp[i]) / d;
      float& t = cp[i] ? al[i] : be[i];
      t = std::min(std::max(t - step * sign(dmax * (cp[i] ? mn[i] : mx[i])), 0.f), 1.f);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def(
      "signround_fwd(Tensor w, Tensor v, Tensor s, Tensor z, float lo, float hi, Tensor(a!) out, Tensor(b!) q, "
      "Tensor(c!) inside) -> ()");
  m.def("signround_bwd(Tensor grad, Tensor inside, Tensor w, Tensor q, Tensor s, Tensor(a!) v, float lr) -> Tensor");
  m.def(
      "signround_bwd_i32(Tensor acc, Tensor row, Tensor col, Tensor inside, Tensor w, Tensor q, Tensor s, "
      "Tensor(a!) v, float lr) -> Tensor");
  m.def("quantize_cols_i8(Tensor x) -> (Tensor, Tensor)");
  m.def("clip_error(Tensor w, Tensor s, Tensor z, float lo, float hi) -> Tensor");
  m.def("sym_scale(Tensor wmin, Tensor wmax, Tensor alpha, Tensor beta, int half) -> (Tensor, Tensor)");
  m.def(
      "sym_clip_step(Tensor sums, Tensor s, Tensor sel, Tensor wmin, Tensor wmax, Tensor(a!) alpha, Tensor(b!) beta, "
      "int half, float lr) -> ()");
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) {
  m.impl("signround_fwd", &signround_fwd);
  m.impl("signround_bwd", &signround_bwd);
  m.impl("signround_bwd_i32", &signround_bwd_i32);
  m.impl("quantize_cols_i8", &quantize_cols_i8);
  m.impl("clip_error", &clip_error);
  m.impl("sym_scale", &sym_scale);
  m.impl("sym_clip_step", &sym_clip_step);
}
