// llama.cpp's per-group scale fits for its K-quants, one group per loop (hubtool/core/kquant.py and
// hubtool/formats/kquants.py hold the same arithmetic in torch, the reference these are tested against).
//
//   fit_scale_min(x (G, n) f32, nmax, rmin, rdelta, nstep) -> (scale (G), neg_min (G), codes u8 (G, n))
//       asymmetric: x ~ scale * q - neg_min, q in 0..nmax; weights av|x| + |x|; from the group's range,
//       nstep + 1 grids are tried (each from the best minimum so far) and each fitted by weighted least
//       squares (the minimum kept <= 0); the fit of least weighted error wins (make_qkx2_quants).
//   fit_scale_sym(x (G, n) f32, nmax) -> (scale (G), codes u8 (G, n))
//       symmetric: x ~ scale * (q - nmax), q in 0..2 nmax - 1; weights x^2; 19 grids around the value of
//       largest magnitude mapped onto -nmax, each fitted by least squares (make_qx_quants, rmse_type 1).
//
// Groups of 32 weights (Q4_K, Q5_K) or 16 (Q6_K): the work is O(steps * n) per group, so a plain loop over
// groups in parallel is the whole kernel. Rounding is to nearest even, as llama.cpp's nearest_int.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace hubtool_kquant {

inline float nearest(float v) { return std::nearbyint(v); }

void fit_one_asym(const float* x, int n, int nmax, float rmin, float rdelta, int nstep, float* scale_out,
                  float* neg_min_out, uint8_t* codes) {
  float sum_x2 = 0.f, lo = x[0], hi = x[0];
  for (int i = 0; i < n; ++i) {
    sum_x2 += x[i] * x[i];
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  lo = std::min(lo, 0.f);
  if (hi == lo) {
    for (int i = 0; i < n; ++i) codes[i] = 0;
    *scale_out = 0.f;
    *neg_min_out = -lo;
    return;
  }
  const float av = std::sqrt(sum_x2 / n);
  float w[64], laux[64];
  float sum_w = 0.f, sum_x = 0.f;
  for (int i = 0; i < n; ++i) {
    w[i] = av + std::fabs(x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  float iscale = nmax / (hi - lo), scale = 1.f / iscale, mn = lo, best_err = 0.f;
  for (int i = 0; i < n; ++i) {
    const float l = std::clamp(nearest(iscale * (x[i] - lo)), 0.f, float(nmax));
    codes[i] = static_cast<uint8_t>(l);
    const float d = scale * l + lo - x[i];
    best_err += w[i] * d * d;
  }
  for (int step = 0; step <= nstep; ++step) {
    float span = hi - mn;
    if (span == 0.f) span = 1.f;
    const float is = (rmin + rdelta * step + nmax) / span;
    float sum_l = 0.f, sum_l2 = 0.f, sum_xl = 0.f;
    for (int i = 0; i < n; ++i) {
      const float l = std::clamp(nearest(is * (x[i] - mn)), 0.f, float(nmax));
      laux[i] = l;
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (!(det > 0.f)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (this_min > 0.f) {
      this_min = 0.f;
      this_scale = sum_xl / (sum_l2 > 0.f ? sum_l2 : 1.f);
    }
    float err = 0.f;
    for (int i = 0; i < n; ++i) {
      const float d = this_scale * laux[i] + this_min - x[i];
      err += w[i] * d * d;
    }
    if (err < best_err) {
      for (int i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(laux[i]);
      best_err = err;
      scale = this_scale;
      mn = this_min;
    }
  }
  *scale_out = scale;
  *neg_min_out = -mn;
}

void fit_one_sym(const float* x, int n, int nmax, float* scale_out, uint8_t* codes) {
  float amax = 0.f, big = 0.f;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) amax = ax, big = x[i];
  }
  if (amax < 1e-15f) {
    for (int i = 0; i < n; ++i) codes[i] = 0;
    *scale_out = 0.f;
    return;
  }
  auto trial = [&](float iscale, float* l, float& sumlx, float& suml2) {
    sumlx = suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
      l[i] = std::clamp(nearest(iscale * x[i]), float(-nmax), float(nmax - 1));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l[i];
      suml2 += w * l[i] * l[i];
    }
  };
  float best_l[64], l[64], sumlx, suml2;
  trial(-nmax / big, best_l, sumlx, suml2);
  float scale = suml2 > 0.f ? sumlx / suml2 : 0.f, best = scale * sumlx;
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    trial(-(nmax + 0.1f * step) / big, l, sumlx, suml2);
    if (suml2 > 0.f && sumlx * sumlx > best * suml2) {
      scale = sumlx / suml2;
      best = scale * sumlx;
      std::copy(l, l + n, best_l);
    }
  }
  for (int i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(best_l[i] + nmax);
  *scale_out = scale;
}

void check(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a contiguous 2-d float32 CPU tensor");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= 64, "groups of 1 to 64 values");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_scale_min(const at::Tensor& x, int64_t nmax, double rmin,
                                                             double rdelta, int64_t nstep) {
  check(x);
  const int64_t g = x.size(0), n = x.size(1);
  auto scale = at::empty({g}, x.options());
  auto neg_min = at::empty({g}, x.options());
  auto codes = at::empty({g, n}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* mp = neg_min.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::parallel_for(0, g, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      fit_one_asym(xp + i * n, int(n), int(nmax), float(rmin), float(rdelta), int(nstep), sp + i, mp + i,
                   cp + i * n);
  });
  return {scale, neg_min, codes};
}

std::tuple<at::Tensor, at::Tensor> fit_scale_sym(const at::Tensor& x, int64_t nmax) {
  check(x);
  const int64_t g = x.size(0), n = x.size(1);
  auto scale = at::empty({g}, x.options());
  auto codes = at::empty({g, n}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::parallel_for(0, g, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fit_one_sym(xp + i * n, int(n), int(nmax), sp + i, cp + i * n);
  });
  return {scale, codes};
}

}  // namespace hubtool_kquant

TORCH_LIBRARY_FRAGMENT(hubtool, m) {
  m.def("fit_scale_min(Tensor x, int nmax, float rmin, float rdelta, int nstep) -> (Tensor, Tensor, Tensor)");
  m.def("fit_scale_sym(Tensor x, int nmax) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hubtool, CPU, m) {
  m.impl("fit_scale_min", &hubtool_kquant::fit_scale_min);
  m.impl("fit_scale_sym", &hubtool_kquant::fit_scale_sym);
}
