// The decode stream kernels' weight streaming against a plain read of the same bytes, per product
// of a decode layer at one token row. Stand-alone (CUDA runtime only, no PyTorch):
//
//     nvcc -arch=sm_90 -O3 -std=c++17 -Icsrc benchmarks/weight_stream_bw.cu -o /tmp/weight_stream_bw
//     /tmp/weight_stream_bw
//
// "stream" is csrc/cuda/weight_stream.cuh itself (RowStream, run_stream, stage_rows, the launch
// shape of two blocks of 8 warps per SM) at the ring depth each product has in fused_mlp.cu and
// fused_norm_linear: gate/up as pairs of rows i and I + i, the others one row an item. The input row
// is staged from global memory as the kernels stage theirs; the norms, SiLU and the grid barriers
// are left out. "plain read" is the baseline: grid-stride 16-byte loads, 4 x 512 threads per SM,
// four loads in flight per thread, the words XORed into a sink. Each figure is the median over 5
// timings of 20 back-to-back launches, every launch on its own weights, rotated through 2 GiB so
// that none comes from L2. One line per product, then the card's copy bandwidth (read + write).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/weight_stream.cuh"

namespace {

using namespace tinyserve::cuda;
using namespace tinyserve::cuda::stream;
using T = __nv_bfloat16;

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// y[j + r * items] = W[j + r * items] . x for the items j of this warp (kRows rows each).
template <int kRows, int kDepth>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    stream_kernel(const T* w, const T* x, T* y, int64_t items, int64_t k) {
  extern __shared__ __align__(16) float s_x[];
  const WarpSlot me = warp_slot();
  const RowStream<T, kRows> ws(w, k, items, me.index, me.count, items);
  uint4 buf[kDepth][kRows][kBatch];
  ws.prime(me.lane, buf);
  stage_rows<T, 1>(s_x, x, 1, k);
  __syncthreads();
  run_stream<kDepth, 1>(ws, buf, me.lane, s_x, 1, [&](int64_t j, const float (&acc)[kRows][1]) {
    if (me.lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) y[j + r * items] = from_float<T>(acc[r][0]);
    }
  });
}

__global__ void plain_read_kernel(const uint4* p, int64_t n, unsigned* sink) {
  unsigned a = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 v0 = load16<true>(p + i, true), v1 = load16<true>(p + i + stride, true);
    const uint4 v2 = load16<true>(p + i + 2 * stride, true), v3 = load16<true>(p + i + 3 * stride, true);
    a ^= v0.x ^ v1.y ^ v2.z ^ v3.w;
  }
  for (; i < n; i += stride) a ^= load16<true>(p + i, true).x;
  if (a == 0x9e3779b9u) *sink = a;  // keeps the loads; practically never taken
}

struct Bench {
  unsigned char* pool = nullptr;
  size_t pool_bytes = size_t{2} << 30;
  T *x = nullptr, *y = nullptr;
  unsigned* sink = nullptr;
  int sms = 0;
  cudaEvent_t e0{}, e1{};
};

// Microseconds per launch of launch(weights), weights rotated through the pool.
template <typename Launch>
double time_launches(Bench& b, size_t bytes, Launch launch) {
  constexpr int kPerTiming = 20, kTimings = 5;
  const size_t buffers = std::max<size_t>(2, b.pool_bytes / bytes);
  std::vector<float> per_launch;
  for (int r = 0; r <= kTimings; ++r) {  // timing 0 is a warm-up
    ck(cudaEventRecord(b.e0), "event");
    for (int i = 0; i < kPerTiming; ++i) launch(b.pool + ((r * kPerTiming + i) % buffers) * bytes);
    ck(cudaEventRecord(b.e1), "event");
    ck(cudaEventSynchronize(b.e1), "launches");
    float ms = 0.f;
    ck(cudaEventElapsedTime(&ms, b.e0, b.e1), "event");
    if (r > 0) per_launch.push_back(ms * 1e3f / kPerTiming);
  }
  ck(cudaGetLastError(), "kernel");
  std::sort(per_launch.begin(), per_launch.end());
  return per_launch[per_launch.size() / 2];
}

