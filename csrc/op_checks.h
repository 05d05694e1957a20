// Argument checks shared by an op's CPU twin (csrc/cpu) and its CUDA kernel (csrc/cuda), so the two
// accept exactly the same arguments. Launch limits that only the CUDA side has (sizes past 2^31,
// pointer alignment for vector loads) stay in the .cu files.
#pragma once

#include <climits>
#include <cstdint>
#include <string>

#include "ops.h"

namespace tinyserve {

// 2-D [rows, width] or 3-D [n, inner, width] with a unit last stride.
inline bool rows_ok(const TensorView& t) { return (t.ndim == 2 || t.ndim == 3) && t.stride(-1) == 1; }

inline bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i) {
    if (a.shape[i] != b.shape[i]) return false;
  }
  return true;
}

inline void check_rms_norm_args(const RmsNormArgs& a) {
  const bool add = a.residual.data != nullptr;
  check(rows_ok(a.x) && rows_ok(a.out) && same_shape(a.x, a.out),
        "rms_norm: x and out must be 2-D or 3-D of one shape with a unit last stride");
  check(!add || (rows_ok(a.residual) && same_shape(a.x, a.residual)),
        "fused_add_rms_norm: residual must have x's shape and a unit last stride");
  check(a.weight.ndim == 1 && a.weight.size(0) == a.x.size(-1) && a.weight.stride(0) == 1,
        "rms_norm: weight must be [hidden] and contiguous");
  check(a.out.dtype == a.x.dtype && a.weight.dtype == a.x.dtype && (!add || a.residual.dtype == a.x.dtype),
        "rms_norm: x, weight, out (and residual) must share one dtype");
  check(a.out.device == a.x.device && a.weight.device == a.x.device && (!add || a.residual.device == a.x.device),
        "rms_norm: x, weight, out (and residual) must be on one device");
}

inline void check_reshape_and_cache_args(const ReshapeAndCacheArgs& a) {
  const TensorView &key = a.key, &value = a.value, &kc = a.key_cache, &vc = a.value_cache, &slots = a.slot_mapping;
  check(key.ndim == 3 && value.ndim == 3 && kc.ndim == 4 && vc.ndim == 4 && slots.ndim == 1,
        "reshape_and_cache: expected key/value 3-D, caches 4-D, slot_mapping 1-D");
  check(key.dtype == value.dtype && key.dtype == kc.dtype && key.dtype == vc.dtype,
        "reshape_and_cache: key, value and caches must share one dtype");
  check(slots.dtype == DType::kInt32 || slots.dtype == DType::kInt64,
        "reshape_and_cache: slot_mapping must be int32 or int64");
  for (const TensorView* t : {&key, &value, &kc, &vc, &slots}) {
    check(t->device == kc.device, "reshape_and_cache: all tensors must be on one device");
  }
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  check(slots.size(0) == num_tokens && value.size(0) == num_tokens, "reshape_and_cache: num_tokens mismatch");
  check(value.size(1) == num_kv_heads && value.size(2) == head_dim && kc.size(2) == num_kv_heads &&
            kc.size(3) == head_dim,
        "reshape_and_cache: head shapes differ between key/value and the caches");
  for (int i = 0; i < 4; ++i) check(kc.size(i) == vc.size(i), "reshape_and_cache: key/value cache shapes differ");
  check(key.stride(2) == 1 && value.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1,
        "reshape_and_cache: the last dimension must be contiguous");
}

// The reshape_and_cache part of a rotary_embedding that writes the caches.
inline ReshapeAndCacheArgs rotary_cache_args(const RotaryArgs& a) {
  return ReshapeAndCacheArgs{a.key, a.value, a.key_cache, a.value_cache, a.slot_mapping};
}

