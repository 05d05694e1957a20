"""Property tests: random allocate / append / fork / write-to-shared / free / prefix lookup / evict
sequences over small pools, checking every invariant of the block manager after every step.

A shadow KV cache records which token each slot holds (writes go through slot_mapping, copy-on-write
copies are applied first, as the runner does). So beyond the bookkeeping invariants, every live
table must read back exactly its own tokens, and every prefix-cache hit must hold the looked-up
tokens: a missed copy-on-write, a block handed out twice or a stale cache entry all show up.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tinyserve.config import CacheConfig
from tinyserve.kv_cache.errors import NoFreeBlocksError
from tinyserve.kv_cache.manager import KVCacheManager

# A tiny vocabulary, so that prompts share prefixes and the prefix cache gets hits.
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.integers(1, 4),
        caching=st.booleans(),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        config = CacheConfig(block_size=block_size, enable_prefix_caching=caching, watermark=0.0)
        self.kv = KVCacheManager(config, num_blocks=num_blocks)
        self.bs = block_size
        self.tokens: dict[str, list[int]] = {}  # each live request's tokens (its table holds a prefix)
        self.slots: list[int | None] = [None] * (num_blocks * block_size)  # shadow KV: token per slot
        self.next_id = 0

    # ---- helpers -------------------------------------------------------------------------------

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _snapshot(self) -> tuple:
        pool = self.kv.pool
        tables = {r: (list(self.kv.block_ids(r)), self.kv.num_tokens(r)) for r in self.tokens}
        return pool.free_block_ids(), list(pool._ref_counts), dict(pool._hash_to_block), tables

    def _write(self, request_id: str, old: int) -> None:
        """Apply queued copies, then write the request's tokens [old, num_tokens) into its slots."""
        for src, dst in self.kv.take_block_copies():
            bs = self.bs
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]
        new = self.kv.num_tokens(request_id)
        slots = self.kv.slot_mapping([self.kv.block_ids(request_id)], [old], [new - old])
        for slot, token in zip(slots, self.tokens[request_id][old:new], strict=True):
            self.slots[slot] = token

    def _grow(self, request_id: str, num_tokens: int) -> None:
        old = self.kv.num_tokens(request_id)
        before = self._snapshot()
        try:
            self.kv.allocate(request_id, num_tokens, self.tokens[request_id])
        except NoFreeBlocksError:
            assert self._snapshot() == before, "a failed allocation changed state"
            return
        self._write(request_id, old)

    def _check_prefix(self, tokens: list[int], prefix_block_ids: list[int]) -> None:
        bs = self.bs
        assert len(prefix_block_ids) <= (len(tokens) - 1) // bs, "the last token's block was a hit"
        for i, block in enumerate(prefix_block_ids):
            assert self.slots[block * bs : (block + 1) * bs] == tokens[i * bs : (i + 1) * bs]

    # ---- rules ---------------------------------------------------------------------------------

    @rule(tokens=tokens_st, fraction=st.floats(0.0, 1.0))
    def new_request(self, tokens: list[int], fraction: float) -> None:
        request_id = self._new_id()
        prefix = self.kv.find_cached_prefix(tokens)
        self._check_prefix(tokens, prefix.block_ids)
        num_tokens = prefix.num_tokens + max(1, round(fraction * (len(tokens) - prefix.num_tokens)))
        before = self._snapshot()
        free_before = self.kv.num_free_blocks
        try:
            self.kv.allocate(request_id, num_tokens, tokens, prefix)
        except NoFreeBlocksError:
            assert self._snapshot() == before, "a failed allocation changed state"
            assert not self.kv.can_allocate(num_tokens, prefix, use_watermark=False)
            return
        assert self.kv.num_free_blocks <= free_before
        self.tokens[request_id] = list(tokens)
        self._write(request_id, prefix.num_tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), num_new=st.integers(1, 6), new_tokens=st.lists(st.integers(0, 2), max_size=6))
    def append(self, data: st.DataObject, num_new: int, new_tokens: list[int]) -> None:
        """Compute more tokens (a prefill chunk or decodes); on a fork this writes to shared blocks."""
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[request_id]
        tokens += new_tokens  # sampled tokens join the sequence
        num_tokens = min(len(tokens), self.kv.num_tokens(request_id) + num_new)
        if num_tokens > self.kv.num_tokens(request_id):
            self._grow(request_id, num_tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), diverge=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def fork(self, data: st.DataObject, diverge: list[int]) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.kv.fork(parent, child)
        computed = self.kv.num_tokens(parent)
        # The child agrees on the computed tokens and may differ after them (its own samples).
        self.tokens[child] = self.tokens[parent][:computed] + diverge
        self._grow(child, computed + 1)  # write-to-shared: copy-on-write if the last block is partial

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(request_id)
        del self.tokens[request_id]

    @rule(tokens=tokens_st)
    def lookup(self, tokens: list[int]) -> None:
        self._check_prefix(tokens, self.kv.find_cached_prefix(tokens).block_ids)

    @rule(num_evicted=st.integers(0, 4))
    def evict(self, num_evicted: int) -> None:
        """Allocate every never-cached free block and num_evicted more straight from the pool (which
        must evict cached blocks, oldest first), then give them back."""
        pool = self.kv.pool
        uncached_before, cached_before = pool.free_block_ids()
        num = max(1, len(uncached_before) + num_evicted)
        try:
            blocks = pool.allocate(num)
        except NoFreeBlocksError:
            assert num > len(uncached_before) + len(cached_before)
            return
        # Never-cached blocks first; cached ones only when those ran out, oldest first.
        expected = uncached_before[::-1][:num] + cached_before[: max(0, num - len(uncached_before))]
        assert blocks == expected
        for block in blocks:
            self.slots[block * self.bs : (block + 1) * self.bs] = [None] * self.bs  # evicted content is gone
        pool.free(blocks)

    @rule()
    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()
        assert self.kv.find_cached_prefix([0] * 20).num_tokens == 0

    @rule()
    def free_everything(self) -> None:
        for request_id in list(self.tokens):
            self.kv.free(request_id)
        self.tokens.clear()
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert all(ref == 0 for ref in self.kv.pool._ref_counts)

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def blocks_are_free_xor_referenced(self) -> None:
        kv, pool = self.kv, self.kv.pool
        uncached, cached = pool.free_block_ids()
        free = uncached + cached
        assert len(free) == len(set(free)), "a block is on the free lists twice"
        holders = [0] * kv.num_blocks
        for request_id in self.tokens:
            table = kv.block_ids(request_id)
            assert len(table) == len(set(table)), "a table holds a block twice"
            assert len(table) == kv.num_blocks_for(kv.num_tokens(request_id))
            for block in table:
                holders[block] += 1
        for block in range(kv.num_blocks):
            assert pool.ref_count(block) == holders[block], f"block {block}: ref count != tables holding it"
            assert (block in free) == (holders[block] == 0), f"block {block}: free xor referenced"
        assert pool.num_free_blocks + sum(1 for h in holders if h) == kv.num_blocks
        assert all(pool.block_hash(b) is not None for b in cached), "an uncached block on the LRU queue"
        assert all(pool.block_hash(b) is None for b in uncached), "a cached block on the never-cached stack"

    @invariant()
    def tables_read_back_their_own_tokens(self) -> None:
        bs = self.bs
        for request_id, tokens in self.tokens.items():
            table = self.kv.block_ids(request_id)
            n = self.kv.num_tokens(request_id)
            held = [self.slots[table[p // bs] * bs + p % bs] for p in range(n)]
            assert held == tokens[:n], f"{request_id}'s KV was overwritten"

    @invariant()
    def cache_index_matches_content(self) -> None:
        pool, bs = self.kv.pool, self.bs
        for block_hash, block in pool._hash_to_block.items():
            assert pool.block_hash(block) == block_hash
            key = pool.block_key(block)
            assert hash(key) == block_hash
            assert self.slots[block * bs : (block + 1) * bs] == list(key[2]), (
                "cached block holds other tokens"
            )

    @invariant()
    def stats_add_up(self) -> None:
        stats = self.kv.stats()
        assert stats.num_free_blocks + stats.num_used_blocks == stats.num_blocks
        assert stats.num_evictable_blocks <= stats.num_cached_blocks
        assert stats.prefix_cache_hits <= stats.prefix_cache_queries
        assert 0.0 <= stats.usage_percent <= 100.0

    def teardown(self) -> None:
        if hasattr(self, "kv"):
            self.free_everything()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_manager_properties = BlockManagerMachine.TestCase
