"""AsyncEngine: the Engine served to asyncio code, with its step loop off the event loop.

The step loop (EngineCore, see `core`) runs either in its own process (the default for the server)
or in one background thread; both speak the same messages:
- the front (this module, on the event loop) sends commands: add, abort, stats, stop.
- the core drains them between steps and sends each step's outputs as deltas (new tokens only) in
  one message; with nothing to do it blocks on its command channel, so an idle server burns no CPU.
- the front keeps one `RequestStream` per request and applies the deltas to it. A consumer that falls
  behind skips straight to the newest state and loses nothing: the engine never waits for HTTP.

Nothing here knows about HTTP; the server (tinyserve.server) is the only caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tinyserve.config import EngineConfig
from tinyserve.sampling_params import SamplingParams
from tinyserve.tokenizer import IncrementalDetokenizer

from .core import EngineCore, EngineInfo, Message, QueueFullError, run_engine_process, write_to_pipe
from .engine import Engine, EngineStats, load_tokenizer
from .outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "QueueFullError",
    "RequestAbortedError",
    "RequestStream",
    "ShuttingDownError",
]


class EngineDeadError(RuntimeError):
    """The engine loop stopped with an error (or its process died); no request can be served."""


class ShuttingDownError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown) before it finished."""


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs.

    Iteration ends after the output with `finished=True`; it raises RequestAbortedError or
    EngineDeadError if the request cannot finish. `step_times` holds the engine's time.monotonic()
    of every delivered step (for inter-token latency); `arrival_time` is when the stream was created.
    Each output's `token_ids` lists are the stream's live lists (they only grow).
    """

    def __init__(
        self,
        request_id: str,
        *,
        stream: bool,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] = (),
        detokenizer: Callable[[], IncrementalDetokenizer] | None = None,
    ) -> None:
        self.request_id = request_id
        self.stream = stream
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        # A streamed request without stop strings is decoded here, on the event loop, while the
        # engine runs the next step (the engine would otherwise decode on the step's path).
        self._new_detokenizer = detokenizer
        self._detoks: dict[int, IncrementalDetokenizer] = {}
        self.arrival_time = time.monotonic()
        self.step_times: list[float] = []
        self.finished = False  # the consumer has seen the final output (or an error)
        self._engine_done = False  # the engine has delivered its final output (or failed)
        # The request's state so far, built from the engine's deltas.
        self._samples: list[CompletionOutput] = []
        self._metrics: RequestMetrics | None = None
        self._num_cached_tokens = 0
        self._prompt_logprobs = None
        self._fresh = False  # a delta arrived that the consumer has not seen
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    # ---- the event loop side of the engine (called in the loop's thread only) --------------------
    def _apply(self, delta: tuple, step_time: float) -> None:
        """Merge one step's delta (see core: new tokens, logprobs and text since the last one)."""
        _, finished, samples, metrics, num_cached_tokens, prompt_logprobs = delta
        for index, new_ids, text_update, finish_reason, stop_reason, new_logprobs, cumulative in samples:
            while len(self._samples) <= index:
                self._samples.append(CompletionOutput(index=len(self._samples), text="", token_ids=[]))
            c = self._samples[index]
            c.token_ids.extend(new_ids)
            if text_update is not None:
                keep, suffix = text_update
                c.text = c.text[:keep] + suffix
            c.finish_reason = finish_reason
            c.stop_reason = stop_reason
            if new_logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(new_logprobs)
            c.cumulative_logprob = cumulative
        if metrics is not None:
            self._metrics = RequestMetrics(*metrics)
        self._num_cached_tokens = num_cached_tokens
        if prompt_logprobs is not None:
            self._prompt_logprobs = prompt_logprobs
        self.step_times.append(step_time)
        if finished:
            self._engine_done = True
        self._fresh = True
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        if not self._engine_done:
            self._error = error
            self._engine_done = True
            self._event.set()

    # ---- the consumer ----------------------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while not self._fresh and self._error is None:
            self._event.clear()
            await self._event.wait()
        if not self._fresh:
            self.finished = True
            assert self._error is not None
            raise self._error
        self._fresh = False
        latest = self._snapshot()
        if latest.finished:
            self.finished = True
        if self._new_detokenizer is not None:
            self._decode(latest)
        return latest

    def _snapshot(self) -> RequestOutput:
        """The state now, in objects the next delta will not change (token id lists excepted)."""
        outputs = [
            CompletionOutput(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                cumulative_logprob=c.cumulative_logprob,
            )
            for c in self._samples
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self._engine_done and self._error is None,
            metrics=self._metrics,
            num_cached_tokens=self._num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs,
        )

    def _decode(self, output: RequestOutput) -> None:
        """Fill each sample's text from its token ids (the engine left it empty)."""
        for c in output.outputs:
            detok = self._detoks.get(c.index)
            if detok is None:
                detok = self._detoks[c.index] = self._new_detokenizer()  # type: ignore[misc]
            seen = detok.num_tokens_seen
            if len(c.token_ids) > seen:
                detok.add_tokens(c.token_ids[seen:])
            if c.finished:
                detok.flush()
            c.text = detok.output_text


