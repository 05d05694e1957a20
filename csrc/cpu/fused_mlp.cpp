// CPU twins of the fused decode blocks (ops.h):
//  - fused_mlp: [o product,] residual add, RMSNorm, gate/up product, SiLU-and-mul, down product and
//    output add;
//  - fused_norm_linear: residual add, RMSNorm and one product;
// each stage rounded where the unfused ops store its output. Written for clarity: every stage goes
// through a float32 buffer; the products run OpenMP over weight rows.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "fused_math.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// Below this many weight elements a product stays on the calling thread.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

// y[r, j] = x[r, :] . w[j, :] for r < m, j < n (w [n, k] in T), unrounded.
template <typename T>
std::vector<float> product(const std::vector<float>& x, int64_t m, const T* w, int64_t n, int64_t k) {
  std::vector<float> y(static_cast<size_t>(m * n));
#pragma omp parallel if (n * k > kParallelMinElems)
  {
    std::vector<float> wf(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < k; ++i) wf[i] = to_float(w[j * k + i]);
      for (int64_t r = 0; r < m; ++r) y[r * n + j] = dot(x.data() + r * k, wf.data(), k);
    }
  }
  return y;
}

// r = x (+ add), rounded, in T: the residual stream after the add.
template <typename T>
std::vector<T> add_rounded(const T* x, const T* add, int64_t n) {
  std::vector<T> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) r[i] = add != nullptr ? from_float<T>(to_float(x[i]) + to_float(add[i])) : x[i];
  return r;
}

// RMSNorm of each of the m rows of r [m, k], rounded as the norm stores it, as floats.
template <typename T>
std::vector<float> normalised(const std::vector<T>& r, int64_t m, int64_t k, const T* gamma, float eps) {
  std::vector<float> x(static_cast<size_t>(m * k));
  for (int64_t row = 0; row < m; ++row) {
    const T* rr = r.data() + row * k;
    const float inv = inv_rms(sum_of_squares(rr, k), k, eps);
    for (int64_t i = 0; i < k; ++i) x[row * k + i] = round_to<T>(norm_value(rr[i], gamma[i], inv));
  }
  return x;
}

template <typename T>
void fused_mlp_impl(const FusedMlpArgs& a) {
  const int64_t m = a.residual.size(0), h = a.residual.size(1), inter = a.down.size(1);
  const T* hidden = a.hidden.ptr<const T>();
  std::vector<T> o_out;
  if (a.o_weight.data != nullptr) {
    // h = attn . o^T, rounded as the product's output.
    const int64_t q = a.o_weight.size(1);
    std::vector<float> attn(static_cast<size_t>(m * q));
    for (int64_t i = 0; i < m * q; ++i) attn[i] = to_float(hidden[i]);
    const std::vector<float> y = product(attn, m, a.o_weight.ptr<const T>(), h, q);
    o_out.resize(static_cast<size_t>(m * h));
    for (int64_t i = 0; i < m * h; ++i) o_out[i] = from_float<T>(y[i]);
    hidden = o_out.data();
  }
  T* residual = a.residual.ptr<T>();
  const std::vector<T> r = add_rounded(residual, hidden, m * h);
  const std::vector<float> x = normalised(r, m, h, a.norm_weight.ptr<const T>(), a.eps);
  const std::vector<float> gu = product(x, m, a.gate_up.ptr<const T>(), 2 * inter, h);  // [m, 2I]
  std::vector<float> act(static_cast<size_t>(m * inter));
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t i = 0; i < inter; ++i) {
      const float g = round_to<T>(gu[row * 2 * inter + i]), u = round_to<T>(gu[row * 2 * inter + inter + i]);
      act[row * inter + i] = round_to<T>(silu_rounded<T>(g) * u);
    }
  }
  const std::vector<float> y = product(act, m, a.down.ptr<const T>(), h, inter);  // [m, H]
  T* out = a.out.ptr<T>();  // may be hidden or residual: every input has been read by now
  const bool separate = a.out.data != a.residual.data;
  for (int64_t i = 0; i < m * h; ++i) {
    if (separate) {
      residual[i] = r[i];
      out[i] = from_float<T>(y[i]);
    } else {
      out[i] = from_float<T>(round_to<T>(y[i]) + to_float(r[i]));
    }
  }
}

template <typename T>
void fused_norm_linear_impl(const FusedNormLinearArgs& a) {
  const int64_t m = a.x.size(0), k = a.x.size(1), n = a.weight.size(0);
  const std::vector<T> r = add_rounded(a.x.ptr<const T>(), a.residual.ptr<const T>(), m * k);
  const std::vector<float> x = normalised(r, m, k, a.norm_weight.ptr<const T>(), a.eps);
  const std::vector<float> y = product(x, m, a.weight.ptr<const T>(), n, k);
  const T* bias = a.bias.ptr<const T>();
  T* out = a.out.ptr<T>();
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t j = 0; j < n; ++j) {
      out[row * n + j] = from_float<T>(y[row * n + j] + (bias != nullptr ? to_float(bias[j]) : 0.f));
    }
  }
  if (a.residual.data != nullptr) std::copy(r.begin(), r.end(), a.residual_out.ptr<T>());
}

}  // namespace

void fused_mlp(const FusedMlpArgs& a) {
  check_fused_mlp_args(a);
  if (a.residual.size(0) == 0) return;
  if (a.residual.dtype == DType::kBFloat16) {
    fused_mlp_impl<BF16>(a);
  } else {
    fused_mlp_impl<F16>(a);
  }
}

void fused_norm_linear(const FusedNormLinearArgs& a) {
  check_fused_norm_linear_args(a);
  if (a.x.size(0) == 0) return;
  if (a.x.dtype == DType::kBFloat16) {
    fused_norm_linear_impl<BF16>(a);
  } else {
    fused_norm_linear_impl<F16>(a);
  }
}

}  // namespace tinyserve::cpu
