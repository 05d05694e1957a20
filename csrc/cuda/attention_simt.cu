// Paged attention on CUDA cores: the generic path for every dtype (float32 included) and any
// head_dim up to 256, e.g. stories260K's head_dim 8. Written for clarity: 8 query rows per thread
// block, keys in tiles of 32 converted to float32 in shared memory, online softmax per tile.
// The tensor-core kernel (attention_mma.cu) takes float16/bfloat16 with head_dim 64 and 128.
#include <cfloat>

#include "attention_common.cuh"

namespace tinyserve::cuda::attn {
namespace {

constexpr int kRows = 8;  // query rows per thread block (one per warp pair in the softmax step)
constexpr int kKeys = 32;  // keys per tile: one per lane in the softmax step

// Shared memory (floats): q[kRows][D], acc[kRows][D], k[kKeys][D+1], v[kKeys][D+1],
// p[kRows][kKeys], m[kRows], l[kRows], alpha[kRows]. K/V rows are padded by one float so that a
// warp reading one column of 32 rows hits 32 different banks.
__host__ __device__ constexpr int simt_smem_floats(int d) {
  return 2 * kRows * d + 2 * kKeys * (d + 1) + kRows * kKeys + 3 * kRows;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_attention_kernel(const Params p) {
  pdl_wait();
  pdl_launch_dependents();
  Work w;
  if (!map_work(p, kRows, w)) return;
  extern __shared__ float smem[];
  const int D = p.head_dim, DK = D + 1;
  float* s_q = smem;
  float* s_acc = s_q + kRows * D;
  float* s_k = s_acc + kRows * D;
  float* s_v = s_k + kKeys * DK;
  float* s_p = s_v + kKeys * DK;
  float* s_m = s_p + kRows * kKeys;
  float* s_l = s_m + kRows;
  float* s_alpha = s_l + kRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kv_head = work_kv_head(p);

  for (int i = tid; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float v = 0.f;
    if (r < w.rows) {
      const int row = w.row0 + r;
      const T* q = static_cast<const T*>(p.q) + row_token(p, w, row) * p.q_stride_tok +
                   static_cast<int64_t>(row_head(p, row)) * p.q_stride_head;
      v = to_float(q[d]) * p.scale_log2;
    }
    s_q[i] = v;
    s_acc[i] = 0.f;
  }
  if (tid < kRows) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }
  const int32_t* table = p.block_tables + static_cast<int64_t>(w.seq) * p.bt_stride;
  const int block_mask = (1 << p.block_size_log2) - 1;

  for (int k0 = w.kv_begin; k0 < w.kv_end; k0 += kKeys) {
    const int n = min(kKeys, w.kv_end - k0);
    __syncthreads();  // the previous tile's readers are done with s_k / s_v / s_p
    for (int t = warp; t < n; t += kThreads / 32) {
      const int pos = k0 + t;
      const int64_t block = table[pos >> p.block_size_log2], slot = pos & block_mask;
      const T* k = static_cast<const T*>(p.k_cache) + block * p.k_stride_block + slot * p.k_stride_slot +
                   kv_head * p.k_stride_head;
      const T* v = static_cast<const T*>(p.v_cache) + block * p.v_stride_block + slot * p.v_stride_slot +
                   kv_head * p.v_stride_head;
      for (int d = lane; d < D; d += 32) {
        s_k[t * DK + d] = to_float(k[d]);
        s_v[t * DK + d] = to_float(v[d]);
      }
    }
    __syncthreads();
    for (int i = tid; i < kRows * kKeys; i += kThreads) {
      const int r = i / kKeys, t = i % kKeys;
      float s = -INFINITY;
      if (r < w.rows && t < n && k0 + t < row_limit(p, w, w.row0 + r)) {
        const float* q = s_q + r * D;
        const float* k = s_k + t * DK;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot = fmaf(q[d], k[d], dot);
        s = dot;
      }
      s_p[i] = s;
    }
    __syncthreads();
    for (int r = warp; r < kRows; r += kThreads / 32) {  // online softmax, one row per warp
      const float s = s_p[r * kKeys + lane];
      const float m_old = s_m[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a fully masked row stays at zero
      const float prob = exp2f(s - m_use);
      const float sum = warp_sum(prob);
      s_p[r * kKeys + lane] = prob;
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        s_alpha[r] = alpha;
        s_l[r] = s_l[r] * alpha + sum;
        s_m[r] = m_new;
      }
    }
    __syncthreads();
    for (int i = tid; i < kRows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      const float* prob = s_p + r * kKeys;
      float acc = s_acc[i] * s_alpha[r];
      for (int t = 0; t < n; ++t) acc = fmaf(prob[t], s_v[t * DK + d], acc);
      s_acc[i] = acc;
    }
  }
  __syncthreads();
  for (int i = tid; i < w.rows * D; i += kThreads) {
    const int r = i / D, d = i % D, row = w.row0 + r;
    const float l = s_l[r];
    store_out<T>(p, row_token(p, w, row), row_head(p, row), d, l > 0.f ? s_acc[i] / l : 0.f);
  }
  if (tid < w.rows) {
    const int row = w.row0 + tid;
    store_partial_ml(p, row_token(p, w, row), row_head(p, row), s_m[tid], s_l[tid]);
  }
}

}  // namespace

KernelInfo simt_kernel(DType dtype, int head_dim) {
  KernelInfo k;
  k.rows_per_cta = kRows;
  k.smem_bytes = simt_smem_floats(head_dim) * static_cast<int>(sizeof(float));
  switch (dtype) {
    case DType::kFloat32: k.func = reinterpret_cast<const void*>(&simt_attention_kernel<float>); break;
    case DType::kFloat16: k.func = reinterpret_cast<const void*>(&simt_attention_kernel<__half>); break;
    case DType::kBFloat16: k.func = reinterpret_cast<const void*>(&simt_attention_kernel<__nv_bfloat16>); break;
    default: break;
  }
  return k;
}

}  // namespace tinyserve::cuda::attn
