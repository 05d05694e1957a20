// Fused MLP block for decode (ops.h): [o product,] residual add, RMSNorm, gate/up product,
// SiLU-and-mul, down product and output add in one kernel, for one or two token rows.
//
// Why: at one or two tokens a step, each of those is a short kernel whose fixed costs (launch,
// the first loads' latency, the tail) are several microseconds, against a few microseconds of
// weight streaming (Qwen3-0.6B: 19 MB of MLP weights a layer, about 6.5 us at copy bandwidth,
// against 15-18 us for the four kernels). One kernel streams the weights back to back.
//
// How (weight_stream.cuh: two blocks of 8 warps per SM, all resident at once):
//  0. With o_weight: every block stages the attention output in shared memory; the grid's warps
//     take rows j of o in turn and write h[:, j] = attn . o[j] (rounded) to the workspace. A grid
//     barrier follows; each warp has issued its first gate/up loads before arriving.
//  1. Every block forms the normalised input x of its rows itself (a few KB from L2) into shared
//     memory, as floats. Without o_weight its first weight loads are issued before that, before even
//     waiting on the previous kernel (weights are no kernel's output).
//  2. Gate/up: the warps take intermediate indices i in turn; a warp streams rows i and I + i of
//     gate_up (two batches in flight), reduces the dot products with x, applies SiLU-and-mul and
//     writes a[:, i] to the workspace.
//  3. A grid barrier. Each warp has issued the loads of its first down row before arriving.
//  4. Down: every block copies a into shared memory (as floats); the warps take output rows j in
//     turn, stream row j of down, reduce, and store out[:, j] (adding the residual stream, or
//     writing it).
// CUDA-core FMAs, which suit one or two rows: every weight element is used once per row, so beyond
// that the multiplies and shared-memory reads of x outgrow the weight stream (the skinny GEMM's
// tensor cores take those sizes).
//
// The residual stream is written only after the last barrier, once every block has read it; the
// barriers' words are left ready for the next launch. A launch depends only on shapes and the
// device, so it can be captured in a CUDA graph.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_utils.cuh"
#include "weight_stream.cuh"

