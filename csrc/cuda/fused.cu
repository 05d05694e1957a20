// The fused decoder-layer ops on CUDA: RMSNorm (optionally with the residual add fused in), RoPE
// (optionally with Qwen3's per-head q/k RMSNorm fused in) and SiLU-and-mul. Each replaces several
// PyTorch elementwise/reduce launches with one kernel. They are launch- and latency-bound at decode
// sizes, so the aim is one pass with 16-byte accesses and no host work: nothing is read back, so
// they can be captured in CUDA graphs.
//
// Rounding follows the unfused PyTorch formulas exactly (every product stored in the tensor dtype
// is rounded there, __fmul_rn keeps float32 products from being fused into FMAs); only the order
// of a row's sum of squares and rsqrtf's last bit differ.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace tinyserve::cuda {
namespace {

// ---- helpers -------------------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// weight * T(x * inv): transformers' RMSNorm order (normalise in float32, round, then scale).
template <typename T>
__device__ __forceinline__ float norm_value(T x, T w, float inv) {
  return __fmul_rn(to_float<T>(w), round_to<T>(to_float<T>(x) * inv));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x / 32;
  v = lane < num_warps ? partial[lane] : 0.f;
  return warp_sum(v);
}

// rsqrt(mean(h[0:n]^2) + eps) in float32 over the block (every thread of it must call; every
// thread gets the result).
template <typename T>
__device__ float block_inv_rms(const T* __restrict__ h, int n, float eps) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float f = to_float<T>(h[i]);
    ss += f * f;
  }
  return rsqrtf(block_sum(ss) / static_cast<float>(n) + eps);
}

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access

int round_up(int64_t x, int to) { return static_cast<int>((x + to - 1) / to * to); }

// Calls fn(T{}, std::integral_constant<int, N>{}) for the view's dtype, N = 16-byte vector width
// when `vec`, else 1.
template <typename Fn>
void dispatch(DType dtype, bool vec, const char* op, Fn&& fn) {
  auto with_width = [&](auto zero) {
    using T = decltype(zero);
    if (vec) {
      fn(zero, std::integral_constant<int, kVec<T>>{});
    } else {
      fn(zero, std::integral_constant<int, 1>{});
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_width(float{});
    case DType::kFloat16: return with_width(__half{});
    case DType::kBFloat16: return with_width(__nv_bfloat16{});
    default:
      throw std::invalid_argument(std::string(op) + " (CUDA): unsupported dtype " + dtype_name(dtype) +
                                  "; supported: float32, float16, bfloat16");
  }
}

// ---- RMSNorm ------------------------------------------------------------------------------------
struct NormParams {
  const void* x;
  void* residual;  // nullptr: plain rms_norm
  const void* weight;
  void* out;
  int64_t x_s0, x_s1, r_s0, r_s1, o_s0, o_s1;  // element strides of the row index (outer, inner)
  int64_t inner;                               // rows per outer index: 3-D num_heads, 2-D 1
  int hidden;
  float eps;
};

// One block per row. Pass 1: (residual += x,) sum of squares; pass 2 re-reads the row (an L1/L2
// hit) and writes weight * T(x * inv). Each thread owns the same units in both passes, so out may
// alias x and residual is read back only by the thread that wrote it.
template <typename T, int N, bool kAdd>
__global__ void rms_norm_kernel(const NormParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int64_t outer = row / p.inner, inner = row - outer * p.inner;
  const T* x = static_cast<const T*>(p.x) + outer * p.x_s0 + inner * p.x_s1;
  T* res = kAdd ? static_cast<T*>(p.residual) + outer * p.r_s0 + inner * p.r_s1 : nullptr;
  T* out = static_cast<T*>(p.out) + outer * p.o_s0 + inner * p.o_s1;
  const T* w = static_cast<const T*>(p.weight);
  const int units = p.hidden / N;

  float ss = 0.f;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    Vec<T, N> v = load<T, N>(x + u * N);
    if constexpr (kAdd) {
      const Vec<T, N> r = load<T, N>(res + u * N);
#pragma unroll
      for (int j = 0; j < N; ++j) v.v[j] = from_float<T>(to_float<T>(v.v[j]) + to_float<T>(r.v[j]));
      store<T, N>(res + u * N, v);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = to_float<T>(v.v[j]);
      ss += f * f;
    }
  }
  const float inv = rsqrtf(block_sum(ss) / static_cast<float>(p.hidden) + p.eps);

  const T* src = kAdd ? res : x;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const Vec<T, N> v = load<T, N>(src + u * N);
    const Vec<T, N> wv = load<T, N>(w + u * N);
    Vec<T, N> o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(norm_value<T>(v.v[j], wv.v[j], inv));
    store<T, N>(out + u * N, o);
  }
}

