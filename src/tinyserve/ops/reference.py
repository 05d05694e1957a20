"""Deliberately naive PyTorch references of the ops, in float64 on the CPU. Used only by tests and
benchmarks: clarity over speed, one sequence at a time, gathering K/V through the block table."""

from __future__ import annotations

import math

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, num_kv_heads, head_dim] float64: positions 0..seq_len-1 of one sequence."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long().to(cache.device)
    # Gathered where the cache lives: only the sequence's blocks travel to the CPU.
    return cache[blocks].cpu().reshape(-1, cache.shape[2], cache.shape[3])[:seq_len].double()


def paged_attention_prefill_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """float64 [num_tokens, num_heads, head_dim] on the CPU; see ops.paged_attention_prefill.
    Rows with no key to attend to are zero; rows past query_start_loc[-1] are NaN (unspecified)."""
    num_tokens, num_heads, head_dim = query.shape
    group = num_heads // key_cache.shape[2]
    qsl = query_start_loc.tolist()
    out = torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=torch.float64)
    for s, seq_len in enumerate(seq_lens.tolist()):
        q = query[qsl[s] : qsl[s + 1]].cpu().double()  # [q_len, num_heads, head_dim]
        q_len = q.shape[0]
        k = gather_kv(key_cache, block_tables[s], seq_len).repeat_interleave(group, dim=1)
        v = gather_kv(value_cache, block_tables[s], seq_len).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [num_heads, q_len, seq_len]
        positions = seq_len - q_len + torch.arange(q_len)
        masked = torch.arange(seq_len)[None, :] > positions[:, None]  # [q_len, seq_len]
        scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[qsl[s] : qsl[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def paged_attention_decode_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """float64 [num_seqs, num_heads, head_dim] on the CPU; see ops.paged_attention_decode."""
    qsl = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_attention_prefill_ref(query, key_cache, value_cache, block_tables, qsl, context_lens, scale)


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (key_cache, value_cache) on the CPU with each token written to its slot (-1 skipped)."""
    key_cache, value_cache = key_cache.cpu().clone(), value_cache.cpu().clone()
    block_size = key_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            key_cache[slot // block_size, slot % block_size] = key[i].cpu()
            value_cache[slot // block_size, slot % block_size] = value[i].cpu()
    return key_cache, value_cache


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 on the CPU, x's shape: weight * x / sqrt(mean(x^2) + eps) over the last dim."""
    x64 = x.cpu().double()
    return weight.cpu().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed float64, new residual in x's dtype) on the CPU; see ops.fused_add_rms_norm. The sum is
    rounded to x's dtype first (it is stored there), then normalised in float64."""
    new_residual = x.cpu() + residual.cpu()
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rotary_embedding_ref(
    positions: torch.Tensor,
    x: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """float64 [num_tokens, num_heads, head_dim] on the CPU: x (query or key) optionally RMS-normalised
    per head, then dims (i, i + rotary_dim/2) rotated by the cached angle of each token's position."""
    x64 = x.cpu().double()
    if norm_weight is not None:
        x64 = rms_norm_ref(x64, norm_weight, eps)
    half = rotary_dim // 2
    table = cos_sin_cache.cpu().double()[positions.cpu().long()]  # [num_tokens, rotary_dim]
    cos, sin = table[:, None, :half], table[:, None, half:]
    out = x64.clone()
    x1, x2 = x64[..., :half], x64[..., half:rotary_dim]
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """float64 [num_tokens, d] on the CPU: silu(x[:, :d]) * x[:, d:]."""
    x64 = x.cpu().double()
    d = x64.shape[-1] // 2
    gate, up = x64[..., :d], x64[..., d:]
    return gate / (1 + torch.exp(-gate)) * up


# ---- sampling noise (the contract of ops/sampling.py and csrc/philox.h) ---------------------------

_MASK32 = 0xFFFFFFFF


def philox4x32_10(key: tuple[int, int], counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 in pure Python: 10 rounds of two 32x32->64-bit products, the key bumped by the Weyl
    constants between rounds. key: two uint32; counter: four uint32. Returns four uint32."""
    k0, k1 = key
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def noise_words_ref(key: int, counter: int, vocab_size: int) -> list[int]:
    """The Philox word r_v of tokens v = 0 .. vocab_size - 1 of one row (key, counter: uint64 ints)."""
    key, counter = key % 2**64, counter % 2**64
    words: list[int] = []
    for group in range(-(-vocab_size // 4)):
        ctr = (group, 0, counter & _MASK32, counter >> 32)
        words.extend(philox4x32_10((key & _MASK32, key >> 32), ctr))
    return words[:vocab_size]


def uniform_from_word(r: int) -> float:
    """U = ((r >> 8) + 0.5) * 2**-24: exact in float64, in (0, 1)."""
    return ((r >> 8) + 0.5) * 2.0**-24


def exponential_noise_ref(keys: list[int], counters: list[int], vocab_size: int) -> torch.Tensor:
    """[num_rows, vocab_size] float32: E_v = -log(U_v) computed in float64 and rounded once to float32
    (the CPU kernel's values, bit for bit)."""
    rows = [
        [-math.log(uniform_from_word(r)) for r in noise_words_ref(k, c, vocab_size)]
        for k, c in zip(keys, counters, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), vocab_size).to(torch.float32)


def gumbel_scores_ref(
    logits: torch.Tensor, temperatures: list[float], keys: list[int], counters: list[int]
) -> torch.Tensor:
    """[num_rows, vocab_size] float64 scores of sample_from_logits: x_v / T - log(E_v) with E_v = -log(U_v)
    in float64 (no float32 rounding of the noise); rows with T <= 0 score x_v (greedy)."""
    x = logits.detach().cpu().double()
    vocab_size = x.shape[1]
    out = x.clone()
    for s, (t, k, c) in enumerate(zip(temperatures, keys, counters, strict=True)):
        if t > 0:
            log_e = [math.log(-math.log(uniform_from_word(r))) for r in noise_words_ref(k, c, vocab_size)]
            out[s] = x[s] / t - torch.tensor(log_e, dtype=torch.float64)
    return out