namespace tinyserve::cuda {
namespace {

using namespace stream;

// Batches in flight per warp: gate/up (two rows a batch) and o and down (one row a batch; two
// blocks of 8 warps per SM, at most 128 registers a thread). Qwen3-0.6B's shapes give each warp one
// or two gate/up batches and at most one down row of three batches: all issued up front.
constexpr int kUpDepth = 2;
constexpr int kDownDepth = 3;

struct MlpParams {
  const void* attn;      // with o_weight: [m, Q], the attention output; else nullptr
  const void* o_weight;  // [H, Q] or nullptr
  const void* hidden;    // [m, H] added to the residual stream (or nullptr): the caller's, or o's output
  void* residual;
  const void* norm_weight;
  const void* gate_up;  // [2I, H]
  const void* down;     // [H, I]
  void* out;
  void* act;          // [m, I] workspace buffer
  void* o_out;        // [m, H] workspace buffer (with o_weight)
  unsigned* barrier;  // [4]: the o barrier's word at [0], the down barrier's at [2]
  int64_t h, inter, q;
  float eps;
  int m;
  bool separate;  // out != residual: residual = r and out = y; else residual = r + y
};

template <typename T, int kM>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) fused_mlp_kernel(const MlpParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_x = reinterpret_cast<float*>(smem);  // [m][Q]: attn; then [m][H]: the normalised input; then [m][I]: a
  __shared__ NormScratch<kM> scratch;
  const WarpSlot me = warp_slot();
  const int lane = me.lane;

  // Gate/up rows i and I + i, items i = me.index, me.index + me.count, ...
  const RowStream<T, 2> up(p.gate_up, p.h, p.inter, me.index, me.count, p.inter);
  uint4 ubuf[kUpDepth][2][kBatch];
  if (p.o_weight != nullptr) {
    // 0. h[:, j] = attn . o[j], rows j = me.index, me.index + me.count, ...; rounded as the product's output.
    const RowStream<T, 1> os(p.o_weight, p.q, 0, me.index, me.count, p.h);
    uint4 obuf[kDownDepth][1][kBatch];
    os.prime(lane, obuf);  // weights: before the wait
    pdl_wait();
    pdl_launch_dependents();
    stage_rows<T, kM>(s_x, static_cast<const T*>(p.attn), p.m, p.q);
    __syncthreads();
    T* o_out = static_cast<T*>(p.o_out);
    run_stream<kDownDepth, kM>(os, obuf, lane, s_x, p.m, [&](int64_t j, const float (&acc)[1][kM]) {
#pragma unroll
      for (int t = 0; t < kM; ++t) {
        if (lane == t && t < p.m) o_out[t * p.h + j] = from_float<T>(acc[0][t]);
      }
    });
    up.prime(lane, ubuf);
    grid_barrier(p.barrier);
  } else {
    up.prime(lane, ubuf);  // weights: before the wait
    pdl_wait();
    pdl_launch_dependents();
  }

  // 1. r = residual (+ hidden), rounded; x = RMSNorm(r), staged in shared memory as floats.
  const T* hidden = static_cast<const T*>(p.hidden);
  stage_normalised<T, kM>(s_x, static_cast<const T*>(p.residual), hidden, static_cast<const T*>(p.norm_weight), p.h,
                          p.eps, p.m, nullptr, scratch);

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

  // 3. Down rows j = me.index, me.index + me.count, ...: their first loads go out before the barrier.
  const RowStream<T, 1> dn(p.down, p.inter, 0, me.index, me.count, p.h);
  uint4 dbuf[kDownDepth][1][kBatch];
  dn.prime(lane, dbuf);
  grid_barrier(p.barrier + 2);

  // 4. a into shared memory (over x, which nothing reads any more), then the down rows.
  stage_rows<T, kM>(s_x, act, p.m, p.inter);
  __syncthreads();
  T* residual = static_cast<T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  run_stream<kDownDepth, kM>(dn, dbuf, lane, s_x, p.m, [&](int64_t j, const float (&acc)[1][kM]) {
#pragma unroll
    for (int t = 0; t < kM; ++t) {
      if (lane == t && t < p.m) {
        // The thread that reads residual/hidden at (t, j) is the one that writes there: out may
        // be hidden or residual. hidden may be o's output, which other blocks wrote: through L2.
        const int64_t at = t * p.h + j;
        float r = to_float<T>(residual[at]);
        if (hidden != nullptr) r = round_to<T>(r + to_float<T>(__ldcg(hidden + at)));
        if (p.separate) {
          residual[at] = from_float<T>(r);
          out[at] = from_float<T>(acc[0][t]);
        } else {
          out[at] = from_float<T>(round_to<T>(acc[0][t]) + r);
        }
      }
    }
  });
}

// Static shared memory of the kernels (NormScratch), kept out of the dynamic budget.
constexpr int64_t kStaticSmem = sizeof(NormScratch<kFusedMlpMaxRows>);

// Dynamic shared memory of a kernel that stages, one after the other, rows of these widths as
// floats (fused_mlp: attn, x, a; fused_norm_linear: x).
int64_t staged_bytes(int64_t rows, std::initializer_list<int64_t> widths) { return rows * std::max(widths) * 4; }

bool smem_fits(int64_t staged, int device) {
  return staged + kStaticSmem <= device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// The kernel instantiation for a dtype and row count: make(T{}, std::integral_constant<int, m>{})
// returns kernel<T, m>.
template <typename Make>
const void* instantiation(DType dtype, int m, Make make) {
  static_assert(kFusedMlpMaxRows == 2, "one instantiation per row count");
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (dtype == DType::kBFloat16) return m == 1 ? make(__nv_bfloat16{}, One{}) : make(__nv_bfloat16{}, Two{});
  return m == 1 ? make(__half{}, One{}) : make(__half{}, Two{});
}

// ---- RMSNorm and one product (ops.h fused_norm_linear) -------------------------------------------
//
// The same stream with one phase: every block forms the normalised input (block 0 also stores the
// residual stream's new value), and the warps take output rows j in turn. No barrier, no workspace.
// One row a batch, four batches in flight per warp.
constexpr int kLinearDepth = 4;

struct NormLinearParams {
  const void* x;
  const void* residual;  // nullptr: none
  void* residual_out;
  const void* norm_weight;
  const void* weight;  // [N, K]
  const void* bias;    // [N] or nullptr
  void* out;
  int64_t n, k;
  float eps;
  int m;
};

template <typename T, int kM>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) fused_norm_linear_kernel(const NormLinearParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_x = reinterpret_cast<float*>(smem);  // [m][K]: the normalised input
  __shared__ NormScratch<kM> scratch;
  const WarpSlot me = warp_slot();
  const int lane = me.lane;
  const RowStream<T, 1> ws(p.weight, p.k, 0, me.index, me.count, p.n);
  uint4 buf[kLinearDepth][1][kBatch];
  ws.prime(lane, buf);  // weights: before the wait
  pdl_wait();
  pdl_launch_dependents();
  stage_normalised<T, kM>(s_x, static_cast<const T*>(p.x), static_cast<const T*>(p.residual),
                          static_cast<const T*>(p.norm_weight), p.k, p.eps, p.m, static_cast<T*>(p.residual_out),
                          scratch);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  run_stream<kLinearDepth, kM>(ws, buf, lane, s_x, p.m, [&](int64_t j, const float (&acc)[1][kM]) {
#pragma unroll
    for (int t = 0; t < kM; ++t) {
      if (lane == t && t < p.m) {
        out[t * p.n + j] = from_float<T>(acc[0][t] + (bias != nullptr ? to_float<T>(bias[j]) : 0.f));
      }
    }
  });
}

}  // namespace

bool fused_mlp_fits(int64_t rows, int64_t hidden, int64_t inter, int64_t attn, int device) {
  if (rows < 1 || rows > kFusedMlpMaxRows) return false;
  return smem_fits(staged_bytes(rows, {hidden, inter, attn}), device);
}

