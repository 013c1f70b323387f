"""Runs one batch line through the server's own serving classes, so a line's response body is
exactly what `POST <url>` on `ember serve` answers (same validation, same 400 reasons, same
response models). Dispatch is by `url`: generation endpoints in `ENDPOINTS`, and
`EMBEDDINGS_URL` through the server's `EmbeddingServing` (whose micro-batcher packs the
concurrent lines of a batch into shared forward passes).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from ember.batch.format import BatchLine
from ember.engine.async_engine import AsyncEngine
from ember.server.errors import bad_request, validation_error
from ember.server.limits import PRINCIPAL_KEY, AdmissionControl, RateLimiter
from ember.server.metrics import ServerMetrics
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.serving import ServingContext, Servings
from ember.server.serving.base import engine_error
from ember.server.serving.embeddings import EmbeddingRequest, EmbeddingServing


class _Serving(Protocol):
    async def create(self, body: Any, request: Request) -> Response: ...


@dataclass(frozen=True)
class Endpoint:
    """A batch-capable endpoint: its request model and the serving object that answers it."""

    request_model: type[BaseModel]
    serving: Callable[[Servings], _Serving]


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, lambda s: s.chat),
    "/v1/completions": Endpoint(CompletionRequest, lambda s: s.completions),
}
"""Generation endpoints (they need a generation engine)."""
EMBEDDINGS_URL = "/v1/embeddings"
BATCH_URLS = frozenset((*ENDPOINTS, EMBEDDINGS_URL))
"""Every url a batch line may use on this build."""


@dataclass(frozen=True)
class LineResult:
    """What the server answered for one line."""

    status_code: int
    request_id: str
    body: dict[str, Any]
    completion_tokens: int = 0


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.get_running_loop().create_future()  # a batch "client" never goes away
    raise AssertionError("unreachable")


def _http_request(url: str) -> Request:
    """A stand-in for the HTTP request the serving classes take (principal, disconnects)."""
    scope = {"type": "http", "method": "POST", "path": url, "headers": [],
             "query_string": b"", "state": {PRINCIPAL_KEY: "batch"}}
    return Request(scope, _never_disconnects)


def batch_context(engine: AsyncEngine, model_names: tuple[str, ...],
                  metrics: ServerMetrics | None = None, model_root: str = "") -> ServingContext:
    """A serving context for batch work on `engine`: no admission queue limit and no rate
    limits (the batch runner bounds its own in-flight work)."""
    max_seqs = engine.config.scheduler.max_num_seqs
    return ServingContext(engine=engine, model_names=model_names,
                          admission=AdmissionControl(max_seqs, 2**62),
                          rate_limiter=RateLimiter(None, None),
                          metrics=metrics or ServerMetrics(model_names[0]),
                          model_root=model_root)


class BatchExecutor:
    """Answers batch lines with the serving classes of one engine and/or embedding models.

    Args:
        servings: the generation serving objects (see `batch_context`); None when only
            embedding models are loaded.
        priority: if set, the scheduler priority of every line (lower runs first under
            `--policy priority`); server batches use a value above interactive requests'.
        embeddings: the embedding models, if any (answer `/v1/embeddings` lines).
    """

    def __init__(self, servings: Servings | None, priority: int | None = None,
                 embeddings: EmbeddingServing | None = None) -> None:
        self.servings = servings
        self.priority = priority
        self.embeddings = embeddings

    @property
    def served_urls(self) -> frozenset[str]:
        urls = set(ENDPOINTS) if self.servings is not None else set()
        if self.embeddings is not None:
            urls.add(EMBEDDINGS_URL)
        return frozenset(urls)

    async def execute(self, line: BatchLine) -> LineResult:
        try:
            if line.url == EMBEDDINGS_URL:
                payload = await self._embed(line.body)
                return LineResult(200, payload["id"], payload)
            assert self.servings is not None, "the runner sends only served urls"
            endpoint = ENDPOINTS[line.url]
            body = self._validate(endpoint, line.body)
            response = await endpoint.serving(self.servings).create(body, _http_request(line.url))
        except Exception as exc:  # noqa: BLE001 - every failure is that line's answer
            err = engine_error(exc)
            return LineResult(err.status, f"req_{uuid.uuid4().hex}", err.body())
        payload = json.loads(bytes(response.body))
        usage = payload.get("usage") or {}
        return LineResult(response.status_code, payload.get("id") or f"req_{uuid.uuid4().hex}",
                          payload, int(usage.get("completion_tokens") or 0))

    async def _embed(self, raw: dict[str, Any]) -> dict[str, Any]:
        assert self.embeddings is not None, "the runner sends only served urls"
        body = self._parse(EmbeddingRequest, raw)
        generators = self.servings.ctx.model_names if self.servings is not None else ()
        response = await self.embeddings.create(body, generators)
        return response.model_dump(mode="json")

    @staticmethod
    def _parse(model: type[BaseModel], raw: dict[str, Any]) -> Any:
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            # NOTE: the same errors FastAPI raises for a request body, so the same 400 text.
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            raise validation_error(RequestValidationError(errors)) from exc

    def _validate(self, endpoint: Endpoint, raw: dict[str, Any]) -> Any:
        body = self._parse(endpoint.request_model, raw)
        if getattr(body, "stream", False):
            raise bad_request("stream is not supported in batch requests", "stream")
        if self.priority is not None and hasattr(body, "priority"):
            body.priority = self.priority
        return body


