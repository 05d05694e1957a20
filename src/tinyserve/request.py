"""Request state as the scheduler sees it: token ids, how many are computed, status.

Sampling parameters are opaque here (`sampling_params`): the scheduler only needs `max_tokens`,
`stop_token_ids` and the prefix-cache namespace, which the engine fills in from them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import Any


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, holds no KV blocks
    RUNNING = 1  # admitted, holds KV blocks
    PREEMPTED = 2  # queued again after its blocks were taken; recomputes from its tokens
    FINISHED_STOPPED = 3  # sampled a stop token (or the engine saw a stop string)
    FINISHED_LENGTH = 4  # reached max_tokens
    FINISHED_ABORTED = 5  # aborted by the caller

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence being generated.

    Args:
        request_id: unique among live requests.
        prompt_token_ids: [num_prompt_tokens], at least one token, ids >= 0.
        max_tokens: most tokens to generate (>= 1).
        sampling_params: anything; the scheduler never reads it.
        stop_token_ids: sampling one of these finishes the request (FINISHED_STOPPED); the engine
            includes EOS here unless the caller asked to ignore it.
        cache_extra_keys: prefix-cache namespace (e.g. an adapter id or a cache salt); requests
            share cached blocks only within the same namespace.
        arrival_time: seconds (time.monotonic), for metrics; now by default.

    NOTE: `all_token_ids` is prompt + output kept as one list (the scheduler slices it every step);
    change tokens only through `append_output_token`.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "max_tokens",
        "stop_token_ids",
        "sampling_params",
        "cache_extra_keys",
        "arrival_time",
        "arrival_order",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        sampling_params: Any = None,
        stop_token_ids: Iterable[int] = (),
        cache_extra_keys: Hashable = None,
        arrival_time: float | None = None,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError(
                f"request {request_id!r}: prompt_token_ids must hold at least one token, got none"
            )
        if min(prompt) < 0:
            raise ValueError(f"request {request_id!r}: token ids must be >= 0, got {min(prompt)}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_tokens must be an int >= 1, got {max_tokens!r}")
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt)
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.sampling_params = sampling_params
        self.cache_extra_keys = cache_extra_keys
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_order = -1  # set by the scheduler: FCFS rank
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is (being) computed
        self.num_cached_tokens = -1  # prefix-cache hit on first admission; -1 before it
        self.num_preemptions = 0
        # NOTE: while RUNNING, the KV manager's live block table (read-only here); [] otherwise.
        self.block_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """ "stop", "length" or "abort" once finished, else None."""
        return _FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
