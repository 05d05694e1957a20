// CPU twins of the fused decode blocks (ops.h), composed from the skinny GEMM's C++ twin, whose
// RMSNorm and SiLU-and-mul prologues and residual epilogue round where the unfused ops store:
//  - fused_mlp: [o product,] residual add, then gate_up with the norm prologue, then down with the
//    SiLU-and-mul prologue (and the residual add);
//  - fused_norm_linear: residual add, then the product with the norm prologue (and the bias).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

// A contiguous CPU view [rows, cols] of `data`.
TensorView matrix(void* data, DType dtype, int64_t rows, int64_t cols) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = cols;
  v.strides[0] = cols;
  v.strides[1] = 1;
  return v;
}

// r = x (+ add), rounded, in T: the residual stream after the add.
template <typename T>
std::vector<T> add_rounded(const T* x, const T* add, int64_t n) {
  std::vector<T> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) r[i] = add != nullptr ? from_float<T>(to_float(x[i]) + to_float(add[i])) : x[i];
  return r;
}

template <typename T>
void fused_mlp_impl(const FusedMlpArgs& a) {
  const int64_t m = a.residual.size(0), h = a.residual.size(1), inter = a.down.size(1);
  const DType dtype = a.residual.dtype;
  const T* hidden = a.hidden.ptr<const T>();
  std::vector<T> o_out;
  if (a.o_weight.data != nullptr) {  // h = attn . o^T
    o_out.resize(static_cast<size_t>(m * h));
    SkinnyGemmArgs o;
    o.x = a.hidden;
    o.weight = a.o_weight;
    o.out = matrix(o_out.data(), dtype, m, h);
    skinny_gemm(o);
    hidden = o_out.data();
  }
  T* residual = a.residual.ptr<T>();
  std::vector<T> r = add_rounded(residual, hidden, m * h);
  std::vector<T> gate_up(static_cast<size_t>(m * 2 * inter));
  SkinnyGemmArgs gu;
  gu.x = matrix(r.data(), dtype, m, h);
  gu.weight = a.gate_up;
  gu.norm_weight = a.norm_weight;
  gu.eps = a.eps;
  gu.out = matrix(gate_up.data(), dtype, m, 2 * inter);
  skinny_gemm(gu);
  // out may be hidden or residual: every input has been read by now.
  SkinnyGemmArgs down;
  down.x = gu.out;
  down.weight = a.down;
  down.silu = true;
  down.out = a.out;
  if (a.out.data != a.residual.data) {
    skinny_gemm(down);  // out = y
    std::copy(r.begin(), r.end(), residual);
  } else {
    down.residual = gu.x;  // residual = r + y
    skinny_gemm(down);
  }
}

template <typename T>
void fused_norm_linear_impl(const FusedNormLinearArgs& a) {
  const int64_t m = a.x.size(0), k = a.x.size(1);
  std::vector<T> r = add_rounded(a.x.ptr<const T>(), a.residual.ptr<const T>(), m * k);
  SkinnyGemmArgs g;
  g.x = matrix(r.data(), a.x.dtype, m, k);
  g.weight = a.weight;
  g.bias = a.bias;
  g.norm_weight = a.norm_weight;
  g.eps = a.eps;
  g.out = a.out;
  skinny_gemm(g);
  if (a.residual.data != nullptr) std::copy(r.begin(), r.end(), a.residual_out.ptr<T>());
}

}  // namespace

void fused_mlp(const FusedMlpArgs& a) {
  check_fused_mlp_args(a);
  if (a.residual.size(0) == 0) return;
  if (a.residual.dtype == DType::kBFloat16) {
    fused_mlp_impl<BF16>(a);
  } else {
    fused_mlp_impl<F16>(a);
  }
}

void fused_norm_linear(const FusedNormLinearArgs& a) {
  check_fused_norm_linear_args(a);
  if (a.x.size(0) == 0) return;
  if (a.x.dtype == DType::kBFloat16) {
    fused_norm_linear_impl<BF16>(a);
  } else {
    fused_norm_linear_impl<F16>(a);
  }
}

}  // namespace tinyserve::cpu
