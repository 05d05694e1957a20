"""Engine logprobs (per position: token id -> Logprob) in OpenAI's two formats: the legacy
completions one (tokens / token_logprobs / top_logprobs / text_offset) and chat's `content` list."""

from __future__ import annotations

import math
from typing import Any

from tinyserve.engine import CompletionOutput, Logprob, RequestOutput

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


def prompt_completion_logprobs(out: RequestOutput, text_offset: int = 0) -> tuple[dict[str, Any], int]:
    """The echoed prompt's tokens in the completions format (echo with logprobs): the first token
    has no logprob (null), each later one its logprob and top alternatives. Returns the dict and the
    text offset after the prompt."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    entries = out.prompt_logprobs or []
    for pos, token_id in enumerate(out.prompt_token_ids):
        entry = entries[pos] if pos < len(entries) else None
        chosen = entry.get(token_id) if entry else None
        text = _text(chosen) if chosen is not None else _first_token_text(out, entries, token_id)
        tokens.append(text)
        values.append(_value(chosen.logprob) if chosen is not None else None)
        tops.append({_text(lp): _value(lp.logprob) for lp in entry.values()} if entry else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }, text_offset


def _first_token_text(out: RequestOutput, entries: list, token_id: int) -> str:
    # Nothing scores the first prompt token, so no Logprob carries its text; another position may.
    for entry in entries:
        if entry and token_id in entry:
            return _text(entry[token_id])
    return ""


def merge_completion_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two completions-format logprob dicts, one after the other."""
    return {
        key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }


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
