"""Chat templates: messages -> prompt text, rendered with jinja2 exactly as transformers renders them.

Same environment as transformers' `apply_chat_template`: an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, a `tojson` filter that does not escape HTML,
and the globals `raise_exception` and `strftime_now`. Templates see `messages`, `tools`, `documents`,
`add_generation_prompt`, the named special tokens (`bos_token`, `eos_token`, ...) and any extra kwargs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template is missing, fails to compile, or refused the conversation (raise_exception)."""


def load_chat_template(value: str | Path) -> str:
    """The `--chat-template` argument: a path to a template file, or the template text itself."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # e.g. a long inline template is not a valid file name
        pass
    text = str(value)
    if any(marker in text for marker in ("{{", "{%", "{#")):
        return text
    raise ChatTemplateError(f"chat template {text!r} is neither a readable file nor a jinja2 template")


def select_template(template: str | Sequence[Mapping[str, str]] | None, tools: Any = None) -> str | None:
    """A config may hold several named templates ([{"name", "template"}]): pick "tool_use" when tools
    are given and it exists, else "default"."""
    if template is None or isinstance(template, str):
        return template
    named = {t["name"]: t["template"] for t in template}
    if tools is not None and "tool_use" in named:
        return named["tool_use"]
    if "default" in named:
        return named["default"]
    raise ChatTemplateError(
        f"the model has several chat templates {sorted(named)} and none is named 'default'"
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dict copies of the messages as templates expect them.

    Keys whose value is None are dropped (as transformers does). A content given as a list of parts
    [{"type": "text", "text": ...}, ...] is flattened to the texts joined by newlines, as vLLM does for
    text-only models; any other part type is refused.
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        plain = {k: _plain(v) for k, v in message.items() if v is not None}
        if isinstance(plain.get("content"), list):
            plain["content"] = _flatten_content(plain["content"], i)
        out.append(plain)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `template` for `messages`. Extra kwargs (e.g. enable_thinking) reach the template as
    variables and override special tokens of the same name. Raises ChatTemplateError on any template
    failure, with the template's own message for raise_exception."""
    compiled = _compile(template)
    variables = {**(special_tokens or {}), **{k: _plain(v) for k, v in kwargs.items()}}
    try:
        return compiled.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """Deep copy into plain JSON-like types, so the sandboxed template sees no caller objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten_content(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"message {index}: content part of type {kind!r} is not supported (text only)"
            )
    return "\n".join(texts)
