"""Scheduler: token budget, chunked prefill, mixed steps, prefix hits, preemption, abort, fork, errors.

No model: FakeRunner stores (token, position) per KV slot and "samples" a hash of the context it
reads back through the block tables, so every test also checks the slot mapping and block tables.
"""

from __future__ import annotations

import random

import pytest

from tinyserve.kv_cache.errors import RequestTooLargeError
from tinyserve.request import Request, RequestStatus
from tinyserve.scheduler.output import SchedulerOutput
from tinyserve.scheduler.scheduler import Scheduler

from .fake_runner import VOCAB, FakeRunner, make, prompt, reference_generation, run_to_completion


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out, scheduler.requests))
    return out


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.stats().num_requests == 0
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting


def test_empty_scheduler_returns_an_empty_output() -> None:
    scheduler, _ = make()
    out = scheduler.schedule()
    assert out.is_empty and out.num_tokens == 0 and out.query_start_loc == [0]
    assert (out.max_query_len, out.max_seq_len) == (0, 0)
    assert scheduler.update(out, []) == []


def test_chunked_prefill_then_decode() -> None:
    scheduler, runner = make(budget=16)
    request = Request("a", prompt(50, 0), max_tokens=3)
    scheduler.add_request(request)
    chunks = []
    while scheduler.has_unfinished_requests():
        out = step(scheduler, runner)
        chunks.append((out.num_computed_tokens[0], out.num_scheduled_tokens[0], out.do_sample[0]))
    assert chunks == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
        (50, 1, True),
        (51, 1, True),
    ]
    assert request.output_token_ids == reference_generation(Request("x", request.prompt_token_ids, 3), VOCAB)
    assert request.status is RequestStatus.FINISHED_LENGTH and request.finish_reason == "length"
    assert_all_blocks_free(scheduler)


def test_decodes_and_a_prefill_chunk_share_a_step() -> None:
    scheduler, runner = make(budget=10)
    scheduler.add_request(Request("a", prompt(5, 1), max_tokens=10))
    out = step(scheduler, runner)
    assert out.req_ids == ["a"] and out.num_scheduled_tokens == [5]
    scheduler.add_request(Request("b", prompt(30, 2), max_tokens=10))
    out = step(scheduler, runner)
    assert out.req_ids == ["a", "b"]
    assert out.num_scheduled_tokens == [1, 9]  # a's decode first, then b's chunk fills the budget
    assert out.do_sample == [True, False]
    assert out.query_start_loc == [0, 1, 10] and out.logits_indices == [0]
    assert out.positions == [5, *range(9)]


def test_budget_and_max_num_seqs_are_respected() -> None:
    scheduler, runner = make(num_blocks=200, budget=12, max_num_seqs=3)
    for i in range(10):
        scheduler.add_request(Request(f"r{i}", prompt(3 + 2 * i, i), max_tokens=5))
    for out in run_to_completion(scheduler, runner):
        assert out.num_tokens <= 12
        assert out.num_seqs <= 3
        assert len(scheduler.running) <= 3
    assert_all_blocks_free(scheduler)


def test_fcfs_admission_without_overtaking() -> None:
    scheduler, runner = make(num_blocks=6, block_size=4, budget=64)
    scheduler.add_request(Request("big", prompt(16, 0), max_tokens=2))  # 4 blocks
    scheduler.add_request(Request("huge", prompt(20, 1), max_tokens=1))  # 5 blocks: waits for "big"
    scheduler.add_request(Request("small", prompt(2, 2), max_tokens=1))  # would fit, but must not overtake
    out = step(scheduler, runner)
    assert out.req_ids == ["big"]
    assert [r.request_id for r in scheduler.waiting] == ["huge", "small"]
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_prefix_cache_hits_count_as_computed() -> None:
    scheduler, runner = make(block_size=4)
    system = prompt(12, 7)
    first = Request("first", system + [1, 2], max_tokens=2)
    scheduler.add_request(first)
    run_to_completion(scheduler, runner)
    second = Request("second", system + [3, 4, 5], max_tokens=2)
    scheduler.add_request(second)
    out = step(scheduler, runner)
    assert out.num_computed_tokens == [12] and out.num_scheduled_tokens == [3]
    assert second.num_cached_tokens == 12
    assert out.changed_row_starts == [0] and len(out.block_tables[0]) == 4
    run_to_completion(scheduler, runner)
    assert second.output_token_ids == reference_generation(Request("x", second.prompt_token_ids, 2), VOCAB)
    assert scheduler.kv_cache.stats().prefix_cache_hits == 12