// ---- RoPE (+ q/k RMSNorm) ---------------------------------------------------------------------
struct RopeParams {
  void* query;
  void* key;
  const void* cache;
  const void* positions;
  const void* q_weight;  // nullptr: no q/k norm
  const void* k_weight;
  int64_t q_s0, q_s1, k_s0, k_s1, cache_s0, pos_stride, max_position;
  int num_heads, num_kv_heads, head_dim, half, group;
  bool pos64;
  float eps;
  // KV-cache write (key_cache == nullptr: none). Strides in elements.
  const void* value;
  void* key_cache;
  void* value_cache;
  const void* slots;
  int64_t v_s0, v_s1, kc_block, kc_slot, kc_head, vc_block, vc_slot, vc_head, slot_stride, num_slots, block_size;
  bool slots64;
  // Row scaling by an RMSNorm folded into the qkv product (rms_of == nullptr: none; ops.h).
  const void* rms_of;
  int64_t r_s0;
  int rms_hidden;
  float rms_eps;
};

// Where token t's head h row lands in a paged cache, or nullptr for padding / an out-of-range slot
// (skipped rather than written wild: nothing may be read back to the host here).
template <typename T>
__device__ __forceinline__ T* cache_row(const RopeParams& p, void* cache, int64_t t, int h, int64_t s_block,
                                        int64_t s_slot, int64_t s_head) {
  const int64_t slot = p.slots64 ? static_cast<const int64_t*>(p.slots)[t * p.slot_stride]
                                 : static_cast<const int32_t*>(p.slots)[t * p.slot_stride];
  if (slot < 0 || slot >= p.num_slots) return nullptr;
  return static_cast<T*>(cache) + slot / p.block_size * s_block + slot % p.block_size * s_slot + h * s_head;
}

