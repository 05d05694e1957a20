// CPU twin of the paged-attention kernels. Decode and prefill share one loop: a work item is
// (sequence, KV head, a few query tokens); its rows are (query token, query head of that KV head)
// pairs, so every key/value row read (and converted to float32) once serves all the query heads
// of its KV head. Keys are visited in tiles of kKeyTile positions gathered through the block table,
// with an online softmax in float32; the inner loops run over head_dim and vectorise.
// OpenMP over work items (dynamic schedule: causal prefill items differ in length).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../ops.h"
#include "half.h"

namespace tinyserve::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeyTile = 64;     // key positions converted to float32 at once
// Heads up to this size keep the key tile transposed (measured on a Zen 4 VM: head_dim 8 decode
// 27 % faster; at 64 and 128 the transposed layout was slower).
constexpr int64_t kTransposedKeysMaxDim = 16;
constexpr int64_t kRowsPerItem = 16;  // query rows (token x head) per work item, prefill
// Below this many multiply-adds (about 0.1 ms on one core) the work runs on the calling thread:
// waking an OpenMP team costs more than it saves, and far more on a busy machine.
constexpr int64_t kParallelMinMacs = int64_t{1} << 19;


template <typename T>
inline void row_to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}

// ---- the kernel ----------------------------------------------------------------------------------
struct Shape {
  int64_t num_seqs, num_tokens, num_heads, num_kv_heads, group, head_dim;
  int64_t num_blocks, block_size, max_blocks;
};

struct WorkItem {
  int32_t seq, kv_head;
  int32_t tok0, ntok;  // query tokens [tok0, tok0 + ntok) of the sequence
};

struct Scratch {
  std::vector<float> q, acc, keys, values, scores, m, l;
  std::vector<int64_t> limit;
  explicit Scratch(int64_t rows, int64_t head_dim)
      : q(rows * head_dim), acc(rows * head_dim), keys(kKeyTile * head_dim), values(kKeyTile * head_dim),
        scores(kKeyTile), m(rows), l(rows), limit(rows) {}
};

template <typename T>
class PagedAttentionCpu {
 public:
  PagedAttentionCpu(const PagedAttentionArgs& a, const Shape& s) : a_(a), s_(s) {}

