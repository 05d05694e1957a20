// CPU twin of the teaching matmul: C = A @ B, cache-blocked with a packed B panel and a
// register-tiled micro-kernel that the compiler vectorises. OpenMP over row tiles.
//
// Blocking: B[kc x nc] is packed into panels of NR columns (each kc x NR, contiguous, zero-padded),
// so the micro-kernel streams one panel from L1/L2 while holding an MR x NR tile of C in registers.
// Any strides are accepted: A and B are read through their strides, C is written through its own.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"

namespace tinyserve::cpu {
namespace {

template <typename T>
struct Tile;
template <>
struct Tile<float> {
  static constexpr int MR = 6, NR = 32;  // 12 x 16-float accumulators with AVX-512, 24 with AVX2
};
template <>
struct Tile<double> {
  static constexpr int MR = 6, NR = 16;
};

constexpr int64_t KC = 256;   // depth of one packed panel (fits L1/L2 with the A rows)
constexpr int64_t NC = 1024;  // columns packed at once (kc * nc * 4 bytes = 1 MiB for float)

template <typename T>
void pack_b(const T* b, int64_t sb0, int64_t sb1, int64_t kc, int64_t nc, T* packed) {
  constexpr int NR = Tile<T>::NR;
  const int64_t panels = (nc + NR - 1) / NR;
#pragma omp for schedule(static)
  for (int64_t jp = 0; jp < panels; ++jp) {
    T* dst = packed + jp * kc * NR;
    const int64_t j0 = jp * NR;
    const int64_t nr = std::min<int64_t>(NR, nc - j0);
    for (int64_t p = 0; p < kc; ++p) {
      const T* src = b + p * sb0 + j0 * sb1;
      int64_t c = 0;
      for (; c < nr; ++c) dst[p * NR + c] = src[c * sb1];
      for (; c < NR; ++c) dst[p * NR + c] = T(0);
    }
  }
}

// acc[MR][NR] (+)= A[rows, 0:kc] @ panel[0:kc, 0:NR]; stores the first mr x nr entries.
template <typename T>
void micro_kernel(const T* const* a_rows, int64_t sa1, const T* panel, int64_t kc, T* c,
                  int64_t sc0, int64_t sc1, int64_t mr, int64_t nr, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  alignas(64) T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    const T* bp = panel + p * NR;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = a_rows[r][p * sa1];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[r][j] += a * bp[j];
    }
  }
  for (int64_t r = 0; r < mr; ++r) {
    T* crow = c + r * sc0;
    if (accumulate) {
      for (int64_t j = 0; j < nr; ++j) crow[j * sc1] += acc[r][j];
    } else {
      for (int64_t j = 0; j < nr; ++j) crow[j * sc1] = acc[r][j];
    }
  }
}

template <typename T>
void matmul_impl(const TensorView& av, const TensorView& bv, const TensorView& cv) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const int64_t m = av.size(0), k = av.size(1), n = bv.size(1);
  const T* a = av.ptr<const T>();
  const T* b = bv.ptr<const T>();
  T* c = cv.ptr<T>();
  const int64_t sa0 = av.stride(0), sa1 = av.stride(1);
  const int64_t sb0 = bv.stride(0), sb1 = bv.stride(1);
  const int64_t sc0 = cv.stride(0), sc1 = cv.stride(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * sc0 + j * sc1] = T(0);
    return;
  }
  const int64_t nc_max = std::min(NC, ((n + NR - 1) / NR) * NR);
  std::vector<T> packed(static_cast<size_t>(std::min(KC, k) * nc_max));
  const int64_t row_tiles = (m + MR - 1) / MR;

#pragma omp parallel
  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = std::min(NC, n - jc);
    const int64_t panels = (nc + NR - 1) / NR;
    for (int64_t pc = 0; pc < k; pc += KC) {
      const int64_t kc = std::min(KC, k - pc);
      pack_b<T>(b + pc * sb0 + jc * sb1, sb0, sb1, kc, nc, packed.data());  // ends in a barrier
#pragma omp for schedule(static)
      for (int64_t it = 0; it < row_tiles; ++it) {
        const int64_t i0 = it * MR;
        const int64_t mr = std::min<int64_t>(MR, m - i0);
        // Rows past the end of A repeat its last row; their results are never stored.
        const T* a_rows[MR];
        for (int r = 0; r < MR; ++r) a_rows[r] = a + std::min<int64_t>(i0 + r, m - 1) * sa0 + pc * sa1;
        for (int64_t jp = 0; jp < panels; ++jp) {
          const int64_t j0 = jp * NR;
          micro_kernel<T>(a_rows, sa1, packed.data() + jp * kc * NR, kc, c + i0 * sc0 + (jc + j0) * sc1,
                          sc0, sc1, mr, std::min<int64_t>(NR, nc - j0), pc > 0);
        }
      }  // implicit barrier: the packed panel is not overwritten while still in use
    }
  }
}

}  // namespace

void matmul(const TensorView& a, const TensorView& b, const TensorView& c) {
  check(a.ndim == 2 && b.ndim == 2 && c.ndim == 2, "matmul: expected 2-D tensors");
  check(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1),
        "matmul: shape mismatch");
  check(a.dtype == b.dtype && a.dtype == c.dtype, "matmul: dtypes differ");
  switch (a.dtype) {
    case DType::kFloat32: return matmul_impl<float>(a, b, c);
    case DType::kFloat64: return matmul_impl<double>(a, b, c);
    default:
      throw std::invalid_argument(std::string("matmul (CPU): unsupported dtype ") + dtype_name(a.dtype) +
                                  "; supported: float32, float64");
  }
}

}  // namespace tinyserve::cpu
