// The only PYBIND11_MODULE. Tensors arrive as TensorView tuples built by tinyserve/ops; this file
// converts them, dispatches on device and releases the GIL around every kernel call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace pybind11::detail {

// A TensorView comes from Python as (data_ptr, dtype_code, shape, strides, device_index).
template <>
struct type_caster<tinyserve::TensorView> {
  PYBIND11_TYPE_CASTER(tinyserve::TensorView, const_name("TensorView"));

  bool load(handle src, bool) {
    if (!PyTuple_Check(src.ptr()) || PyTuple_GET_SIZE(src.ptr()) != 5) return false;
    PyObject* t = src.ptr();
    value.data = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 0));
    value.dtype = static_cast<tinyserve::DType>(PyLong_AsLong(PyTuple_GET_ITEM(t, 1)));
    PyObject* shape = PyTuple_GET_ITEM(t, 2);
    PyObject* strides = PyTuple_GET_ITEM(t, 3);
    if (!PyTuple_Check(shape) || !PyTuple_Check(strides)) return false;
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    if (ndim > tinyserve::kMaxDims || PyTuple_GET_SIZE(strides) != ndim) return false;
    value.ndim = static_cast<int32_t>(ndim);
    for (Py_ssize_t i = 0; i < ndim; ++i) {
      value.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
      value.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, i));
    }
    value.device = static_cast<int32_t>(PyLong_AsLong(PyTuple_GET_ITEM(t, 4)));
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }

  static handle cast(const tinyserve::TensorView&, return_value_policy, handle) {
    throw cast_error("TensorView cannot be returned to Python");
  }
};

}  // namespace pybind11::detail

namespace {

using tinyserve::TensorView;

[[noreturn]] void no_cuda(const char* op) {
  throw std::invalid_argument(std::string(op) +
                              ": got CUDA tensors, but tinyserve._C was built without CUDA "
                              "(rebuild with TINYSERVE_CUDA=ON where nvcc is installed)");
}

void matmul(const TensorView& a, const TensorView& b, const TensorView& c, uintptr_t stream) {
  if (c.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::matmul(a, b, c, stream);
#else
    no_cuda("matmul");
#endif
  } else {
    tinyserve::cpu::matmul(a, b, c);
  }
}

// bias: None for no bias.
void skinny_gemm(const TensorView& x, const TensorView& weight, std::optional<TensorView> bias, const TensorView& out,
                 uintptr_t stream, std::optional<TensorView> norm_weight, float eps, bool silu,
                 std::optional<TensorView> residual, int unroll) {
  tinyserve::SkinnyGemmArgs args;
  args.x = x;
  args.weight = weight;
  if (bias) args.bias = *bias;
  args.out = out;
  if (norm_weight) args.norm_weight = *norm_weight;
  if (residual) args.residual = *residual;
  args.eps = eps;
  args.silu = silu;
  args.unroll = unroll;
  if (out.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::skinny_gemm(args, stream);
#else
    no_cuda("skinny_gemm");
#endif
  } else {
    tinyserve::cpu::skinny_gemm(args);
  }
}

// hidden, o_weight: None where absent (see ops.h).
void fused_mlp(std::optional<TensorView> hidden, std::optional<TensorView> o_weight, const TensorView& residual,
               const TensorView& norm_weight, const TensorView& gate_up, const TensorView& down, const TensorView& out,
               const TensorView& workspace, float eps, uintptr_t stream) {
  tinyserve::FusedMlpArgs args;
  if (hidden) args.hidden = *hidden;
  if (o_weight) args.o_weight = *o_weight;
  args.residual = residual;
  args.norm_weight = norm_weight;
  args.gate_up = gate_up;
  args.down = down;
  args.out = out;
  args.workspace = workspace;
  args.eps = eps;
  if (out.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::fused_mlp(args, stream);
#else
    no_cuda("fused_mlp");
#endif
  } else {
    tinyserve::cpu::fused_mlp(args);
  }
}

// residual and residual_out together, or neither; bias optional (see ops.h).
void fused_norm_linear(const TensorView& x, std::optional<TensorView> residual, std::optional<TensorView> residual_out,
                       const TensorView& norm_weight, const TensorView& weight, std::optional<TensorView> bias,
                       const TensorView& out, float eps, uintptr_t stream) {
  tinyserve::FusedNormLinearArgs args;
  args.x = x;
  if (residual) args.residual = *residual;
  if (residual_out) args.residual_out = *residual_out;
  args.norm_weight = norm_weight;
  args.weight = weight;
  if (bias) args.bias = *bias;
  args.out = out;
  args.eps = eps;
  if (out.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::fused_norm_linear(args, stream);
#else
    no_cuda("fused_norm_linear");
#endif
  } else {
    tinyserve::cpu::fused_norm_linear(args);
  }
}

bool fused_mlp_fits(int64_t rows, int64_t hidden, int64_t intermediate, int64_t attn, int device) {
  if (rows < 1 || rows > tinyserve::kFusedMlpMaxRows) return false;
  if (device < 0) return true;  // the CPU twin takes any size
#ifdef TINYSERVE_WITH_CUDA
  return tinyserve::cuda::fused_mlp_fits(rows, hidden, intermediate, attn, device);
#else
  (void)hidden;
  (void)intermediate;
  (void)attn;
  return false;
#endif
}

bool fused_norm_linear_fits(int64_t rows, int64_t k, int device) {
  if (rows < 1 || rows > tinyserve::kFusedMlpMaxRows) return false;
  if (device < 0) return true;  // the CPU twin takes any size
#ifdef TINYSERVE_WITH_CUDA
  return tinyserve::cuda::fused_norm_linear_fits(rows, k, device);
#else
  (void)k;
  return false;
#endif
}

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping, uintptr_t stream) {
  const tinyserve::ReshapeAndCacheArgs args{key, value, key_cache, value_cache, slot_mapping};
  if (key_cache.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::reshape_and_cache(args, stream);
#else
    no_cuda("reshape_and_cache");
#endif
  } else {
    tinyserve::cpu::reshape_and_cache(args);
  }
}

