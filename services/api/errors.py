"""Errors in OpenAI's shape: `APIError` for what a route refuses, and the app's exception handlers.

Every error body is `{"error": {"message", "type", "param", "code"}}` (services/protocol.py); the
handlers turn validation errors, HTTP errors, an unreachable vote store, an unavailable engine and
anything unexpected into that shape. `services.app.build_app` registers them.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kaizen.core import metrics
from services.comparisons import DatabaseUnavailable
from services.engine import EngineUnavailable
from services.protocol import ErrorInfo, ErrorResponse, dump

log = logging.getLogger(__name__)

REGISTRY_DAMAGED = ("the model registry's state is damaged and nothing can rebuild it: an operator must run "
                    "`kaizen models repair --champion vN` (the server log has the details)")

#: Routes whose invalid bodies answer 422 (the feedback contract) rather than OpenAI's 400.
UNPROCESSABLE_ROUTES = {"/v1/feedback"}


class APIError(Exception):
    """An error the client caused or must know about, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(dump(body), status_code=status, headers=headers)


async def handle_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    message = f"{param}: {msg}" if param else msg
    status = 422 if request.url.path in UNPROCESSABLE_ROUTES else 400
    return error_response(status, message, "invalid_request_error", param, "invalid_value")


async def handle_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


async def handle_database_unavailable(request: Request, exc: Exception) -> Response:
    """The shared store cannot be reached: nothing was taken (a vote is committed or refused whole)."""
    assert isinstance(exc, DatabaseUnavailable)
    metrics.DATABASE_ERRORS.inc()
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    retry = str(request.app.state.settings.database_retry_after_s)
    return error_response(503, "the vote store is unavailable: nothing was recorded, retry shortly",
                          "service_unavailable", code="database_unavailable", headers={"Retry-After": retry})


async def handle_engine_unavailable(request: Request, exc: Exception) -> Response:
    """The engine is swapping weights, restarting or died under the request: retry shortly."""
    assert isinstance(exc, EngineUnavailable)
    metrics.ENGINE_UNAVAILABLE.labels(code=exc.reason).inc()
    retry = str(request.app.state.settings.engine_retry_after_s)
    return error_response(503, str(exc), "service_unavailable", code=exc.reason,
                          headers={"Retry-After": retry})


async def handle_unexpected(_: Request, exc: Exception) -> Response:
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error (ref %s)", ref, exc_info=exc)
    return error_response(500, f"internal error (ref {ref})", "internal_error")
