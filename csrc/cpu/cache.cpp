// CPU twin of reshape_and_cache: copy each token's key/value heads into its slot of the paged KV
// cache. A pure copy (no dtype conversion), so results match the CUDA kernel bit for bit.
#include <cstdint>
#include <cstring>
#include <string>

#include "../op_checks.h"
#include "../ops.h"

namespace tinyserve::cpu {
namespace {

int64_t slot_at(const TensorView& slots, int64_t i) {
  const int64_t k = i * slots.stride(0);
  return slots.dtype == DType::kInt64 ? slots.ptr<const int64_t>()[k] : slots.ptr<const int32_t>()[k];
}

// dst[slot] = src[token] for every head; `bytes` = head_dim * element size.
void copy_token(const TensorView& src, const TensorView& cache, int64_t token, int64_t block,
                int64_t offset, int64_t bytes) {
  const int64_t esize = dtype_size(src.dtype);
  const auto* s = static_cast<const char*>(src.data) + token * src.stride(0) * esize;
  auto* d = static_cast<char*>(cache.data) + (block * cache.stride(0) + offset * cache.stride(1)) * esize;
  const int64_t num_kv_heads = src.size(1);
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    std::memcpy(d + h * cache.stride(2) * esize, s + h * src.stride(1) * esize, static_cast<size_t>(bytes));
  }
}

}  // namespace

void reshape_and_cache(const ReshapeAndCacheArgs& a) {
  check_reshape_and_cache_args(a);
  const TensorView &key = a.key, &value = a.value, &kc = a.key_cache, &vc = a.value_cache, &slots = a.slot_mapping;
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t num_blocks = kc.size(0), block_size = kc.size(1);
  // Validate every slot first (serially; it is num_tokens integers), so the copy cannot go out of
  // bounds and no exception has to escape an OpenMP region.
  const int64_t num_slots = num_blocks * block_size;
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t slot = slot_at(slots, i);
    if (slot < -1 || slot >= num_slots) {
      throw std::invalid_argument("reshape_and_cache: slot_mapping[" + std::to_string(i) + "] = " +
                                  std::to_string(slot) + " is outside [-1, num_blocks * block_size = " +
                                  std::to_string(num_slots) + ")");
    }
  }
  const int64_t bytes = head_dim * dtype_size(key.dtype);
#pragma omp parallel for schedule(static) if (num_tokens * num_kv_heads * bytes > (1 << 16))
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t slot = slot_at(slots, i);
    if (slot < 0) continue;  // padding token
    const int64_t block = slot / block_size, offset = slot % block_size;
    copy_token(key, kc, i, block, offset, bytes);
    copy_token(value, vc, i, block, offset, bytes);
  }
}

}  // namespace tinyserve::cpu
