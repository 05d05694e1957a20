"""`tinyserve serve MODEL`: the server's flags, and running uvicorn with graceful SIGTERM/SIGINT.

The engine flags come from tinyserve.cli.engine_args; this module adds the server's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from tinyserve.config import EngineConfig

logger = logging.getLogger("tinyserve.server")

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SWITCH_INTERVAL_S = 0.0005


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (see the ready line)")
    g.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes"
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients use (default: the MODEL argument as given)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="answer 503 when this many requests are already waiting (default: unbounded)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests may run on after SIGTERM/SIGINT before they are aborted",
    )
    g.add_argument(
        "--engine-core",
        default="process",
        choices=("process", "thread"),
        help="where the engine's step loop runs: its own process (default; HTTP work never holds "
        "it up) or a thread of the server process (shares the GIL with the HTTP event loop)",
    )
    g.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="TinyServe's log level")
    g.add_argument(
        "--uvicorn-log-level",
        default="warning",
        choices=_LOG_LEVELS,
        help="uvicorn's log level ('info' also prints an access log line per request)",
    )


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, shut down gracefully; returns the exit code."""
    from tinyserve.engine.async_engine import AsyncEngine

    from .app import create_app
    from .metrics import ServerMetrics
    from .state import ServerState

    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    process = args.engine_core == "process"
    if not process:
        # NOTE: the engine thread and the event loop share the GIL. With the default 5 ms switch
        # interval a busy loop (hundreds of SSE writes per step) holds the engine thread off for
        # whole intervals at a time; a short interval hands the GIL over as soon as it is wanted.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    t0 = time.perf_counter()
    async_engine = AsyncEngine(engine_config, max_queue=args.max_queue, process=process)  # loads the model
    engine = async_engine.info
    name = args.served_model_name or engine_config.model
    state = ServerState(
        engine=async_engine,
        model_names=[name],
        model_path=str(Path(engine_config.model)),
        metrics=ServerMetrics(),
        api_key=args.api_key,
        shutdown_grace_s=args.shutdown_timeout,
    )
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=args.uvicorn_log_level in ("debug", "info"),
        timeout_graceful_shutdown=int(args.shutdown_timeout) + 5,
        timeout_keep_alive=30,
    )

    def ready(host: str, port: int) -> None:
        print(
            f"TinyServe ready on http://{host}:{port} | model {name} | device {engine.device} | "
            f"KV pool {engine.kv_pool_tokens} tokens | max_model_len {engine.max_model_len} | "
            f"started in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

    server = _Server(config, on_ready=ready, on_signal=app.state.shutdown.begin)
    server.run()
    logger.info("server stopped")
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn.Server that prints the ready line, starts the engine's graceful shutdown on the first
    SIGTERM/SIGINT, and exits normally afterwards (uvicorn would re-raise the signal)."""

    def __init__(
        self, config: uvicorn.Config, *, on_ready: Callable[[str, int], None], on_signal: Callable[[], object]
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_signal = on_signal
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_ready(host, port)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting for connections
            return
        self.should_exit = True
        print(f"TinyServe: got {signal.Signals(sig).name}, shutting down", file=sys.stderr, flush=True)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_signal)
