// Skinny GEMM for decode: out[m, n] = x[m, k] . weight[n, k] (+ bias[n]) for m <= 16 token rows,
// float16/bfloat16 with float32 accumulation. At these sizes the product is bound by reading the
// weight once, so the kernel is a weight stream at (close to) the card's bandwidth:
//  - Tensor cores, turned around: mma.sync m16n8k16 with x as A (16 token rows; rows >= m are zero)
//    and 8 weight rows as B, so the multiply-adds leave the CUDA cores free and nothing is
//    converted to float32 (rows >= m are wasted tensor-core work, which is idle here anyway). A dot
//    product does not care in which order k is summed, so each thread's 16-byte load of 8
//    consecutive k of one weight row feeds its B fragments of two mma directly, and its x
//    fragment is loaded with the same permutation of k (8 consecutive k of one token row).
//  - A thread block of 4 warps owns 32 weight rows (4 mma tiles of 8 rows). The warps take
//    interleaved steps of 64 (or 128) k, so each warp reads 128 (256) contiguous bytes of each of
//    its rows per step. Steps are software pipelined: a warp issues the loads of its next step
//    before the multiplies of this one, so every thread keeps 8-16 weight loads of 16 bytes in
//    flight. Weight loads skip L1 (ld.global.nc.L1::no_allocate); x stays in L1 for every block of
//    the SM.
//  - The warps' partial sums meet in shared memory. When the row blocks alone cannot fill the GPU
//    or would run long, k is also split across a thread-block cluster of up to 8 blocks (code
//    built for sm_90+; older builds never split), whose partial sums are added through distributed
//    shared memory: one kernel, no workspace, no atomics, a fixed order of additions (deterministic).
//
// Fused neighbours (ops.h): an RMSNorm of x (each block reduces its rows' sums of squares itself)
// or SiLU-and-mul of a [gate | up] x, applied once per block to its range of k and staged in shared
// memory (or, when that would not fit, applied to each fragment as it is used); and a residual
// add in the store. A decoder layer at decode sizes is then four products and its attention, with
// no norm, SiLU or add kernels between them.
//
// Launched with programmatic dependent launch (cuda_utils.cuh) when the card allows: a block first
// asks L2 for its slice of the weight (cp.async.bulk.prefetch; only for weights that fit well in
// L2), then waits for the kernel before it. The weight stream thus starts while the previous
// kernel still runs.
//
// NOTE: nothing is read back to the host and nothing is allocated, so it can be captured in a CUDA
// graph; the launch depends only on shapes and the device.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_utils.cuh"
#include "mma.cuh"

namespace tinyserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTiles = 4;                   // mma tiles of 8 weight rows per block
constexpr int kBlockRows = 8 * kTiles;      // weight rows (output columns) per block
// A warp step covers kUnroll 32-wide k chunks: 64 bytes of each of its rows per chunk. Template
// parameter of the kernel (2 or 4, SkinnyGemmArgs::unroll): more loads in flight per thread against
// more registers, fewer blocks per SM and longer steps. Neither wins on every shape.
constexpr int kMaxSplits = 8;               // the portable thread-block-cluster size
constexpr int kRedStride = kBlockRows + 8;  // padded rows: the float2 stores of a half-warp hit 32 banks

// What the kernel does to x before the product.
enum Prologue : int { kPlain = 0, kNorm = 1, kSilu = 2 };

struct SkinnyParams {
  const void* x;
  const void* weight;
  const void* bias;  // nullptr: no bias
  void* out;
  const void* norm_weight;  // kNorm: [k]
  const void* residual;     // nullptr: no residual add; may equal out
  int64_t n, k;
  int64_t x_stride;  // elements between x rows: k, or 2k with kSilu
  float eps;
  int m;
  int num_steps;     // ceil(k / step_k), step_k = 32 * kUnroll
  int splits;        // blocks per cluster, each summing one range of steps (gridDim.y)
  int stage_stride;  // > 0: the prologue's output is staged in shared memory, rows this many elements apart
  bool prefetch;     // ask L2 for the block's weight slice before waiting on the previous kernel
};

// Ask L2 for `bytes` (a multiple of 16) at a 16-byte aligned address; nothing is waited for.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
#endif
}

