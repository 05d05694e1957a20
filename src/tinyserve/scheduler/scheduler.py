"""Token-budget continuous batching: which tokens of which requests run in the next step.

One rule, no prefill/decode phases: every request has `num_computed_tokens` chasing its number of
known tokens (prompt + sampled). Each step, running requests (in admission order) and then waiting
ones (FCFS) get up to that many tokens each, under `max_num_batched_tokens` and `max_num_seqs`.
A long prompt therefore runs in chunks (chunked prefill), decodes and chunks share a step, cached
prefix blocks count as computed, and a preempted request simply recomputes from its tokens.

Preemption: when a running request can't get the blocks it needs, the most recently admitted
running request is preempted (blocks freed, re-queued at the front), repeatedly, possibly down to the
request itself. Requests scheduled earlier in the step are older and never preempted.

NOTE: no deadlock and no dropped request: a request is accepted only if its worst case
(prompt + max_tokens - 1 KV slots) fits the whole pool; the oldest running request is never a victim
while any other runs, so it can always grow until it finishes; the admission watermark is waived
when nothing runs, so the head of the queue can always start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate, chain, compress, repeat
from operator import add, attrgetter, eq, getitem, ne, sub

from tinyserve.config import SchedulerConfig
from tinyserve.kv_cache.errors import NoFreeBlocksError, RequestTooLargeError
from tinyserve.kv_cache.manager import KVCacheManager
from tinyserve.request import Request, RequestStatus

from .output import SchedulerOutput

FinishCheck = Callable[[Request, int], "RequestStatus | None"]
"""Called after each sampled token is appended: returns a FINISHED_* status to stop, else None.
The scheduler itself enforces max_tokens (FINISHED_LENGTH) after the hook."""


def stop_on_stop_token_ids(request: Request, token_id: int) -> RequestStatus | None:
    """The default FinishCheck: stop when the sampled token is one of the request's stop_token_ids."""
    return RequestStatus.FINISHED_STOPPED if token_id in request.stop_token_ids else None


