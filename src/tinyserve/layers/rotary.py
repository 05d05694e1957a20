"""Rotary position embeddings (RoPE) in Hugging Face's half-split ("neox") layout, with the cos/sin table
built once at load time for every position the model serves, applied in place by one fused kernel.

Each head's first `rotary_dim` dims are rotated as pairs (i, i + rotary_dim/2); the rest pass through
(partial rotary). Frequency scaling: none, "linear", or "llama3" (Llama 3.1's banded scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tinyserve import ops
from tinyserve.layers.norm import FoldedNorm, RMSNorm
from tinyserve.models.config import RopeScaling


def rope_inv_freq(rotary_dim: int, base: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] float32, computed as transformers computes them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {scaling.rope_type!r}")


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`, short
    # ones (below original / high_freq_factor) kept, and the band between interpolated smoothly.
    assert s.low_freq_factor is not None and s.high_freq_factor is not None
    assert s.original_max_position_embeddings is not None
    orig = s.original_max_position_embeddings
    low_freq_wavelen = orig / s.low_freq_factor
    high_freq_wavelen = orig / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE for query/key tensors [num_tokens, num_heads, head_dim] at given absolute positions, applied
    in place by one kernel (`ops.rotary_embedding`, CPU and CUDA) that can first apply Qwen3's per-head
    q/k RMSNorm.

    `forward(positions, query, key, q_norm, k_norm)` rotates query and key in place; `at(positions)` binds
    this forward's positions once for every layer.

    NOTE: positions must lie in [0, max_position); on CUDA they are not checked (a check would need a
    device->host sync) and tokens outside are left unrotated.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        scaling: RopeScaling | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        inv_freq = rope_inv_freq(rotary_dim, base, scaling).to(torch.get_default_device())
        t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim // 2], float32 like transformers
        # Computed in float32, stored in the model's dtype: transformers also casts cos/sin to x's dtype.
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # [max_position, rotary_dim]
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        kv_cache: KVCacheWrite | None = None,
        folded_norm: FoldedNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates in place and returns (query, key). positions [num_tokens]; query [num_tokens,
        num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] (views with a unit last stride,
        not overlapping). With q_norm and k_norm (Qwen3), each head is RMS-normalised first. With
        `kv_cache`, the rotated key and the value are also written into the paged cache (same kernel).
        With `folded_norm` (needs kv_cache), q, k and v come from a product with the input norm's
        weight folded in, and are first scaled by each row's 1 / rms (ops.rotary_embedding's rms_of)."""
        if (q_norm is None) != (k_norm is None):
            raise ValueError("give both q_norm and k_norm, or neither")
        q_weight = k_weight = None
        eps = 1e-6
        if q_norm is not None and k_norm is not None:
            if q_norm.eps != k_norm.eps:
                raise ValueError(f"q_norm and k_norm must share one eps, got {q_norm.eps} and {k_norm.eps}")
            q_weight, k_weight, eps = q_norm.weight, k_norm.weight, q_norm.eps
        cache = {} if kv_cache is None else kv_cache.kwargs()
        if folded_norm is not None:
            cache.update(rms_of=folded_norm.rows, rms_eps=folded_norm.eps)
        ops.rotary_embedding(
            positions, query, key, self.cos_sin_cache, self.rotary_dim, q_weight, k_weight, eps, **cache
        )
        return query, key

    def at(self, positions: torch.Tensor) -> BoundRope:
        """This RoPE bound to one forward's positions [num_tokens], for every layer to call."""
        return BoundRope(self, positions)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"


@dataclass(frozen=True)
class KVCacheWrite:
    """Where a rotation also writes the KV cache: the value [num_tokens, num_kv_heads, head_dim], a
    layer's key/value caches and the step's slot_mapping (see ops.reshape_and_cache)."""

    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "value": self.value,
            "key_cache": self.key_cache,
            "value_cache": self.value_cache,
            "slot_mapping": self.slot_mapping,
        }


@dataclass(frozen=True)
class BoundRope:
    """A RotaryEmbedding and the positions [num_tokens] of one forward: `rope(q, k, q_norm, k_norm)`."""

    rotary: RotaryEmbedding
    positions: torch.Tensor

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        kv_cache: KVCacheWrite | None = None,
        folded_norm: FoldedNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(self.positions, query, key, q_norm, k_norm, kv_cache, folded_norm)
