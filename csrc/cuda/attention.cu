// Paged attention on CUDA: argument checks, the launch plan (which kernel, how many split-KV
// partitions) and the merge of split partials. The kernels live in attention_mma.cu (tensor cores,
// float16/bfloat16, head_dim 64/128) and attention_simt.cu (everything else).
//
// NOTE: nothing here synchronises or reads device memory on the host, so the ops can be captured
// in a CUDA graph: the launch is sized from shapes, the host-side bounds max_seq_len /
// max_query_len and the kernels' occupancy (cached per device).
#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "attention_common.cuh"

namespace tinyserve::cuda {
namespace {

using attn::KernelInfo;
using attn::Params;
using attn::warp_max;
using attn::warp_sum;

constexpr int kMaxSplits = 64;
constexpr int kMinPartition = 128;  // keys per split, at least (fewer make the merge cost show)
constexpr int kMaxHeadDim = 256;
// Decode kernel: K/V tiles in flight per block. Two stages fit three blocks per SM, three stages
// two. With few blocks (a launch of at most two waves of the two-stage kernel) the third stage wins:
// each block streams faster and the last wave's few blocks leave less bandwidth unused (H200,
// 2026-11-28, Qwen3-0.6B heads: 64 x 512-768 keys 59.5 -> 53.4 us, 64 x 2048 146 -> 139 us); with
// many waves three blocks per SM win (128 x 512-768: 95 vs 98 us; 256 x 100-1024: 158 vs 167 us).
constexpr int kDecodeStagesFew = 3;
constexpr int kDecodeStagesMany = 2;
constexpr int kFewWaves = 2;
// A launch of this many waves of blocks without splits is not split: splits would only trim its
// last wave, whose blocks' ends the lengths of a real batch already spread, and each split block
// pays its start and its partials' write and merge. (H200, Qwen3-0.6B heads, harness batches of
// 153-256 sequences under the 2,048-key bound: 0.6-2.7 % faster than the cost model's 2 splits.)
constexpr int kManyWaves = 3;

// ---- merge of split-KV partials -----------------------------------------------------------------

// One warp per (token, head) row: out = sum_s w_s o_s / sum_s w_s l_s, w_s = 2^(m_s - max m) l_s.
template <typename T>
__global__ void __launch_bounds__(attn::kThreads) merge_splits_kernel(const Params p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (attn::kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= static_cast<int64_t>(p.num_tokens) * p.num_heads) return;
  const int64_t token = row / p.num_heads;
  const int head = static_cast<int>(row % p.num_heads);
  if (p.query_start_loc && token >= p.query_start_loc[p.num_seqs]) return;  // padding rows: untouched
  const int64_t split_stride = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  constexpr int kPerLane = kMaxHeadDim / 32;
  constexpr int kUnroll = 4;  // splits whose loads are in flight together
  float v[kUnroll][kPerLane];
  auto load_partials = [&](int s0) {  // splits s0 .. s0 + kUnroll - 1 (s0 uniform across the warp)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = s0 + u;
      const float* o = p.ws_out + (s * split_stride + row) * p.head_dim;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        v[u][c] = s < p.num_splits && d < p.head_dim ? o[d] : 0.f;
      }
    }
  };
  const float2* ml = reinterpret_cast<const float2*>(p.ws_ml);
  const float2 ml0 = lane < p.num_splits ? ml[lane * split_stride + row] : make_float2(-INFINITY, 0.f);
  const float2 ml1 = lane + 32 < p.num_splits ? ml[(lane + 32) * split_stride + row] : make_float2(-INFINITY, 0.f);
  // The first splits' partials go out with the (max, sum) loads, not after their reduction: one
  // round trip to L2 rather than two.
  load_partials(0);
  const float m = warp_max(fmaxf(ml0.x, ml1.x));
  const float mu = m == -INFINITY ? 0.f : m;
  const float w0 = ml0.y > 0.f ? exp2f(ml0.x - mu) * ml0.y : 0.f;
  const float w1 = ml1.y > 0.f ? exp2f(ml1.x - mu) * ml1.y : 0.f;
  const float l = warp_sum(w0 + w1);
  float acc[kPerLane] = {};
  for (int s0 = 0; s0 < p.num_splits; s0 += kUnroll) {
    if (s0 > 0) load_partials(s0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = s0 + u;  // uniform across the warp
      const float ws = s < p.num_splits ? __shfl_sync(0xffffffffu, s < 32 ? w0 : w1, s & 31) : 0.f;
      // An empty split (weight 0) wrote no meaningful partial output: its values are dropped.
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[c] += ws * (ws != 0.f ? v[u][c] : 0.f);
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + token * p.o_stride_tok + static_cast<int64_t>(head) * p.o_stride_head;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < p.head_dim) out[d] = from_float<T>(acc[c] * inv);
  }
}

