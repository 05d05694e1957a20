"""The KV-cache block manager: a pool of fixed-size blocks (free lists, ref counts, LRU of cached
blocks), the prefix cache, and per-request block tables with copy-on-write forks."""

from __future__ import annotations

from .block_hash import ROOT_PARENT_HASH, BlockKey, hash_block
from .block_pool import BlockPool
from .errors import NoFreeBlocksError, RequestTooLargeError
from .manager import EMPTY_PREFIX, CachedPrefix, KVCacheManager, KVCacheStats

__all__ = [
    "EMPTY_PREFIX",
    "ROOT_PARENT_HASH",
    "BlockKey",
    "BlockPool",
    "CachedPrefix",
    "KVCacheManager",
    "KVCacheStats",
    "NoFreeBlocksError",
    "RequestTooLargeError",
    "hash_block",
]
