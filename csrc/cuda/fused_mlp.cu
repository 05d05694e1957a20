// Fused MLP block for decode (ops.h): residual add, RMSNorm, gate/up product, SiLU-and-mul, down
// product and output add in one kernel, for one or two token rows.
//
// Why: at one or two tokens a step, each of those is a short kernel whose fixed costs (launch,
// the first loads' latency, the tail) are several microseconds, against a few microseconds of
// weight streaming (Qwen3-0.6B: 19 MB of MLP weights a layer, about 6.5 us at copy bandwidth,
// against 15-18 us for the four kernels). One kernel streams both weights back to back.
//
// How: two blocks of 8 warps per SM, all resident at once.
//  1. Every block forms the normalised input x of its rows itself (a few KB from L2) into shared
//     memory, as floats. Its first weight loads are issued before that, before even waiting on the
//     previous kernel (programmatic dependent launch; weights are no kernel's output).
//  2. Gate/up: the grid's warps take intermediate indices i in turn; a warp streams rows i and
//     I + i of gate_up (16-byte loads, two batches in flight), reduces the dot products with x,
//     applies SiLU-and-mul and writes a[:, i] to the workspace.
//  3. A grid-wide barrier (an arrival counter in the workspace). Each warp has issued the loads of
//     its first down row before arriving, so the weight stream does not stop at the barrier.
//  4. Down: every block copies a into shared memory (as floats); the warps take output rows j in
//     turn, stream row j of down, reduce, and store out[:, j] (adding the residual stream, or
//     writing it).
// CUDA-core FMAs, which suit one or two rows: every weight element is used once per row, so beyond
// that the multiplies and shared-memory reads of x outgrow the weight stream (the skinny GEMM's
// tensor cores take those sizes).
//
// The residual stream is written only after the barrier, once every block has read it; the last
// block to leave the barrier zeroes the counters for the next launch. A launch depends only on
// shapes and the device, so it can be captured in a CUDA graph.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 256;  // k elements a warp's 16-byte loads cover (32 lanes x 8)
constexpr int kBatch = 4;    // chunks per row per batch: a batch is 1024 k of each row
// Batches in flight per warp: gate/up (two rows a batch) and down (two blocks of 8 warps per SM,
// at most 128 registers a thread). Qwen3-0.6B's shapes give each warp one or two gate/up batches
// and at most one down row of three batches: all issued up front.
constexpr int kUpDepth = 2;
constexpr int kDownDepth = 3;

struct MlpParams {
  const void* hidden;  // nullptr: none
  void* residual;
  const void* norm_weight;
  const void* gate_up;  // [2I, H]
  const void* down;     // [H, I]
  void* out;
  void* act;           // [m, I] workspace buffer
  unsigned* barrier;   // [2]: arrivals, departures
  int64_t h, inter;
  float eps;
  int m;
};

__device__ __forceinline__ uint4 load_weight(const void* ptr, bool valid) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (valid) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  }
  return v;
}

// Data an earlier kernel (or another block of this one) wrote: through L2, not the read-only path.
__device__ __forceinline__ uint4 load_coherent(const void* ptr) { return __ldcg(static_cast<const uint4*>(ptr)); }

// 8 floats of shared memory (32-byte aligned) as two 16-byte accesses.
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void store8(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A stream of weight rows for one warp: items it = first, first + stride, ... < count; item it is
// rows it + r * row_gap (r < kRows) of W [*, len]. A batch is kBatch chunks of 256 k of each row.
template <typename T, int kRows>
struct RowStream {
  const T* w;
  int64_t len, row_gap;
  int64_t first, stride;
  int batches_per_item, num_batches;

  __device__ RowStream(const void* weight, int64_t len_, int64_t row_gap_, int64_t first_, int64_t stride_,
                       int64_t count)
      : w(static_cast<const T*>(weight)), len(len_), row_gap(row_gap_), first(first_), stride(stride_) {
    batches_per_item = static_cast<int>((len + kChunk * kBatch - 1) / (kChunk * kBatch));
    const int64_t items = first < count ? (count - first + stride - 1) / stride : 0;
    num_batches = static_cast<int>(items) * batches_per_item;
  }

  __device__ int64_t item(int b) const { return first + static_cast<int64_t>(b / batches_per_item) * stride; }
  __device__ int64_t k0(int b) const { return static_cast<int64_t>(b % batches_per_item) * kChunk * kBatch; }

  // Loads of batch b (nothing for b >= num_batches) into v.
  __device__ void load(int b, int lane, uint4 (&v)[kRows][kBatch]) const {
    const bool ok = b < num_batches;
    const int64_t it = ok ? item(b) : 0, base = ok ? k0(b) : 0;
#pragma unroll
    for (int c = 0; c < kBatch; ++c) {
      const int64_t k = base + c * kChunk + 8 * lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) v[r][c] = load_weight(w + (it + r * row_gap) * len + k, ok && k < len);
    }
  }

  // acc[r][t] += row r of batch b . x[t] (x: [m][len] floats in shared memory).
  template <int kM>
  __device__ void multiply(int b, int lane, const uint4 (&v)[kRows][kBatch], const float* x, int m,
                           float (&acc)[kRows][kM]) const {
    const int64_t base = k0(b);
#pragma unroll
    for (int c = 0; c < kBatch; ++c) {
      const int64_t k = base + c * kChunk + 8 * lane;
      if (k >= len) break;
      float wf[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack8<T>(v[r][c], wf[r]);
#pragma unroll
      for (int t = 0; t < kM; ++t) {
        if (t >= m) break;
        float xf[8];
        load8(x + t * len + k, xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r][t] = fmaf(wf[r][j], xf[j], acc[r][t]);
        }
      }
    }
  }
};