template <int kRows, int kDepth>
void product(Bench& b, const char* model, const char* name, int64_t n, int64_t k) {
  const size_t bytes = static_cast<size_t>(n * k) * sizeof(T);
  const int64_t items = n / kRows;
  auto kernel = stream_kernel<kRows, kDepth>;
  const int smem = static_cast<int>(k * sizeof(float));
  ck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "smem");
  const double plain = time_launches(b, bytes, [&](const unsigned char* w) {
    plain_read_kernel<<<b.sms * 4, 512>>>(reinterpret_cast<const uint4*>(w), bytes / 16, b.sink);
  });
  const double streamed = time_launches(b, bytes, [&](const unsigned char* w) {
    kernel<<<b.sms * kBlocksPerSm, kThreads, smem>>>(reinterpret_cast<const T*>(w), b.x, b.y, items, k);
  });
  std::printf("| %s | %s | %lld x %lld | %.1f | %.1f us (%.2f TB/s) | %.1f us (%.2f TB/s) | %.2f |\n", model, name,
              static_cast<long long>(n), static_cast<long long>(k), bytes / 1e6, plain, bytes / plain / 1e6,
              streamed, bytes / streamed / 1e6, streamed / plain);
}

}  // namespace

int main() {
  Bench b;
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "device");
  b.sms = prop.multiProcessorCount;
  ck(cudaMalloc(&b.pool, b.pool_bytes), "malloc");
  ck(cudaMemset(b.pool, 0x3c, b.pool_bytes), "memset");  // 0x3c3c: a normal bf16 (about 0.0115)
  ck(cudaMalloc(&b.x, 16384 * sizeof(T)), "malloc");
  ck(cudaMemset(b.x, 0x3c, 16384 * sizeof(T)), "memset");
  ck(cudaMalloc(&b.y, 65536 * sizeof(T)), "malloc");
  ck(cudaMalloc(&b.sink, sizeof(unsigned)), "malloc");
  ck(cudaEventCreate(&b.e0), "event");
  ck(cudaEventCreate(&b.e1), "event");
  std::printf("%s, %d SMs; one token row, bf16\n\n", prop.name, b.sms);
  std::printf("| model | product | N x K | MB | plain read | stream | stream / plain |\n|---|---|---|---|---|---|---|\n");
  // Ring depths as in fused_mlp.cu (kUpDepth 2 for gate/up pairs, kDownDepth 3 for o and down) and
  // fused_mlp.cu's fused_norm_linear (kLinearDepth 4 for qkv).
  product<1, 4>(b, "Llama-3-8B", "qkv", 6144, 4096);
  product<1, 3>(b, "Llama-3-8B", "o", 4096, 4096);
  product<2, 2>(b, "Llama-3-8B", "gate/up", 28672, 4096);
  product<1, 3>(b, "Llama-3-8B", "down", 4096, 14336);
  product<1, 4>(b, "Qwen3-0.6B", "qkv", 4096, 1024);
  product<1, 3>(b, "Qwen3-0.6B", "o", 1024, 2048);
  product<2, 2>(b, "Qwen3-0.6B", "gate/up", 6144, 1024);
  product<1, 3>(b, "Qwen3-0.6B", "down", 1024, 3072);
  const size_t half = b.pool_bytes / 2;
  const double copy_us = time_launches(b, half, [&](const unsigned char*) {
    ck(cudaMemcpyAsync(b.pool + half, b.pool, half, cudaMemcpyDeviceToDevice), "copy");
  });
  std::printf("\ncopy bandwidth (1 GiB device to device, read + write): %.2f TB/s\n", 2.0 * half / copy_us / 1e6);
  return 0;
}
