"""A model-free stand-in for the runner: a KV cache of (token id, position) per slot and a "model"
whose next token is a hash of the context it reads back through the block table. Any bookkeeping
error (wrong slot, block freed too early, missed copy-on-write, stale prefix hit) changes the
context it reads and fails an assertion."""

from __future__ import annotations

import random

from hypothesis import strategies as st

from tinyserve.config import CacheConfig, SchedulerConfig
from tinyserve.kv_cache.manager import KVCacheManager
from tinyserve.request import Request
from tinyserve.scheduler.output import SchedulerOutput
from tinyserve.scheduler.scheduler import Scheduler

VOCAB = 50

# Random workloads of the property tests: [(prompt, max_tokens)] over a small vocabulary, so that
# prompts share prefixes (the prefix cache takes part) and the stop token 0 comes early.
SMALL_VOCAB = 7
random_requests = st.lists(
    st.tuples(st.lists(st.integers(0, SMALL_VOCAB - 1), min_size=1, max_size=24), st.integers(1, 12)),
    min_size=1,
    max_size=10,
)


def blocks_for_largest(requests: list[tuple[list[int], int]], block_size: int) -> int:
    """Blocks the largest (prompt, max_tokens) request needs (its last token is never cached)."""
    largest = max(len(tokens) + max_tokens - 1 for tokens, max_tokens in requests)
    return -(-largest // block_size)


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_num_seqs: int = 8,
    caching: bool = True,
    watermark: float = 0.0,
    max_model_len: int | None = None,
    async_scheduling: bool = False,
    vocab: int = VOCAB,
    **scheduler_kwargs: object,
) -> tuple[Scheduler, FakeRunner]:
    """A scheduler over a fresh KV pool, and a FakeRunner with a pool of the same shape."""
    kv = KVCacheManager(
        CacheConfig(block_size=block_size, enable_prefix_caching=caching, watermark=watermark),
        num_blocks=num_blocks,
    )
    config = SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        async_scheduling=async_scheduling,
    )
    return Scheduler(config, kv, **scheduler_kwargs), FakeRunner(num_blocks, block_size, vocab)


def prompt(n: int, seed: int, vocab: int = VOCAB) -> list[int]:
    """n token ids in [0, vocab), reproducible from `seed`."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def next_token(context: list[int], vocab_size: int) -> int:
    """The fake model: the next token depends only on the whole context."""
    return hash(tuple(context)) % vocab_size


def reference_generation(request: Request, vocab_size: int) -> list[int]:
    """What the request outputs when run alone with an unlimited KV cache."""
    tokens = list(request.all_token_ids)
    outputs = list(request.output_token_ids)
    while len(outputs) < request.max_tokens:
        token = next_token(tokens, vocab_size)
        tokens.append(token)
        outputs.append(token)
        if token in request.stop_token_ids:
            break
    return outputs


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 50) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.rows: dict[str, list[int]] = {}  # persistent block-table rows, built incrementally
        self.num_steps = 0

    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> list[list[int]]:
        self.num_steps += 1
        self._check_shapes(out)
        for req_id in out.preempted_req_ids + out.finished_req_ids:
            self.rows.pop(req_id, None)
        for src, dst in out.block_copies:  # before any write of the step
            bs = self.block_size
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]
        for token_id, position, slot in zip(
            out.input_token_ids, out.positions, out.slot_mapping, strict=True
        ):
            self.slots[slot] = (token_id, position)
        for index, start, block_ids in zip(
            out.changed_rows, out.changed_row_starts, out.changed_row_block_ids, strict=True
        ):
            row = self.rows.setdefault(out.req_ids[index], [])
            assert start <= len(row), "a change must start within the old row"
            row[start:] = block_ids
        sampled: list[list[int]] = []
        for i, req_id in enumerate(out.req_ids):
            assert self.rows.get(req_id) == out.block_tables[i], (
                req_id,
                self.rows.get(req_id),
                out.block_tables[i],
            )
            context = self._read_context(out.block_tables[i], out.seq_lens[i])
            request = requests[req_id]
            assert context == request.all_token_ids[: out.seq_lens[i]], f"{req_id}: KV holds the wrong tokens"
            sampled.append([next_token(context, self.vocab_size)] if out.do_sample[i] else [])
        return sampled

    def _read_context(self, block_table: list[int], seq_len: int) -> list[int]:
        bs = self.block_size
        context = []
        for position in range(seq_len):
            entry = self.slots[block_table[position // bs] * bs + position % bs]
            assert entry is not None and entry[1] == position, f"slot for position {position} holds {entry}"
            context.append(entry[0])
        return context

    @staticmethod
    def _check_shapes(out: SchedulerOutput) -> None:
        num_seqs = out.num_seqs
        for name in ("num_scheduled_tokens", "num_computed_tokens", "seq_lens", "do_sample", "block_tables"):
            assert len(getattr(out, name)) == num_seqs, name
        assert len(out.changed_rows) == len(out.changed_row_starts) == len(out.changed_row_block_ids)
        assert out.changed_rows == sorted(set(out.changed_rows))
        assert len(out.input_token_ids) == len(out.positions) == len(out.slot_mapping) == out.num_tokens
        assert out.query_start_loc[0] == 0 and len(out.query_start_loc) == num_seqs + 1
        assert out.query_start_loc[-1] == out.num_tokens == sum(out.num_scheduled_tokens)
        assert len(set(out.slot_mapping)) == len(out.slot_mapping), "two tokens of one step share a KV slot"
        assert len(set(out.req_ids)) == num_seqs
        for i in range(num_seqs):
            start, end = out.query_start_loc[i], out.query_start_loc[i + 1]
            computed = out.num_computed_tokens[i]
            assert out.positions[start:end] == list(range(computed, computed + end - start))
            assert out.seq_lens[i] == computed + out.num_scheduled_tokens[i]
            assert out.num_scheduled_tokens[i] >= 1
        expected_logits = [out.query_start_loc[i + 1] - 1 for i in range(num_seqs) if out.do_sample[i]]
        assert out.logits_indices == expected_logits
        if num_seqs:
            assert out.max_query_len == max(out.num_scheduled_tokens)
            assert out.max_seq_len == max(out.seq_lens)


def run_to_completion(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 100_000
) -> list[SchedulerOutput]:
    """Step until every request finished; returns the outputs of every step."""
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return outputs
        out = scheduler.schedule()
        outputs.append(out)
        assert not out.is_empty or out.preempted_req_ids, "a step scheduled nothing while requests wait"
        sampled = runner.execute(out, scheduler.requests)
        scheduler.update(out, sampled)
    raise AssertionError(
        f"not finished after {max_steps} steps: deadlock? {list(scheduler.requests.values())[:5]}"
    )


__all__ = ["FakeRunner", "next_token", "reference_generation", "run_to_completion"]
