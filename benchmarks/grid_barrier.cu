// What one dependency between two phases of a decode step costs, two ways: a grid-wide barrier inside
// one resident kernel (csrc/cuda/weight_stream.cuh's grid_barrier, as the fused MLP uses between its
// phases and a persistent decode kernel would use between every pair of dependent steps), against
// the end of one kernel and the start of the next in a CUDA graph with programmatic dependent launch
// (how a decode step chains its kernels today). Stand-alone (CUDA runtime only, no PyTorch):
//
//     nvcc -arch=sm_90 -O3 -std=c++17 -Icsrc benchmarks/grid_barrier.cu -o /tmp/grid_barrier
//     /tmp/grid_barrier
//
// Grids of one and two blocks of 256 threads per SM (the stream kernels' shape), all resident.
// Barrier: a kernel crossing n = 400 barriers against one crossing none, (t_n - t_0) / n. Kernel
// chain: a graph of n = 400 launches of an empty kernel of that grid (griddepcontrol.wait, then
// launch_dependents), with and without the PDL attribute, t / n. Each figure is the median of 7
// timings of 10 back-to-back runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/weight_stream.cuh"

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

constexpr int kN = 400;  // dependencies per measurement

// n grid barriers, each on its own word (two apart, as fused_mlp.cu spaces them).
__global__ void __launch_bounds__(tinyserve::cuda::stream::kThreads, 2) barriers(unsigned* counters, int n) {
  for (int i = 0; i < n; ++i) tinyserve::cuda::stream::grid_barrier(counters + 2 * i);
}

__global__ void __launch_bounds__(tinyserve::cuda::stream::kThreads, 2) empty_step() {
  tinyserve::cuda::pdl_wait();
  tinyserve::cuda::pdl_launch_dependents();
}

template <typename Fn>
double median_us(Fn run) {
  cudaEvent_t e0, e1;
  ck(cudaEventCreate(&e0), "event");
  ck(cudaEventCreate(&e1), "event");
  run();  // warm-up
  std::vector<double> t;
  for (int rep = 0; rep < 7; ++rep) {
    ck(cudaEventRecord(e0), "record");
    for (int i = 0; i < 10; ++i) run();
    ck(cudaEventRecord(e1), "record");
    ck(cudaEventSynchronize(e1), "sync");
    float ms = 0.f;
    ck(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
    t.push_back(ms * 1e3 / 10);
  }
  ck(cudaEventDestroy(e0), "event");
  ck(cudaEventDestroy(e1), "event");
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// A graph of kN launches of empty_step on `blocks` blocks, with or without PDL between them.
cudaGraphExec_t chain(int blocks, bool pdl) {
  cudaStream_t s;
  ck(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  cudaGraph_t g;
  ck(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
  for (int i = 0; i < kN; ++i) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(tinyserve::cuda::stream::kThreads);
    cfg.stream = s;
    cfg.attrs = &attr;
    cfg.numAttrs = pdl ? 1 : 0;
    ck(cudaLaunchKernelEx(&cfg, empty_step), "launch");
  }
  ck(cudaStreamEndCapture(s, &g), "end capture");
  cudaGraphExec_t exec;
  ck(cudaGraphInstantiate(&exec, g, 0), "instantiate");
  ck(cudaGraphDestroy(g), "graph");
  ck(cudaStreamDestroy(s), "stream");
  return exec;
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "device");
  unsigned* counters = nullptr;
  ck(cudaMalloc(&counters, 2 * kN * sizeof(unsigned)), "malloc");
  ck(cudaMemset(counters, 0, 2 * kN * sizeof(unsigned)), "memset");
  std::printf("%s, %d SMs; us per dependency\n\n", prop.name, prop.multiProcessorCount);
  std::printf("| blocks | grid barrier | kernel chain, PDL | kernel chain, no PDL |\n|---|---|---|---|\n");
  for (int per_sm : {1, 2}) {
    const int blocks = per_sm * prop.multiProcessorCount;
    const dim3 grid(blocks), block(tinyserve::cuda::stream::kThreads);
    const double t0 = median_us([&] { barriers<<<grid, block>>>(counters, 0); });
    const double tn = median_us([&] { barriers<<<grid, block>>>(counters, kN); });
    ck(cudaGetLastError(), "barriers");
    double chained[2];
    for (int pdl = 0; pdl < 2; ++pdl) {
      cudaGraphExec_t exec = chain(blocks, pdl == 1);
      chained[pdl] = median_us([&] { ck(cudaGraphLaunch(exec, 0), "graph launch"); }) / kN;
      ck(cudaGraphExecDestroy(exec), "graph exec");
    }
    std::printf("| %d (%d a SM) | %.2f | %.2f | %.2f |\n", blocks, per_sm, (tn - t0) / kN, chained[1], chained[0]);
  }
  ck(cudaFree(counters), "free");
  return 0;
}
