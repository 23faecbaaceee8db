// Elementwise parts of a decoder block, fused for block tuning on the CPU (hubtool/quant/fused.py).
//
// SignRound runs every block forward and backward about a hundred times; torch runs a gated MLP's
// activation and an RMSNorm as five to ten passes over memory each, forward and backward. These do one.
// They compute the same functions with the same roundings to the model dtype as the transformers code
// they replace (act(gate) rounded, then times up rounded; the norm in fp32), so results agree with it
// to about one unit in the last place.
//
//   gated_act_fwd(gu, kind) -> h        h = act(gu[:, :I]) * gu[:, I:]        kind 0: silu, 1: gelu (tanh)
//   gated_act_bwd(dh, gu, kind) -> dgu  d gate = (dh * up) * act'(gate), d up = dh * act(gate)
//   rms_norm_fwd(x, w, eps, mode) -> (y, rstd), rms_norm_bwd(dy, x, w, rstd, mode) -> dx   (below)
//   rope(x, cos, sin, sizes, strides, backward) -> y                                       (below)
//   masked_softmax(logits, mask, scale, kv_heads, group, dtype) -> p, softmax_bwd(dp, p, scale) -> ds
//                                                   attention's softmax (hubtool/quant/attention.py; below)
//
// bf16 runs written-out AVX-512 when the CPU has AVX-512BW; everything else runs a plain C++ loop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "simd.h"

namespace {

using namespace hubtool_simd;

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

template <typename T>
inline float rnd(float x) {  // x rounded to T and back (what storing an intermediate in T does)
  return to_f(static_cast<T>(x));
}

// act(x) and act'(x) in torch's own formulas (so that the fp32 values round to the same 16-bit ones):
// silu = x / (1 + exp(-x)), silu' = s (1 + x (1 - s)); gelu_tanh = 0.5 x (1 + tanh(inner)),
// inner = beta (x + kappa x^3), gelu' = 0.5 (1 + t) + 0.5 x (1 - t^2) beta (1 + 3 kappa x^2)
inline void act_plain(int kind, float x, float* a, float* da) {
  if (kind == 0) {
    const float e = 1.f + std::exp(-x);
    *a = x / e;
    if (da) {
      const float sg = 1.f / e;
      *da = sg * (1.f + x * (1.f - sg));
    }
  } else {
    const float t = std::tanh(kGeluC * (x + kGeluA * (x * x * x)));
    const float left = 0.5f * x, right = 1.f + t;
    *a = left * right;
    if (da) *da = 0.5f * right + left * (1.f - t * t) * (kGeluC * (1.f + 3.f * kGeluA * (x * x)));
  }
}

template <typename T>
void fwd_rows_plain(const T* gu, int64_t inter, int64_t r0, int64_t r1, int kind, T* h) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = gu + r * 2 * inter;
    const T* u = g + inter;
    for (int64_t i = 0; i < inter; ++i) {
      float a;
      act_plain(kind, to_f(g[i]), &a, nullptr);
      h[r * inter + i] = static_cast<T>(rnd<T>(a) * to_f(u[i]));
    }
  }
}

template <typename T>
void bwd_rows_plain(const T* dh, const T* gu, int64_t inter, int64_t r0, int64_t r1, int kind, T* dgu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = gu + r * 2 * inter;
    const T* u = g + inter;
    const T* d = dh + r * inter;
    T* dg = dgu + r * 2 * inter;
    T* du = dg + inter;
    for (int64_t i = 0; i < inter; ++i) {
      float a, da;
      act_plain(kind, to_f(g[i]), &a, &da);
      const float dd = to_f(d[i]);
      du[i] = static_cast<T>(dd * rnd<T>(a));
      dg[i] = static_cast<T>(rnd<T>(dd * to_f(u[i])) * da);
    }
  }
}

