"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure path of the server ends here: bad JSON and invalid fields (400, naming the field),
authentication (401), unknown routes and models (404), limits (413, 429 with Retry-After),
loading / shutting down (503). Unexpected exceptions become a plain 500 without a traceback.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ember.types import InvalidRequestError

logger = logging.getLogger(__name__)

_STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                 403: "permission_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error",
                 500: "server_error", 503: "service_unavailable"}
_STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                 413: "request_too_large", 429: "rate_limit_exceeded",
                 503: "service_unavailable"}
# pydantic puts the member of a union that failed into `loc`; such parts are not field names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


class APIError(Exception):
    """An error answered to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code if code is not None else _STATUS_CODES.get(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_data(self) -> str:
        """The error as one SSE event (for failures after a stream started)."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_invalid_request(exc: InvalidRequestError) -> APIError:
    return APIError(400, str(exc), param=exc.param)


def too_many_requests(message: str, retry_after_s: float, type: str = "rate_limit_error",
                      code: str = "rate_limit_exceeded") -> APIError:
    seconds = max(1, math.ceil(retry_after_s)) if math.isfinite(retry_after_s) else 60
    return APIError(429, message, type=type, code=code, headers={"Retry-After": str(seconds)})


def unavailable(message: str, retry_after_s: int | None = None) -> APIError:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return APIError(503, message, headers=headers)


def loc_to_param(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member tags dropped."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if (part.lower() in _TYPE_TAGS or "[" in part or "(" in part
                or part.startswith(("function-", "constrained-", "json-or-python"))):
            continue
        out += f".{part}" if out else part
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request validation error as a 400 naming the field."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"request body is not valid JSON: {detail}".rstrip(": "))
    loc = first.get("loc", ())
    param = loc_to_param(loc)
    if first.get("type") == "missing" and param is None:
        return bad_request("a JSON request body is required")
    messages = []
    for err in errors[:3]:
        where = loc_to_param(err.get("loc", ()))
        messages.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request("; ".join(messages) + more, param)


def install_exception_handlers(app: FastAPI) -> None:
    """Map every exception to an OpenAI-shaped JSON error."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidRequestError)
        return from_invalid_request(exc).response()

    async def request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        headers = exc.headers
        if exc.status_code == 405:
            # NOTE: Starlette names only the first route matching the path; a path served by
            # several routes (GET and POST /v1/files) must list all of their methods.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request))}
        return APIError(exc.status_code, message, headers=headers).response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", type="server_error",
                        code="internal_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(InvalidRequestError, invalid_request)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of `app` serves on the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
