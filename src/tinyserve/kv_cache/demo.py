"""The fragmentation scenario from the original notes: `python -m tinyserve.kv_cache.demo`.

Users A-D fill most of a 10-block pool; A and C are freed, leaving holes; E needs 5 blocks and gets
them from the scattered holes plus the free tail: paging needs no contiguous run of memory.
"""

from __future__ import annotations

from tinyserve.config import CacheConfig

from .manager import KVCacheManager

BLOCK_SIZE = 16
NUM_BLOCKS = 10
# user -> prompt length in tokens
USERS = {"A": 32, "B": 20, "C": 17, "D": 30}
NEW_USER, NEW_USER_TOKENS = "E", 70


def allocate(kv: KVCacheManager, user: str, num_tokens: int) -> None:
    print(f"Allocating sequence {user} (needs {kv.num_blocks_for(num_tokens)} blocks)")
    kv.allocate(user, num_tokens, range(num_tokens))
    print(f"User {user} successfully allocated blocks: {kv.block_ids(user)}")


def main() -> None:
    # Prefix caching off: freed blocks go straight back to the free list, which the demo is about.
    kv = KVCacheManager(
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, enable_prefix_caching=False)
    )
    for user, num_tokens in USERS.items():
        allocate(kv, user, num_tokens)
    print(f"Free Blocks: {kv.num_free_blocks}")
    print("Freeing users A and C")
    kv.free("A")
    kv.free("C")
    print(f"Free Blocks: {kv.num_free_blocks}")
    allocate(kv, NEW_USER, NEW_USER_TOKENS)


if __name__ == "__main__":
    main()
