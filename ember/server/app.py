"""The FastAPI app factory: routes, OpenAI-shaped errors, middleware (metrics, auth, body size)
and a lifespan that loads the model in the background (so /health answers 503 meanwhile) and
drains the engine on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ember import __version__
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.server.errors import install_exception_handlers
from ember.server.hosts import AllowedHostsMiddleware
from ember.server.limits import ApiKeyAuth, AuthMiddleware, BodySizeLimitMiddleware
from ember.server.metrics import HttpMetricsMiddleware, ServerMetrics
from ember.server.openapi_fixups import refine
from ember.server.protocol import STREAM_MODELS
from ember.server.routes import admin, embeddings, openai, web
from ember.server.state import AppState

logger = logging.getLogger(__name__)

API_PREFIXES = ("/v1/", "/v1", "/tokenize", "/detokenize", *web.STATS_PREFIXES)
"""Paths that need an API key when keys are configured (all paths with auth_all_endpoints)."""


def served_model_names(config: EngineConfig) -> tuple[str, ...]:
    """--served-model-name values, else the model argument (a path's file name)."""
    if config.server.served_model_names:
        return tuple(config.server.served_model_names)
    return (config.model.model,)


class AppAddon(Protocol):
    """A feature installed into the app from a layer above the server (e.g. the Batch API of
    `ember.batch`, which itself runs requests through the server's serving classes)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


AddonFactory = Callable[[FastAPI, AppState], AppAddon]
"""Installs its routes on the app and returns the addon (started and stopped with the app)."""


def create_app(config: EngineConfig, engine: AsyncEngine | None = None,
               addons: Sequence[AddonFactory] = ()) -> FastAPI:
    """Build the server app.

    Args:
        config: engine + server configuration (validated here).
        engine: an already loaded engine (tests, embedding); without one the lifespan loads
            `config.model` in a worker thread while /health answers 503.
        addons: features from higher layers (`ember serve` adds the Batch API).

    Returns:
        The app; its `state.ember` is the `AppState` (readiness, metrics, engine).
    """
    config.validate()
    names = served_model_names(config)
    state = AppState(config=config, metrics=ServerMetrics(names[0]), model_names=names,
                     engine=engine)
    installed: list[AppAddon] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[Any] | None = None
        if engine is None:
            task = asyncio.create_task(state.load())
        else:
            state.attach(engine)
            if config.server.embedding_models:
                task = asyncio.create_task(state.load_embedders())
        for addon in installed:
            addon.start()
        try:
            yield
        finally:
            for addon in installed:
                await addon.stop()  # NOTE: before draining (running batches resume later)
            if task is not None and not task.done():
                task.cancel()  # the loading thread finishes on its own; nothing uses it
            await state.shutdown()

    app = FastAPI(title="Ember", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference server of the Ember engine.")
    app.state.ember = state
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(admin.router)
    web.install(app)  # the playground, the dashboard and /stats
    installed.extend(factory(app, state) for factory in addons)
    install_exception_handlers(app)
    server = config.server
    keys = list(server.api_keys)
    if config.env.api_key:
        keys.append(config.env.api_key)
    # NOTE: Starlette runs the last added middleware first: metrics -> auth -> body size -> app.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=server.max_body_bytes,
                       path_limits={"/v1/files": server.max_upload_bytes})
    app.add_middleware(AuthMiddleware, auth=ApiKeyAuth(keys),
                       protected_prefixes=None if server.auth_all_endpoints else API_PREFIXES)
    app.add_middleware(web.BrowserAuthBridge)  # HTTP Basic login for the pages (runs before auth)
    if server.guards.allowed_hosts is not None:
        app.add_middleware(AllowedHostsMiddleware, allowed=server.guards.allowed_hosts)
    app.add_middleware(HttpMetricsMiddleware, metrics=state.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the SSE chunk models, minus the 422 FastAPI adds by default
    (validation errors are answered with 400 here)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in STREAM_MODELS:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                               mode="serialization")
        for name, sub in model_schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, model_schema)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    state: AppState = app.state.ember
    engine = state.engine
    refine(schema, state.model_names, engine.vocab_size if engine is not None else None,
           state.config.server.guards.max_stop_token_ids,
           engine.max_model_len if engine is not None else None)
    if engine is not None:  # NOTE: token-id bounds are known once the model is loaded
        app.openapi_schema = schema
    return schema