// ---- launch plan --------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0;
  int cc_major = 0;
  int max_smem_optin = 0;  // shared memory one block may opt in to
};

std::mutex g_cache_mutex;

DeviceInfo device_info(int device) {
  return DeviceInfo{device_attribute(device, cudaDevAttrMultiProcessorCount),
                    device_attribute(device, cudaDevAttrComputeCapabilityMajor),
                    device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin)};
}

// Raises the kernel's dynamic shared-memory limit when needed (only ever upwards: one function
// serves several head_dims) and returns how many of its thread blocks the device holds at once.
int resident_blocks(const KernelInfo& k, int device, int sms) {
  struct Key {
    const void* func;
    int device, smem;
    bool operator==(const Key& o) const { return func == o.func && device == o.device && smem == o.smem; }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.func) ^ (std::hash<int>()(k.device * 1000003 + k.smem) << 1);
    }
  };
  static std::unordered_map<Key, int, Hash> slots_cache;
  static std::unordered_map<Key, int, Hash> smem_limit;  // keyed by (func, device, 0)
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  const Key key{k.func, device, k.smem_bytes};
  auto it = slots_cache.find(key);
  if (it != slots_cache.end()) return it->second;
  int& limit = smem_limit[Key{k.func, device, 0}];
  if (k.smem_bytes > 48 * 1024 && k.smem_bytes > limit) {
    check_cuda(cudaFuncSetAttribute(k.func, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem_bytes),
               "paged_attention: shared-memory limit (head_dim too large for this GPU?)");
    limit = k.smem_bytes;
  }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.func, attn::kThreads, k.smem_bytes),
             "paged_attention: occupancy");
  const int slots = std::max(1, per_sm) * sms;
  slots_cache.emplace(key, slots);
  return slots;
}

// Number of key partitions. Modelled cost, in units of one key streamed by one block:
//   ceil(blocks / slots) * (keys per block + kBlockOverheadKeys) + s * kSplitOverheadKeys
// (rounds of resident blocks times each block's length, plus the partials' write and merge).
// The constants were fitted to a sweep of forced split counts on an H200 (benchmarks/RESULTS.md):
// they pick the measured best or within 5% of it for 1-256 sequences of 1k-8k keys. The model assumes
// every block is max_len long, so its wave rounding is only real for uniform lengths; launches of
// kManyWaves or more are not split at all.
constexpr double kBlockOverheadKeys = 128.0;
constexpr double kSplitOverheadKeys = 32.0;