void paged_attention(const tinyserve::PagedAttentionArgs& args, uintptr_t stream, const char* op) {
  if (args.out.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::paged_attention(args, stream);
#else
    no_cuda(op);
#endif
  } else {
    tinyserve::cpu::paged_attention(args);
  }
}

// workspace: optional float32 split-KV scratch (CUDA only; None on CPU).
void paged_attention_decode(const TensorView& query, const TensorView& key_cache, const TensorView& value_cache,
                            const TensorView& block_tables, const TensorView& context_lens, const TensorView& out,
                            double scale, int64_t max_seq_len, std::optional<TensorView> workspace,
                            bool metadata_ready, uintptr_t stream) {
  tinyserve::PagedAttentionArgs args;
  args.query = query;
  args.key_cache = key_cache;
  args.value_cache = value_cache;
  args.block_tables = block_tables;
  args.seq_lens = context_lens;
  args.out = out;
  args.scale = static_cast<float>(scale);
  args.max_seq_len = max_seq_len;
  args.max_query_len = 1;
  if (workspace) args.workspace = *workspace;
  args.metadata_ready = metadata_ready;
  paged_attention(args, stream, "paged_attention_decode");
}

void paged_attention_prefill(const TensorView& query, const TensorView& key_cache, const TensorView& value_cache,
                             const TensorView& block_tables, const TensorView& query_start_loc,
                             const TensorView& seq_lens, const TensorView& out, double scale, int64_t max_seq_len,
                             int64_t max_query_len, std::optional<TensorView> workspace, uintptr_t stream) {
  tinyserve::PagedAttentionArgs args;
  args.query = query;
  args.key_cache = key_cache;
  args.value_cache = value_cache;
  args.block_tables = block_tables;
  args.query_start_loc = query_start_loc;
  args.seq_lens = seq_lens;
  args.out = out;
  args.scale = static_cast<float>(scale);
  args.max_seq_len = max_seq_len;
  args.max_query_len = max_query_len;
  if (workspace) args.workspace = *workspace;
  paged_attention(args, stream, "paged_attention_prefill");
}

// ---- fused decoder-layer ops (CPU twin or CUDA kernel, by the device of the data) ----

