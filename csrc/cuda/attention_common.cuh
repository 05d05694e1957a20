// Shared pieces of the paged-attention CUDA kernels: the kernel parameters, the mapping of a thread
// block to its (sequence, query rows, key range), and the split-KV partial-result layout.
//
// Work decomposition (both kernels): a "row" is one (query token, query head) pair of one KV head;
// the rows of a sequence are ordered token-major (row = token * group + head-in-group), so one
// thread block holding `rows_per_cta` consecutive rows serves all query heads that share a KV head
// and reads every key/value once for them (GQA). grid = (row tiles * num_kv_heads, num_splits),
// the KV head varying fastest: the blocks of one sequence's KV heads run side by side and read
// neighbouring bytes of the same cache blocks (DRAM locality). With
// num_splits > 1 the key range is cut into partitions whose partial softmax results land in a
// float32 workspace and are merged by merge_splits_kernel (flash-decoding).
#pragma once

#include <cstdint>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;  // every attention kernel runs 4 warps per thread block
constexpr int kKeyTile = 64;   // split shares are multiples of this

struct Params {
  const void* q;
  void* out;
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;  // nullptr: decode (one query token per sequence)
  float* ws_out;                   // [num_splits, num_tokens, num_heads, head_dim] partial outputs
  float* ws_ml;                    // [num_splits, num_tokens, num_heads, 2]: (max, sum) in log2 units
  int64_t q_stride_tok, q_stride_head, o_stride_tok, o_stride_head;
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  int64_t bt_stride;
  int num_seqs, num_tokens, num_heads, num_kv_heads, group, head_dim;
  int block_size_log2, max_blocks;
  int num_splits;             // key-range splits (gridDim.y); each takes an equal share of whole key tiles
  int tiles_per_seq;          // decode: row tiles per sequence
  float scale_log2;           // softmax scale * log2(e): scores live in log2 units
  bool metadata_ready;        // lengths and block tables are ready before the PDL wait (ops.h)
};

// The query rows and key range one thread block works on.
struct Work {
  int seq, q_start, q_len, seq_len;
  int row0, rows;      // rows [row0, row0 + rows) of the sequence's q_len * group rows
  int kv_begin, kv_end;  // keys of this split
  int mask_from;       // keys >= mask_from need the per-row causal mask
};

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Max / sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int work_kv_head(const Params& p) { return blockIdx.x % p.num_kv_heads; }
__device__ __forceinline__ int work_tile(const Params& p) { return blockIdx.x / p.num_kv_heads; }

// Finds the sequence and row tile of flattened tile index `tile` (prefill: a warp-wide scan over
// query_start_loc, run by every warp redundantly so no shared memory or barrier is needed).
// Returns false for the spare tiles of the launch's upper bound.
__device__ __forceinline__ bool find_tile(const Params& p, int tile, int rows_per_cta, int& seq, int& tile_in_seq) {
  if (p.query_start_loc == nullptr) {
    seq = tile / p.tiles_per_seq;
    tile_in_seq = tile % p.tiles_per_seq;
    return seq < p.num_seqs;
  }
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int s0 = 0; s0 < p.num_seqs; s0 += 32) {
    const int s = s0 + lane;
    int n = 0;
    if (s < p.num_seqs) {
      const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
      n = q_len > 0 ? ceil_div(q_len * p.group, rows_per_cta) : 0;
    }
    int incl = n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    if (tile < base + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, tile < base + incl);
      const int first = __ffs(hit) - 1;
      seq = s0 + first;
      const int excl = __shfl_sync(0xffffffffu, incl - n, first);
      const int n_seq = __shfl_sync(0xffffffffu, n, first);
      // Last row tiles (the most keys under the causal mask) get the lowest block indices.
      tile_in_seq = n_seq - 1 - (tile - base - excl);
      return true;
    }
    base += total;
  }
  return false;
}

