"""Browser routes: the playground (`GET /`), the live dashboard (`GET /dashboard`), their assets
(`/static/...`) and the JSON stats feed of the dashboard (`GET /stats`).

Authentication: `/stats` needs a key like `/v1` when keys are configured (see `API_PREFIXES` in
app.py); the pages and assets only with `--auth-all-endpoints`. A browser cannot attach a Bearer
header to a page load, so `BrowserAuthBridge` lets it log in with HTTP Basic auth instead (the
key as password, any user name): 401s of pages carry a Basic challenge, and Basic credentials
are turned into the Bearer key the `AuthMiddleware` checks.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.protocol import ErrorResponse
from ember.server.state import get_state
from ember.server.stats import StatsResponse, snapshot
from ember.web import STATIC_DIR

STATS_PREFIXES = ("/stats",)
"""Paths of this module that need a key like /v1 when keys are configured."""
PAGE_PATHS = ("/", "/dashboard", "/static/")
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    # NOTE: everything comes from this server: a CDN or inline script would be refused.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(tags=["Web UI"])


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.html", headers=_PAGE_HEADERS)


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", headers=_PAGE_HEADERS)


@router.get("/stats", response_model=StatsResponse, tags=["Operations"],
            responses={401: {"model": ErrorResponse, "description": "Missing or wrong API key"}})
async def stats(request: Request) -> JSONResponse:
    """The numbers of /metrics as JSON (counters are totals; clients diff snapshots)."""
    state = get_state(request)
    body = snapshot(state.metrics.registry, state.model_names[0], state.ready, state.config)
    return JSONResponse(body.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


def install(app: FastAPI) -> None:
    """Add the pages, /stats and the /static assets to `app`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _is_page(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith("/static/")


def basic_to_bearer(authorization: str) -> str | None:
    """`Basic base64(user:key)` -> `Bearer key` (the password, else the user name); None when
    the header is not Basic or cannot be decoded."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    key = password or user
    return f"Bearer {key}" if key else None


class BrowserAuthBridge:
    """HTTP Basic login for browsers in front of the Bearer-key `AuthMiddleware`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", ()))
        for i, (name, value) in enumerate(headers):
            if name.lower() == b"authorization":
                bearer = basic_to_bearer(value.decode("latin-1"))
                if bearer is not None:
                    headers[i] = (name, bearer.encode("latin-1"))
                    # NOTE: in place: outer middlewares read what the router adds to `scope`
                    scope["headers"] = headers
        if not _is_page(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                kept = [(k, v) for k, v in message.get("headers", [])
                        if k.lower() != b"www-authenticate"]
                kept.append((b"www-authenticate", b'Basic realm="Ember", charset="UTF-8"'))
                message = dict(message, headers=kept)
            await send(message)

        await self.app(scope, receive, send_wrapper)
