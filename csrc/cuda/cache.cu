// reshape_and_cache on CUDA: one thread block per token copies its key and value heads into the
// token's slot of the paged KV cache. 16-byte copies when every row and stride allows them,
// element copies otherwise. A pure copy: bit-exact, dtype-agnostic (only the element size matters).
#include <cstdint>
#include <string>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {
namespace {

constexpr int kThreads = 128;

struct CacheParams {
  const char* key;
  const char* value;
  char* key_cache;
  char* value_cache;
  const void* slots;
  // Byte strides.
  int64_t key_tok, key_head, value_tok, value_head;
  int64_t kc_block, kc_slot, kc_head, vc_block, vc_slot, vc_head;
  int64_t slot_stride;  // in elements
  int64_t num_slots, block_size;
  int num_kv_heads, units_per_head;  // copy units (sizeof(Unit) bytes) per head row
};

template <typename Unit, typename Index>
__global__ void __launch_bounds__(kThreads) reshape_and_cache_kernel(const CacheParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = static_cast<const Index*>(p.slots)[token * p.slot_stride];
  // -1 marks padding; anything else outside the cache is skipped too rather than written wild
  // (the CPU twin raises for it; here nothing may be read back to the host).
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t block = slot / p.block_size, offset = slot % p.block_size;
  const int total = p.num_kv_heads * p.units_per_head;
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const int h = i / p.units_per_head, u = i % p.units_per_head;
    const Unit* k = reinterpret_cast<const Unit*>(p.key + token * p.key_tok + h * p.key_head) + u;
    const Unit* v = reinterpret_cast<const Unit*>(p.value + token * p.value_tok + h * p.value_head) + u;
    Unit* kd = reinterpret_cast<Unit*>(p.key_cache + block * p.kc_block + offset * p.kc_slot + h * p.kc_head) + u;
    Unit* vd = reinterpret_cast<Unit*>(p.value_cache + block * p.vc_block + offset * p.vc_slot + h * p.vc_head) + u;
    *kd = *k;
    *vd = *v;
  }
}

template <typename Unit>
void launch(const CacheParams& p, bool int64_slots, unsigned tokens, cudaStream_t stream) {
  if (int64_slots) {
    reshape_and_cache_kernel<Unit, int64_t><<<tokens, kThreads, 0, stream>>>(p);
  } else {
    reshape_and_cache_kernel<Unit, int32_t><<<tokens, kThreads, 0, stream>>>(p);
  }
  check_launch("reshape_and_cache_kernel");
}

}  // namespace

void reshape_and_cache(const ReshapeAndCacheArgs& a, uintptr_t stream_handle) {
  check_reshape_and_cache_args(a);
  const TensorView &key = a.key, &value = a.value, &kc = a.key_cache, &vc = a.value_cache, &slots = a.slot_mapping;
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  check(num_tokens <= INT32_MAX, "reshape_and_cache: too many tokens for one launch");
  if (num_tokens == 0) return;
  const int64_t es = dtype_size(key.dtype);
  CacheParams p{};
  p.key = static_cast<const char*>(key.data);
  p.value = static_cast<const char*>(value.data);
  p.key_cache = static_cast<char*>(kc.data);
  p.value_cache = static_cast<char*>(vc.data);
  p.slots = slots.data;
  p.key_tok = key.stride(0) * es;
  p.key_head = key.stride(1) * es;
  p.value_tok = value.stride(0) * es;
  p.value_head = value.stride(1) * es;
  p.kc_block = kc.stride(0) * es;
  p.kc_slot = kc.stride(1) * es;
  p.kc_head = kc.stride(2) * es;
  p.vc_block = vc.stride(0) * es;
  p.vc_slot = vc.stride(1) * es;
  p.vc_head = vc.stride(2) * es;
  p.slot_stride = slots.stride(0);
  p.num_slots = kc.size(0) * kc.size(1);
  p.block_size = kc.size(1);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  const int64_t row_bytes = head_dim * es;
  // 16-byte units when every row start is 16-byte aligned.
  bool vec = row_bytes % 16 == 0;
  for (const TensorView* t : {&key, &value, &kc, &vc}) vec = vec && reinterpret_cast<uintptr_t>(t->data) % 16 == 0;
  for (int64_t s : {p.key_tok, p.key_head, p.value_tok, p.value_head, p.kc_block, p.kc_slot, p.kc_head, p.vc_block,
                    p.vc_slot, p.vc_head}) {
    vec = vec && s % 16 == 0;
  }
  check_cuda(cudaSetDevice(kc.device), "reshape_and_cache: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  const bool int64_slots = slots.dtype == DType::kInt64;
  const auto tokens = static_cast<unsigned>(num_tokens);
  if (vec) {
    p.units_per_head = static_cast<int>(row_bytes / 16);
    launch<uint4>(p, int64_slots, tokens, stream);
  } else if (es == 4) {
    p.units_per_head = static_cast<int>(head_dim);
    launch<uint32_t>(p, int64_slots, tokens, stream);
  } else {
    check(es == 2, "reshape_and_cache (CUDA): unsupported dtype; supported: float32, float16, bfloat16");
    p.units_per_head = static_cast<int>(head_dim);
    launch<uint16_t>(p, int64_slots, tokens, stream);
  }
}

}  // namespace tinyserve::cuda