inline void check_rotary_args(const RotaryArgs& a) {
  const TensorView &q = a.query, &k = a.key, &cache = a.cos_sin_cache;
  check(q.ndim == 3 && k.ndim == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
        "rotary_embedding: query/key must be [num_tokens, num_(kv_)heads, head_dim]");
  check(q.stride(2) == 1 && k.stride(2) == 1, "rotary_embedding: query/key need a unit last stride");
  check(a.positions.ndim == 1 && a.positions.size(0) == q.size(0) &&
            (a.positions.dtype == DType::kInt32 || a.positions.dtype == DType::kInt64),
        "rotary_embedding: positions must be [num_tokens] int32 or int64");
  check(q.dtype == k.dtype && cache.dtype == q.dtype, "rotary_embedding: query, key and the cache share a dtype");
  check(a.rotary_dim > 0 && a.rotary_dim % 2 == 0 && a.rotary_dim <= q.size(2),
        "rotary_embedding: rotary_dim must be even and in (0, head_dim]");
  check(cache.ndim == 2 && cache.size(1) == a.rotary_dim && cache.stride(1) == 1,
        "rotary_embedding: cos_sin_cache must be [max_position, rotary_dim] with a unit last stride");
  const bool norm = a.q_norm_weight.data != nullptr;
  check(norm == (a.k_norm_weight.data != nullptr), "rotary_embedding: give both q/k norm weights or neither");
  for (const TensorView* t : {&k, &cache, &a.positions}) {
    check(t->device == q.device, "rotary_embedding: all tensors must be on one device");
  }
  if (norm) {
    for (const TensorView* w : {&a.q_norm_weight, &a.k_norm_weight}) {
      check(w->ndim == 1 && w->size(0) == q.size(2) && w->stride(0) == 1 && w->dtype == q.dtype &&
                w->device == q.device,
            "rotary_embedding: q/k norm weights must be contiguous [head_dim] of the query's dtype and device");
    }
  }
  const bool writes = a.key_cache.data != nullptr;
  check(writes == (a.value.data != nullptr) && writes == (a.value_cache.data != nullptr) &&
            writes == (a.slot_mapping.data != nullptr),
        "rotary_embedding: give value, key_cache, value_cache and slot_mapping together, or none");
  if (writes) {
    check_reshape_and_cache_args(rotary_cache_args(a));
    check(a.key_cache.device == q.device, "rotary_embedding: the caches must be on the query's device");
  }
  if (a.rms_of.data != nullptr) {
    check(writes, "rotary_embedding: rms_of needs the cache write (value is scaled too)");
    check(a.rms_of.ndim == 2 && a.rms_of.size(0) == q.size(0) && a.rms_of.stride(1) == 1 &&
              a.rms_of.dtype == q.dtype && a.rms_of.device == q.device,
          "rotary_embedding: rms_of must be [num_tokens, hidden] of the query's dtype and device, unit last stride");
  }
}

inline void check_silu_and_mul_args(const SiluAndMulArgs& a) {
  check(a.x.ndim == 2 && a.out.ndim == 2 && a.x.size(0) == a.out.size(0) && a.x.size(1) == 2 * a.out.size(1),
        "silu_and_mul: x must be [num_tokens, 2 * d] and out [num_tokens, d]");
  check(a.x.stride(1) == 1 && a.out.stride(1) == 1, "silu_and_mul: x and out need a unit last stride");
  check(a.x.dtype == a.out.dtype, "silu_and_mul: x and out must share one dtype");
  check(a.x.device == a.out.device, "silu_and_mul: x and out must be on one device");
  if (a.rms_of.data != nullptr) {
    check(a.rms_of.ndim == 2 && a.rms_of.size(0) == a.x.size(0) && a.rms_of.stride(1) == 1,
          "silu_and_mul: rms_of must be [num_tokens, hidden] with a unit last stride");
    check(a.rms_of.dtype == a.x.dtype && a.rms_of.device == a.x.device,
          "silu_and_mul: rms_of must have x's dtype and device");
  }
}

inline void check_skinny_gemm_args(const SkinnyGemmArgs& a) {
  const TensorView &x = a.x, &w = a.weight, &out = a.out, &bias = a.bias;
  const bool has_bias = bias.data != nullptr;
  check(x.ndim == 2 && w.ndim == 2 && out.ndim == 2 && (!has_bias || bias.ndim == 1),
        "skinny_gemm: x [m, k], weight [n, k] and out [m, n] must be 2-D (bias [n] 1-D)");
  check(x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16,
        std::string("skinny_gemm: unsupported dtype ") + dtype_name(x.dtype) + "; supported: float16, bfloat16");
  check(w.dtype == x.dtype && out.dtype == x.dtype && (!has_bias || bias.dtype == x.dtype),
        "skinny_gemm: x, weight, out (and bias) must share one dtype");
  check(x.size(0) <= kSkinnyMaxRows,
        "skinny_gemm: x has " + std::to_string(x.size(0)) + " rows; at most " + std::to_string(kSkinnyMaxRows) +
            " are supported");
  const int64_t k = w.size(1);
  check(x.size(1) == (a.silu ? 2 * k : k),
        a.silu ? "skinny_gemm: with silu, x must be [m, 2k] ([gate | up]) for weight [n, k]"
               : "skinny_gemm: x [m, k] and weight [n, k] must share k");
  check(k % 8 == 0, "skinny_gemm: k = " + std::to_string(k) + " is not a multiple of 8");
  check(out.size(0) == x.size(0) && out.size(1) == w.size(0), "skinny_gemm: out must be [m, n]");
  check(!has_bias || bias.size(0) == w.size(0), "skinny_gemm: bias must be [n]");
  check(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() && (!has_bias || bias.is_contiguous()),
        "skinny_gemm: x, weight, out and bias must be contiguous");
  check(w.device == x.device && out.device == x.device && (!has_bias || bias.device == x.device),
        "skinny_gemm: all tensors must be on one device");
  check(a.unroll == 2 || a.unroll == 4, "skinny_gemm: unroll must be 2 or 4, got " + std::to_string(a.unroll));
  const TensorView &g = a.norm_weight, &r = a.residual;
  if (g.data != nullptr) {
    check(!a.silu, "skinny_gemm: norm_weight and silu cannot be combined");
    check(g.ndim == 1 && g.size(0) == k && g.dtype == x.dtype && g.device == x.device && g.is_contiguous(),
          "skinny_gemm: norm_weight must be a contiguous [k] tensor of x's dtype on x's device");
  }
  if (r.data != nullptr) {
    check(r.ndim == 2 && r.size(0) == out.size(0) && r.size(1) == out.size(1) && r.dtype == x.dtype &&
              r.device == x.device && r.is_contiguous(),
          "skinny_gemm: residual must be a contiguous [m, n] tensor of x's dtype on x's device");
  }
}