template <int kRows, int kM>
__device__ __forceinline__ void warp_sum(float (&acc)[kRows][kM]);

// Streams all batches of S through a ring of kDepth batches in registers, whose first kDepth the
// caller has loaded (before waiting on anything, so they are in flight meanwhile): each batch is
// multiplied, its registers refilled with the batch kDepth later, and each finished item's sums
// are reduced across the warp and handed to finish(item, acc) (acc is then zeroed).
template <int kDepth, int kM, typename Stream, int kRows, typename Finish>
__device__ __forceinline__ void run_stream(const Stream& S, uint4 (&buf)[kDepth][kRows][kBatch], int lane,
                                           const float* x, int m, Finish finish) {
  float acc[kRows][kM] = {};
  for (int b0 = 0; b0 < S.num_batches; b0 += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int b = b0 + d;
      if (b >= S.num_batches) break;  // the same for the whole warp
      S.template multiply<kM>(b, lane, buf[d], x, m, acc);
      S.load(b + kDepth, lane, buf[d]);
      if ((b + 1) % S.batches_per_item == 0) {
        warp_sum<kRows, kM>(acc);
        finish(S.item(b), acc);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int t = 0; t < kM; ++t) acc[r][t] = 0.f;
        }
      }
    }
  }
}

template <int kRows, int kM>
__device__ __forceinline__ void warp_sum(float (&acc)[kRows][kM]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int t = 0; t < kM; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
    }
  }
}

