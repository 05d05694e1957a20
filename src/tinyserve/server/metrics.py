"""/metrics: Prometheus text through prometheus-client, on a registry of this app's own.

Engine gauges and counters (running/waiting requests, KV usage, prefix-cache hits, preemptions, token
totals) come from an EngineStats snapshot taken by the engine thread at scrape time. Latency
histograms (time to first token, inter-token latency, end-to-end) are observed when a request ends;
they start at the request's arrival in the server, so they include queueing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tinyserve.engine import EngineStats, RequestOutput
from tinyserve.engine.async_engine import RequestStream

_PREFIX = "tinyserve:"
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


class _EngineStatsCollector:
    """Turns the latest EngineStats snapshot into gauges and counters."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        kv = s.kv

        def gauge(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(_PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(_PREFIX + name, doc, value=value)

        yield gauge("num_requests_running", "Requests holding KV blocks and being stepped.", s.num_running)
        yield gauge(
            "num_requests_waiting", "Requests waiting to be scheduled (incl. preempted).", s.num_waiting
        )
        yield gauge("kv_cache_usage_perc", "Used KV-cache blocks, percent of the pool.", kv.usage_percent)
        yield gauge("kv_cache_used_blocks", "KV-cache blocks held by requests.", kv.num_used_blocks)
        yield gauge("kv_cache_total_blocks", "KV-cache blocks in the pool.", kv.num_blocks)
        yield gauge(
            "prefix_cache_hit_rate",
            "Prefix-cache hits / queries, in tokens (0 to 1).",
            kv.prefix_cache_hit_rate,
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", kv.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted to free KV blocks.", s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)


class ServerMetrics:
    """The server's Prometheus registry; one per app (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine = _EngineStatsCollector()
        self.registry.register(self._engine)  # type: ignore[arg-type]
        r = self.registry
        self.ttft = Histogram(
            _PREFIX + "time_to_first_token_seconds",
            "Time to first token, from arrival.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            _PREFIX + "inter_token_latency_seconds",
            "Time between output tokens.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            _PREFIX + "e2e_request_latency_seconds",
            "Arrival to last token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            _PREFIX + "request_success",
            "Finished requests, by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.aborted = Counter(
            _PREFIX + "request_aborted", "Requests aborted (client gone or shutdown).", registry=r
        )

    def render(self, stats: EngineStats | None) -> bytes:
        self._engine.stats = stats
        return generate_latest(self.registry)

    def observe(self, stream: RequestStream, output: RequestOutput) -> None:
        """Record a finished request (its final output)."""
        now = time.monotonic()
        m = output.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(max(m.first_token_time - stream.arrival_time, 0.0))
        self.e2e.observe(now - stream.arrival_time)
        times = stream.step_times
        if stream.stream and len(times) > 1:
            for a, b in zip(times[:-1], times[1:], strict=True):
                self.itl.observe(b - a)
        elif m is not None and m.first_token_time is not None and m.last_token_time is not None:
            num_tokens = max(len(c.token_ids) for c in output.outputs) if output.outputs else 0
            if num_tokens > 1:
                self.itl.observe((m.last_token_time - m.first_token_time) / (num_tokens - 1))
        for c in output.outputs:
            self.finished.labels(finished_reason=c.finish_reason or "unknown").inc()