inline void check_fused_mlp_args(const FusedMlpArgs& a) {
  const TensorView &r = a.residual, &g = a.norm_weight, &gu = a.gate_up, &d = a.down, &out = a.out;
  const bool has_hidden = a.hidden.data != nullptr, has_o = a.o_weight.data != nullptr;
  check(r.ndim == 2 && g.ndim == 1 && gu.ndim == 2 && d.ndim == 2 && out.ndim == 2,
        "fused_mlp: residual [m, H], norm_weight [H], gate_up [2I, H], down [H, I] and out [m, H] must be "
        "2-D (norm_weight 1-D)");
  check(r.dtype == DType::kFloat16 || r.dtype == DType::kBFloat16,
        std::string("fused_mlp: unsupported dtype ") + dtype_name(r.dtype) + "; supported: float16, bfloat16");
  const int64_t m = r.size(0), h = r.size(1), inter = d.size(1);
  check(m <= kFusedMlpMaxRows, "fused_mlp: " + std::to_string(m) + " rows; at most " +
                                   std::to_string(kFusedMlpMaxRows) + " are supported");
  check(h % 8 == 0 && inter % 8 == 0, "fused_mlp: H = " + std::to_string(h) + " and I = " + std::to_string(inter) +
                                          " must be multiples of 8");
  check(g.size(0) == h && gu.size(0) == 2 * inter && gu.size(1) == h && d.size(0) == h && out.size(0) == m &&
            out.size(1) == h,
        "fused_mlp: shapes must be residual [m, H], norm_weight [H], gate_up [2I, H], down [H, I], out [m, H]");
  const TensorView* all[] = {&r, &g, &gu, &d, &out, has_hidden ? &a.hidden : &r, has_o ? &a.o_weight : &r};
  for (const TensorView* t : all) {
    check(t->dtype == r.dtype && t->device == r.device && t->is_contiguous(),
          "fused_mlp: all tensors must be contiguous, of one dtype, on one device");
  }
  check(has_hidden || out.data == r.data, "fused_mlp: without hidden, out must be residual");
  check(has_hidden || !has_o, "fused_mlp: o_weight needs hidden (the attention output)");
  if (has_o) {
    const int64_t q = a.o_weight.ndim == 2 ? a.o_weight.size(1) : -1;
    check(a.o_weight.ndim == 2 && a.o_weight.size(0) == h && q % 8 == 0,
          "fused_mlp: o_weight must be [H, Q] with Q a multiple of 8");
    check(a.hidden.ndim == 2 && a.hidden.size(0) == m && a.hidden.size(1) == q,
          "fused_mlp: with o_weight [H, Q], hidden must be the attention output [m, Q]");
  } else if (has_hidden) {
    check(a.hidden.ndim == 2 && a.hidden.size(0) == m && a.hidden.size(1) == h, "fused_mlp: hidden must be [m, H]");
  }
}

