"""Paged attention over the block-paged KV cache: decode (one query token per sequence) and prefill /
chunked prefill / prefix-cache hits (many query tokens per sequence, causal within the chunk).

out = softmax(q . K^T * scale) . V, where K and V of sequence s are gathered through its row of
`block_tables`: position t lives in block `block_tables[s, t // block_size]` at offset
`t % block_size`. GQA/MQA: query head h reads KV head `h // (num_heads // num_kv_heads)`.

NOTE: on CUDA these ops never synchronise or read device tensors on the host, so they can be
captured in CUDA graphs. The launch is sized from shapes and the optional host-side bounds
`max_seq_len` / `max_query_len`; fixed values keep a captured graph valid for any batch whose
lengths stay within them.
"""

from __future__ import annotations

import functools

import torch

from tinyserve import _C

from ._tensor import check_tensor, stream_of, view
from .cache import _dtype_name, check_kv_cache

# Split-KV (flash-decoding) scratch: only offered when the launch would not fill the GPU.
_MIN_PARTITION = 128  # keys per split, at least (as in csrc/cuda/attention.cu)
_MAX_SPLITS = 64
_MAX_WORKSPACE_BYTES = 64 << 20
_DECODE_ROWS_PER_CTA = 16  # query rows (token x head of one KV head) per thread block, decode
_PREFILL_ROWS_PER_CTA = 64


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_query(query: torch.Tensor, key_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> int:
    """Checks query [num_tokens, num_heads, head_dim] against the cache; returns num_heads."""
    check_tensor("query", query)
    if query.dim() != 3:
        raise ValueError(
            f"query must be 3-D [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}"
        )
    if query.dtype != key_cache.dtype:
        raise TypeError(
            f"query has dtype {_dtype_name(query.dtype)} but the KV cache {_dtype_name(key_cache.dtype)}; "
            "supported: float32, float16, bfloat16, the same for query and cache"
        )
    num_heads = query.shape[1]
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} differs from the cache's head_dim {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) (MHA, GQA or MQA)"
        )
    if query.stride(2) != 1:
        raise ValueError("query must be contiguous in its last (head_dim) dimension")
    if query.device != key_cache.device:
        raise ValueError(f"query is on {query.device} but the KV cache is on {key_cache.device}")
    return num_heads


def _check_int32(name: str, t: torch.Tensor, ndim: int, shape_doc: str, device: torch.device) -> None:
    check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)}; supported: int32")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the KV cache is on {device}")


def _check_out(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    check_tensor("out", out)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out must be {tuple(query.shape)} {_dtype_name(query.dtype)} on {query.device}, "
            f"got {tuple(out.shape)} {_dtype_name(out.dtype)} on {out.device}"
        )
    if out.stride(2) != 1:
        raise ValueError("out must be contiguous in its last (head_dim) dimension")
    return out


