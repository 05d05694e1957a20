"""Server-sent events in OpenAI's framing: `data: <json>\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from typing import Any

from .errors import error_body, error_from_exception

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event(payload: dict[str, Any]) -> str:
    return f"data: {_dumps(payload)}\n\n"


class ChunkFormat:
    """Chunks of one response: the fields shared by every chunk (id, object, created, model, ...)
    are serialised once; each chunk then costs one small json.dumps of its choice (the hot path)."""

    def __init__(self, head: dict[str, Any]) -> None:
        self.head = head
        self._prefix = "data: " + _dumps(head)[:-1] + ',"choices":['

    def choice(self, choice: dict[str, Any]) -> str:
        return f"{self._prefix}{_dumps(choice)}]}}\n\n"

    def final(self, **fields: Any) -> str:
        """The usage chunk: no choices, plus `fields`."""
        return event({**self.head, "choices": [], **fields})


def error_event(e: BaseException) -> str:
    """An error after the 200 headers went out: the OpenAI client raises it as an APIError."""
    api = error_from_exception(e)
    return event(error_body(api.status, api.message, api.param, api.code).model_dump())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