# ---- where the core runs ----------------------------------------------------------------------------
class _ThreadCore:
    """EngineCore in a background thread of this process; messages hop to the loop in one call.

    NOTE: the Engine is built in the engine thread itself. Measured on the 2-core CPU box: an Engine
    built in the main thread and stepped in another ran ~30% slower (torch's OpenMP thread team
    belongs to the thread that first used it)."""

    def __init__(self, config: EngineConfig, max_queue: int | None) -> None:
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deliver: Callable[[list[Message]], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._built = threading.Event()
        self._engine: Engine | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(config, max_queue), name="tinyserve-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._engine is None:
            raise self._error or RuntimeError("the engine thread stopped before building the engine")
        self.info = EngineInfo.of(self._engine)

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Message]], None]) -> None:
        self._loop, self._deliver = loop, deliver

    def send(self, command: tuple) -> None:
        self._commands.put(command)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        pass

    def _main(self, config: EngineConfig, max_queue: int | None) -> None:
        try:
            self._engine = Engine(config)
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._error = e
            return
        finally:
            self._built.set()
        EngineCore(self._engine, send=self._send, max_queue=max_queue).run(self._receive)

    def _receive(self, block: bool) -> list:
        commands = []
        try:
            commands.append(self._commands.get() if block else self._commands.get_nowait())
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _send(self, messages: list[Message]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, messages)  # type: ignore[arg-type]


class _ProcessCore:
    """EngineCore in a child process (spawned: CUDA must start fresh there), over two pipes.

    Commands go through a writer thread, so a full pipe never blocks the event loop (and the two
    processes can't deadlock writing to each other); messages are read on the loop (add_reader)."""

    def __init__(self, config: EngineConfig, max_queue: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._messages, messages_out = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_engine_process,
            args=(config, max_queue, commands_in, messages_out, logging.getLogger().getEffectiveLevel()),
            name="tinyserve-engine",
            daemon=True,
        )
        self._process.start()
        commands_in.close()
        messages_out.close()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Callable[[list[Message]], None] | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.info = self._wait_ready()
        try:
            self.info.tokenizer = load_tokenizer(config)  # the front's own copy
        except BaseException:
            self._process.kill()
            self._process.join(5)
            raise
        self._writer = threading.Thread(
            target=write_to_pipe,
            args=(self._outbox, self._commands),
            name="tinyserve-engine-writer",
            daemon=True,
        )
        self._writer.start()

    def _wait_ready(self) -> EngineInfo:
        try:
            (message,) = self._messages.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(
                f"the engine process exited during start-up (exit code {self._process.exitcode})"
            ) from None
        if message[0] != "ready":
            self._process.join(5)
            raise RuntimeError(f"the engine failed to start: {message[1]}")
        return message[1]

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Message]], None]) -> None:
        self._loop, self._deliver = loop, deliver
        loop.add_reader(self._messages.fileno(), self._read)

    def send(self, command: tuple) -> None:
        self._outbox.put(command)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def join(self, timeout: float) -> None:
        self._stopping = True
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; terminating it", timeout)
            self._process.terminate()
            self._process.join(5)

    def close(self) -> None:
        """After join: deliver what the child sent last, then release the pipes and the writer."""
        self._read()
        self._outbox.put(None)
        self._commands.close()

    def _read(self) -> None:
        conn = self._messages
        if conn.closed:
            return
        try:
            while conn.poll():
                self._deliver(conn.recv())  # type: ignore[misc]
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())
            conn.close()
            if not self._stopping:
                self._process.join(1)
                self._deliver(  # type: ignore[misc]
                    [("dead", f"the engine process exited (exit code {self._process.exitcode})")]
                )


