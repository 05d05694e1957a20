// The rounding-exact pieces of the fused decoder-layer ops, shared by their CPU twins (fused.cpp)
// and the skinny GEMM's fused prologues (skinny_gemm.cpp), so both store what PyTorch's unfused
// formulas store.
#pragma once

#include <cmath>
#include <cstdint>

#include "half.h"

namespace tinyserve::cpu {

// x rounded to T's precision, as a float (the value a PyTorch op in dtype T would store).
template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  float acc[8] = {};  // 8 independent partial sums: no serial dependency chain, and it vectorises
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const float v = to_float(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline float inv_rms(float sum_sq, int64_t n, float eps) {
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
}

// weight * T(x * inv): transformers' order (normalise in float32, round, then scale in T).
template <typename T>
inline float norm_value(T x, T w, float inv) {
  return to_float(w) * round_to<T>(to_float(x) * inv);
}

// F.silu(g) as SiluAndMul's PyTorch formula stores it in T before the product with up.
template <typename T>
inline float silu_rounded(float g) {
  return round_to<T>(g / (1.f + std::exp(-g)));
}

}  // namespace tinyserve::cpu
