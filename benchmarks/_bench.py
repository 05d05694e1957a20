"""Shared pieces of the kernel benchmarks: timing a list of calls captured in one CUDA graph (host
overhead out, capturability exercised) and the markdown table every benchmark prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tinyserve.runner import linear_tuning


def time_graph(calls: Sequence[Callable[[], object]], repeat: int = 15) -> float:
    """Median seconds per call of `calls`, captured back to back in one CUDA graph (the runner's
    graph timer, with three warm-up replays)."""

    def all_calls() -> None:
        for fn in calls:
            fn()

    return linear_tuning.time_graph(all_calls, repeats=repeat, warmup=3) / len(calls)


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
