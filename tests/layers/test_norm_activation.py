"""RMSNorm (plain and fused residual add) and SiluAndMul against transformers / plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve.layers.activation import SiluAndMul
from tinyserve.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 97, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(97, generator=gen)).to(dtype)
    ref = LlamaRMSNorm(97, eps=1e-5).to(dtype)
    ours = RMSNorm(97, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ours.weight.copy_(weight)
        out, residual = ours(x)
        assert torch.equal(out, ref(x))  # same op order: bit-identical
        assert residual is x


def test_rmsnorm_fused_residual_add() -> None:
    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(2, 5, 17, generator=gen)
    norm = RMSNorm(17, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(17, generator=gen) + 0.5)
        out, new_res = norm(x, res)
        assert torch.equal(new_res, x + res)
        assert torch.equal(out, norm.normalize(x + res))


def test_rmsnorm_normalizes_last_dim_of_3d_input() -> None:
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    norm = RMSNorm(16, eps=1e-6)
    out = norm.normalize(x)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(7, 2 * 43, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = SiluAndMul()(x)
    assert out.shape == (7, 43) and out.dtype == dtype
    assert torch.equal(out, F.silu(x[:, :43]) * x[:, 43:])
