"""Per-request block tables over one BlockPool: allocation, prefix-cache hits, fork with copy-on-write,
slot mapping and stats. The scheduler's only view of KV memory.

A block table maps logical block i of a request (its tokens [i * block_size, (i + 1) * block_size))
to a physical block id. A table "holds" `num_tokens` token slots: the tokens whose KV has been or is
being computed. Full blocks are never written again, so only a table's partly-filled last block can
need copy-on-write.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from tinyserve.config import CacheConfig

from .block_hash import ROOT_PARENT_HASH, BlockKey
from .block_pool import BlockPool
from .errors import NoFreeBlocksError, RequestTooLargeError


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The longest run of cached full blocks found for a token sequence (no references taken yet).

    Attributes:
        block_ids: physical blocks of the run, in logical order.
        block_hashes: their chained hashes, same order.
        num_tokens: tokens covered (len(block_ids) * block_size).
    """

    block_ids: list[int]
    block_hashes: list[int]
    num_tokens: int


EMPTY_PREFIX = CachedPrefix([], [], 0)


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """A snapshot for metrics.

    num_cached_blocks counts blocks indexed by the prefix cache (in use or free);
    num_evictable_blocks the free ones among them. prefix_cache_queries / prefix_cache_hits count
    tokens looked up / found cached, when a request's table is created (each admission).
    internal_waste_slots counts unused slots in the last block of every table (a shared block
    once per table)."""

    num_blocks: int
    block_size: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_evictable_blocks: int
    usage_percent: float
    num_requests: int
    internal_waste_slots: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_evictions: int
    num_block_copies: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _BlockTable:
    __slots__ = ("block_ids", "block_hashes", "num_tokens", "extra_keys", "next_hash_at")

    def __init__(
        self, block_ids: list[int], block_hashes: list[int], num_tokens: int, extra_keys: Hashable
    ) -> None:
        self.block_ids = block_ids  # logical -> physical
        self.block_hashes = block_hashes  # chained hashes of the leading full blocks seen so far
        self.num_tokens = num_tokens  # token slots held
        self.extra_keys = extra_keys
        # Hash the next block once num_tokens reaches this; sys.maxsize with prefix caching off.
        self.next_hash_at = sys.maxsize


