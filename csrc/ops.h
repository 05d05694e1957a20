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

}  // namespace tinyserve
