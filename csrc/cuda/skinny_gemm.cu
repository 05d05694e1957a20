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
//    interleaved steps of 64 k, so each warp reads 128 contiguous bytes of each of its rows per
//    step and every thread has 8 weight loads of 16 bytes (+ 1-2 of x) in flight at once. Weight
//    loads skip L1 (ld.global.nc.L1::no_allocate); x stays in L1 for every block of the SM.
//  - The warps' partial sums meet in shared memory. When the row blocks alone cannot fill the GPU
//    or would run long, k is also split across a thread-block cluster of up to 8 blocks (code
//    built for sm_90+; older builds never split), whose partial sums are added through distributed
//    shared memory: one kernel, no workspace, no atomics, a fixed order of additions (deterministic).
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
constexpr int kUnroll = 2;                  // 32-wide k chunks per step
constexpr int kStepK = 32 * kUnroll;        // k per warp step: 128 bytes of each row
constexpr int kMaxSplits = 8;               // the portable thread-block-cluster size
constexpr int kRedStride = kBlockRows + 8;  // padded rows: the float2 stores of a half-warp hit 32 banks

struct SkinnyParams {
  const void* x;
  const void* weight;
  const void* bias;  // nullptr: no bias
  void* out;
  int64_t n, k;
  int m;
  int num_steps;  // ceil(k / kStepK)
  int splits;     // blocks per cluster, each summing one range of steps (gridDim.y)
};

// The asm of load16, for one load instruction (string literal) of four u32 registers.
#define TINYSERVE_PREDICATED_LOAD16(LOAD, v, ptr, valid)                 \
  asm volatile(                                                          \
      "{\n"                                                              \
      "  .reg .pred p;\n"                                                \
      "  setp.ne.b32 p, %5, 0;\n"                                        \
      "  mov.b32 %0, 0;\n"                                               \
      "  mov.b32 %1, 0;\n"                                               \
      "  mov.b32 %2, 0;\n"                                               \
      "  mov.b32 %3, 0;\n"                                               \
      "  @p " LOAD " {%0, %1, %2, %3}, [%4];\n"                          \
      "}\n"                                                              \
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)                       \
      : "l"(ptr), "r"(static_cast<int>(valid)))

// 16 bytes through the read-only path, zeros when !valid (nothing is read). Predicated in PTX, so
// no branch splits a step's loads. kStream: not kept in L1 (the weight, read once); otherwise
// cached (x: every block of the SM reads the same rows).
template <bool kStream>
__device__ __forceinline__ uint4 load16(const void* ptr, bool valid) {
  uint4 v;
  if constexpr (kStream) {
    TINYSERVE_PREDICATED_LOAD16("ld.global.nc.L1::no_allocate.v4.u32", v, ptr, valid);
  } else {
    TINYSERVE_PREDICATED_LOAD16("ld.global.nc.v4.u32", v, ptr, valid);
  }
  return v;
}

#undef TINYSERVE_PREDICATED_LOAD16

