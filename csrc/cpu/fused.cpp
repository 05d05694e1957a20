// CPU twins of the fused decoder-layer ops: RMSNorm (optionally with the residual add fused in),
// RoPE (optionally with Qwen3's per-head q/k RMSNorm fused in) and SiLU-and-mul. They round
// exactly where the CUDA kernels round (and where PyTorch's unfused formulas round), so the two
// agree to the last bit except for the order of each row's sum of squares and the exp/rsqrt
// implementations. OpenMP over rows (token, or token x head).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../ops.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// Below this many elements the work stays on the calling thread: waking an OpenMP team costs more.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;


// x rounded to T's precision, as a float (the value a PyTorch op in dtype T would store).
template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

// a * b rounded to T, as a float: the value PyTorch stores for `a * b` in dtype T. For float32 the
// product goes through a volatile so the compiler cannot fuse it into a following add (GCC's
// default -ffp-contract=fast would turn x1*cos - x2*sin into an FMA and change the last bit).
template <typename T>
inline float mul_rn(float a, float b) {
  if constexpr (std::is_same_v<T, float>) {
    volatile float p = a * b;
    return p;
  } else {
    return round_to<T>(a * b);
  }
}

// The rows of a 2-D [rows, width] or 3-D [n, inner, width] view with a unit last stride.
struct Rows {
  int64_t num_rows = 0, inner = 1, s0 = 0, s1 = 0, width = 0;
  explicit Rows(const TensorView& t) : s0(t.stride(0)), width(t.size(-1)) {
    if (t.ndim == 3) {
      inner = t.size(1);
      s1 = t.stride(1);
    }
    num_rows = t.size(0) * inner;
  }
  int64_t offset(int64_t r) const { return (r / inner) * s0 + (r % inner) * s1; }
};

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  float acc[8] = {};  // 8 independent partial sums: no serial dependency chain, and it vectorises
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const float v = to_float(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline float inv_rms(float sum_sq, int64_t n, float eps) {
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
}

// weight * T(x * inv): transformers' order (normalise in float32, round, then scale in T).
template <typename T>
inline float norm_value(T x, T w, float inv) {
  return to_float(w) * round_to<T>(to_float(x) * inv);
}

// ---- RMSNorm ------------------------------------------------------------------------------------
template <typename T>
void rms_norm_impl(const RmsNormArgs& a) {
  const Rows xr(a.x), outr(a.out);
  const bool add = a.residual.data != nullptr;
  const Rows resr(add ? a.residual : a.x);
  const int64_t n = xr.width;
  const T* w = a.weight.ptr<const T>();
  // NOTE: out may alias x (fused_add_rms_norm writes the result back into x): every element is
  // read before it is written, by the same iteration.
#pragma omp parallel for schedule(static) if (xr.num_rows * n > kParallelMinElems)
  for (int64_t r = 0; r < xr.num_rows; ++r) {
    const T* x = a.x.ptr<const T>() + xr.offset(r);
    T* out = a.out.ptr<T>() + outr.offset(r);
    const T* src = x;
    if (add) {
      T* res = a.residual.ptr<T>() + resr.offset(r);
      for (int64_t i = 0; i < n; ++i) res[i] = from_float<T>(to_float(x[i]) + to_float(res[i]));
      src = res;
    }
    const float inv = inv_rms(sum_of_squares(src, n), n, a.eps);
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(norm_value(src[i], w[i], inv));
  }
}

// ---- RoPE (+ q/k RMSNorm) ---------------------------------------------------------------------
struct RopeShape {
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, half;
};

int64_t position_at(const TensorView& positions, int64_t t) {
  const int64_t k = t * positions.stride(0);
  return positions.dtype == DType::kInt64 ? positions.ptr<const int64_t>()[k]
                                          : positions.ptr<const int32_t>()[k];
}

// Rotates one head x [head_dim] in place by (cos, sin) [half] each; w != nullptr: RMS-normalise
// it first with weight w [head_dim].
template <typename T>
void rope_head(T* x, const T* cos, const T* sin, const T* w, const RopeShape& s, float eps) {
  const float inv = w ? inv_rms(sum_of_squares(x, s.head_dim), s.head_dim, eps) : 1.f;
  auto load = [&](int64_t i) { return w ? round_to<T>(norm_value(x[i], w[i], inv)) : to_float(x[i]); };
  for (int64_t i = 0; i < s.half; ++i) {
    const float a = load(i), b = load(i + s.half);
    const float c = to_float(cos[i]), sn = to_float(sin[i]);
    // x1*cos - x2*sin and x2*cos + x1*sin, each product rounded to T as PyTorch stores it.
    x[i] = from_float<T>(mul_rn<T>(a, c) - mul_rn<T>(b, sn));
    x[i + s.half] = from_float<T>(mul_rn<T>(b, c) + mul_rn<T>(a, sn));
  }
  if (w) {
    for (int64_t i = 2 * s.half; i < s.head_dim; ++i) x[i] = from_float<T>(load(i));
  }
}

template <typename T>
void rotary_impl(const RotaryArgs& a, const RopeShape& s) {
  const T* cache = a.cos_sin_cache.ptr<const T>();
  const int64_t cache_row = a.cos_sin_cache.stride(0);
  const T* qw = a.q_norm_weight.ptr<const T>();
  const T* kw = a.k_norm_weight.ptr<const T>();
  const int64_t heads = s.num_heads + s.num_kv_heads;
  const int64_t items = s.num_tokens * heads;
#pragma omp parallel for schedule(static) if (items * s.head_dim > kParallelMinElems)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t t = item / heads, h = item % heads;
    const T* cos = cache + position_at(a.positions, t) * cache_row;
    if (h < s.num_heads) {
      T* x = a.query.ptr<T>() + t * a.query.stride(0) + h * a.query.stride(1);
      rope_head(x, cos, cos + s.half, qw, s, a.eps);
    } else {
      T* x = a.key.ptr<T>() + t * a.key.stride(0) + (h - s.num_heads) * a.key.stride(1);
      rope_head(x, cos, cos + s.half, kw, s, a.eps);
    }
  }
}

