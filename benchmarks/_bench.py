"""Shared pieces of the kernel benchmarks: timing a list of calls captured in one CUDA graph (host
overhead out, capturability exercised) and the markdown table every benchmark prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from _timing import time_cuda


def time_graph(calls: Sequence[Callable[[], object]], repeat: int = 15) -> float:
    """Median seconds per call of `calls`, captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (first-call setup, allocator)
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return time_cuda(graph.replay, warmup=3, repeat=repeat) / len(calls)


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
