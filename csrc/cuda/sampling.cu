// Sampling on CUDA: sample_from_logits, one pass over the logits that draws csrc/philox.h's noise on
// the fly and keeps each row's best (score, index) key; and exponential_noise, the noise itself (for
// the sorted top-p path).
//
// Where the time goes. Every sampled token needs its Philox word (10 rounds per 4 tokens) and, for
// its score x - T * log(E), two accurate logs (E = -log U, then log E): ~60 instructions, about three
// times the issue budget of reading bf16 logits at full bandwidth. So each thread block keeps theta,
// the best score it has found so far (shared through shared memory), and only pays where a token
// can still reach it, through two exact filters:
//   1. before Philox: U <= 1 - 2^-25, so E >= 2^-25 and every score is below x + 17.33 T. A unit of
//      tokens whose largest logit is below theta - 17.4 T is skipped whole (peaked rows skip most).
//   2. before the logs: E = -log(U) >= 1 - U, so s <= x - T log(1 - U). That bound costs one fast
//      log2 of the Philox word's bits; the accurate logs run only where it reaches theta.
// Both filters compare against theta minus a slack that covers their rounding, and theta is a score
// found in the row, so no token that could win (or tie with a lower index) is skipped: the result is
// the argmax of the float32 scores, as the CPU twin computes them (up to the 1-ulp logs). A block's
// first pass has no theta yet: there each thread scores its most promising token first, and the
// warp's best of those is theta for the rest of the pass.
//
// What is left per token on the steady path (read off the sm_90 SASS for bf16; an estimate, not a
// measurement): a quarter of a Philox call (about 10 instructions, 5 of them IMAD.WIDE), filter 2
// (5, one MUFU), the conversion and filter 1 (about 3): ~20 issue slots, roughly the budget of a bf16
// stream at full H100 bandwidth, above it on an H200. Flat rows pay all of it; peaked rows skip Philox.
//
// A row is split over several thread blocks when there are too few rows to fill the GPU with one
// wave of blocks (a single row of 151,936 tokens runs as 19 blocks); each block writes its best key
// to the workspace and a one-warp kernel per row picks the largest. Nothing is read back on the
// host, so the op can be captured in CUDA graphs.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../op_checks.h"
#include "../ops.h"
#include "../philox.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // units (16-byte loads) per thread in flight in a long pass
// Above -log(E_min) = -log(-log(1 - 2^-25)) = 17.3287 (with room for logf's last bits): every score
// satisfies s <= x + kNoiseCap * T.
constexpr float kNoiseCap = 17.4f;
constexpr float kLn2 = 0.693147180559945f;
constexpr unsigned kFullMask = 0xffffffffu;

TINYSERVE_HD uint64_t key_max(uint64_t a, uint64_t b) { return a > b ? a : b; }

template <typename T, int N>
struct alignas(16) Raw {  // one 16-byte load: N = 16 / sizeof(T) tokens
  T v[N];
};

struct SampleParams {
  const void* logits;
  int64_t row_stride;  // elements
  int vocab;
  const float* temperature;
  const int64_t* keys;
  const int64_t* counters;
  int64_t* out;
  int64_t t_stride, k_stride, c_stride, out_stride;
  unsigned long long* partials;  // [num_seqs, splits] best keys; nullptr when splits == 1
  int split_units;               // units per split (the last split may hold fewer)
};

// A sampled row's constants (temperature T > 0).
struct RowNoise {
  uint64_t key, counter;
  float neg_t;      // -T
  float neg_t_ln2;  // -T ln 2
  float cap;        // kNoiseCap * T
  float slack;      // the filters' absolute rounding slack, 1e-4 T
};

// Scores below the returned edge are provably below theta (the filters' bounds are computed with
// fast, slightly rounded arithmetic; 2^-18 relative plus 1e-4 T covers it many times over).
__device__ __forceinline__ float lower_edge(float theta, float slack) {
  return theta - fmaf(0x1p-18f, fabsf(theta), slack);
}

// log2 without the subnormal fix-up of __log2f (its arguments here are 0 or >= 2^-23).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Filter 2 for token v0 + k, whose Philox word is r. tl = 1 - ((r >> 9) + 1) * 2^-23 <= 1 - U (exact
// float arithmetic), so with E >= 1 - U: s <= x - T log(tl). tl = 0 gives an infinite bound (NaN for
// x = -inf, which also counts as "may win"): such tokens are scored.
__device__ __forceinline__ bool may_win(uint32_t r, float x, const RowNoise& rn, float edge) {
  const float tl = (2.f - 0x1p-23f) - __uint_as_float(0x3F800000u + (r >> 9));
  return !(fmaf(rn.neg_t_ln2, fast_log2(tl), x) < edge);
}

