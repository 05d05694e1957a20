"""CacheConfig validation: every bad field says what was wrong and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from tinyserve.config import CacheConfig


def test_defaults() -> None:
    config = CacheConfig()
    assert (config.block_size, config.num_blocks, config.enable_prefix_caching) == (16, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("block_size", 0, ValueError, r"block_size must be in \[1, 1024\], got 0"),
        ("block_size", 2048, ValueError, r"block_size must be in \[1, 1024\]"),
        ("block_size", 16.0, TypeError, "block_size must be an int, got float"),
        ("block_size", True, TypeError, "block_size must be an int, got bool"),
        ("num_blocks", 0, ValueError, "num_blocks must be >= 1, got 0"),
        ("enable_prefix_caching", 1, TypeError, "enable_prefix_caching must be a bool"),
        ("watermark", -0.1, ValueError, r"watermark must be in \[0.0, 1.0\), got -0.1"),
        ("watermark", 1.0, ValueError, r"watermark must be in \[0.0, 1.0\), got 1.0"),
        ("watermark", "0.1", TypeError, "watermark must be a float"),
        ("gpu_memory_utilization", 0.0, ValueError, r"gpu_memory_utilization must be in \(0.0, 1.0\]"),
        ("gpu_memory_utilization", 1.5, ValueError, r"gpu_memory_utilization must be in \(0.0, 1.0\]"),
    ],
)
def test_bad_values(field: str, value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CacheConfig(**{field: value})
