"""Request body -> engine inputs: prompt token ids (tokenised or chat-templated) and SamplingParams.

Every problem becomes an APIError(400) that names the field, so no bad input reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinyserve.sampling_params import SamplingParams
from tinyserve.tokenizer import Tokenizer

from .errors import APIError
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling
from .state import ServerState


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine takes it; `text` is None when the client sent token ids."""

    text: str | None
    token_ids: list[int]


def require_tokenizer(state: ServerState, what: str) -> Tokenizer:
    """The tokenizer, or a 400 when the server runs without one (--skip-tokenizer-init)."""
    if state.tokenizer is None:
        raise APIError(
            400,
            f"{what} needs a tokenizer, and this server runs without one "
            "(--skip-tokenizer-init): send prompts as token ids",
        )
    return state.tokenizer


def check_model(state: ServerState, model: str | None) -> None:
    """404 for a model name this server does not serve (None = the default model)."""
    if model is not None and model not in state.model_names:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_names[0]!r}",
            param="model",
            code="model_not_found",
        )


def completion_prompts(state: ServerState, req: CompletionRequest) -> list[Prompt]:
    """The four prompt forms: str, [str], [int], [[int]]."""
    p = req.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if len(items) * req.n > state.max_batch_choices:
        raise APIError(
            400,
            f"this request asks for {len(items)} prompts x n={req.n} = {len(items) * req.n} choices; "
            f"the server allows at most {state.max_batch_choices} per request",
            param="prompt",
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            tok = require_tokenizer(state, "a text prompt")
            prompts.append(Prompt(item, tok.encode(item, add_special_tokens=req.add_special_tokens)))
        else:
            prompts.append(Prompt(None, list(item)))
    for prompt in prompts:
        check_token_ids(state, prompt.token_ids, "prompt")
    return prompts


def check_token_ids(state: ServerState, token_ids: list[int], param: str) -> None:
    if not token_ids:
        raise APIError(400, f"{param} is empty: give at least one token", param=param)
    bad = [t for t in token_ids if t >= state.vocab_size]
    if bad:
        raise APIError(
            400,
            f"{param} has token ids outside the vocabulary [0, {state.vocab_size}): {bad[:5]}",
            param=param,
        )


def messages_as_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content: Any = m.content
        if isinstance(content, list):
            content = [{"type": "text", "text": part.text} for part in content]
        d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> Prompt:
    """Apply the chat template (the model's, or --chat-template); 400 when there is none or it fails."""
    tok = require_tokenizer(state, "a chat conversation")
    if tok.chat_template is None:
        raise APIError(
            400,
            f"the model {state.model_names[0]!r} has no chat template, so /v1/chat/completions cannot "
            "format messages; restart the server with --chat-template FILE, or use /v1/completions",
            param="messages",
        )
    try:
        text = tok.apply_chat_template(
            messages_as_dicts(messages),
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - a template may raise anything on odd input
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from e
    if not isinstance(text, str):
        raise APIError(400, "the chat template did not produce text", param="messages")
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the chat template produced an empty prompt", param="messages")
    return Prompt(text, ids)


def sampling_params(
    state: ServerState,
    req: _Sampling,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    if req.n > state.max_num_seqs:
        raise APIError(
            400, f"n must be at most {state.max_num_seqs} (the server's max-num-seqs), got {req.n}", param="n"
        )
    values: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "seed": req.seed,
    }
    optional = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    )
    for name in optional:
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        param = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=param if param in values else None) from e


def completion_sampling_params(state: ServerState, req: CompletionRequest) -> SamplingParams:
    # echo with logprobs scores the echoed prompt too (OpenAI's legacy completions behaviour).
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    return sampling_params(
        state, req, max_tokens=req.max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs
    )


def chat_sampling_params(state: ServerState, req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(state, req, max_tokens=max_tokens, logprobs=logprobs)


def check_fits(state: ServerState, prompt: Prompt, params: SamplingParams) -> None:
    """Prompt + max_tokens against the context length, before anything is queued (400 with both numbers)."""
    try:
        state.engine.info.validate_prompt(prompt.token_ids, params)
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt") from e
