// Paged attention on tensor cores (mma.sync m16n8k16, float16/bfloat16 in, float32 accumulation)
// for head_dim 64 and 128, flash-attention style: keys/values stream through shared memory in
// tiles of 64 positions gathered through the block table with 16-byte cp.async copies (STAGES
// buffers: the next STAGES - 1 tiles load while this one is multiplied), scores stay in registers,
// and an online softmax rescales the output accumulators. P goes from the score accumulators
// straight into the A operand of the P.V product, without touching shared memory.
//
// Two warp layouts of one kernel template:
//  - prefill (DECODE = false): 64 * MT query rows per block, each warp owns MT tiles of 16 rows
//    and all 64 keys of a tile (MT = 2 reuses every K/V fragment for two row tiles);
//  - decode (DECODE = true): the group's <= 16 query rows (one token x the query heads of one KV
//    head) shared by all warps, each warp taking 16 of a tile's 64 keys; the four partial softmax
//    states are merged through shared memory at the end. Memory-bound: every K/V byte is read
//    once per KV head, in 16-byte loads, with STAGES - 1 whole tiles in flight (2 or 3 stages:
//    attention.cu picks by how many waves of blocks the launch makes).
#include <cfloat>

#include "attention_common.cuh"
#include "mma.cuh"

namespace tinyserve::cuda::attn {
namespace {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global->shared copy; with valid == false the destination is zero-filled (no read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// MT: 16-row m-tiles per warp. Two (prefill) let every K/V fragment read from shared memory feed
// two mma instructions, which halves the shared-memory traffic per multiply; the query fragments
// are then re-read per tile instead of living in registers.
template <int D, bool DECODE, int MT, int STAGES>
struct Cfg {
  static constexpr int kRows = DECODE ? 16 : 64 * MT;  // query rows per thread block
  static constexpr int kWarpKeys = DECODE ? 16 : 64;   // keys of a tile each warp multiplies
  static constexpr int kScoreTiles = kWarpKeys / 8;    // n8 score tiles per warp
  static constexpr int kStride = D + 8;  // shared row stride in elements: +16 bytes keeps ldmatrix conflict-free
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kLoadRows = kThreads / kChunks;         // rows one pass of the block copies
  static constexpr int kRowsPerThread = kKeyTile / kLoadRows;  // K (and V) rows each thread copies
  static constexpr int kTileElems = kKeyTile * kStride;
  static constexpr int kStages = STAGES;
  static constexpr int kSmemBytes = (kRows * kStride + kStages * 2 * kTileElems) * 2;
  static_assert(D % 16 == 0 && kThreads % kChunks == 0 && kKeyTile % kLoadRows == 0, "tile shape");
  static_assert(!DECODE || MT == 1, "decode: one m-tile shared by all warps");
  static_assert(STAGES >= 2, "at least the tile being multiplied and the next");
  // The decode epilogue reuses the K/V stages for 4 warps x 16 rows of float32 partials.
  static_assert(!DECODE || (4 * 16 * (D + 2)) * 4 <= kStages * 2 * kTileElems * 2, "epilogue space");
};

template <typename T, int D, bool DECODE, int MT, int STAGES>
__global__ void __launch_bounds__(kThreads) mma_attention_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the dispatcher only picks this kernel on sm_80+
#else
  using C = Cfg<D, DECODE, MT, STAGES>;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ld_row = tid / C::kChunks, ld_ch = tid % C::kChunks;  // this thread's K/V copy (below)
  const int block_mask = (1 << p.block_size_log2) - 1;
  // The work tile and the first tile's physical blocks: the lengths and block tables. With
  // p.metadata_ready they are read before waiting on the kernel before this one (the caller
  // guarantees that kernel does not write them), so their dependent loads overlap it.
  Work w;
  int blocks[C::kRowsPerThread];  // physical blocks of the tile issued next
  auto fetch_blocks = [&](int (&dst)[C::kRowsPerThread], int k0) {
    const int32_t* table = p.block_tables + static_cast<int64_t>(w.seq) * p.bt_stride;
#pragma unroll
    for (int i = 0; i < C::kRowsPerThread; ++i) {
      const int pos = k0 + ld_row + i * C::kLoadRows;
      dst[i] = pos < w.kv_end ? table[pos >> p.block_size_log2] : -1;
    }
  };
  auto start_work = [&]() {
    const bool found = map_work(p, C::kRows, w);
    if (found) fetch_blocks(blocks, w.kv_begin);
    return found;
  };
  bool have = p.metadata_ready && start_work();
  pdl_wait();
  pdl_launch_dependents();
  if (!p.metadata_ready) have = start_work();
  if (!have) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_kv = s_q + C::kRows * C::kStride;  // [stage][K, V][kKeyTile][kStride]
  const int kv_head = work_kv_head(p);

  // Query rows -> shared memory (rows past the work tile are zero-filled).
  for (int c = tid; c < C::kRows * C::kChunks; c += kThreads) {
    const int r = c / C::kChunks, ch = c % C::kChunks;
    const bool valid = r < w.rows;
    const T* src = static_cast<const T*>(p.q);
    if (valid) {
      const int row = w.row0 + r;
      src += row_token(p, w, row) * p.q_stride_tok + static_cast<int64_t>(row_head(p, row)) * p.q_stride_head + ch * 8;
    }
    cp_async_16(smem_u32(s_q + r * C::kStride + ch * 8), src, valid);
  }

  // K/V tile copies: thread copies chunk ld_ch of rows ld_row + i * kLoadRows. Physical block ids
  // are fetched into registers a tile before they are used, off the critical path. While a tile
  // is multiplied (and while waiting for it) the next STAGES - 1 tiles are in flight. The cache
  // strides fit in 32 bits as bytes (mma_layout_ok), so a row's address is its thread's fixed
  // base plus one wide multiply-add of the block id: no 64-bit products in the copy loop.
  const char* k_base = static_cast<const char*>(p.k_cache) + (kv_head * p.k_stride_head + ld_ch * 8) * sizeof(T);
  const char* v_base = static_cast<const char*>(p.v_cache) + (kv_head * p.v_stride_head + ld_ch * 8) * sizeof(T);
  const uint32_t k_block_bytes = static_cast<uint32_t>(p.k_stride_block * sizeof(T));
  const uint32_t v_block_bytes = static_cast<uint32_t>(p.v_stride_block * sizeof(T));
  const uint32_t k_slot_bytes = static_cast<uint32_t>(p.k_stride_slot * sizeof(T));
  const uint32_t v_slot_bytes = static_cast<uint32_t>(p.v_stride_slot * sizeof(T));
  auto issue_tile = [&](int k0, int stage) {
    T* sk = s_kv + stage * 2 * C::kTileElems;
    T* sv = sk + C::kTileElems;
#pragma unroll
    for (int i = 0; i < C::kRowsPerThread; ++i) {
      const int r = ld_row + i * C::kLoadRows;
      const bool valid = blocks[i] >= 0;
      // An invalid row copies nothing (source size 0) from a harmless in-range address.
      const uint32_t block = valid ? static_cast<uint32_t>(blocks[i]) : 0u;
      const uint32_t slot = static_cast<uint32_t>((k0 + r) & block_mask);
      const char* k = k_base + slot * k_slot_bytes + static_cast<uint64_t>(block) * k_block_bytes;
      const char* v = v_base + slot * v_slot_bytes + static_cast<uint64_t>(block) * v_block_bytes;
      cp_async_16(smem_u32(sk + r * C::kStride + ld_ch * 8), k, valid);
      cp_async_16(smem_u32(sv + r * C::kStride + ld_ch * 8), v, valid);
    }
  };
  const int n_tiles = w.kv_end > w.kv_begin ? ceil_div(w.kv_end - w.kv_begin, kKeyTile) : 0;
  const int kw0 = DECODE ? warp * 16 : 0;  // the warp's first key in a tile
  // This thread's accumulator rows: m-tile mt, fragment rows lane/4 (half 0) and lane/4 + 8
  // (half 1). Rows past the work tile take the tile's limit so their (unstored) math stays finite.
  int lim[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = (DECODE ? 0 : warp * 16 + mt * 64) + (lane >> 2) + 8 * h;
      lim[mt][h] = r < w.rows ? min(row_limit(p, w, w.row0 + r), w.kv_end) : w.kv_end;
    }
  }
  auto q_row0 = [&](int mt) { return DECODE ? 0 : warp * 16 + mt * 64; };

