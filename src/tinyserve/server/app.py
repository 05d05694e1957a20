"""The FastAPI app: `create_app(state)` wires the routes, errors, API key and the engine's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError, error_response, install_error_handlers
from .inputs import check_model, check_token_ids, render_chat, require_tokenizer
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from .state import ServerState

logger = logging.getLogger(__name__)

# Paths that need the API key when one is set; /health, /metrics and the docs stay open.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}


class APIKeyMiddleware:
    """Checks `Authorization: Bearer <key>` before anything else (even before the body is parsed)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(PROTECTED_PREFIXES)
            and scope["method"] != "OPTIONS"
        ):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Shutdown:
    """Starts the engine's graceful shutdown once (on SIGTERM/SIGINT, or at the latest at lifespan end)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.task: asyncio.Task[None] | None = None

    def begin(self) -> asyncio.Task[None]:
        if self.task is None:
            self.state.engine.stop_accepting()
            self.task = asyncio.ensure_future(self.state.engine.shutdown(self.state.shutdown_grace_s))
        return self.task


def create_app(state: ServerState) -> FastAPI:
    """The OpenAI-compatible app around `state.engine` (an AsyncEngine, started with the app)."""
    shutdown = Shutdown(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await shutdown.begin()

    app = FastAPI(
        title="TinyServe",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat on the TinyServe engine.",
    )
    app.state.tinyserve = state
    app.state.shutdown = shutdown
    install_error_handlers(app)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)
    _add_openai_routes(app, state)
    _add_server_routes(app, state)
    return app


def _add_openai_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        """Text completion; `stream: true` answers with server-sent events."""
        return await create_completion(state, body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        """Chat completion through the model's chat template; `stream: true` answers with SSE."""
        return await create_chat_completion(state, body, raw)

    def card(name: str) -> ModelCard:
        return ModelCard(
            id=name,
            created=state.created,
            root=state.model_path,
            max_model_len=state.max_model_len,
            vocab_size=state.vocab_size,
        )

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in state.model_names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def model(model_id: str) -> ModelCard:
        check_model(state, model_id)
        return card(model_id)


def _add_server_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def health() -> HealthResponse:
        """200 while the engine thread runs; 503 when it died or the server is shutting down."""
        engine = state.engine
        if not engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_dead")
        if app.state.shutdown.task is not None:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        return HealthResponse(status="ok", num_running=engine.num_in_flight)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of `prompt`, or of `messages` after the chat template."""
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            ids = render_chat(
                state, body.messages, add_generation_prompt=body.add_generation_prompt
            ).token_ids
        else:
            tok = require_tokenizer(state, "/tokenize")
            ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(state, body.model)
        tok = require_tokenizer(state, "/detokenize")
        if body.tokens:
            check_token_ids(state, body.tokens, "tokens")
        return DetokenizeResponse(prompt=tok.decode(body.tokens) if body.tokens else "")

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        stats = await state.engine.get_stats() if state.engine.is_running else None
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)
