// Weight streaming on CUDA cores for one or two token rows: the parts the fused decode kernels
// (fused_mlp.cu, fused_norm_linear.cu) share.
//
// At one or two tokens a step, a product reads every weight element once and does one or two
// multiply-adds with it, so it is a stream of the weight at the card's bandwidth, plus fixed costs
// (launch, the first loads' latency, the tail) that a short kernel pays each time. These kernels
// keep the whole card streaming: two blocks of 8 warps per SM, all resident at once, each warp
// taking weight rows in turn with several 16-byte loads per lane in flight, and the first loads
// issued before waiting on the previous kernel (programmatic dependent launch; weights are no
// kernel's output). Phases that need all of an earlier phase's outputs meet at a grid-wide barrier
// (every block is resident, so it cannot deadlock); each warp issues the loads of its next phase
// before arriving, so the stream does not stop there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../op_checks.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda::stream {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlocksPerSm = 2;  // every kernel built on this is __launch_bounds__(kThreads, kBlocksPerSm)
constexpr int kChunk = 256;      // k elements a warp's 16-byte loads cover (32 lanes x 8)
constexpr int kBatch = 4;        // chunks per row per batch: a batch is 1024 k of each row

// This warp's place in the grid: its index among all the grid's warps (the first item it takes in
// a RowStream) and their count (its stride).
struct WarpSlot {
  int warp, lane;
  int64_t index, count;
};

__device__ __forceinline__ WarpSlot warp_slot() {
  const int warp = threadIdx.x / 32;
  return WarpSlot{warp, static_cast<int>(threadIdx.x % 32), static_cast<int64_t>(blockIdx.x) * kWarps + warp,
                  static_cast<int64_t>(gridDim.x) * kWarps};
}

// Shared memory of stage_normalised: the warps' partial sums of squares and each row's 1 / rms.
template <int kM>
struct NormScratch {
  float red[kWarps][kM];
  float inv[kM];
};

// Data an earlier kernel (or another block of this one, after a barrier) wrote: through L2, not the
// read-only path.
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

// Every block of the grid waits here until all have arrived; the global writes each thread made
// before it are visible to every block after it. One word per barrier of a launch, whose low 31 bits
// are zero before (a zeroed workspace) and stay so: block 0 adds 2^31 - (gridDim.x - 1) and every
// other block 1, so the word's top bit flips exactly when the last block arrives, and each block
// waits for the flip of the value its own add returned. The word thus needs no reset, and a barrier
// costs one atomic round trip and the wait for the flip (the cooperative-groups grid sync's scheme).
// benchmarks/grid_barrier.cu measures it against a kernel boundary.
__device__ __forceinline__ void grid_barrier(unsigned* word) {
  __threadfence();  // this thread's writes, before the block's arrival
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    const unsigned before = atomicAdd(word, add);
    while (((before ^ load_acquire(word)) & 0x80000000u) == 0) {
    }
  }
  __syncthreads();
}

// A stream of weight rows for one warp: items it = first, first + stride, ... < count; item it is
// rows it + r * row_gap (r < kRows) of W [*, len]. A batch is kBatch chunks of 256 k of each row.
// A Cursor walks the batches in order (k along the item's rows, then the next item) by adds alone:
// the index arithmetic runs once per batch in every lane, beside a few loads and FMAs, so divisions
// there cost stream bandwidth.
template <typename T, int kRows>
struct RowStream {
  const T* w;
  int64_t len, gap;  // gap: elements between the rows of an item (row_gap * len)
  int64_t first, stride, count;

  struct Cursor {
    int64_t item, k;  // the batch's item and its first k
    const T* row;     // w + item * len
  };

  __device__ RowStream(const void* weight, int64_t len_, int64_t row_gap, int64_t first_, int64_t stride_,
                       int64_t count_)
      : w(static_cast<const T*>(weight)), len(len_), gap(row_gap * len_), first(first_), stride(stride_),
        count(count_) {}

  __device__ Cursor start() const { return Cursor{first, 0, w + first * len}; }
  __device__ bool valid(const Cursor& c) const { return c.item < count; }
  // Whether c is its item's last batch.
  __device__ bool last(const Cursor& c) const { return c.k + kChunk * kBatch >= len; }
  __device__ void advance(Cursor& c) const {
    c.k += kChunk * kBatch;
    if (c.k >= len) {
      c.k = 0;
      c.item += stride;
      c.row += stride * len;
    }
  }

