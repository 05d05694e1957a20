"""Fused projections: shards land in the right rows and split() undoes the fusion."""

from __future__ import annotations

import torch

from tinyserve.layers.linear import Linear, MergedLinear


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
