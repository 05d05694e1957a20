"""POST /v1/completions: prompts in the four OpenAI forms, whole responses or SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from tinyserve.engine import RequestOutput

from . import sse
from .generation import Generation, respond
from .inputs import Prompt, check_fits, check_model, completion_prompts, completion_sampling_params
from .logprobs import completion_logprobs, merge_completion_logprobs, prompt_completion_logprobs
from .protocol import CompletionRequest
from .responses import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage
from .state import ServerState


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    params = completion_sampling_params(state, req)
    prompts = completion_prompts(state, req)
    for prompt in prompts:
        check_fits(state, prompt, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gen = await Generation.start(state, request_id, prompts, params, stream=req.stream)
    created = int(time.time())
    return await respond(
        gen,
        raw,
        stream=req.stream,
        chunks=lambda: _chunks(gen, req, created),
        body=lambda finals: _response(gen, req, finals, created),
    )


def _echo_text(state: ServerState, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return state.tokenizer.decode(prompt.token_ids) if state.tokenizer is not None else ""


def _response(
    gen: Generation, req: CompletionRequest, finals: list[RequestOutput], created: int
) -> CompletionResponse:
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        prefix = _echo_text(gen.state, gen.prompts[i]) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                lp, _ = completion_logprobs(c, 0, len(prefix))
                if req.echo:
                    lp = merge_completion_logprobs(prompt_completion_logprobs(out)[0], lp)
                logprobs = CompletionLogprobs(**lp)
            choices.append(
                CompletionChoice(
                    index=i * req.n + c.index,
                    text=prefix + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    prompt_tokens = sum(len(p.token_ids) for p in gen.prompts)
    return CompletionResponse(
        id=gen.request_id,
        created=created,
        model=gen.state.model_names[0],
        choices=choices,
        usage=Usage(**sse.usage(prompt_tokens, completion_tokens)),
    )


async def _chunks(gen: Generation, req: CompletionRequest, created: int) -> AsyncIterator[str]:
    """One chunk per choice per step with new text; a choice's last chunk carries its finish_reason."""
    n = req.n
    fmt = sse.ChunkFormat(
        {
            "id": gen.request_id,
            "object": "text_completion",
            "created": created,
            "model": gen.state.model_names[0],
        }
    )
    num_choices = len(gen.prompts) * n
    sent_chars = [0] * num_choices  # of each choice's generated text
    sent_tokens = [0] * num_choices
    offsets = [0] * num_choices  # text offset for logprobs, echoed prompt included
    done = [False] * num_choices
    try:
        async for i, out in gen.outputs():
            for c in out.outputs:
                k = i * n + c.index
                if done[k]:
                    continue
                delta = c.text[sent_chars[k] :]
                num_new = len(c.token_ids) - sent_tokens[k]
                if not delta and not c.finished and (not num_new or req.logprobs is None):
                    continue  # nothing to show yet (e.g. text held back by a stop string)
                if req.echo and sent_tokens[k] == 0 and sent_chars[k] == 0:
                    delta = _echo_text(gen.state, gen.prompts[i]) + delta
                    offsets[k] = len(delta) - len(c.text)
                logprobs = None
                if req.logprobs is not None:
                    first_chunk = sent_tokens[k] == 0 and sent_chars[k] == 0
                    logprobs, offsets[k] = completion_logprobs(c, sent_tokens[k], offsets[k])
                    if req.echo and first_chunk:
                        echoed, _ = prompt_completion_logprobs(out)
                        logprobs = merge_completion_logprobs(echoed, logprobs)
                sent_chars[k] = len(c.text)
                sent_tokens[k] = len(c.token_ids)
                done[k] = c.finished
                choice = {
                    "index": k,
                    "text": delta,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                yield fmt.choice(choice)
        if req.include_usage:
            prompt_tokens = sum(len(p.token_ids) for p in gen.prompts)
            completion_tokens = sum(len(c.token_ids) for out in gen.latest if out for c in out.outputs)
            yield fmt.final(usage=sse.usage(prompt_tokens, completion_tokens))
    except Exception as e:  # noqa: BLE001 - the 200 headers are out: report in the stream
        yield sse.error_event(e)
    finally:
        gen.abort_unfinished()
    yield sse.DONE