inline void check_fused_norm_linear_args(const FusedNormLinearArgs& a) {
  const TensorView &x = a.x, &g = a.norm_weight, &w = a.weight, &out = a.out;
  const bool has_res = a.residual.data != nullptr, has_bias = a.bias.data != nullptr;
  check(x.ndim == 2 && g.ndim == 1 && w.ndim == 2 && out.ndim == 2,
        "fused_norm_linear: x [m, K], norm_weight [K], weight [N, K] and out [m, N] must be 2-D (norm_weight 1-D)");
  check(x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16,
        std::string("fused_norm_linear: unsupported dtype ") + dtype_name(x.dtype) + "; supported: float16, bfloat16");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  check(m <= kFusedMlpMaxRows, "fused_norm_linear: " + std::to_string(m) + " rows; at most " +
                                   std::to_string(kFusedMlpMaxRows) + " are supported");
  check(k % 8 == 0, "fused_norm_linear: K = " + std::to_string(k) + " must be a multiple of 8");
  check(g.size(0) == k && w.size(1) == k && out.size(0) == m && out.size(1) == n,
        "fused_norm_linear: shapes must be x [m, K], norm_weight [K], weight [N, K], out [m, N]");
  check((a.residual_out.data != nullptr) == has_res, "fused_norm_linear: residual and residual_out go together");
  const TensorView* all[] = {&x, &g, &w, &out, has_res ? &a.residual : &x, has_res ? &a.residual_out : &x,
                             has_bias ? &a.bias : &x};
  for (const TensorView* t : all) {
    check(t->dtype == x.dtype && t->device == x.device && t->is_contiguous(),
          "fused_norm_linear: all tensors must be contiguous, of one dtype, on one device");
  }
  if (has_res) {
    check(a.residual.ndim == 2 && a.residual.size(0) == m && a.residual.size(1) == k && a.residual_out.ndim == 2 &&
              a.residual_out.size(0) == m && a.residual_out.size(1) == k,
          "fused_norm_linear: residual and residual_out must be [m, K]");
  }
  if (has_bias) check(a.bias.ndim == 1 && a.bias.size(0) == n, "fused_norm_linear: bias must be [N]");
}

// A [num_seqs] per-row parameter of the sampling ops: 1-D (any stride), the given dtype, on `device`.
inline void check_row_param(const char* op, const char* name, const TensorView& t, int64_t num_seqs, DType dtype,
                            int32_t device) {
  check(t.ndim == 1 && t.size(0) == num_seqs,
        std::string(op) + ": " + name + " must be 1-D [num_seqs=" + std::to_string(num_seqs) + "]");
  check(t.dtype == dtype, std::string(op) + ": " + name + " must be " + dtype_name(dtype) + ", got " +
                              dtype_name(t.dtype));
  check(t.device == device, std::string(op) + ": " + name + " must be on the device of the other tensors");
}

inline void check_sample_args(const SampleArgs& a) {
  const TensorView& x = a.logits;
  check(x.ndim == 2 && x.stride(1) == 1,
        "sample_from_logits: logits must be 2-D [num_seqs, vocab_size] with a unit last stride");
  check(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16,
        std::string("sample_from_logits: unsupported logits dtype ") + dtype_name(x.dtype) +
            "; supported: float32, float16, bfloat16");
  check(x.size(1) >= 1 && x.size(1) <= INT32_MAX, "sample_from_logits: vocab_size must be in [1, 2^31)");
  const int64_t n = x.size(0);
  if (a.temperature.data == nullptr) {  // every row greedy: no noise
    check(a.keys.data == nullptr && a.counters.data == nullptr,
          "sample_from_logits: keys and counters go with temperature (without it every row is greedy)");
  } else {
    check_row_param("sample_from_logits", "temperature", a.temperature, n, DType::kFloat32, x.device);
    check_row_param("sample_from_logits", "keys", a.keys, n, DType::kInt64, x.device);
    check_row_param("sample_from_logits", "counters", a.counters, n, DType::kInt64, x.device);
  }
  check_row_param("sample_from_logits", "out", a.out, n, DType::kInt64, x.device);
  if (a.workspace.data != nullptr) {
    check(a.workspace.ndim == 1 && a.workspace.stride(0) == 1 && a.workspace.dtype == DType::kInt64 &&
              a.workspace.device == x.device,
          "sample_from_logits: workspace must be a contiguous 1-D int64 tensor on the logits' device");
  }
}

inline void check_noise_args(const NoiseArgs& a) {
  const TensorView& out = a.out;
  check(out.ndim == 2 && out.stride(1) == 1 && out.dtype == DType::kFloat32,
        "exponential_noise: out must be 2-D [num_seqs, vocab_size] float32 with a unit last stride");
  check(out.size(1) <= INT32_MAX, "exponential_noise: vocab_size must be below 2^31");
  check_row_param("exponential_noise", "keys", a.keys, out.size(0), DType::kInt64, out.device);
  check_row_param("exponential_noise", "counters", a.counters, out.size(0), DType::kInt64, out.device);
}

}  // namespace tinyserve