// A group of p.group threads (a power of two <= 32, inside one warp) per (token, head); blockIdx.x
// is the token, blockIdx.y a range of heads (query heads, then key heads, then - when the KV cache
// is written - value heads, which are only copied). A unit is N pairs (i, i + half) or N
// pass-through dims past rotary_dim. Tokens whose position lies outside the cos/sin table are left
// untouched (the host never sees positions, so it cannot raise); their key still goes to the cache
// as it is, as reshape_and_cache after the rotation would have it.
template <typename T, int N, bool kNorm>
__global__ void rotary_kernel(const RopeParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int g = p.group;
  const int lane = threadIdx.x & (g - 1);
  const int head = blockIdx.y * (blockDim.x / g) + threadIdx.x / g;
  const int64_t t = blockIdx.x;
  const bool valid = head < p.num_heads + p.num_kv_heads;
  const bool is_q = head < p.num_heads;
  const bool caching = p.key_cache != nullptr;
  const int head_units = p.head_dim / N;
  T* x = is_q ? static_cast<T*>(p.query) + t * p.q_s0 + head * p.q_s1
              : static_cast<T*>(p.key) + t * p.k_s0 + (head - p.num_heads) * p.k_s1;
  // A folded input norm: this token's q and k heads are scaled in place first (each lane its own
  // units; the warp syncs before lanes read each other's), its v heads where they are copied.
  float row_inv = 1.f;
  const bool scaled = p.rms_of != nullptr;
  if (scaled) {
    row_inv = block_inv_rms(static_cast<const T*>(p.rms_of) + t * p.r_s0, p.rms_hidden, p.rms_eps);
    if (valid) {
      for (int u = lane; u < head_units; u += g) {
        Vec<T, N> a = load<T, N>(x + u * N);
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = from_float<T>(to_float<T>(a.v[j]) * row_inv);
        store<T, N>(x + u * N, a);
      }
    }
    __syncwarp();
  }
  const int rot_units = p.half / N, rest_units = (p.head_dim - 2 * p.half) / N;
  // Issued first: its latency overlaps the norm's reduction.
  const int64_t pos = p.pos64 ? static_cast<const int64_t*>(p.positions)[t * p.pos_stride]
                              : static_cast<const int32_t*>(p.positions)[t * p.pos_stride];

  float inv = 1.f;
  if constexpr (kNorm) {
    float ss = 0.f;
    if (valid) {
      for (int u = lane; u < rot_units; u += g) {
        const Vec<T, N> a = load<T, N>(x + u * N), b = load<T, N>(x + p.half + u * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float fa = to_float<T>(a.v[j]), fb = to_float<T>(b.v[j]);
          ss += fa * fa + fb * fb;
        }
      }
      for (int u = lane; u < rest_units; u += g) {
        const Vec<T, N> a = load<T, N>(x + 2 * p.half + u * N);
#pragma unroll
        for (int j = 0; j < N; ++j) ss += to_float<T>(a.v[j]) * to_float<T>(a.v[j]);
      }
    }
    // Every lane of the warp takes part (invalid heads add 0); xor offsets < g stay in the group.
    for (int o = g / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    inv = rsqrtf(ss / static_cast<float>(p.head_dim) + p.eps);
  }
  if (!valid) {
    const int vh = head - p.num_heads - p.num_kv_heads;
    if (!caching || vh >= p.num_kv_heads) return;
    T* dst = cache_row<T>(p, p.value_cache, t, vh, p.vc_block, p.vc_slot, p.vc_head);
    T* src = const_cast<T*>(static_cast<const T*>(p.value)) + t * p.v_s0 + vh * p.v_s1;
    if (scaled) {  // v in place too (it is written even where the slot is padding)
      for (int u = lane; u < head_units; u += g) {
        Vec<T, N> a = load<T, N>(src + u * N);
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = from_float<T>(to_float<T>(a.v[j]) * row_inv);
        store<T, N>(src + u * N, a);
        if (dst != nullptr) store<T, N>(dst + u * N, a);
      }
      return;
    }
    if (dst == nullptr) return;
    for (int u = lane; u < head_units; u += g) store<T, N>(dst + u * N, load<T, N>(src + u * N));
    return;
  }
  T* kc = nullptr;  // this key head's cache row
  if (caching && !is_q) kc = cache_row<T>(p, p.key_cache, t, head - p.num_heads, p.kc_block, p.kc_slot, p.kc_head);
  if (pos < 0 || pos >= p.max_position) {
    if (kc != nullptr) {
      for (int u = lane; u < head_units; u += g) store<T, N>(kc + u * N, load<T, N>(x + u * N));
    }
    return;
  }
  const T* cos = static_cast<const T*>(p.cache) + pos * p.cache_s0;
  const T* sin = cos + p.half;
  const T* w = static_cast<const T*>(is_q ? p.q_weight : p.k_weight);

  for (int u = lane; u < rot_units; u += g) {
    const int i = u * N;
    Vec<T, N> x1 = load<T, N>(x + i), x2 = load<T, N>(x + p.half + i);
    const Vec<T, N> c = load<T, N>(cos + i), s = load<T, N>(sin + i);
    Vec<T, N> w1, w2;
    if constexpr (kNorm) {
      w1 = load<T, N>(w + i);
      w2 = load<T, N>(w + p.half + i);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float a = to_float<T>(x1.v[j]), b = to_float<T>(x2.v[j]);
      if constexpr (kNorm) {
        a = round_to<T>(norm_value<T>(x1.v[j], w1.v[j], inv));
        b = round_to<T>(norm_value<T>(x2.v[j], w2.v[j], inv));
      }
      const float fc = to_float<T>(c.v[j]), fs = to_float<T>(s.v[j]);
      // x1*cos - x2*sin and x2*cos + x1*sin, each product rounded to T as PyTorch stores it.
      x1.v[j] = from_float<T>(__fsub_rn(round_to<T>(__fmul_rn(a, fc)), round_to<T>(__fmul_rn(b, fs))));
      x2.v[j] = from_float<T>(__fadd_rn(round_to<T>(__fmul_rn(b, fc)), round_to<T>(__fmul_rn(a, fs))));
    }
    store<T, N>(x + i, x1);
    store<T, N>(x + p.half + i, x2);
    if (kc != nullptr) {
      store<T, N>(kc + i, x1);
      store<T, N>(kc + p.half + i, x2);
    }
  }
  T* rest_out = x + 2 * p.half;
  if constexpr (kNorm) {
    const T* w_rest = w + 2 * p.half;
    for (int u = lane; u < rest_units; u += g) {
      const Vec<T, N> a = load<T, N>(rest_out + u * N), wv = load<T, N>(w_rest + u * N);
      Vec<T, N> o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(norm_value<T>(a.v[j], wv.v[j], inv));
      store<T, N>(rest_out + u * N, o);
      if (kc != nullptr) store<T, N>(kc + 2 * p.half + u * N, o);
    }
  } else if (kc != nullptr) {  // pass-through dims, unchanged in place, still go to the cache
    for (int u = lane; u < rest_units; u += g) store<T, N>(kc + 2 * p.half + u * N, load<T, N>(rest_out + u * N));
  }
}

// ---- SiLU and mul -------------------------------------------------------------------------------
constexpr int kSiluThreads = 128;

struct SiluParams {
  const void* x;
  void* out;
  const void* rms_of;  // nullptr: x is the plain [gate | up] product (ops.h)
  int64_t x_s0, out_s0, r_s0;
  int d, hidden;
  float eps;
};

// blockIdx.x: token; blockIdx.y * blockDim.x + threadIdx.x: unit of N output elements.
template <typename T, int N>
__global__ void __launch_bounds__(kSiluThreads) silu_and_mul_kernel(const SiluParams p) {
  pdl_wait();
  pdl_launch_dependents();
  float inv = 1.f;
  const bool scaled = p.rms_of != nullptr;
  if (scaled) inv = block_inv_rms(static_cast<const T*>(p.rms_of) + blockIdx.x * p.r_s0, p.hidden, p.eps);
  const int u = blockIdx.y * blockDim.x + threadIdx.x;
  if (u >= p.d / N) return;
  const T* gate = static_cast<const T*>(p.x) + blockIdx.x * p.x_s0 + u * N;
  const Vec<T, N> gv = load<T, N>(gate), uv = load<T, N>(gate + p.d);
  Vec<T, N> o;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float g = to_float<T>(gv.v[j]), up = to_float<T>(uv.v[j]);
    if (scaled) {  // the product of the normalised row, as it would have been stored
      g = round_to<T>(g * inv);
      up = round_to<T>(up * inv);
    }
    // F.silu(gate) is stored in T before the product, as SiluAndMul's PyTorch formula does.
    const float s = round_to<T>(g / (1.f + expf(-g)));
    o.v[j] = from_float<T>(__fmul_rn(s, up));
  }
  store<T, N>(static_cast<T*>(p.out) + blockIdx.x * p.out_s0 + u * N, o);
}

