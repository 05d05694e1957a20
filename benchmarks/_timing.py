"""Timing helpers shared by the benchmarks: CUDA-event timing after warm-up, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_cpu(
    fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, min_seconds: float = 0.2
) -> float:
    """Median wall time of fn() in seconds (repeats until min_seconds of samples, at least `repeat`)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeat or (time.perf_counter() - start < min_seconds and len(samples) < 1000):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20) -> float:
    """Median device time of fn() in seconds, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    buffers = [torch.empty(nbytes // 2, dtype=torch.uint8, device=device) for _ in range(2)]
    seconds = time_cuda(lambda: buffers[1].copy_(buffers[0]), warmup=3, repeat=10)
    buffers.clear()
    return nbytes / seconds


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
