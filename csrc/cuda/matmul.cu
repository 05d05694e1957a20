// The teaching matmul on the GPU: C = A @ B.
//  - float32: 128x128 block tile, 16 deep, each of 256 threads owns an 8x8 tile of C in registers;
//    the next 16-deep K-slice is fetched into registers while the current one is multiplied out of shared
//    memory (double-buffered shared memory, one barrier per slice).
//  - float16 / bfloat16: tensor cores through WMMA (16x16x16 fragments), fp32 accumulation.
// Any sizes and strides are accepted; out-of-range elements are loaded as zeros.
#include <mma.h>

#include <cstdint>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {
namespace {

constexpr int BM = 128, BN = 128, BK = 16, TM = 8, TN = 8, THREADS = 256;

struct MatmulArgs {
  int64_t m, n, k;
  int64_t sa0, sa1, sb0, sb1, sc0, sc1;
};

// kVec: A and B are row-major with unit inner stride, k and n are multiples of 4 and the pointers
// are 16-byte aligned, so each thread moves whole float4s (a float4 is either fully in range or
// fully out). Otherwise every element is loaded on its own through the strides.
template <bool kVec>
__global__ void __launch_bounds__(THREADS, 2) sgemm_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                                           float* __restrict__ c, MatmulArgs p) {
  __shared__ __align__(16) float As[2][BK][BM];  // A slice stored transposed: As[k][row]
  __shared__ __align__(16) float Bs[2][BK][BN];
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;

  // Loader mapping: the A slice is 128 x 16 and the B slice 16 x 128, 8 elements per thread each,
  // as two groups of 4 consecutive elements along the fast axis.
  float a_reg[8], b_reg[8];
  auto load_slice = [&](int64_t k0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ea = tid + h * THREADS;          // 0..511 groups of 4
      const int a_row = ea / 4, a_col = (ea % 4) * 4;
      const int b_row = ea / 32, b_col = (ea % 32) * 4;
      const int64_t r = row0 + a_row, ka = k0 + a_col;
      const int64_t kb = k0 + b_row, cb = col0 + b_col;
      if constexpr (kVec) {
        const float4 va = (r < p.m && ka < p.k) ? *reinterpret_cast<const float4*>(a + r * p.sa0 + ka)
                                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 vb = (kb < p.k && cb < p.n) ? *reinterpret_cast<const float4*>(b + kb * p.sb0 + cb)
                                                  : make_float4(0.f, 0.f, 0.f, 0.f);
        a_reg[h * 4 + 0] = va.x; a_reg[h * 4 + 1] = va.y; a_reg[h * 4 + 2] = va.z; a_reg[h * 4 + 3] = va.w;
        b_reg[h * 4 + 0] = vb.x; b_reg[h * 4 + 1] = vb.y; b_reg[h * 4 + 2] = vb.z; b_reg[h * 4 + 3] = vb.w;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          a_reg[h * 4 + q] = (r < p.m && ka + q < p.k) ? a[r * p.sa0 + (ka + q) * p.sa1] : 0.f;
          b_reg[h * 4 + q] = (kb < p.k && cb + q < p.n) ? b[kb * p.sb0 + (cb + q) * p.sb1] : 0.f;
        }
      }
    }
  };
  auto store_slice = [&](int buf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ea = tid + h * THREADS;
      const int a_row = ea / 4, a_col = (ea % 4) * 4;
      const int b_row = ea / 32, b_col = (ea % 32) * 4;
#pragma unroll
      for (int q = 0; q < 4; ++q) As[buf][a_col + q][a_row] = a_reg[h * 4 + q];
      *reinterpret_cast<float4*>(&Bs[buf][b_row][b_col]) =
          make_float4(b_reg[h * 4 + 0], b_reg[h * 4 + 1], b_reg[h * 4 + 2], b_reg[h * 4 + 3]);
    }
  };

  // Each thread computes rows {ty*4 + i, 64 + ty*4 + i} x cols {tx*4 + j, 64 + tx*4 + j}: two
  // 4-wide halves so that shared-memory reads are float4 and conflict-free across the warp.
  const int ty = tid / 16, tx = tid % 16;
  float acc[TM][TN] = {};
  float ra[TM], rb[TN];

  load_slice(0);
  store_slice(0);
  __syncthreads();
  int buf = 0;
  for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
    const bool has_next = k0 + BK < p.k;
    if (has_next) load_slice(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a_lo = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
      const float4 a_hi = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
      const float4 b_lo = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
      const float4 b_hi = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
      ra[0] = a_lo.x; ra[1] = a_lo.y; ra[2] = a_lo.z; ra[3] = a_lo.w;
      ra[4] = a_hi.x; ra[5] = a_hi.y; ra[6] = a_hi.z; ra[7] = a_hi.w;
      rb[0] = b_lo.x; rb[1] = b_lo.y; rb[2] = b_lo.z; rb[3] = b_lo.w;
      rb[4] = b_hi.x; rb[5] = b_hi.y; rb[6] = b_hi.z; rb[7] = b_hi.w;
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    if (has_next) {
      store_slice(buf ^ 1);  // the other buffer: nobody reads it during this slice
      __syncthreads();
      buf ^= 1;
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    if (r >= p.m) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t cc = col0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
      if (cc < p.n) c[r * p.sc0 + cc * p.sc1] = acc[i][j];
    }
  }
}

