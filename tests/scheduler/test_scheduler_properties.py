"""Property test: for random pools (down to the smallest that fits the largest request), budgets and
request mixes, the scheduler never deadlocks, every request gets exactly the tokens it would get
alone, the budget holds every step, and every block is free at the end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.config import CacheConfig, SchedulerConfig
from tinyserve.kv_cache.manager import KVCacheManager
from tinyserve.request import Request
from tinyserve.scheduler.scheduler import Scheduler

from .fake_runner import SMALL_VOCAB as VOCAB
from .fake_runner import (
    FakeRunner,
    blocks_for_largest,
    random_requests,
    reference_generation,
    run_to_completion,
)


@settings(max_examples=60, deadline=None)
@given(
    requests=random_requests,
    block_size=st.integers(1, 5),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    extra_budget=st.integers(0, 20),
    caching=st.booleans(),
    watermark=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_random_workloads_finish_with_reference_outputs(
    requests: list[tuple[list[int], int]],
    block_size: int,
    extra_blocks: int,
    max_num_seqs: int,
    extra_budget: int,
    caching: bool,
    watermark: float,
) -> None:
    num_blocks = blocks_for_largest(requests, block_size) + extra_blocks
    kv = KVCacheManager(
        CacheConfig(block_size=block_size, enable_prefix_caching=caching, watermark=watermark),
        num_blocks=num_blocks,
    )
    budget = max_num_seqs + extra_budget
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs), kv)
    live = [
        Request(f"r{i}", tokens, max_tokens, stop_token_ids=[0])
        for i, (tokens, max_tokens) in enumerate(requests)
    ]
    for request in live:
        scheduler.add_request(request)
    outputs = run_to_completion(scheduler, FakeRunner(num_blocks, block_size, VOCAB), max_steps=5_000)
    for out in outputs:
        assert out.num_tokens <= budget and out.num_seqs <= max_num_seqs
    for request in live:
        alone = Request("x", request.prompt_token_ids, request.max_tokens, stop_token_ids=[0])
        assert request.output_token_ids == reference_generation(alone, VOCAB)
        assert request.is_finished
    assert kv.num_free_blocks == num_blocks and kv.stats().num_requests == 0