// ---- AVX-512 (bf16) -------------------------------------------------------------------------------
// exp(x): 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, degree-7 Taylor (relative error < 1e-8 + fp32
// rounding); scalef gives 0 / inf outside the range.
HT_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp is 0 in fp32 below; far below, n - x would lose x
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  const __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / d for d >= 1 to about 1 ulp: the 14-bit estimate and one Newton step (a division costs several
// times more); d is capped at 1e30 so that an infinite d gives about 0, not inf * 0
HT_AVX512 inline __m512 rcp16(__m512 d) {
  d = _mm512_min_ps(d, _mm512_set1_ps(1e30f));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

// tanh(y) = sign(y) (1 - 2 / (exp(2|y|) + 1)): near +-1 as exact as fp32 allows (1 + tanh must not lose
// what torch keeps of the tail), near 0 about 1e-7 absolute, far below the 16-bit rounding of the results
HT_AVX512 inline __m512 tanh16(__m512 y) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 big = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), rcp16(_mm512_add_ps(exp16(_mm512_add_ps(ay, ay)), one)), one);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), sign));
}

// act and act' of 16 values (da only when wanted), the formulas of act_plain
HT_AVX512 inline __m512 act16(int kind, __m512 x, __m512* da) {
  const __m512 one = _mm512_set1_ps(1.f);
  if (kind == 0) {
    const __m512 sg = rcp16(_mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    if (da) *da = _mm512_mul_ps(sg, _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, sg))));
    return _mm512_mul_ps(x, sg);
  }
  const __m512 half = _mm512_set1_ps(0.5f), beta = _mm512_set1_ps(kGeluC), kappa = _mm512_set1_ps(kGeluA);
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 t = tanh16(_mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, x2), x, x)));
  const __m512 left = _mm512_mul_ps(half, x), right = _mm512_add_ps(one, t);
  if (da) {
    const __m512 inner_d = _mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_set1_ps(3.f * kGeluA), x2, one));
    const __m512 right_d = _mm512_mul_ps(_mm512_mul_ps(left, _mm512_fnmadd_ps(t, t, one)), inner_d);
    *da = _mm512_fmadd_ps(half, right, right_d);
  }
  return _mm512_mul_ps(left, right);
}

HT_AVX512 void fwd_rows_bf16(const c10::BFloat16* gu, int64_t inter, int64_t r0, int64_t r1, int kind,
                             c10::BFloat16* h) {
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* g = gu + r * 2 * inter;
    const c10::BFloat16* u = g + inter;
    for (int64_t i = 0; i < inter; i += 16) {
      const __m512 a = round16(act16(kind, load16(g + i), nullptr));
      store16(h + r * inter + i, _mm512_mul_ps(a, load16(u + i)));
    }
  }
}

HT_AVX512 void bwd_rows_bf16(const c10::BFloat16* dh, const c10::BFloat16* gu, int64_t inter, int64_t r0,
                             int64_t r1, int kind, c10::BFloat16* dgu) {
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* g = gu + r * 2 * inter;
    const c10::BFloat16* u = g + inter;
    const c10::BFloat16* d = dh + r * inter;
    c10::BFloat16* dg = dgu + r * 2 * inter;
    c10::BFloat16* du = dg + inter;
    for (int64_t i = 0; i < inter; i += 16) {
      __m512 da;
      const __m512 a = round16(act16(kind, load16(g + i), &da));
      const __m512 dd = load16(d + i);
      store16(du + i, _mm512_mul_ps(dd, a));
      store16(dg + i, _mm512_mul_ps(round16(_mm512_mul_ps(dd, load16(u + i))), da));
    }
  }
}

// Calls f(T()) with T the C++ type of dt: bf16, fp16 or fp32 (the callers have checked it is one of them).
template <typename F>
void with_dtype(at::ScalarType dt, F f) {
  if (dt == at::kBFloat16) {
    f(c10::BFloat16());
  } else if (dt == at::kHalf) {
    f(c10::Half());
  } else {
    f(float());
  }
}

void check_gu(const at::Tensor& gu, int64_t kind) {
  TORCH_CHECK(gu.device().is_cpu() && gu.is_contiguous() && gu.dim() >= 1 && gu.size(-1) % 2 == 0,
              "gu must be a contiguous CPU tensor with [gate | up] in its last dimension");
  TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 (silu) or 1 (gelu, tanh)");
  const auto dt = gu.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "bf16, fp16 or fp32");
}

