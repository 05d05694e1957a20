"""Fused projections: shards land in the right rows and split() undoes the fusion."""

from __future__ import annotations

import pytest
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


def test_skinny_rows_route_to_the_skinny_kernel(monkeypatch) -> None:
    """Token counts in `skinny_rows` run ops.skinny_linear (the C++ twin on CPU); others cuBLAS/torch."""
    from tinyserve import ops

    gen = torch.Generator().manual_seed(3)
    layer = Linear(64, 24, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 64, generator=gen))
        layer.bias.copy_(torch.randn(24, generator=gen))
    calls = []
    original = ops.skinny_linear
    monkeypatch.setattr(
        ops, "skinny_linear", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    )
    layer.skinny_rows = frozenset({2})
    for rows in (1, 2, 3):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        with torch.no_grad():
            y = layer(x)
        want = (x.double() @ layer.weight.double().T + layer.bias.double()).to(torch.bfloat16)
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    assert calls == [2]
    # A non-contiguous input never takes the skinny path (the kernel needs contiguous rows).
    x = torch.randn(64, 2, generator=gen).bfloat16().T
    with torch.no_grad():
        layer(x)
    assert calls == [2]


@pytest.mark.cuda
def test_tune_linear_layers_on_cuda() -> None:
    """Every 16-bit Linear is measured at each row count <= SKINNY_MAX_ROWS and takes the skinny
    kernel exactly where it measured faster by the margin; the outputs stay those of a linear layer."""
    from tinyserve import ops
    from tinyserve.runner.linear_tuning import tune_linear_layers

    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [Linear(1024, 2048, dtype=torch.bfloat16) for _ in range(4)]
        + [Linear(2048, 1024, bias=True, dtype=torch.bfloat16) for _ in range(4)]
    ).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    choices = tune_linear_layers(model, [1, 4, 16, 64])
    assert {(c.shape, c.rows) for c in choices} == {
        (shape, rows) for shape in ((2048, 1024), (1024, 2048)) for rows in (1, 4, 16)
    }
    for c in choices:
        assert c.layers == 4 and c.cublas_s > 0 and c.skinny2_s > 0 and c.skinny4_s > 0
        assert c.skinny_s == min(c.skinny2_s, c.skinny4_s)
    for layer in model:
        want = {c.rows for c in choices if c.shape == tuple(layer.weight.shape) and c.skinny}
        assert layer.skinny_rows == frozenset(want)
        unroll = {c.rows: c.unroll for c in choices if c.shape == tuple(layer.weight.shape)}
        assert layer.skinny_unroll == unroll and set(unroll.values()) <= {2, 4}
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, layer.input_size, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = torch.nn.functional.linear(
                    x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float()
                )
                torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=2e-3)
    assert ops.SKINNY_MAX_ROWS == 16


@pytest.mark.cuda
def test_time_graphs_times_each_graph_by_its_own_work() -> None:
    """time_graphs captures one graph per key and times their replays in interleaved rounds: each
    key's median is its own graph's work (8x the products measure longer than one), and each graph
    replays what its function did at capture time."""
    from tinyserve.runner.linear_tuning import time_graph, time_graphs

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    outs = {n: torch.zeros(2048, 2048, device="cuda", dtype=torch.bfloat16) for n in (1, 8)}

    def work(n: int) -> None:
        for _ in range(n):
            torch.mm(a, a, out=outs[n])

    times = time_graphs({n: lambda n=n: work(n) for n in (1, 8)}, rounds=3, repeats=2)
    assert set(times) == {1, 8}
    assert 0 < times[1] < times[8], times
    assert times[8] > 4 * times[1], times
    single = time_graph(lambda: work(8), repeats=3)
    assert 0.5 * times[8] < single < 2 * times[8], (single, times)
    torch.testing.assert_close(outs[8].float(), (a.float() @ a.float()), rtol=2e-2, atol=0.5)