// The prologue on 8 consecutive k of the product's left operand: v (x, or gate with kSilu) and aux
// (norm_weight with kNorm, up with kSilu) at the same k; inv is the row's 1 / rms (kNorm).
template <typename T, int kPro>
__device__ __forceinline__ uint4 transform_x(const uint4& v, const uint4& aux, float inv) {
  if constexpr (kPro == kPlain) {
    return v;
  } else if constexpr (kPro == kNorm) {
    // RMSNorm's order: normalise in float32, round, scale by the weight, round.
    float x[8], g[8];
    unpack8<T>(v, x);
    unpack8<T>(aux, g);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = __fmul_rn(g[j], round_to<T>(x[j] * inv));
    return pack8<T>(x);
  } else {
    // SiluAndMul's order: silu in float32, rounded, times up, rounded.
    float gate[8], up[8];
    unpack8<T>(v, gate);
    unpack8<T>(aux, up);
#pragma unroll
    for (int j = 0; j < 8; ++j) gate[j] = __fmul_rn(round_to<T>(gate[j] / (1.f + expf(-gate[j]))), up[j]);
    return pack8<T>(gate);
  }
}

// The load transform_x needs besides x itself: norm_weight (kNorm) or up (kSilu) at the same k.
template <typename T, int kPro>
__device__ __forceinline__ uint4 load_aux(const T* row, int64_t k, bool valid, const T* gamma, int64_t up_offset) {
  if constexpr (kPro == kNorm) return load16<false>(gamma + k, valid);
  if constexpr (kPro == kSilu) return load16<false>(row + up_offset + k, valid);
  return make_uint4(0u, 0u, 0u, 0u);
}

