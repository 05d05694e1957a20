"""EngineCore: the Engine's step loop behind a message channel, in a thread or in its own process.

The server's front (AsyncEngine, on the asyncio event loop) and the core exchange plain picklable
tuples, so the same loop runs in a background thread (queues) or in a child process (pipes):

    front -> core   ("add", request_id, prompt_token_ids, params, prompt, stream, detokenize)
                    ("abort", request_id) | ("abort_all", reason) | ("stats", seq) | ("stop",)
    core -> front   lists of ("added", request_id, error | None) | ("stats", seq, EngineStats)
                    ("outputs", step_time, [delta, ...]) | ("aborted", [request_id, ...], reason)
                    ("dead", message)

A delta carries only what changed since the request's previous delta (new token ids, new logprob
entries, the text's new suffix), so a step costs O(new tokens) to send, not O(tokens so far):

    delta  = (request_id, finished, samples, metrics, num_cached_tokens, prompt_logprobs | None)
    sample = (index, new_token_ids, text_update, finish_reason, stop_reason, new_logprobs | None,
              cumulative_logprob)
    text_update = None (unchanged) | (keep, suffix): text = text[:keep] + suffix

NOTE: the process exists because the event loop and a thread share the GIL: at a few hundred streams
the loop's per-step HTTP work starved the engine thread (measured: 45 % of offline throughput on an
H200). In its own process the engine never waits for HTTP; the loop coalesces outputs instead.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinyserve.config import EngineConfig
from tinyserve.models.config import ModelArchConfig
from tinyserve.sampling_params import SamplingParams
from tinyserve.tokenizer import Tokenizer

from .engine import Engine, check_prompt

logger = logging.getLogger(__name__)

Message = tuple[Any, ...]


class QueueFullError(RuntimeError):
    """The waiting queue already holds `max_queue` requests."""


@dataclass
class EngineInfo:
    """What the front needs to know about the engine; fixed once the engine is built.

    `tokenizer` is the front's own copy (loaded in the front's process; it never crosses the pipe).
    """

    config: EngineConfig
    arch: ModelArchConfig
    device: str
    max_model_len: int
    kv_pool_tokens: int
    has_tokenizer: bool
    tokenizer: Tokenizer | None = None

    @classmethod
    def of(cls, engine: Engine) -> EngineInfo:
        return cls(
            config=engine.config,
            arch=engine.arch,
            device=str(engine.device),
            max_model_len=engine.max_model_len,
            kv_pool_tokens=engine.kv_pool_tokens,
            has_tokenizer=engine.tokenizer is not None,
            tokenizer=engine.tokenizer,
        )

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """The engine's own check (see engine.check_prompt), run on the front before queueing."""
        return check_prompt(
            prompt_token_ids,
            params,
            vocab_size=self.arch.vocab_size,
            max_model_len=self.max_model_len,
            has_tokenizer=self.has_tokenizer,
        )


