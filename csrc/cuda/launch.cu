// Kernel launches with programmatic dependent launch, and the cached device attributes (see
// cuda_utils.cuh).
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {

int& pdl_mode() {
  static int mode = -1;
  return mode;
}

namespace {

bool env_allows_pdl() {
  static const bool allowed = [] {
    const char* v = std::getenv("TINYSERVE_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return allowed;
}

}  // namespace

int device_attribute(int device, cudaDeviceAttr attr) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, static_cast<int>(attr));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  cache.emplace(key, value);
  return value;
}

bool pdl_enabled(int device) {
  const int mode = pdl_mode();
  if (mode == 0 || (mode < 0 && !env_allows_pdl())) return false;
  return device_attribute(device, cudaDevAttrComputeCapabilityMajor) >= 9;
}

void launch_kernel(const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void** args,
                   int device, const char* what, const cudaLaunchAttribute* extra, int num_extra) {
  cudaLaunchAttribute attrs[4];
  int n = 0;
  for (int i = 0; i < num_extra && n < 3; ++i) attrs[n++] = extra[i];
  if (pdl_enabled(device)) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = static_cast<unsigned>(n);
  check_cuda(cudaLaunchKernelExC(&config, func, args), what);
}

void set_programmatic_launch(int mode) { pdl_mode() = mode < 0 ? -1 : (mode > 0 ? 1 : 0); }

bool programmatic_launch_enabled(int device) { return pdl_enabled(device); }

}  // namespace tinyserve::cuda