__device__ __forceinline__ bool map_work(const Params& p, int rows_per_cta, Work& w) {
  int tile_in_seq;
  if (!find_tile(p, work_tile(p), rows_per_cta, w.seq, tile_in_seq)) return false;
  if (p.query_start_loc) {
    w.q_start = p.query_start_loc[w.seq];
    w.q_len = p.query_start_loc[w.seq + 1] - w.q_start;
  } else {
    w.q_start = w.seq;
    w.q_len = 1;
  }
  // NOTE: lengths past the block table's capacity are clamped, so a bad length cannot read outside it.
  w.seq_len = min(p.seq_lens[w.seq], p.max_blocks << p.block_size_log2);
  const int total_rows = w.q_len * p.group;
  w.row0 = tile_in_seq * rows_per_cta;
  if (w.row0 >= total_rows) return false;
  w.rows = min(rows_per_cta, total_rows - w.row0);
  // Query token t sits at position seq_len - q_len + t and sees keys [0, that + 1).
  const int first_tok = w.row0 / p.group, last_tok = (w.row0 + w.rows - 1) / p.group;
  const int kv_hi = max(0, min(w.seq_len, w.seq_len - w.q_len + last_tok + 1));
  // Splits take equal shares (whole key tiles) of the keys this tile sees, not of max_seq_len: a
  // short sequence in a launch sized for a long bound (a CUDA graph's) still spreads over every
  // split, instead of leaving one split the whole sequence and the others empty.
  const int part = p.num_splits == 1 ? kv_hi : ceil_div(ceil_div(kv_hi, p.num_splits), kKeyTile) * kKeyTile;
  w.kv_begin = min(kv_hi, static_cast<int>(blockIdx.y) * part);
  w.kv_end = min(kv_hi, w.kv_begin + part);
  w.mask_from = min(w.kv_end, w.seq_len - w.q_len + first_tok + 1);
  return true;
}

// The exclusive key limit of one row (keys >= limit are masked).
__device__ __forceinline__ int row_limit(const Params& p, const Work& w, int row) {
  return w.seq_len - w.q_len + row / p.group + 1;
}

// Where row r of the work tile reads its query and writes its output.
__device__ __forceinline__ int64_t row_token(const Params& p, const Work& w, int row) {
  return w.q_start + row / p.group;
}
__device__ __forceinline__ int row_head(const Params& p, int row) {
  return work_kv_head(p) * p.group + row % p.group;
}

// Writes one finished output element: straight to `out` without splits, else the normalised
// partial to the workspace (the (max, sum) pair is written by store_partial_ml).
template <typename T>
__device__ __forceinline__ void store_out(const Params& p, int64_t token, int head, int d, float value) {
  if (p.num_splits == 1) {
    T* o = static_cast<T*>(p.out) + token * p.o_stride_tok + head * p.o_stride_head;
    o[d] = from_float<T>(value);
  } else {
    const int64_t row = (static_cast<int64_t>(blockIdx.y) * p.num_tokens + token) * p.num_heads + head;
    p.ws_out[row * p.head_dim + d] = value;
  }
}

__device__ __forceinline__ void store_partial_ml(const Params& p, int64_t token, int head, float m, float l) {
  if (p.num_splits == 1) return;
  const int64_t row = (static_cast<int64_t>(blockIdx.y) * p.num_tokens + token) * p.num_heads + head;
  reinterpret_cast<float2*>(p.ws_ml)[row] = make_float2(m, l);
}

// A kernel as the dispatcher sees it (launched through cudaLaunchKernel with one Params argument).
struct KernelInfo {
  const void* func = nullptr;
  int rows_per_cta = 0;
  int smem_bytes = 0;
};

// Tensor-core kernel for float16/bfloat16 and head_dim 64 or 128; func == nullptr otherwise.
// decode_mode: <= 16 query rows per sequence and KV head; prefill_mtiles: 16-row tiles per warp
// (1: 64 query rows per block, 2: 128); decode_stages: K/V tiles buffered by the decode kernel (2 or
// 3: the tiles in flight per block against shared memory, hence blocks, per SM).
KernelInfo mma_kernel(DType dtype, int head_dim, bool decode_mode, int prefill_mtiles, int decode_stages);
// CUDA-core kernel for any dtype and head_dim <= 256.
KernelInfo simt_kernel(DType dtype, int head_dim);

}  // namespace tinyserve::cuda::attn