// residual: None for plain rms_norm; else residual += x, then out = rms_norm(residual).
void rms_norm(const TensorView& x, std::optional<TensorView> residual, const TensorView& weight,
              const TensorView& out, double eps, uintptr_t stream) {
  tinyserve::RmsNormArgs args;
  args.x = x;
  if (residual) args.residual = *residual;
  args.weight = weight;
  args.out = out;
  args.eps = static_cast<float>(eps);
  if (x.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::rms_norm(args, stream);
#else
    no_cuda(residual ? "fused_add_rms_norm" : "rms_norm");
#endif
  } else {
    tinyserve::cpu::rms_norm(args);
  }
}

// q_norm_weight, k_norm_weight: both None (plain RoPE) or both given (q/k RMSNorm first).
// value, key_cache, value_cache, slot_mapping: all None, or all given (also write the KV cache).
void rotary_embedding(const TensorView& positions, const TensorView& query, const TensorView& key,
                      const TensorView& cos_sin_cache, int64_t rotary_dim, std::optional<TensorView> q_norm_weight,
                      std::optional<TensorView> k_norm_weight, double eps, std::optional<TensorView> value,
                      std::optional<TensorView> key_cache, std::optional<TensorView> value_cache,
                      std::optional<TensorView> slot_mapping, std::optional<TensorView> rms_of, double rms_eps,
                      uintptr_t stream) {
  tinyserve::RotaryArgs args;
  args.positions = positions;
  args.query = query;
  args.key = key;
  args.cos_sin_cache = cos_sin_cache;
  args.rotary_dim = rotary_dim;
  if (q_norm_weight) args.q_norm_weight = *q_norm_weight;
  if (k_norm_weight) args.k_norm_weight = *k_norm_weight;
  if (value) args.value = *value;
  if (key_cache) args.key_cache = *key_cache;
  if (value_cache) args.value_cache = *value_cache;
  if (slot_mapping) args.slot_mapping = *slot_mapping;
  args.eps = static_cast<float>(eps);
  if (rms_of) args.rms_of = *rms_of;
  args.rms_eps = static_cast<float>(rms_eps);
  if (query.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::rotary_embedding(args, stream);
#else
    no_cuda("rotary_embedding");
#endif
  } else {
    tinyserve::cpu::rotary_embedding(args);
  }
}

void silu_and_mul(const TensorView& x, const TensorView& out, std::optional<TensorView> rms_of, float eps,
                  uintptr_t stream) {
  const tinyserve::SiluAndMulArgs args{x, out, rms_of.value_or(TensorView{}), eps};
  if (x.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::silu_and_mul(args, stream);
#else
    no_cuda("silu_and_mul");
#endif
  } else {
    tinyserve::cpu::silu_and_mul(args);
  }
}

// ---- sampling (CPU twin or CUDA kernel, by the device of the data) ----

// temperature, keys, counters: all three, or None for all three (every row greedy). workspace: None,
// or int64 scratch for the partial results of rows split over thread blocks (CUDA).
void sample_from_logits(const TensorView& logits, std::optional<TensorView> temperature,
                        std::optional<TensorView> keys, std::optional<TensorView> counters, const TensorView& out,
                        std::optional<TensorView> workspace, uintptr_t stream) {
  tinyserve::SampleArgs args;
  args.logits = logits;
  if (temperature) args.temperature = *temperature;
  if (keys) args.keys = *keys;
  if (counters) args.counters = *counters;
  args.out = out;
  if (workspace) args.workspace = *workspace;
  if (logits.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::sample_from_logits(args, stream);
#else
    no_cuda("sample_from_logits");
#endif
  } else {
    tinyserve::cpu::sample_from_logits(args);
  }
}

void exponential_noise(const TensorView& keys, const TensorView& counters, const TensorView& out, uintptr_t stream) {
  const tinyserve::NoiseArgs args{keys, counters, out};
  if (out.is_cuda()) {
#ifdef TINYSERVE_WITH_CUDA
    tinyserve::cuda::exponential_noise(args, stream);
#else
    no_cuda("exponential_noise");
#endif
  } else {
    tinyserve::cpu::exponential_noise(args);
  }
}