// grid = (ceil(n / kBlockRows), splits); with splits > 1 the blocks of one row block form a cluster.
template <typename T, bool kM16>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const SkinnyParams p) {
  constexpr int kTokens = kM16 ? 16 : 8;  // token rows held in the mma's A fragment
  __shared__ __align__(16) float red[kWarps][kTokens][kRedStride];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;  // mma group: weight row (B) and token row (A); k quarter
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int split = blockIdx.y;
  const int step_begin = static_cast<int>(static_cast<int64_t>(split) * p.num_steps / p.splits);
  const int step_end = static_cast<int>(static_cast<int64_t>(split + 1) * p.num_steps / p.splits);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // First half of the barrier the epilogue waits on before writing into other blocks' shared memory.
  if (p.splits > 1) cooperative_groups::this_cluster().barrier_arrive();
#endif

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
  const T* x_lo = static_cast<const T*>(p.x) + (lo_ok ? g : 0) * p.k + 8 * q;
  const T* x_hi = static_cast<const T*>(p.x) + (hi_ok ? g + 8 : 0) * p.k + 8 * q;

  float acc[kTiles][4] = {};
  for (int s = step_begin + warp; s < step_end; s += kWarps) {
    uint4 w[kUnroll][kTiles], xa[kUnroll], xb[kUnroll];
    // Every load of the step first (all in flight together), then the multiplies.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = static_cast<int64_t>(s) * kStepK + 32 * u;
      const bool k_ok = k + 8 * q < p.k;  // k % 8 == 0: a vector is wholly in range or out
#pragma unroll
      for (int t = 0; t < kTiles; ++t) w[u][t] = load16<true>(w_row[t] + k, row_ok[t] && k_ok);
      xa[u] = load16<false>(x_lo + k, lo_ok && k_ok);
      xb[u] = kM16 ? load16<false>(x_hi + k, hi_ok && k_ok) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // k + 8q + {0,1 | 2,3} fill the mma's k slots {2q, 2q+1 | 2q+8, 2q+9}; k + 8q + 4..7 the second mma's.
      const uint32_t a0[4] = {xa[u].x, xb[u].x, xa[u].y, xb[u].y};
      const uint32_t a1[4] = {xa[u].z, xb[u].z, xa[u].w, xb[u].w};
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_16816<T>(acc[t], a0, w[u][t].x, w[u][t].y);
        mma_16816<T>(acc[t], a1, w[u][t].z, w[u][t].w);
      }
    }
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
    static_cast<T*>(p.out)[(i / kBlockRows) * p.n + row] = from_float<T>(v);
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
  int slots = 0;          // thread blocks the device holds at once
  bool clusters = false;  // the code that runs was compiled for sm_90+ (thread-block clusters)
};

KernelInfo kernel_info(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "skinny_gemm: SM count");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0), "skinny_gemm: occupancy");
  cudaFuncAttributes attrs{};
  check_cuda(cudaFuncGetAttributes(&attrs, kernel), "skinny_gemm: kernel attributes");
  // ptxVersion is the virtual architecture the code was compiled for (its __CUDA_ARCH__), also when
  // the driver compiles PTX for a newer card.
  const KernelInfo info{std::max(1, per_sm) * sms, attrs.ptxVersion >= 90};
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

template <typename T, bool kM16>
void launch(const SkinnyGemmArgs& a, int device, cudaStream_t stream) {
  SkinnyParams p{};
  p.x = a.x.data;
  p.weight = a.weight.data;
  p.bias = a.bias.data;
  p.out = a.out.data;
  p.m = static_cast<int>(a.x.size(0));
  p.n = a.weight.size(0);
  p.k = a.x.size(1);
  p.num_steps = static_cast<int>((p.k + kStepK - 1) / kStepK);
  const int64_t row_blocks = (p.n + kBlockRows - 1) / kBlockRows;

  auto* kernel = skinny_gemm_kernel<T, kM16>;
  const KernelInfo info = kernel_info(reinterpret_cast<const void*>(kernel), device);
  p.splits = info.clusters ? choose_splits(row_blocks, p.num_steps, info.slots) : 1;

  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(p.splits), 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = static_cast<unsigned>(p.splits);
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = p.splits > 1 ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, p), "skinny_gemm: kernel launch");
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void skinny_gemm(const SkinnyGemmArgs& a, uintptr_t stream_handle) {
  check_skinny_gemm_args(a);
  check(aligned16(a.x.data) && aligned16(a.weight.data),
        "skinny_gemm (CUDA): x and weight must start on a 16-byte boundary (16-byte vector loads)");
  const int64_t m = a.x.size(0), n = a.weight.size(0), k = a.x.size(1);
  if (m == 0 || n == 0) return;
  check(k <= INT32_MAX && (n + kBlockRows - 1) / kBlockRows <= INT32_MAX,
        "skinny_gemm (CUDA): sizes past 2^31 are not supported");
  const int device = a.out.device;
  int current = -1;
  check_cuda(cudaGetDevice(&current), "skinny_gemm: cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "skinny_gemm: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  const bool m16 = m > 8;
  if (a.x.dtype == DType::kBFloat16) {
    m16 ? launch<__nv_bfloat16, true>(a, device, stream) : launch<__nv_bfloat16, false>(a, device, stream);
  } else {
    m16 ? launch<__half, true>(a, device, stream) : launch<__half, false>(a, device, stream);
  }
}

}  // namespace tinyserve::cuda
