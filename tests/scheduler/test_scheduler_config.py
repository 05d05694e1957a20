"""SchedulerConfig validation."""

from __future__ import annotations

import pytest

from tinyserve.config import SchedulerConfig


def test_defaults() -> None:
    config = SchedulerConfig()
    assert (config.max_num_batched_tokens, config.max_num_seqs, config.max_model_len) == (8192, 256, None)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_num_batched_tokens": 0, "max_num_seqs": 1}, ValueError, "max_num_batched_tokens must be >= 1"),
        ({"max_num_seqs": 0}, ValueError, "max_num_seqs must be >= 1, got 0"),
        ({"max_num_seqs": 2.5}, TypeError, "max_num_seqs must be an int"),
        ({"max_model_len": 0}, ValueError, "max_model_len must be >= 1"),
        (
            {"max_num_batched_tokens": 8, "max_num_seqs": 16},
            ValueError,
            r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)",
        ),
    ],
)
def test_bad_values(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        SchedulerConfig(**kwargs)