class EngineCore:
    """Runs the Engine: handles the front's commands between steps and sends every step's deltas.

    send: delivers one list of messages to the front (a queue hop or a pipe write).
    max_queue: reject an add (QueueFullError) while this many scheduler requests are waiting.
    """

    def __init__(
        self, engine: Engine, *, send: Callable[[list[Message]], None], max_queue: int | None
    ) -> None:
        self.engine = engine
        engine.delta_outputs = True  # step() returns the delta tuples sent as they are
        self.send = send
        self.max_queue = max_queue
        self._live: set[str] = set()  # requests the front listens to

    def run(self, receive: Callable[[bool], list | None]) -> None:
        """The loop. `receive(block)` returns the queued commands (waiting for one if `block`), or
        None when the front is gone. Returns after ("stop",); an exception is reported as "dead"."""
        engine = self.engine
        try:
            while True:
                commands = receive(not engine.has_unfinished_requests())
                if commands is None:
                    return
                replies: list[Message] = []
                stop = False
                for command in commands:
                    if command[0] == "stop":
                        stop = True
                        break
                    self._handle(command, replies)
                if replies:
                    self.send(replies)
                if stop:
                    return
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                if outputs:
                    deltas = self._deltas(outputs)
                    if deltas:
                        self.send([("outputs", time.monotonic(), deltas)])
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            logger.exception("the engine loop stopped with an error")
            self._live.clear()
            self.send([("dead", f"{type(e).__name__}: {e}")])

    # ---- commands --------------------------------------------------------------------------------
    def _handle(self, command: tuple, replies: list[Message]) -> None:
        kind = command[0]
        engine = self.engine
        if kind == "add":
            replies.append(("added", command[1], self._add(*command[1:])))
        elif kind == "abort":
            self._live.discard(command[1])
            engine.abort_request(command[1])
        elif kind == "stats":
            replies.append(("stats", command[1], engine.stats()))
        elif kind == "abort_all":
            aborted = list(self._live)
            for rid in aborted:
                engine.abort_request(rid)
            self._live.clear()
            if aborted:
                replies.append(("aborted", aborted, command[1]))
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def _add(
        self,
        rid: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
        stream: bool,
        detokenize: bool,
    ) -> BaseException | None:
        """Queue a request; returns the error to hand back (always a picklable builtin type)."""
        engine = self.engine
        waiting = engine.scheduler.num_waiting
        if self.max_queue is not None and waiting >= self.max_queue:
            return QueueFullError(
                f"the server is busy: {waiting} requests are waiting and the queue holds at most "
                f"{self.max_queue}; retry later"
            )
        try:
            engine.add_request(
                rid, prompt_token_ids, params, prompt=prompt, stream=stream, detokenize=detokenize
            )
        except ValueError as e:
            return ValueError(str(e))
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
            logger.exception("add_request failed for %s", rid)
            engine.abort_request(rid)  # drop anything half-added
            return RuntimeError(f"{type(e).__name__}: {e}")
        self._live.add(rid)
        return None

    # ---- outputs ---------------------------------------------------------------------------------
    def _deltas(self, outputs: list[tuple]) -> list[tuple]:
        """The step's deltas for requests the front still listens to (it may have aborted one)."""
        live = self._live
        deltas = []
        for delta in outputs:
            rid = delta[0]
            if rid not in live:
                continue
            if delta[1]:  # finished
                live.discard(rid)
            deltas.append(delta)
        return deltas


# ---- the engine process ---------------------------------------------------------------------------
def run_engine_process(
    config: EngineConfig,
    max_queue: int | None,
    commands: multiprocessing.connection.Connection,
    messages: multiprocessing.connection.Connection,
    log_level: int,
) -> None:
    """The child process's entry point: build the Engine, report ("ready", EngineInfo), run the loop.

    Ctrl+C reaches the whole process group; the front decides what to do (graceful shutdown), so the
    child ignores SIGINT. The loop ends on ("stop",) or when the front's pipe closes (front gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(config)
    except BaseException as e:  # noqa: BLE001 - reported to the front, which raises it
        logger.exception("the engine failed to start")
        messages.send([("dead", f"{type(e).__name__}: {e}")])
        return
    info = dataclasses.replace(EngineInfo.of(engine), tokenizer=None)
    messages.send([("ready", info)])

    def receive(block: bool) -> list | None:
        try:
            if not block and not commands.poll():
                return []
            batch = [commands.recv()]
            while commands.poll():
                batch.append(commands.recv())
            return batch
        except (EOFError, OSError):
            logger.warning("the server front went away; stopping the engine")
            return None

    outbox: queue.SimpleQueue = queue.SimpleQueue()
    writer = threading.Thread(target=write_to_pipe, args=(outbox, messages), name="engine-writer")
    writer.start()
    EngineCore(engine, send=outbox.put, max_queue=max_queue).run(receive)
    outbox.put(None)
    writer.join()
    messages.close()


def write_to_pipe(outbox: queue.SimpleQueue, conn: multiprocessing.connection.Connection) -> None:
    """A writer thread's loop: pickle and send what `outbox` holds until None (or the pipe breaks).

    NOTE: a pipe holds ~64 KB, a few steps of outputs at a few hundred streams. Written from the
    step loop, a front busy with HTTP would block the engine as soon as it fell that far behind;
    from a thread the engine steps on and the front later reads everything that piled up. The front
    sends its commands the same way, so neither side ever blocks the other's event or step loop."""
    while True:
        item = outbox.get()
        if item is None:
            return
        try:
            conn.send(item)
        except (BrokenPipeError, OSError):
            return  # the other side is gone; its reader reports that