class Scheduler:
    """Continuous batching over one KVCacheManager.

    Args:
        config: per-step token budget, running-request limit, max_model_len.
        kv_cache: the block manager (the scheduler is its only writer).
        finish_check: the engine's stop hook (min_tokens, ignore_eos, ...); see FinishCheck.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        finish_check: FinishCheck = stop_on_stop_token_ids,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.finish_check = finish_check
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}  # every live (not finished) request
        self._finished_req_ids: list[str] = []  # since the last schedule()
        self._next_arrival_order = 0
        self.num_preemptions = 0
        # The latest step, so that update() can skip looking its requests up by id.
        self._last_output: SchedulerOutput | None = None
        self._last_scheduled: list[Request] = []
        # Forked children running with blocks the runner hasn't seen: their first step sends the
        # whole block table.
        self._unsent_tables: set[str] = set()

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # ---- adding and removing requests ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS).

        Raises:
            ValueError: the id is already live, or the request isn't fresh (WAITING, nothing computed).
            RequestTooLargeError: prompt + max_tokens exceeds max_model_len or could never fit the
                KV pool; rejected now instead of waiting forever.
        """
        request_id = request.request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use by a live request")
        if request.status != RequestStatus.WAITING or request.num_computed_tokens or request.output_token_ids:
            raise ValueError(f"request {request_id!r} is not fresh ({request!r}); add new requests only")
        self.check_size(request)
        request.arrival_order = self._next_arrival_order
        self._next_arrival_order += 1
        self.requests[request_id] = request
        self.waiting.append(request)

    def check_size(self, request: Request) -> None:
        """Raise RequestTooLargeError if `request` exceeds max_model_len or could never fit the KV pool
        (add_request checks this too; callers adding several requests use it to reject all or none)."""
        total = request.num_prompt_tokens + request.max_tokens
        max_model_len = self.config.max_model_len
        if max_model_len is not None and total > max_model_len:
            raise RequestTooLargeError(
                f"request {request.request_id!r}: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.max_tokens}) = {total} exceeds max_model_len ({max_model_len})"
            )
        # The last sampled token is never fed back, so it needs no KV slot.
        self.kv_cache.check_fits(total - 1, what=f"request {request.request_id!r} (prompt + max_tokens - 1)")

    def abort(self, request_id: str) -> bool:
        """Abort a waiting, running or preempted request, freeing all its blocks. Returns False if the
        id is unknown or already finished (aborts race with finishing)."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Finish a live request from outside a step (a stop string, an abort); frees its blocks.
        Returns False if the id is unknown or already finished."""
        if not status.is_finished:
            raise ValueError(f"status must be one of the FINISHED_* statuses, got {status.name}")
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status)
        return True

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if self.kv_cache.has_table(request.request_id):
            self.kv_cache.free(request.request_id)
            request.block_ids = []
            self._unsent_tables.discard(request.request_id)
        del self.requests[request.request_id]
        self._finished_req_ids.append(request.request_id)

    def fork(self, parent_id: str, child_id: str, output_token_ids: Sequence[int] | None = None) -> Request:
        """A new request sharing a running parent's KV blocks (n > 1 sampling).

        The child copies the parent's prompt, limits, sampling_params and computed tokens; its output
        tokens are the parent's, or `output_token_ids` when given, which must agree with the parent's
        on every computed token and leave at least one token to compute. Shared blocks are copied
        on first write (reported in SchedulerOutput.block_copies).

        Call it between steps, or after the step that computed the parent's whole prompt but before
        its update(): the parent has no output yet, and output_token_ids=[the child's own first
        sample] gives each child a different start. Given output tokens go through the finish check
        like sampled ones; a child that is finished at once is returned finished and never runs.
        If max_num_seqs requests already run, the child waits at the front of the queue instead
        (without blocks; it recomputes, mostly from the prefix cache).
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.status != RequestStatus.RUNNING:
            state = "unknown or finished" if parent is None else parent.status.name
            raise ValueError(f"can only fork a running request; {parent_id!r} is {state}")
        if child_id in self.requests:
            raise ValueError(f"request id {child_id!r} is already in use by a live request")
        computed = parent.num_computed_tokens
        child = Request(
            child_id,
            parent.prompt_token_ids,
            parent.max_tokens,
            sampling_params=parent.sampling_params,
            stop_token_ids=parent.stop_token_ids,
            cache_extra_keys=parent.cache_extra_keys,
            arrival_time=parent.arrival_time,
        )
        child.output_token_ids = list(
            parent.output_token_ids if output_token_ids is None else output_token_ids
        )
        child.all_token_ids = child.prompt_token_ids + child.output_token_ids
        if child.num_output_tokens > child.max_tokens:
            raise ValueError(
                f"fork {child_id!r}: {child.num_output_tokens} output tokens exceed "
                f"max_tokens ({child.max_tokens})"
            )
        if child.num_tokens <= computed or child.all_token_ids[:computed] != parent.all_token_ids[:computed]:
            raise ValueError(
                f"fork {child_id!r}: its tokens must equal the parent's on the {computed} computed tokens "
                f"and add at least one more; got {child.num_tokens} tokens"
            )
        child.arrival_order = self._next_arrival_order
        self._next_arrival_order += 1
        if output_token_ids is not None and child.output_token_ids:
            status = self.finish_check(child, child.output_token_ids[-1])
            if status is None and child.num_output_tokens >= child.max_tokens:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                child.status = status
                return child
        self.requests[child_id] = child
        if len(self.running) < self.config.max_num_seqs:
            self.kv_cache.fork(parent_id, child_id)
            child.block_ids = self.kv_cache.block_ids(child_id)
            child.num_computed_tokens = computed
            child.status = RequestStatus.RUNNING
            self.running.append(child)
            self._unsent_tables.add(child_id)
        else:
            self.waiting.appendleft(child)
        return child

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens, allocate their KV slots, and advance num_computed_tokens.

        NOTE: num_computed_tokens counts the scheduled tokens as computed from here on; the step
        must run before the next schedule() (one step in flight)."""
        allocate = self.kv_cache.allocate
        unsent = self._unsent_tables
        budget = self.config.max_num_batched_tokens
        running = self.running
        batch = _BatchBuilder()
        scheduled = batch.requests
        append_request = scheduled.append
        append_num_scheduled = batch.num_scheduled.append
        append_num_computed = batch.num_computed.append
        append_start = batch.starts.append
        # The hot loop: one pass over the running requests; the rest is built by C-level maps.
        # NOTE: preemption pops from the end of `running`, behind the loop's position, so
        # iterating the list while it shrinks is safe.
        for request in running:
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            num_new = len(request.all_token_ids) - computed
            if num_new > budget:
                num_new = budget
            elif num_new <= 0:
                raise RuntimeError(
                    f"running request {request.request_id!r} has no token left to compute: the previous "
                    "step's update() with its sampled token is missing"
                )
            try:
                start = allocate(request.request_id, computed + num_new, request.all_token_ids)
            except NoFreeBlocksError:
                start = self._preempt_until_allocated(request, computed + num_new, batch.preempted_req_ids)
                if start < 0:
                    break  # the request itself was preempted; everything after it was too
            if unsent and request.request_id in unsent:
                unsent.discard(request.request_id)
                start = 0
            append_request(request)
            append_num_scheduled(num_new)
            append_num_computed(computed)
            append_start(start)
            request.num_computed_tokens = computed + num_new
            budget -= num_new
        if not batch.preempted_req_ids:
            self._admit_waiting(budget, batch)
        finished = self._finished_req_ids
        self._finished_req_ids = []
        output = batch.build(self.kv_cache, finished)
        self._last_output = output
        self._last_scheduled = scheduled
        return output

    def _preempt_until_allocated(self, request: Request, num_tokens: int, preempted: list[str]) -> int:
        """Preempt running requests from the most recent one until `request` gets its slots. Returns
        the table's first changed index, or -1 if `request` itself had to be preempted."""
        running = self.running
        while True:
            victim = running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return -1
            try:
                return self.kv_cache.allocate(request.request_id, num_tokens, request.all_token_ids)
            except NoFreeBlocksError:
                continue

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        self._unsent_tables.discard(request.request_id)
        request.block_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, batch: _BatchBuilder) -> None:
        # FCFS: stop at the first request that doesn't fit (no overtaking, so no starvation).
        kv = self.kv_cache
        waiting = self.waiting
        running = self.running
        max_num_seqs = self.config.max_num_seqs
        while waiting and budget > 0 and len(running) < max_num_seqs:
            request = waiting[0]
            request_id = request.request_id
            tokens = request.all_token_ids
            prefix = kv.find_cached_prefix(tokens, request.cache_extra_keys)
            num_new = min(len(tokens) - prefix.num_tokens, budget)
            # The watermark keeps room for running requests to grow; with none running it would only
            # block a request that fits the pool.
            if not kv.can_allocate(prefix.num_tokens + num_new, prefix, use_watermark=bool(running)):
                break
            kv.allocate(request_id, prefix.num_tokens + num_new, tokens, prefix, request.cache_extra_keys)
            waiting.popleft()
            running.append(request)
            request.status = RequestStatus.RUNNING
            request.block_ids = kv.block_ids(request_id)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = prefix.num_tokens
            batch.requests.append(request)
            batch.num_scheduled.append(num_new)
            batch.num_computed.append(prefix.num_tokens)
            batch.starts.append(0)
            request.num_computed_tokens = prefix.num_tokens + num_new
            budget -= num_new

    def update(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Sequence[Sequence[int]]
    ) -> list[Request]:
        """Append the step's sampled tokens and finish requests that stop.

        Args:
            scheduler_output: the step's output from schedule().
            sampled_token_ids: [num_seqs] sampled ids per scheduled sequence, in req_ids order; used
                only where do_sample is True (usually one id; each is appended in turn, stopping at
                the first that finishes the request). Entries of other sequences are ignored.

        Returns:
            The requests that received tokens, in step order; check `is_finished` on each. Finished
            requests have released their blocks and left the scheduler.
        """
        req_ids = scheduler_output.req_ids
        if len(sampled_token_ids) != len(req_ids):
            raise ValueError(
                f"sampled_token_ids has {len(sampled_token_ids)} entries; expected one per scheduled "
                f"sequence ({len(req_ids)})"
            )
        if scheduler_output is self._last_output:
            requests: Sequence[Request | None] = self._last_scheduled
        else:
            requests = [self.requests.get(request_id) for request_id in req_ids]
        finish_check = self.finish_check
        default_check = finish_check is stop_on_stop_token_ids
        running = RequestStatus.RUNNING
        stopped = RequestStatus.FINISHED_STOPPED
        updated: list[Request] = []
        any_finished = False
        for request, sample, token_ids in zip(
            requests, scheduler_output.do_sample, sampled_token_ids, strict=True
        ):
            if not sample or request is None or request.status != running:
                continue  # a prefill chunk, or aborted/finished since the step was scheduled
            if not token_ids:
                raise ValueError(
                    f"request {request.request_id!r} computed its last token this step and needs a "
                    "sampled token"
                )
            outputs = request.output_token_ids
            for token_id in token_ids:
                outputs.append(token_id)
                request.all_token_ids.append(token_id)
                if default_check:
                    status = stopped if token_id in request.stop_token_ids else None
                else:
                    status = finish_check(request, token_id)
                if status is None and len(outputs) >= request.max_tokens:
                    status = RequestStatus.FINISHED_LENGTH
                if status is not None:
                    if not status.is_finished:
                        raise ValueError(
                            f"finish_check must return a FINISHED_* status or None, got {status.name}"
                        )
                    self._finish(request, status)
                    any_finished = True
                    break
            updated.append(request)
        if any_finished:
            self.running = [r for r in self.running if r.status == running]
        return updated


