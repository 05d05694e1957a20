// The tensor-core instruction shared by the kernels that use it: mma.sync m16n8k16 (sm_80+),
// float16/bfloat16 operands, float32 accumulators.
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

namespace tinyserve::cuda {

// d += a . b for one 16x8x16 tile (A row-major 16x16, B "col" 16x8, fp32 accumulators).
// Fragments (g = lane / 4, q = lane % 4): a = {(g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)},
// b = {(k 2q..2q+1, n g), (k 2q+8..2q+9, n g)}, d = {(g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)};
// each 32-bit register holds two elements, the lower index in the low half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace tinyserve::cuda
