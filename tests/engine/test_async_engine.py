"""AsyncEngine in both places its loop can run (its own process, a background thread): outputs equal
the offline engine's, deltas rebuild the whole state (text, logprobs, n > 1, stop strings), aborts and
shutdown free every block, bad input is refused, and a dead engine process fails every request."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tinyserve import SamplingParams
from tinyserve.config import EngineConfig
from tinyserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
    RequestStream,
)

PROMPTS = [[1, 401, 59, 323, 260], [1, 9, 77, 300], [1, 5]]


def _config(path) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", dtype="float32", max_num_seqs=8, seed=0)


@pytest.fixture(scope="module", params=["process", "thread"])
def served(request, stories260k_path):
    """(AsyncEngine, run): `run(coro_fn)` runs a test's coroutine on the engine's one event loop."""
    loop = asyncio.new_event_loop()
    engine = AsyncEngine(_config(stories260k_path), max_queue=4, process=request.param == "process")

    async def start():
        engine.start()

    loop.run_until_complete(start())
    yield engine, lambda coro_fn: loop.run_until_complete(coro_fn())
    loop.run_until_complete(engine.shutdown())
    loop.close()


async def _collect(stream: RequestStream):
    outs = [out async for out in stream]
    return outs


def test_streams_match_offline(served, stories_llm):
    async_engine, run = served
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = stories_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    async def go():
        streams = [
            await async_engine.add_request(p, params, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)
        ]
        return await asyncio.gather(*(_collect(s) for s in streams))

    results = run(go)
    for i, (outs, ref) in enumerate(zip(results, expected, strict=True)):
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        assert final.outputs[0].token_ids == ref.outputs[0].token_ids
        assert final.outputs[0].text == ref.outputs[0].text
        assert final.outputs[0].finish_reason == "length"
        assert final.prompt_token_ids == PROMPTS[i]
        assert final.metrics is not None and final.metrics.first_token_time is not None
        if i % 2 == 1:
            assert len(outs) == 1  # not streamed: the final output only
        else:
            lengths = [len(o.outputs[0].token_ids) for o in outs]
            assert lengths == sorted(lengths)


def test_deltas_rebuild_logprobs_n_and_stop_strings(served, stories_llm):
    async_engine, run = served
    prompt = "Once upon a time"
    params = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=30, logprobs=2, stop=[" the"])
    ref = stories_llm.generate(prompt, params, use_tqdm=False)[0]
    ids = stories_llm.engine.tokenizer.encode(prompt)

    async def go():
        s = await async_engine.add_request(ids, params, prompt=prompt, stream=True)
        return await _collect(s)

    final = run(go)[-1]
    assert final.prompt == prompt
    for got, want in zip(final.outputs, ref.outputs, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert got.stop_reason == want.stop_reason
        assert got.logprobs == want.logprobs
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob)


def test_prompt_logprobs_arrive_once_and_whole(served, stories_llm):
    async_engine, run = served
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1)
    ref = stories_llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0]

    async def go():
        s = await async_engine.add_request(PROMPTS[0], params, stream=True)
        return await _collect(s)

    final = run(go)[-1]
    assert final.prompt_logprobs == ref.prompt_logprobs
    assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(PROMPTS[0])


def test_abort_and_shutdown_free_every_block(served):
    async_engine, run = served
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def go():
        a = await async_engine.add_request(PROMPTS[0], params, stream=True)
        b = await async_engine.add_request(PROMPTS[1], params, stream=True)
        first = await a.__anext__()
        assert not first.finished
        async_engine.abort(a.request_id)
        async for out in b:  # b runs on
            if len(out.outputs[0].token_ids) >= 5:
                break
        async_engine.abort(b.request_id)
        for _ in range(100):
            stats = await async_engine.get_stats()
            if stats.kv.num_used_blocks == 0 and stats.num_running == 0:
                break
            await asyncio.sleep(0.02)
        return stats

    stats = run(go)
    assert stats.kv.num_used_blocks == 0 and stats.num_running == stats.num_waiting == 0
    assert async_engine.num_in_flight == 0


def test_bad_requests_are_refused(served):
    async_engine, run = served

    async def go():
        with pytest.raises(ValueError, match="maximum context length"):
            await async_engine.add_request([1, 2], SamplingParams(max_tokens=10**6))
        with pytest.raises(ValueError, match="prompt token ids must be ints"):
            await async_engine.add_request([1, 10**6], SamplingParams(max_tokens=2))
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        await async_engine.add_request([1, 2], long, request_id="dup")
        with pytest.raises(ValueError, match="already in use"):
            await async_engine.add_request([1, 2], long, request_id="dup")
        async_engine.abort("dup")
        assert async_engine.num_in_flight == 0

    run(go)


def test_queue_full(served):
    async_engine, run = served
    # max_queue=4: with 8 seqs running at most, the 13th request of 2 samples each can't all wait.
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, n=2)

    async def go():
        adds = [async_engine.add_request(PROMPTS[1], params) for _ in range(12)]
        results = await asyncio.gather(*adds, return_exceptions=True)
        rejected = [r for r in results if isinstance(r, QueueFullError)]
        streams = [r for r in results if isinstance(r, RequestStream)]
        for s in streams:
            async_engine.abort(s.request_id)
        return rejected, streams

    rejected, streams = run(go)
    assert rejected and streams
    assert "the queue holds at most 4" in str(rejected[0])


def test_shutdown_aborts_in_flight_then_engine_is_gone(stories260k_path):
    for process in (True, False):
        engine = AsyncEngine(_config(stories260k_path), process=process)

        async def go(engine=engine):
            engine.start()
            params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            s = await engine.add_request(PROMPTS[0], params, stream=True)
            await s.__anext__()
            await engine.shutdown(grace_s=0.0)
            with pytest.raises(RequestAbortedError, match="shutting down"):
                await _collect(s)

        asyncio.run(go())
        assert not engine.is_running


def test_engine_process_death_fails_requests(stories260k_path):
    engine = AsyncEngine(_config(stories260k_path), process=True)

    async def go():
        engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        s = await engine.add_request(PROMPTS[0], params, stream=True)
        await s.__anext__()
        os.kill(engine._core._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exit code"):
            await _collect(s)
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.add_request(PROMPTS[1], params)
        with pytest.raises(EngineDeadError):
            await engine.get_stats()

    asyncio.run(go())


def test_engine_process_start_failure_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="engine failed to start"):
        AsyncEngine(EngineConfig(model=str(tmp_path), device="cpu"), process=True)
