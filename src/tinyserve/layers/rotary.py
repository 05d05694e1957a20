"""Rotary position embeddings (RoPE) in Hugging Face's half-split ("neox") layout, with the cos/sin table
built once at load time for every position the model serves.

Each head's first `rotary_dim` dims are rotated as pairs (i, i + rotary_dim/2); the rest pass through
(partial rotary). Frequency scaling: none, "linear", or "llama3" (Llama 3.1's banded scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] by (cos, sin) [num_tokens, 1, rotary_dim // 2].

    Dims [0, rotary_dim) are rotated as pairs (i, i + rotary_dim // 2); the rest pass through.
    """
    half = cos.shape[-1]
    x1 = x[..., :half]
    x2 = x[..., half : 2 * half]
    # Same operations, in the same order and dtype, as transformers' x*cos + rotate_half(x)*sin.
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half :])
    return torch.cat(parts, dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE for query/key tensors [num_tokens, num_heads, head_dim] at given absolute positions.

    `cos_sin(positions)` gathers the table once per forward; `apply_rotary(x, cos, sin)` rotates one
    tensor (q and k of every layer). `forward(positions, query, key)` does both.

    NOTE: positions must lie in [0, max_position); they index the table directly, without a check
    (a check would need a device->host sync).
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

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens] -> (cos, sin), each [num_tokens, 1, rotary_dim // 2]."""
        cos_sin = self.cos_sin_cache.index_select(0, positions)  # [num_tokens, rotary_dim]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens]; query [num_tokens, num_heads, head_dim]; key [num_tokens, num_kv_heads,
        head_dim] -> rotated (query, key)."""
        cos, sin = self.cos_sin(positions)
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"
