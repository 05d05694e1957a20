"""Capturing an op sequence in a CUDA graph the way the runner does, for the ops' graph tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def capture(fn: Callable[[], R]) -> tuple[torch.cuda.CUDAGraph, R]:
    """Runs fn once on a side stream (first-call set-up, allocator warm-up outside the capture),
    then captures it; returns the graph and what the captured call returned (the tensors each
    replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result
