"""Which decode graphs a runner captures: bucketed batch sizes and context-length bounds (CPU)."""

from __future__ import annotations

import pytest

from tinyserve.runner.cuda_graphs import graph_batch_sizes, graph_len_bounds


@pytest.mark.parametrize(
    "max_model_len,bounds",
    [
        (512, [512]),
        (1024, [1024]),
        (1500, [1024, 1500]),
        (4096, [1024, 2048, 4096]),
        (40960, [1024, 2048, 4096, 8192, 40960]),
    ],
)
def test_len_bounds(max_model_len, bounds):
    assert graph_len_bounds(max_model_len) == bounds


def test_batch_sizes():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64] + list(range(80, 257, 16))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