def test_fully_cached_prompt_recomputes_its_last_block() -> None:
    scheduler, runner = make(block_size=4)
    tokens = prompt(8, 3)
    scheduler.add_request(Request("a", tokens, max_tokens=1))
    run_to_completion(scheduler, runner)
    scheduler.add_request(Request("b", tokens, max_tokens=1))
    out = step(scheduler, runner)
    assert out.num_computed_tokens == [4] and out.num_scheduled_tokens == [4] and out.do_sample == [True]
    assert_all_blocks_free(scheduler)


def test_concurrent_requests_with_a_shared_prompt() -> None:
    scheduler, runner = make(block_size=4, budget=64)
    system = prompt(16, 9)
    requests = [Request(f"r{i}", system + prompt(3, 100 + i), max_tokens=4) for i in range(4)]
    for r in requests:
        scheduler.add_request(r)
    step(scheduler, runner)  # r0 indexes the shared blocks as it allocates; r1..r3 hit them
    assert [r.num_cached_tokens for r in requests] == [0, 16, 16, 16]
    run_to_completion(scheduler, runner)
    for r in requests:
        assert r.output_token_ids == reference_generation(Request("x", r.prompt_token_ids, 4), VOCAB)
    assert_all_blocks_free(scheduler)


def test_preemption_with_a_tiny_pool_finishes_everything_with_the_same_tokens() -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], Scheduler, list[SchedulerOutput]]:
        scheduler, runner = make(num_blocks=num_blocks, block_size=4, budget=24, max_num_seqs=6)
        requests = [Request(f"r{i}", prompt(5 + 3 * i, i), max_tokens=12 + i) for i in range(12)]
        for r in requests:
            scheduler.add_request(r)
        outputs = run_to_completion(scheduler, runner)
        assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)
        assert_all_blocks_free(scheduler)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler, outputs

    large, large_scheduler, _ = run(num_blocks=512)
    small, small_scheduler, outputs = run(num_blocks=15)  # the largest request needs 15 blocks
    assert large_scheduler.num_preemptions == 0
    assert small_scheduler.num_preemptions > 0
    assert small == large
    assert any(out.preempted_req_ids for out in outputs)