// grid = (ceil(n / kBlockRows), splits); with splits > 1 the blocks of one row block form a cluster.
template <typename T, bool kM16, int kPro, int kUnroll>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const SkinnyParams p) {
  constexpr int kTokens = kM16 ? 16 : 8;  // token rows held in the mma's A fragment
  constexpr int kStepK = 32 * kUnroll;
  __shared__ __align__(16) float red[kWarps][kTokens][kRedStride];
  __shared__ float s_inv[kTokens];  // kNorm: 1 / rms of each token row
  extern __shared__ __align__(16) unsigned char s_dyn[];
  T* s_x = reinterpret_cast<T*>(s_dyn);  // stage_stride > 0: the prologue's output, [m][stage_stride]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;  // mma group: weight row (B) and token row (A); k quarter
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int split = blockIdx.y;
  const int step_begin = static_cast<int>(static_cast<int64_t>(split) * p.num_steps / p.splits);
  const int step_end = static_cast<int>(static_cast<int64_t>(split + 1) * p.num_steps / p.splits);
  if (p.prefetch && warp == 0) {
    // The weight is no earlier kernel's output: its slice may be requested before the wait. One
    // row per lane (kBlockRows == 32), the block's range of k.
    const int64_t r = row0 + lane;
    const int64_t k0 = static_cast<int64_t>(step_begin) * kStepK;
    const int64_t k_end = static_cast<int64_t>(step_end) * kStepK;
    const int64_t k1 = k_end < p.k ? k_end : p.k;
    if (r < p.n && k1 > k0) {
      prefetch_l2(static_cast<const T*>(p.weight) + r * p.k + k0, static_cast<uint32_t>((k1 - k0) * sizeof(T)));
    }
  }
  pdl_wait();
  pdl_launch_dependents();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // First half of the barrier the epilogue waits on before writing into other blocks' shared memory.
  if (p.splits > 1) cooperative_groups::this_cluster().barrier_arrive();
#endif
  if constexpr (kPro == kNorm) {
    // Every block reduces its token rows itself (a few KB from L2): no kernel and no cross-block
    // reduction before the product. All threads share each row, and a thread's loads of all rows
    // are issued together, so the reduction costs about one L2 round trip.
    float ss[kTokens] = {};
    for (int64_t i0 = 0; i0 < p.k; i0 += 8 * kThreads) {
      const int64_t i = i0 + 8 * threadIdx.x;
      uint4 v[kTokens];
#pragma unroll
      for (int r = 0; r < kTokens; ++r) {
        v[r] = load16<false>(static_cast<const T*>(p.x) + (r < p.m ? r : 0) * p.x_stride + i, r < p.m && i < p.k);
      }
#pragma unroll
      for (int r = 0; r < kTokens; ++r) {
        float f[8];
        unpack8<T>(v[r], f);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss[r] += f[j] * f[j];
      }
    }
#pragma unroll
    for (int r = 0; r < kTokens; ++r) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
      if (lane == 0) red[warp][r][0] = ss[r];  // red is free until the epilogue
    }
    __syncthreads();
    if (threadIdx.x < p.m) {
      const int r = threadIdx.x;
      const float total = (red[0][r][0] + red[1][r][0]) + (red[2][r][0] + red[3][r][0]);
      s_inv[r] = rsqrtf(total / static_cast<float>(p.k) + p.eps);
    }
    __syncthreads();
  }

  const int64_t k_begin = static_cast<int64_t>(step_begin) * kStepK;
  const bool staged = kPro != kPlain && p.stage_stride > 0;
  if (staged) {
    // The prologue once per block over its range of k, into shared memory: the loop below then
    // reads ready A fragments, with no conversions between its loads and its multiplies. Four
    // vectors per thread are loaded before any is transformed.
    const int64_t k_stop = static_cast<int64_t>(step_end) * kStepK;
    const int vecs = static_cast<int>(((k_stop < p.k ? k_stop : p.k) - k_begin) / 8);  // per row
    const int total = p.m * vecs;
    const T* gamma0 = static_cast<const T*>(p.norm_weight);
    for (int base = 0; base < total; base += 4 * kThreads) {
      uint4 v[4], aux[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = base + j * kThreads + threadIdx.x;
        const bool ok = idx < total;
        const int r = ok ? idx / vecs : 0;
        const int64_t k = k_begin + 8 * static_cast<int64_t>(ok ? idx - r * vecs : 0);
        const T* row = static_cast<const T*>(p.x) + r * p.x_stride;
        v[j] = load16<false>(row + k, ok);
        aux[j] = load_aux<T, kPro>(row, k, ok, gamma0, p.k);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = base + j * kThreads + threadIdx.x;
        if (idx >= total) break;
        const int r = idx / vecs;
        const float inv = kPro == kNorm ? s_inv[r] : 0.f;
        *reinterpret_cast<uint4*>(s_x + r * p.stage_stride + 8 * (idx - r * vecs)) =
            transform_x<T, kPro>(v[j], aux[j], inv);
      }
    }
    __syncthreads();
  }

  // Thread (g, q) reads k = step * kStepK + 32 * u + 8 * q + [0, 8) of weight row row0 + 8 * t + g
  // and of token rows g and g + 8.
  const T* w_row[kTiles];
  bool row_ok[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int64_t r = row0 + 8 * t + g;
    row_ok[t] = r < p.n;
    w_row[t] = static_cast<const T*>(p.weight) + (row_ok[t] ? r : 0) * p.k + 8 * q;
  }
  const bool lo_ok = g < p.m, hi_ok = kM16 && g + 8 < p.m;
  const T* x_lo = static_cast<const T*>(p.x) + (lo_ok ? g : 0) * p.x_stride + 8 * q;
  const T* x_hi = static_cast<const T*>(p.x) + (hi_ok ? g + 8 : 0) * p.x_stride + 8 * q;
  const T* gamma = kPro == kNorm ? static_cast<const T*>(p.norm_weight) + 8 * q : nullptr;
  float inv_lo = 0.f, inv_hi = 0.f;
  if constexpr (kPro == kNorm) {
    inv_lo = lo_ok ? s_inv[g] : 0.f;
    inv_hi = hi_ok ? s_inv[g + 8] : 0.f;
  }

  // One warp step: the weight vectors and the raw x vectors (plus the prologue's second operand)
  // of steps s, loaded into registers; nothing is loaded for s >= step_end.
  struct Step {
    uint4 w[kUnroll][kTiles], xa[kUnroll], xb[kUnroll], aa[kUnroll], ab[kUnroll];
  };
  auto load_step = [&](int s, Step& st) {
    const bool s_ok = s < step_end;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = static_cast<int64_t>(s) * kStepK + 32 * u;
      const bool k_ok = s_ok && k + 8 * q < p.k;  // k % 8 == 0: a vector is wholly in range or out
#pragma unroll
      for (int t = 0; t < kTiles; ++t) st.w[u][t] = load16<true>(w_row[t] + k, row_ok[t] && k_ok);
      const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
      if (staged) {
        const T* sx = s_x + (k - k_begin) + 8 * q;
        st.xa[u] = lo_ok && k_ok ? *reinterpret_cast<const uint4*>(sx + g * p.stage_stride) : zero;
        st.xb[u] = kM16 && hi_ok && k_ok ? *reinterpret_cast<const uint4*>(sx + (g + 8) * p.stage_stride) : zero;
      } else {
        st.xa[u] = load16<false>(x_lo + k, lo_ok && k_ok);
        st.aa[u] = load_aux<T, kPro>(x_lo, k, lo_ok && k_ok, gamma, p.k);
        st.xb[u] = kM16 ? load16<false>(x_hi + k, hi_ok && k_ok) : zero;
        st.ab[u] = kM16 ? load_aux<T, kPro>(x_hi, k, hi_ok && k_ok, gamma, p.k) : zero;
      }
    }
  };
  auto mma_step = [&](const Step& st, float (&acc)[kTiles][4]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      uint4 xa = st.xa[u], xb = st.xb[u];
      if (!staged) {
        xa = transform_x<T, kPro>(xa, st.aa[u], inv_lo);
        if constexpr (kM16) xb = transform_x<T, kPro>(xb, st.ab[u], inv_hi);
      }
      // k + 8q + {0,1 | 2,3} fill the mma's k slots {2q, 2q+1 | 2q+8, 2q+9}; k + 8q + 4..7 the second mma's.
      const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y};
      const uint32_t a1[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_16816<T>(acc[t], a0, st.w[u][t].x, st.w[u][t].y);
        mma_16816<T>(acc[t], a1, st.w[u][t].z, st.w[u][t].w);
      }
    }
  };

  // Software pipelined: the loads of a warp's next step are issued before the multiplies of this
  // one, so a step's multiplies never wait on loads issued right before them (the compiler
  // otherwise interleaves a step's loads with its multiplies, leaving few loads in flight).
  float acc[kTiles][4] = {};
  Step cur, next;
  load_step(step_begin + warp, cur);
  for (int s = step_begin + warp; s < step_end; s += 2 * kWarps) {
    load_step(s + kWarps, next);
    mma_step(cur, acc);
    if (s + kWarps >= step_end) break;
    load_step(s + 2 * kWarps, cur);
    mma_step(next, acc);
  }

  // acc[t] = {(token g, row 8t + 2q), (g, 8t + 2q + 1), (g + 8, 8t + 2q), (g + 8, 8t + 2q + 1)}.
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    *reinterpret_cast<float2*>(&red[warp][g][8 * t + 2 * q]) = make_float2(acc[t][0], acc[t][1]);
    if constexpr (kM16) {
      *reinterpret_cast<float2*>(&red[warp][g + 8][8 * t + 2 * q]) = make_float2(acc[t][2], acc[t][3]);
    }
  }
  __syncthreads();

  // Outputs of this block: i = token * kBlockRows + row, consecutive threads on consecutive rows.
  const int outputs = p.m * kBlockRows;
  auto block_sum = [&](int i) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][i / kBlockRows][i % kBlockRows];
    return v;
  };
  auto store = [&](int i, float v) {
    const int64_t row = row0 + i % kBlockRows;
    if (row >= p.n) return;
    if (p.bias != nullptr) v += to_float<T>(static_cast<const T*>(p.bias)[row]);
    const int64_t at = (i / kBlockRows) * p.n + row;
    // The residual add rounds as the unfused one: the product is stored in T, then the sum. The
    // thread that reads residual[at] is the one that writes out[at], so out may be the residual.
    if (p.residual != nullptr) v = round_to<T>(v) + to_float<T>(static_cast<const T*>(p.residual)[at]);
    static_cast<T*>(p.out)[at] = from_float<T>(v);
  };
  if (p.splits == 1) {
    for (int i = threadIdx.x; i < outputs; i += kThreads) store(i, block_sum(i));
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Cluster of the row block's splits (the host launches splits > 1 only for sm_90+ code). Block
  // `owner` finishes outputs [owner * chunk, (owner + 1) * chunk): every block writes its partial
  // sums straight into the owner's shared memory, part[its rank][i]; after one cluster barrier each
  // owner adds its outputs' partials in rank order and stores them.
  namespace cg = cooperative_groups;
  __shared__ float part[kMaxSplits][kTokens * kBlockRows];
  const int rank = static_cast<int>(cg::this_cluster().block_rank());
  const int chunk = (outputs + p.splits - 1) / p.splits;
  cg::this_cluster().barrier_wait();  // (arrived at the start) every block has started: its shared memory exists
  for (int i = threadIdx.x; i < outputs; i += kThreads) {
    cg::this_cluster().map_shared_rank(&part[rank][0], i / chunk)[i] = block_sum(i);
  }
  cg::this_cluster().sync();  // the partials are written and visible; nothing remote happens after this
  for (int i = rank * chunk + threadIdx.x; i < min(outputs, (rank + 1) * chunk); i += kThreads) {
    float v = 0.f;
    for (int r = 0; r < p.splits; ++r) v += part[r][i];
    store(i, v);
  }
#endif
}