  float o[MT][D / 8][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  uint32_t qf[MT == 1 ? D / 16 : 1][4];  // one m-tile: the query fragments stay in registers

  // One commit group per tile (empty past the last): group 0 also holds Q, and tile j sits in
  // stage j % STAGES, which tile j - STAGES released at the end of its iteration.
  int issued = 0;
  auto issue_next = [&]() {
    if (issued < n_tiles) {
      issue_tile(w.kv_begin + issued * kKeyTile, issued % C::kStages);
      if (++issued < n_tiles) fetch_blocks(blocks, w.kv_begin + issued * kKeyTile);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s + 1 < C::kStages; ++s) issue_next();

  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = w.kv_begin + it * kKeyTile;
    issue_next();                        // tile it + STAGES - 1
    cp_async_wait<C::kStages - 1>();     // groups 0..it are complete: tile it has landed
    __syncthreads();
    if constexpr (MT == 1) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(qf[kk], smem_u32(s_q + (q_row0(0) + (lane & 15)) * C::kStride + kk * 16 + (lane >> 4) * 8));
        }
      }
    }
    const T* sk = s_kv + (it % C::kStages) * 2 * C::kTileElems;
    const T* sv = sk + C::kTileElems;

    // S = Q . K^T for this warp's keys.
    float s[MT][C::kScoreTiles][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < C::kScoreTiles; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (MT == 1) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[mt][e] = qf[kk][e];
        } else {
          ldmatrix_x4(qa[mt], smem_u32(s_q + (q_row0(mt) + (lane & 15)) * C::kStride + kk * 16 + (lane >> 4) * 8));
        }
      }
