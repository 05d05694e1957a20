"""Token-budget continuous batching: which tokens of which requests run in the next step.

One rule, no prefill/decode phases: every request has `num_computed_tokens` chasing its number of
known tokens (prompt + sampled). Each step, running requests (in admission order) and then waiting
ones (FCFS) get up to that many tokens each, under `max_num_batched_tokens` and `max_num_seqs`.
A long prompt therefore runs in chunks (chunked prefill), decodes and chunks share a step, cached
prefix blocks count as computed, and a preempted request simply recomputes from its tokens.

Preemption: when a running request can't get the blocks it needs, the most recently admitted
running request is preempted (blocks freed, re-queued at the front), repeatedly, possibly down to the
request itself. Requests scheduled earlier in the step are older and never preempted.

Async scheduling (SchedulerConfig.async_scheduling): the engine schedules step n + 1 while the
device still runs step n, before update() of step n. Every running request that step n samples
counts that token as known but not yet seen (a placeholder): step n + 1 feeds it at the next
position, and the runner takes its id from step n's sampled ids on the device. A placeholder that
is the request's last token (max_tokens) is not fed. A request that step n finishes (a stop token,
or a stop string the engine finds) has been scheduled once too often: update() drops its extra
token, and its blocks are freed as usual. A request that step n + 1 preempts still receives step
n's token at update(). A placeholder that fills a block delays the block's prefix-cache hash to
update(), when its token is known (see _can_defer).

NOTE: no deadlock and no dropped request: a request is accepted only if its worst case
(prompt + max_tokens - 1 KV slots) fits the whole pool; the oldest running request is never a victim
while any other runs, so it can always grow until it finishes; the admission watermark is waived
when nothing runs, so the head of the queue can always start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate, chain, compress, count, repeat
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
        # Async scheduling only. Steps with sampled rows whose update() is still to come, oldest first.
        self._awaiting_update: list[tuple[SchedulerOutput, list[Request]]] = []
        # The newest such step, and each of its sampled requests -> its row among the sampled rows.
        self._in_flight_output: SchedulerOutput | None = None
        self._in_flight: dict[Request, int] = {}
        # Tables not grown yet because their placeholder filled a block (see _can_defer): the
        # step whose update() brings the tokens, and (request, slots to hold) to allocate then.
        self._deferred_until: SchedulerOutput | None = None
        self._deferred: list[tuple[Request, int]] = []
        # Forked requests whose partly-filled last block may still be shared (copy-on-write pending).
        self._shared_tails: set[str] = set()

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
            self._shared_tails.discard(request.request_id)
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

        NOTE: with async scheduling, fork before the parent is scheduled again (between update() and
        schedule()): a placeholder scheduled for the parent counts as computed but has no token yet.
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
            self._shared_tails.update((parent_id, child_id))
        else:
            self.waiting.appendleft(child)
        return child

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens, allocate their KV slots, and advance num_computed_tokens.

        NOTE: num_computed_tokens counts the scheduled tokens as computed from here on; the step
        must run before the next schedule() (one step in flight). With async scheduling, two: this
        step may be scheduled before update() of the previous one (see the module docstring), but
        update() of step n must come before schedule() of step n + 2."""
        if len(self._awaiting_update) > 1:
            raise RuntimeError(
                "two scheduled steps still wait for update(): with async scheduling, call update() of "
                "step n before schedule() of step n + 2"
            )
        allocate = self.kv_cache.allocate
        unsent = self._unsent_tables
        budget = self.config.max_num_batched_tokens
        running = self.running
        in_flight = self._in_flight
        shared_tails = self._shared_tails
        defer_full_blocks = self.kv_cache.enable_prefix_caching
        block_size = self.kv_cache.block_size
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
            source = -1  # async scheduling: the row of a placeholder among the in-flight samples
            defer = False
            if num_new > budget:
                num_new = budget
            elif num_new <= 0:
                source = in_flight.get(request, -1) if num_new == 0 else -1
                if source < 0:
                    raise RuntimeError(
                        f"running request {request.request_id!r} has no token left to compute: the "
                        "previous step's update() with its sampled token is missing"
                    )
                # Async scheduling: feed the token the step in flight samples for it, unless it is
                # the last (max_tokens: it finishes at update()).
                if len(request.output_token_ids) + 1 >= request.max_tokens:
                    continue
                defer = defer_full_blocks and (computed + 1) % block_size == 0
                if defer and not self._can_defer(request):
                    continue  # it waits one step, and is scheduled once its token is known
                num_new = 1
            if defer:
                start = len(request.block_ids)  # the slot's block exists; its hash waits for the token
                self._deferred.append((request, computed + 1))
                self._deferred_until = self._in_flight_output
            else:
                try:
                    start = allocate(request.request_id, computed + num_new, request.all_token_ids)
                except NoFreeBlocksError:
                    start = self._preempt_until_allocated(
                        request, computed + num_new, batch.preempted_req_ids
                    )
                    if start < 0:
                        break  # the request itself was preempted; everything after it was too
                if shared_tails:
                    shared_tails.discard(request.request_id)  # allocate copied a shared last block
            if unsent and request.request_id in unsent:
                unsent.discard(request.request_id)
                start = 0
            if source >= 0:
                batch.placeholder_rows.append(len(scheduled))
                batch.placeholder_sources.append(source)
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
        if self.config.async_scheduling:
            self._track_in_flight(output, scheduled)
        return output

    def _can_defer(self, request: Request) -> bool:
        """Whether a placeholder that fills a block (with prefix caching) can be fed now.

        KVCacheManager.allocate hashes a block from its tokens once it is full, so the table's
        growth must wait for update(), when the token is known. That is fine only while the slot is
        in a block the request already holds alone: not with block_size 1 (the token opens the
        block too), nor while its last block may still be shared with a fork (copy-on-write happens
        in allocate)."""
        return self.kv_cache.block_size > 1 and request.request_id not in self._shared_tails

    def _track_in_flight(self, output: SchedulerOutput, scheduled: list[Request]) -> None:
        """Async scheduling: remember the step's sampled requests; the next schedule() feeds them
        their sampled token as a placeholder, and update() of this step must follow."""
        sampled = list(compress(scheduled, output.do_sample))
        self._in_flight = dict(zip(sampled, count()))
        self._in_flight_output = output if sampled else None
        if sampled:
            self._awaiting_update.append((output, scheduled))

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
        self._shared_tails.discard(request.request_id)
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

        With async scheduling, a request that the next step (already scheduled) preempted still
        receives its token here; one that finishes here was already fed a placeholder by the next
        step, whose token for it update() then drops.
        """
        req_ids = scheduler_output.req_ids
        if len(sampled_token_ids) != len(req_ids):
            raise ValueError(
                f"sampled_token_ids has {len(sampled_token_ids)} entries; expected one per scheduled "
                f"sequence ({len(req_ids)})"
            )
        requests = self._requests_of(scheduler_output)
        finish_check = self.finish_check
        default_check = finish_check is stop_on_stop_token_ids
        running = RequestStatus.RUNNING
        # Preempted after this step was scheduled: only possible with async scheduling.
        preempted = RequestStatus.PREEMPTED if self.config.async_scheduling else running
        stopped = RequestStatus.FINISHED_STOPPED
        updated: list[Request] = []
        any_finished = False
        for request, sample, token_ids in zip(
            requests, scheduler_output.do_sample, sampled_token_ids, strict=True
        ):
            if not sample or request is None or (request.status != running and request.status != preempted):
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
                    if request.status == RequestStatus.PREEMPTED:
                        self.waiting.remove(request)
                    self._finish(request, status)
                    any_finished = True
                    break
            updated.append(request)
        if any_finished:
            self.running = [r for r in self.running if r.status == running]
        if self.config.async_scheduling:
            self._step_updated(scheduler_output)
        return updated

    def _requests_of(self, scheduler_output: SchedulerOutput) -> Sequence[Request | None]:
        """The requests of a scheduled step, in req_ids order: kept for the latest step and for those
        awaiting update() (async scheduling), else looked up by id (None for ids no longer live)."""
        if scheduler_output is self._last_output:
            return self._last_scheduled
        for output, scheduled in self._awaiting_update:
            if output is scheduler_output:
                return scheduled
        return [self.requests.get(request_id) for request_id in scheduler_output.req_ids]

    def _step_updated(self, scheduler_output: SchedulerOutput) -> None:
        """Async scheduling: the step's tokens are known now. Forget it as in flight, and grow the
        tables whose growth waited for them (hashing the blocks they filled)."""
        self._awaiting_update = [a for a in self._awaiting_update if a[0] is not scheduler_output]
        if scheduler_output is self._in_flight_output:
            self._in_flight_output = None
            self._in_flight = {}
        if scheduler_output is self._deferred_until:
            for request, num_tokens in self._deferred:
                if request.status == RequestStatus.RUNNING:  # not finished by its token
                    self.kv_cache.allocate(request.request_id, num_tokens, request.all_token_ids)
            self._deferred = []
            self._deferred_until = None


class _BatchBuilder:
    """One step's scheduled requests and their counts; `build` turns them into a SchedulerOutput
    with C-level map/chain passes instead of per-request Python appends."""

    __slots__ = (
        "requests",
        "num_scheduled",
        "num_computed",
        "starts",
        "preempted_req_ids",
        "placeholder_rows",
        "placeholder_sources",
    )

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.num_scheduled: list[int] = []
        self.num_computed: list[int] = []  # before this step
        self.starts: list[int] = []  # first block-table index that changed
        self.preempted_req_ids: list[str] = []
        self.placeholder_rows: list[int] = []  # async scheduling: see SchedulerOutput
        self.placeholder_sources: list[int] = []

    def build(self, kv: KVCacheManager, finished_req_ids: list[str]) -> SchedulerOutput:
        requests = self.requests
        num_scheduled = self.num_scheduled
        num_computed = self.num_computed
        token_lists = list(map(_get_tokens, requests))
        block_tables = list(map(_get_block_ids, requests))
        seq_lens = list(map(add, num_computed, num_scheduled))
        num_known = list(map(len, token_lists))
        # Where each sequence's input ids are read from: its tokens from num_computed on, except a
        # placeholder, read as the 0 that the runner overwrites.
        read_lists, read_starts = token_lists, num_computed
        if self.placeholder_rows:
            read_lists, read_starts = list(token_lists), list(num_computed)
            for i in self.placeholder_rows:
                num_known[i] += 1
                read_lists[i] = _PLACEHOLDER
                read_starts[i] = 0
        do_sample = list(map(eq, seq_lens, num_known))
        query_start_loc = [0, *accumulate(num_scheduled)]
        num_tokens = query_start_loc[-1]
        starts = self.starts
        changed_rows = list(compress(range(len(starts)), map(ne, starts, map(len, block_tables))))
        if num_tokens == len(requests):  # decodes only: one token each
            positions = list(num_computed)
            input_ids = list(map(getitem, read_lists, read_starts))
        else:
            positions = list(chain.from_iterable(map(range, num_computed, seq_lens)))
            read_ends = map(add, read_starts, num_scheduled)
            input_ids = list(
                chain.from_iterable(map(getitem, read_lists, map(slice, read_starts, read_ends)))
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
            placeholder_rows=self.placeholder_rows,
            placeholder_sources=self.placeholder_sources,
        )


_PLACEHOLDER = [0]  # the input id of a placeholder token (see SchedulerOutput.placeholder_rows)
_get_tokens = attrgetter("all_token_ids")
_get_block_ids = attrgetter("block_ids")
_get_request_id = attrgetter("request_id")