// ---- launch plan --------------------------------------------------------------------------------

struct KernelInfo {
  int slots = 0;             // thread blocks the device holds at once
  bool clusters = false;     // the code that runs was compiled for sm_90+ (thread-block clusters)
  int64_t l2_bytes = 0;      // the device's L2 cache
  int64_t static_smem = 0;   // the kernel's static shared memory
};

KernelInfo kernel_info(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0), "skinny_gemm: occupancy");
  cudaFuncAttributes attrs{};
  check_cuda(cudaFuncGetAttributes(&attrs, kernel), "skinny_gemm: kernel attributes");
  // ptxVersion is the virtual architecture the code was compiled for (its __CUDA_ARCH__), also when
  // the driver compiles PTX for a newer card.
  const KernelInfo info{std::max(1, per_sm) * device_attribute(device, cudaDevAttrMultiProcessorCount),
                        attrs.ptxVersion >= 90, device_attribute(device, cudaDevAttrL2CacheSize),
                        static_cast<int64_t>(attrs.sharedSizeBytes)};
  cache.emplace(key, info);
  return info;
}

// Modelled cost of s splits, in rounds of loads of one warp: ceil(blocks / slots) waves, each as long
// as its blocks' longest warp plus a round for a block's fixed costs (start, reduction, stores).
// Small matrices get every load in flight at once; long rows get short blocks, so the last
// (partial) wave is short too.
constexpr double kBlockOverheadRounds = 1.0;

