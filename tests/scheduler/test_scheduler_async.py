"""Async scheduling: schedule() of step n + 1 runs before update() of step n, feeding placeholders.

The driver below plays the engine's order (schedule n + 1, then update n) with the FakeRunner, which
takes each placeholder's id from the previous step's samples, as the real runner does on the device.
Every request must end with the tokens it gets alone and every block must be free at the end.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.config import CacheConfig, SchedulerConfig
from tinyserve.kv_cache.manager import KVCacheManager
from tinyserve.request import Request, RequestStatus
from tinyserve.scheduler.output import SchedulerOutput
from tinyserve.scheduler.scheduler import Scheduler

from .fake_runner import (
    SMALL_VOCAB,
    VOCAB,
    FakeRunner,
    blocks_for_largest,
    prompt,
    random_requests,
    reference_generation,
)
from .fake_runner import make as make_scheduler


def make(**kwargs) -> tuple[Scheduler, FakeRunner]:
    """fake_runner.make with async scheduling on."""
    return make_scheduler(async_scheduling=True, **kwargs)


class AsyncDriver:
    """Steps like the engine with async scheduling: schedule step n + 1, then update step n, then
    run step n + 1 with its placeholders replaced by step n's samples."""

    def __init__(self, scheduler: Scheduler, runner: FakeRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.requests: dict[str, Request] = {}  # every request ever added (finished ones too)
        self.in_flight: tuple[SchedulerOutput, list[list[int]]] | None = None
        self.outputs: list[SchedulerOutput] = []

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self.requests[request.request_id] = request

    def step(self) -> None:
        out = self.scheduler.schedule()
        self.outputs.append(out)
        previous_samples: list[int] = []
        if self.in_flight is not None:
            previous, sampled = self.in_flight
            self.scheduler.update(previous, sampled)
            previous_samples = [s[0] for s, d in zip(sampled, previous.do_sample, strict=True) if d]
        input_ids = list(out.input_token_ids)
        for row, source in zip(out.placeholder_rows, out.placeholder_sources, strict=True):
            assert out.num_scheduled_tokens[row] == 1 and out.do_sample[row]
            assert input_ids[out.query_start_loc[row]] == 0
            input_ids[out.query_start_loc[row]] = previous_samples[source]
        sampled = self.runner.execute(dataclasses.replace(out, input_token_ids=input_ids), self.requests)
        self.in_flight = (out, sampled) if any(out.do_sample) else None

    def run(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests() and self.in_flight is None:
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps: deadlock?")


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.stats().num_requests == 0
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting


def test_decodes_are_fed_placeholders_for_the_step_in_flight() -> None:
    scheduler, runner = make()
    driver = AsyncDriver(scheduler, runner)
    for i in range(3):
        driver.add(Request(f"r{i}", prompt(3 + i, i), max_tokens=5))
    driver.step()  # the prompts; their first tokens are sampled
    first = scheduler.schedule()  # before update(): the sampled tokens are placeholders
    assert first.req_ids == ["r0", "r1", "r2"] and first.placeholder_rows == [0, 1, 2]
    assert first.placeholder_sources == [0, 1, 2] and first.input_token_ids == [0, 0, 0]
    assert first.positions == [3, 4, 5] and first.do_sample == [True, True, True]
    assert all(r.num_output_tokens == 0 for r in scheduler.running)
    with pytest.raises(RuntimeError, match="update\\(\\) of step n before schedule\\(\\) of step n \\+ 2"):
        scheduler.schedule()


def test_the_last_token_in_flight_is_not_fed() -> None:
    scheduler, runner = make()
    driver = AsyncDriver(scheduler, runner)
    driver.add(Request("a", prompt(5, 0), max_tokens=2))
    driver.add(Request("b", prompt(5, 1), max_tokens=1))
    driver.step()
    driver.step()  # a gets a placeholder; b's first token is its last, so it isn't scheduled
    assert driver.outputs[-1].req_ids == ["a"]
    driver.step()  # a's second token is its last
    assert driver.outputs[-1].is_empty
    driver.run()
    for request in driver.requests.values():
        assert request.output_token_ids == reference_generation(
            Request("x", request.prompt_token_ids, request.max_tokens), VOCAB
        )
    assert_all_blocks_free(scheduler)


def test_a_stop_token_drops_the_extra_token_and_frees_the_blocks() -> None:
    scheduler, runner = make(vocab=5)  # small vocabulary: stop tokens come early
    driver = AsyncDriver(scheduler, runner)
    for i in range(6):
        driver.add(Request(f"r{i}", prompt(6, i, vocab=5), max_tokens=30, stop_token_ids=[0]))
    driver.run()
    stopped = [r for r in driver.requests.values() if r.status is RequestStatus.FINISHED_STOPPED]
    assert stopped, "no request sampled the stop token"
    for request in driver.requests.values():
        alone = Request("x", request.prompt_token_ids, 30, stop_token_ids=[0])
        assert request.output_token_ids == reference_generation(alone, 5)
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_preemption_and_chunked_prefill_give_the_same_tokens(block_size: int, caching: bool) -> None:
    system = prompt(9, 99)  # a shared prefix for every other request
    requests = [
        Request(f"r{i}", (system if i % 2 else []) + prompt(5 + 2 * i, i), max_tokens=12 + i)
        for i in range(12)
    ]
    largest = max(r.num_prompt_tokens + r.max_tokens - 1 for r in requests)
    scheduler, runner = make(
        num_blocks=-(-largest // block_size) + 1,
        block_size=block_size,
        budget=10,
        max_num_seqs=6,
        caching=caching,
    )
    driver = AsyncDriver(scheduler, runner)
    for request in requests:
        driver.add(request)
    driver.run()
    for request in driver.requests.values():
        alone = Request("x", request.prompt_token_ids, request.max_tokens)
        assert request.output_token_ids == reference_generation(alone, VOCAB)
    assert scheduler.num_preemptions > 0
    # block size 1 with prefix caching: every token fills a block, so none can be a placeholder
    assert any(out.placeholder_rows for out in driver.outputs) == (block_size > 1 or not caching)
    assert_all_blocks_free(scheduler)


def test_a_placeholder_that_fills_a_block_is_hashed_once_known() -> None:
    scheduler, runner = make(block_size=4)
    driver = AsyncDriver(scheduler, runner)
    a = Request("a", prompt(6, 0), max_tokens=6)
    driver.add(a)
    driver.run()
    # a's second block (tokens 4..7) was filled by a placeholder: a later request finds it cached
    b = Request("b", a.all_token_ids[:9], max_tokens=2)
    driver.add(b)
    driver.run()
    assert b.num_cached_tokens == 8
    assert b.output_token_ids == reference_generation(Request("x", b.prompt_token_ids, 2), VOCAB)
    assert_all_blocks_free(scheduler)


def test_abort_between_schedule_and_update() -> None:
    scheduler, runner = make()
    driver = AsyncDriver(scheduler, runner)
    for i in range(4):
        driver.add(Request(f"r{i}", prompt(5, i), max_tokens=20))
    for _ in range(3):
        driver.step()
    assert scheduler.abort("r1") and scheduler.abort("r2")
    driver.run()
    assert driver.requests["r1"].finish_reason == "abort"
    assert driver.requests["r0"].num_output_tokens == 20
    assert_all_blocks_free(scheduler)


def test_fork_with_a_step_in_flight_copies_the_shared_block_before_writing() -> None:
    for block_size in (2, 3, 4):
        scheduler, runner = make(block_size=block_size)
        driver = AsyncDriver(scheduler, runner)
        parent = Request("p", prompt(6, 11), max_tokens=8)
        driver.add(parent)
        driver.step()
        driver.step()  # update: p has its first token; its second is in flight
        child_first = parent.output_token_ids + [(parent.output_token_ids[0] + 1) % VOCAB]
        child = scheduler.fork("p", "c", output_token_ids=child_first)
        driver.requests["c"] = child
        driver.run()
        for request in (parent, child):
            start = Request("x", request.prompt_token_ids, 8)
            for token_id in request.output_token_ids[: len(child_first) if request is child else 1]:
                start.append_output_token(token_id)
            assert request.output_token_ids == reference_generation(start, VOCAB)
        assert_all_blocks_free(scheduler)


@settings(max_examples=60, deadline=None)
@given(
    requests=random_requests,
    block_size=st.integers(1, 5),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    extra_budget=st.integers(0, 20),
    caching=st.booleans(),
    abort_at=st.integers(0, 30),
)
def test_random_workloads_match_the_reference(
    requests: list[tuple[list[int], int]],
    block_size: int,
    extra_blocks: int,
    max_num_seqs: int,
    extra_budget: int,
    caching: bool,
    abort_at: int,
) -> None:
    num_blocks = blocks_for_largest(requests, block_size) + extra_blocks
    kv = KVCacheManager(
        CacheConfig(block_size=block_size, enable_prefix_caching=caching, watermark=0.0),
        num_blocks=num_blocks,
    )
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_seqs + extra_budget, max_num_seqs=max_num_seqs, async_scheduling=True
    )
    scheduler = Scheduler(config, kv)
    driver = AsyncDriver(scheduler, FakeRunner(num_blocks, block_size, SMALL_VOCAB))
    for i, (tokens, max_tokens) in enumerate(requests):
        driver.add(Request(f"r{i}", tokens, max_tokens, stop_token_ids=[0]))
    for _ in range(abort_at):
        if scheduler.has_unfinished_requests() or driver.in_flight is not None:
            driver.step()
    scheduler.abort("r0")
    driver.run(max_steps=5_000)
    for request in driver.requests.values():
        alone = Request("x", request.prompt_token_ids, request.max_tokens, stop_token_ids=[0])
        alone = reference_generation(alone, SMALL_VOCAB)
        if request.finish_reason == "abort":
            assert alone[: request.num_output_tokens] == request.output_token_ids
        else:
            assert request.output_token_ids == alone
    for out in driver.outputs:
        assert out.num_tokens <= config.max_num_batched_tokens and out.num_seqs <= max_num_seqs
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize(("budget", "block_size"), [(12, 3), (16, 4), (48, 4)])
def test_no_block_leaked_after_1000_random_requests_with_aborts_and_forks(
    budget: int, block_size: int
) -> None:
    # Tight budgets leave forked children unscheduled next to their parent: the parent's placeholder
    # must not fill their shared block without copy-on-write (see Scheduler._can_defer).
    rng = random.Random(4321)
    scheduler, runner = make(num_blocks=48, block_size=block_size, budget=budget, max_num_seqs=12)
    driver = AsyncDriver(scheduler, runner)
    systems = [prompt(rng.randrange(4, 20), 500 + i) for i in range(4)]
    num_added = num_aborted = num_forked = 0
    while num_added < 1000 or scheduler.has_unfinished_requests() or driver.in_flight is not None:
        for _ in range(rng.randrange(0, 4)):
            if num_added < 1000:
                head = rng.choice(systems) if rng.random() < 0.5 else []
                tokens = head + prompt(rng.randrange(1, 40), num_added)
                driver.add(Request(f"r{num_added}", tokens, rng.randrange(1, 30), stop_token_ids=[0]))
                num_added += 1
        live = list(scheduler.requests)
        if live and rng.random() < 0.05:
            num_aborted += scheduler.abort(rng.choice(live))
        # a parent whose next token is in flight: the child starts from another one
        parents = [r for r in scheduler.running if r.num_computed_tokens == r.num_tokens < r.max_tokens - 1]
        if parents and rng.random() < 0.05:
            parent = rng.choice(parents)
            child_ids = [*parent.output_token_ids, rng.randrange(1, VOCAB)]
            child = scheduler.fork(parent.request_id, f"{parent.request_id}-fork{num_forked}", child_ids)
            driver.requests[child.request_id] = child
            num_forked += 1
        driver.step()
        assert len(driver.outputs) < 50_000
    assert num_aborted > 10 and num_forked > 10 and scheduler.num_preemptions > 0
    assert_all_blocks_free(scheduler)
    assert scheduler.kv_cache.stats().prefix_cache_hits > 0
    assert sum(len(out.block_copies) for out in driver.outputs) > 0