class AsyncEngine:
    """Serve an Engine to asyncio code.

        async_engine = AsyncEngine(config, max_queue=100)   # loads the model (blocking)
        async_engine.start()                       # in the running event loop
        stream = await async_engine.add_request(ids, SamplingParams(...), stream=True)
        async for output in stream: ...            # cumulative RequestOutputs
        async_engine.abort(stream.request_id)      # e.g. the client went away
        await async_engine.shutdown(grace_s=5)     # finish or abort in-flight requests, stop the loop

    process: run the engine loop in its own process (True) or in a background thread (False).
    max_queue: reject (QueueFullError) a request that arrives when this many scheduler requests are
    already waiting (each of a request's n samples counts); None = unbounded.
    """

    def __init__(self, config: EngineConfig, *, max_queue: int | None = None, process: bool = True) -> None:
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be None or >= 0, got {max_queue}")
        self.max_queue = max_queue
        self.process = process
        self._core = _ProcessCore(config, max_queue) if process else _ThreadCore(config, max_queue)
        self.info: EngineInfo = self._core.info
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._live: dict[str, RequestStream] = {}  # accepted (or being added) and not finished
        self._adds: dict[str, asyncio.Future[None]] = {}
        self._stats: dict[int, asyncio.Future[EngineStats]] = {}
        self._stats_ids = itertools.count()
        self._accepting = True
        self.error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running event loop, which will consume the streams; call once, before any request."""
        if self._loop is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._core.start(self._loop, self._on_messages)

    @property
    def is_running(self) -> bool:
        return self._core.alive and self.error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._live)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop taking requests, give in-flight ones up to `grace_s` seconds to finish, abort the
        rest (their streams raise RequestAbortedError) and stop the engine loop."""
        self._accepting = False
        deadline = time.monotonic() + max(grace_s, 0.0)
        while self._live and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.05)
        if self._live:
            logger.info("aborting %d in-flight request(s) for shutdown", len(self._live))
        self._core.send(("abort_all", "the server is shutting down"))
        self._core.send(("stop",))
        await asyncio.to_thread(self._core.join, 30.0)
        self._core.close()

    def stop_accepting(self) -> None:
        """New requests get ShuttingDownError from now on (the first step of a graceful shutdown)."""
        self._accepting = False

    # ---- requests --------------------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        prompt: str | None = None,
        stream: bool = False,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine has accepted it.

        stream=True: an output after every step with new tokens; False: only the final one.
        Raises ValueError (bad prompt or parameters, with the engine's message), QueueFullError,
        ShuttingDownError or EngineDeadError.
        """
        self._check_open()
        assert self._loop is not None
        rid = request_id or self.new_request_id()
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = list(prompt_token_ids)
        detokenizer = self._stream_detokenizer(ids, params, stream)
        s = RequestStream(rid, stream=stream, prompt=prompt, prompt_token_ids=ids, detokenizer=detokenizer)
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._live[rid] = s  # before the command: its first output may arrive with the reply
        self._adds[rid] = accepted
        self._core.send(("add", rid, ids, params, prompt, stream, detokenizer is None))
        try:
            await accepted  # raises what the engine raised
        except asyncio.CancelledError:
            self.abort(rid)  # queued after the add, so the engine frees it right away
            raise
        except BaseException:
            self._live.pop(rid, None)
            raise
        return s

    def abort(self, request_id: str) -> None:
        """Abort a request (fire and forget; a finished or unknown id is ignored). Its KV blocks are
        freed before the engine's next step."""
        if self._live.pop(request_id, None) is not None:
            self._core.send(("abort", request_id))

    async def get_stats(self) -> EngineStats:
        """A consistent snapshot, taken by the engine between two steps."""
        self._check_alive()
        assert self._loop is not None
        seq = next(self._stats_ids)
        result: asyncio.Future[EngineStats] = self._loop.create_future()
        self._stats[seq] = result
        self._core.send(("stats", seq))
        return await result

    def _check_open(self) -> None:
        self._check_alive()
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down and takes no new requests")

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if self._loop is None:
            raise RuntimeError("AsyncEngine.start() was not called")

    def _stream_detokenizer(
        self, prompt_token_ids: list[int], params: SamplingParams, stream: bool
    ) -> Callable[[], IncrementalDetokenizer] | None:
        """For a stream without stop strings: decode on the event loop (see RequestStream)."""
        tokenizer = self.info.tokenizer
        if not stream or params.stop_list or tokenizer is None:
            return None

        def make() -> IncrementalDetokenizer:
            return IncrementalDetokenizer(
                tokenizer, prompt_token_ids=prompt_token_ids, skip_special_tokens=params.skip_special_tokens
            )

        return make

    # ---- messages from the core (on the event loop) -----------------------------------------------
    def _on_messages(self, messages: list[Message]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "outputs":
                self._on_outputs(message[1], message[2])
            elif kind == "added":
                self._on_added(message[1], message[2])
            elif kind == "stats":
                future = self._stats.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif kind == "aborted":
                aborted = RequestAbortedError(f"request aborted: {message[2]}")
                for rid in message[1]:
                    s = self._live.pop(rid, None)
                    if s is not None:
                        s._fail(aborted)
            elif kind == "dead":
                self._on_dead(message[1])

    def _on_outputs(self, step_time: float, deltas: list[tuple]) -> None:
        live = self._live
        for delta in deltas:
            s = live.get(delta[0])
            if s is None:  # aborted here after the engine produced it
                continue
            s._apply(delta, step_time)
            if delta[1]:
                del live[delta[0]]

    def _on_added(self, rid: str, error: BaseException | None) -> None:
        future = self._adds.pop(rid, None)
        if future is None or future.done():  # the caller was cancelled (and aborted it)
            return
        if error is not None:
            self._live.pop(rid, None)
            future.set_exception(error)
        else:
            future.set_result(None)

    def _on_dead(self, reason: str) -> None:
        logger.error("the engine stopped: %s", reason)
        self.error = EngineDeadError(f"the engine stopped after an error: {reason}")
        pending: list[asyncio.Future[Any]] = [*self._adds.values(), *self._stats.values()]
        for future in pending:
            if not future.done():
                future.set_exception(self.error)
        self._adds.clear()
        self._stats.clear()
        for s in self._live.values():
            s._fail(self.error)
        self._live.clear()