int choose_splits(int64_t row_blocks, int64_t num_steps, int64_t slots) {
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, num_steps / kWarps));
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t waves = (row_blocks * s + slots - 1) / slots;
    const int64_t steps = (num_steps + s - 1) / s;
    const int64_t rounds = (steps + kWarps - 1) / kWarps;
    const double cost = static_cast<double>(waves) * (static_cast<double>(rounds) + kBlockOverheadRounds);
    if (cost < best_cost) {
      best = static_cast<int>(s);
      best_cost = cost;
    }
  }
  return best;
}

// Weights up to this fraction of L2 are prefetched whole before the wait; larger ones would push
// their own first slices out before they are read.
constexpr int64_t kPrefetchL2Fraction = 3;

// Shared memory a launch may use without opting in (static + dynamic); the staged prologue takes
// what the kernel's static buffers leave of it.
constexpr int64_t kMaxLaunchSmem = 48 * 1024;

template <typename T, bool kM16, int kPro, int kUnroll>
void launch(const SkinnyGemmArgs& a, int device, cudaStream_t stream) {
  constexpr int kStepK = 32 * kUnroll;
  SkinnyParams p{};
  p.x = a.x.data;
  p.weight = a.weight.data;
  p.bias = a.bias.data;
  p.out = a.out.data;
  p.norm_weight = a.norm_weight.data;
  p.residual = a.residual.data;
  p.eps = a.eps;
  p.m = static_cast<int>(a.x.size(0));
  p.n = a.weight.size(0);
  p.k = a.weight.size(1);
  p.x_stride = a.x.size(1);
  p.num_steps = static_cast<int>((p.k + kStepK - 1) / kStepK);
  const int64_t row_blocks = (p.n + kBlockRows - 1) / kBlockRows;

  auto* kernel = skinny_gemm_kernel<T, kM16, kPro, kUnroll>;
  const KernelInfo info = kernel_info(reinterpret_cast<const void*>(kernel), device);
  p.splits = info.clusters ? choose_splits(row_blocks, p.num_steps, info.slots) : 1;
  // The longest range of k a block sums, padded by 16 bytes so rows start in other banks.
  const int64_t range = std::min<int64_t>(p.k, static_cast<int64_t>((p.num_steps + p.splits - 1) / p.splits) * kStepK);
  const int64_t stage_bytes = p.m * (range + 8) * static_cast<int64_t>(sizeof(T));
  const bool stage = kPro != kPlain && stage_bytes + info.static_smem <= kMaxLaunchSmem;
  p.stage_stride = stage ? static_cast<int>(range + 8) : 0;
  const int64_t weight_bytes = p.n * p.k * static_cast<int64_t>(sizeof(T));
  p.prefetch = info.clusters && pdl_enabled(device) && weight_bytes * kPrefetchL2Fraction <= info.l2_bytes;

  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = static_cast<unsigned>(p.splits);
  cluster.val.clusterDim.z = 1;
  void* args[] = {&p};
  launch_kernel(reinterpret_cast<const void*>(kernel),
                dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(p.splits), 1), dim3(kThreads, 1, 1),
                stage ? static_cast<size_t>(stage_bytes) : 0, stream, args, device, "skinny_gemm: kernel launch",
                &cluster, p.splits > 1 ? 1 : 0);
}