def test_the_most_recently_admitted_request_is_preempted_and_requeued_first() -> None:
    scheduler, runner = make(num_blocks=4, block_size=2, budget=64)
    for name in "abcd":
        scheduler.add_request(Request(name, prompt(2, ord(name)), max_tokens=5))
    out = step(scheduler, runner)  # one full block each: the pool is full
    assert out.req_ids == ["a", "b", "c", "d"] and scheduler.kv_cache.num_free_blocks == 0
    out = step(scheduler, runner)  # every decode needs a new block: a preempts d, b preempts c
    assert out.req_ids == ["a", "b"] and out.preempted_req_ids == ["d", "c"]
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]  # front of the queue, FCFS kept
    c = scheduler.get_request("c")
    assert c is not None
    assert (c.status, c.num_computed_tokens, c.num_preemptions, c.block_ids) == (
        RequestStatus.PREEMPTED,
        0,
        1,
        [],
    )
    assert c.num_output_tokens == 1  # kept: it is recomputed, not resampled
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_a_request_preempts_itself_when_it_is_the_most_recent() -> None:
    scheduler, runner = make(num_blocks=3, block_size=2, budget=64)
    scheduler.add_request(Request("a", prompt(4, 0), max_tokens=2))  # 2 blocks, then 3
    scheduler.add_request(Request("b", prompt(2, 1), max_tokens=3))  # 1 block, then 2
    step(scheduler, runner)
    out = step(scheduler, runner)  # a takes the last block; b finds none and only itself to preempt
    assert out.req_ids == ["a"] and out.preempted_req_ids == ["b"]
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_a_request_alone_can_use_the_whole_pool_despite_the_watermark() -> None:
    scheduler, runner = make(num_blocks=10, block_size=4, watermark=0.5)
    scheduler.add_request(Request("a", prompt(32, 0), max_tokens=9))  # 40 tokens = the whole pool
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_watermark_holds_back_new_requests_while_others_run() -> None:
    scheduler, runner = make(num_blocks=10, block_size=4, watermark=0.3)
    scheduler.add_request(Request("a", prompt(8, 0), max_tokens=4))  # 2 blocks
    step(scheduler, runner)
    scheduler.add_request(Request("b", prompt(20, 1), max_tokens=1))  # 5 blocks: 8 - 5 < 3 reserved
    out = step(scheduler, runner)
    assert out.req_ids == ["a"] and scheduler.num_waiting == 1
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_requests_that_can_never_fit_are_rejected_up_front() -> None:
    scheduler, _ = make(num_blocks=4, block_size=4, max_model_len=100)
    scheduler.add_request(Request("fits", prompt(10, 0), max_tokens=7))  # 16 slots: the whole pool
    with pytest.raises(
        RequestTooLargeError, match=r"'too-long'.*needs up to 17 tokens .* whole pool holds 16"
    ):
        scheduler.add_request(Request("too-long", prompt(10, 0), max_tokens=8))
    with pytest.raises(RequestTooLargeError, match=r"= 101 exceeds max_model_len \(100\)"):
        scheduler.add_request(Request("over-len", prompt(1, 0), max_tokens=100))
    assert list(scheduler.requests) == ["fits"]


