"""One HTTP request's generation: its engine requests (one per prompt), their merged outputs, and
the abort when the client goes away. Shared by /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from tinyserve.engine import RequestOutput
from tinyserve.engine.async_engine import RequestStream
from tinyserve.sampling_params import SamplingParams

from . import sse
from .errors import error_from_exception
from .inputs import Prompt
from .state import ServerState

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


class Generation:
    """The engine requests behind one HTTP request; build with `await Generation.start(...)`."""

    def __init__(
        self, state: ServerState, request_id: str, prompts: Sequence[Prompt], streams: list[RequestStream]
    ):
        self.state = state
        self.request_id = request_id
        self.prompts = list(prompts)
        self.streams = streams
        self.latest: list[RequestOutput | None] = [None] * len(streams)

    @classmethod
    async def start(
        cls,
        state: ServerState,
        request_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        stream: bool,
    ) -> Generation:
        """Queue every prompt at once (one engine-thread round trip); all or nothing."""
        engine = state.engine
        adds = [
            engine.add_request(
                p.token_ids, params, request_id=f"{request_id}-{i}", prompt=p.text, stream=stream
            )
            for i, p in enumerate(prompts)
        ]
        results = await asyncio.gather(*adds, return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if not isinstance(r, RequestStream)]
        if errors:
            for s in streams:
                engine.abort(s.request_id)
            raise error_from_exception(errors[0])
        return cls(state, request_id, prompts, streams)

    def abort_unfinished(self) -> None:
        """Abort every engine request that has not finished (idempotent)."""
        for s in self.streams:
            if not s.finished:
                self.state.engine.abort(s.request_id)
                s.finished = True
                self.state.metrics.aborted.inc()

    async def close(self) -> None:
        """`abort_unfinished` as a coroutine, for a response's BackgroundTask: it then runs on the
        event loop (a plain function would run in a worker thread, and AsyncEngine is loop-only)."""
        self.abort_unfinished()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they come, across all prompts; ends when all finished.
        Finished requests are recorded in the metrics."""
        async for i, out in _merge(self.streams):
            self.latest[i] = out
            if out.finished:
                self.state.metrics.observe(self.streams[i], out)
            yield i, out

    async def final_outputs(self, raw: Request) -> list[RequestOutput]:
        """Wait for every prompt's final output; aborts (ClientDisconnected) if the client leaves."""

        async def collect() -> list[RequestOutput]:
            async for _ in self.outputs():
                pass
            return [out for out in self.latest if out is not None]

        try:
            return await run_until_disconnect(collect(), raw)
        finally:
            self.abort_unfinished()


async def respond(
    gen: Generation,
    raw: Request,
    *,
    stream: bool,
    chunks: Callable[[], AsyncIterator[str]],
    body: Callable[[list[RequestOutput]], BaseModel],
) -> Response:
    """The HTTP response of a started generation: SSE `chunks()` when streaming (the generation is
    aborted when the stream ends early), else the JSON `body(final outputs)`; 499 if the client left."""
    if stream:
        return StreamingResponse(
            chunks(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS, background=BackgroundTask(gen.close)
        )
    try:
        finals = await gen.final_outputs(raw)
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - engine-side failures become OpenAI errors
        raise error_from_exception(e) from e
    return Response(body(finals).model_dump_json(), media_type="application/json")


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    inbox: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                inbox.put_nowait((i, out, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            inbox.put_nowait((i, None, e))
            return
        inbox.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, error = await inbox.get()
            if error is not None:
                raise error
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def run_until_disconnect(work: Awaitable[T], raw: Request) -> T:
    """Await `work`, but give up (ClientDisconnected) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