template <typename F>
void over_rows(int64_t rows, int64_t inter, F f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inter, 1));
  at::parallel_for(0, rows, grain, f);
}

template <typename T>
void fwd_impl(const at::Tensor& gu, int64_t inter, int64_t rows, int k, at::Tensor& h) {
  const T* gp = gu.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  over_rows(rows, inter, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (has_avx512bw() && inter % 16 == 0) return fwd_rows_bf16(gp, inter, b, e, k, hp);
    }
    fwd_rows_plain(gp, inter, b, e, k, hp);
  });
}

template <typename T>
void bwd_impl(const at::Tensor& dh, const at::Tensor& gu, int64_t inter, int64_t rows, int k, at::Tensor& dgu) {
  const T* gp = gu.data_ptr<T>();
  const T* dp = dh.data_ptr<T>();
  T* op = dgu.data_ptr<T>();
  over_rows(rows, inter, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (has_avx512bw() && inter % 16 == 0) return bwd_rows_bf16(dp, gp, inter, b, e, k, op);
    }
    bwd_rows_plain(dp, gp, inter, b, e, k, op);
  });
}

at::Tensor gated_act_fwd(const at::Tensor& gu, int64_t kind) {
  check_gu(gu, kind);
  const int64_t inter = gu.size(-1) / 2, rows = gu.numel() / (2 * inter);
  auto sizes = gu.sizes().vec();
  sizes.back() = inter;
  auto h = at::empty(sizes, gu.options());
  const int k = static_cast<int>(kind);
  const auto dt = gu.scalar_type();
  with_dtype(dt, [&](auto tag) { fwd_impl<decltype(tag)>(gu, inter, rows, k, h); });
  return h;
}

at::Tensor gated_act_bwd(const at::Tensor& dh, const at::Tensor& gu, int64_t kind) {
  check_gu(gu, kind);
  const int64_t inter = gu.size(-1) / 2, rows = gu.numel() / (2 * inter);
  TORCH_CHECK(dh.is_contiguous() && dh.scalar_type() == gu.scalar_type() && dh.numel() == rows * inter,
              "dh must be contiguous, of gu's dtype, with half its last dimension");
  auto dgu = at::empty_like(gu);
  const int k = static_cast<int>(kind);
  const auto dt = gu.scalar_type();
  with_dtype(dt, [&](auto tag) { bwd_impl<decltype(tag)>(dh, gu, inter, rows, k, dgu); });
  return dgu;
}

// ---- RMSNorm ---------------------------------------------------------------------------------------
// y = n * w (mode 0, Gemma: w = 1 + weight, rounded once) or y = round(n) * w (mode 1, Llama: the
// normalized value rounded to the dtype, then times the dtype's weight), n = x * r, r = 1 / sqrt(mean(x^2)
// + eps) in fp32. The backward (the weight is frozen in tuning) gives dx = r (dn - n mean(dn n)),
// dn = dy * w (mode 1: rounded to the dtype, as autograd does).

template <typename T>
void norm_fwd_rows(const T* x, const float* w, int64_t d, float eps, int mode, int64_t r0, int64_t r1, T* y,
                   float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += to_f(xr[i]) * to_f(xr[i]);
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[r] = rs;
    for (int64_t i = 0; i < d; ++i) {
      const float n = to_f(xr[i]) * rs;
      y[r * d + i] = static_cast<T>(mode == 0 ? n * w[i] : rnd<T>(n) * w[i]);
    }
  }
}

template <typename T>
void norm_bwd_rows(const T* dy, const T* x, const float* w, const float* rstd, int64_t d, int mode, int64_t r0,
                   int64_t r1, T* dx) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float dn = mode == 0 ? to_f(gr[i]) * w[i] : rnd<T>(to_f(gr[i]) * w[i]);
      dot += dn * to_f(xr[i]);
    }
    const float c = dot * rs * rs / static_cast<float>(d);
    for (int64_t i = 0; i < d; ++i) {
      const float dn = mode == 0 ? to_f(gr[i]) * w[i] : rnd<T>(to_f(gr[i]) * w[i]);
      dx[r * d + i] = static_cast<T>(rs * (dn - to_f(xr[i]) * c));
    }
  }
}