// The row strides of a 2-D or 3-D view: (outer, inner) with inner = 0 for 2-D.
void row_strides(const TensorView& t, int64_t* s0, int64_t* s1) {
  *s0 = t.stride(0);
  *s1 = t.ndim == 3 ? t.stride(1) : 0;
}

}  // namespace

void rms_norm(const RmsNormArgs& a, uintptr_t stream_handle) {
  check_rms_norm_args(a);
  const bool add = a.residual.data != nullptr;
  check(a.x.size(-1) <= INT32_MAX, "rms_norm: rows too long");
  NormParams p{};
  p.x = a.x.data;
  p.residual = add ? a.residual.data : nullptr;
  p.weight = a.weight.data;
  p.out = a.out.data;
  row_strides(a.x, &p.x_s0, &p.x_s1);
  row_strides(a.out, &p.o_s0, &p.o_s1);
  if (add) row_strides(a.residual, &p.r_s0, &p.r_s1);
  p.inner = a.x.ndim == 3 ? a.x.size(1) : 1;
  p.hidden = static_cast<int>(a.x.size(-1));
  p.eps = a.eps;
  const int64_t num_rows = a.x.size(0) * p.inner;
  if (num_rows == 0 || p.hidden == 0) return;
  check(num_rows <= INT32_MAX, "rms_norm: too many rows for one launch");

  const int vec_width = 16 / static_cast<int>(dtype_size(a.x.dtype));
  bool vec = p.hidden % vec_width == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.out) &&
             (!add || aligned16(p.residual));
  for (int64_t s : {p.x_s0, p.x_s1, p.o_s0, p.o_s1, p.r_s0, p.r_s1}) vec = vec && s % vec_width == 0;
  const int units = p.hidden / (vec ? vec_width : 1);
  const int threads = std::min(1024, std::max(32, round_up(units, 32)));

  check_cuda(cudaSetDevice(a.x.device), "rms_norm: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned>(num_rows);
  dispatch(a.x.dtype, vec, "rms_norm", [&](auto zero, auto width) {
    using T = decltype(zero);
    constexpr int N = decltype(width)::value;
    const void* kernel = add ? reinterpret_cast<const void*>(&rms_norm_kernel<T, N, true>)
                             : reinterpret_cast<const void*>(&rms_norm_kernel<T, N, false>);
    void* args[] = {&p};
    launch_kernel(kernel, dim3(grid), dim3(threads), 0, stream, args, a.x.device, "rms_norm_kernel launch");
  });
}

