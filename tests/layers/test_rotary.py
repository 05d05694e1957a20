"""RoPE: frequencies and rotated q/k against transformers (default, linear, llama3), partial rotary against
a direct complex-number reference."""

from __future__ import annotations

import pytest
import torch

from tinyserve.layers.rotary import RotaryEmbedding, rope_inv_freq
from tinyserve.models.config import RopeScaling

LLAMA3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
LINEAR = RopeScaling("linear", 4.0)


def _hf_cos_sin(scaling: RopeScaling | None, head_dim: int, theta: float, positions: torch.Tensor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope_parameters = {**{k: v for k, v in vars(scaling).items() if v is not None}, "rope_theta": theta}
    cfg = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=rope_parameters,
    )
    x = torch.zeros(1, dtype=torch.float32)
    return LlamaRotaryEmbedding(cfg)(x, positions[None])


@pytest.mark.parametrize("scaling", [None, LINEAR, LLAMA3], ids=["default", "linear", "llama3"])
def test_rotary_matches_transformers(scaling: RopeScaling | None) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, theta = 32, 500000.0
    positions = torch.tensor([0, 1, 2, 17, 63, 64, 200, 511])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 4, head_dim, generator=gen)  # [num_tokens, num_heads, head_dim]
    k = torch.randn(len(positions), 2, head_dim, generator=gen)
    rope = RotaryEmbedding(head_dim, head_dim, 512, theta, scaling)
    q_out, k_out = rope(positions, q.clone(), k.clone())  # rotates its arguments in place

    cos, sin = _hf_cos_sin(scaling, head_dim, theta, positions)
    # transformers wants [batch, heads, seq, head_dim]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(q_out, q_ref[0].transpose(0, 1))
    assert torch.equal(k_out, k_ref[0].transpose(0, 1))


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    plain = rope_inv_freq(64, 500000.0)
    scaled = rope_inv_freq(64, 500000.0, LLAMA3)
    assert torch.equal(scaled[0], plain[0])  # highest frequency kept
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # lowest slowed by `factor`


def test_partial_rotary_rotates_leading_dims_only() -> None:
    head_dim, rotary_dim, theta = 32, 8, 10000.0
    positions = torch.arange(0, 40, 3)
    x = torch.randn(len(positions), 3, head_dim, generator=torch.Generator().manual_seed(1))
    rope = RotaryEmbedding(head_dim, rotary_dim, 64, theta)
    out, _ = rope(positions, x.clone(), x[:, :1].clone())
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    # Reference: pairs (i, i + rotary_dim/2) as complex numbers times e^{i * pos * inv_freq}.
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = positions.double()[:, None, None] * inv_freq  # [num_tokens, 1, half]
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    torch.testing.assert_close(out[..., :half].double(), z.real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., half:rotary_dim].double(), z.imag, atol=1e-5, rtol=1e-5)


def test_cache_is_stored_in_model_dtype() -> None:
    rope = RotaryEmbedding(16, 16, 32, 10000.0, dtype=torch.bfloat16)
    assert rope.cos_sin_cache.shape == (32, 16) and rope.cos_sin_cache.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(16, 7, 32, 10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qk_norm_matches_norm_then_rotate(dtype: torch.dtype) -> None:
    """Qwen3's path: q_norm/k_norm passed to the rope are applied per head before the rotation."""
    from tinyserve.layers.norm import RMSNorm

    head_dim, positions = 32, torch.tensor([0, 3, 100, 511])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 4, head_dim, generator=gen).to(dtype)
    k = torch.randn(4, 2, head_dim, generator=gen).to(dtype)
    q_norm, k_norm = RMSNorm(head_dim, 1e-6, dtype), RMSNorm(head_dim, 1e-6, dtype)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
    rope = RotaryEmbedding(head_dim, head_dim, 512, 10000.0, dtype=dtype)
    want_q, want_k = rope(positions, q_norm.normalize(q), k_norm.normalize(k))
    got_q, got_k = rope.at(positions)(q.clone(), k.clone(), q_norm, k_norm)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}[dtype]
    torch.testing.assert_close(got_q, want_q, rtol=tol, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=tol, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        rope(positions, q, k, q_norm, None)
