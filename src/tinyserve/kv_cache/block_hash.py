"""Chained hashes that name full KV blocks in the prefix cache.

A full block's identity is its key `(parent block's hash, extra keys, the block's token ids as a
tuple)`; its hash is `hash(key)`, so one hash names the whole prefix up to and including the block.
Extra keys (an adapter id, a cache salt, ...) keep prefixes of different namespaces apart.

NOTE: hashes use Python's built-in `hash`; they are valid within one process only. The prefix cache
stores each block's key and compares it on lookup, so a hash collision can't return wrong tokens for
that block; only a collision of a parent's hash could (about 2**-64 per pair of blocks).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# (parent block's hash, extra keys, token ids of the block)
BlockKey = tuple[int, Hashable, tuple[int, ...]]

ROOT_PARENT_HASH = 0
"""The parent hash of a sequence's first block."""


def hash_block(
    parent_hash: int, token_ids: Sequence[int], extra_keys: Hashable = None
) -> tuple[int, BlockKey]:
    """The (hash, key) of one full block of token ids whose preceding block hashes to parent_hash."""
    key: BlockKey = (parent_hash, extra_keys, tuple(token_ids))
    return hash(key), key