bool fused_norm_linear_fits(int64_t rows, int64_t k, int device) {
  if (rows < 1 || rows > kFusedMlpMaxRows) return false;
  return smem_fits(staged_bytes(rows, {k}), device);
}

void fused_mlp(const FusedMlpArgs& a, uintptr_t stream_handle) {
  check_fused_mlp_args(a);
  const int64_t m = a.residual.size(0), h = a.residual.size(1), inter = a.down.size(1);
  if (m == 0) return;
  const bool has_o = a.o_weight.data != nullptr;
  const int64_t attn = has_o ? a.o_weight.size(1) : 0;
  const int64_t need = fused_mlp_workspace_bytes(m, h, inter, 2);
  check(a.workspace.dtype == DType::kUInt8 && a.workspace.ndim == 1 && a.workspace.device == a.residual.device &&
            a.workspace.size(0) >= need && aligned16(a.workspace.data),
        "fused_mlp (CUDA): workspace must be a 16-byte aligned uint8 [>= " + std::to_string(need) +
            "] tensor on the tensors' device");
  const void* ptrs[] = {a.residual.data, a.norm_weight.data, a.gate_up.data, a.down.data, a.out.data,
                        a.hidden.data == nullptr ? a.residual.data : a.hidden.data,
                        has_o ? a.o_weight.data : a.residual.data};
  for (const void* ptr : ptrs) {
    check(aligned16(ptr), "fused_mlp (CUDA): every tensor must start on a 16-byte boundary (16-byte vector loads)");
  }
  const int device = a.residual.device;
  use_device(device, "fused_mlp: cudaSetDevice");
  check(fused_mlp_fits(m, h, inter, attn, device),
        "fused_mlp (CUDA): " + std::to_string(m) + " rows of H = " + std::to_string(h) + ", I = " +
            std::to_string(inter) + (has_o ? ", Q = " + std::to_string(attn) : std::string()) +
            " do not fit the kernel's shared memory on this device");
  unsigned char* ws = static_cast<unsigned char*>(a.workspace.data);
  MlpParams p{};
  p.residual = a.residual.data;
  p.norm_weight = a.norm_weight.data;
  p.gate_up = a.gate_up.data;
  p.down = a.down.data;
  p.out = a.out.data;
  p.barrier = reinterpret_cast<unsigned*>(ws);
  p.act = ws + kFusedMlpWorkspaceHeader;
  p.o_out = ws + kFusedMlpWorkspaceHeader + m * inter * 2;
  if (has_o) {
    p.attn = a.hidden.data;
    p.o_weight = a.o_weight.data;
    p.hidden = p.o_out;
  } else {
    p.hidden = a.hidden.data;
  }
  p.h = h;
  p.inter = inter;
  p.q = attn;
  p.eps = a.eps;
  p.m = static_cast<int>(m);
  p.separate = a.out.data != a.residual.data;
  const void* kernel = instantiation(a.residual.dtype, p.m, [](auto t, auto rows) {
    return reinterpret_cast<const void*>(fused_mlp_kernel<decltype(t), decltype(rows)::value>);
  });
  stream::launch(kernel, p, staged_bytes(m, {h, inter, attn}), kStaticSmem, device, as_stream(stream_handle),
                 "fused_mlp: kernel launch");
}

void fused_norm_linear(const FusedNormLinearArgs& a, uintptr_t stream_handle) {
  check_fused_norm_linear_args(a);
  const int64_t m = a.x.size(0), k = a.x.size(1);
  if (m == 0 || a.weight.size(0) == 0) return;
  const bool has_res = a.residual.data != nullptr;
  const void* ptrs[] = {a.x.data, a.norm_weight.data, a.weight.data, has_res ? a.residual.data : a.x.data,
                        has_res ? a.residual_out.data : a.x.data};
  for (const void* ptr : ptrs) {
    check(aligned16(ptr),
          "fused_norm_linear (CUDA): x, residual, residual_out, norm_weight and weight must start on a 16-byte "
          "boundary (16-byte vector loads)");
  }
  const int device = a.x.device;
  use_device(device, "fused_norm_linear: cudaSetDevice");
  check(fused_norm_linear_fits(m, k, device), "fused_norm_linear (CUDA): " + std::to_string(m) + " rows of K = " +
                                                  std::to_string(k) +
                                                  " do not fit the kernel's shared memory on this device");
  NormLinearParams p{};
  p.x = a.x.data;
  p.residual = a.residual.data;
  p.residual_out = a.residual_out.data;
  p.norm_weight = a.norm_weight.data;
  p.weight = a.weight.data;
  p.bias = a.bias.data;
  p.out = a.out.data;
  p.n = a.weight.size(0);
  p.k = k;
  p.eps = a.eps;
  p.m = static_cast<int>(m);
  const void* kernel = instantiation(a.x.dtype, p.m, [](auto t, auto rows) {
    return reinterpret_cast<const void*>(fused_norm_linear_kernel<decltype(t), decltype(rows)::value>);
  });
  stream::launch(kernel, p, staged_bytes(m, {k}), kStaticSmem, device, as_stream(stream_handle),
                 "fused_norm_linear: kernel launch");
}

}  // namespace tinyserve::cuda