  // Loads of the batch at c (nothing past the last item) into v.
  __device__ void load(const Cursor& c, int lane, uint4 (&v)[kRows][kBatch]) const {
    const bool ok = valid(c);
#pragma unroll
    for (int ch = 0; ch < kBatch; ++ch) {
      const int64_t k = c.k + ch * kChunk + 8 * lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) v[r][ch] = load16<true>(c.row + r * gap + k, ok && k < len);
    }
  }

  // The loads of the first kDepth batches, for run_stream's ring (issued early: in flight meanwhile).
  template <int kDepth>
  __device__ void prime(int lane, uint4 (&buf)[kDepth][kRows][kBatch]) const {
    Cursor c = start();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      load(c, lane, buf[d]);
      advance(c);
    }
  }

  // acc[r][t] += row r of the batch at k0 . x[t] (x: [m][len] floats in shared memory).
  template <int kM>
  __device__ void multiply(int64_t k0, int lane, const uint4 (&v)[kRows][kBatch], const float* x, int m,
                           float (&acc)[kRows][kM]) const {
#pragma unroll
    for (int ch = 0; ch < kBatch; ++ch) {
      const int64_t k = k0 + ch * kChunk + 8 * lane;
      if (k >= len) break;
      float wf[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack8<T>(v[r][ch], wf[r]);
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

// Streams all batches of S through a ring of kDepth batches in registers, whose first kDepth the
// caller has loaded (early, so they are in flight meanwhile): each batch is multiplied, its
// registers refilled with the batch kDepth later, and each finished item's sums are reduced across
// the warp and handed to finish(item, acc) (acc is then zeroed).
template <int kDepth, int kM, typename Stream, int kRows, typename Finish>
__device__ __forceinline__ void run_stream(const Stream& S, uint4 (&buf)[kDepth][kRows][kBatch], int lane,
                                           const float* x, int m, Finish finish) {
  float acc[kRows][kM] = {};
  auto use = S.start(), next = S.start();
#pragma unroll
  for (int d = 0; d < kDepth; ++d) S.advance(next);
  while (S.valid(use)) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (!S.valid(use)) break;  // the same for the whole warp
      S.template multiply<kM>(use.k, lane, buf[d], x, m, acc);
      S.load(next, lane, buf[d]);
      S.advance(next);
      if (S.last(use)) {
        warp_sum<kRows, kM>(acc);
        finish(use.item, acc);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int t = 0; t < kM; ++t) acc[r][t] = 0.f;
        }
      }
      S.advance(use);
    }
  }
}

// Staging loops load a group of 16-byte vectors per thread before using any: the loads of one
// thread are then in flight together, where a loop that stores each vector before the next load
// waits out one L2 round trip per vector (a down product's 14,336-wide row is seven of them). The
// group is what the registers allow beside the primed weight loads, which are live meanwhile: at
// one row 4 vectors (2 in the norm, which loads two a vector); at two rows the sums take the room.
template <int kM>
constexpr int kStageGroup = kM == 1 ? 4 : 1;
template <int kM>
constexpr int kNormGroup = kM == 1 ? 2 : 1;

