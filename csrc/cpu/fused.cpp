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

#include "../op_checks.h"
#include "../ops.h"
#include "fused_math.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// Below this many elements the work stays on the calling thread: waking an OpenMP team costs more.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;


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

// A folded input norm (RotaryArgs::rms_of): token t's q, k and v heads times rsqrt(mean(h[t]^2) +
// rms_eps), rounded to T, in place.
template <typename T>
void scale_heads_impl(const RotaryArgs& a, const RopeShape& s) {
  const int64_t hidden = a.rms_of.size(1);
  const TensorView* views[] = {&a.query, &a.key, &a.value};
#pragma omp parallel for schedule(static) if (s.num_tokens * hidden > kParallelMinElems)
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    const float inv = inv_rms(sum_of_squares(a.rms_of.ptr<const T>() + t * a.rms_of.stride(0), hidden), hidden,
                              a.rms_eps);
    for (const TensorView* v : views) {
      for (int64_t h = 0; h < v->size(1); ++h) {
        T* x = v->ptr<T>() + t * v->stride(0) + h * v->stride(1);
        for (int64_t i = 0; i < s.head_dim; ++i) x[i] = from_float<T>(to_float(x[i]) * inv);
      }
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
    // A folded norm scales the row first (inv = 1 without one: x * 1 rounded to T is x itself).
    float inv = 1.f;
    if (a.rms_of.data) {
      const int64_t hidden = a.rms_of.size(1);
      inv = inv_rms(sum_of_squares(a.rms_of.ptr<const T>() + t * a.rms_of.stride(0), hidden), hidden, a.eps);
    }
    for (int64_t j = 0; j < d; ++j) {
      const float g = round_to<T>(to_float(gate[j]) * inv), u = round_to<T>(to_float(up[j]) * inv);
      out[j] = from_float<T>(silu_rounded<T>(g) * u);
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
  static void run(const RotaryArgs& a, const RopeShape& s) {
    if (a.rms_of.data) scale_heads_impl<T>(a, s);
    rotary_impl<T>(a, s);
  }
};
template <typename T>
struct SiluFn {
  static void run(const SiluAndMulArgs& a) { silu_and_mul_impl<T>(a); }
};

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  check_rms_norm_args(a);
  if (a.x.numel() == 0) return;
  dispatch<RmsNormFn>(a.x.dtype, "rms_norm", a);
}

void rotary_embedding(const RotaryArgs& a) {
  check_rotary_args(a);
  const TensorView &q = a.query, &k = a.key, &cache = a.cos_sin_cache;
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
  // The caches, from the rotated key (reshape_and_cache validates every slot before it copies).
  if (a.key_cache.data) reshape_and_cache(rotary_cache_args(a));
}

void silu_and_mul(const SiluAndMulArgs& a) {
  check_silu_and_mul_args(a);
  if (a.out.numel() == 0) return;
  dispatch<SiluFn>(a.x.dtype, "silu_and_mul", a);
}

}  // namespace tinyserve::cpu
