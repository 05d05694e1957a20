// CPU twins of the sampling ops: exponential_noise and the one-pass sample_from_logits. The noise is
// csrc/philox.h's contract computed exactly (a double log, one rounding to float32: bit for bit the
// Python reference); scores are float32, x - T * logf(E) with one fma, as on CUDA. OpenMP over
// (row, chunk of the vocabulary), so a single long row is split too.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "../philox.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// Below this many tokens (~1 ms of work) the work stays on the calling thread. NOTE: kept high on
// purpose: a step of a small model (e.g. 32 x 512 logits) must not wake this library's OpenMP team,
// whose spinning threads then compete with torch's own thread pool for the same cores.
constexpr int64_t kParallelMinElems = int64_t{1} << 17;
// Tokens per work item; a multiple of 4, so every item starts a Philox group.
constexpr int64_t kChunk = int64_t{1} << 13;

struct RowNoise {
  uint64_t key, counter;
};

RowNoise row_noise(const TensorView& keys, const TensorView& counters, int64_t row) {
  return {static_cast<uint64_t>(keys.ptr<const int64_t>()[row * keys.stride(0)]),
          static_cast<uint64_t>(counters.ptr<const int64_t>()[row * counters.stride(0)])};
}

// The best (score, index) key among tokens [begin, end) of one row x; begin is a multiple of 4.
template <typename T>
uint64_t best_in_range(const T* x, int64_t begin, int64_t end, float temperature, RowNoise noise) {
  uint64_t best = kNoScoreKey;
  if (!(temperature > 0.f)) {  // greedy (temperature 0; negative or NaN are taken as 0 too)
    for (int64_t v = begin; v < end; ++v) {
      best = std::max(best, score_key(to_float(x[v]), static_cast<uint32_t>(v)));
    }
    return best;
  }
  for (int64_t g = begin; g < end; g += 4) {
    const PhiloxWords r = noise_words(noise.key, noise.counter, static_cast<uint32_t>(g >> 2));
    const int64_t n = std::min<int64_t>(4, end - g);
    for (int64_t j = 0; j < n; ++j) {
      const float e = exponential_host(r.w[j]);
      const float s = std::fma(-temperature, std::log(e), to_float(x[g + j]));
      best = std::max(best, score_key(s, static_cast<uint32_t>(g + j)));
    }
  }
  return best;
}

template <typename T>
void sample_impl(const SampleArgs& a) {
  const int64_t num_seqs = a.logits.size(0), vocab = a.logits.size(1);
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  const int64_t items = num_seqs * chunks;
  std::vector<uint64_t> partial(static_cast<size_t>(items));
  const bool greedy = a.temperature.data == nullptr;
#pragma omp parallel for schedule(dynamic) if (num_seqs * vocab > kParallelMinElems)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / chunks, c = item % chunks;
    const T* x = a.logits.ptr<const T>() + row * a.logits.stride(0);
    // No temperature: every row greedy.
    const float t = greedy ? 0.f : a.temperature.ptr<const float>()[row * a.temperature.stride(0)];
    const RowNoise noise = t > 0.f ? row_noise(a.keys, a.counters, row) : RowNoise{0, 0};
    partial[item] = best_in_range(x, c * kChunk, std::min(vocab, (c + 1) * kChunk), t, noise);
  }
  int64_t* out = a.out.ptr<int64_t>();
  for (int64_t row = 0; row < num_seqs; ++row) {
    const auto first = partial.begin() + row * chunks;
    out[row * a.out.stride(0)] = key_index(*std::max_element(first, first + chunks));
  }
}

}  // namespace

void sample_from_logits(const SampleArgs& a) {
  check_sample_args(a);
  if (a.logits.size(0) == 0) return;
  switch (a.logits.dtype) {
    case DType::kFloat32: return sample_impl<float>(a);
    case DType::kBFloat16: return sample_impl<BF16>(a);
    case DType::kFloat16: return sample_impl<F16>(a);
    default: throw std::invalid_argument("sample_from_logits: unsupported dtype");  // rejected above already
  }
}

void exponential_noise(const NoiseArgs& a) {
  check_noise_args(a);
  const int64_t num_seqs = a.out.size(0), vocab = a.out.size(1);
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  const int64_t items = num_seqs * chunks;
#pragma omp parallel for schedule(static) if (num_seqs * vocab > kParallelMinElems)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / chunks, c = item % chunks;
    const RowNoise noise = row_noise(a.keys, a.counters, row);
    float* out = a.out.ptr<float>() + row * a.out.stride(0);
    const int64_t end = std::min(vocab, (c + 1) * kChunk);
    for (int64_t g = c * kChunk; g < end; g += 4) {
      const PhiloxWords r = noise_words(noise.key, noise.counter, static_cast<uint32_t>(g >> 2));
      const int64_t n = std::min<int64_t>(4, end - g);
      for (int64_t j = 0; j < n; ++j) out[g + j] = exponential_host(r.w[j]);
    }
  }
}

}  // namespace tinyserve::cpu
