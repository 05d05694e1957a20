"""The load generator of `tinyserve bench serve`: streaming requests against a running server, with
Poisson arrivals and an optional cap on concurrency, timing every SSE chunk."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds (time.perf_counter)."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks with text after the first

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class LoadSpec:
    """How to send: base_url (http://host:port), model name, request rate (req/s, inf = all at once),
    max_concurrency (None = unbounded), sampling temperature, API key, seed of the arrival times."""

    base_url: str
    model: str
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    temperature: float = 0.6
    api_key: str | None = None
    seed: int = 0


async def arrivals(requests: Sequence[BenchRequest], rate: float, seed: int) -> AsyncIterator[BenchRequest]:
    """Yield requests with exponential gaps (a Poisson process of `rate` per second), or all at once."""
    rng = random.Random(seed)
    for r in requests:
        yield r
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run_load(spec: LoadSpec, requests: Sequence[BenchRequest]) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results (in request order) and the wall time in seconds."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    async with httpx.AsyncClient(
        base_url=spec.base_url, limits=limits, headers=headers, timeout=httpx.Timeout(None, connect=30.0)
    ) as client:

        async def one(r: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_one(client, spec, r)
            async with sem:
                return await send_one(client, spec, r)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(r)) async for r in arrivals(requests, spec.request_rate, spec.seed)]
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def send_one(client: httpx.AsyncClient, spec: LoadSpec, r: BenchRequest) -> RequestResult:
    """One streaming /v1/completions request (ignore_eos, so it makes exactly max_tokens tokens)."""
    body = {
        "model": spec.model,
        "prompt": r.prompt_token_ids,
        "max_tokens": r.max_tokens,
        "temperature": spec.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(prompt_tokens=len(r.prompt_token_ids))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", ())):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.ttft > 0.0
        if not result.ok:
            result.error = "no text came back"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result