HT_AVX512 void norm_fwd_rows_bf16(const c10::BFloat16* x, const float* w, int64_t d, float eps, int mode, int64_t r0,
                                  int64_t r1, c10::BFloat16* y, float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* xr = x + r * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 v = load16(xr + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float rs = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + eps);
    rstd[r] = rs;
    const __m512 rv = _mm512_set1_ps(rs);
    for (int64_t i = 0; i < d; i += 16) {
      __m512 n = _mm512_mul_ps(load16(xr + i), rv);
      if (mode == 1) n = round16(n);
      store16(y + r * d + i, _mm512_mul_ps(n, _mm512_loadu_ps(w + i)));
    }
  }
}

HT_AVX512 void norm_bwd_rows_bf16(const c10::BFloat16* dy, const c10::BFloat16* x, const float* w, const float* rstd,
                                  int64_t d, int mode, int64_t r0, int64_t r1, c10::BFloat16* dx) {
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* xr = x + r * d;
    const c10::BFloat16* gr = dy + r * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      __m512 dn = _mm512_mul_ps(load16(gr + i), _mm512_loadu_ps(w + i));
      if (mode == 1) dn = round16(dn);
      acc = _mm512_fmadd_ps(dn, load16(xr + i), acc);
    }
    const float rs = rstd[r];
    const __m512 rv = _mm512_set1_ps(rs), cv = _mm512_set1_ps(_mm512_reduce_add_ps(acc) * rs * rs / static_cast<float>(d));
    for (int64_t i = 0; i < d; i += 16) {
      __m512 dn = _mm512_mul_ps(load16(gr + i), _mm512_loadu_ps(w + i));
      if (mode == 1) dn = round16(dn);
      store16(dx + r * d + i, _mm512_mul_ps(rv, _mm512_fnmadd_ps(load16(xr + i), cv, dn)));
    }
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& w, int64_t mode) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(-1),
              "w must be fp32 with one value per element of x's last dimension");
  TORCH_CHECK(mode == 0 || mode == 1, "mode: 0 (weight applied in fp32) or 1 (after rounding to the dtype)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "bf16, fp16 or fp32");
}

template <typename T>
void norm_fwd_impl(const at::Tensor& x, const at::Tensor& w, float eps, int mode, at::Tensor& y, at::Tensor& rstd) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const T* xp = x.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  over_rows(rows, d, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (has_avx512bw() && d % 16 == 0) return norm_fwd_rows_bf16(xp, wp, d, eps, mode, b, e, yp, rp);
    }
    norm_fwd_rows(xp, wp, d, eps, mode, b, e, yp, rp);
  });
}

template <typename T>
void norm_bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd, int mode,
                   at::Tensor& dx) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const T* gp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  T* op = dx.data_ptr<T>();
  over_rows(rows, d, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (has_avx512bw() && d % 16 == 0) return norm_bwd_rows_bf16(gp, xp, wp, rp, d, mode, b, e, op);
    }
    norm_bwd_rows(gp, xp, wp, rp, d, mode, b, e, op);
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps, int64_t mode) {
  check_norm(x, w, mode);
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
  const float e = static_cast<float>(eps);
  const int m = static_cast<int>(mode);
  const auto dt = x.scalar_type();
  with_dtype(dt, [&](auto tag) { norm_fwd_impl<decltype(tag)>(x, w, e, m, y, rstd); });
  return {y, rstd};
}

at::Tensor rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                        int64_t mode) {
  check_norm(x, w, mode);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "dy must be contiguous and match x");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.numel() / x.size(-1), "rstd: one fp32 per row");
  auto dx = at::empty_like(x);
  const int m = static_cast<int>(mode);
  const auto dt = x.scalar_type();
  with_dtype(dt, [&](auto tag) { norm_bwd_impl<decltype(tag)>(dy, x, w, rstd, m, dx); });
  return dx;
}