#pragma unroll
      for (int jp = 0; jp < C::kScoreTiles / 2; ++jp) {
        const int mi = lane >> 3;
        const int key = kw0 + jp * 16 + (mi >> 1) * 8 + (lane & 7);
        uint32_t b[4];
        ldmatrix_x4(b, smem_u32(sk + key * C::kStride + kk * 16 + (mi & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * jp], qa[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * jp + 1], qa[mt], b[2], b[3]);
        }
      }
    }

    // Scale into log2 units; causal / range mask where the tile reaches a row's limit; online
    // softmax (a row is spread over the 4 lanes of a quad).
    const bool need_mask = k0 + kKeyTile > w.mask_from;
    uint32_t pa[MT][C::kScoreTiles / 2][4];  // P as A fragments of the P.V product
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < C::kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[mt][j][e] * p.scale_log2;
          if (need_mask) {
            const int key = k0 + kw0 + j * 8 + 2 * (lane & 3) + (e & 1);
            if (key >= lim[mt][e >> 1]) v = -INFINITY;
          }
          s[mt][j][e] = v;
          mx[e >> 1] = fmaxf(mx[e >> 1], v);
        }
      }
      float mu[2], alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m_run[mt][h], mx[h]);
        mu[h] = m_new == -INFINITY ? 0.f : m_new;  // a fully masked row stays at zero
        alpha[h] = fast_exp2(m_run[mt][h] - mu[h]);
        m_run[mt][h] = m_new;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < C::kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][j][e] = fast_exp2(s[mt][j][e] - mu[e >> 1]);
          sum[e >> 1] += s[mt][j][e];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[mt][h] = l_run[mt][h] * alpha[h] + sum[h];  // quad-partial sums
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[mt][n][0] *= alpha[0];
        o[mt][n][1] *= alpha[0];
        o[mt][n][2] *= alpha[1];
        o[mt][n][3] *= alpha[1];
      }
      // The score accumulators of keys 16c..16c+15 are the A fragment as they stand.
#pragma unroll
      for (int c = 0; c < C::kScoreTiles / 2; ++c) {
        pa[mt][c][0] = pack2<T>(s[mt][2 * c][0], s[mt][2 * c][1]);
        pa[mt][c][1] = pack2<T>(s[mt][2 * c][2], s[mt][2 * c][3]);
        pa[mt][c][2] = pack2<T>(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1]);
        pa[mt][c][3] = pack2<T>(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3]);
      }
    }

    // O += P . V