class KVCacheManager:
    """Block tables of all requests that hold KV memory, keyed by request id.

    Args:
        config: block size, prefix caching on/off, admission watermark.
        num_blocks: physical blocks in the pool; defaults to config.num_blocks, which must then be set.
    """

    def __init__(self, config: CacheConfig, num_blocks: int | None = None) -> None:
        if num_blocks is None:
            num_blocks = config.num_blocks
        if num_blocks is None:
            raise ValueError(
                "the KV pool size is unknown: pass num_blocks or set CacheConfig.num_blocks (an int >= 1)"
            )
        self.config = config
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = config.enable_prefix_caching
        self.watermark_blocks = int(config.watermark * num_blocks)
        self.pool = BlockPool(num_blocks, config.block_size)
        self._ref_counts = self.pool._ref_counts  # read on the hot path; the pool owns it
        self._tables: dict[str, _BlockTable] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_block_copies = 0

    # ---- sizes and admission -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def check_fits(self, num_tokens: int, what: str = "request") -> None:
        """Raise RequestTooLargeError if num_tokens could never fit in the whole pool."""
        needed = self.num_blocks_for(num_tokens)
        if needed > self.num_blocks:
            raise RequestTooLargeError(
                f"{what} needs up to {num_tokens} tokens of KV cache ({needed} blocks of {self.block_size}), "
                f"but the whole pool holds {self.num_blocks * self.block_size} tokens ({self.num_blocks} "
                "blocks); shorten the prompt or max_tokens, or give the KV cache more memory"
            )

    def can_allocate(
        self, num_tokens: int, prefix: CachedPrefix = EMPTY_PREFIX, *, use_watermark: bool = True
    ) -> bool:
        """Whether a request without a table could get one holding num_tokens tokens (reusing `prefix`)
        while keeping `watermark_blocks` free for running requests (unless use_watermark is False)."""
        refs = self.pool._ref_counts
        hits = prefix.block_ids
        needed = self.num_blocks_for(num_tokens) - len(hits) + sum(1 for b in hits if refs[b] == 0)
        reserve = self.watermark_blocks if use_watermark else 0
        return needed <= self.pool.num_free_blocks - reserve

    # ---- prefix cache --------------------------------------------------------------------------

    def find_cached_prefix(self, token_ids: Sequence[int], extra_keys: Hashable = None) -> CachedPrefix:
        """The longest run of cached full blocks that starts token_ids, takes no references.

        NOTE: the block holding the last token is never returned (at most (len - 1) // block_size
        blocks), so a fully cached prompt still computes its last token and yields logits.
        """
        if not self.enable_prefix_caching:
            return EMPTY_PREFIX
        bs = self.block_size
        lookup = self.pool.lookup
        block_ids: list[int] = []
        block_hashes: list[int] = []
        parent = ROOT_PARENT_HASH
        for start in range(0, (len(token_ids) - 1) // bs * bs, bs):
            key: BlockKey = (parent, extra_keys, tuple(token_ids[start : start + bs]))
            block_hash = hash(key)
            block_id = lookup(block_hash, key)
            if block_id is None:
                break
            block_ids.append(block_id)
            block_hashes.append(block_hash)
            parent = block_hash
        if not block_ids:
            return EMPTY_PREFIX
        return CachedPrefix(block_ids, block_hashes, len(block_ids) * bs)

    # ---- block tables --------------------------------------------------------------------------

    def has_table(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (logical -> physical). A live list: read it, don't keep or change it."""
        return self._table(request_id).block_ids

    def num_tokens(self, request_id: str) -> int:
        """Token slots the request's table holds."""
        return self._table(request_id).num_tokens

    def _table(self, request_id: str) -> _BlockTable:
        table = self._tables.get(request_id)
        if table is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks (never allocated, or already freed)")
        return table

    def allocate(
        self,
        request_id: str,
        num_tokens: int,
        token_ids: Sequence[int],
        prefix: CachedPrefix = EMPTY_PREFIX,
        extra_keys: Hashable = None,
    ) -> int:
        """Grow the request's table to hold `num_tokens` token slots (creating it on first use).

        Args:
            request_id: the request.
            num_tokens: slots to hold after the call (tokens computed so far plus those of this step).
            token_ids: the request's tokens, at least num_tokens of them; full blocks among the first
                num_tokens are added to the prefix cache.
            prefix: first call only: cached blocks from find_cached_prefix to start the table with.
            extra_keys: first call only: the prefix-cache namespace (must match find_cached_prefix's).

        Returns:
            The first index of the table that changed: entries before it are as they were.

        Raises:
            NoFreeBlocksError: not enough free blocks; nothing was changed.

        NOTE: writing into a partly-filled last block shared with a fork first replaces it with a
        copy; the (src, dst) pair is queued for `take_block_copies`, and must be copied before the KV
        of this step is written.
        """
        table = self._tables.get(request_id)
        if table is None:
            self._check_token_ids(token_ids, num_tokens)
            self._allocate_new(request_id, num_tokens, token_ids, prefix, extra_keys)
            return 0
        if prefix is not EMPTY_PREFIX and prefix.block_ids:
            raise ValueError(
                f"request {request_id!r} already holds blocks; a prefix is only for its first allocation"
            )
        old = table.num_tokens
        blocks = table.block_ids
        first_changed = len(blocks)
        if num_tokens <= old:
            if num_tokens < old:
                raise ValueError(
                    f"request {request_id!r} holds {old} token slots; can't shrink to {num_tokens}"
                )
            return first_changed
        # NOTE: a table always has exactly ceil(num_tokens / block_size) blocks, so room left in the
        # last block means it is partly filled, and writing it needs copy-on-write if it is shared.
        if num_tokens > first_changed * self.block_size or self._ref_counts[blocks[-1]] > 1:
            first_changed = self._grow(table, num_tokens)
        table.num_tokens = num_tokens
        if num_tokens >= table.next_hash_at:
            self._check_token_ids(token_ids, num_tokens)
            self._cache_full_blocks(table, token_ids)
        return first_changed

    @staticmethod
    def _check_token_ids(token_ids: Sequence[int], num_tokens: int) -> None:
        if len(token_ids) < num_tokens:
            raise ValueError(f"token_ids has {len(token_ids)} tokens, fewer than num_tokens ({num_tokens})")

    def _grow(self, table: _BlockTable, num_tokens: int) -> int:
        # New blocks, and copy-on-write of a shared partly-filled last block. Atomic: the pool
        # raises NoFreeBlocksError before changing anything.
        pool = self.pool
        bs = self.block_size
        blocks = table.block_ids
        first_changed = len(blocks)
        num_new = (num_tokens + bs - 1) // bs - first_changed
        if table.num_tokens % bs and pool._ref_counts[blocks[-1]] > 1:
            new = pool.allocate(num_new + 1)
            src = blocks[-1]
            pool.free((src,))  # still referenced by the other sharers
            blocks[-1] = new[0]
            blocks += new[1:]
            self._pending_copies.append((src, new[0]))
            self.num_block_copies += 1
            return first_changed - 1
        blocks += pool.allocate(num_new)
        return first_changed

    def _allocate_new(
        self,
        request_id: str,
        num_tokens: int,
        token_ids: Sequence[int],
        prefix: CachedPrefix,
        extra_keys: Hashable,
    ) -> None:
        pool = self.pool
        hits = prefix.block_ids
        if prefix.num_tokens > num_tokens:
            raise ValueError(f"prefix covers {prefix.num_tokens} tokens, more than num_tokens ({num_tokens})")
        for block_id, block_hash in zip(hits, prefix.block_hashes, strict=True):
            if pool._block_hash[block_id] != block_hash:
                raise ValueError(
                    f"stale prefix: block {block_id} was evicted since find_cached_prefix; look it up again"
                )
        num_new = self.num_blocks_for(num_tokens) - len(hits)
        num_needed = num_new + sum(1 for b in hits if pool._ref_counts[b] == 0)
        if num_needed > pool.num_free_blocks:
            raise NoFreeBlocksError(num_needed, pool.num_free_blocks)
        pool.incref(hits)  # first, so that allocating can't evict them
        table = _BlockTable(hits + pool.allocate(num_new), list(prefix.block_hashes), num_tokens, extra_keys)
        self._tables[request_id] = table
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += prefix.num_tokens
            table.next_hash_at = (len(table.block_hashes) + 1) * self.block_size
            if num_tokens >= table.next_hash_at:
                self._cache_full_blocks(table, token_ids)

    def _cache_full_blocks(self, table: _BlockTable, token_ids: Sequence[int]) -> None:
        # Index every full block not hashed yet. A block whose hash another block already holds
        # (same prefix computed twice at once) stays unindexed and is freed as never-cached.
        # NOTE: the hot loop of a long prefill; it inlines BlockPool.register (same invariants).
        bs = self.block_size
        hashes = table.block_hashes
        first = len(hashes)
        last = table.num_tokens // bs
        extra_keys = table.extra_keys
        pool = self.pool
        hash_to_block = pool._hash_to_block
        block_hash = pool._block_hash
        block_parent = pool._block_parent
        block_extra = pool._block_extra
        block_tokens = pool._block_tokens
        block_offset = pool._block_offset
        parent = hashes[-1] if hashes else ROOT_PARENT_HASH
        # One copy of the new full blocks' tokens; every block keeps (this tuple, its offset), so
        # indexing a block creates no long-lived object (no garbage-collector work per block).
        new_tokens = tuple(token_ids[first * bs : last * bs])
        start = 0
        for block_id in table.block_ids[first:last]:
            block = hash((parent, extra_keys, new_tokens[start : start + bs]))
            if block not in hash_to_block and block_hash[block_id] is None:
                hash_to_block[block] = block_id
                block_hash[block_id] = block
                block_parent[block_id] = parent
                block_extra[block_id] = extra_keys
                block_tokens[block_id] = new_tokens
                block_offset[block_id] = start
            hashes.append(block)
            parent = block
            start += bs
        table.next_hash_at = (len(hashes) + 1) * bs

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give child_id a table sharing every block of parent_id's (n > 1 sampling). Writing into a
        shared partly-filled last block later copies it first (see `allocate`)."""
        parent = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"request {child_id!r} already holds KV blocks; fork needs a new request id")
        self.pool.incref(parent.block_ids)
        child = _BlockTable(
            list(parent.block_ids), list(parent.block_hashes), parent.num_tokens, parent.extra_keys
        )
        child.next_hash_at = parent.next_hash_at
        self._tables[child_id] = child

    def free(self, request_id: str) -> None:
        """Release every block of the request (finish, abort or preemption) and drop its table.

        Blocks are released last-first, so a request's tail blocks are evicted before its head,
        which other requests are more likely to share."""
        table = self._tables.pop(request_id, None)
        if table is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks (never allocated, or already freed)")
        self.pool.free(reversed(table.block_ids))

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies queued by copy-on-write since the last call, in order."""
        copies = self._pending_copies
        self._pending_copies = []
        return copies

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were un-indexed."""
        for table in self._tables.values():
            table.block_hashes.clear()
            if self.enable_prefix_caching:
                table.next_hash_at = self.block_size
        return self.pool.reset_prefix_cache()

    # ---- batch outputs -------------------------------------------------------------------------

    def slot_mapping(
        self, block_tables: Sequence[Sequence[int]], starts: Sequence[int], num_tokens: Sequence[int]
    ) -> list[int]:
        """Flat KV slot ids (`block_id * block_size + offset`) for a batch, in one call per step.

        Args:
            block_tables: [num_seqs] block table of each sequence.
            starts: [num_seqs] position of each sequence's first token this step.
            num_tokens: [num_seqs] tokens of each sequence this step.

        Returns:
            [sum(num_tokens)] slot of every token, sequence after sequence.
        """
        bs = self.block_size
        if sum(num_tokens) == len(num_tokens):  # one token per sequence (decodes)
            return [
                blocks[pos // bs] * bs + pos % bs for blocks, pos in zip(block_tables, starts, strict=True)
            ]
        out: list[int] = []
        append = out.append
        extend = out.extend
        for blocks, start, n in zip(block_tables, starts, num_tokens, strict=True):
            if n == 1:
                append(blocks[start // bs] * bs + start % bs)
                continue
            pos = start
            end = start + n
            while pos < end:
                index, offset = divmod(pos, bs)
                slot = blocks[index] * bs + offset
                run = min(end - pos, bs - offset)
                extend(range(slot, slot + run))
                pos += run
        return out

    def stats(self) -> KVCacheStats:
        pool = self.pool
        num_free = pool.num_free_blocks
        bs = self.block_size
        waste = sum(len(t.block_ids) * bs - t.num_tokens for t in self._tables.values())
        return KVCacheStats(
            num_blocks=self.num_blocks,
            block_size=bs,
            num_free_blocks=num_free,
            num_used_blocks=self.num_blocks - num_free,
            num_cached_blocks=pool.num_cached_blocks,
            num_evictable_blocks=pool.num_cached_free_blocks,
            usage_percent=100.0 * (self.num_blocks - num_free) / self.num_blocks,
            num_requests=len(self._tables),
            internal_waste_slots=waste,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_evictions=pool.num_evictions,
            num_block_copies=self.num_block_copies,
        )