bool vec4_ok(const TensorView& a, const TensorView& b, const MatmulArgs& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.sa1 == 1 && p.sb1 == 1 && p.k % 4 == 0 && p.n % 4 == 0 && p.sa0 % 4 == 0 && p.sb0 % 4 == 0 &&
         aligned(a.data) && aligned(b.data);
}

// Tensor-core path: 64x64 block tile, 32 deep, 4 warps each owning a 32x32 tile (2x2 fragments).
constexpr int WM_TILE = 64, WK_TILE = 32, WMMA_THREADS = 128, SKEW = 8;

template <typename T>
__global__ void __launch_bounds__(WMMA_THREADS) wmma_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                            T* __restrict__ c, MatmulArgs p) {
  using namespace nvcuda;
  __shared__ __align__(32) T As[WM_TILE][WK_TILE + SKEW];
  __shared__ __align__(32) T Bs[WK_TILE][WM_TILE + SKEW];
  __shared__ __align__(32) float Cs[WM_TILE][WM_TILE + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * WM_TILE;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * WM_TILE;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < p.k; k0 += WK_TILE) {
    for (int e = tid; e < WM_TILE * WK_TILE; e += WMMA_THREADS) {
      const int r = e / WK_TILE, kk = e % WK_TILE;
      const int64_t gr = row0 + r, gk = k0 + kk;
      As[r][kk] = (gr < p.m && gk < p.k) ? a[gr * p.sa0 + gk * p.sa1] : from_float<T>(0.f);
    }
    for (int e = tid; e < WK_TILE * WM_TILE; e += WMMA_THREADS) {
      const int kk = e / WM_TILE, cc = e % WM_TILE;
      const int64_t gk = k0 + kk, gc = col0 + cc;
      Bs[kk][cc] = (gk < p.k && gc < p.n) ? b[gk * p.sb0 + gc * p.sb1] : from_float<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < WK_TILE; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wr + i * 16][kk], WK_TILE + SKEW);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[kk][wc + j * 16], WM_TILE + SKEW);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wr + i * 16][wc + j * 16], acc[i][j], WM_TILE + 4, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < WM_TILE * WM_TILE; e += WMMA_THREADS) {
    const int r = e / WM_TILE, cc = e % WM_TILE;
    const int64_t gr = row0 + r, gc = col0 + cc;
    if (gr < p.m && gc < p.n) c[gr * p.sc0 + gc * p.sc1] = from_float<T>(Cs[r][cc]);
  }
}

template <typename T>
void launch_wmma(const TensorView& a, const TensorView& b, const TensorView& c, const MatmulArgs& p,
                 cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((p.n + WM_TILE - 1) / WM_TILE), static_cast<unsigned>((p.m + WM_TILE - 1) / WM_TILE));
  wmma_kernel<T><<<grid, WMMA_THREADS, 0, stream>>>(a.ptr<const T>(), b.ptr<const T>(), c.ptr<T>(), p);
  check_launch("matmul (wmma)");
}

}  // namespace

void matmul(const TensorView& a, const TensorView& b, const TensorView& c, uintptr_t stream_handle) {
  check(a.ndim == 2 && b.ndim == 2 && c.ndim == 2, "matmul: expected 2-D tensors");
  check(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1), "matmul: shape mismatch");
  check(a.dtype == b.dtype && a.dtype == c.dtype, "matmul: dtypes differ");
  MatmulArgs p{a.size(0), b.size(1), a.size(1), a.stride(0), a.stride(1), b.stride(0),
               b.stride(1), c.stride(0), c.stride(1)};
  if (p.m == 0 || p.n == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  check_cuda(cudaSetDevice(c.device), "matmul: cudaSetDevice");
  switch (a.dtype) {
    case DType::kFloat32: {
      dim3 grid(static_cast<unsigned>((p.n + BN - 1) / BN), static_cast<unsigned>((p.m + BM - 1) / BM));
      if (vec4_ok(a, b, p)) {
        sgemm_kernel<true><<<grid, THREADS, 0, stream>>>(a.ptr<const float>(), b.ptr<const float>(), c.ptr<float>(), p);
      } else {
        sgemm_kernel<false><<<grid, THREADS, 0, stream>>>(a.ptr<const float>(), b.ptr<const float>(), c.ptr<float>(), p);
      }
      check_launch("matmul (sgemm)");
      return;
    }
    case DType::kFloat16: return launch_wmma<__half>(a, b, c, p, stream);
    case DType::kBFloat16: return launch_wmma<__nv_bfloat16>(a, b, c, p, stream);
    default:
      throw std::invalid_argument(std::string("matmul (CUDA): unsupported dtype ") + dtype_name(a.dtype) +
                                  "; supported: float32, float16, bfloat16");
  }
}

}  // namespace tinyserve::cuda
