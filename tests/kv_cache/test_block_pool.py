"""BlockPool: free lists, reference counts, LRU eviction of cached blocks, and every error path."""

from __future__ import annotations

import pytest

from tinyserve.kv_cache.block_hash import ROOT_PARENT_HASH, hash_block
from tinyserve.kv_cache.block_pool import BlockPool
from tinyserve.kv_cache.errors import NoFreeBlocksError


def cache(pool: BlockPool, block_id: int, token: int) -> int:
    """Index block_id as a one-token block holding `token`; returns its hash."""
    block_hash, key = hash_block(ROOT_PARENT_HASH, [token])
    assert pool.register(block_id, block_hash, key)
    return block_hash


def test_fresh_pool_hands_out_blocks_in_order() -> None:
    pool = BlockPool(5, block_size=1)
    assert pool.num_free_blocks == 5
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 0
    assert all(pool.ref_count(b) == 1 for b in range(5))


def test_allocate_zero_and_negative() -> None:
    pool = BlockPool(3, block_size=1)
    assert pool.allocate(0) == []
    with pytest.raises(ValueError, match=">= 0"):
        pool.allocate(-1)


@pytest.mark.parametrize("num_blocks", [0, -3, 2.0, True])
def test_bad_pool_size(num_blocks: object) -> None:
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        BlockPool(num_blocks, block_size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        BlockPool(4, block_size=num_blocks)  # type: ignore[arg-type]


def test_out_of_blocks_raises_and_changes_nothing() -> None:
    pool = BlockPool(4, block_size=1)
    pool.allocate(3)
    before = pool.free_block_ids()
    with pytest.raises(NoFreeBlocksError, match="needed 2, only 1 free") as info:
        pool.allocate(2)
    assert (info.value.num_needed, info.value.num_free) == (2, 1)
    assert pool.free_block_ids() == before


def test_recently_freed_block_is_reused_first() -> None:
    pool = BlockPool(4, block_size=1)
    a, b = pool.allocate(2)
    pool.free([a, b])  # b on top of the stack
    assert pool.allocate(1) == [b]


def test_cached_blocks_are_evicted_only_when_no_uncached_block_is_left() -> None:
    pool = BlockPool(4, block_size=1)
    blocks = pool.allocate(4)
    hashes = [cache(pool, b, token=b) for b in blocks[:3]]
    pool.free(blocks)  # 0, 1, 2 cached (in this LRU order); 3 never cached
    assert pool.num_cached_free_blocks == 3
    assert pool.allocate(1) == [3]  # the never-cached one first, no eviction
    assert pool.num_evictions == 0
    assert pool.allocate(2) == [0, 1]  # then the least recently freed cached ones
    assert pool.num_evictions == 2
    assert pool.block_hash(0) is None and pool.block_hash(1) is None
    assert pool.lookup(hashes[0], hash_block(ROOT_PARENT_HASH, [0])[1]) is None
    assert pool.block_hash(2) == hashes[2]  # still cached
    assert pool.num_cached_blocks == 1


def test_prefix_hit_takes_a_cached_free_block_off_the_lru_queue() -> None:
    pool = BlockPool(3, block_size=1)
    blocks = pool.allocate(3)
    cache(pool, blocks[0], token=7)
    pool.free(blocks)
    block_hash, key = hash_block(ROOT_PARENT_HASH, [7])
    hit = pool.lookup(block_hash, key)
    assert hit == blocks[0]
    pool.incref([hit])
    assert pool.ref_count(hit) == 1 and pool.num_cached_free_blocks == 0
    assert sorted(pool.allocate(2)) == [1, 2]  # the hit block is not handed out again
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_lookup_checks_the_stored_key() -> None:
    pool = BlockPool(2, block_size=1)
    (block,) = pool.allocate(1)
    block_hash = cache(pool, block, token=1)
    assert pool.lookup(block_hash, (ROOT_PARENT_HASH, None, (2,))) is None  # same hash, other tokens
    assert pool.lookup(block_hash, (ROOT_PARENT_HASH, "other", (1,))) is None
    assert pool.lookup(block_hash, (12345, None, (1,))) is None
    assert pool.lookup(block_hash, (ROOT_PARENT_HASH, None, (1,))) == block
    assert pool.block_key(block) == (ROOT_PARENT_HASH, None, (1,))


def test_register_rules() -> None:
    pool = BlockPool(3, block_size=1)
    a, b = pool.allocate(2)
    block_hash, key = hash_block(ROOT_PARENT_HASH, [5])
    assert pool.register(a, block_hash, key)
    assert not pool.register(b, block_hash, key)  # hash already held by another block
    other_hash, other_key = hash_block(ROOT_PARENT_HASH, [6])
    assert not pool.register(a, other_hash, other_key)  # block already indexed
    with pytest.raises(ValueError, match="block 2 is free"):
        pool.register(2, other_hash, other_key)
    with pytest.raises(ValueError, match="holds 1 token ids; the key has 2"):
        pool.register(b, *hash_block(ROOT_PARENT_HASH, [6, 7]))


def test_double_free_raises() -> None:
    pool = BlockPool(2, block_size=1)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match="double free"):
        pool.free([block])


def test_incref_of_a_never_cached_free_block_raises() -> None:
    pool = BlockPool(2, block_size=1)
    with pytest.raises(ValueError, match="holds no cached prefix"):
        pool.incref([1])


def test_reset_prefix_cache_makes_cached_blocks_plain_free_blocks() -> None:
    pool = BlockPool(3, block_size=1)
    blocks = pool.allocate(3)
    for b in blocks:
        cache(pool, b, token=b)
    pool.free(blocks[:2])
    assert pool.reset_prefix_cache() == 3
    assert pool.num_cached_blocks == 0 and pool.num_cached_free_blocks == 0
    assert pool.num_free_blocks == 2
    assert pool.block_hash(2) is None  # in use, but no longer indexed
    pool.free([blocks[2]])
    assert pool.free_block_ids() == ([0, 1, 2], [])
