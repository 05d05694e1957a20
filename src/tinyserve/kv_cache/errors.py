"""Exceptions of the KV-cache manager; the scheduler catches NoFreeBlocksError to preempt."""

from __future__ import annotations


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free (or evictable) blocks than an allocation needs. Nothing was changed.

    Attributes:
        num_needed: blocks the allocation needed.
        num_free: free blocks (never-cached plus evictable cached ones) at the time.
    """

    def __init__(self, num_needed: int, num_free: int) -> None:
        super().__init__(
            f"out of KV-cache blocks: needed {num_needed}, only {num_free} free; "
            "free or preempt a request before retrying"
        )
        self.num_needed = num_needed
        self.num_free = num_free


class RequestTooLargeError(ValueError):
    """A request could never fit: its worst-case KV size exceeds the whole pool (or a length limit)."""