class _BatchBuilder:
    """One step's scheduled requests and their counts; `build` turns them into a SchedulerOutput
    with C-level map/chain passes instead of per-request Python appends."""

    __slots__ = ("requests", "num_scheduled", "num_computed", "starts", "preempted_req_ids")

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.num_scheduled: list[int] = []
        self.num_computed: list[int] = []  # before this step
        self.starts: list[int] = []  # first block-table index that changed
        self.preempted_req_ids: list[str] = []

    def build(self, kv: KVCacheManager, finished_req_ids: list[str]) -> SchedulerOutput:
        requests = self.requests
        num_scheduled = self.num_scheduled
        num_computed = self.num_computed
        token_lists = list(map(_get_tokens, requests))
        block_tables = list(map(_get_block_ids, requests))
        seq_lens = list(map(add, num_computed, num_scheduled))
        do_sample = list(map(eq, seq_lens, map(len, token_lists)))
        query_start_loc = [0, *accumulate(num_scheduled)]
        num_tokens = query_start_loc[-1]
        starts = self.starts
        changed_rows = list(compress(range(len(starts)), map(ne, starts, map(len, block_tables))))
        if num_tokens == len(requests):  # decodes only: one token each
            positions = list(num_computed)
            input_ids = list(map(getitem, token_lists, num_computed))
        else:
            positions = list(chain.from_iterable(map(range, num_computed, seq_lens)))
            input_ids = list(
                chain.from_iterable(map(getitem, token_lists, map(slice, num_computed, seq_lens)))
            )
        return SchedulerOutput(
            req_ids=list(map(_get_request_id, requests)),
            num_scheduled_tokens=num_scheduled,
            num_computed_tokens=num_computed,
            seq_lens=seq_lens,
            do_sample=do_sample,
            block_tables=block_tables,
            changed_rows=changed_rows,
            changed_row_starts=[starts[i] for i in changed_rows],
            changed_row_block_ids=[block_tables[i][starts[i] :] for i in changed_rows],
            input_token_ids=input_ids,
            positions=positions,
            slot_mapping=kv.slot_mapping(block_tables, num_computed, num_scheduled),
            query_start_loc=query_start_loc,
            logits_indices=list(map(sub, compress(query_start_loc[1:], do_sample), repeat(1))),
            block_copies=kv.take_block_copies(),
            preempted_req_ids=self.preempted_req_ids,
            finished_req_ids=finished_req_ids,
            num_tokens=num_tokens,
            max_query_len=max(num_scheduled, default=0),
            max_seq_len=max(seq_lens, default=0),
        )


_get_tokens = attrgetter("all_token_ids")
_get_block_ids = attrgetter("block_ids")
_get_request_id = attrgetter("request_id")
