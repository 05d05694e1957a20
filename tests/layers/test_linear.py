"""Fused projections: shards land in the right rows and split() undoes the fusion; decode-sized
products on CUDA go to the skinny kernel, everything else to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve import ops
from tinyserve.layers.embedding import LMHead
from tinyserve.layers.linear import Linear, MergedLinear, linear


def test_merged_linear_equals_separate_projections() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [48, 16, 16]
    weights = [torch.randn(n, 32, generator=gen) for n in sizes]
    biases = [torch.randn(n, generator=gen) for n in sizes]
    layer = MergedLinear(32, sizes, bias=True)
    assert layer.weight.shape == (80, 32) and layer.bias is not None
    with torch.no_grad():
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            layer.shard(layer.weight, i).copy_(w)
            layer.shard(layer.bias, i).copy_(b)
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        parts = layer.split(layer(x))
    for part, w, b in zip(parts, weights, biases, strict=True):
        torch.testing.assert_close(part, x @ w.T + b)


def test_linear_without_bias() -> None:
    layer = Linear(8, 3, bias=False, dtype=torch.bfloat16)
    assert layer.bias is None and layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (3, 8)


def test_linear_and_lm_head_on_cpu_are_f_linear() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=gen).bfloat16()
    w, b = torch.randn(8, 16, generator=gen).bfloat16(), torch.randn(8, generator=gen).bfloat16()
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    head = LMHead(8, 16, torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(w)
        logits = head(x)
    assert logits.dtype == torch.float32 and torch.equal(logits, F.linear(x, w).float())


@pytest.mark.cuda
def test_linear_routes_decode_sizes_to_the_skinny_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    skinny = ops.skinny_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return skinny(x, weight, bias)

    monkeypatch.setattr(ops, "skinny_linear", spy)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, k, dtype, routed in [
        (1, 64, torch.bfloat16, True),
        (ops.SKINNY_MAX_ROWS, 64, torch.float16, True),
        (ops.SKINNY_MAX_ROWS + 1, 64, torch.bfloat16, False),  # prefill sizes: cuBLAS
        (4, 60, torch.bfloat16, False),  # k not a multiple of 8
        (4, 64, torch.float32, False),
    ]:
        calls.clear()
        x = torch.randn(rows, k, generator=gen, device="cuda").to(dtype)
        w = torch.randn(40, k, generator=gen, device="cuda").to(dtype)
        b = torch.randn(40, generator=gen, device="cuda").to(dtype)
        y = linear(x, w, b)
        assert bool(calls) == routed, (rows, k, dtype)
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()), rtol=2e-2, atol=2e-2)
