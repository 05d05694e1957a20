// Philox4x32-10 and the sampling-noise contract, shared by the CPU twin (csrc/cpu/sampling.cpp) and
// the CUDA kernels (csrc/cuda/sampling.cu). Host and device functions; no torch, no Python.
//
// THE NOISE CONTRACT (tinyserve.ops.exponential_noise and sample_from_logits; the pure-Python
// reference is tinyserve/ops/reference.py). A sampled row has a 64-bit key and a 64-bit counter.
// Token v of the vocabulary gets the 32-bit word
//   r_v = philox4x32_10(key = (key_lo, key_hi), ctr = (v >> 2, 0, counter_lo, counter_hi))[v & 3],
// the uniform U_v = ((r_v >> 8) + 0.5) * 2^-24, which lies in (0, 1) and is never 0 or 1, and the
// exponential E_v = -log(U_v), in [2^-25, 17.33]. Four consecutive tokens share one Philox call.
// E_v on the host is the exact -log(U_v) computed in double and rounded to float32 (bit for bit
// what the Python reference gives); on CUDA it is computed in float32 from an exact argument
// (logf below U = 1/2, log1pf of the exact 1 - U above), within 1 ulp of the host value.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TINYSERVE_HD __host__ __device__ __forceinline__
#else
#define TINYSERVE_HD inline
#endif

namespace tinyserve {

struct PhiloxWords {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // Weyl increments of the key
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// hi:lo of the 64-bit product a * b.
TINYSERVE_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011).
// Known answer: key (0, 0), counter (0, 0, 0, 0) -> (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8).
TINYSERVE_HD PhiloxWords philox4x32_10(uint32_t key0, uint32_t key1, uint32_t c0, uint32_t c1, uint32_t c2,
                                       uint32_t c3) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, &hi0, &lo0);
    mulhilo32(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ key0, n2 = hi0 ^ c3 ^ key1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    key0 += kPhiloxW0;  // the bump after the last round is never used
    key1 += kPhiloxW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The words of tokens 4 * group .. 4 * group + 3 of the row with this key and counter.
TINYSERVE_HD PhiloxWords noise_words(uint64_t key, uint64_t counter, uint32_t group) {
  return philox4x32_10(static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), group, 0u,
                       static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32));
}

// E = -log(U), U = ((r >> 8) + 0.5) * 2^-24 (exact in double), rounded once to float32.
inline float exponential_host(uint32_t r) {
  const double u = (static_cast<double>(r >> 8) + 0.5) * 0x1p-24;
  return static_cast<float>(-std::log(u));
}

#if defined(__CUDACC__)
// The same E in float32. U = (2m + 1) * 2^-25 with m = r >> 8: below 1/2 (m < 2^23) that is an exact
// float and logf applies; above, 1 - U = (2 (2^24 - m) - 1) * 2^-25 is exact and log1pf keeps the
// small E = -log(1 - (1 - U)) accurate to the last bit (logf(U) would lose it to U's rounding).
__device__ __forceinline__ float exponential_device(uint32_t r) {
  const uint32_t m = r >> 8;
  if (m < 0x800000u) return -logf(static_cast<float>(2u * m + 1u) * 0x1p-25f);
  return -log1pf(-static_cast<float>(2u * (0x1000000u - m) - 1u) * 0x1p-25f);
}
#endif

// ---- sampled scores and (score, index) keys ---------------------------------------------------
// A row samples argmax_v (x_v - T * log(E_v)) = argmax_v (x_v / T - log E_v) for T > 0 (Gumbel-max:
// the exponential race argmax w_v / E_v with w = exp(x / T)), and argmax_v x_v otherwise. Scores are
// compared through 64-bit keys: the high half orders floats (-inf lowest), the low half is the
// bit-inverted index, so the larger key is the larger score and, on ties, the lower index.

// A key below every key of a real score (-inf included) that still decodes to index 0: a row whose
// scores were all skipped (NaN logits only) returns 0.
constexpr uint64_t kNoScoreKey = 0xFFFFFFFFull;

TINYSERVE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  static_assert(sizeof(u) == sizeof(f), "float is 32-bit");
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

TINYSERVE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// Monotone map of floats onto unsigned ints: a < b  <=>  ordered(a) < ordered(b) (for non-NaN).
TINYSERVE_HD uint32_t ordered_bits(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The inverse of ordered_bits; values below ordered_bits(-inf) (no score yet) give -inf.
TINYSERVE_HD float ordered_float(uint32_t o) {
  if (o < 0x007FFFFFu) return -INFINITY;
  return bits_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

// NOTE: score + 0.0f turns -0 into +0, so the two zeros tie (and the lower index wins, as in argmax).
TINYSERVE_HD uint64_t score_key(float score, uint32_t index) {
  return (static_cast<uint64_t>(ordered_bits(score + 0.0f)) << 32) | static_cast<uint32_t>(~index);
}

TINYSERVE_HD uint32_t key_index(uint64_t key) { return ~static_cast<uint32_t>(key); }

TINYSERVE_HD float key_score(uint64_t key) { return ordered_float(static_cast<uint32_t>(key >> 32)); }

}  // namespace tinyserve
