// CPU twin of the skinny GEMM: out[m, n] = x[m, k] . weight[n, k] (+ bias[n]) in float32, rounded
// once to the dtype (after the bias add), as the CUDA kernel does; with the same optional RMSNorm or
// SiLU-and-mul of x before and residual add after (ops.h). Written for clarity: x is
// converted to float32 once, then OpenMP over weight rows, each converted and dotted with every
// row of x.
#include <cstdint>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "fused_math.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// Below this many weight elements the work stays on the calling thread.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

// 8 independent partial sums: no serial dependency chain, and the loop vectorises.
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The product's left operand [m, k] in float32, after the prologue, rounded as the unfused ops
// store their outputs (see ops.h).
template <typename T>
std::vector<float> left_operand(const SkinnyGemmArgs& a) {
  const int64_t m = a.x.size(0), k = a.weight.size(1), stride = a.x.size(1);
  const T* x = a.x.ptr<const T>();
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) {
    const T* row = x + r * stride;
    float* dst = xf.data() + r * k;
    if (a.silu) {
      for (int64_t i = 0; i < k; ++i) dst[i] = round_to<T>(silu_rounded<T>(to_float(row[i])) * to_float(row[k + i]));
    } else if (a.norm_weight.data != nullptr) {
      const T* w = a.norm_weight.ptr<const T>();
      const float inv = inv_rms(sum_of_squares(row, k), k, a.eps);
      for (int64_t i = 0; i < k; ++i) dst[i] = round_to<T>(norm_value(row[i], w[i], inv));
    } else {
      for (int64_t i = 0; i < k; ++i) dst[i] = to_float(row[i]);
    }
  }
  return xf;
}

template <typename T>
void skinny_gemm_impl(const SkinnyGemmArgs& a) {
  const int64_t m = a.x.size(0), n = a.weight.size(0), k = a.weight.size(1);
  const T* weight = a.weight.ptr<const T>();
  const T* bias = a.bias.ptr<const T>();
  const T* residual = a.residual.ptr<const T>();  // may be out itself: each element read, then written
  T* out = a.out.ptr<T>();
  const std::vector<float> xf = left_operand<T>(a);  // [m, k]
#pragma omp parallel if (n * k > kParallelMinElems)
  {
    std::vector<float> wf(static_cast<size_t>(k));  // one weight row
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < k; ++i) wf[i] = to_float(weight[j * k + i]);
      const float b = bias ? to_float(bias[j]) : 0.f;
      for (int64_t r = 0; r < m; ++r) {
        float v = dot(xf.data() + r * k, wf.data(), k) + b;
        if (residual != nullptr) v = round_to<T>(v) + to_float(residual[r * n + j]);
        out[r * n + j] = from_float<T>(v);
      }
    }
  }
}

}  // namespace

void skinny_gemm(const SkinnyGemmArgs& a) {
  check_skinny_gemm_args(a);
  if (a.x.size(0) == 0 || a.weight.size(0) == 0) return;
  if (a.x.dtype == DType::kBFloat16) {
    skinny_gemm_impl<BF16>(a);
  } else {
    skinny_gemm_impl<F16>(a);
  }
}

}  // namespace tinyserve::cpu
