// Small helpers shared by the CUDA kernels: error checks and dtype conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tinyserve::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Call right after a launch: reports bad launch configurations at once (asynchronous faults are
// reported by the next synchronising call, as with any CUDA library).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T's precision, as a float (the value a PyTorch op in dtype T would store).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}
template <>
__device__ __forceinline__ float round_to<float>(float x) {
  return x;
}

// The 8 values of a 16-byte vector of T, as floats, and back (rounded to T).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const T* t = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = to_float<T>(t[j]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  T* t = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) t[j] = from_float<T>(f[j]);
  return v;
}

// Whether a pointer allows 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// cudaDeviceGetAttribute(attr, device), cached per (device, attribute): the kernels' launch plans
// read SM counts, shared-memory and L2 sizes and compute capabilities on every call.
int device_attribute(int device, cudaDeviceAttr attr);

// Make `device` current for the launches that follow (skips the driver call when it already is).
inline void use_device(int device, const char* op) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), op);
  if (current != device) check_cuda(cudaSetDevice(device), op);
}

// The asm of load16, for one load instruction (string literal) of four u32 registers.
#define TINYSERVE_PREDICATED_LOAD16(LOAD, v, ptr, valid)                 \
  asm volatile(                                                          \
      "{\n"                                                              \
      "  .reg .pred p;\n"                                                \
      "  setp.ne.b32 p, %5, 0;\n"                                        \
      "  mov.b32 %0, 0;\n"                                               \
      "  mov.b32 %1, 0;\n"                                               \
      "  mov.b32 %2, 0;\n"                                               \
      "  mov.b32 %3, 0;\n"                                               \
      "  @p " LOAD " {%0, %1, %2, %3}, [%4];\n"                          \
      "}\n"                                                              \
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)                       \
      : "l"(ptr), "r"(static_cast<int>(valid)))

// 16 bytes through the read-only path, zeros when !valid (nothing is read). Predicated in PTX, so
// no branch splits a run of loads. kStream: not kept in L1 (a weight, read once); otherwise cached
// (an activation every block of the SM reads). Only for data no kernel of the step writes.
template <bool kStream>
__device__ __forceinline__ uint4 load16(const void* ptr, bool valid) {
  uint4 v;
  if constexpr (kStream) {
    TINYSERVE_PREDICATED_LOAD16("ld.global.nc.L1::no_allocate.v4.u32", v, ptr, valid);
  } else {
    TINYSERVE_PREDICATED_LOAD16("ld.global.nc.v4.u32", v, ptr, valid);
  }
  return v;
}

#undef TINYSERVE_PREDICATED_LOAD16

// ---- programmatic dependent launch (PDL, sm_90+) ------------------------------------------------
//
// A kernel launched with PDL may start while the kernel before it in the stream is still running:
// its blocks become resident as soon as every block of that kernel has called
// griddepcontrol.launch_dependents (or exited). Decode steps are chains of short kernels, so this
// hides each launch and lets a GEMV pull its weight into L2 while its predecessor finishes.
//
// The rules every kernel launched through launch_kernel follows:
//  - pdl_wait() before reading anything an earlier kernel wrote and before writing any global
//    memory; before any early return too, so that a kernel's completion implies its predecessor's
//    (a later kernel only waits for the one right before it). Only reads of data no kernel of the
//    step writes (weights) may come before it.
//  - pdl_launch_dependents() once the kernel's own waiting is done (right after pdl_wait()).
// Both are no-ops when a kernel is launched without PDL or built for an older architecture.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether kernels are launched with PDL: -1 follows the environment (TINYSERVE_PDL=0 turns it
// off), 0 off, 1 on where the device supports it. Set through set_programmatic_launch().
int& pdl_mode();

// PDL for launches on `device` now: the mode allows it and the device is sm_90+.
bool pdl_enabled(int device);

// cudaLaunchKernelExC with PDL when pdl_enabled(device), plus `extra` attributes (e.g. a cluster
// shape). `args` as for cudaLaunchKernel.
void launch_kernel(const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void** args,
                   int device, const char* what, const cudaLaunchAttribute* extra = nullptr, int num_extra = 0);

}  // namespace tinyserve::cuda
