// One declaration per op. Each op has a CPU twin (csrc/cpu) and, when built with CUDA, a CUDA
// kernel (csrc/cuda) with the same arguments plus the stream to launch on. Shapes and dtypes are
// documented in src/tinyserve/ops, which checks them before calling in.
#pragma once

#include <cstdint>

#include "tensor_view.h"

namespace tinyserve {

// c[m, n] = a[m, k] @ b[k, n]; all row-major with unit inner stride.
namespace cpu {
void matmul(const TensorView& a, const TensorView& b, const TensorView& c);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void matmul(const TensorView& a, const TensorView& b, const TensorView& c, uintptr_t stream);
}  // namespace cuda
#endif

// ---- skinny GEMM for decode (Python side: tinyserve/ops/matmul.py skinny_linear) ----

// out[m, n] = x[m, k] @ weight[n, k]^T (+ bias[n]): the linear layer at decode sizes, m <= 16 token
// rows against a weight in torch's Linear layout. float16/bfloat16, float32 accumulation, one rounding
// (after the bias add). k a multiple of 8; x, weight, out, bias contiguous (CUDA: x and weight
// 16-byte aligned). bias.data == nullptr: no bias.
//
// Fused into the same pass (the decoder layer's neighbours of its products, at decode sizes):
//  - norm_weight set: x is RMS-normalised first, row by row (RMSNorm's rounding: x * rsqrt(mean(x^2)
//    + eps) rounded to the dtype, then times norm_weight [k], rounded again);
//  - silu set: x is [m, 2k], the fused [gate | up] output, and the product takes
//    silu(gate) * up (SiluAndMul's rounding: silu rounded to the dtype, then the product);
//  - residual set ([m, n]): out = residual + product, the product rounded to the dtype first and the
//    sum rounded again (the unfused add's rounding); out may be residual itself (in place).
// norm_weight and silu exclude each other; x must not overlap out or residual.
constexpr int64_t kSkinnyMaxRows = 16;

struct SkinnyGemmArgs {
  TensorView x, weight, bias, out;
  TensorView norm_weight;  // data == nullptr: no RMSNorm prologue
  TensorView residual;     // data == nullptr: no residual add
  float eps = 0.f;
  bool silu = false;
  // CUDA: 32-wide k chunks per warp step, 2 or 4 (loads in flight per thread vs registers and
  // blocks per SM; which is faster depends on the shape and card). The CPU twin ignores it.
  int unroll = 2;
};

namespace cpu {
void skinny_gemm(const SkinnyGemmArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void skinny_gemm(const SkinnyGemmArgs& args, uintptr_t stream);

// Programmatic dependent launch of TinyServe's kernels (cuda_utils.cuh): mode -1 follows the
// environment (TINYSERVE_PDL=0 turns it off), 0 off, 1 on (sm_90+ only).
void set_programmatic_launch(int mode);
bool programmatic_launch_enabled(int device);
}  // namespace cuda
#endif

// ---- fused MLP block for decode (Python side: tinyserve/ops/fused.py fused_mlp) ----

// The second half of a decoder layer at a few token rows, as one op (float16/bfloat16, float32
// accumulation, every intermediate rounded where the unfused ops store it):
//   h = hidden . o_weight^T, o_weight [H, Q]           (with o_weight: hidden is the attention
//                                                       output [m, Q]; rounded); else h = hidden
//   r = residual + h (rounded), or residual alone without hidden
//   x = RMSNorm(r) with norm_weight and eps           (RMSNorm's rounding)
//   [g | u] = x . gate_up^T, gate_up [2I, H]          (each rounded, as the product's output)
//   a = silu(g) * u                                    (SiLU-and-mul's rounding)
//   y = a . down^T, down [H, I]                        (rounded)
//   out is residual: residual = r + y (rounded as the unfused add)
//   out is another tensor: residual = r, out = y
// m <= kFusedMlpMaxRows rows of H; all tensors contiguous. Without hidden, out must be residual.
// out may be hidden itself; otherwise it overlaps no input.
// CUDA: one kernel with a grid-wide barrier between the products (every block must be resident at
// once: the launch is sized so). Its products run on CUDA cores, which suits one or two rows.
// `workspace` (uint8, at least fused_mlp_workspace_bytes) holds the barriers' words (zeroed when the
// workspace is made; every launch leaves their low 31 bits zero, see weight_stream.cuh's
// grid_barrier), and the [m, I] buffer of a and [m, H] of o's output. The CPU twin ignores it.
constexpr int64_t kFusedMlpMaxRows = 2;
constexpr int64_t kFusedMlpWorkspaceHeader = 256;  // bytes of barrier words before the buffers

struct FusedMlpArgs {
  TensorView hidden;    // data == nullptr: none
  TensorView o_weight;  // data == nullptr: none (hidden is then [m, H])
  TensorView residual, norm_weight, gate_up, down, out, workspace;
  float eps = 0.f;
};

inline int64_t fused_mlp_workspace_bytes(int64_t rows, int64_t hidden, int64_t intermediate, int64_t elem_bytes) {
  return kFusedMlpWorkspaceHeader + rows * (intermediate + hidden) * elem_bytes;
}

namespace cpu {
void fused_mlp(const FusedMlpArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void fused_mlp(const FusedMlpArgs& args, uintptr_t stream);
// Whether the CUDA kernel takes m rows of these sizes on `device` (its shared memory holds the
// attention output of width attn (0: no o product), x and a).
bool fused_mlp_fits(int64_t rows, int64_t hidden, int64_t intermediate, int64_t attn, int device);
}  // namespace cuda
#endif

// ---- RMSNorm and one product for decode (Python side: tinyserve/ops/fused.py fused_norm_linear) ----

// The start of a pre-norm block at a few token rows, as one op (float16/bfloat16, float32
// accumulation, rounded where the unfused ops store):
//   r = x + residual (rounded; stored into residual_out), or x alone without residual
//   out = RMSNorm(r) . weight^T (+ bias), weight [N, K]   (RMSNorm's rounding; the product rounded once)
// m <= kFusedMlpMaxRows rows of K; all tensors contiguous; out and residual_out overlap no input.
// CUDA: one kernel streaming the weight on CUDA cores (weight_stream.cuh), no workspace.
struct FusedNormLinearArgs {
  TensorView x, residual, residual_out;  // residual, residual_out: data == nullptr without
  TensorView norm_weight, weight, bias;  // bias: data == nullptr without
  TensorView out;
  float eps = 0.f;
};

namespace cpu {
void fused_norm_linear(const FusedNormLinearArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void fused_norm_linear(const FusedNormLinearArgs& args, uintptr_t stream);
// Whether the CUDA kernel takes m rows of K on `device` (its shared memory holds the normalised x).
bool fused_norm_linear_fits(int64_t rows, int64_t k, int device);
}  // namespace cuda
#endif

// ---- paged KV cache and attention (issue 4; Python side: tinyserve/ops/cache.py, attention.py) ----

// key, value [num_tokens, num_kv_heads, head_dim] -> key_cache, value_cache
// [num_blocks, block_size, num_kv_heads, head_dim] at the flat slots of slot_mapping [num_tokens]
// (int32 or int64, block_id * block_size + offset; -1 = skip). Any strides with a unit last one.
struct ReshapeAndCacheArgs {
  TensorView key, value, key_cache, value_cache, slot_mapping;
};

// out = softmax(q . K^T * scale) . V, with K and V read through the block tables. One kernel family
// serves decode (query_start_loc.data == nullptr: one query token per sequence, num_tokens ==
// num_seqs) and prefill / chunked prefill. Query token i of sequence s sits at absolute position
// seq_lens[s] - q_len + i and attends to every position <= its own.
struct PagedAttentionArgs {
  TensorView query;            // [num_tokens, num_heads, head_dim]
  TensorView key_cache;        // [num_blocks, block_size, num_kv_heads, head_dim]
  TensorView value_cache;      // [num_blocks, block_size, num_kv_heads, head_dim]
  TensorView block_tables;     // [num_seqs, max_blocks_per_seq] int32
  TensorView seq_lens;         // [num_seqs] int32 (decode: context_lens)
  TensorView query_start_loc;  // [num_seqs + 1] int32; data == nullptr for decode
  TensorView out;              // [num_tokens, num_heads, head_dim], dtype of query
  float scale = 1.f;
  // Host-side upper bounds (CUDA launch sizing only; the CUDA path never reads device memory on
  // the host). 0 = unknown: max_seq_len falls back to max_blocks_per_seq * block_size.
  int64_t max_seq_len = 0;
  int64_t max_query_len = 0;
  // CUDA only: float32 scratch for split-KV partial results; data == nullptr: no split.
  TensorView workspace;
  // CUDA only: the kernel that runs right before this op on the stream does not write seq_lens,
  // block_tables or query_start_loc, so the kernel may read them before waiting for it
  // (programmatic dependent launch): their dependent loads then overlap that kernel.
  bool metadata_ready = false;
};

namespace cpu {
void reshape_and_cache(const ReshapeAndCacheArgs& args);
void paged_attention(const PagedAttentionArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void reshape_and_cache(const ReshapeAndCacheArgs& args, uintptr_t stream);
void paged_attention(const PagedAttentionArgs& args, uintptr_t stream);
}  // namespace cuda
#endif

// ---- fused elementwise / row ops of the decoder layer (issue 8; Python side: tinyserve/ops/fused.py) ----

// RMSNorm over the last dim of x, rows [num_tokens, hidden] (2-D) or [num_tokens, num_heads,
// head_dim] (3-D); any strides with a unit last one. Sums of squares in float32; the normalised
// value is rounded to x's dtype before the weight multiplies it (transformers' order):
//   out = weight * T(x * rsqrt(mean(x^2) + eps)).
// With residual.data != nullptr (fused_add_rms_norm): residual += x (rounded to T), then
// out = rms_norm(residual); out may alias x. weight [hidden] contiguous, dtype of x.
struct RmsNormArgs {
  TensorView x, residual, weight, out;
  float eps = 1e-6f;
};

// In-place RoPE in the half-split ("neox") layout on query [num_tokens, num_heads, head_dim] and
// key [num_tokens, num_kv_heads, head_dim] (any strides with a unit last one; they must not overlap):
// dims i and i + rotary_dim/2 (i < rotary_dim/2) of each head rotate by the angle of
// cos_sin_cache[positions[t]] = [cos | sin] ([max_position, rotary_dim], dtype of query), with
// every product rounded to the dtype as PyTorch's x*cos - x2*sin does. With q_norm_weight.data !=
// nullptr, each head is first RMS-normalised (Qwen3's q/k norm, eps) with q_norm_weight /
// k_norm_weight [head_dim]. positions [num_tokens] int32 or int64.
// With key_cache.data != nullptr the op also does reshape_and_cache's work (same arguments, same
// checks): the rotated key and `value` [num_tokens, num_kv_heads, head_dim] go into the paged caches
// at slot_mapping (-1: not written). On CUDA that is the same kernel, so a decoder layer saves a
// launch; the CPU twin runs the two steps.
// With rms_of.data != nullptr ([num_tokens, hidden], the dtype of query, unit last stride; needs
// the cache write): query, key and value are the products of un-normalised rows h = rms_of (an
// RMSNorm's weight folded into the qkv product), so every element of token t's q, k and v heads is
// first multiplied by rsqrt(mean(h[t]^2) + rms_eps) (float32 statistics) and rounded to the dtype,
// in place, as the product of the normalised row would have been stored.
struct RotaryArgs {
  TensorView positions, query, key, cos_sin_cache, q_norm_weight, k_norm_weight;
  TensorView value, key_cache, value_cache, slot_mapping;
  int64_t rotary_dim = 0;
  float eps = 1e-6f;
  TensorView rms_of;
  float rms_eps = 1e-6f;
};

// out [num_tokens, d] = T(silu(x[:, :d]) rounded to T) * x[:, d:], x [num_tokens, 2 * d]; unit
// last strides, any row strides.
// With rms_of.data != nullptr ([num_tokens, hidden], x's dtype, unit last stride): x is the
// [gate | up] product of un-normalised rows h = rms_of (an RMSNorm's weight folded into the
// product), so every element of row t is first multiplied by rsqrt(mean(h[t]^2) + eps) (float32
// statistics) and rounded to T, as the product of the normalised row would have been stored.
struct SiluAndMulArgs {
  TensorView x, out;
  TensorView rms_of;
  float eps = 1e-6f;
};

namespace cpu {
void rms_norm(const RmsNormArgs& args);
void rotary_embedding(const RotaryArgs& args);
void silu_and_mul(const SiluAndMulArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void rms_norm(const RmsNormArgs& args, uintptr_t stream);
void rotary_embedding(const RotaryArgs& args, uintptr_t stream);
void silu_and_mul(const SiluAndMulArgs& args, uintptr_t stream);
}  // namespace cuda
#endif

// ---- sampling (Python side: tinyserve/ops/sampling.py; the noise contract: csrc/philox.h) ----

// One sampled token per row of logits [num_seqs, vocab_size] (float32, float16 or bfloat16; any row
// stride, unit last stride), in one pass over the logits:
//   out[s] = argmax_v (x_v - T * log E_v)  when T = temperature[s] > 0 (the Gumbel-max form of
//            sampling from softmax(x / T), E_v the exponential noise of row s, csrc/philox.h),
//   out[s] = argmax_v x_v                   otherwise (greedy).
// Ties go to the lowest index; -inf logits never win (a row that is all -inf gives 0). Scores are
// float32. temperature [num_seqs] float32; keys, counters [num_seqs] int64 (the bits of the rows'
// uint64 key and counter); out [num_seqs] int64; any strides. Without temperature (data nullptr, and
// then no keys or counters either) every row is greedy: the argmax op. CUDA only: workspace ([capacity]
// int64, data may be nullptr) holds per-block partial results when a row is split over several
// thread blocks; the split count is at most capacity / num_seqs.
struct SampleArgs {
  TensorView logits, temperature, keys, counters, out, workspace;
};

// out[s, v] = E_v of row s (csrc/philox.h), out [num_seqs, vocab_size] float32 with a unit last
// stride; keys, counters [num_seqs] int64, any stride.
struct NoiseArgs {
  TensorView keys, counters, out;
};

namespace cpu {
void sample_from_logits(const SampleArgs& args);
void exponential_noise(const NoiseArgs& args);
}  // namespace cpu

#ifdef TINYSERVE_WITH_CUDA
namespace cuda {
void sample_from_logits(const SampleArgs& args, uintptr_t stream);
void exponential_noise(const NoiseArgs& args, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace tinyserve