// ---- rotary position embedding -------------------------------------------------------------------
// y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], each product and the sum rounded to the
// dtype as torch's three ops do; backward dx = dy * cos + rotate_half^T(dy * sin), rounded per term.
// x's rows (last dimension, contiguous) are taken in memory order; row r's cos/sin row sits at
// sum_i unravel(r)_i * cs_stride_i over the three leading dimensions (a stride 0 broadcasts over heads).

struct RowMap {
  int64_t size[3], stride[3];
  int64_t operator()(int64_t r) const {
    const int64_t i2 = r % size[2], i1 = (r / size[2]) % size[1], i0 = r / (size[2] * size[1]);
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2];
  }
};

template <typename T>
void rope_rows(const T* x, const T* cs, const T* sn, RowMap map, int64_t d, bool bwd, int64_t r0, int64_t r1, T* y) {
  const int64_t h = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    const T* c = cs + map(r);
    const T* s = sn + map(r);
    for (int64_t i = 0; i < d; ++i) {
      const float a = rnd<T>(to_f(xr[i]) * to_f(c[i]));
      float b;
      if (!bwd) {
        b = i < h ? -rnd<T>(to_f(xr[i + h]) * to_f(s[i])) : rnd<T>(to_f(xr[i - h]) * to_f(s[i]));
      } else {
        b = i < h ? rnd<T>(to_f(xr[i + h]) * to_f(s[i + h])) : -rnd<T>(to_f(xr[i - h]) * to_f(s[i - h]));
      }
      y[r * d + i] = static_cast<T>(a + b);
    }
  }
}

HT_AVX512 inline __m512 negate(__m512 x) {  // (AVX-512F has no float xor)
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
}

HT_AVX512 void rope_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* cs, const c10::BFloat16* sn, RowMap map,
                              int64_t d, bool bwd, int64_t r0, int64_t r1, c10::BFloat16* y) {
  const int64_t h = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* xr = x + r * d;
    const c10::BFloat16* c = cs + map(r);
    const c10::BFloat16* s = sn + map(r);
    for (int64_t i = 0; i < h; i += 16) {  // the two halves together
      const __m512 x1 = load16(xr + i), x2 = load16(xr + i + h);
      const __m512 a1 = round16(_mm512_mul_ps(x1, load16(c + i)));
      const __m512 a2 = round16(_mm512_mul_ps(x2, load16(c + i + h)));
      __m512 b1, b2;
      if (!bwd) {  // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        b1 = negate(round16(_mm512_mul_ps(x2, load16(s + i))));
        b2 = round16(_mm512_mul_ps(x1, load16(s + i + h)));
      } else {  // dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        b1 = round16(_mm512_mul_ps(x2, load16(s + i + h)));
        b2 = negate(round16(_mm512_mul_ps(x1, load16(s + i))));
      }
      store16(y + r * d + i, _mm512_add_ps(a1, b1));
      store16(y + r * d + i + h, _mm512_add_ps(a2, b2));
    }
  }
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cs, const at::Tensor& sn, std::vector<int64_t> sizes,
                std::vector<int64_t> strides, bool bwd) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.size(-1) % 2 == 0, "x: contiguous, even last dimension");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "bf16, fp16 or fp32");
  TORCH_CHECK(cs.scalar_type() == x.scalar_type() && sn.scalar_type() == x.scalar_type() && cs.is_contiguous() &&
                  sn.is_contiguous() && cs.sizes() == sn.sizes(),
              "cos and sin: contiguous, of x's dtype and the same shape");
  TORCH_CHECK(sizes.size() == 3 && strides.size() == 3, "three leading sizes and cos/sin strides");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  RowMap map{{sizes[0], sizes[1], sizes[2]}, {strides[0], strides[1], strides[2]}};
  TORCH_CHECK(sizes[0] * sizes[1] * sizes[2] == rows, "sizes must cover x's rows");
  int64_t last = 0;
  for (int k = 0; k < 3; ++k) last += (sizes[k] - 1) * strides[k];
  TORCH_CHECK(last + d <= cs.numel(), "cos/sin strides reach past their end");
  auto y = at::empty_like(x);
  const auto dt = x.scalar_type();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* cp = cs.data_ptr<T>();
    const T* sp = sn.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    over_rows(rows, d, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (has_avx512bw() && d % 32 == 0) return rope_rows_bf16(xp, cp, sp, map, d, bwd, b, e, yp);
      }
      rope_rows(xp, cp, sp, map, d, bwd, b, e, yp);
    });
  };
  with_dtype(dt, run);
  return y;
}