  void run(const WorkItem& w, Scratch& sc) const {
    const int64_t D = s_.head_dim, G = s_.group;
    const int64_t seq_len = a_.seq_lens.ptr<const int32_t>()[w.seq];
    const int64_t q_start = q_start_of(w.seq), q_len = q_end_of(w.seq) - q_start;
    const int64_t rows = w.ntok * G;
    int64_t kv_end = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tok = w.tok0 + r / G, head = w.kv_head * G + r % G;
      const T* q = a_.query.ptr<const T>() + (q_start + tok) * a_.query.stride(0) + head * a_.query.stride(1);
      float* qf = sc.q.data() + r * D;
      row_to_float(q, qf, D);
      for (int64_t d = 0; d < D; ++d) qf[d] *= a_.scale;
      // Absolute position seq_len - q_len + tok attends to keys [0, position].
      sc.limit[r] = std::clamp<int64_t>(seq_len - q_len + tok + 1, 0, seq_len);
      kv_end = std::max(kv_end, sc.limit[r]);
      sc.m[r] = -std::numeric_limits<float>::infinity();
      sc.l[r] = 0.f;
      std::fill_n(sc.acc.data() + r * D, D, 0.f);
    }
    for (int64_t k0 = 0; k0 < kv_end; k0 += kKeyTile) {
      const int64_t n = std::min(kKeyTile, kv_end - k0);
      gather_tile(w, k0, n, sc);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t valid = std::min(n, sc.limit[r] - k0);
        if (valid > 0) update_row(sc, r, valid);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tok = w.tok0 + r / G, head = w.kv_head * G + r % G;
      T* o = a_.out.ptr<T>() + (q_start + tok) * a_.out.stride(0) + head * a_.out.stride(1);
      const float inv = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;  // no keys (empty context): zeros
      const float* acc = sc.acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] * inv);
    }
  }

  int64_t q_start_of(int64_t seq) const {
    return a_.query_start_loc.data ? a_.query_start_loc.ptr<const int32_t>()[seq] : seq;
  }
  int64_t q_end_of(int64_t seq) const {
    return a_.query_start_loc.data ? a_.query_start_loc.ptr<const int32_t>()[seq + 1] : seq + 1;
  }

 private:
  // Keys/values of positions [k0, k0 + n) of the sequence in float32: values as [n][D] rows, keys
  // likewise, or transposed to [D][kKeyTile] for small heads.
  void gather_tile(const WorkItem& w, int64_t k0, int64_t n, Scratch& sc) const {
    const int64_t D = s_.head_dim, bs = s_.block_size;
    const int32_t* table = a_.block_tables.ptr<const int32_t>() + w.seq * a_.block_tables.stride(0);
    const TensorView &kc = a_.key_cache, &vc = a_.value_cache;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = k0 + j, block = table[pos / bs], off = pos % bs;
      const T* k = kc.ptr<const T>() + block * kc.stride(0) + off * kc.stride(1) + w.kv_head * kc.stride(2);
      const T* v = vc.ptr<const T>() + block * vc.stride(0) + off * vc.stride(1) + w.kv_head * vc.stride(2);
      if (D <= kTransposedKeysMaxDim) {
        float* kt = sc.keys.data() + j;  // keys as [D][kKeyTile]: see update_row_impl
        for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile] = to_float(k[d]);
      } else {
        row_to_float(k, sc.keys.data() + j * D, D);
      }
      row_to_float(v, sc.values.data() + j * D, D);
    }
  }

  // Online softmax over the first `valid` keys of the tile for one query row.
  static void update_row_impl(const float* __restrict q, const float* __restrict keys,
                              const float* __restrict values, float* __restrict acc, float* __restrict scores,
                              float& m, float& l, int64_t valid, int64_t D) {
    float tile_max = -std::numeric_limits<float>::infinity();
    if (D <= kTransposedKeysMaxDim) {
      // Small heads: a dot product of a few elements per key would not vectorise; with the keys
      // transposed, each of the D passes is one vector FMA over the tile's keys.
#pragma omp simd
      for (int64_t j = 0; j < valid; ++j) scores[j] = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = q[d];
        const float* kd = keys + d * kKeyTile;
#pragma omp simd
        for (int64_t j = 0; j < valid; ++j) scores[j] += qd * kd[j];
      }
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < valid; ++j) tile_max = std::max(tile_max, scores[j]);
    } else {
      for (int64_t j = 0; j < valid; ++j) {
        const float* k = keys + j * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
        scores[j] = dot;
        tile_max = std::max(tile_max, dot);
      }
    }
    const float m_new = std::max(m, tile_max);
    if (m_new > m) {  // rescale what was accumulated under the old maximum
      const float alpha = std::exp(m - m_new);  // exp(-inf) = 0 on the first tile
      l *= alpha;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
      m = m_new;
    }
    for (int64_t j = 0; j < valid; ++j) {
      const float p = std::exp(scores[j] - m_new);
      l += p;
      const float* v = values + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += p * v[d];
    }
  }

  void update_row(Scratch& sc, int64_t r, int64_t valid) const {
    const int64_t D = s_.head_dim;
    update_row_impl(sc.q.data() + r * D, sc.keys.data(), sc.values.data(), sc.acc.data() + r * D,
                    sc.scores.data(), sc.m[r], sc.l[r], valid, D);
  }

  const PagedAttentionArgs& a_;
  const Shape& s_;
};

std::string str(int64_t v) { return std::to_string(v); }

Shape check_args(const PagedAttentionArgs& a) {
  const TensorView &q = a.query, &kc = a.key_cache, &vc = a.value_cache, &bt = a.block_tables;
  check(q.ndim == 3 && kc.ndim == 4 && vc.ndim == 4 && bt.ndim == 2 && a.seq_lens.ndim == 1 && a.out.ndim == 3,
        "paged_attention: expected query/out 3-D, caches 4-D, block_tables 2-D, seq_lens 1-D");
  check(q.dtype == kc.dtype && q.dtype == vc.dtype && q.dtype == a.out.dtype,
        "paged_attention: query, caches and out must share one dtype");
  check(bt.dtype == DType::kInt32 && a.seq_lens.dtype == DType::kInt32, "paged_attention: block_tables and lens must be int32");
  Shape s{};
  s.num_seqs = a.seq_lens.size(0);
  s.num_tokens = q.size(0);
  s.num_heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_blocks = kc.size(0);
  s.block_size = kc.size(1);
  s.num_kv_heads = kc.size(2);
  s.max_blocks = bt.size(1);
  for (int i = 0; i < 4; ++i) check(kc.size(i) == vc.size(i), "paged_attention: key/value cache shapes differ");
  check(kc.size(3) == s.head_dim && s.head_dim >= 1 && s.head_dim <= kMaxHeadDim,
        "paged_attention: head_dim must match the caches and be in [1, 256]");
  check(s.num_kv_heads >= 1 && s.num_heads % s.num_kv_heads == 0, "paged_attention: num_heads % num_kv_heads != 0");
  check(s.block_size >= 1 && bt.size(0) == s.num_seqs, "paged_attention: block_tables rows != num_seqs");
  check(a.out.size(0) == s.num_tokens && a.out.size(1) == s.num_heads && a.out.size(2) == s.head_dim,
        "paged_attention: out shape differs from query");
  check(q.stride(2) == 1 && a.out.stride(2) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1 && bt.stride(1) == 1 &&
            a.seq_lens.stride(0) == 1,
        "paged_attention: last dimensions must be contiguous");
  s.group = s.num_heads / s.num_kv_heads;
  if (a.query_start_loc.data) {
    check(a.query_start_loc.ndim == 1 && a.query_start_loc.dtype == DType::kInt32 &&
              a.query_start_loc.size(0) == s.num_seqs + 1 && a.query_start_loc.stride(0) == 1,
          "paged_attention: query_start_loc must be int32 [num_seqs + 1]");
  } else {
    check(s.num_tokens == s.num_seqs, "paged_attention (decode): query rows != num_seqs");
  }
  return s;
}