def test_add_request_errors() -> None:
    scheduler, _ = make()
    scheduler.add_request(Request("a", [1], max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(Request("a", [2], max_tokens=1))
    used = Request("b", [1], max_tokens=2)
    used.append_output_token(3)
    with pytest.raises(ValueError, match="not fresh"):
        scheduler.add_request(used)


@pytest.mark.parametrize("when", ["waiting", "running", "mid-prefill", "preempted"])
def test_abort_frees_every_block(when: str) -> None:
    budget, max_num_seqs = (4, 4) if when == "mid-prefill" else (64, 8)
    scheduler, runner = make(num_blocks=6, block_size=2, budget=budget, max_num_seqs=max_num_seqs)
    for name in "abc":
        scheduler.add_request(
            Request(name, prompt(9 if when == "mid-prefill" else 3, ord(name)), max_tokens=4)
        )
    target = "a" if when in ("running", "mid-prefill") else "c"
    expected_status = {
        "waiting": RequestStatus.WAITING,
        "running": RequestStatus.RUNNING,
        "mid-prefill": RequestStatus.RUNNING,
        "preempted": RequestStatus.PREEMPTED,
    }[when]
    request = scheduler.get_request(target)
    assert request is not None
    for _ in range(10):
        if when == "waiting" or request.status is expected_status:
            break
        step(scheduler, runner)
    assert request.status is expected_status
    if when == "mid-prefill":
        assert 0 < request.num_computed_tokens < request.num_prompt_tokens
    assert scheduler.abort(target)
    assert request.status is RequestStatus.FINISHED_ABORTED and request.finish_reason == "abort"
    assert request.block_ids == [] and not scheduler.kv_cache.has_table(target)
    assert target not in scheduler.requests and request not in scheduler.running + list(scheduler.waiting)
    assert not scheduler.abort(target)  # already finished
    assert not scheduler.abort("unknown")
    out = scheduler.schedule()
    assert target in out.finished_req_ids and target not in out.req_ids
    scheduler.update(out, runner.execute(out, scheduler.requests))
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_abort_between_schedule_and_update_drops_the_sample() -> None:
    scheduler, runner = make()
    scheduler.add_request(Request("a", prompt(4, 0), max_tokens=5))
    out = scheduler.schedule()
    sampled = runner.execute(out, scheduler.requests)
    scheduler.abort("a")
    assert scheduler.update(out, sampled) == []
    assert_all_blocks_free(scheduler)


def test_stop_token_and_custom_finish_check() -> None:
    scheduler, runner = make()
    tokens = prompt(6, 5)
    expected = reference_generation(Request("x", tokens, 10), VOCAB)
    stop = expected[2]
    request = Request("a", tokens, max_tokens=10, stop_token_ids=[stop])
    scheduler.add_request(request)
    run_to_completion(scheduler, runner)
    assert request.output_token_ids == expected[: expected.index(stop) + 1]
    assert request.status is RequestStatus.FINISHED_STOPPED and request.finish_reason == "stop"

    def ignore_stops(request: Request, token_id: int) -> RequestStatus | None:
        return None  # e.g. ignore_eos: only max_tokens ends the request

    scheduler, runner = make(finish_check=ignore_stops)
    request = Request("a", tokens, max_tokens=10, stop_token_ids=[stop])
    scheduler.add_request(request)
    run_to_completion(scheduler, runner)
    assert request.output_token_ids == expected and request.status is RequestStatus.FINISHED_LENGTH


def test_finish_request_from_outside_a_step() -> None:
    scheduler, runner = make()
    scheduler.add_request(Request("a", prompt(4, 0), max_tokens=10))
    step(scheduler, runner)
    assert scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string
    assert_all_blocks_free(scheduler)
    with pytest.raises(ValueError, match="FINISHED_"):
        scheduler.finish_request("a", RequestStatus.RUNNING)


def test_update_errors() -> None:
    scheduler, runner = make()
    scheduler.add_request(Request("a", prompt(4, 0), max_tokens=10))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="expected one per scheduled sequence"):
        scheduler.update(out, [])
    with pytest.raises(ValueError, match="needs a sampled token"):
        scheduler.update(out, [[]])

    scheduler, runner = make(finish_check=lambda request, token: RequestStatus.RUNNING)
    scheduler.add_request(Request("a", prompt(4, 0), max_tokens=10))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="FINISHED_\\* status or None, got RUNNING"):
        scheduler.update(out, [[1]])


def test_update_with_several_tokens_stops_at_the_first_finishing_one() -> None:
    scheduler, runner = make()
    request = Request("a", prompt(4, 0), max_tokens=10, stop_token_ids=[7])
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert scheduler.update(out, [[1, 7, 2]]) == [request]
    assert request.output_token_ids == [1, 7] and request.is_finished