// ---- attention softmax ------------------------------------------------------------------------------
// Forward: p = softmax(logits * scale + mask) over each row of kc fp32 logits, rounded to p's dtype; one
// pass instead of torch's scale, mask add, softmax and cast. Backward: ds = (dp - sum(dp * p)) * p * scale
// per row, in fp32 from 16-bit dp and p, rounded once; one pass instead of seven.
// Rows are (batch * kv heads, positions * heads of a group); the mask (fp32, rows of kc, contiguous along
// them) is indexed by (batch or 0, position) through its two strides.
struct MaskRows {
  const float* p = nullptr;
  int64_t batch_stride = 0, pos_stride = 0, kvh = 1, g = 1, rows = 1;  // rows: positions * g per batch entry
  const float* row(int64_t bk, int64_t i) const {
    return p ? p + (bk / kvh) * batch_stride + (i / g) * pos_stride : nullptr;
  }
};

template <typename T>
void softmax_rows_plain(const float* sc, MaskRows mask, float scale, int64_t kc, int64_t r0, int64_t r1, T* out) {
  std::vector<float> x(kc);
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = sc + r * kc;
    const float* m = mask.row(r / mask.rows, r % mask.rows);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < kc; ++i) x[i] = in[i] * scale + (m ? m[i] : 0.f), mx = std::max(mx, x[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < kc; ++i) x[i] = std::exp(x[i] - mx), sum += x[i];
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < kc; ++i) out[r * kc + i] = static_cast<T>(x[i] * inv);
  }
}

template <typename T>
void softmax_bwd_rows_plain(const T* dp, const T* p, float scale, int64_t kc, int64_t r0, int64_t r1, T* ds) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* d = dp + r * kc;
    const T* pr = p + r * kc;
    float dot = 0.f;
    for (int64_t i = 0; i < kc; ++i) dot += to_f(d[i]) * to_f(pr[i]);
    for (int64_t i = 0; i < kc; ++i) ds[r * kc + i] = static_cast<T>((to_f(d[i]) - dot) * to_f(pr[i]) * scale);
  }
}

HT_AVX512 inline __m512 load16m(const c10::BFloat16* p, __mmask16 k) {  // masked lanes read as 0
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
HT_AVX512 inline void store16m(c10::BFloat16* p, __mmask16 k, __m512 x) {
  _mm256_mask_storeu_epi16(p, k, pack16(x));
}
HT_AVX512 inline __mmask16 tail(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

HT_AVX512 void softmax_rows_bf16(const float* sc, MaskRows mask, float scale, int64_t kc, int64_t r0, int64_t r1,
                                 float* buf, c10::BFloat16* out) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = sc + r * kc;
    const float* m = mask.row(r / mask.rows, r % mask.rows);
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < kc; i += 16) {
      const __mmask16 k = tail(i, kc);
      __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, in + i), sv);
      if (m) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(k, m + i));
      _mm512_mask_storeu_ps(buf + i, k, x);
      mx = _mm512_mask_max_ps(mx, k, mx, x);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < kc; i += 16) {
      const __mmask16 k = tail(i, kc);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, buf + i), top));
      _mm512_mask_storeu_ps(buf + i, k, e);
      sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t i = 0; i < kc; i += 16) {
      const __mmask16 k = tail(i, kc);
      store16m(out + r * kc + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, buf + i), inv));
    }
  }
}