// Filters 1 and 2 for tokens v0 .. v0 + N - 1 of a sampled row (only the first `valid` exist when
// kPartial): true when any of them may reach theta (then score_unit looks at them one by one).
template <int N, bool kPartial>
__device__ __forceinline__ bool unit_may_win(const float (&x)[N], int v0, int valid, const RowNoise& rn, float edge) {
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (!kPartial || j < valid) mx = fmaxf(mx, x[j]);
  }
  if (mx + rn.cap < edge) return false;  // filter 1: no token of the unit can reach theta
  bool any = false;
#pragma unroll
  for (int g = 0; g < N / 4; ++g) {
    const PhiloxWords r = noise_words(rn.key, rn.counter, static_cast<uint32_t>(v0 / 4 + g));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Bitwise, not ||: every word is tested (no branch per token).
      if (!kPartial || 4 * g + j < valid) any |= may_win(r.w[j], x[4 * g + j], rn, edge);
    }
  }
  return any;
}

// The slow path, for the few units where a token may reach theta: recomputes the unit's Philox
// words, re-reads its logits (L1 hits) and scores the tokens that pass filter 2 with the accurate
// logs. Kept out of the unrolled token loop so the logs appear once per pass in the code.
template <typename T, int N>
__device__ __forceinline__ void score_unit(const T* row, int v0, int valid, const RowNoise& rn, float edge,
                                           uint64_t& best) {
  for (int g = 0; 4 * g < valid; ++g) {
    const PhiloxWords r = noise_words(rn.key, rn.counter, static_cast<uint32_t>(v0 / 4 + g));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int v = v0 + 4 * g + j;
      if (4 * g + j >= valid) break;
      const float x = to_float<T>(row[v]);
      if (!may_win(r.w[j], x, rn, edge)) continue;
      const float s = fmaf(rn.neg_t, logf(exponential_device(r.w[j])), x);
      best = key_max(best, score_key(s, static_cast<uint32_t>(v)));
    }
  }
}

template <int N>
__device__ __forceinline__ void greedy_unit(const float (&x)[N], int v0, int valid, uint64_t& best) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < valid) best = key_max(best, score_key(x[j], static_cast<uint32_t>(v0 + j)));
  }
}

// One pass of a block over whole units: u_first + r * kThreads + threadIdx.x for r < R, those below
// u_end when kChecked (else all of them exist). The vector path issues all R 16-byte loads first;
// units where a token may reach theta are then scored in one loop, so the accurate logs appear once
// per pass in the code rather than once per token slot.
template <typename T, int N, bool kVec, int R, bool kChecked>
__device__ __forceinline__ void block_pass(const T* row, int u_first, int u_end, bool sample, const RowNoise& rn,
                                           float edge, uint64_t& best) {
  static_assert(!kVec || N * sizeof(T) == 16, "the vector path loads 16 bytes per unit");
  using Load = Raw<T, 16 / static_cast<int>(sizeof(T))>;
  const int u0 = u_first + static_cast<int>(threadIdx.x);
  Load raw[R];  // unused on the scalar path
  if constexpr (kVec) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int u = u0 + r * kThreads;
      if (!kChecked || u < u_end) raw[r] = *reinterpret_cast<const Load*>(row + int64_t{u} * N);
    }
  }
  uint32_t hits = 0;  // bit r: unit r may hold a token that reaches theta
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int v0 = (u0 + r * kThreads) * N;
    if (kChecked && u0 + r * kThreads >= u_end) continue;
    float x[N];
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = to_float<T>(kVec ? raw[r].v[j] : row[v0 + j]);
    if (!sample) {
      greedy_unit<N>(x, v0, N, best);
    } else if (unit_may_win<N, false>(x, v0, N, rn, edge)) {
      hits |= 1u << r;
    }
  }
  while (hits != 0) {
    const int r = __ffs(hits) - 1;
    hits &= hits - 1;
    score_unit<T, N>(row, (u0 + r * kThreads) * N, N, rn, edge, best);
  }
}

// Filter 2's bound x - T log(tl) itself (see may_win).
__device__ __forceinline__ float score_bound(uint32_t r, float x, const RowNoise& rn) {
  const float tl = (2.f - 0x1p-23f) - __uint_as_float(0x3F800000u + (r >> 9));
  return fmaf(rn.neg_t_ln2, fast_log2(tl), x);
}

