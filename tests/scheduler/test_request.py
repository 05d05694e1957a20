"""Request: validation, token bookkeeping, status and finish reasons."""

from __future__ import annotations

import pytest

from tinyserve.request import Request, RequestStatus


def test_new_request_state() -> None:
    request = Request("a", (3, 4, 5), max_tokens=2, stop_token_ids=[9], sampling_params={"temperature": 0})
    assert request.prompt_token_ids == [3, 4, 5] and request.all_token_ids == [3, 4, 5]
    assert request.all_token_ids is not request.prompt_token_ids
    assert (request.num_tokens, request.num_prompt_tokens, request.num_output_tokens) == (3, 3, 0)
    assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0
    assert request.stop_token_ids == frozenset({9}) and request.sampling_params == {"temperature": 0}
    assert request.finish_reason is None and not request.is_finished
    request.append_output_token(7)
    assert request.output_token_ids == [7] and request.all_token_ids == [3, 4, 5, 7]
    assert request.prompt_token_ids == [3, 4, 5]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (RequestStatus.FINISHED_STOPPED, "stop"),
        (RequestStatus.FINISHED_LENGTH, "length"),
        (RequestStatus.FINISHED_ABORTED, "abort"),
        (RequestStatus.RUNNING, None),
        (RequestStatus.PREEMPTED, None),
    ],
)
def test_finish_reasons(status: RequestStatus, reason: str | None) -> None:
    request = Request("a", [1], max_tokens=1)
    request.status = status
    assert request.finish_reason == reason
    assert request.is_finished == status.is_finished == (reason is not None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"request_id": ""}, "request_id must be a non-empty str"),
        ({"request_id": 3}, "request_id must be a non-empty str"),
        ({"prompt_token_ids": []}, "at least one token"),
        ({"prompt_token_ids": [1, -2]}, "token ids must be >= 0, got -2"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
        ({"max_tokens": 1.0}, "max_tokens must be an int >= 1"),
    ],
)
def test_bad_requests(kwargs: dict, message: str) -> None:
    args = {"request_id": "a", "prompt_token_ids": [1, 2], "max_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        Request(**args)