// ---- SiLU and mul -------------------------------------------------------------------------------
template <typename T>
void silu_and_mul_impl(const SiluAndMulArgs& a) {
  const int64_t num_tokens = a.out.size(0), d = a.out.size(1);
#pragma omp parallel for schedule(static) if (num_tokens * d > kParallelMinElems)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* gate = a.x.ptr<const T>() + t * a.x.stride(0);
    const T* up = gate + d;
    T* out = a.out.ptr<T>() + t * a.out.stride(0);
    for (int64_t j = 0; j < d; ++j) {
      const float g = to_float(gate[j]);
      // F.silu(gate) is stored in T before the product, as SiluAndMul's PyTorch formula does.
      out[j] = from_float<T>(round_to<T>(g / (1.f + std::exp(-g))) * to_float(up[j]));
    }
  }
}

template <template <typename> class Fn, typename Args, typename... Extra>
void dispatch(DType dtype, const char* op, const Args& a, const Extra&... extra) {
  switch (dtype) {
    case DType::kFloat32: return Fn<float>::run(a, extra...);
    case DType::kBFloat16: return Fn<BF16>::run(a, extra...);
    case DType::kFloat16: return Fn<F16>::run(a, extra...);
    default:
      throw std::invalid_argument(std::string(op) + ": unsupported dtype " + dtype_name(dtype) +
                                  "; supported: float32, float16, bfloat16");
  }
}

template <typename T>
struct RmsNormFn {
  static void run(const RmsNormArgs& a) { rms_norm_impl<T>(a); }
};
template <typename T>
struct RotaryFn {
  static void run(const RotaryArgs& a, const RopeShape& s) { rotary_impl<T>(a, s); }
};
template <typename T>
struct SiluFn {
  static void run(const SiluAndMulArgs& a) { silu_and_mul_impl<T>(a); }
};

bool rows_ok(const TensorView& t) { return (t.ndim == 2 || t.ndim == 3) && t.stride(-1) == 1; }

bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i) {
    if (a.shape[i] != b.shape[i]) return false;
  }
  return true;
}

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  const bool add = a.residual.data != nullptr;
  check(rows_ok(a.x) && rows_ok(a.out) && same_shape(a.x, a.out),
        "rms_norm: x and out must be 2-D or 3-D of one shape with a unit last stride");
  check(!add || (rows_ok(a.residual) && same_shape(a.x, a.residual)),
        "fused_add_rms_norm: residual must have x's shape and a unit last stride");
  check(a.weight.ndim == 1 && a.weight.size(0) == a.x.size(-1) && a.weight.stride(0) == 1,
        "rms_norm: weight must be [hidden] and contiguous");
  check(a.out.dtype == a.x.dtype && a.weight.dtype == a.x.dtype && (!add || a.residual.dtype == a.x.dtype),
        "rms_norm: x, weight, out (and residual) must share one dtype");
  if (a.x.numel() == 0) return;
  dispatch<RmsNormFn>(a.x.dtype, "rms_norm", a);
}

void rotary_embedding(const RotaryArgs& a) {
  const TensorView &q = a.query, &k = a.key, &cache = a.cos_sin_cache;
  check(q.ndim == 3 && k.ndim == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
        "rotary_embedding: query/key must be [num_tokens, num_(kv_)heads, head_dim]");
  check(q.stride(2) == 1 && k.stride(2) == 1, "rotary_embedding: query/key need a unit last stride");
  check(a.positions.ndim == 1 && a.positions.size(0) == q.size(0) &&
            (a.positions.dtype == DType::kInt32 || a.positions.dtype == DType::kInt64),
        "rotary_embedding: positions must be [num_tokens] int32 or int64");
  check(q.dtype == k.dtype && cache.dtype == q.dtype, "rotary_embedding: query, key and the cache share a dtype");
  check(a.rotary_dim > 0 && a.rotary_dim % 2 == 0 && a.rotary_dim <= q.size(2),
        "rotary_embedding: rotary_dim must be even and in (0, head_dim]");
  check(cache.ndim == 2 && cache.size(1) == a.rotary_dim && cache.stride(1) == 1,
        "rotary_embedding: cos_sin_cache must be [max_position, rotary_dim] with a unit last stride");
  const bool norm = a.q_norm_weight.data != nullptr;
  check(norm == (a.k_norm_weight.data != nullptr), "rotary_embedding: give both q/k norm weights or neither");
  if (norm) {
    for (const TensorView* w : {&a.q_norm_weight, &a.k_norm_weight}) {
      check(w->ndim == 1 && w->size(0) == q.size(2) && w->stride(0) == 1 && w->dtype == q.dtype,
            "rotary_embedding: q/k norm weights must be contiguous [head_dim] of the query's dtype");
    }
  }
  const RopeShape s{q.size(0), q.size(1), k.size(1), q.size(2), a.rotary_dim / 2};
  // Validate every position first (serially), so no exception has to leave an OpenMP region.
  const int64_t max_position = cache.size(0);
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    const int64_t pos = position_at(a.positions, t);
    if (pos < 0 || pos >= max_position) {
      throw std::invalid_argument("rotary_embedding: positions[" + std::to_string(t) + "] = " +
                                  std::to_string(pos) + " is outside the cos/sin cache [0, " +
                                  std::to_string(max_position) + ")");
    }
  }
  if (s.num_tokens == 0) return;
  dispatch<RotaryFn>(q.dtype, "rotary_embedding", a, s);
}

void silu_and_mul(const SiluAndMulArgs& a) {
  check(a.x.ndim == 2 && a.out.ndim == 2 && a.x.size(0) == a.out.size(0) && a.x.size(1) == 2 * a.out.size(1),
        "silu_and_mul: x must be [num_tokens, 2 * d] and out [num_tokens, d]");
  check(a.x.stride(1) == 1 && a.out.stride(1) == 1, "silu_and_mul: x and out need a unit last stride");
  check(a.x.dtype == a.out.dtype, "silu_and_mul: x and out must share one dtype");
  if (a.out.numel() == 0) return;
  dispatch<SiluFn>(a.x.dtype, "silu_and_mul", a);
}

}  // namespace tinyserve::cpu
