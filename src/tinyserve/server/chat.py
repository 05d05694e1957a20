"""POST /v1/chat/completions: messages through the chat template, whole responses or SSE chunks.

Streaming invariants (OpenAI's): every chunk has the response's one id; each choice's first delta
carries the role; its last chunk carries finish_reason; usage (when asked) comes in a final chunk
with no choices, then `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tinyserve.engine import RequestOutput

from . import sse
from .generation import Generation, respond
from .inputs import chat_sampling_params, check_fits, check_model, render_chat
from .logprobs import chat_logprobs
from .protocol import ChatCompletionRequest
from .responses import AssistantMessage, ChatChoice, ChatCompletionResponse, ChatLogprobs, TokenLogprob, Usage
from .state import ServerState


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    params = chat_sampling_params(state, req)
    prompt = render_chat(
        state,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        template_kwargs=req.chat_template_kwargs,
    )
    check_fits(state, prompt, params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen = await Generation.start(state, request_id, [prompt], params, stream=req.stream)
    created = int(time.time())
    return await respond(
        gen,
        raw,
        stream=req.stream,
        chunks=lambda: _chunks(gen, req, created),
        body=lambda finals: _response(gen, req, finals[0], created),
    )


def _top_n(req: ChatCompletionRequest) -> int:
    return req.top_logprobs or 0


def _response(
    gen: Generation, req: ChatCompletionRequest, out: RequestOutput, created: int
) -> ChatCompletionResponse:
    choices = []
    for c in out.outputs:
        logprobs = None
        if req.logprobs:
            content = [TokenLogprob(**e) for e in chat_logprobs(c, 0, _top_n(req))]
            logprobs = ChatLogprobs(content=content)
        choices.append(
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return ChatCompletionResponse(
        id=gen.request_id,
        created=created,
        model=gen.state.model_names[0],
        choices=choices,
        usage=Usage(**sse.usage(len(out.prompt_token_ids), completion_tokens)),
    )


async def _chunks(gen: Generation, req: ChatCompletionRequest, created: int) -> AsyncIterator[str]:
    head: dict[str, Any] = {
        "id": gen.request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": gen.state.model_names[0],
    }
    if req.include_usage:
        head["usage"] = None
    fmt = sse.ChunkFormat(head)

    def chunk(
        index: int,
        delta: dict[str, Any],
        logprobs: Any = None,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return fmt.choice(choice)

    n = req.n
    sent_chars = [0] * n
    sent_tokens = [0] * n
    done = [False] * n
    try:
        for k in range(n):
            yield chunk(k, {"role": "assistant", "content": ""})
        async for _, out in gen.outputs():
            for c in out.outputs:
                k = c.index
                if done[k]:
                    continue
                delta = c.text[sent_chars[k] :]
                num_new = len(c.token_ids) - sent_tokens[k]
                if not delta and not c.finished and (not num_new or not req.logprobs):
                    continue
                logprobs = (
                    {"content": chat_logprobs(c, sent_tokens[k], _top_n(req))} if req.logprobs else None
                )
                sent_chars[k] = len(c.text)
                sent_tokens[k] = len(c.token_ids)
                done[k] = c.finished
                yield chunk(k, {"content": delta} if delta else {}, logprobs, c.finish_reason, c.stop_reason)
        if req.include_usage:
            out = gen.latest[0]
            completion_tokens = sum(len(c.token_ids) for c in out.outputs) if out else 0
            prompt_tokens = len(gen.prompts[0].token_ids)
            yield fmt.final(usage=sse.usage(prompt_tokens, completion_tokens))
    except Exception as e:  # noqa: BLE001 - the 200 headers are out: report in the stream
        yield sse.error_event(e)
    finally:
        gen.abort_unfinished()
    yield sse.DONE
