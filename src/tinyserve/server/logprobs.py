"""Engine logprobs (per position: token id -> Logprob) in OpenAI's two formats: the legacy
completions one (tokens / token_logprobs / top_logprobs / text_offset) and chat's `content` list."""

from __future__ import annotations

import math
from typing import Any

from tinyserve.engine import CompletionOutput, Logprob

# JSON has no -inf; a masked-out token is reported with this (as vLLM does).
_FLOOR = -9999.0


def _value(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


def _text(lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else ""


def completion_logprobs(c: CompletionOutput, start: int, text_offset: int) -> tuple[dict[str, Any], int]:
    """Positions [start:] of `c` in the completions format (a dict matching CompletionLogprobs),
    and the text offset after them. `text_offset` is where position `start` begins in the text."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    entries = c.logprobs or []
    for pos in range(start, len(entries)):
        entry = entries[pos]
        chosen = entry.get(c.token_ids[pos]) if pos < len(c.token_ids) else None
        text = _text(chosen) if chosen is not None else ""
        tokens.append(text)
        values.append(_value(chosen.logprob) if chosen is not None else _FLOOR)
        tops.append({_text(lp): _value(lp.logprob) for lp in entry.values()})
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }, text_offset


def chat_logprobs(c: CompletionOutput, start: int, top_n: int) -> list[dict[str, Any]]:
    """Positions [start:] of `c` as chat `logprobs.content` entries with `top_n` alternatives each."""
    content = []
    entries = c.logprobs or []
    for pos in range(start, len(entries)):
        entry = entries[pos]
        chosen = entry.get(c.token_ids[pos]) if pos < len(c.token_ids) else None
        ranked = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
            key=lambda lp: lp.rank or 0,
        )
        content.append(
            {
                **_token(chosen),
                "top_logprobs": [_token(lp) for lp in ranked[:top_n]],
            }
        )
    return content


def _token(lp: Logprob | None) -> dict[str, Any]:
    if lp is None:
        return {"token": "", "logprob": _FLOOR, "bytes": []}
    text = _text(lp)
    return {"token": text, "logprob": _value(lp.logprob), "bytes": list(text.encode("utf-8"))}
