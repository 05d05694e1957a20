"""The pool of physical KV blocks: reference counts, free lists and the prefix-cache index.

Every block is in exactly one of three states:
  * used: ref count > 0 (held by one or more block tables);
  * free, never cached (or evicted): on `_uncached_free`, a LIFO stack — the most recently freed
    block is handed out first;
  * free, cached: its content is a valid full block of some prefix, indexed by its hash; on
    `_cached_free`, an LRU queue (OrderedDict, oldest first). A prefix hit takes it back into use;
    allocation evicts from the front of the queue only when no never-cached free block is left.

All operations are O(1) per block. Block ids are plain ints in [0, num_blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from .block_hash import BlockKey
from .errors import NoFreeBlocksError


class BlockPool:
    """`num_blocks` physical blocks of `block_size` token slots, with reference counts, two free lists
    and a hash -> block index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts: list[int] = [0] * num_blocks
        # Top of the stack is the end of the list; block 0 is handed out first.
        self._uncached_free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._block_hash: list[int | None] = [None] * num_blocks
        # The key of each indexed block, spread over lists so that indexing a block allocates no
        # long-lived object: its token ids are tokens[offset : offset + block_size], where `tokens`
        # is a tuple shared with the blocks indexed in the same call.
        self._block_parent: list[int | None] = [None] * num_blocks
        self._block_extra: list[Hashable] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._block_offset: list[int] = [0] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting cached ones (they are evictable)."""
        return len(self._uncached_free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (evictable, reusable by a prefix hit)."""
        return len(self._cached_free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks indexed by the prefix cache, in use or free."""
        return len(self._hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash the block is indexed under, or None if it holds no cached prefix."""
        return self._block_hash[block_id]

    def block_key(self, block_id: int) -> BlockKey | None:
        """The (parent hash, extra keys, token ids) the block is indexed under, or None."""
        parent = self._block_parent[block_id]
        if parent is None:
            return None
        return parent, self._block_extra[block_id], self._token_ids(block_id)

    def _token_ids(self, block_id: int) -> tuple[int, ...]:
        # Only for indexed blocks (their tokens tuple is set).
        tokens: tuple[int, ...] = self._block_tokens[block_id]  # type: ignore[assignment]
        offset = self._block_offset[block_id]
        return tokens[offset : offset + self.block_size]

    def is_free(self, block_id: int) -> bool:
        return self._ref_counts[block_id] == 0

    def free_block_ids(self) -> tuple[list[int], list[int]]:
        """(never-cached free blocks, next handed out last; cached free blocks, next evicted first)."""
        return list(self._uncached_free), list(self._cached_free)

    # ---- allocation ----------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (ref count 1 each), never-cached ones first, then evicting
        cached ones in LRU order. Raises NoFreeBlocksError (changing nothing) if too few are free."""
        if num_blocks <= 0:
            if num_blocks == 0:
                return []
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        free = self._uncached_free
        refs = self._ref_counts
        if num_blocks <= len(free):
            block_ids = free[-num_blocks:]
            del free[-num_blocks:]
            block_ids.reverse()  # pop order: top of the stack first
        else:
            num_evict = num_blocks - len(free)
            if num_evict > len(self._cached_free):
                raise NoFreeBlocksError(num_blocks, self.num_free_blocks)
            block_ids = free[::-1]
            free.clear()
            block_ids += self._evict(num_evict)
        for block_id in block_ids:
            refs[block_id] = 1
        return block_ids

    def _evict(self, num_blocks: int) -> list[int]:
        cached = self._cached_free
        evicted = []
        for _ in range(num_blocks):
            block_id, _ = cached.popitem(last=False)
            self._uncache(block_id)
            evicted.append(block_id)
        self.num_evictions += num_blocks
        return evicted

    def _uncache(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            del self._hash_to_block[block_hash]
            self._block_hash[block_id] = None
            self._block_parent[block_id] = None
            self._block_extra[block_id] = None
            self._block_tokens[block_id] = None  # the offset is meaningless without it

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the order given. A block reaching 0 becomes free:
        onto the LRU queue's end if it holds a cached prefix, else onto the never-cached stack."""
        refs = self._ref_counts
        hashes = self._block_hash
        for block_id in block_ids:
            ref = refs[block_id] - 1
            if ref > 0:
                refs[block_id] = ref
            elif ref == 0:
                refs[block_id] = 0
                if hashes[block_id] is None:
                    self._uncached_free.append(block_id)
                else:
                    self._cached_free[block_id] = None
            else:
                raise ValueError(f"block {block_id} freed more often than it was referenced (double free)")

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block: blocks in use, or free blocks that hold a cached prefix
        (a prefix hit takes them off the LRU queue). A never-cached free block can't be taken this
        way (use `allocate`)."""
        refs = self._ref_counts
        for block_id in block_ids:
            ref = refs[block_id]
            if ref == 0:
                if self._block_hash[block_id] is None:
                    raise ValueError(
                        f"block {block_id} is free and holds no cached prefix; only blocks in use or "
                        "cached free blocks can gain a reference"
                    )
                del self._cached_free[block_id]
            refs[block_id] = ref + 1

    # ---- prefix-cache index --------------------------------------------------------------------

    def lookup(self, block_hash: int, key: BlockKey) -> int | None:
        """The block indexed under block_hash whose key equals `key`, or None."""
        block_id = self._hash_to_block.get(block_hash)
        if block_id is None:
            return None
        parent, extra_keys, token_ids = key
        if (
            self._block_parent[block_id] != parent
            or self._block_extra[block_id] != extra_keys
            or self._token_ids(block_id) != token_ids
        ):
            return None
        return block_id

    def register(self, block_id: int, block_hash: int, key: BlockKey) -> bool:
        """Index a full block in use under block_hash. Returns False (changing nothing) if another
        block already holds that hash, or this block is already indexed."""
        if len(key[2]) != self.block_size:
            raise ValueError(f"a block holds {self.block_size} token ids; the key has {len(key[2])}")
        if block_hash in self._hash_to_block or self._block_hash[block_id] is not None:
            return False
        if self._ref_counts[block_id] == 0:
            raise ValueError(
                f"block {block_id} is free; only a block in use can be added to the prefix cache"
            )
        self._hash_to_block[block_hash] = block_id
        self._block_hash[block_id] = block_hash
        self._block_parent[block_id], self._block_extra[block_id], self._block_tokens[block_id] = key
        self._block_offset[block_id] = 0
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (e.g. after new weights); cached free blocks become never-cached
        free blocks. Returns how many blocks were un-indexed."""
        num = len(self._hash_to_block)
        for block_id in list(self._hash_to_block.values()):
            self._uncache(block_id)
        # Oldest first onto the stack, so the most recently freed block is handed out first.
        self._uncached_free.extend(self._cached_free)
        self._cached_free.clear()
        return num