void rotary_embedding(const RotaryArgs& a, uintptr_t stream_handle) {
  check_rotary_args(a);
  const TensorView &q = a.query, &k = a.key, &cache = a.cos_sin_cache;
  const bool norm = a.q_norm_weight.data != nullptr;
  const bool caching = a.key_cache.data != nullptr;
  const int64_t num_tokens = q.size(0), total_heads = q.size(1) + k.size(1) * (caching ? 2 : 1);
  if (num_tokens == 0 || total_heads == 0) return;
  check(num_tokens <= INT32_MAX && q.size(2) <= INT32_MAX && total_heads <= INT32_MAX,
        "rotary_embedding: too large for one launch");
  RopeParams p{};
  p.query = q.data;
  p.key = k.data;
  p.cache = cache.data;
  p.positions = a.positions.data;
  p.q_weight = norm ? a.q_norm_weight.data : nullptr;
  p.k_weight = norm ? a.k_norm_weight.data : nullptr;
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.k_s0 = k.stride(0);
  p.k_s1 = k.stride(1);
  p.cache_s0 = cache.stride(0);
  p.pos_stride = a.positions.stride(0);
  p.max_position = cache.size(0);
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.half = static_cast<int>(a.rotary_dim / 2);
  p.pos64 = a.positions.dtype == DType::kInt64;
  p.eps = a.eps;
  p.rms_of = a.rms_of.data;
  if (p.rms_of != nullptr) {
    check(a.rms_of.size(1) <= INT32_MAX, "rotary_embedding: rms_of rows too long");
    p.r_s0 = a.rms_of.stride(0);
    p.rms_hidden = static_cast<int>(a.rms_of.size(1));
    p.rms_eps = a.rms_eps;
  }
  if (caching) {
    const TensorView &v = a.value, &kc = a.key_cache, &vc = a.value_cache;
    p.value = v.data;
    p.key_cache = kc.data;
    p.value_cache = vc.data;
    p.slots = a.slot_mapping.data;
    p.slots64 = a.slot_mapping.dtype == DType::kInt64;
    p.slot_stride = a.slot_mapping.stride(0);
    p.v_s0 = v.stride(0);
    p.v_s1 = v.stride(1);
    p.kc_block = kc.stride(0);
    p.kc_slot = kc.stride(1);
    p.kc_head = kc.stride(2);
    p.vc_block = vc.stride(0);
    p.vc_slot = vc.stride(1);
    p.vc_head = vc.stride(2);
    p.block_size = kc.size(1);
    p.num_slots = kc.size(0) * kc.size(1);
  }

  const int vw = 16 / static_cast<int>(dtype_size(q.dtype));
  bool vec = p.half % vw == 0 && aligned16(p.query) && aligned16(p.key) && aligned16(p.cache);
  for (int64_t s : {p.q_s0, p.q_s1, p.k_s0, p.k_s1, p.cache_s0}) vec = vec && s % vw == 0;
  if (norm) vec = vec && p.head_dim % vw == 0 && aligned16(p.q_weight) && aligned16(p.k_weight);
  if (caching) {
    // Whole heads are copied in units too.
    vec = vec && p.head_dim % vw == 0 && aligned16(p.value) && aligned16(p.key_cache) && aligned16(p.value_cache);
    for (int64_t s : {p.v_s0, p.v_s1, p.kc_block, p.kc_slot, p.kc_head, p.vc_block, p.vc_slot, p.vc_head}) {
      vec = vec && s % vw == 0;
    }
  }
  const int n = vec ? vw : 1;
  const int units = p.half / n + (norm ? (p.head_dim - 2 * p.half) / n : 0);
  p.group = 1;
  while (p.group < 32 && p.group < units) p.group *= 2;
  const int threads = std::min(256, round_up(total_heads * p.group, 32));
  const int heads_per_block = threads / p.group;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>((total_heads + heads_per_block - 1) / heads_per_block));

  check_cuda(cudaSetDevice(q.device), "rotary_embedding: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  dispatch(q.dtype, vec, "rotary_embedding", [&](auto zero, auto width) {
    using T = decltype(zero);
    constexpr int N = decltype(width)::value;
    const void* kernel = norm ? reinterpret_cast<const void*>(&rotary_kernel<T, N, true>)
                              : reinterpret_cast<const void*>(&rotary_kernel<T, N, false>);
    void* args[] = {&p};
    launch_kernel(kernel, grid, dim3(threads), 0, stream, args, q.device, "rotary_kernel launch");
  });
}

