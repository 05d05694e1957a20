"""KVCacheManager: block tables, prefix cache, fork and copy-on-write, admission, slot mapping, stats."""

from __future__ import annotations

import pytest

from tinyserve.config import CacheConfig
from tinyserve.kv_cache.errors import NoFreeBlocksError, RequestTooLargeError
from tinyserve.kv_cache.manager import EMPTY_PREFIX, CachedPrefix, KVCacheManager


def manager(
    num_blocks: int = 8, block_size: int = 4, caching: bool = True, watermark: float = 0.0
) -> KVCacheManager:
    config = CacheConfig(block_size=block_size, enable_prefix_caching=caching, watermark=watermark)
    return KVCacheManager(config, num_blocks=num_blocks)


def naive_slots(table: list[int], start: int, n: int, bs: int) -> list[int]:
    return [table[p // bs] * bs + p % bs for p in range(start, start + n)]


def test_num_blocks_must_be_known() -> None:
    with pytest.raises(ValueError, match="pass num_blocks or set CacheConfig.num_blocks"):
        KVCacheManager(CacheConfig())
    assert KVCacheManager(CacheConfig(num_blocks=3)).num_blocks == 3


def test_allocate_grows_by_whole_blocks_and_reports_the_first_changed_index() -> None:
    kv = manager()
    tokens = list(range(100))
    assert kv.allocate("a", 5, tokens) == 0
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate("a", 8, tokens) == 2  # fits the last block: nothing changed
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate("a", 9, tokens) == 2
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.allocate("a", 9, tokens) == 3  # no-op
    assert kv.num_tokens("a") == 9
    assert kv.num_free_blocks == 5


def test_allocate_errors() -> None:
    kv = manager()
    with pytest.raises(ValueError, match="fewer than num_tokens"):
        kv.allocate("a", 5, [1, 2, 3])
    kv.allocate("a", 5, list(range(10)))
    with pytest.raises(ValueError, match="can't shrink"):
        kv.allocate("a", 4, list(range(10)))
    with pytest.raises(ValueError, match="only for its first allocation"):
        kv.allocate("a", 6, list(range(10)), CachedPrefix([0], [123], 4))
    with pytest.raises(ValueError, match="more than num_tokens"):
        kv.allocate("b", 3, list(range(10)), CachedPrefix([0], [123], 4))


def test_out_of_blocks_is_atomic_for_new_and_growing_tables() -> None:
    kv = manager(num_blocks=4)
    tokens = list(range(100))
    kv.allocate("a", 12, tokens)
    with pytest.raises(NoFreeBlocksError):
        kv.allocate("b", 8, tokens)
    assert not kv.has_table("b") and kv.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        kv.allocate("a", 20, tokens)
    assert kv.block_ids("a") == [0, 1, 2] and kv.num_tokens("a") == 12 and kv.num_free_blocks == 1


def test_unknown_request_errors() -> None:
    kv = manager()
    with pytest.raises(KeyError, match="holds no KV blocks"):
        kv.free("nope")
    with pytest.raises(KeyError, match="holds no KV blocks"):
        kv.block_ids("nope")
    with pytest.raises(KeyError, match="holds no KV blocks"):
        kv.fork("nope", "child")


def test_free_releases_everything_and_tail_blocks_are_evicted_first() -> None:
    kv = manager(num_blocks=4)
    kv.allocate("a", 12, list(range(12)))  # 3 full blocks, all cached
    kv.free("a")
    assert kv.num_free_blocks == 4
    assert kv.pool.free_block_ids() == ([3], [2, 1, 0])  # LRU: the tail block goes first
    assert kv.pool.allocate(2) == [3, 2]


def test_prefix_cache_hit_takes_references_and_counts_stats() -> None:
    kv = manager(num_blocks=8)
    prompt = list(range(10))  # two full blocks of 4 and 2 tokens
    kv.allocate("a", 10, prompt)
    prefix = kv.find_cached_prefix(prompt + [99])
    assert prefix.block_ids == kv.block_ids("a")[:2] and prefix.num_tokens == 8
    assert kv.can_allocate(11, prefix)
    kv.allocate("b", 11, prompt + [99], prefix)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [kv.pool.ref_count(b) for b in kv.block_ids("b")] == [2, 2, 1]
    stats = kv.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 21)


def test_the_block_of_the_last_token_is_never_a_hit() -> None:
    kv = manager()
    prompt = list(range(8))
    kv.allocate("a", 8, prompt)
    assert kv.find_cached_prefix(prompt).num_tokens == 4  # not 8: the last token must produce logits
    assert kv.find_cached_prefix(prompt + [1]).num_tokens == 8
    assert kv.find_cached_prefix([0]) is EMPTY_PREFIX


def test_prefix_cache_namespaces_and_disabled_cache() -> None:
    kv = manager()
    prompt = list(range(9))
    kv.allocate("a", 9, prompt, extra_keys="adapter-1")
    assert kv.find_cached_prefix(prompt, extra_keys="adapter-1").num_tokens == 8
    assert kv.find_cached_prefix(prompt).num_tokens == 0
    off = manager(caching=False)
    off.allocate("a", 9, prompt)
    assert off.find_cached_prefix(prompt) is EMPTY_PREFIX
    assert off.pool.num_cached_blocks == 0
    assert off.stats().prefix_cache_queries == 0


def test_hit_on_a_freed_cached_block_counts_against_free_blocks() -> None:
    kv = manager(num_blocks=3)
    prompt = list(range(9))
    kv.allocate("a", 9, prompt)
    kv.free("a")  # 2 cached full blocks + 1 plain free block
    prefix = kv.find_cached_prefix(prompt)
    assert prefix.num_tokens == 8
    assert kv.can_allocate(9, prefix)  # 2 hits (free, cached) + 1 new = all 3 blocks
    assert not kv.can_allocate(13, prefix)
    kv.allocate("b", 9, prompt, prefix)
    assert kv.num_free_blocks == 0 and kv.pool.num_evictions == 0


def test_stale_prefix_is_rejected() -> None:
    kv = manager(num_blocks=2)
    prompt = list(range(5))
    kv.allocate("a", 5, prompt)
    kv.free("a")
    prefix = kv.find_cached_prefix(prompt)
    kv.allocate("b", 8, [50] * 8)  # evicts the cached block
    with pytest.raises(ValueError, match="stale prefix"):
        kv.allocate("c", 5, prompt, prefix)


def test_watermark_and_check_fits() -> None:
    kv = manager(num_blocks=10, watermark=0.2)
    assert kv.watermark_blocks == 2
    assert kv.can_allocate(32)  # 8 blocks, 2 left
    assert not kv.can_allocate(33)
    assert kv.can_allocate(40, use_watermark=False)
    kv.check_fits(40)
    with pytest.raises(RequestTooLargeError, match=r"needs up to 41 tokens .* whole pool holds 40 tokens"):
        kv.check_fits(41)


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_write() -> None:
    kv = manager(num_blocks=8)
    tokens = list(range(6))
    kv.allocate("p", 6, tokens)  # [full, 2 of 4]
    kv.fork("p", "c")
    assert kv.block_ids("c") == kv.block_ids("p") == [0, 1]
    assert kv.pool.ref_count(0) == kv.pool.ref_count(1) == 2
    with pytest.raises(ValueError, match="already holds KV blocks"):
        kv.fork("p", "c")

    assert kv.allocate("p", 7, tokens + [100]) == 1  # writes into the shared partial block
    assert kv.take_block_copies() == [(1, 2)]
    assert kv.block_ids("p") == [0, 2] and kv.block_ids("c") == [0, 1]
    assert kv.pool.ref_count(1) == 1 and kv.pool.ref_count(2) == 1
    assert kv.allocate("c", 7, tokens + [200]) == 2  # now exclusive: written in place
    assert kv.take_block_copies() == []
    assert kv.stats().num_block_copies == 1


def test_fork_of_a_full_last_block_needs_no_copy() -> None:
    kv = manager(num_blocks=8)
    kv.allocate("p", 8, list(range(8)))
    kv.fork("p", "c")
    assert kv.allocate("c", 9, list(range(9))) == 2
    assert kv.take_block_copies() == []
    assert kv.block_ids("c")[:2] == kv.block_ids("p")


def test_copy_on_write_with_growth_is_atomic() -> None:
    kv = manager(num_blocks=3)
    kv.allocate("p", 6, list(range(6)))
    kv.fork("p", "c")
    with pytest.raises(NoFreeBlocksError):
        kv.allocate("p", 12, list(range(12)))  # copy + 1 new block, only 1 free
    assert kv.block_ids("p") == [0, 1] and kv.take_block_copies() == []
    assert kv.pool.ref_count(1) == 2


@pytest.mark.parametrize("bs", [1, 3, 4, 16])
def test_slot_mapping_matches_the_naive_formula(bs: int) -> None:
    kv = manager(num_blocks=64, block_size=bs)
    tables, starts, counts = [], [], []
    for i, (start, n) in enumerate([(0, 17), (5, 1), (bs - 1, 2), (2 * bs, bs), (bs + 1, 1)]):
        kv.allocate(f"r{i}", start + n, [0] * (start + n))
        tables.append(kv.block_ids(f"r{i}"))
        starts.append(start)
        counts.append(n)
    expected = [s for t, p, n in zip(tables, starts, counts, strict=True) for s in naive_slots(t, p, n, bs)]
    assert kv.slot_mapping(tables, starts, counts) == expected
    decode_only = [tables[1], tables[4]], [starts[1], starts[4]], [1, 1]
    assert kv.slot_mapping(*decode_only) == naive_slots(tables[1], 5, 1, bs) + naive_slots(
        tables[4], bs + 1, 1, bs
    )


def test_stats() -> None:
    kv = manager(num_blocks=8)
    kv.allocate("a", 5, list(range(5)))  # 2 blocks, 3 slots unused
    kv.allocate("b", 4, list(range(4)))  # 1 block, full
    stats = kv.stats()
    assert (stats.num_free_blocks, stats.num_used_blocks, stats.num_requests) == (5, 3, 2)
    assert stats.usage_percent == pytest.approx(37.5)
    assert stats.internal_waste_slots == 3
    assert stats.num_cached_blocks == 1  # a's first block; b's identical block stays unindexed
    assert stats.num_evictable_blocks == 0
    kv.free("a")
    kv.free("b")
    stats = kv.stats()
    assert (stats.num_free_blocks, stats.num_evictable_blocks, stats.internal_waste_slots) == (8, 1, 0)


def test_reset_prefix_cache_reindexes_live_tables_later() -> None:
    kv = manager(num_blocks=8)
    kv.allocate("a", 6, list(range(10)))
    assert kv.reset_prefix_cache() == 1
    assert kv.find_cached_prefix(list(range(10))).num_tokens == 0
    kv.allocate("a", 9, list(range(10)))  # fills block 1: blocks 0 and 1 are indexed again
    assert kv.find_cached_prefix(list(range(10))).num_tokens == 8


def test_public_names() -> None:
    import tinyserve.kv_cache as kv_cache
    import tinyserve.scheduler as scheduler

    for name in kv_cache.__all__:
        assert getattr(kv_cache, name) is not None
    assert {"Scheduler", "SchedulerOutput", "FinishCheck"} <= set(scheduler.__all__)
