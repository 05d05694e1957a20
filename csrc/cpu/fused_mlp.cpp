// CPU twin of the fused MLP block (ops.h): the residual add, RMSNorm, gate/up product, SiLU-and-mul,
// down product and output add, each rounded where the unfused ops store their outputs. Written for
// clarity: every stage goes through a float32 buffer; the products run OpenMP over weight rows.
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

template <typename T>
void fused_mlp_impl(const FusedMlpArgs& a) {
  const int64_t m = a.residual.size(0), h = a.residual.size(1), inter = a.down.size(1);
  const T* hidden = a.hidden.ptr<const T>();
  T* residual = a.residual.ptr<T>();
  const T* gamma = a.norm_weight.ptr<const T>();
  // r: the residual stream after the add (rounded), kept in T for the norm's and the output's reads.
  std::vector<T> r(static_cast<size_t>(m * h));
  for (int64_t i = 0; i < m * h; ++i) {
    r[i] = hidden != nullptr ? from_float<T>(to_float(residual[i]) + to_float(hidden[i])) : residual[i];
  }
  std::vector<float> x(static_cast<size_t>(m * h));
  for (int64_t row = 0; row < m; ++row) {
    const T* rr = r.data() + row * h;
    const float inv = inv_rms(sum_of_squares(rr, h), h, a.eps);
    for (int64_t i = 0; i < h; ++i) x[row * h + i] = round_to<T>(norm_value(rr[i], gamma[i], inv));
  }
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
  for (int64_t i = 0; i < m * h; ++i) {
    if (hidden != nullptr) {
      residual[i] = r[i];
      out[i] = from_float<T>(y[i]);
    } else {
      out[i] = from_float<T>(round_to<T>(y[i]) + to_float(r[i]));
    }
  }
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

}  // namespace tinyserve::cpu