HT_AVX512 void softmax_bwd_rows_bf16(const c10::BFloat16* dp, const c10::BFloat16* p, float scale, int64_t kc,
                                     int64_t r0, int64_t r1, c10::BFloat16* ds) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* d = dp + r * kc;
    const c10::BFloat16* pr = p + r * kc;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < kc; i += 16) {
      const __mmask16 k = tail(i, kc);
      acc = _mm512_fmadd_ps(load16m(d + i, k), load16m(pr + i, k), acc);
    }
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for (int64_t i = 0; i < kc; i += 16) {
      const __mmask16 k = tail(i, kc);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load16m(d + i, k), dot), load16m(pr + i, k)), sv);
      store16m(ds + r * kc + i, k, v);
    }
  }
}

at::Tensor masked_softmax(const at::Tensor& sc, const std::optional<at::Tensor>& mask, double scale, int64_t kvh,
                          int64_t g, at::ScalarType dtype) {
  TORCH_CHECK(sc.device().is_cpu() && sc.is_contiguous() && sc.dim() == 3 && sc.scalar_type() == at::kFloat,
              "logits: contiguous fp32 (batch * kv heads, positions * heads per kv head, keys)");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, "bf16, fp16 or fp32");
  const int64_t bk = sc.size(0), rg = sc.size(1), kc = sc.size(2);
  TORCH_CHECK(kvh >= 1 && g >= 1 && bk % kvh == 0 && rg % g == 0, "kv heads and group size must divide the rows");
  MaskRows mr;
  mr.kvh = kvh, mr.g = g, mr.rows = rg;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 3 && m.stride(2) == 1 && m.size(1) == rg / g &&
                    m.size(2) == kc && (m.size(0) == 1 || m.size(0) == bk / kvh),
                "mask: fp32 (batch or 1, positions, keys), contiguous along the keys");
    mr.p = m.data_ptr<float>();
    mr.batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
    mr.pos_stride = m.stride(1);
  }
  auto out = at::empty(sc.sizes(), sc.options().dtype(dtype));
  const float* sp = sc.data_ptr<float>();
  const float s = static_cast<float>(scale);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* op = out.data_ptr<T>();
    over_rows(bk * rg, kc, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (has_avx512bw()) {
          std::vector<float> buf(kc + 16);
          return softmax_rows_bf16(sp, mr, s, kc, b, e, buf.data(), op);
        }
      }
      softmax_rows_plain(sp, mr, s, kc, b, e, op);
    });
  });
  return out;
}

at::Tensor softmax_bwd(const at::Tensor& dp, const at::Tensor& p, double scale) {
  TORCH_CHECK(dp.device().is_cpu() && dp.is_contiguous() && p.is_contiguous() && dp.sizes() == p.sizes() &&
                  dp.scalar_type() == p.scalar_type() && p.dim() >= 1,
              "dp and p: contiguous CPU tensors of one shape and dtype");
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "bf16, fp16 or fp32");
  const int64_t kc = p.size(-1), rows = p.numel() / std::max<int64_t>(kc, 1);
  auto ds = at::empty_like(p);
  const float s = static_cast<float>(scale);
  with_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* dpp = dp.data_ptr<T>();
    const T* pp = p.data_ptr<T>();
    T* op = ds.data_ptr<T>();
    over_rows(rows, kc, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (has_avx512bw()) return softmax_bwd_rows_bf16(dpp, pp, s, kc, b, e, op);
      }
      softmax_bwd_rows_plain(dpp, pp, s, kc, b, e, op);
    });
  });
  return ds;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def("gated_act_fwd(Tensor gu, int kind) -> Tensor");
  m.def("gated_act_bwd(Tensor dh, Tensor gu, int kind) -> Tensor");
  m.def("rms_norm_fwd(Tensor x, Tensor w, float eps, int mode) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd, int mode) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, int[] sizes, int[] strides, bool backward) -> Tensor");
  m.def("masked_softmax(Tensor logits, Tensor? mask, float scale, int kv_heads, int group, ScalarType dtype) -> Tensor");
  m.def("softmax_bwd(Tensor dp, Tensor p, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) {
  m.impl("gated_act_fwd", &gated_act_fwd);
  m.impl("gated_act_bwd", &gated_act_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("rope", &rope);
  m.impl("masked_softmax", &masked_softmax);
  m.impl("softmax_bwd", &softmax_bwd);
}