template <typename T, int kM>
__global__ void __launch_bounds__(kThreads, 2) fused_mlp_kernel(const MlpParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_x = reinterpret_cast<float*>(smem);  // [m][H]: the normalised input; then [m][I]: a
  __shared__ float s_red[kWarps][kM];
  __shared__ float s_inv[kM];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + warp;

  // Gate/up rows i and I + i, items i = gw, gw + total_warps, ...
  const RowStream<T, 2> up(p.gate_up, p.h, p.inter, gw, total_warps, p.inter);
  uint4 ubuf[kUpDepth][2][kBatch];
#pragma unroll
  for (int d = 0; d < kUpDepth; ++d) up.load(d, lane, ubuf[d]);  // weights: before the wait
  pdl_wait();
  pdl_launch_dependents();

  // 1. r = residual (+ hidden), rounded; x = RMSNorm(r), staged in shared memory as T.
  const int vecs = static_cast<int>(p.h / 8);  // per row
  const T* gamma = static_cast<const T*>(p.norm_weight);
  {
    float ss[kM] = {};
    for (int idx = threadIdx.x; idx < p.m * vecs; idx += kThreads) {
      const int t = idx / vecs;
      const int64_t at = static_cast<int64_t>(t) * p.h + 8 * (idx - t * vecs);
      float r[8];
      unpack8<T>(load_coherent(static_cast<const T*>(p.residual) + at), r);
      if (p.hidden != nullptr) {
        float hv[8];
        unpack8<T>(load_coherent(static_cast<const T*>(p.hidden) + at), hv);
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = round_to<T>(r[j] + hv[j]);
      }
      float sq = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) sq += r[j] * r[j];
#pragma unroll
      for (int tt = 0; tt < kM; ++tt) {
        if (tt == t) ss[tt] += sq;
      }
      store8(s_x + at, r);
    }
#pragma unroll
    for (int t = 0; t < kM; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
      if (lane == 0) s_red[warp][t] = ss[t];
    }
    __syncthreads();
    if (threadIdx.x < p.m) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += s_red[w][threadIdx.x];
      s_inv[threadIdx.x] = rsqrtf(total / static_cast<float>(p.h) + p.eps);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < p.m * vecs; idx += kThreads) {
      const int t = idx / vecs;
      const int64_t k = 8 * static_cast<int64_t>(idx - t * vecs);
      float* at = s_x + static_cast<int64_t>(t) * p.h + k;
      float r[8], g[8];
      load8(at, r);
      unpack8<T>(load_weight(gamma + k, true), g);
      const float inv = s_inv[t];
      // RMSNorm's order: normalise in float32, round, scale by the weight, round.
#pragma unroll
      for (int j = 0; j < 8; ++j) r[j] = round_to<T>(__fmul_rn(g[j], round_to<T>(r[j] * inv)));
      store8(at, r);
    }
    __syncthreads();
  }

  // 2. a[:, i] = silu(g) * u, g and u rounded as the product's output, then SiluAndMul's rounding.
  T* act = static_cast<T*>(p.act);
  run_stream<kUpDepth, kM>(up, ubuf, lane, s_x, p.m, [&](int64_t i, const float (&acc)[2][kM]) {
#pragma unroll
    for (int t = 0; t < kM; ++t) {
      if (lane == t && t < p.m) {
        const float g = round_to<T>(acc[0][t]), u = round_to<T>(acc[1][t]);
        act[t * p.inter + i] = from_float<T>(__fmul_rn(round_to<T>(g / (1.f + expf(-g))), u));
      }
    }
  });

  // 3. Down rows j = gw, gw + total_warps, ...: their first loads go out before the barrier.
  const RowStream<T, 1> dn(p.down, p.inter, 0, gw, total_warps, p.h);
  uint4 dbuf[kDownDepth][1][kBatch];
#pragma unroll
  for (int d = 0; d < kDownDepth; ++d) dn.load(d, lane, dbuf[d]);
  __threadfence();  // this thread's writes of a, before the block's arrival
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&p.barrier[0], 1u);
    while (load_acquire(&p.barrier[0]) < gridDim.x) {
    }
    // The last block out resets both counters; nobody reads them again in this launch.
    if (atomicAdd(&p.barrier[1], 1u) == gridDim.x - 1) {
      atomicExch(&p.barrier[0], 0u);
      atomicExch(&p.barrier[1], 0u);
    }
  }
  __syncthreads();

  // 4. a into shared memory (over x, which nothing reads any more), then the down rows.
  float* s_a = s_x;
  const int avecs = static_cast<int>(p.inter / 8);
  for (int idx = threadIdx.x; idx < p.m * avecs; idx += kThreads) {
    const int64_t at = 8 * static_cast<int64_t>(idx);
    float a[8];
    unpack8<T>(load_coherent(act + at), a);
    store8(s_a + at, a);
  }
  __syncthreads();
  const T* hidden = static_cast<const T*>(p.hidden);
  T* residual = static_cast<T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  run_stream<kDownDepth, kM>(dn, dbuf, lane, s_a, p.m, [&](int64_t j, const float (&acc)[1][kM]) {
#pragma unroll
    for (int t = 0; t < kM; ++t) {
      if (lane == t && t < p.m) {
        // The thread that reads residual/hidden at (t, j) is the one that writes there: out may
        // be hidden (with hidden) or residual (without).
        const int64_t at = t * p.h + j;
        const float res = to_float<T>(residual[at]);
        if (hidden != nullptr) {
          const float r = round_to<T>(res + to_float<T>(hidden[at]));
          residual[at] = from_float<T>(r);
          out[at] = from_float<T>(acc[0][t]);
        } else {
          out[at] = from_float<T>(round_to<T>(acc[0][t]) + res);
        }
      }
    }
  });
}

struct Plan {
  int sms = 0;
  int64_t max_smem = 0;  // opt-in shared memory per block
};

constexpr int kBlocksPerSm = 2;  // as __launch_bounds__ promises

Plan plan_for(int device) {
  static std::mutex mutex;
  static std::map<int, Plan> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int sms = 0, smem = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "fused_mlp: SM count");
  check_cuda(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "fused_mlp: smem");
  const Plan plan{sms, static_cast<int64_t>(smem)};
  cache.emplace(device, plan);
  return plan;
}

