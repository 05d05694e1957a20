"""50 concurrent streaming clients, a third of which disconnect mid-stream: the rest finish, and then
no KV block stays allocated and the server is healthy."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from .conftest import API_KEY, STORIES_NAME
from .test_endpoints import metric

NUM_CLIENTS = 50


async def one_client(client: openai.AsyncOpenAI, i: int) -> str:
    disconnect = i % 3 == 0
    stream = await client.completions.create(
        model=STORIES_NAME,
        prompt=f"Once upon a time {i}",
        stream=True,
        temperature=0.8,
        seed=i,
        max_tokens=400 if disconnect else 24,
        extra_body={"ignore_eos": True},
    )
    finish = None
    num_chunks = 0
    async for chunk in stream:
        num_chunks += 1
        if disconnect and num_chunks == 3:
            await stream.close()  # closes the connection mid-stream
            return "disconnected"
        for c in chunk.choices:
            finish = c.finish_reason or finish
    return finish or "no finish_reason"


def test_fifty_streams_with_disconnects(stories_server):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=stories_server.url + "/v1",
            api_key=API_KEY,
            max_retries=0,
            timeout=120,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100)),
        )
        async with client:
            return await asyncio.gather(*[one_client(client, i) for i in range(NUM_CLIENTS)])

    results = asyncio.run(run())
    assert results.count("disconnected") == len(range(0, NUM_CLIENTS, 3))
    assert all(r in ("disconnected", "length") for r in results), results
    deadline = time.monotonic() + 10
    while True:  # the aborts reach the engine before its next step; allow a moment
        text = httpx.get(stories_server.url + "/metrics").text
        used = metric(text, "tinyserve:kv_cache_used_blocks")
        running = metric(text, "tinyserve:num_requests_running") + metric(
            text, "tinyserve:num_requests_waiting"
        )
        if (used == 0 and running == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert used == 0 and running == 0, (
        f"{used} KV blocks / {running} requests left after the clients finished"
    )
    assert metric(text, "tinyserve:request_aborted_total") >= results.count("disconnected")
    health = httpx.get(stories_server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_non_streaming_disconnect_aborts(stories_server):
    """A non-streaming client that times out (disconnects) frees its request too."""
    body = {"model": STORIES_NAME, "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "n": 8}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    aborted = metric(httpx.get(stories_server.url + "/metrics").text, "tinyserve:request_aborted_total")
    try:
        httpx.post(stories_server.url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(stories_server.url + "/metrics").text
        if metric(text, "tinyserve:kv_cache_used_blocks") == 0:
            break
        time.sleep(0.1)
    assert metric(text, "tinyserve:kv_cache_used_blocks") == 0
    assert metric(text, "tinyserve:num_requests_running") == 0
    assert metric(text, "tinyserve:request_aborted_total") == aborted + 1