// The first pass of a block over a sampled row, while theta is still -inf. Each thread scores only
// its most promising token (the largest filter-2 bound) at first; the best of those in the warp
// becomes theta, and the thread's unit then goes through filter 2 against it. Without this step,
// every token of the first pass would pay for the accurate logs.
template <typename T, int N, bool kVec>
__device__ __forceinline__ void first_pass(const T* row, int u_first, int u_end, const RowNoise& rn,
                                           uint64_t& best) {
  const int u = u_first + static_cast<int>(threadIdx.x);
  const bool active = u < u_end;
  const int v0 = u * N;
  float x[N];
  float top_bound = -INFINITY, top_x = 0.f;
  uint32_t top_word = 0;
  int top = -1;
  if (active) {
    using Load = Raw<T, 16 / static_cast<int>(sizeof(T))>;
    Load raw;
    if constexpr (kVec) raw = *reinterpret_cast<const Load*>(row + int64_t{u} * N);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = to_float<T>(kVec ? raw.v[j] : row[v0 + j]);
#pragma unroll
    for (int g = 0; g < N / 4; ++g) {
      const PhiloxWords r = noise_words(rn.key, rn.counter, static_cast<uint32_t>(v0 / 4 + g));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float bound = score_bound(r.w[j], x[4 * g + j], rn);
        if (top < 0 || bound > top_bound) {  // (a NaN bound never replaces the first token)
          top = 4 * g + j;
          top_bound = bound;
          top_x = x[4 * g + j];
          top_word = r.w[j];
        }
      }
    }
    const float s = fmaf(rn.neg_t, logf(exponential_device(top_word)), top_x);
    best = key_max(best, score_key(s, static_cast<uint32_t>(v0 + top)));
  }
  auto theta = static_cast<unsigned>(best >> 32);  // every lane takes part, active or not
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) theta = max(theta, __shfl_xor_sync(kFullMask, theta, o));
  const float edge = lower_edge(ordered_float(theta), rn.slack);
  if (active && unit_may_win<N, false>(x, v0, N, rn, edge)) score_unit<T, N>(row, v0, N, rn, edge, best);
}

// The last, partial unit of a row (vocab_size % N tokens), by one thread.
template <typename T, int N>
__device__ __forceinline__ void tail_unit(const T* row, int v0, int vocab, bool sample, const RowNoise& rn,
                                          float edge, uint64_t& best) {
  const int valid = vocab - v0;
  float x[N];
#pragma unroll
  for (int j = 0; j < N; ++j) x[j] = j < valid ? to_float<T>(row[v0 + j]) : -INFINITY;
  if (sample) {
    if (unit_may_win<N, true>(x, v0, valid, rn, edge)) score_unit<T, N>(row, v0, valid, rn, edge, best);
  } else {
    greedy_unit<N>(x, v0, valid, best);
  }
}

