"""SchedulerOutput: everything the model runner needs for one step, as ints and lists."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One engine step. Per-sequence lists are in the same order, [num_seqs]; flat lists are
    [num_tokens], sequence after sequence.

    Per scheduled sequence [num_seqs]:
        req_ids: request ids.
        num_scheduled_tokens: tokens fed this step (a whole prompt, a prefill chunk, or 1 decode token).
        num_computed_tokens: tokens already in the KV cache before this step = position of the
            first token fed.
        seq_lens: num_computed_tokens + num_scheduled_tokens: context each sequence attends to.
        do_sample: True where this step computes the last known token, so the step samples the
            next one; False for a prefill chunk that isn't the last.
        block_tables: each sequence's whole block table (logical -> physical block id). NOTE: live
            lists owned by the KV manager: valid until the next `schedule()`; don't change them.

    Block-table changes, for a runner that keeps persistent rows [num_changed]:
        changed_rows: indices into req_ids of the sequences whose block table changed this step.
        changed_row_starts / changed_row_block_ids: for the k-th of them,
            `row[changed_row_starts[k]:] = changed_row_block_ids[k]`. A start of 0 gives the whole
            table (a new or resumed request); a start before the row's old end means copy-on-write
            replaced its last block. Rows not listed are unchanged (most decodes).

    Flat:
        input_token_ids: [num_tokens] token ids to feed.
        positions: [num_tokens] position of each token in its sequence.
        slot_mapping: [num_tokens] KV slot (block_id * block_size + offset) each token's K/V goes to.
        query_start_loc: [num_seqs + 1] cumulative num_scheduled_tokens, starting at 0.
        logits_indices: [num_sampled] flat index of the last token of each sequence with do_sample,
            in sequence order: the only rows whose logits are needed.

    Async scheduling [num_placeholders] (empty otherwise):
        placeholder_rows: indices into req_ids of the sequences fed the token that the previous step
            (still running) samples for them; each is a one-token decode whose input_token_ids entry
            is a 0 the runner overwrites on the device, with the previous step's sampled id.
        placeholder_sources: for each of them, its row among the previous step's sampled rows (the
            order of that step's logits_indices).

    Step-wide:
        block_copies: (src, dst) block copies from copy-on-write. NOTE: apply them before the
            step writes any KV.
        preempted_req_ids: requests that lost their KV blocks this step (drop their runner state).
        finished_req_ids: requests finished or aborted since the previous step.
        num_tokens, max_query_len, max_seq_len: sums and maxima of the lists above (0 when empty).

    NOTE: a prefix-cache hit may name blocks whose KV another sequence of the same step is
    writing (two requests with one new system prompt admitted together). That is correct as long
    as, in every layer, the K/V of all tokens of the step is written to the cache before attention
    reads it, which is how paged attention layers work.
    """

    req_ids: list[str]
    num_scheduled_tokens: list[int]
    num_computed_tokens: list[int]
    seq_lens: list[int]
    do_sample: list[bool]
    block_tables: list[list[int]]
    changed_rows: list[int]
    changed_row_starts: list[int]
    changed_row_block_ids: list[list[int]]
    input_token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    logits_indices: list[int]
    block_copies: list[tuple[int, int]]
    preempted_req_ids: list[str]
    finished_req_ids: list[str]
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    placeholder_rows: list[int] = field(default_factory=list)
    placeholder_sources: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.req_ids)

    @property
    def is_empty(self) -> bool:
        """Nothing to run (there may still be finished or preempted ids to report)."""
        return not self.req_ids