template <typename T>
void launch_for(const SkinnyGemmArgs& a, int device, cudaStream_t stream) {
  const bool m16 = a.x.size(0) > 8;
  const int pro = a.norm_weight.data != nullptr ? kNorm : (a.silu ? kSilu : kPlain);
  const bool u4 = a.unroll == 4;
  switch (pro * 4 + (m16 ? 2 : 0) + (u4 ? 1 : 0)) {
    case 0: return launch<T, false, kPlain, 2>(a, device, stream);
    case 1: return launch<T, false, kPlain, 4>(a, device, stream);
    case 2: return launch<T, true, kPlain, 2>(a, device, stream);
    case 3: return launch<T, true, kPlain, 4>(a, device, stream);
    case 4: return launch<T, false, kNorm, 2>(a, device, stream);
    case 5: return launch<T, false, kNorm, 4>(a, device, stream);
    case 6: return launch<T, true, kNorm, 2>(a, device, stream);
    case 7: return launch<T, true, kNorm, 4>(a, device, stream);
    case 8: return launch<T, false, kSilu, 2>(a, device, stream);
    case 9: return launch<T, false, kSilu, 4>(a, device, stream);
    case 10: return launch<T, true, kSilu, 2>(a, device, stream);
    default: return launch<T, true, kSilu, 4>(a, device, stream);
  }
}

}  // namespace

void skinny_gemm(const SkinnyGemmArgs& a, uintptr_t stream_handle) {
  check_skinny_gemm_args(a);
  check(aligned16(a.x.data) && aligned16(a.weight.data),
        "skinny_gemm (CUDA): x and weight must start on a 16-byte boundary (16-byte vector loads)");
  const int64_t m = a.x.size(0), n = a.weight.size(0), k = a.weight.size(1);
  if (m == 0 || n == 0) return;
  check(a.norm_weight.data == nullptr || aligned16(a.norm_weight.data),
        "skinny_gemm (CUDA): norm_weight must start on a 16-byte boundary (16-byte vector loads)");
  check(k <= INT32_MAX && (n + kBlockRows - 1) / kBlockRows <= INT32_MAX,
        "skinny_gemm (CUDA): sizes past 2^31 are not supported");
  const int device = a.out.device;
  use_device(device, "skinny_gemm: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  if (a.x.dtype == DType::kBFloat16) {
    launch_for<__nv_bfloat16>(a, device, stream);
  } else {
    launch_for<__half>(a, device, stream);
  }
}

}  // namespace tinyserve::cuda