// The lengths live in host memory here, so check them all (the CUDA path cannot).
template <typename T>
void check_lengths(const PagedAttentionCpu<T>& k, const PagedAttentionArgs& a, const Shape& s) {
  const int32_t* lens = a.seq_lens.ptr<const int32_t>();
  const int64_t capacity = s.max_blocks * s.block_size;
  for (int64_t i = 0; i < s.num_seqs; ++i) {
    const int64_t len = lens[i], q0 = k.q_start_of(i), q1 = k.q_end_of(i);
    if (len < 0 || len > capacity) {
      throw std::invalid_argument("paged_attention: seq_lens[" + str(i) + "] = " + str(len) +
                                  " is outside [0, max_blocks_per_seq * block_size = " + str(capacity) + "]");
    }
    if (q0 < 0 || q1 < q0 || q1 > s.num_tokens) {
      throw std::invalid_argument("paged_attention: query_start_loc must be non-decreasing within [0, num_tokens = " +
                                  str(s.num_tokens) + "], got [" + str(q0) + ", " + str(q1) + ") for sequence " +
                                  str(i));
    }
    const int32_t* table = a.block_tables.ptr<const int32_t>() + i * a.block_tables.stride(0);
    for (int64_t b = 0; b < (len + s.block_size - 1) / s.block_size; ++b) {
      if (table[b] < 0 || table[b] >= s.num_blocks) {
        throw std::invalid_argument("paged_attention: block_tables[" + str(i) + ", " + str(b) + "] = " +
                                    str(table[b]) + " is outside [0, num_blocks = " + str(s.num_blocks) + ")");
      }
    }
  }
}

template <typename T>
void paged_attention_impl(const PagedAttentionArgs& a, const Shape& s) {
  PagedAttentionCpu<T> kernel(a, s);
  check_lengths(kernel, a, s);
  const int64_t tokens_per_item = std::max<int64_t>(1, kRowsPerItem / s.group);
  std::vector<WorkItem> work;
  int64_t macs = 0;  // upper bound: every query row against its whole sequence, QK and PV
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t q_len = kernel.q_end_of(seq) - kernel.q_start_of(seq);
    macs += 2 * q_len * a.seq_lens.ptr<const int32_t>()[seq] * s.num_heads * s.head_dim;
    // Last query tokens first: they see the most keys, so the dynamic schedule balances better.
    for (int64_t t0 = q_len - tokens_per_item; t0 > -tokens_per_item; t0 -= tokens_per_item) {
      const int64_t lo = std::max<int64_t>(t0, 0), n = t0 + tokens_per_item - lo;
      for (int64_t kh = 0; kh < s.num_kv_heads; ++kh) {
        work.push_back({static_cast<int32_t>(seq), static_cast<int32_t>(kh), static_cast<int32_t>(lo),
                        static_cast<int32_t>(n)});
      }
    }
  }
  const int64_t n_work = static_cast<int64_t>(work.size());
  const int64_t rows = tokens_per_item * s.group;
#pragma omp parallel if (n_work > 1 && macs >= kParallelMinMacs)
  {
    Scratch scratch(rows, s.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_work; ++i) kernel.run(work[i], scratch);
  }
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a) {
  const Shape s = check_args(a);
  switch (a.query.dtype) {
    case DType::kFloat32: return paged_attention_impl<float>(a, s);
    case DType::kBFloat16: return paged_attention_impl<BF16>(a, s);
    case DType::kFloat16: return paged_attention_impl<F16>(a, s);
    default:
      throw std::invalid_argument(std::string("paged_attention (CPU): unsupported dtype ") +
                                  dtype_name(a.query.dtype) + "; supported: float32, float16, bfloat16");
  }
}

}  // namespace tinyserve::cpu