#pragma unroll
    for (int c = 0; c < C::kScoreTiles / 2; ++c) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        const int mi = lane >> 3;
        const int key = kw0 + c * 16 + (mi & 1) * 8 + (lane & 7);
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_u32(sv + key * C::kStride + dp * 16 + (mi >> 1) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], pa[mt][c], b[0], b[1]);
          mma_16816<T>(o[mt][2 * dp + 1], pa[mt][c], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 1);
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 2);
    }
  }

  if constexpr (DECODE) {
    // Merge the four warps' partial softmax states (same rows, different keys).
    __syncthreads();
    float* s_o = reinterpret_cast<float*>(s_kv);  // [warp][16 rows][D]
    float* s_ml = s_o + 4 * 16 * D;                // [warp][16 rows][max, sum]
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (lane >> 2) + 8 * (e >> 1), col = n * 8 + 2 * (lane & 3) + (e & 1);
        s_o[(warp * 16 + row) * D + col] = o[0][n][e];
      }
    }
    if ((lane & 3) == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (lane >> 2) + 8 * h;
        s_ml[(warp * 16 + row) * 2] = m_run[0][h];
        s_ml[(warp * 16 + row) * 2 + 1] = l_run[0][h];
      }
    }
    __syncthreads();
    for (int i = tid; i < w.rows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      float m = -INFINITY;
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) m = fmaxf(m, s_ml[(wi * 16 + r) * 2]);
      const float mu = m == -INFINITY ? 0.f : m;
      float l = 0.f, acc = 0.f;
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        const float scale = fast_exp2(s_ml[(wi * 16 + r) * 2] - mu);
        l += scale * s_ml[(wi * 16 + r) * 2 + 1];
        acc += scale * s_o[(wi * 16 + r) * D + d];
      }
      const int row = w.row0 + r;
      const int64_t token = row_token(p, w, row);
      const int head = row_head(p, row);
      store_out<T>(p, token, head, d, l > 0.f ? acc / l : 0.f);
      if (d == 0) store_partial_ml(p, token, head, m, l);
    }
  } else {
    // Each warp owns its rows: normalise and store pairs of adjacent elements.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = q_row0(mt) + (lane >> 2) + 8 * h;
        if (r >= w.rows) continue;
        const float l = l_run[mt][h];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = w.row0 + r;
        const int64_t token = row_token(p, w, row);
        const int head = row_head(p, row);
        if (p.num_splits == 1) {
          T* out = static_cast<T*>(p.out) + token * p.o_stride_tok + static_cast<int64_t>(head) * p.o_stride_head;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + 2 * (lane & 3);
            *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
          }
        } else {
          const int64_t ws_row = (static_cast<int64_t>(blockIdx.y) * p.num_tokens + token) * p.num_heads + head;
          float* out = p.ws_out + ws_row * D;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + 2 * (lane & 3);
            *reinterpret_cast<float2*>(out + col) = make_float2(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
          }
          if ((lane & 3) == 0) store_partial_ml(p, token, head, m_run[mt][h], l);
        }
      }
    }
  }
#endif
}

template <typename T, int D, bool DECODE, int MT, int STAGES>
KernelInfo info() {
  using C = Cfg<D, DECODE, MT, STAGES>;
  KernelInfo k;
  k.func = reinterpret_cast<const void*>(&mma_attention_kernel<T, D, DECODE, MT, STAGES>);
  k.smem_bytes = C::kSmemBytes;
  k.rows_per_cta = C::kRows;
  return k;
}

template <typename T, int D>
KernelInfo pick_dim(bool decode_mode, int prefill_mtiles, int decode_stages) {
  if (decode_mode) {
    return decode_stages == 2 ? info<T, D, true, 1, 2>() : info<T, D, true, 1, 3>();
  }
  return prefill_mtiles == 1 ? info<T, D, false, 1, 2>() : info<T, D, false, 2, 2>();
}

template <typename T>
KernelInfo pick(int head_dim, bool decode_mode, int prefill_mtiles, int decode_stages) {
  switch (head_dim) {
    case 64: return pick_dim<T, 64>(decode_mode, prefill_mtiles, decode_stages);
    case 128: return pick_dim<T, 128>(decode_mode, prefill_mtiles, decode_stages);
    default: return KernelInfo{};
  }
}

}  // namespace

KernelInfo mma_kernel(DType dtype, int head_dim, bool decode_mode, int prefill_mtiles, int decode_stages) {
  switch (dtype) {
    case DType::kFloat16: return pick<__half>(head_dim, decode_mode, prefill_mtiles, decode_stages);
    case DType::kBFloat16: return pick<__nv_bfloat16>(head_dim, decode_mode, prefill_mtiles, decode_stages);
    default: return KernelInfo{};
  }
}

}  // namespace tinyserve::cuda::attn
