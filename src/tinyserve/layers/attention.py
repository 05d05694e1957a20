"""Paged attention as a layer: write this step's K/V into the paged cache, then attend through the block
tables. The per-step batch description (`AttentionMetadata`) is passed down the forward call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinyserve import ops
from tinyserve.layers.rotary import KVCacheWrite


@dataclass
class AttentionMetadata:
    """How this step's flat batch of tokens maps onto sequences and KV-cache slots.

    Tensors live on the model's device; the host ints are known before the step runs (no syncs).
    Sequence s owns query tokens query_start_loc[s]:query_start_loc[s+1] of the flat batch; they are its
    last q_len = query_start_loc[s+1] - query_start_loc[s] tokens, at absolute positions
    seq_lens[s] - q_len ... seq_lens[s] - 1.
    """

    slot_mapping: (
        torch.Tensor
    )  # [num_tokens] int64: block_id * block_size + offset; -1 = padding, not written
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: physical block ids per sequence
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths, starting at 0
    seq_lens: torch.Tensor  # [num_seqs] int32: cached prefix + this step's tokens
    context_lens: torch.Tensor  # [num_seqs] int32: == seq_lens (the decode kernel's name for it)
    max_query_len: int  # max over sequences of this step's query length
    max_seq_len: int  # max over sequences of seq_lens
    is_decode_only: bool  # every query length is 1 (num_tokens == num_seqs): the decode kernel runs

    def __post_init__(self) -> None:
        # Shapes and dtypes only: reading values would sync with the device.
        expect = {
            "slot_mapping": (1, (torch.int64, torch.int32)),
            "block_tables": (2, (torch.int32,)),
            "query_start_loc": (1, (torch.int32,)),
            "seq_lens": (1, (torch.int32,)),
            "context_lens": (1, (torch.int32,)),
        }
        for name, (ndim, dtypes) in expect.items():
            t = getattr(self, name)
            if t.dim() != ndim or t.dtype not in dtypes:
                raise ValueError(
                    f"AttentionMetadata.{name} must be {ndim}-D {'/'.join(str(d) for d in dtypes)}, "
                    f"got shape {tuple(t.shape)} {t.dtype}"
                )
        num_seqs = self.seq_lens.shape[0]
        if self.block_tables.shape[0] != num_seqs or self.context_lens.shape[0] != num_seqs:
            raise ValueError(
                f"block_tables {tuple(self.block_tables.shape)} and "
                f"context_lens {tuple(self.context_lens.shape)} "
                f"must have num_seqs={num_seqs} rows"
            )
        if self.query_start_loc.shape[0] != num_seqs + 1:
            raise ValueError(
                f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries, "
                f"got {self.query_start_loc.shape[0]}"
            )
        if self.is_decode_only and self.slot_mapping.shape[0] != num_seqs:
            raise ValueError(
                f"a decode-only batch has one token per sequence: num_tokens={self.slot_mapping.shape[0]}, "
                f"num_seqs={num_seqs}"
            )

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class Attention(nn.Module):
    """Multi-head attention over a paged KV cache (MHA, GQA, MQA).

    forward(query [num_tokens, num_heads * head_dim], key/value [num_tokens, num_kv_heads * head_dim],
    attn_metadata) -> [num_tokens, num_heads * head_dim]. query and key already carry RoPE.
    The layer writes key/value into its cache at `slot_mapping` (slot -1: a padding token, not
    written), then each query token attends to every cached position of its sequence up to its own
    (causal): the decode kernel when `is_decode_only`, else the prefill kernel for the whole batch.

    The KV cache is bound once (`bind_kv_cache`) and kept by reference: key_cache, value_cache
    [num_blocks, block_size, num_kv_heads, head_dim], in the model's dtype, on its device.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Keep references to this layer's cache pair (no copy).

        key_cache, value_cache: each [num_blocks, block_size, num_kv_heads, head_dim].
        """
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            if cache.dim() != 4 or tuple(cache.shape[2:]) != (self.num_kv_heads, self.head_dim):
                raise ValueError(
                    f"{name} must be [num_blocks, block_size, num_kv_heads={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}], got {tuple(cache.shape)}"
                )
        if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
            raise ValueError(
                f"key_cache {tuple(key_cache.shape)} {key_cache.dtype} and value_cache "
                f"{tuple(value_cache.shape)} {value_cache.dtype} must match"
            )
        self.key_cache = key_cache
        self.value_cache = value_cache

    def _caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_cache is None or self.value_cache is None:
            raise RuntimeError("Attention has no KV cache: call model.bind_kv_caches(...) before forward")
        return self.key_cache, self.value_cache

    def cache_write(self, value: torch.Tensor, attn_metadata: AttentionMetadata) -> KVCacheWrite:
        """Where this step's keys and values go, for an op that writes them as it computes the keys
        (the RoPE kernel); then call forward with `kv_written=True`. value [num_tokens, num_kv_heads *
        head_dim] or [num_tokens, num_kv_heads, head_dim]."""
        key_cache, value_cache = self._caches()
        v = value.view(-1, self.num_kv_heads, self.head_dim)
        return KVCacheWrite(v, key_cache, value_cache, attn_metadata.slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """kv_written: this step's key and value are in the cache already (see cache_write)."""
        key_cache, value_cache = self._caches()
        md = attn_metadata
        # Views only: the ops take any strides with a unit last stride (e.g. slices of the fused qkv output).
        q = query.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        if not kv_written:
            k = key.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
            v = value.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
            ops.reshape_and_cache(k, v, key_cache, value_cache, md.slot_mapping)
        if md.is_decode_only:
            out = ops.paged_attention_decode(
                q,
                key_cache,
                value_cache,
                md.block_tables,
                md.context_lens,
                self.scale,
                max_seq_len=md.max_seq_len,
                # Right before: RoPE (or reshape_and_cache), which writes only q, k and the caches.
                metadata_ready=True,
            )
        else:
            out = ops.paged_attention_prefill(
                q,
                key_cache,
                value_cache,
                md.block_tables,
                md.query_start_loc,
                md.seq_lens,
                self.scale,
                max_query_len=md.max_query_len,
                max_seq_len=md.max_seq_len,
            )
        return out.view(-1, self.num_heads * self.head_dim)  # [num_tokens, num_heads * head_dim]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
