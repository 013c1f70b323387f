"""Per-app server state: loading the model in the background, readiness, draining."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field

from fastapi import Request

from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.server.errors import APIError, unavailable
from ember.server.limits import AdmissionControl, RateLimiter
from ember.server.metrics import ServerMetrics
from ember.server.serving import ServingContext, Servings
from ember.server.serving.embeddings import EmbeddingServing

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything one app instance owns (stored on `app.state.ember`)."""

    config: EngineConfig
    metrics: ServerMetrics
    model_names: tuple[str, ...]
    engine: AsyncEngine | None = None
    servings: Servings | None = None
    load_error: str | None = None
    draining: bool = False
    embeddings: EmbeddingServing | None = None
    """The embedding models (config.server.embedding_models), once loaded."""
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when loading ended, successfully or not."""

    @property
    def generator_names(self) -> tuple[str, ...]:
        """Names of the generation model ((): this server only embeds)."""
        return self.model_names if self.config.server.serve_generator else ()

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def phase(self) -> str:
        """What /health reports: loading, ready, restarting, draining or failed."""
        if self.load_error is not None or (self.engine is not None
                                           and self.engine.error is not None):
            return "failed"
        if self.draining:
            return "draining"
        if self.config.server.embedding_models and self.embeddings is None:
            return "loading"
        if not self.config.server.serve_generator:
            return "ready"
        if self.servings is None or self.engine is None:
            return "loading"
        if self.engine.restarting:
            return "restarting"
        return "ready" if self.engine.is_running else "loading"

    def not_ready_error(self) -> APIError:
        """Why requests cannot be served now (503; the error code names the phase)."""
        phase = self.phase
        if self.load_error is not None:
            err = unavailable(f"the model failed to load: {self.load_error}")
        elif phase == "draining":
            err = unavailable("the server is shutting down")
        elif phase == "failed":
            err = unavailable("the engine failed; restart the server")
        elif phase == "restarting":
            err = unavailable("the engine is restarting after a failed step; retry shortly",
                              retry_after_s=1)
        else:
            err = unavailable("the model is loading; retry shortly", retry_after_s=5)
        err.code = phase
        return err

    def require(self) -> Servings:
        """The servings, or a 503 while loading / draining / failed."""
        if not self.config.server.serve_generator:
            raise APIError(400, "this server serves only embedding models ("
                                f"{', '.join(self.config.server.embedding_models)}): use "
                                "/v1/embeddings", param="model", code="model_not_supported")
        if not self.ready:
            raise self.not_ready_error()
        assert self.servings is not None
        return self.servings

    def require_embeddings(self) -> EmbeddingServing:
        """The embedding models, 404 when this server has none, 503 while not ready."""
        if not self.config.server.embedding_models:
            raise APIError(404, f"this server serves no embedding model (only "
                                f"{', '.join(self.model_names)})", param="model",
                           code="model_not_found")
        if not self.ready:
            raise self.not_ready_error()
        assert self.embeddings is not None
        return self.embeddings

    async def load_embedders(self) -> bool:
        """Load config.server.embedding_models in a worker thread; False (load_error set)
        when one fails."""
        from ember.engine.embedder import Embedder

        cfg = self.config
        # NOTE: beside a generator, --max-model-len is the generator's; embedders keep theirs.
        model = (cfg.model if not cfg.server.serve_generator
                 else dataclasses.replace(cfg.model, max_model_len=None))
        try:
            embedders = await asyncio.to_thread(lambda: {
                name: Embedder.from_config(dataclasses.replace(model, model=name), cfg.env)
                for name in cfg.server.embedding_models})
        except Exception as exc:  # noqa: BLE001 - reported by /health and the CLI
            logger.error("failed to load an embedding model: %s", exc)
            self.load_error = str(exc)
            self.loaded.set()
            return False
        self.embeddings = EmbeddingServing(embedders)
        return True

    async def load(self) -> None:
        """Load the model in a worker thread (the event loop keeps answering /health)."""
        if self.config.server.embedding_models and not await self.load_embedders():
            return
        if not self.config.server.serve_generator:
            self.loaded.set()
            return
        try:
            engine = await asyncio.to_thread(AsyncEngine.from_config, self.config)
        except Exception as exc:  # noqa: BLE001 - reported by /health and the CLI
            logger.error("failed to load the model: %s", exc)
            self.load_error = str(exc)
            self.loaded.set()
            return
        self.attach(engine)
        logger.info("model %s ready (context %d tokens)", self.model_names[0],
                    engine.max_model_len)

    def attach(self, engine: AsyncEngine) -> None:
        """Use a loaded engine: start its thread and build the serving objects."""
        engine.set_observer(self.metrics)
        if not engine.is_running and engine.error is None:
            engine.start()
        self.metrics.bind_engine(engine.stats)
        server, sched = self.config.server, self.config.scheduler
        ctx = ServingContext(
            engine=engine, model_names=self.model_names,
            admission=AdmissionControl(sched.max_num_seqs, server.max_queued_requests),
            rate_limiter=RateLimiter(server.rate_limit_rpm, server.rate_limit_tpm),
            metrics=self.metrics, model_root=self.config.model.model)
        self.engine = engine
        self.servings = Servings.create(ctx)
        self.loaded.set()

    def begin_drain(self) -> None:
        """Stop taking requests (health turns 503); in-flight ones continue."""
        self.draining = True
        if self.engine is not None:
            self.engine.stop_accepting()

    async def shutdown(self) -> None:
        """Drain and stop the engine (in-flight requests get the grace period)."""
        self.begin_drain()
        if self.engine is not None:
            await self.engine.shutdown(self.config.server.shutdown_grace_s)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.ember
    return state


def get_servings(request: Request) -> Servings:
    """FastAPI dependency: the ready servings (503 otherwise)."""
    return get_state(request).require()