py::dict build_info() {
  py::dict info;
#ifdef TINYSERVE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(TINYSERVE_CUDA_VERSION);
  info["cuda_architectures"] = std::string(TINYSERVE_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_architectures"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
#endif
  info["compiler"] = std::string(TINYSERVE_CXX_COMPILER);
  info["cpu_flags"] = std::string(TINYSERVE_CPU_FLAGS);
  info["build_type"] = std::string(TINYSERVE_BUILD_TYPE);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "TinyServe native kernels (CPU twins always; CUDA when built with it).";
  m.def("build_info", &build_info, "What was compiled: CUDA on/off, version, architectures, OpenMP, compiler.");
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("skinny_gemm", &skinny_gemm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        py::arg("stream"), py::arg("norm_weight") = py::none(), py::arg("eps") = 0.f, py::arg("silu") = false,
        py::arg("residual") = py::none(), py::arg("unroll") = 2, py::call_guard<py::gil_scoped_release>());
  m.def(
      "set_programmatic_launch",
      [](int mode) {
#ifdef TINYSERVE_WITH_CUDA
        tinyserve::cuda::set_programmatic_launch(mode);
#else
        (void)mode;
#endif
      },
      py::arg("mode"),
      "Programmatic dependent launch of TinyServe's CUDA kernels: -1 follows TINYSERVE_PDL, 0 off, 1 on (sm_90+).");
  m.def(
      "programmatic_launch_enabled",
      [](int device) {
#ifdef TINYSERVE_WITH_CUDA
        return tinyserve::cuda::programmatic_launch_enabled(device);
#else
        (void)device;
        return false;
#endif
      },
      py::arg("device"), "Whether TinyServe's kernels launch with PDL on this CUDA device now.");
  m.attr("skinny_max_rows") = tinyserve::kSkinnyMaxRows;
  m.def("fused_mlp", &fused_mlp, py::arg("hidden"), py::arg("o_weight"), py::arg("residual"), py::arg("norm_weight"),
        py::arg("gate_up"), py::arg("down"), py::arg("out"), py::arg("workspace"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_mlp_fits", &fused_mlp_fits, py::arg("rows"), py::arg("hidden"), py::arg("intermediate"),
        py::arg("attn"), py::arg("device"));
  m.def("fused_norm_linear", &fused_norm_linear, py::arg("x"), py::arg("residual"), py::arg("residual_out"),
        py::arg("norm_weight"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_norm_linear_fits", &fused_norm_linear_fits, py::arg("rows"), py::arg("k"), py::arg("device"));
  m.attr("fused_mlp_max_rows") = tinyserve::kFusedMlpMaxRows;
  m.attr("fused_mlp_workspace_header") = tinyserve::kFusedMlpWorkspaceHeader;
  m.def("reshape_and_cache", &reshape_and_cache, py::arg("key"), py::arg("value"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention_decode", &paged_attention_decode, py::arg("query"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("out"), py::arg("scale"),
        py::arg("max_seq_len"), py::arg("workspace"), py::arg("metadata_ready"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention_prefill", &paged_attention_prefill, py::arg("query"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("query_start_loc"), py::arg("seq_lens"),
        py::arg("out"), py::arg("scale"), py::arg("max_seq_len"), py::arg("max_query_len"), py::arg("workspace"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"), py::arg("eps"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("rotary_embedding", &rotary_embedding, py::arg("positions"), py::arg("query"), py::arg("key"),
        py::arg("cos_sin_cache"), py::arg("rotary_dim"), py::arg("q_norm_weight"), py::arg("k_norm_weight"),
        py::arg("eps"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"),
        py::arg("rms_of"), py::arg("rms_eps"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("silu_and_mul", &silu_and_mul, py::arg("x"), py::arg("out"), py::arg("rms_of"), py::arg("eps"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("sample_from_logits", &sample_from_logits, py::arg("logits"), py::arg("temperature"), py::arg("keys"),
        py::arg("counters"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("exponential_noise", &exponential_noise, py::arg("keys"), py::arg("counters"), py::arg("out"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