// Grid (num_seqs, splits): block (row, split) scores units [split * split_units, + split_units) of
// the row; a unit is N consecutive tokens (N = 16 / sizeof(T) on the 16-byte path, else 4).
template <typename T, int N, bool kVec>
__global__ void __launch_bounds__(kThreads) sample_kernel(const SampleParams p) {
  const int row = blockIdx.x, split = blockIdx.y;
  const T* x_row = static_cast<const T*>(p.logits) + int64_t{row} * p.row_stride;
  const float temp = p.temperature != nullptr ? p.temperature[row * p.t_stride] : 0.f;
  const bool sample = temp > 0.f;  // 0 (or negative, or NaN, or no temperature at all): greedy
  RowNoise rn;
  rn.key = sample ? static_cast<uint64_t>(p.keys[row * p.k_stride]) : 0;
  rn.counter = sample ? static_cast<uint64_t>(p.counters[row * p.c_stride]) : 0;
  rn.neg_t = -temp;
  rn.neg_t_ln2 = -temp * kLn2;
  rn.cap = kNoiseCap * temp;
  rn.slack = 1e-4f * temp;
  const int units = (p.vocab + N - 1) / N;
  const int u_begin = split * p.split_units;
  const int u_end = min(units, u_begin + p.split_units);

  __shared__ unsigned s_theta;  // ordered_bits of the best score the block has found (0: none yet)
  __shared__ unsigned long long s_warp_best[kThreads / 32];
  if (threadIdx.x == 0) s_theta = 0;
  __syncthreads();

  uint64_t best = kNoScoreKey;
  float edge = -INFINITY;
  unsigned seen = 0;
  // After each pass: publish this thread's best score and take the block's (a stale read only makes
  // the filters weaker, never wrong: theta only grows and every value is a score found in the row).
  auto share_theta = [&]() {
    const auto mine = static_cast<unsigned>(best >> 32);
    if (mine > seen) atomicMax(&s_theta, mine);
    seen = max(mine, *static_cast<volatile unsigned*>(&s_theta));
    edge = lower_edge(ordered_float(seen), rn.slack);
  };
  const int full_end = min(u_end, p.vocab / N);  // whole units of the split
  int u = u_begin;
  if (u < full_end) {  // a short first pass, where theta is found
    if (sample) {
      first_pass<T, N, kVec>(x_row, u, full_end, rn, best);
      share_theta();
    } else {
      block_pass<T, N, kVec, 1, true>(x_row, u, full_end, sample, rn, edge, best);
    }
    u += kThreads;
  }
  for (; u + kThreads * kUnroll <= full_end; u += kThreads * kUnroll) {
    block_pass<T, N, kVec, kUnroll, false>(x_row, u, full_end, sample, rn, edge, best);
    if (sample) share_theta();
  }
  for (; u < full_end; u += kThreads) {  // what is left: fewer than kUnroll short passes
    block_pass<T, N, kVec, 1, true>(x_row, u, full_end, sample, rn, edge, best);
    if (sample) share_theta();
  }
  if (full_end < u_end && threadIdx.x == 0) tail_unit<T, N>(x_row, full_end * N, p.vocab, sample, rn, edge, best);

#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    best = key_max(best, __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(best), o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t b = s_warp_best[0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) b = key_max(b, s_warp_best[w]);
    if (p.partials != nullptr) {
      p.partials[int64_t{row} * gridDim.y + split] = b;
    } else {
      p.out[row * p.out_stride] = key_index(b);
    }
  }
}

// One warp per row: the largest of the row's `splits` partial keys -> its index.
__global__ void combine_kernel(const unsigned long long* partials, int splits, int64_t* out, int64_t out_stride) {
  const int64_t row = blockIdx.x;
  uint64_t b = kNoScoreKey;
  for (int j = threadIdx.x; j < splits; j += 32) b = key_max(b, partials[row * splits + j]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) b = key_max(b, __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(b), o));
  if (threadIdx.x == 0) out[row * out_stride] = key_index(b);
}

// exponential_noise: one thread per (row, group of 4 tokens), grid-stride.
__global__ void noise_kernel(const int64_t* keys, int64_t k_stride, const int64_t* counters, int64_t c_stride,
                             float* out, int64_t out_stride, int vocab, int64_t num_seqs) {
  const int64_t groups = (vocab + 3) / 4;
  const int64_t total = num_seqs * groups;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / groups;
    const int g = static_cast<int>(i - row * groups);
    const PhiloxWords r = noise_words(static_cast<uint64_t>(keys[row * k_stride]),
                                      static_cast<uint64_t>(counters[row * c_stride]), static_cast<uint32_t>(g));
    float* o = out + row * out_stride + int64_t{g} * 4;
    const int n = min(4, vocab - 4 * g);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) o[j] = exponential_device(r.w[j]);
    }
  }
}

// ---- launch plan --------------------------------------------------------------------------------

std::mutex g_plan_mutex;

struct Occupancy {
  int sms = 1;     // streaming multiprocessors of the device
  int per_sm = 1;  // thread blocks of the kernel one of them holds at once
};

// Cached per kernel and device.
Occupancy occupancy(const void* func, int device) {
  static std::unordered_map<const void*, std::unordered_map<int, Occupancy>> cache;
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  auto& per_device = cache[func];
  auto it = per_device.find(device);
  if (it != per_device.end()) return it->second;
  Occupancy o;
  o.sms = device_attribute(device, cudaDevAttrMultiProcessorCount);
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o.per_sm, func, kThreads, 0),
             "sample_from_logits: occupancy");
  o.sms = std::max(1, o.sms);
  o.per_sm = std::max(1, o.per_sm);
  per_device.emplace(device, o);
  return o;
}

