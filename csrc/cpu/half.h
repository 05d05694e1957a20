// 16-bit float storage types for the CPU kernels (arithmetic happens in float32) and exact
// conversions: bf16/fp16 -> float32, and float32 -> bf16/fp16 with round-to-nearest-even, overflow to
// inf, gradual underflow and NaN kept NaN (what PyTorch stores).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tinyserve::cpu {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(BF16 x) { return as_float(uint32_t{x.bits} << 16); }
inline float to_float(F16 x) {
  const uint32_t sign = uint32_t{x.bits & 0x8000u} << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  if (exp == 31) return as_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {                                                       // zero / subnormal: mant * 2^-24
    const float f = static_cast<float>(mant) * 0x1p-24f;
    return sign ? -f : f;
  }
  return as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T>
T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline BF16 from_float<BF16>(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u = as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline F16 from_float<F16>(float f) {  // round to nearest even, overflow to inf, gradual underflow
  const uint32_t u = as_bits(f);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return F16{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return F16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (abs < 0x38800000u) {  // under the smallest normal half: count in units of 2^-24 (subnormals)
    const float units = std::nearbyint(as_float(abs) * 0x1p24f);
    return F16{static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  uint32_t h = (abs >> 13) - (112u << 10);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return F16{static_cast<uint16_t>(sign | h)};
}

}  // namespace tinyserve::cpu