def _host_bound(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (a host-side upper bound), got {value!r}")
    return value


def _split_workspace(
    device: torch.device, num_ctas: int, max_seq_len: int, num_rows: int, head_dim: int
) -> torch.Tensor | None:
    """Float32 scratch for up to `capacity` split-KV partials of every (token, head) row, when the
    launch (`num_ctas` thread blocks without splitting) is too small to fill the GPU; else None.
    The CUDA side picks the number of splits (<= capacity) from the kernel's occupancy."""
    capacity = min(_MAX_SPLITS, max_seq_len // _MIN_PARTITION)
    if capacity < 2 or num_ctas >= 16 * _sm_count(device.index or 0):
        return None
    per_split = num_rows * (head_dim + 2) * 4
    capacity = min(capacity, _MAX_WORKSPACE_BYTES // max(per_split, 1))
    if capacity < 2:
        return None
    # +1 float: the C++ side starts the (max, sum) pairs at an even offset.
    return torch.empty(capacity * per_split // 4 + 1, dtype=torch.float32, device=device)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    metadata_ready: bool = False,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached keys and values.

    Args:
        query: [num_seqs, num_heads, head_dim]; any strides with a unit last stride.
        key_cache: [num_blocks, block_size, num_kv_heads, head_dim]; same dtype/device as `query`.
        value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
        block_tables: [num_seqs, max_blocks_per_seq] int32 physical block ids.
        context_lens: [num_seqs] int32 tokens in the cache per sequence, the current one included
            (0 gives a zero output row).
        scale: softmax scale, usually head_dim ** -0.5.
        out: optional [num_seqs, num_heads, head_dim] of the query's dtype; unit last stride.
        max_seq_len: optional host-side upper bound of `context_lens` (CUDA launch sizing only;
            default `max_blocks_per_seq * block_size`). A bound that is too small stays correct,
            only slower.
        metadata_ready: the CUDA kernel that runs right before this op on the stream does not
            write `context_lens` or `block_tables` (e.g. the layer's RoPE kernel), so the kernel may
            read them before it waits for that one (programmatic dependent launch), overlapping
            their latency with it. False (the default) is always safe. No effect on the CPU.

    Returns:
        out: [num_seqs, num_heads, head_dim], every element written.

    Supported: float32, float16, bfloat16 with float32 accumulation; head_dim 1..256 (CUDA fast
    paths for 64 and 128 in float16/bfloat16); block_size a power of two; num_heads a multiple of
    num_kv_heads.
    """
    _, block_size, num_kv_heads, head_dim = check_kv_cache(key_cache, value_cache)
    device = key_cache.device
    num_heads = _check_query(query, key_cache, num_kv_heads, head_dim)
    num_seqs = query.shape[0]
    _check_int32("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]", device)
    _check_int32("context_lens", context_lens, 1, "[num_seqs]", device)
    if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
        raise ValueError(
            f"query has {num_seqs} sequences but block_tables has {block_tables.shape[0]} rows and "
            f"context_lens {context_lens.shape[0]} entries"
        )
    out = _check_out(out, query)
    if num_seqs == 0:
        return out
    max_len = _host_bound("max_seq_len", max_seq_len, block_tables.shape[1] * block_size)
    workspace = None
    if device.type == "cuda":
        group = num_heads // num_kv_heads
        num_ctas = num_seqs * num_kv_heads * -(-group // _DECODE_ROWS_PER_CTA)
        workspace = _split_workspace(device, num_ctas, max_len, num_seqs * num_heads, head_dim)
    _C.paged_attention_decode(
        view(query),
        view(key_cache),
        view(value_cache),
        view(block_tables),
        view(context_lens),
        view(out),
        float(scale),
        max_len,
        None if workspace is None else view(workspace),
        bool(metadata_ready),
        stream_of(out),
    )
    return out


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of a variable-length batch of query chunks over the cached keys and values.

    Query token i of sequence s (q_len = query_start_loc[s+1] - query_start_loc[s]) sits at
    absolute position seq_lens[s] - q_len + i and attends to every position <= its own: the cached
    prefix plus the chunk so far. This covers prefill, chunked prefill and prefix-cache hits; a
    q_len of 1 is a decode. The chunk's keys and values must already be in the cache
    (reshape_and_cache first).

    Args:
        query: [num_tokens, num_heads, head_dim]; any strides with a unit last stride.
        key_cache: [num_blocks, block_size, num_kv_heads, head_dim]; same dtype/device as `query`.
        value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
        block_tables: [num_seqs, max_blocks_per_seq] int32 physical block ids.
        query_start_loc: [num_seqs + 1] int32 cumulative query lengths (starts at 0).
        seq_lens: [num_seqs] int32 cached prefix + this chunk, per sequence.
        scale: softmax scale, usually head_dim ** -0.5.
        out: optional [num_tokens, num_heads, head_dim] of the query's dtype; unit last stride.
            Rows past query_start_loc[-1] (padding) are not written.
        max_query_len: optional host-side upper bound of the query lengths (CUDA launch sizing;
            default num_tokens).
        max_seq_len: optional host-side upper bound of `seq_lens` (CUDA launch sizing; default
            `max_blocks_per_seq * block_size`).

    Returns:
        out: [num_tokens, num_heads, head_dim].

    Supported: as paged_attention_decode.
    """
    _, block_size, num_kv_heads, head_dim = check_kv_cache(key_cache, value_cache)
    device = key_cache.device
    num_heads = _check_query(query, key_cache, num_kv_heads, head_dim)
    num_tokens = query.shape[0]
    _check_int32("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]", device)
    _check_int32("query_start_loc", query_start_loc, 1, "[num_seqs + 1]", device)
    _check_int32("seq_lens", seq_lens, 1, "[num_seqs]", device)
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"seq_lens has {num_seqs} sequences, so block_tables needs {num_seqs} rows (got "
            f"{block_tables.shape[0]}) and query_start_loc {num_seqs + 1} entries "
            f"(got {query_start_loc.shape[0]})"
        )
    out = _check_out(out, query)
    if num_seqs == 0 or num_tokens == 0:
        return out
    max_len = _host_bound("max_seq_len", max_seq_len, block_tables.shape[1] * block_size)
    max_q = min(_host_bound("max_query_len", max_query_len, num_tokens), num_tokens)
    workspace = None
    if device.type == "cuda":
        group = num_heads // num_kv_heads
        num_ctas = num_kv_heads * min(
            -(-num_tokens * group // _PREFILL_ROWS_PER_CTA),
            num_seqs * -(-max_q * group // _PREFILL_ROWS_PER_CTA),
        )
        workspace = _split_workspace(device, num_ctas, max_len, num_tokens * num_heads, head_dim)
    _C.paged_attention_prefill(
        view(query),
        view(key_cache),
        view(value_cache),
        view(block_tables),
        view(query_start_loc),
        view(seq_lens),
        view(out),
        float(scale),
        max_len,
        max_q,
        None if workspace is None else view(workspace),
        stream_of(out),
    )
    return out
