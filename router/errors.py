"""OpenAI-shaped errors for the router's HTTP edge.

Every error response, whatever raised it, has the OpenAI body
``{"error": {"message", "type", "param", "code"}}`` so that OpenAI client libraries turn it
into their usual exception types. ``install_error_handlers`` wires this up for a FastAPI app:
our own ``APIError``, request validation failures (400, not FastAPI's 422, naming the
offending field), malformed JSON, Starlette HTTP errors (unknown route, wrong method, body
too large) and, as a last resort, any unhandled exception (500, no traceback leaked).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "error_response", "error_type_for_status", "install_error_handlers"]

logger = logging.getLogger("pdserve.router")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


def error_type_for_status(status_code: int) -> str:
    """The OpenAI-style error ``type`` for an HTTP status."""
    if status_code in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status_code]
    return "invalid_request_error" if status_code < 500 else "internal_error"


class APIError(Exception):
    """Raise from request handling code to answer with an OpenAI-shaped error.

    ``type`` defaults from the status (400 -> "invalid_request_error", 404 ->
    "not_found_error", 413 -> "request_too_large", 429 -> "rate_limit_exceeded",
    503 -> "service_unavailable", 500 -> "internal_error"). ``headers`` are added to the
    response (e.g. ``{"Retry-After": "1"}`` for 429/503).
    """

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: Optional[str] = None,  # noqa: A002 - OpenAI's field name
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or error_type_for_status(status_code)
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    message: str,
    type: str = "invalid_request_error",  # noqa: A002
    param: Optional[str] = None,
    code: Optional[str] = None,
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI sends it; also usable as an SSE error event payload."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    type: Optional[str] = None,  # noqa: A002
    param: Optional[str] = None,
    code: Optional[str] = None,
    headers: Optional[Mapping[str, str]] = None,
) -> JSONResponse:
    return APIError(message, status_code, type, param, code, headers).response()


# Locations FastAPI prefixes to validation errors; the client thinks in field names only.
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}
# Errors at the body root that mean "the body is not a JSON object at all".
_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type", "is_instance_of"}


def _field_path(loc: Sequence[Any]) -> Optional[str]:
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def _describe(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    path = _field_path(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    # Our validators raise ValueError; pydantic prefixes those with "Value error, ".
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        pos = list(err.get("loc", ()))[1:]
        where = f" at character {pos[0]}" if pos else ""
        return f"Request body is not valid JSON ({detail}{where})" if detail else "Request body is not valid JSON"
    if path is None:
        if kind == "missing":
            return "Request body is missing; expected a JSON object"
        if kind in _NOT_AN_OBJECT:
            return "Request body must be a JSON object (Content-Type: application/json)"
        return msg
    if kind == "missing":
        return f"Missing required parameter: '{path}'"
    return f"Invalid value for '{path}': {msg}"


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "Invalid request")
    first = errors[0]
    param = None if first.get("type") == "json_invalid" else _field_path(first.get("loc", ()))
    # A few messages are enough; a badly wrong body can produce dozens.
    message = "; ".join(_describe(e) for e in errors[:5])
    if len(errors) > 5:
        message += f" (and {len(errors) - 5} more errors)"
    return error_response(400, message, param=param)


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and detail == "Not Found":
        detail = f"Unknown route: {request.method} {request.url.path}"
    elif status == 405 and detail == "Method Not Allowed":
        detail = f"Method {request.method} is not allowed for {request.url.path}"
    elif status == 413 and detail in ("Request Entity Too Large", "Content Too Large"):
        detail = "Request body is too large"
    return error_response(status, detail, headers=getattr(exc, "headers", None))


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Log the traceback server-side; the client only learns that something went wrong.
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error", code=None)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error from ``app`` in OpenAI shape.

    Note: Starlette still re-raises an unhandled exception after the 500 response is sent
    (so the server logs it); tests must use ``TestClient(app, raise_server_exceptions=False)``.
    Errors after a streaming response has started cannot become an HTTP error; the stream
    itself must send ``error_body(...)`` as an event.
    """
    app.add_exception_handler(APIError, _handle_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _handle_unexpected)