int choose_splits(int64_t base_blocks, int64_t max_len, int64_t capacity, int64_t slots) {
  const int64_t max_splits = std::min<int64_t>({capacity, kMaxSplits, max_len / kMinPartition});
  if (max_splits < 2 || base_blocks <= 0 || base_blocks >= kManyWaves * slots) return 1;
  auto cost = [&](int64_t s) {
    const double waves = static_cast<double>((base_blocks * s + slots - 1) / slots);
    return waves * (static_cast<double>(max_len) / s + kBlockOverheadKeys) + kSplitOverheadKeys * s;
  };
  int64_t best = 1;
  double best_cost = cost(1);
  for (int64_t s = 2; s <= max_splits; ++s) {
    const double c = cost(s);
    if (c < best_cost) {
      best = s;
      best_cost = c;
    }
  }
  return static_cast<int>(best);
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The cache's block and slot strides as 32-bit byte offsets (the tensor-core kernel's copy loop
// forms row addresses with one wide multiply-add of the block id).
bool strides_fit_u32(const TensorView& c) {
  const int64_t elem = dtype_size(c.dtype), limit = int64_t{1} << 32;
  return c.stride(0) * elem < limit && c.stride(1) * elem * (c.size(1) - 1) < limit;
}

// The tensor-core kernel reads 16-byte rows of q/k/v and writes 4-byte pairs of out.
bool mma_layout_ok(const PagedAttentionArgs& a) {
  const TensorView &q = a.query, &kc = a.key_cache, &vc = a.value_cache, &o = a.out;
  const bool q_ok = aligned(q.data, 16) && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0;
  const bool k_ok = aligned(kc.data, 16) && kc.stride(0) % 8 == 0 && kc.stride(1) % 8 == 0 && kc.stride(2) % 8 == 0 &&
                    strides_fit_u32(kc);
  const bool v_ok = aligned(vc.data, 16) && vc.stride(0) % 8 == 0 && vc.stride(1) % 8 == 0 && vc.stride(2) % 8 == 0 &&
                    strides_fit_u32(vc);
  const bool o_ok = aligned(o.data, 4) && o.stride(0) % 2 == 0 && o.stride(1) % 2 == 0;
  return q_ok && k_ok && v_ok && o_ok;
}

void check_args(const PagedAttentionArgs& a) {
  const TensorView &q = a.query, &kc = a.key_cache, &vc = a.value_cache, &bt = a.block_tables, &o = a.out;
  check(q.ndim == 3 && kc.ndim == 4 && vc.ndim == 4 && bt.ndim == 2 && a.seq_lens.ndim == 1 && o.ndim == 3,
        "paged_attention: expected query/out 3-D, caches 4-D, block_tables 2-D, seq_lens 1-D");
  check(q.dtype == kc.dtype && q.dtype == vc.dtype && q.dtype == o.dtype,
        "paged_attention: query, caches and out must share one dtype");
  check(bt.dtype == DType::kInt32 && a.seq_lens.dtype == DType::kInt32,
        "paged_attention: block_tables and lens must be int32");
  for (int i = 0; i < 4; ++i) check(kc.size(i) == vc.size(i), "paged_attention: key/value cache shapes differ");
  const int64_t head_dim = q.size(2), block_size = kc.size(1);
  check(kc.size(3) == head_dim && head_dim >= 1 && head_dim <= kMaxHeadDim,
        "paged_attention (CUDA): head_dim must match the caches and be in [1, 256]");
  check(kc.size(2) >= 1 && q.size(1) % kc.size(2) == 0, "paged_attention: num_heads % num_kv_heads != 0");
  check(block_size >= 1 && (block_size & (block_size - 1)) == 0, "paged_attention (CUDA): block_size must be a power of two");
  check(bt.size(0) == a.seq_lens.size(0), "paged_attention: block_tables rows != num_seqs");
  check(o.size(0) == q.size(0) && o.size(1) == q.size(1) && o.size(2) == head_dim,
        "paged_attention: out shape differs from query");
  check(q.stride(2) == 1 && o.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1 &&
            (bt.stride(1) == 1 || bt.size(1) <= 1) && (a.seq_lens.stride(0) == 1 || a.seq_lens.size(0) <= 1),
        "paged_attention: last dimensions must be contiguous");
  if (a.query_start_loc.data) {
    check(a.query_start_loc.ndim == 1 && a.query_start_loc.dtype == DType::kInt32 &&
              a.query_start_loc.size(0) == a.seq_lens.size(0) + 1 &&
              (a.query_start_loc.stride(0) == 1 || a.query_start_loc.size(0) <= 1),
          "paged_attention: query_start_loc must be int32 [num_seqs + 1]");
  } else {
    check(q.size(0) == a.seq_lens.size(0), "paged_attention (decode): query rows != num_seqs");
  }
  for (const TensorView* t : {&q, &kc, &vc, &bt, &a.seq_lens, &o}) {
    check(t->device == o.device, "paged_attention: all tensors must be on one CUDA device");
  }
  check(q.size(0) <= INT32_MAX && kc.size(0) * block_size <= INT32_MAX && q.size(1) <= INT32_MAX,
        "paged_attention (CUDA): sizes past 2^31 are not supported");
}

Params make_params(const PagedAttentionArgs& a) {
  Params p{};
  p.q = a.query.data;
  p.out = a.out.data;
  p.k_cache = a.key_cache.data;
  p.v_cache = a.value_cache.data;
  p.block_tables = a.block_tables.ptr<const int32_t>();
  p.seq_lens = a.seq_lens.ptr<const int32_t>();
  p.query_start_loc = a.query_start_loc.data ? a.query_start_loc.ptr<const int32_t>() : nullptr;
  p.q_stride_tok = a.query.stride(0);
  p.q_stride_head = a.query.stride(1);
  p.o_stride_tok = a.out.stride(0);
  p.o_stride_head = a.out.stride(1);
  p.k_stride_block = a.key_cache.stride(0);
  p.k_stride_slot = a.key_cache.stride(1);
  p.k_stride_head = a.key_cache.stride(2);
  p.v_stride_block = a.value_cache.stride(0);
  p.v_stride_slot = a.value_cache.stride(1);
  p.v_stride_head = a.value_cache.stride(2);
  p.bt_stride = a.block_tables.stride(0);
  p.num_seqs = static_cast<int>(a.seq_lens.size(0));
  p.num_tokens = static_cast<int>(a.query.size(0));
  p.num_heads = static_cast<int>(a.query.size(1));
  p.num_kv_heads = static_cast<int>(a.key_cache.size(2));
  p.group = p.num_heads / p.num_kv_heads;
  p.head_dim = static_cast<int>(a.query.size(2));
  int log2 = 0;
  while ((int64_t{1} << log2) < a.key_cache.size(1)) ++log2;
  p.block_size_log2 = log2;
  p.max_blocks = static_cast<int>(a.block_tables.size(1));
  p.scale_log2 = a.scale * attn::kLog2e;
  p.metadata_ready = a.metadata_ready;
  return p;
}

template <typename T>
void launch_merge(Params p, int device, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  const unsigned blocks = static_cast<unsigned>((rows + attn::kThreads / 32 - 1) / (attn::kThreads / 32));
  void* args[] = {&p};
  launch_kernel(reinterpret_cast<const void*>(&merge_splits_kernel<T>), dim3(blocks), dim3(attn::kThreads), 0, stream,
                args, device, "paged_attention: merge_splits_kernel launch");
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, uintptr_t stream_handle) {
  check_args(a);
  const DType dtype = a.query.dtype;
  check(dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16,
        std::string("paged_attention (CUDA): unsupported dtype ") + dtype_name(dtype) +
            "; supported: float32, float16, bfloat16");
  Params p = make_params(a);
  if (p.num_seqs == 0 || p.num_tokens == 0) return;
  const int device = a.out.device;
  use_device(device, "paged_attention: cudaSetDevice");
  const DeviceInfo dev = device_info(device);
  cudaStream_t stream = as_stream(stream_handle);

  // Kernel: decode layout while every sequence has at most 16 query rows per KV head.
  const bool decode_op = p.query_start_loc == nullptr;
  const int64_t max_q = decode_op ? 1 : std::clamp<int64_t>(a.max_query_len > 0 ? a.max_query_len : p.num_tokens, 1,
                                                            p.num_tokens);
  const bool decode_mode = max_q * p.group <= 16;
  KernelInfo k;
  if (dev.cc_major >= 8 && mma_layout_ok(a)) {
    // Two m-tiles per warp (128 rows per block) halve the shared-memory reads per multiply; short
    // chunks keep 64-row blocks rather than compute empty rows.
    k = attn::mma_kernel(dtype, p.head_dim, decode_mode, max_q * p.group <= 64 ? 1 : 2, kDecodeStagesMany);
  }
  const bool mma = k.func != nullptr;
  if (!mma) k = attn::simt_kernel(dtype, p.head_dim);
  int slots = resident_blocks(k, device, dev.sms);

  // Row tiles: exact for decode; for prefill an upper bound from shapes and max_query_len (spare
  // blocks exit at once).
  const int64_t rows = k.rows_per_cta;
  int64_t tiles;
  if (decode_op) {
    p.tiles_per_seq = static_cast<int>((p.group + rows - 1) / rows);
    tiles = static_cast<int64_t>(p.num_seqs) * p.tiles_per_seq;
  } else {
    tiles = std::min((static_cast<int64_t>(p.num_tokens) * p.group + rows - 1) / rows + p.num_seqs,
                     p.num_seqs * ((max_q * p.group + rows - 1) / rows));
  }
  if (mma && decode_mode && tiles * p.num_kv_heads <= kFewWaves * static_cast<int64_t>(slots)) {
    const KernelInfo few = attn::mma_kernel(dtype, p.head_dim, decode_mode, 1, kDecodeStagesFew);
    if (few.smem_bytes <= dev.max_smem_optin) {  // e.g. not on sm_86/89 (99 KB) at head_dim 128
      k = few;
      slots = resident_blocks(k, device, dev.sms);
    }
  }
  const int64_t capacity_len = static_cast<int64_t>(p.max_blocks) << p.block_size_log2;
  const int64_t max_len = std::min(a.max_seq_len > 0 ? a.max_seq_len : capacity_len, capacity_len);
  int64_t capacity = 0;
  if (a.workspace.data) {
    check(a.workspace.dtype == DType::kFloat32 && a.workspace.device == device,
          "paged_attention: workspace must be float32 on the output's device");
    // Layout: partial outputs, then (max, sum) pairs from an even offset; one spare float allowed.
    capacity = (a.workspace.numel() - 1) / (static_cast<int64_t>(p.num_tokens) * p.num_heads * (p.head_dim + 2));
  }
  // The split count is sized for max_len; each block then takes its share of the actual keys.
  const int splits = choose_splits(tiles * p.num_kv_heads, max_len, capacity, slots);
  p.num_splits = splits;
  if (splits > 1) {
    p.ws_out = a.workspace.ptr<float>();
    const int64_t out_floats = static_cast<int64_t>(splits) * p.num_tokens * p.num_heads * p.head_dim;
    p.ws_ml = p.ws_out + (out_floats + 1) / 2 * 2;  // float2 alignment
  }

  check(tiles * p.num_kv_heads < INT32_MAX, "paged_attention (CUDA): too many query rows for one launch");
  dim3 grid(static_cast<unsigned>(tiles * p.num_kv_heads), static_cast<unsigned>(splits));
  void* args[] = {&p};
  launch_kernel(k.func, grid, dim3(attn::kThreads), static_cast<size_t>(k.smem_bytes), stream, args, device,
                "paged_attention: kernel launch");
  if (splits > 1) {
    switch (dtype) {
      case DType::kFloat32: launch_merge<float>(p, device, stream); break;
      case DType::kFloat16: launch_merge<__half>(p, device, stream); break;
      default: launch_merge<__nv_bfloat16>(p, device, stream); break;
    }
  }
}

}  // namespace tinyserve::cuda