def test_fork_shares_the_prompt_and_copies_the_partial_block_on_write() -> None:
    scheduler, runner = make(block_size=4)
    parent = Request("p", prompt(6, 11), max_tokens=5)  # blocks: [4 full, 2 of 4]
    scheduler.add_request(parent)
    step(scheduler, runner)  # prefill, first token sampled
    first = parent.output_token_ids[0]
    children = [scheduler.fork("p", f"c{i}", output_token_ids=[(first + i) % VOCAB]) for i in (1, 2)]
    assert children[0].block_ids == parent.block_ids and children[0].num_computed_tokens == 6
    out = step(scheduler, runner)
    assert out.req_ids == ["p", "c1", "c2"]
    assert len(out.block_copies) == 2  # p and c1 copy the shared partial block; c2 then owns it
    assert out.changed_rows == [0, 1, 2]
    assert out.changed_row_starts == [1, 0, 0]  # p's copy; the children's whole tables are new to the runner
    run_to_completion(scheduler, runner)
    for request in [parent, *children]:
        start = Request("x", request.prompt_token_ids, 5)
        start.append_output_token(request.output_token_ids[0])
        assert request.output_token_ids == reference_generation(start, VOCAB)
    assert len({tuple(r.output_token_ids) for r in [parent, *children]}) == 3
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("max_tokens", [1, 4])
def test_fork_right_after_the_prompt_step_gives_each_child_its_own_first_sample(max_tokens: int) -> None:
    scheduler, runner = make(block_size=4)
    parent = Request("p", prompt(7, 12), max_tokens=max_tokens)
    scheduler.add_request(parent)
    out = scheduler.schedule()
    sampled = runner.execute(out, scheduler.requests)  # the runner samples n = 3 ids from p's logits
    first = sampled[0][0]
    children = [scheduler.fork("p", f"c{i}", output_token_ids=[(first + i) % VOCAB]) for i in (1, 2)]
    scheduler.update(out, sampled)
    assert [c.is_finished for c in children] == [max_tokens == 1] * 2
    run_to_completion(scheduler, runner)
    for request in [parent, *children]:
        assert request.num_output_tokens == max_tokens and request.finish_reason == "length"
        start = Request("x", request.prompt_token_ids, max_tokens)
        start.append_output_token(request.output_token_ids[0])
        assert request.output_token_ids == reference_generation(start, VOCAB)
    assert_all_blocks_free(scheduler)


def test_fork_errors_and_fork_into_the_queue_when_full() -> None:
    scheduler, runner = make(max_num_seqs=1)
    scheduler.add_request(Request("p", prompt(5, 0), max_tokens=4))
    with pytest.raises(ValueError, match="can only fork a running request; 'p' is WAITING"):
        scheduler.fork("p", "c")
    step(scheduler, runner)
    with pytest.raises(ValueError, match="already in use"):
        scheduler.fork("p", "p")
    with pytest.raises(ValueError, match="must equal the parent's"):
        scheduler.fork("p", "c", output_token_ids=[])
    with pytest.raises(ValueError, match=r"5 output tokens exceed max_tokens \(4\)"):
        scheduler.fork("p", "c", output_token_ids=[1] * 5)
    with pytest.raises(ValueError, match="can only fork a running request; 'nope' is unknown"):
        scheduler.fork("nope", "c")
    child = scheduler.fork("p", "c")  # max_num_seqs reached: the child waits without blocks
    assert child.status is RequestStatus.WAITING and child.block_ids == []
    assert scheduler.waiting[0] is child
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_no_block_leaked_after_1000_random_requests() -> None:
    rng = random.Random(1234)
    scheduler, runner = make(num_blocks=48, block_size=4, budget=48, max_num_seqs=12)
    systems = [prompt(rng.randrange(4, 20), 500 + i) for i in range(4)]
    live: list[Request] = []
    num_added = num_aborted = num_forked = 0
    steps = 0
    while num_added < 1000 or scheduler.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4)):
            if num_added < 1000:
                head = rng.choice(systems) if rng.random() < 0.5 else []
                tokens = head + prompt(rng.randrange(1, 40), num_added)
                request = Request(
                    f"r{num_added}", tokens, max_tokens=rng.randrange(1, 30), stop_token_ids=[0]
                )
                scheduler.add_request(request)
                live.append(request)
                num_added += 1
        if live and rng.random() < 0.05:
            num_aborted += scheduler.abort(rng.choice(live).request_id)
        running = [r for r in scheduler.running if r.num_computed_tokens == r.num_tokens - 1]
        if running and rng.random() < 0.05:
            parent = rng.choice(running)
            live.append(scheduler.fork(parent.request_id, f"{parent.request_id}-fork{num_forked}"))
            num_forked += 1
        step(scheduler, runner)
        steps += 1
        live = [r for r in live if not r.is_finished]
        assert steps < 50_000
    assert num_aborted > 10 and num_forked > 10 and scheduler.num_preemptions > 0
    assert_all_blocks_free(scheduler)
    assert scheduler.kv_cache.stats().prefix_cache_hits > 0