// For the block's vectors idx < total (idx = threadIdx.x, + kThreads, ...): load(idx, v), then
// use(idx, v), kGroup vectors a thread at a time, all of a group's loads before any use.
template <int kGroup, typename V, typename Load, typename Use>
__device__ __forceinline__ void grouped(int total, Load load, Use use) {
  for (int first = threadIdx.x; first < total; first += kGroup * kThreads) {
    V v[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int idx = first + u * kThreads;
      if (idx < total) load(idx, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int idx = first + u * kThreads;
      if (idx >= total) break;
      use(idx, v[u]);
    }
  }
}

// Rows [m][len] of T an earlier kernel wrote, into shared memory as floats (m <= kM).
template <typename T, int kM>
__device__ __forceinline__ void stage_rows(float* s, const T* src, int m, int64_t len) {
  grouped<kStageGroup<kM>, uint4>(
      m * static_cast<int>(len / 8), [&](int idx, uint4& v) { v = load_coherent(src + 8 * static_cast<int64_t>(idx)); },
      [&](int idx, const uint4& v) {
        float f[8];
        unpack8<T>(v, f);
        store8(s + 8 * static_cast<int64_t>(idx), f);
      });
}

// The normalised input of a pre-norm block, formed by every block itself (a few KB from L2) into
// shared memory s_x [m][h] as floats: r = base (+ add), rounded; x = RMSNorm(r) with gamma and
// eps, in RMSNorm's order (normalise in float32, round, scale by the weight, round). With r_out,
// block 0 also stores r there. Ends with __syncthreads.
template <typename T, int kM>
__device__ __forceinline__ void stage_normalised(float* s_x, const T* base, const T* add, const T* gamma, int64_t h,
                                                 float eps, int m, T* r_out, NormScratch<kM>& scratch) {
  float(&s_red)[kWarps][kM] = scratch.red;
  float(&s_inv)[kM] = scratch.inv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int vecs = static_cast<int>(h / 8);  // per row
  const int total = m * vecs;
  const bool store_r = r_out != nullptr && blockIdx.x == 0;
  float ss[kM] = {};
  struct Pair {
    uint4 base, add;
  };
  grouped<kNormGroup<kM>, Pair>(
      total,
      [&](int idx, Pair& v) {
        v.base = load_coherent(base + 8 * static_cast<int64_t>(idx));
        if (add != nullptr) v.add = load_coherent(add + 8 * static_cast<int64_t>(idx));
      },
      [&](int idx, const Pair& v) {
        const int t = idx / vecs;
        const int64_t at = 8 * static_cast<int64_t>(idx);  // = t * h + 8 * (idx - t * vecs)
        float r[8];
        unpack8<T>(v.base, r);
        if (add != nullptr) {
          float a[8];
          unpack8<T>(v.add, a);
#pragma unroll
          for (int j = 0; j < 8; ++j) r[j] = round_to<T>(r[j] + a[j]);
          if (store_r) *reinterpret_cast<uint4*>(r_out + at) = pack8<T>(r);
        }
        float sq = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) sq += r[j] * r[j];
#pragma unroll
        for (int tt = 0; tt < kM; ++tt) {
          if (tt == t) ss[tt] += sq;
        }
        store8(s_x + at, r);
      });
#pragma unroll
  for (int t = 0; t < kM; ++t) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
    if (lane == 0) s_red[warp][t] = ss[t];
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float total_ss = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total_ss += s_red[w][threadIdx.x];
    s_inv[threadIdx.x] = rsqrtf(total_ss / static_cast<float>(h) + eps);
  }
  __syncthreads();
  grouped<kNormGroup<kM>, uint4>(
      total, [&](int idx, uint4& v) { v = load16<false>(gamma + 8 * static_cast<int64_t>(idx % vecs), true); },
      [&](int idx, const uint4& vg) {
        float* at = s_x + 8 * static_cast<int64_t>(idx);
        float r[8], g[8];
        load8(at, r);
        unpack8<T>(vg, g);
        const float inv = s_inv[idx / vecs];
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = round_to<T>(__fmul_rn(g[j], round_to<T>(r[j] * inv)));
        store8(at, r);
      });
  __syncthreads();
}

// ---- host side ----------------------------------------------------------------------------------

// Launches a kernel built on this header with its parameter struct: kBlocksPerSm blocks of kThreads
// per SM (fewer where the shared memory allows fewer), all resident at once as the grid barrier
// needs.
template <typename Params>
void launch(const void* kernel, const Params& params, int64_t smem, int64_t static_smem, int device,
            cudaStream_t stream, const char* what) {
  if (smem + static_smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               what);
  }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)),
             what);
  check(per_sm >= 1, std::string(what) + ": the kernel does not fit on an SM with " + std::to_string(smem) +
                         " bytes of shared memory");
  const int blocks = device_attribute(device, cudaDevAttrMultiProcessorCount) * std::min(per_sm, kBlocksPerSm);
  Params p = params;
  void* args[] = {&p};
  launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), static_cast<size_t>(smem), stream, args,
                device, what);
}

}  // namespace tinyserve::cuda::stream
