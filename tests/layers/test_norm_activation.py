"""RMSNorm (plain and fused residual add) and SiluAndMul against transformers / plain torch.

The layers run the fused kernels of tinyserve.ops; they round where the PyTorch formulas round, so
only a row's summation order (and exp's last bit) differ: float32 within a few ulp, 16-bit types
within one ulp of the stored value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve.layers.activation import SiluAndMul
from tinyserve.layers.norm import RMSNorm

# One unit in the last place, relative: float32 2^-23 (allow a few), bfloat16 2^-7.
ULP_RTOL = {torch.float32: 4 * 2.0**-23, torch.bfloat16: 2.0**-7}


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
        # Same op order; only the sum of squares is accumulated in another order.
        torch.testing.assert_close(out, ref(x), rtol=ULP_RTOL[dtype], atol=1e-6)
        assert residual is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_residual_add(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(2, 5, 17, generator=gen).to(dtype)
    norm = RMSNorm(17, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(17, generator=gen) + 0.5)
        out, new_res = norm(x.clone(), res.clone())  # in place on its arguments
        assert torch.equal(new_res, x + res)  # the add is rounded to the dtype, exactly as torch does
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
    # silu is stored in the dtype before the product, as in torch; exp may differ in its last bit.
    torch.testing.assert_close(out, F.silu(x[:, :43]) * x[:, 43:], rtol=ULP_RTOL[dtype], atol=1e-6)


def test_silu_and_mul_flattens_leading_dims() -> None:
    x = torch.randn(2, 3, 2 * 8, generator=torch.Generator().manual_seed(4))
    out = SiluAndMul()(x)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, F.silu(x[..., :8]) * x[..., 8:], rtol=ULP_RTOL[torch.float32], atol=1e-6)