// Static shared memory of the kernel (s_red, s_inv), kept out of the dynamic budget.
constexpr int64_t kStaticSmem = 4 * (kWarps + 1) * kFusedMlpMaxRows;

// x, then a, of every row as floats.
int64_t smem_bytes(int64_t rows, int64_t hidden, int64_t inter) { return rows * std::max(hidden, inter) * 4; }


template <typename T, int kM>
void launch(const MlpParams& p, int64_t smem, int device, cudaStream_t stream) {
  auto* kernel = fused_mlp_kernel<T, kM>;
  const Plan plan = plan_for(device);
  if (smem + kStaticSmem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "fused_mlp: shared memory opt-in");
  }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)),
             "fused_mlp: occupancy");
  check(per_sm >= 1, "fused_mlp: the kernel does not fit on an SM with " + std::to_string(smem) +
                         " bytes of shared memory");
  // Every block must be resident at once (the barrier): at most per_sm blocks on each SM.
  const int blocks = plan.sms * std::min(per_sm, kBlocksPerSm);
  MlpParams q = p;
  void* args[] = {&q};
  launch_kernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                static_cast<size_t>(smem), stream, args, device, "fused_mlp: kernel launch");
}

template <typename T>
void launch_for(const MlpParams& p, int64_t smem, int device, cudaStream_t stream) {
  static_assert(kFusedMlpMaxRows == 2, "one instantiation per row count");
  if (p.m == 1) return launch<T, 1>(p, smem, device, stream);
  return launch<T, 2>(p, smem, device, stream);
}

}  // namespace

bool fused_mlp_fits(int64_t rows, int64_t hidden, int64_t inter, int device) {
  if (rows < 1 || rows > kFusedMlpMaxRows) return false;
  return smem_bytes(rows, hidden, inter) + kStaticSmem <= plan_for(device).max_smem;
}

void fused_mlp(const FusedMlpArgs& a, uintptr_t stream_handle) {
  check_fused_mlp_args(a);
  const int64_t m = a.residual.size(0), h = a.residual.size(1), inter = a.down.size(1);
  if (m == 0) return;
  const int64_t elem = 2;
  check(a.workspace.dtype == DType::kUInt8 && a.workspace.ndim == 1 && a.workspace.device == a.residual.device &&
            a.workspace.size(0) >= fused_mlp_workspace_bytes(m, inter, elem) && aligned16(a.workspace.data),
        "fused_mlp (CUDA): workspace must be a 16-byte aligned uint8 [>= " +
            std::to_string(fused_mlp_workspace_bytes(m, inter, elem)) + "] tensor on the tensors' device");
  const void* ptrs[] = {a.residual.data, a.norm_weight.data, a.gate_up.data, a.down.data, a.out.data,
                        a.hidden.data == nullptr ? a.residual.data : a.hidden.data};
  for (const void* ptr : ptrs) {
    check(aligned16(ptr), "fused_mlp (CUDA): every tensor must start on a 16-byte boundary (16-byte vector loads)");
  }
  const int device = a.residual.device;
  int current = -1;
  check_cuda(cudaGetDevice(&current), "fused_mlp: cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "fused_mlp: cudaSetDevice");
  check(fused_mlp_fits(m, h, inter, device),
        "fused_mlp (CUDA): " + std::to_string(m) + " rows of H = " + std::to_string(h) + ", I = " +
            std::to_string(inter) + " do not fit the kernel's shared memory on this device");
  MlpParams p{};
  p.hidden = a.hidden.data;
  p.residual = a.residual.data;
  p.norm_weight = a.norm_weight.data;
  p.gate_up = a.gate_up.data;
  p.down = a.down.data;
  p.out = a.out.data;
  p.barrier = static_cast<unsigned*>(a.workspace.data);
  p.act = static_cast<unsigned char*>(a.workspace.data) + kFusedMlpWorkspaceHeader;
  p.h = h;
  p.inter = inter;
  p.eps = a.eps;
  p.m = static_cast<int>(m);
  const int64_t smem = smem_bytes(m, h, inter);
  cudaStream_t stream = as_stream(stream_handle);
  if (a.residual.dtype == DType::kBFloat16) {
    launch_for<__nv_bfloat16>(p, smem, device, stream);
  } else {
    launch_for<__half>(p, smem, device, stream);
  }
}

}  // namespace tinyserve::cuda
