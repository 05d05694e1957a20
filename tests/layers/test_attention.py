"""The Attention layer over a paged cache against torch SDPA on contiguous K/V, and the checks of
AttentionMetadata and KV-cache binding."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tinyserve.layers.attention import Attention, AttentionMetadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 8, 2, 16, 8, 40


def metadata(prefix_lens: list[int], query_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    slots = [
        tables[s][t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE
        for s in range(len(seq_lens))
        for t in range(prefix_lens[s], seq_lens[s])
    ]
    width = max(map(len, tables))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)

    def i32(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32)

    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=i32([t + [0] * (width - len(t)) for t in tables]),
        query_start_loc=i32(starts),
        seq_lens=i32(seq_lens),
        context_lens=i32(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        is_decode_only=all(q == 1 for q in query_lens),
    )


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_new: int) -> torch.Tensor:
    """Causal attention (float64) of the last `num_new` rows of one sequence.

    q [seq_len, num_heads, head_dim]; k, v [seq_len, num_kv_heads, head_dim]
    -> [num_new, num_heads, head_dim].
    """
    group = NUM_HEADS // NUM_KV_HEADS
    qh = q[-num_new:].double().transpose(0, 1)  # [heads, num_new, d]
    kh = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    seq = k.shape[0]
    mask = torch.ones(num_new, seq, dtype=torch.bool).tril(diagonal=seq - num_new)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(0, 1)  # [num_new, heads, d]


@pytest.mark.parametrize("query_lens", [[7, 1, 16, 9], [1, 1, 1, 1]], ids=["mixed", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_layer_with_cached_prefix(query_lens: list[int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    prefix_lens = [0, 5, 20, 8]  # sequence 0 is a fresh prefill; block boundary at 8
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    blocks = list(range(1, NUM_BLOCKS))
    random.Random(0).shuffle(blocks)  # non-contiguous block tables
    tables = [[blocks.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in seq_lens]
    # Per sequence: q [seq_len, NUM_HEADS, HEAD_DIM], k and v [seq_len, NUM_KV_HEADS, HEAD_DIM].
    seqs = [
        tuple(
            torch.randn(n, h, HEAD_DIM, generator=gen).to(dtype)
            for h in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS)
        )
        for n in seq_lens
    ]
    attn = Attention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=HEAD_DIM**-0.5)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    attn.bind_kv_cache(torch.full(shape, 1e3, dtype=dtype), torch.full(shape, 1e3, dtype=dtype))

    def flat(ids: list[int], lo: list[int], hi: list[int]) -> list[torch.Tensor]:
        """[q, k, v] rows lo[s]:hi[s] of sequences `ids`, concatenated and flattened to [n, heads * d]."""
        return [torch.cat([seqs[s][i][lo[s] : hi[s]] for s in ids]).flatten(1) for i in range(3)]

    # Step 1 caches the prefixes; step 2 runs this chunk of every sequence as one flat batch.
    cached = [s for s, p in enumerate(prefix_lens) if p > 0]
    attn(
        *flat(cached, [0] * 4, prefix_lens),
        metadata([0] * len(cached), [prefix_lens[s] for s in cached], [tables[s] for s in cached]),
    )
    out = attn(*flat(list(range(4)), prefix_lens, seq_lens), metadata(prefix_lens, query_lens, tables))
    assert out.shape == (sum(query_lens), NUM_HEADS * HEAD_DIM) and out.dtype == dtype
    for s, got in enumerate(out.split(query_lens)):
        expected = sdpa_reference(*seqs[s], query_lens[s])
        err = float((got.view(-1, NUM_HEADS, HEAD_DIM).double() - expected).norm() / expected.norm())
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"sequence {s}: rel err {err:.2e}"


def test_metadata_checks_shapes_and_dtypes() -> None:
    md = metadata([0, 3], [4, 1], [[1], [2]])
    assert md.num_tokens == 5 and md.num_seqs == 2 and not md.is_decode_only
    with pytest.raises(ValueError, match="block_tables must be 2-D"):
        AttentionMetadata(
            md.slot_mapping,
            md.block_tables.long(),
            md.query_start_loc,
            md.seq_lens,
            md.context_lens,
            4,
            4,
            False,
        )
    with pytest.raises(ValueError, match="num_seqs \\+ 1"):
        AttentionMetadata(
            md.slot_mapping,
            md.block_tables,
            md.query_start_loc[:2],
            md.seq_lens,
            md.context_lens,
            4,
            4,
            False,
        )
    with pytest.raises(ValueError, match="one token per sequence"):
        AttentionMetadata(
            md.slot_mapping, md.block_tables, md.query_start_loc, md.seq_lens, md.context_lens, 4, 4, True
        )


def test_kv_cache_binding_errors() -> None:
    attn = Attention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=0.25)
    md = metadata([0], [1], [[1]])
    x = torch.zeros(1, NUM_HEADS * HEAD_DIM)
    with pytest.raises(RuntimeError, match="bind_kv_caches"):
        attn(x, x[:, : NUM_KV_HEADS * HEAD_DIM], x[:, : NUM_KV_HEADS * HEAD_DIM], md)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        attn.bind_kv_cache(torch.zeros(4, 8, 4, HEAD_DIM), torch.zeros(4, 8, 4, HEAD_DIM))
    with pytest.raises(ValueError, match="must match"):
        attn.bind_kv_cache(torch.zeros(4, 8, 2, HEAD_DIM), torch.zeros(5, 8, 2, HEAD_DIM))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(6, 4, HEAD_DIM, scale=0.25)
