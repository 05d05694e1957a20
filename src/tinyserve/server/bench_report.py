"""`tinyserve bench serve` results: the metrics `vllm bench serve` reports, one printed table per
rate, a JSON file, and a PNG of latency percentiles against request rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .bench_client import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(name: str, values_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    out = {f"mean_{name}_ms": sum(ms) / len(ms) if ms else math.nan}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = percentile(ms, q)
    return out


def summarize(
    results: Sequence[RequestResult], seconds: float, *, request_rate: float, max_concurrency: int | None
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    num_in = sum(r.prompt_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "request_rate": "inf" if request_rate == float("inf") else request_rate,
        "max_concurrency": max_concurrency,
        "duration_s": seconds,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(ok) / seconds if seconds else math.nan,
        "output_throughput": num_out / seconds if seconds else math.nan,
        "total_token_throughput": (num_in + num_out) / seconds if seconds else math.nan,
    }
    summary.update(_summary("ttft", [r.ttft for r in ok]))
    summary.update(_summary("tpot", [t for r in ok if (t := r.tpot) is not None]))
    summary.update(_summary("itl", [x for r in ok for x in r.itl]))
    summary.update(_summary("e2el", [r.latency for r in ok]))
    return summary


def format_table(s: dict[str, Any]) -> str:
    rows = [
        ("Request rate (req/s)", s["request_rate"]),
        ("Max concurrency", s["max_concurrency"] or "-"),
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}"),
    ]
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        rows.append((f"--- {title} ---", ""))
        rows.append((f"Mean {name.upper()} (ms)", f"{s[f'mean_{name}_ms']:.2f}"))
        for q in PERCENTILES:
            rows.append((f"P{q} {name.upper()} (ms)", f"{s[f'p{q}_{name}_ms']:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    lines = ["=" * (width + 12)]
    lines += [f"{k:<{width}}{v}" for k, v in rows]
    for e in s["errors"]:
        lines.append(f"error: {e}")
    lines.append("=" * (width + 12))
    return "\n".join(lines)


def plot(summaries: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """TTFT, TPOT and ITL percentiles (p50/p90/p99) against the request rate, one evenly spaced
    point per rate in the order given (`inf` = all requests at once)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({e})") from e
    xs = list(range(len(summaries)))
    labels = ["inf" if s["request_rate"] == "inf" else f"{float(s['request_rate']):g}" for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, name in zip(axes, ("ttft", "tpot", "itl"), strict=True):
        for q, style in zip(PERCENTILES, ("o-", "s--", "^:"), strict=True):
            ax.plot(xs, [s[f"p{q}_{name}_ms"] for s in summaries], style, label=f"p{q}")
        ax.set_title(name.upper())
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
