"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the right status.

Every failure path of the server ends here: request validation (400), bad values the engine refuses
(400), the API key (401), unknown models and routes (404), a full queue or a shutdown (503), and any
bug (500, logged with its traceback).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyserve.engine.async_engine import (
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
    ShuttingDownError,
)

from .responses import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raise from a route to answer with an OpenAI-style error."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> ErrorResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def error_response(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status)


def error_from_exception(e: BaseException) -> APIError:
    """Map an engine-side exception to the error the client gets."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="queue_full")
    if isinstance(e, (ShuttingDownError, RequestAbortedError)):
        return APIError(503, str(e), code="shutting_down")
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), code="engine_dead")
    if isinstance(e, ValueError):
        return APIError(400, str(e), param=_param_of(str(e)))
    logger.error("internal error", exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}")


def _param_of(message: str) -> str | None:
    """SamplingParams messages start with the field name ("top_p must be ...")."""
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() and " must be " in message else None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return (
                f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})",
                None,
            )
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        return error_response(status, message)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        e = error_from_exception(exc)
        return error_response(e.status, e.message, e.param, e.code)