template <typename T, int N, bool kVec>
void launch_sample(const SampleArgs& a, SampleParams p, cudaStream_t stream) {
  const void* func = reinterpret_cast<const void*>(&sample_kernel<T, N, kVec>);
  const int64_t num_seqs = a.logits.size(0);
  const int units = (p.vocab + N - 1) / N;
  // Split rows as far as one wave of resident blocks allows (the first pass of every block, which
  // finds its theta, costs more than the others), but never below one long pass per block.
  int splits = 1;
  const int64_t capacity = a.workspace.data != nullptr ? a.workspace.size(0) / num_seqs : 1;
  if (capacity >= 2) {
    const Occupancy o = occupancy(func, a.logits.device);
    const int64_t fill = int64_t{o.sms} * o.per_sm / num_seqs;
    const int64_t longest = (units + kThreads * kUnroll - 1) / (kThreads * kUnroll);
    splits = static_cast<int>(std::max<int64_t>(1, std::min({fill, longest, capacity})));
  }
  p.split_units = (units + splits - 1) / splits;
  splits = (units + p.split_units - 1) / p.split_units;
  p.partials = splits > 1 ? reinterpret_cast<unsigned long long*>(a.workspace.data) : nullptr;
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(splits));
  sample_kernel<T, N, kVec><<<grid, kThreads, 0, stream>>>(p);
  check_launch("sample_kernel");
  if (splits > 1) {
    combine_kernel<<<static_cast<unsigned>(num_seqs), 32, 0, stream>>>(p.partials, splits, p.out, p.out_stride);
    check_launch("sample_combine_kernel");
  }
}

template <typename T>
void launch_sample_dtype(const SampleArgs& a, const SampleParams& p, cudaStream_t stream) {
  constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));
  // 16-byte loads need every row start 16-byte aligned (a single row: only its own start).
  const bool vec = aligned16(a.logits.data) &&
                   (a.logits.size(0) == 1 || (a.logits.stride(0) * int64_t{sizeof(T)}) % 16 == 0);
  if (vec) {
    launch_sample<T, kVecWidth, true>(a, p, stream);
  } else {
    launch_sample<T, 4, false>(a, p, stream);
  }
}

}  // namespace

void sample_from_logits(const SampleArgs& a, uintptr_t stream_handle) {
  check_sample_args(a);
  const TensorView& x = a.logits;
  const int64_t num_seqs = x.size(0);
  if (num_seqs == 0) return;
  check(num_seqs <= INT32_MAX, "sample_from_logits: too many rows for one launch");
  check(x.size(1) <= INT32_MAX - 64, "sample_from_logits: vocab_size too large for the CUDA kernel");
  SampleParams p{};
  p.logits = x.data;
  p.row_stride = x.stride(0);
  p.vocab = static_cast<int>(x.size(1));
  p.out = a.out.ptr<int64_t>();
  if (a.temperature.data != nullptr) {  // else every row is greedy
    p.temperature = a.temperature.ptr<const float>();
    p.keys = a.keys.ptr<const int64_t>();
    p.counters = a.counters.ptr<const int64_t>();
    p.t_stride = a.temperature.stride(0);
    p.k_stride = a.keys.stride(0);
    p.c_stride = a.counters.stride(0);
  }
  p.out_stride = a.out.stride(0);

  check_cuda(cudaSetDevice(x.device), "sample_from_logits: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  switch (x.dtype) {
    case DType::kFloat32: return launch_sample_dtype<float>(a, p, stream);
    case DType::kFloat16: return launch_sample_dtype<__half>(a, p, stream);
    case DType::kBFloat16: return launch_sample_dtype<__nv_bfloat16>(a, p, stream);
    default: throw std::invalid_argument("sample_from_logits: unsupported dtype");  // rejected above already
  }
}

void exponential_noise(const NoiseArgs& a, uintptr_t stream_handle) {
  check_noise_args(a);
  const int64_t num_seqs = a.out.size(0), vocab = a.out.size(1);
  if (num_seqs == 0 || vocab == 0) return;
  const int64_t total = num_seqs * ((vocab + 3) / 4);
  constexpr int kNoiseThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kNoiseThreads - 1) / kNoiseThreads, 1 << 20));
  check_cuda(cudaSetDevice(a.out.device), "exponential_noise: cudaSetDevice");
  noise_kernel<<<blocks, kNoiseThreads, 0, as_stream(stream_handle)>>>(
      a.keys.ptr<const int64_t>(), a.keys.stride(0), a.counters.ptr<const int64_t>(), a.counters.stride(0),
      a.out.ptr<float>(), a.out.stride(0), static_cast<int>(vocab), num_seqs);
  check_launch("exponential_noise_kernel");
}

}  // namespace tinyserve::cuda