void silu_and_mul(const SiluAndMulArgs& a, uintptr_t stream_handle) {
  check_silu_and_mul_args(a);
  const int64_t num_tokens = a.out.size(0), d = a.out.size(1);
  if (num_tokens == 0 || d == 0) return;
  check(num_tokens <= INT32_MAX && d <= INT32_MAX / 2, "silu_and_mul: too large for one launch");
  check(a.rms_of.data == nullptr || a.rms_of.size(1) <= INT32_MAX, "silu_and_mul: rms_of rows too long");
  const int vw = 16 / static_cast<int>(dtype_size(a.x.dtype));
  const bool vec = d % vw == 0 && aligned16(a.x.data) && aligned16(a.out.data) && a.x.stride(0) % vw == 0 &&
                   a.out.stride(0) % vw == 0;
  const int64_t units = d / (vec ? vw : 1);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>((units + kSiluThreads - 1) / kSiluThreads));
  check(grid.y <= 65535, "silu_and_mul: rows too long for one launch");

  check_cuda(cudaSetDevice(a.x.device), "silu_and_mul: cudaSetDevice");
  cudaStream_t stream = as_stream(stream_handle);
  dispatch(a.x.dtype, vec, "silu_and_mul", [&](auto zero, auto width) {
    using T = decltype(zero);
    constexpr int N = decltype(width)::value;
    SiluParams p{};
    p.x = a.x.data;
    p.out = a.out.data;
    p.rms_of = a.rms_of.data;
    p.x_s0 = a.x.stride(0);
    p.out_s0 = a.out.stride(0);
    p.r_s0 = p.rms_of != nullptr ? a.rms_of.stride(0) : 0;
    p.d = static_cast<int>(d);
    p.hidden = p.rms_of != nullptr ? static_cast<int>(a.rms_of.size(1)) : 0;
    p.eps = a.eps;
    void* args[] = {&p};
    launch_kernel(reinterpret_cast<const void*>(&silu_and_mul_kernel<T, N>), grid, dim3(kSiluThreads), 0, stream,
                  args, a.x.device, "silu_and_mul_kernel launch");
  });
}

}  // namespace tinyserve::cuda
